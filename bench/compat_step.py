"""Cost of a MUSCLE compatibility step relative to a task step on the same model, with the teachers
online and from the teacher store, and what stage 3 holds in memory either way.

Task step (stages 1-2): base v2 + task adapter, next-token CE (losses.ce_loss), backward, AdamW.
Online compatibility step (stage 3, --teachers online): the student v2 + compat adapter, the frozen
M1 = v1 + its task adapter and M2 = the student's own base with the task adapter
(lora.use_adapter), the masked KL (losses.compat_step_loss -> muscle.muscle_loss_chunked), backward,
AdamW. Stored compatibility step (--teachers store): the same student against the teachers'
top-k read from a teacher store built for the batch (losses.stored_compat_step_loss ->
muscle.stored_muscle_loss_chunked); no teacher runs. All use train.py's loss functions and
defaults (rank, alpha, mask, temperature, chunk size, top-k), so this times the code the pipeline
runs. Also timed: building the store for the batch (teacher_store.teacher_outputs of M1 and M2).
"cross-vocab" times the online step when M1 has another vocabulary (train.py --cross-vocab fill):
M1 of Llama 2's 32,000 ids reading its own tokens, gathered at the student's positions, its
distribution mapped onto the student's 49,152 (cross_vocab.muscle_loss_cross), with nine in ten
positions aligned and nine in ten old ids mapped, about what a Llama 2 -> 3 pair gives.

Peak memory (`--memory online|store`, each in a fresh process): the high-water RSS of a process
that holds what stage 3 holds while the student trains (the student, plus M1 online) and runs 2
steps, from the moment the models are loaded (the loading's own spike is not counted).

    python bench/compat_step.py [--batch 2] [--seq 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common
from bench.train_step import CONFIGS, random_batch

MODEL = "smollm"


def with_adapter(path: Path, rank: int, alpha: float) -> torch.nn.Module:
    """A base with a 'task' adapter whose B is random too, as a trained adapter's would be."""
    import lora
    import models

    model = models.load_model(path)
    lora.add_adapter(model, "task", rank=rank, alpha=alpha)
    with torch.no_grad():
        for name, p in lora.adapter_parameters(model, "task").items():
            if ".lora_B." in name:
                p.normal_(0, 0.01)
    return model


def step(model: torch.nn.Module, adapter: str, loss_fn: Callable, batch: dict) -> Callable[[], float]:
    """One optimizer step training `adapter` (made active and the only trainable parameters)."""
    import lora

    params = list(lora.adapter_parameters(model, adapter).values())
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> float:
        lora.set_adapter(model, adapter)
        lora.mark_trainable(model, adapter)
        model.train()
        total = loss_fn(batch)
        (total.loss / total.tokens).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total.loss.item()
    return run


def cross_vocab_case(cfg: dict, defaults, batch: dict, rank: int, alpha: float):
    """M1 with 32,000 ids, its batch fields (align.collate's layout) and a vocabulary map."""
    import cross_vocab

    v1 = common.save_random_hf_checkpoint({**cfg, "vocab_size": 32000}, common.CACHE / f"compat-{MODEL}-v1-32k",
                                          seed=1)
    old = with_adapter(v1, rank, alpha).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    old_to_new = torch.randperm(cfg["vocab_size"], generator=g)[:32000]
    old_to_new[torch.rand(32000, generator=g) < 0.1] = -1
    new_only = torch.ones(cfg["vocab_size"], dtype=torch.bool)
    new_only[old_to_new[old_to_new >= 0]] = False
    positions = torch.arange(batch["input_ids"].shape[1]).expand_as(batch["input_ids"]).clone()
    positions[torch.rand(positions.shape, generator=g) < 0.1] = -1
    cross_batch = {**batch, "old_input_ids": torch.randint(0, 32000, batch["input_ids"].shape, generator=g),
                   "old_attention_mask": torch.ones_like(batch["input_ids"]), "old_positions": positions}
    args = argparse.Namespace(**{**vars(defaults), "cross_vocab": "fill"})
    return old, cross_batch, args, cross_vocab.VocabMap(old_to_new, new_only)


def store_for(batch: dict, old: torch.nn.Module, student: torch.nn.Module, defaults,
              root: Path) -> Callable[[], object]:
    """A function that builds the teacher store of `batch` (its rows as training examples) in
    `root` and opens it, as stage 3 does: M1's pass, then M2's (the student's base, task adapter)."""
    import lora
    import teacher_store

    rows = [(ids.tolist(), ids.tolist()) for ids in batch["input_ids"]]
    splits = {"train": rows, "validation": []}
    description = {"bench": True, "top_k": defaults.top_k}

    def m2() -> torch.nn.Module:
        lora.set_adapter(student, "task")
        return student.eval()

    def build() -> object:
        for path in sorted(root.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()
        with torch.no_grad():
            teacher_store.build(root, description, splits, {"old": lambda: old, "new": m2}, 0,
                                batch_size=defaults.batch_size, chunk_size=defaults.chunk_size,
                                log=lambda line: None)
        return teacher_store.TeacherStore(root, description, defaults.top_k)
    return build


def setup(args) -> tuple:
    common.setup()
    import lora
    import losses
    import train_cli

    defaults = train_cli.parse_args(["--old", "v1", "--new", "v2", "--task", "piqa"])
    cfg = CONFIGS[MODEL]
    v1 = common.save_random_hf_checkpoint(cfg, common.CACHE / f"compat-{MODEL}-v1", seed=1)
    v2 = common.save_random_hf_checkpoint(cfg, common.CACHE / f"train-{MODEL}", seed=0)
    # "index": the rows' example keys (stage_data.Batches), which the teacher store is keyed by.
    batch = {**random_batch(cfg["vocab_size"], args.batch, args.seq), "index": torch.arange(args.batch)}
    return defaults, cfg, v1, v2, batch, lora, losses


def memory(args) -> None:
    """Peak RSS of stage 3's models and 2 steps: online (student + M1) or store (student only)."""
    defaults, cfg, v1, v2, batch, lora, losses = setup(args)
    student = with_adapter(v2, defaults.rank, defaults.alpha)
    lora.copy_adapter(student, "task", "compat")
    old = with_adapter(v1, defaults.rank, defaults.alpha).eval().requires_grad_(False)
    if args.memory == "online":
        run = step(student, "compat", losses.compat_loss(student, old, defaults), batch)
    else:  # stage 3 builds the store first, then frees M1 before the student trains
        with tempfile.TemporaryDirectory() as tmp:
            store = store_for(batch, old, student, defaults, Path(tmp))()
        del old
        gc.collect()
        run = step(student, "compat", losses.stored_compat_loss(student, store, defaults), batch)
    common.reset_peak()  # the steps with what is resident, not the loading
    for _ in range(2):
        run()
    print(json.dumps({"peak_rss_mib": common.peak_rss_mib()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", choices=["online", "store"], default=None,
                   help="measure one side's peak RSS in this process (used by the main run)")
    args = p.parse_args()
    if args.memory:
        return memory(args)
    defaults, cfg, v1, v2, batch, lora, losses = setup(args)
    old = with_adapter(v1, defaults.rank, defaults.alpha).eval().requires_grad_(False)
    student = with_adapter(v2, defaults.rank, defaults.alpha)
    lora.copy_adapter(student, "task", "compat")
    old_x, batch_x, args_x, vmap = cross_vocab_case(cfg, defaults, batch, defaults.rank, defaults.alpha)
    with tempfile.TemporaryDirectory() as tmp:
        build = store_for(batch, old, student, defaults, Path(tmp))
        store = build()
        timings = common.interleave({
            "task": step(student, "task", losses.ce_loss(student), batch),
            "online": step(student, "compat", losses.compat_loss(student, old, defaults), batch),
            "store": step(student, "compat", losses.stored_compat_loss(student, store, defaults), batch),
            "build": build,
            "cross": step(student, "compat", losses.compat_loss(student, old_x, args_x, vmap), batch_x)},
            args.repeats)
    peaks = {side: common.measure_in_subprocess(Path(__file__), [
        "--batch", str(args.batch), "--seq", str(args.seq), "--memory", side])["peak_rss_mib"]
        for side in ("online", "store")}
    t = {side: timing.median for side, timing in timings.items()}
    tokens = args.batch * args.seq
    rows = [[MODEL, f"{args.batch} x {args.seq}", f"{t['task']:.2f}", f"{t['online']:.2f}",
             f"{t['store']:.2f}", f"{t['build']:.2f}", f"**{t['online'] / t['task']:.2f}x**",
             f"**{t['store'] / t['task']:.2f}x**", f"{t['build'] / t['task']:.2f}x",
             f"{t['cross'] / t['task']:.2f}x ({t['cross'] / t['online']:.2f}x online)",
             f"{peaks['online']:.0f} / {peaks['store']:.0f} (**{peaks['store'] / peaks['online']:.2f}x**)",
             " / ".join(timings[s].spread() for s in ("task", "online", "store", "build", "cross"))]]
    header = ["model", "batch", "task step s", "online compat step s", "stored compat step s",
              "store build s", "online / task", "stored / task (target <= 1.3)", "build / task",
              "cross-vocab / task", "peak RSS MiB online / store", "range task / online / stored / build / cross"]
    body = (f"SmolLM-135M-shaped Llama ({', '.join(f'{k}={v}' for k, v in cfg.items() if k.endswith(('size', 'layers', 'heads')))}), "
            f"float32, LoRA rank {defaults.rank} alpha {defaults.alpha} on all block linears (train.py defaults), "
            f"mask {defaults.mask}, T={defaults.temperature}, ce_weight {defaults.ce_weight}, chunk {defaults.chunk_size}, "
            f"top-k {defaults.top_k}; {tokens} tokens per step. Task step = losses.ce_loss; online compat step = "
            f"losses.compat_loss (M1 forward + M2 forward without grad, student forward, chunked masked KL); "
            f"stored compat step = losses.stored_compat_loss (the teachers' top-k read from a teacher store, no "
            f"teacher forward); cross-vocab = the online step with M1 of 32,000 ids on its own tokens, mapped onto the "
            f"student's vocabulary (`--cross-vocab fill`, 90% of positions aligned, 90% of old ids mapped); "
            f"all + backward + clip + AdamW. Store build = both teachers' passes over the "
            f"batch and writing, checking and loading the store. {args.repeats} interleaved repeats after 1 "
            f"warm-up, medians. Peak RSS: a fresh process per side holding what stage 3 holds while the student "
            f"trains (online: the student and M1; store: the student and the store, M1 freed), high-water mark "
            f"of 2 steps from there.\n\n"
            + common.table(header, rows))
    common.write_section("compat_step", "MUSCLE compatibility step vs task step", body)


if __name__ == "__main__":
    main()
