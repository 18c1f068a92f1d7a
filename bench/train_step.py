"""LoRA training step, ours (models + lora + losses.ce_loss) vs transformers + PEFT.

One step = forward, next-token cross-entropy, backward, gradient clipping, AdamW step, on a
random batch, with LoRA on every linear layer of the blocks (paper appendix A.1) at the same rank
on both sides. Both sides load the same random checkpoint (save_pretrained) and get the same
LoRA A matrices (B = 0), and the script checks that their first losses agree before timing.

    python bench/train_step.py                  # both configs, writes bench/RESULTS.md
    python bench/train_step.py --configs smollm --repeats 5
    python bench/train_step.py --memory ours --configs smollm   # internal: one side's peak RSS

Peak memory: a fresh interpreter per side loads the model and runs a few steps; the figure is
the growth of the process's peak RSS over its RSS just before loading (weights, activations,
gradients, AdamW state), the honest per-process measure for torch on CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common

# HF config.json dicts. SmolLM-135M's shape; Phi-1.5's shape with fewer layers (CPU time).
CONFIGS = {
    "smollm": dict(model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
                   num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                   max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10000.0,
                   tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),
    "phi": dict(model_type="phi", vocab_size=51200, hidden_size=2048, intermediate_size=8192,
                num_hidden_layers=2, num_attention_heads=32, num_key_value_heads=32,
                max_position_embeddings=2048, partial_rotary_factor=0.5, resid_pdrop=0.0,
                embd_pdrop=0.0, attention_dropout=0.0, hidden_act="gelu_new",
                tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256),
}
TARGETS = {"llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
           "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"]}
RANK, ALPHA, LR, CLIP = 16, 32, 1e-4, 1.0


def checkpoint(name: str) -> Path:
    return common.save_random_hf_checkpoint(CONFIGS[name], common.CACHE / f"train-{name}")


def random_batch(vocab: int, batch: int, seq: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


# ------------------------------------------------------------------------------------ the sides
def build_ours(path: Path) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    import lora
    import models

    model = models.load_model(path)
    torch.manual_seed(0)
    lora.add_adapter(model, "task", rank=RANK, alpha=ALPHA, targets=TARGETS[model.config.model_type])
    lora.mark_trainable(model, "task")
    return model.train(), list(lora.adapter_parameters(model, "task").values())


def build_reference(path: Path, model_type: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    import peft

    base = common.load_reference(path)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[model_type],
                             task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, config)
    return model.train(), [p for p in model.parameters() if p.requires_grad]


@torch.no_grad()
def copy_lora_a(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    """Give PEFT our LoRA A matrices (B is zero on both), so both sides compute the same thing."""
    import lora

    theirs = dict(ref.named_parameters())
    for name, p in lora.adapter_parameters(ours, "task").items():
        key = "base_model.model." + name.replace(".task.", ".default.")
        theirs[key].copy_(p)


def ours_loss(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    """train.py's stage 1-2 loss (chunked cross-entropy from hidden states, its default chunk)."""
    import losses

    ce = losses.ce_loss(model)

    def loss(b: dict) -> torch.Tensor:
        total = ce(b)
        return total.loss / total.tokens
    return loss


def reference_loss(model: torch.nn.Module) -> Callable[[dict], torch.Tensor]:
    return lambda b: model(**b).loss


def step_fn(loss_fn: Callable[[dict], torch.Tensor], params: list[torch.nn.Parameter],
            batch: dict) -> Callable[[], float]:
    """One training step with the same optimizer settings on both sides."""
    optimizer = torch.optim.AdamW(params, lr=LR)

    def step() -> float:
        loss = loss_fn(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


# ------------------------------------------------------------------------------------ measuring
def memory_child(side: str, name: str, batch: dict) -> None:
    """In a fresh process: RSS before loading, peak while loading, RSS after loading, and the
    peak of two steps (the second step's peak is the steady state: AdamW's moments exist from
    the first). One JSON line."""
    path = checkpoint(name)
    import peft, transformers  # noqa: E401,F401  (imports are not part of either side's footprint)
    import losses, lora, models, muscle  # noqa: E401,F401
    before = common.rss_mib()
    if side == "ours":
        model, params = build_ours(path)
        step = step_fn(ours_loss(model), params, batch)
    else:
        model, params = build_reference(path, CONFIGS[name]["model_type"])
        step = step_fn(reference_loss(model), params, batch)
    load_peak, loaded = common.peak_rss_mib(), common.rss_mib()
    common.reset_peak()
    for _ in range(2):
        step()
    print(json.dumps({"before_mib": before, "load_peak_mib": load_peak, "loaded_mib": loaded,
                      "step_peak_mib": common.peak_rss_mib()}))


def speed(name: str, batch: dict, repeats: int) -> dict:
    path = checkpoint(name)
    cfg = CONFIGS[name]
    ours, ours_params = build_ours(path)
    ref, ref_params = build_reference(path, cfg["model_type"])
    copy_lora_a(ours, ref)
    with torch.no_grad():
        l_ours, l_ref = ours_loss(ours)(batch).item(), reference_loss(ref)(batch).item()
    assert abs(l_ours - l_ref) < 1e-4 * max(1.0, abs(l_ref)), (l_ours, l_ref)
    sides = {"ours": step_fn(ours_loss(ours), ours_params, batch),
             "transformers+peft": step_fn(reference_loss(ref), ref_params, batch)}
    timings = common.interleave(sides, repeats)
    print(name, {k: v.seconds for k, v in timings.items()}, flush=True)
    return {"timings": timings, "first_loss": (l_ours, l_ref), "trainable": sum(p.numel() for p in ours_params)}


def memory(name: str, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Per side: total = the training steps' peak RSS over the RSS before loading (weights plus
    activations, gradients, optimizer state); step = that peak over the RSS after loading (what
    the implementation, not the weights, costs); load = loading's own peak over the RSS before."""
    out = {}
    for side in ("ours", "reference"):
        r = common.measure_in_subprocess(Path(__file__), ["--memory", side, "--configs", name,
                                                           "--batch", str(args.batch), "--seq", str(args.seq)])
        print(name, side, r, flush=True)
        out[side] = {"total": r["step_peak_mib"] - r["before_mib"], "step": r["step_peak_mib"] - r["loaded_mib"],
                     "load": r["load_peak_mib"] - r["before_mib"]}
    return out


def report(results: dict[str, dict], args: argparse.Namespace) -> str:
    tokens = args.batch * args.seq
    rows = []
    for name, r in results.items():
        t_ours, t_ref = r["timings"]["ours"], r["timings"]["transformers+peft"]
        mo, mr = r["memory"]["ours"], r["memory"]["reference"]
        rows.append([name, f"{r['trainable'] / 1e6:.2f} M", f"{tokens / t_ours.median:.0f}",
                     f"{tokens / t_ref.median:.0f}", f"**{t_ref.median / t_ours.median:.2f}x**",
                     f"{mo['total']:.0f} / {mr['total']:.0f}", f"**{mo['total'] / mr['total']:.2f}x**",
                     f"{mo['step']:.0f} / {mr['step']:.0f}", f"{mo['step'] / mr['step']:.2f}x",
                     f"{mo['load']:.0f} / {mr['load']:.0f}",
                     f"{r['first_loss'][0]:.5f} / {r['first_loss'][1]:.5f}"])
    header = ["config", "LoRA params", "ours tok/s", "ref tok/s", "speed ratio (target >= 1.3)",
              "peak MiB ours / ref", "memory ratio (target <= 0.8)", "step MiB ours / ref", "step ratio", "load peak MiB ours / ref",
              "first loss ours / ref"]
    shapes = "; ".join(f"`{n}`: " + ", ".join(f"{k}={v}" for k, v in CONFIGS[n].items()
                                               if k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                        "num_key_value_heads", "intermediate_size", "vocab_size",
                                                        "tie_word_embeddings")) for n in results)
    return (f"Batch {args.batch} x {args.seq} tokens, float32, LoRA rank {RANK} alpha {ALPHA} on all block "
            f"linears, AdamW lr {LR} + clip {CLIP}; {args.repeats} interleaved repeats after 1 warm-up, medians. "
            f"Peak memory: fresh process per side, RSS high-water mark (VmHWM) of 2 steps; *peak* = over the "
            f"RSS before loading (weights included), *step* = over the RSS after loading (activations, "
            f"gradients, AdamW state), *load peak* = loading's own high-water mark over the RSS before. Both "
            f"loaders memory-map the safetensors file, so weight pages are counted as the steps touch them.\n"
            f"Shapes: {shapes}.\n\n" + common.table(header, rows))


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--memory", choices=["ours", "reference"], help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    common.setup()
    batches = {name: random_batch(CONFIGS[name]["vocab_size"], args.batch, args.seq) for name in args.configs}
    if args.memory:
        memory_child(args.memory, args.configs[0], batches[args.configs[0]])
        return
    results = {}
    for name in args.configs:
        results[name] = speed(name, batches[name], args.repeats)
        results[name]["memory"] = memory(name, args)
    common.write_section("train_step", "LoRA training step: ours vs transformers + PEFT", report(results, args))


if __name__ == "__main__":
    main()
