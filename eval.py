"""Evaluation: per-instance prediction records of a model (+ LoRA adapter) on a task, and eval.py's CLI.

MUSCLE's metrics (the paper, Sec. 3: negative flips, BTC, gain/regression rates) compare two models
instance by instance, so evaluation writes one JSON line per instance; `python eval.py compare`
turns two or three such files into the compatibility report (compare.py), `python eval.py
summary` several runs into one table (summary.py).

The paper evaluated with lm-evaluation-harness v0.4.3 (the paper, appendix A.3), and the records
follow its rules: multiple choice by log-likelihood (likelihood.py), generation greedy (generation.py);
GSM8K `correct` is strict-match ("#### N", the paper's "exact match of the final number"), with
flexible-extract stored beside it (`correct_flexible`) and printed too.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

import cli
import data
import files
import generation
import likelihood
import lora
import metrics
import models
import toy  # noqa: F401  (registers the toy tasks and the toy bases)




# ------------------------------------------------------------------ tasks: records and metrics
def generation_record(metric: str, item: Any, text: str) -> dict[str, Any]:
    """Prediction record of one generated text, scored against any of the item's references.

    GSM8K ("exact_match"): both harness filters are stored; `correct` is strict-match (the
    "#### N" answer the paper scores, appendix A.3, and the format the task adapter is trained to
    write), `correct_flexible` the flexible-extract variant. SAMSum ("rouge1"): score = ROUGE-1 F,
    correct = None (a continuous metric: the report uses gain/regression rates, the paper's Sec. 3).
    """
    record: dict[str, Any] = {"prediction": text, "reference": item.references[0]}
    if metric == "exact_match":
        strict, flexible = metrics.extract_strict(text), metrics.extract_flexible(text)
        correct = any(metrics.exact_match(strict, r) for r in item.references)
        record.update(correct=correct, score=float(correct), extracted_strict=strict,
                      extracted_flexible=flexible,
                      correct_flexible=any(metrics.exact_match(flexible, r) for r in item.references))
    elif metric == "rouge1":
        record.update(correct=None, score=max(metrics.rouge1(text, r) for r in item.references))
    else:
        raise ValueError(f"unknown generation metric {metric!r} (known: exact_match, rouge1)")
    return record


def evaluate(model: torch.nn.Module, tokenizer: Any, task: str | data.Task, items: Sequence[Any],
             batch_size: int = 32, limit: int | None = None, num_fewshot: int = 0, fewshot_items: Sequence[Any] = (),
             add_bos: bool = False, fast: bool = True, max_length: int | None = None,
             progress: bool = False) -> list[dict[str, Any]]:
    """Prediction records (id, task, prediction, correct, score, ..., prompt: the text scored or
    continued, few-shot prefix included) of the first `limit` items.

    num_fewshot > 0 prepends the harness's few-shot prefix drawn from `fewshot_items` (the train
    split); the paper's models are fine-tuned on the task, so 0-shot is the default. batch_size
    counts choice sequences (multiple choice) or prompts (generation) per forward.
    """
    spec = data.get_task(task)
    items = list(items[:limit] if limit is not None else items)
    prompts = data.add_fewshot(spec, items, fewshot_items, num_fewshot)
    if spec.kind == "multiple_choice":
        records = likelihood.score_choices(model, tokenizer, prompts, batch_size, add_bos, fast, max_length, progress)
        likelihood.check_finite(records)
    else:
        texts = generation.generate(model, tokenizer, [it.prompt for it in prompts], spec.max_new_tokens, spec.stop,
                         spec.no_repeat_ngram_size, batch_size, add_bos, max_length, progress)
        records = [{"id": it.id, **generation_record(spec.metric, it, t)} for it, t in zip(items, texts)]
    texts_in = [it.context if spec.kind == "multiple_choice" else it.prompt for it in prompts]
    return [{"id": r.pop("id"), "task": spec.name, **r, "prompt": text} for r, text in zip(records, texts_in)]


def check_scorable(task: str | data.Task, items: Sequence[Any], tokenizer: Any, max_length: int,
                   add_bos: bool = False) -> None:
    """Raise the error `evaluate` would raise on these items, without a model: every choice
    tokenises into a request (multiple choice), or the task's new tokens leave room for a prompt."""
    spec = data.get_task(task)
    if spec.kind == "multiple_choice":
        likelihood.encode_requests(tokenizer, items, add_bos, max_length)
    elif spec.max_new_tokens >= max_length:
        raise ValueError(f"task {spec.name} generates {spec.max_new_tokens} new tokens, which leaves no room "
                         f"for a prompt in the model's context of {max_length} tokens")


def summarize(task: str | data.Task, records: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Task metrics: the mean score under the task's metric name (acc, exact_match, rouge1), plus
    acc_norm for multiple choice and the flexible-extract exact match for GSM8K."""
    spec = data.get_task(task)
    n = len(records)
    out = {spec.metric: sum(r["score"] for r in records) / n}
    for key, name in (("correct_norm", "acc_norm"), ("correct_flexible", "exact_match_flexible")):
        if key in records[0]:
            out[name] = sum(r[key] for r in records) / n
    out["n"] = n
    return out


def write_predictions(records: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line (UTF-8), in item order, written atomically (an earlier file at
    `path` survives a failed write whole); parent folders are created."""
    return files.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


# ------------------------------------------------------------------ command line
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Evaluate a model (+ LoRA adapter) on a task; print the metrics, write one JSON "
                    "line per instance. `python eval.py compare OLD NEW [COMPAT]` prints the "
                    "compatibility report instead (see `python eval.py compare --help`), `python eval.py "
                    "summary RUN_DIR...` the table of several updates (`python eval.py summary --help`).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="registry name, local HF checkpoint dir or hub repo id")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format) to put on the model")
    p.add_argument("--task", required=True, help=f"one of {data.task_names()}")
    p.add_argument("--data-dir", default=None, help="local task files (None: download the pinned hub copy)")
    p.add_argument("--split", default=None, help="split to evaluate (None: the task's evaluation split)")
    p.add_argument("--limit", type=cli.LIMIT, default=None, help="evaluate only the first N items")
    p.add_argument("--batch-size", type=cli.POSITIVE_INT, default=32,
                   help="choice sequences (multiple choice) or prompts (generation) per forward")
    p.add_argument("--num-fewshot", type=cli.NON_NEGATIVE_INT, default=0,
                   help="harness few-shot examples from the train split (seed 1234)")
    p.add_argument("--add-bos", action="store_true",
                   help="prepend BOS to every request (harness >= v0.4.10); off = harness v0.4.3, as the paper")
    p.add_argument("--plain", action="store_true",
                   help="score each choice with its own forward (slow reference path, same numbers)")
    p.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", type=cli.device, default=None, help="None: cuda if available, else cpu")
    p.add_argument("--out", default="predictions.jsonl", help="predictions file (JSON Lines)")
    return p.parse_args(argv)


# Errors a user can cause (wrong name, path, file, shape, data; no network, gated repo): one line
# naming the input and the fix, exit status 2, no traceback.
USER_ERRORS = (ValueError, OSError, ImportError)


def _same_model(a: str, b: str) -> bool:
    """Whether two --model spellings name one checkpoint: registry names count as their hub id,
    local directories by their resolved path."""
    def canonical(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if path.is_dir() else models.REGISTRY.get(name, name)
    return canonical(a) == canonical(b)


def warn_if_other_base(adapter: str, model_name: str) -> None:
    """Llama-1 and Llama-2 (or Phi-1.5 and Phi-2) have the same shapes, so an adapter of one loads
    onto the other without error; the base_model_name_or_path it was saved with tells them apart."""
    config = json.loads((Path(adapter) / lora.CONFIG_NAME).read_text(encoding="utf-8"))
    base = config.get("base_model_name_or_path")
    if base and not _same_model(base, model_name):
        cli.say(f"warning: adapter {adapter} was trained on {base!r}, not on --model {model_name!r}; "
                f"its predictions on another base mean little")


def name_broken(error: likelihood.NonFinite, model: str, adapter: str | None) -> str:
    """The NonFinite message with the model and adapter that produced it, and what to check."""
    source = f"--model {model}" + (f" with --adapter {adapter}" if adapter else "")
    return (f"{source}: {error}; its weights hold NaN or inf values, so no accuracy is reported: "
            f"check the checkpoint{' and the adapter' if adapter else ''} (a diverged training run?)")


# train.py's marker of a finished stage, written last into the stage's directory.
STAGE_DONE = "DONE"


def _progress(log: Path) -> tuple[int | None, int | None]:
    """(the best epoch so far, the last step) an unfinished stage's log.jsonl records."""
    records = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue  # a damaged line says nothing about where the stage is
    steps = [r["step"] for r in records if isinstance(r, dict) and isinstance(r.get("step"), int)]
    best = [r.get("best_epoch") for r in records if isinstance(r, dict) and "val_loss" in r]
    return (best[-1] if best else None), (max(steps) if steps else None)


def warn_if_unfinished(adapter: str) -> None:
    """An adapter inside a train.py stage (its directory holds log.jsonl) whose stage has no DONE
    is the best epoch so far of an interrupted stage, not the stage's result. It is evaluated
    (following a long run's progress is a use of it), under a warning that names the stage
    directory, the step its log ends at and the adapter's epoch."""
    stage = Path(adapter).resolve().parent
    if (stage / "log.jsonl").is_file() and not (stage / STAGE_DONE).is_file():
        epoch, step = _progress(stage / "log.jsonl")
        cli.say(f"warning: adapter {adapter} is from an unfinished training stage ({stage} has no "
                f"{STAGE_DONE}{f'; its log ends at step {step}' if step is not None else ''}): it is the "
                f"best epoch so far{f' (epoch {epoch})' if epoch is not None else ''}, not the stage's "
                f"result; rerun train.py to finish the stage")


def run(args: argparse.Namespace) -> None:
    """Evaluate --model (+ --adapter) on --task; write the records, print the metrics."""
    spec = data.get_task(args.task)
    files.check_writable(args.out, "--out")  # before the work whose result it keeps
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    auto = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = models.load_model(args.model, dtype=DTYPES.get(args.dtype, auto), device=device)
    if args.adapter:
        lora.load_adapter(model, args.adapter)
        warn_if_other_base(args.adapter, args.model)
        warn_if_unfinished(args.adapter)
    tokenizer = models.load_tokenizer(args.model)
    items = data.load_task(spec, args.split or spec.eval_split, args.data_dir)
    shots = data.load_task(spec, "train", args.data_dir) if args.num_fewshot else ()
    try:
        records = evaluate(model, tokenizer, spec.name, items, args.batch_size, args.limit, args.num_fewshot,
                           shots, args.add_bos, not args.plain, progress=True)
    except likelihood.NonFinite as e:
        raise likelihood.NonFinite(name_broken(e, args.model, args.adapter)) from None
    try:
        path = write_predictions(records, args.out)
    except OSError as e:
        raise OSError(e.errno, f"cannot write --out {args.out} ({e.strerror or e}); an earlier file "
                               f"there is intact: {files.fix_for(e.errno)} or pass another --out, then "
                               f"rerun") from e
    print(json.dumps({"task": spec.name, **summarize(spec.name, records)}))
    cli.say(f"wrote {len(records)} predictions to {path}")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["compare"]:
        import compare  # the report needs no torch model; imported only for the subcommand

        try:
            return compare.main(argv[1:])
        except KeyboardInterrupt:
            return cli.interrupted("no report was written")
    if argv[:1] == ["summary"]:
        import summary

        return summary.main(argv[1:])
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        return cli.fail(e)
    except KeyboardInterrupt:
        return cli.interrupted(f"nothing was written to --out {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
