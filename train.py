"""The MUSCLE pipeline (paper sections 4-5): task adapters, the compatibility adapter, evaluation.

    python train.py --old llama1 --new llama2 --task piqa [--data-dir ../shared/data]
    torchrun --nproc_per_node 8 train.py --old llama1 --new llama2 --task piqa

Stages, each skipped when its output under --out is complete (a DONE file written last) and
resumed from its checkpoint when it was interrupted:
  1. task adapter A1 on base v1 (cross-entropy on context and answer tokens, paper A.1);
  2. task adapter A2 on base v2;
  3. compatibility adapter Ac on base v2, initialised from A2, trained with the MUSCLE loss
     (muscle.py) against M1 = v1 + A1 and M2 = v2 + A2. With --teachers online both teachers
     run on every batch: M2 is the student's own copy of base v2 with A2 active (two adapter
     slots, switched with lora.use_adapter), so there is no second v2 in memory. With --teachers
     store, one pass of each teacher first writes what they say to disk (teacher_store.py), and
     the student trains with only base v2 and Ac in memory;
  4. evaluation of M1, M2, Mc on the task's test split (eval.py) and the compatibility report
     (report.py), printed and written to --out/stage4_eval.

Tokens: each stage reads its own model's tokens, and stage 3 lines up M1's positions with the
student's where the two tokenizers give other ids (align.py; train_cli.TOKENS_HELP).

Dropout: the models being trained run in train mode, so the checkpoint's own dropout applies as
in Hugging Face training (Phi-2's resid_pdrop = 0.1; Llama has none) besides --dropout on the
LoRA input; teachers and validation run in eval mode, without any.

Each stage's loss on one batch lives in losses.py (stage 3's step: `losses.compat_step_loss`),
its data in stage_data.py, the flags and the checks of the pair of bases in train_cli.py. The
training loop `fit` lives in trainer.py (toy.py reuses it for full-parameter pre-training), the
torch.distributed helpers in distributed.py, atomic checkpoints in checkpoint.py.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

import cli
import cross_vocab
import data
import distributed
import eval as evaluation
import files
import likelihood
import lock
import lora
import losses
import models
import pairs
import predictions
import report
import stage_data
import teacher_store
import toy  # noqa: F401  (registers the toy tasks and the toy bases)
import train_cli
from distributed import Dist
from trainer import Diverged, FitConfig, Interrupted, LossFn, fit

# ============================================================================ models

# How long the other ranks wait for local rank 0's downloads (a 13 GB checkpoint at 1 MB/s takes
# under 4 hours), instead of the process group's timeout for a peer that died.
DOWNLOAD_WAIT_S = 6 * 3600


def fetch_models(args: argparse.Namespace, env: Dist) -> None:
    """Resolve --old and --new (checkpoint and tokenizer files: downloaded, or a toy model built)
    once per machine: local rank 0 first while the other ranks wait, then they read the files it
    fetched from the cache, without the network. If it fails, every rank ends with its message."""
    def resolve_both(local_only: bool) -> None:
        for name in (args.old, args.new):
            models.resolve(name, local_only)
    distributed.local_rank_0_first(resolve_both, env, DOWNLOAD_WAIT_S)


def check_eval_data(args: argparse.Namespace) -> None:
    """Stage 4's items are read and tokenised before stage 1, so a missing test file or an item
    that cannot be scored stops the run before the training stages, not after them."""
    spec, items = eval_items(args)
    for name in (args.old, args.new):
        context = models.read_config(models.resolve(name)).get("max_position_embeddings") or 2048
        evaluation.check_scorable(spec, items, models.load_tokenizer(name), context)


def eval_items(args: argparse.Namespace) -> tuple[data.Task, list]:
    """The task and the items stage 4 evaluates: the evaluation split, cut to --limit-eval."""
    spec = data.get_task(args.task)
    return spec, data.load_task(args.task, spec.eval_split, args.data_dir)[:args.limit_eval]


def items_digest(items: Sequence) -> str:
    """A fingerprint of data items (ids and content): predictions computed on other evaluation
    items (another --limit-eval, another --data-dir) are never taken for these, and a run's
    training stages never resume on other training items."""
    rows = [dataclasses.asdict(it) for it in items]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_dtype(args: argparse.Namespace, env: Dist) -> torch.dtype:
    """--dtype auto: the frozen base in bf16 on GPU, fp32 on CPU."""
    if args.dtype == "auto":
        return torch.bfloat16 if env.device.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def prepare(model: nn.Module, env: Dist, grad_checkpointing: bool) -> nn.Module:
    """Optional activation checkpointing, then FSDP sharding. The trainable adapters are float32
    already on any base (lora.py), so they are their own master weights."""
    if grad_checkpointing:
        distributed.enable_activation_checkpointing(model)
    return distributed.shard(model, env)


def frozen_teacher(model: nn.Module, env: Dist) -> nn.Module:
    """A teacher: no gradients, eval mode (no dropout), sharded like the student (as torchtune's
    `_setup_teacher_model`)."""
    model.requires_grad_(False)
    return distributed.shard(model.eval(), env)


# ============================================================================ stages

STAGES = {1: "stage1_task_old", 2: "stage2_task_new", 3: "stage3_compat", 4: "stage4_eval"}
ADAPTER = "adapter"  # each training stage's best adapter, in PEFT's format
DONE = evaluation.STAGE_DONE  # written last: the stage's output is complete
INPUTS = "inputs.json"  # stage 4: the digest of the items each role's predictions were made on


def stage_dir(out: Path, stage: int) -> Path:
    return out / STAGES[stage]


def adapter_dir(out: Path, stage: int) -> Path:
    """The finished adapter of stage 1, 2 or 3; a clear error when that stage has not run."""
    if not (stage_dir(out, stage) / DONE).is_file():
        raise FileNotFoundError(f"{stage_dir(out, stage)} is not complete: run --stage {stage} "
                                f"(or --stage all) before the stages that need its adapter")
    return stage_dir(out, stage) / ADAPTER


def mark_done(out: Path, stage: int, summary: dict, env: Dist) -> None:
    """DONE (with a summary) last; the stage's checkpoint is then of no further use."""
    if env.main:
        files.write_text_atomic(stage_dir(out, stage) / DONE, json.dumps(summary) + "\n")
        shutil.rmtree(stage_dir(out, stage) / "checkpoint", ignore_errors=True)
    distributed.barrier(env)


def fit_config(args: argparse.Namespace) -> FitConfig:
    return FitConfig(args.epochs, args.lr, args.warmup_steps, args.weight_decay, args.grad_accum,
                     args.max_grad_norm, args.max_steps, args.save_every, args.log_every, args.seed)


def train_adapter(args: argparse.Namespace, env: Dist, out: Path, stage: int, model: nn.Module,
                  name: str, loss_fn: LossFn, td: stage_data.TaskData, base: str) -> dict:
    """Fit adapter `name` of `model` (already prepared) and keep the best epoch's copy."""
    d = stage_dir(out, stage)

    def save_best(epoch: int) -> None:
        lora.save_adapter(model, d / ADAPTER, name, base_model_name_or_path=base)

    result = fit(model, lora.adapter_parameters(model, name), loss_fn,
                 td.train_batches(args.batch_size, args.seed, env),
                 td.val_batches(args.batch_size, env), fit_config(args), d, env,
                 on_best=save_best, desc=f"stage {stage}")
    return {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "steps": result.steps}


def load_base(name: str, args: argparse.Namespace, env: Dist) -> nn.Module:
    return models.load_model(name, dtype=model_dtype(args, env), device=env.device)


def stage_task(args: argparse.Namespace, env: Dist, out: Path, stage: int, td: stage_data.TaskData) -> dict:
    """Stages 1 and 2: a task adapter on base v1 (--old) or v2 (--new) with cross-entropy."""
    base = args.old if stage == 1 else args.new
    model = load_base(base, args, env)
    torch.manual_seed(args.seed)  # the same LoRA A initialisation on every rank
    lora.add_adapter(model, "task", rank=args.rank, alpha=args.alpha, dropout=args.dropout)
    lora.mark_trainable(model, "task")
    model = prepare(model, env, args.grad_checkpointing)
    return train_adapter(args, env, out, stage, model, "task", losses.ce_loss(model, args.chunk_size), td,
                         base)


def compat_models(args: argparse.Namespace, env: Dist, out: Path) -> tuple[nn.Module, nn.Module]:
    """Stage 3's models, prepared and sharded: the student v2 holding A2 as "task" (M2) and its
    copy "compat" (trainable), and the frozen M1 = v1 + A1. The adapters are float32 on any base,
    so "task" and "compat" start equal to the A2 that stage 2 saved, bit for bit."""
    a1, a2 = adapter_dir(out, 1), adapter_dir(out, 2)  # before loading anything
    student = load_base(args.new, args, env)
    lora.load_adapter(student, a2, "task")
    lora.copy_adapter(student, "task", "compat")
    lora.mark_trainable(student, "compat")
    old = load_base(args.old, args, env)
    lora.load_adapter(old, a1, "task")
    return prepare(student, env, args.grad_checkpointing), frozen_teacher(old, env)


def stage_compat(args: argparse.Namespace, env: Dist, out: Path, td: stage_data.TaskData,
                 cross: bool = False) -> dict:
    """Stage 3: Ac on base v2, initialised as a copy of A2 (paper A.1), with the MUSCLE loss
    against teachers run online or read from the teacher store (built first if needed). From
    the store, only base v2 and Ac are in memory while the student trains. Across two
    vocabularies (`cross`, teachers online) the summary says how much of the text M1 could teach."""
    if args.teachers == "store":
        if cross:
            raise ValueError(f"--teachers store needs --old and --new of one vocabulary; "
                             f"--cross-vocab {args.cross_vocab} runs with --teachers online")
        store = open_teacher_store(args, env, out, td)
        student = load_base(args.new, args, env)
        lora.load_adapter(student, adapter_dir(out, 2), "compat")
        lora.mark_trainable(student, "compat")
        student = prepare(student, env, args.grad_checkpointing)
        return train_adapter(args, env, out, 3, student, "compat",
                             losses.stored_compat_loss(student, store, args), td, args.new)
    student, old = compat_models(args, env, out)
    if not cross:
        return train_adapter(args, env, out, 3, student, "compat", losses.compat_loss(student, old, args),
                             td, args.new)
    vmap = cross_vocab.model_vocab_map(models.load_tokenizer(args.old), models.load_tokenizer(args.new),
                                       old.lm_head.out_features, student.lm_head.out_features,
                                       args.cross_vocab)
    coverage = cross_vocab.Coverage()
    summary = train_adapter(args, env, out, 3, student, "compat",
                            coverage.counting(losses.compat_loss(student, old, args, vmap)), td, args.new)
    summary["cross_vocab"] = cross_vocab.Coverage.shares(distributed.all_reduce_sum(coverage.totals, env))
    if env.main:
        print(cross_vocab.Coverage.describe(summary["cross_vocab"]))
    return summary


def open_teacher_store(args: argparse.Namespace, env: Dist, out: Path,
                       td: stage_data.TaskData) -> teacher_store.TeacherStore:
    """This run's teacher store (--teacher-store, default --out/teacher_store), built first when
    it is not complete: M1, then M2, each loaded for its pass and freed after it."""
    bases = {"old": args.old, "new": args.new}
    adapters = {"old": adapter_dir(out, 1), "new": adapter_dir(out, 2)}

    def load(role: str) -> nn.Module:
        model = load_base(bases[role], args, env)
        lora.load_adapter(model, adapters[role], "task")
        return model.eval().requires_grad_(False)

    run = {"task": args.task, "seed": args.seed, "limit_train": args.limit_train,
           "max_len": args.max_len, "dtype": str(model_dtype(args, env))}
    return teacher_store.open_store(
        Path(args.teacher_store or out / "teacher_store"),
        {role: models.resolve(b) for role, b in bases.items()}, adapters,
        {"train": td.train, "validation": td.val}, args.top_k, run, load, td.pad_id, env,
        batch_size=args.batch_size, chunk_size=args.chunk_size, old_tokens=td.teacher)


def predict(base: str, adapter: Path, items: list, path: Path, args: argparse.Namespace,
            env: Dist) -> None:
    """Prediction records of base + adapter on `items`, written to `path` (atomically, in item
    order). Each rank scores items r, r + W, ... with a whole (unsharded) model; rank 0 merges."""
    model = load_base(base, args, env)
    lora.load_adapter(model, adapter, "task")
    try:
        records = evaluation.evaluate(model, models.load_tokenizer(base), args.task,
                                      items[env.rank::env.world], batch_size=args.eval_batch_size)
    except likelihood.NonFinite as e:
        raise likelihood.NonFinite(evaluation.name_broken(e, base, str(adapter))) from None
    parts = [path.with_name(f".{path.stem}.rank{r}.jsonl") for r in range(env.world)]
    evaluation.write_predictions(records, parts[env.rank])
    distributed.barrier(env)
    if env.main:
        shards = [predictions.read_predictions(part) for part in parts]
        merged = [shards[i % env.world][i // env.world] for i in range(len(items))]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
        files.write_text_atomic(path, lines)
        for part in parts:
            part.unlink()
    distributed.barrier(env)


def stage_eval(args: argparse.Namespace, env: Dist, out: Path) -> dict:
    """Stage 4: M1, M2, Mc on the task's evaluation split, then the compatibility report."""
    d = stage_dir(out, 4)
    d.mkdir(parents=True, exist_ok=True)
    _, items = eval_items(args)
    digest = items_digest(items)
    roles = {"m1": (args.old, adapter_dir(out, 1)), "m2": (args.new, adapter_dir(out, 2)),
             "mc": (args.new, adapter_dir(out, 3))}
    for role, (base, adapter) in roles.items():
        # Finished predictions survive a restart, and are reused for the same items only.
        inputs = files.read_json(d / INPUTS) if (d / INPUTS).is_file() else {}
        if not (d / f"{role}.jsonl").is_file() or inputs.get(role) != digest:
            predict(base, adapter, items, d / f"{role}.jsonl", args, env)
            if env.main:
                files.write_text_atomic(d / INPUTS, json.dumps({**inputs, role: digest}, indent=1) + "\n")
            gc.collect()
    runs = {role: predictions.read_predictions(d / f"{role}.jsonl") for role in roles}
    sources = {"old": "m1.jsonl", "new": "m2.jsonl", "compat": "mc.jsonl"}
    result = report.compatibility_report(runs["m1"], runs["m2"], runs["mc"], sources=sources)
    if env.main:
        report.write_report(result, d)
        print(report.format_report_text(result))
    distributed.barrier(env)
    return {"n": result["n"], "items": digest}


# ============================================================================ run

# Flags that do not change what the training stages compute; every other flag must match to
# resume a run. Stage 4 keeps the digest of its items, so --limit-eval and --data-dir may change;
# the training items are compared by their digest (TRAIN_ITEMS), so a copy of the same files in
# another --data-dir resumes too. --data-dir is kept in run_config.json for the record.
NOT_CONFIG = {"out", "overwrite", "stage", "device", "save_every", "log_every", "grad_checkpointing",
              "data_dir", "eval_batch_size", "chunk_size", "teacher_store", "limit_eval"}
RUN_CONFIG = "run_config.json"
TRAIN_ITEMS = "train_items"  # run_config.json: the digest of the items the training stages read
# Flags that only stages 3 and 4 read: they may change in a run whose stage 3 has not started, so
# a copy of a run's stages 1-2 (and its teacher store) serves runs of other masks.
STAGE3_FLAGS = {"mask", "temperature", "ce_weight", "teachers", "top_k", "cross_vocab"}


def check_run_config(out: Path, args: argparse.Namespace, env: Dist, train_digest: str | None = None) -> None:
    """Refuse an --out that holds a different run (unless --overwrite, which deletes it);
    the same configuration resumes, and so does one that differs only in STAGE3_FLAGS while
    stage 3 has not started. `train_digest` (None when no training stage runs now) must match
    the digest of the training items the run has trained on."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}
    path = out / RUN_CONFIG
    record = files.read_json(path, fix=f"delete it to resume the run with the flags given now") \
        if path.is_file() else None
    saved = None if record is None else {k: v for k, v in record.items() if k not in NOT_CONFIG}
    config[TRAIN_ITEMS] = train_digest or (saved or {}).get(TRAIN_ITEMS)
    if saved is not None and TRAIN_ITEMS not in saved:  # a run_config.json older than the digest
        saved[TRAIN_ITEMS] = config[TRAIN_ITEMS]
    if saved is None and out.is_dir() and any(p.name != lock.NAME for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no {RUN_CONFIG}, so it is not a run "
                         f"of train.py; choose another --out (nothing was deleted)")
    diff = {k for k in set(config) | set(saved or {}) if (saved or config).get(k) != config.get(k)}
    if not stage_dir(out, 3).exists():
        diff -= STAGE3_FLAGS
    if diff and not args.overwrite:
        changes = "; ".join(f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now" for k in sorted(diff)
                            if k != TRAIN_ITEMS)
        if TRAIN_ITEMS in diff:
            changes = "; ".join(filter(None, [changes, (
                f"the training items differ from those it was trained on, read from --data-dir "
                f"{record.get('data_dir')} there, {args.data_dir} now")]))
        raise ValueError(f"--out {out} holds a run with a different configuration ({changes}). "
                         f"Rerun with its flags to resume it, choose another --out, or pass "
                         f"--overwrite to delete it and start over")
    distributed.barrier(env)  # every rank has read the old config before rank 0 changes it
    if env.main:
        if saved is not None and args.overwrite:  # everything but the lock this process holds
            for entry in out.iterdir():
                if entry.name != lock.NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        files.write_text_atomic(path, json.dumps({**config, "data_dir": args.data_dir}, indent=1) + "\n")
    distributed.barrier(env)


def run(args: argparse.Namespace, env: Dist) -> None:
    out = Path(args.out or f"runs/{Path(args.old).name}-{Path(args.new).name}-{args.task}")
    if args.cross_vocab == "off":  # before anything is downloaded
        refused = pairs.refusal(args.old, args.new)
        if refused:
            raise ValueError(refused)
    fetch_models(args, env)
    cross = train_cli.vocabulary_changes(args)
    train_cli.check_max_len(args)
    stages = [1, 2, 3, 4] if args.stage == "all" else [int(args.stage)]
    training = [s for s in stages if s < 4 and not is_done(args, out, s)]
    items = stage_data.training_items(args) if training else None
    if items:
        train_cli.check_answers_fit(args, items, env)
    if 4 in stages:
        check_eval_data(args)
    with lock.hold_on_main(out, env):  # rank 0 holds --out's lock for the whole run
        check_run_config(out, args, env, items_digest(items) if items else None)
        run_stages(args, env, out, stages, cross)


def is_done(args: argparse.Namespace, out: Path, stage: int) -> bool:
    """Whether the stage's output is complete: a DONE file, and for stage 4 one written for the
    items evaluated now (a DONE without a digest predates it and counts as done)."""
    done = stage_dir(out, stage) / DONE
    if not done.is_file():
        return False
    if stage < 4:
        return True
    digest = files.read_json(done).get("items")
    return digest is None or digest == items_digest(eval_items(args)[1])


def run_stages(args: argparse.Namespace, env: Dist, out: Path, stages: list[int],
               cross: bool = False) -> None:
    """The stages asked for, in order; a stage with a DONE file is skipped. `cross`: the two
    vocabularies differ (stage 3 bridges them, cross_vocab.py)."""
    td = None
    for stage in stages:
        if is_done(args, out, stage):
            if env.main:
                print(f"stage {stage}: done ({stage_dir(out, stage)}), skipped")
            continue
        td = stage_data.task_data(args, stage, env, cross) if stage < 4 else None
        summary = (stage_task(args, env, out, stage, td) if stage < 3 else
                   stage_compat(args, env, out, td, cross) if stage == 3 else
                   stage_eval(args, env, out))
        mark_done(out, stage, summary, env)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()




def main(argv: Sequence[str] | None = None) -> int:
    args = train_cli.parse_args(argv)
    try:
        run(args, distributed.setup(args.device))
        return 0
    except files.WriteFailed as e:  # every write is atomic: what was there stays whole
        return cli.fail(f"cannot write {e.path} ({e.reason}); finished stages, checkpoints and "
                        f"predictions are kept: {e.fix}, then rerun the same command to resume")
    except evaluation.USER_ERRORS as e:  # a wrong input: the message says what to fix
        return cli.fail(e)
    except KeyboardInterrupt:  # outside the training loop, which checkpoints first (Interrupted)
        return cli.interrupted("finished stages, checkpoints and predictions are kept: rerun the "
                               "same command to resume")
    except Diverged as e:
        return cli.fail(e, status=1)
    except Interrupted as e:
        cli.say(str(e))
        return 128 + e.signum
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
