"""Greedy generation with the KV cache: generation.generate_ids vs transformers' `generate`.

GSM8K test prompts ("Question: ...\\nAnswer:", the harness format) on the random small Llama of
bench/common.py, one left-padded batch, 128 new tokens. Stop-free on both sides: a random model
would emit the EOS token at arbitrary points, so the tokenizer's EOS is switched off for ours
and transformers gets no eos_token_id; both then generate exactly 128 tokens per row, and the
script asserts that the tokens are identical.

    python bench/generate.py [--batch 8] [--new-tokens 128] [--repeats 5]
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from bench import common


def prompts(n: int, tokenizer: Any) -> list[list[int]]:
    import data

    return [tokenizer.encode(it.prompt, add_bos=False) for it in data.load_task("gsm8k", "test", common.DATA)[:n]]


def ours(model: torch.nn.Module, tokenizer: Any, ids: list[list[int]], new_tokens: int) -> list[list[int]]:
    import generation

    return generation.generate_ids(model, tokenizer, ids, new_tokens, batch_size=len(ids))


@torch.inference_mode()
def reference(model: torch.nn.Module, ids: list[list[int]], new_tokens: int, pad: int) -> list[list[int]]:
    """transformers' greedy `generate` on the same left-padded batch."""
    width = max(len(p) for p in ids)
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=pad, eos_token_id=None)
    return out[:, width:].tolist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    common.setup()
    import transformers

    import models

    path = common.small_lm()
    model, ref = models.load_model(path), common.load_reference(path)
    tokenizer = copy.copy(models.load_tokenizer(path))
    tokenizer.eos_id = None  # stop-free (see the module docstring)
    ids = prompts(args.batch, tokenizer)
    got, want = ours(model, tokenizer, ids, args.new_tokens), reference(ref, ids, args.new_tokens, tokenizer.pad_id)
    assert all(len(row) == args.new_tokens for row in got), "ours stopped early"
    mismatched = [i for i, (a, b) in enumerate(zip(got, want)) if a != b]
    assert not mismatched, f"rows {mismatched} differ between ours and transformers"
    timings = common.interleave({"ours": lambda: ours(model, tokenizer, ids, args.new_tokens),
                                 "transformers": lambda: reference(ref, ids, args.new_tokens, tokenizer.pad_id)},
                                args.repeats)
    n = args.batch * args.new_tokens
    t_ours, t_ref = timings["ours"], timings["transformers"]
    lengths = sorted(len(r) for r in ids)
    rows = [[args.batch, f"{lengths[0]}-{lengths[-1]}", args.new_tokens, f"{n / t_ours.median:.1f}",
             f"{n / t_ref.median:.1f}", f"**{t_ref.median / t_ours.median:.2f}x**", "identical",
             f"{t_ours.spread()} / {t_ref.spread()}"]]
    header = ["batch", "prompt tokens", "new tokens", "ours tok/s", "transformers tok/s", "ratio (target >= 1.2)",
              "tokens", "range ours / ref"]
    cfg = ", ".join(f"{k}={v}" for k, v in common.SMALL_LM.items() if v is not None and k != "model_type")
    body = (f"Random Llama ({cfg}), float32, GSM8K test prompts (first {args.batch}), one left-padded batch, "
            f"greedy, stop-free. Ours: `generation.generate_ids` (preallocated KV cache). Reference: transformers "
            f"{transformers.__version__} `generate` (do_sample=False, its default dynamic cache). {args.repeats} "
            f"interleaved repeats after 1 warm-up, medians.\n\n" + common.table(header, rows))
    common.write_section("generate", "Greedy generation: ours vs transformers generate", body)


if __name__ == "__main__":
    main()
