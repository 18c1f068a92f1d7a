"""lm-evaluation-harness sample files (`--log_samples`) read as prediction records.

The harness (0.4.x) writes one `samples_<task>_<date>.jsonl` per task, one line per document
and filter: `doc_id` (the document's position in the evaluated split), `doc`, `target`,
`arguments` (`gen_args_<i>` -> `arg_0` the context, `arg_1` the continuation or the generation
settings), `resps` and `filtered_resps` (every value turned into a string), `filter`, `metrics`
(the names of the metrics computed), one field per metric (a number, or for a metric aggregated
over the corpus the sample's inputs to it), and `doc_hash` (SHA-256 of the document as JSON).
Multiple-choice tasks have one filter, "none"; generation tasks such as GSM8K one line per
filter ("strict-match", "flexible-extract").

Each document becomes one record in the shape predictions.py reads: `id` (the doc_id), `task`
(from the file name), `prediction` (the choice of highest log-likelihood, or the generated
text), `outputs` (metric -> the output it scores: acc_norm's choice, the answer a generation
filter extracted), `gold`, `prompt`, `choices` and `loglikelihoods` (multiple choice),
`doc_hash`, `line` (of its first line in the file), `metrics`, keyed "metric,filter" as the
harness's results file names them ("acc,none", "exact_match,strict-match"), and
`corpus_metrics`, the keys of the metrics that have no per-sample value (bleu: the harness
computes it over the whole corpus).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

# The fields every sample line of harness 0.4.x has; doc_hash is how two files are checked to
# hold the same documents.
REQUIRED = ("doc_id", "doc", "target", "arguments", "resps", "filtered_resps", "filter", "metrics", "doc_hash")
_NAME = re.compile(r"^samples_(?P<task>.+)_(?P<date>\d{4}-\d{2}-\d{2}T[0-9\-.]+)\.jsonl$")
HOW = "expected a samples_<task>_<date>.jsonl written by lm-eval --log_samples (harness 0.4.x)"


def is_sample_line(record: Any) -> bool:
    """Whether a parsed JSON line is meant as a harness sample (it has a doc_id); its other fields
    are checked when it is read."""
    return isinstance(record, dict) and "doc_id" in record


def task_of(path: Path) -> str | None:
    """The task name the harness put in the file name, or None for a renamed file."""
    match = _NAME.match(path.name)
    return match["task"] if match else None


def _check_line(sample: Any, where: str) -> None:
    """Refuse a line of another shape, naming what is missing."""
    if not isinstance(sample, dict):
        raise ValueError(f"{where}: a harness sample must be a JSON object, got {type(sample).__name__}; {HOW}")
    missing = [key for key in REQUIRED if key not in sample]
    if missing:
        raise ValueError(f"{where}: harness sample lacks {missing}; {HOW}")
    if isinstance(sample["doc_id"], bool) or not isinstance(sample["doc_id"], int):
        raise ValueError(f"{where}: doc_id must be an integer, got {sample['doc_id']!r}; {HOW}")
    for name in sample["metrics"]:
        value = sample.get(name)
        if _is_corpus_level(value):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{where}: metric {name!r} should be a finite number, got {value!r:.80}; {HOW}")


def _is_corpus_level(value: Any) -> bool:
    """A metric the harness aggregates over the whole corpus (bleu, chrf, ter, f1, mcc, ...) logs
    each sample's inputs to it, such as the (reference, prediction) pair, instead of a score."""
    return isinstance(value, list)


def _is_choice_line(sample: dict) -> bool:
    """Multiple choice: every filtered response is a [log-likelihood, is_greedy] pair."""
    responses = sample["filtered_resps"]
    return bool(responses) and all(isinstance(r, list) and len(r) == 2 for r in responses)


def _loglikelihoods(sample: dict, where: str) -> list[float]:
    try:
        return [float(ll) for ll, _ in sample["filtered_resps"]]
    except ValueError:
        raise ValueError(f"{where}: filtered_resps of a multiple-choice sample should be "
                         f"[log-likelihood, is_greedy] pairs, got {sample['filtered_resps']!r:.80}; {HOW}") from None


def _generated_text(sample: dict, where: str) -> str:
    """The raw generation of a generate_until sample: resps holds [[text]] (one request, one repeat)."""
    resps = sample["resps"]
    if not (isinstance(resps, list) and resps and isinstance(resps[0], list) and resps[0]
            and isinstance(resps[0][0], str)):
        raise ValueError(f"{where}: resps should be [[generated text]] or a list of [log-likelihood, "
                         f"is_greedy] pairs, got {resps!r:.80}; {HOW}")
    return resps[0][0]


def _filtered_answer(sample: dict) -> str | None:
    """The answer a generation sample's filter extracted (GSM8K's number, "[invalid]" when none):
    filtered_resps holds [answer] (one request)."""
    responses = sample["filtered_resps"]
    return responses[0] if isinstance(responses, list) and len(responses) == 1 and isinstance(responses[0], str) else None


def _argmax(values: list[float]) -> int:
    """The first index of the maximum, as numpy's argmax (the harness's acc and acc_norm)."""
    return max(range(len(values)), key=lambda i: (values[i], -i))


def _choices(sample: dict) -> list[str] | None:
    """The choices' texts: each request's continuation without the harness's default target
    delimiter " " (acc_norm divides a choice's log-likelihood by its text's length in characters);
    None when the arguments are not (context, continuation) pairs."""
    arguments = sample["arguments"]
    if not isinstance(arguments, dict):
        return None
    continuations = [arguments[k].get("arg_1") for k in sorted(arguments, key=lambda k: int(k.rsplit("_", 1)[1]))
                     if isinstance(arguments[k], dict)]
    if not continuations or not all(isinstance(c, str) and c for c in continuations):
        return None
    return [c.removeprefix(" ") for c in continuations]


def _prompt(sample: dict) -> str | None:
    first = sample["arguments"].get("gen_args_0", {}) if isinstance(sample["arguments"], dict) else {}
    return first.get("arg_0") if isinstance(first.get("arg_0"), str) else None


def _gold(target: str) -> int | str:
    """The target as the harness wrote it (a string); a choice index when it is a number."""
    return int(target) if target.isdigit() else target


def _record(sample: dict, task: str | None, line: int, where: str) -> dict:
    """The record of one document from its first sample line."""
    record: dict[str, Any] = {"id": sample["doc_id"], "task": task, "gold": _gold(str(sample["target"])),
                              "prompt": _prompt(sample), "doc_hash": sample["doc_hash"], "line": line,
                              "metrics": {}, "corpus_metrics": [], "outputs": {}}
    if _is_choice_line(sample):
        lls = _loglikelihoods(sample, where)
        record["loglikelihoods"] = lls
        record["prediction"] = _argmax(lls)
        choices = _choices(sample)
        if choices and len(choices) == len(lls):
            record["choices"] = choices
            record["outputs"]["acc_norm,none"] = _argmax([ll / max(len(c), 1) for ll, c in zip(lls, choices)])
    else:
        record["prediction"] = _generated_text(sample, where)
    return record


def read_samples(path: Path, lines: list[tuple[int, Any]]) -> list[dict]:
    """The records of one harness sample file from its parsed lines (line number, JSON value),
    one per document, in the file's order; several lines of one document (one per filter) give
    that document's metrics under each filter."""
    task = task_of(path)
    records: dict[int, dict] = {}
    seen: dict[tuple[int, str], int] = {}
    for number, sample in lines:
        where = f"{path}:{number}"
        _check_line(sample, where)
        key = (sample["doc_id"], str(sample["filter"]))
        if key in seen:
            raise ValueError(f"{where}: doc_id {key[0]} under filter {key[1]!r} appears again (first at "
                             f"line {seen[key]}); each document is logged once per filter: was the "
                             "file appended to twice? Keep one run's lines")
        seen[key] = number
        record = records.setdefault(sample["doc_id"], _record(sample, task, number, where))
        if record["doc_hash"] != sample["doc_hash"]:
            raise ValueError(f"{where}: doc_id {key[0]} has doc_hash {sample['doc_hash'][:12]}... but line "
                             f"{record['line']} has {record['doc_hash'][:12]}...: two documents share an id; "
                             "keep one run's lines")
        for name in sample["metrics"]:
            if _is_corpus_level(sample[name]):
                record["corpus_metrics"].append(f"{name},{key[1]}")
                continue
            record["metrics"][f"{name},{key[1]}"] = float(sample[name])
            if "loglikelihoods" not in record and _filtered_answer(sample) is not None:
                record["outputs"][f"{name},{key[1]}"] = _filtered_answer(sample)
    return list(records.values())
