"""Cost of a MUSCLE compatibility step relative to a task step on the same model.

Task step (stages 1-2): base v2 + task adapter, next-token CE (train.ce_loss), backward, AdamW.
Compatibility step (stage 3): the student v2 + compat adapter, the frozen M1 = v1 + its task
adapter and M2 = the student's own base with the task adapter (lora.use_adapter), the masked KL
(train.muscle_loss -> muscle.muscle_loss_chunked), backward, AdamW. Both use train.py's loss
functions and its defaults (rank, alpha, mask, temperature, chunk size), so this times the code
the pipeline runs. The extra work is two no-grad teacher forwards and the three-way loss; with
--teacher-cache memory, epochs after the first skip the teacher forwards (timed as "cached").
"cross-vocab" times the step when M1 has another vocabulary (train.py --cross-vocab fill): M1 of
Llama 2's 32,000 ids reading its own tokens, gathered at the student's positions, its
distribution mapped onto the student's 49,152 (cross_vocab.muscle_loss_cross), with nine in ten
positions aligned and nine in ten old ids mapped, about what a Llama 2 -> 3 pair gives.

    python bench/compat_step.py [--batch 2] [--seq 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    common.setup()
    import lora
    import teacher_cache
    import train

    defaults = train.parse_args(["--old", "v1", "--new", "v2", "--task", "piqa"])
    cfg = CONFIGS[MODEL]
    v1 = common.save_random_hf_checkpoint(cfg, common.CACHE / f"compat-{MODEL}-v1", seed=1)
    v2 = common.save_random_hf_checkpoint(cfg, common.CACHE / f"train-{MODEL}", seed=0)
    old = with_adapter(v1, defaults.rank, defaults.alpha).eval().requires_grad_(False)
    student = with_adapter(v2, defaults.rank, defaults.alpha)
    lora.copy_adapter(student, "task", "compat")
    # "index": the rows' example keys (train.Batches), which the teacher cache is keyed by.
    batch = {**random_batch(cfg["vocab_size"], args.batch, args.seq), "index": torch.arange(args.batch)}
    cached = train.muscle_loss(student, old, defaults, teacher_cache.TeacherCache())  # filled by the warm-up
    old_x, batch_x, args_x, vmap = cross_vocab_case(cfg, defaults, batch, defaults.rank, defaults.alpha)
    timings = common.interleave({"task": step(student, "task", train.ce_loss(student), batch),
                                 "compat": step(student, "compat", train.muscle_loss(student, old, defaults), batch),
                                 "cached": step(student, "compat", cached, batch),
                                 "cross": step(student, "compat",
                                               train.muscle_loss(student, old_x, args_x, None, vmap), batch_x)},
                                args.repeats)
    t_task, t_compat, t_cached, t_cross = (timings[k] for k in ("task", "compat", "cached", "cross"))
    tokens = args.batch * args.seq
    rows = [[MODEL, f"{args.batch} x {args.seq}", f"{t_task.median:.2f}", f"{t_compat.median:.2f}",
             f"{t_cached.median:.2f}", f"{tokens / t_task.median:.0f}", f"{tokens / t_compat.median:.0f}",
             f"**{t_compat.median / t_task.median:.2f}x**", f"**{t_cached.median / t_task.median:.2f}x**",
             f"**{t_cross.median / t_task.median:.2f}x** ({t_cross.median / t_compat.median:.2f}x compat)",
             f"{t_task.spread()} / {t_compat.spread()} / {t_cached.spread()} / {t_cross.spread()}"]]
    header = ["model", "batch", "task step s", "compat step s", "cached compat step s", "task tok/s",
              "compat tok/s", "compat / task (target <= 1.6)", "cached compat / task (target <= 1.6)",
              "cross-vocab compat / task", "range task / compat / cached / cross"]
    body = (f"SmolLM-135M-shaped Llama ({', '.join(f'{k}={v}' for k, v in cfg.items() if k.endswith(('size', 'layers', 'heads')))}), "
            f"float32, LoRA rank {defaults.rank} alpha {defaults.alpha} on all block linears (train.py defaults), "
            f"mask {defaults.mask}, T={defaults.temperature}, ce_weight {defaults.ce_weight}, chunk {defaults.chunk_size}. "
            f"Task step = train.ce_loss; compat step = train.muscle_loss (M1 forward + M2 forward without "
            f"grad, student forward, chunked masked KL); cached compat step = the same with "
            f"`--teacher-cache memory` after the first epoch (teacher_cache.TeacherCache holds the teachers' hidden "
            f"states: no teacher forward); cross-vocab compat step = M1 of 32,000 ids on its own tokens, mapped onto the "
            f"student's vocabulary (`--cross-vocab fill`, 90% of positions aligned, 90% of old ids mapped); "
            f"all + backward + clip + AdamW. {args.repeats} "
            f"interleaved repeats after 1 warm-up, medians.\n\n" + common.table(header, rows))
    common.write_section("compat_step", "MUSCLE compatibility step vs task step", body)


if __name__ == "__main__":
    main()
