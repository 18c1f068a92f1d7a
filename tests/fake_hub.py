"""Test helpers: tiny random Hugging Face checkpoints (transformers as the oracle) and a local fake hub."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers

TINY = dict(vocab_size=160, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4)

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


def tiny_hf_model(family: str, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """A 2-layer random transformers model in eval mode ("llama" or "phi").

    Norm weights and biases are perturbed too, so a swapped or ignored parameter changes the logits.
    """
    torch.manual_seed(seed)
    if family == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides}))
    else:
        model = transformers.PhiForCausalLM(transformers.PhiConfig(**{**TINY, **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def save_checkpoint(model: transformers.PreTrainedModel, path: Path, sharded: bool = False) -> Path:
    """save_pretrained as safetensors; `sharded` splits it into several files with an index."""
    model.save_pretrained(path, max_shard_size="40KB" if sharded else "5GB")
    return path


# ------------------------------------------------------------- behaviour checks shared by both families
def random_ids(shape: tuple[int, ...], seed: int, vocab: int = TINY["vocab_size"]) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def max_logit_diff(hf: transformers.PreTrainedModel, ours: torch.nn.Module) -> float:
    """Max abs difference of float32 logits on a random batch."""
    ids = random_ids((2, 12), seed=1)
    return (ours(ids) - hf(ids).logits).abs().max().item()


@torch.no_grad()
def check_kv_cache_equals_full_forward(model: torch.nn.Module) -> None:
    """A 4-token prompt, then one token at a time through the cache == one full forward."""
    ids = random_ids((2, 10), seed=2)
    cache = model.new_cache(batch_size=2, max_len=16)
    prefill = model(ids[:, :4], cache=cache)
    steps = [model(ids[:, t:t + 1], cache=cache) for t in range(4, 10)]
    assert cache.length == 10
    torch.testing.assert_close(torch.cat([prefill, *steps], 1), model(ids), rtol=0, atol=1e-5)


@torch.no_grad()
def check_padded_batch_equals_alone(model: torch.nn.Module) -> None:
    """Right padding (training, scoring) and left padding (generation) leave each row's logits as alone."""
    seqs = [random_ids((n,), seed=3 + n) for n in (9, 5)]
    alone = [model(s[None])[0] for s in seqs]
    for side in ("right", "left"):
        ids = torch.zeros(2, 9, dtype=torch.long)
        mask = torch.zeros(2, 9, dtype=torch.long)
        for i, s in enumerate(seqs):
            span = slice(0, len(s)) if side == "right" else slice(9 - len(s), 9)
            ids[i, span], mask[i, span] = s, 1
        logits = model(ids, attention_mask=mask)
        assert not logits.isnan().any()
        for i in range(2):
            torch.testing.assert_close(logits[i][mask[i].bool()], alone[i], rtol=0, atol=1e-5)


@torch.no_grad()
def check_left_padded_generation_equals_alone(model: torch.nn.Module) -> None:
    """Prefill a left-padded batch into the cache, decode two tokens: each row's logits as alone."""
    short, long_, nxt = random_ids((3,), seed=4), random_ids((6,), seed=5), random_ids((2, 2), seed=6)
    ids = torch.stack([torch.cat([torch.zeros(3, dtype=torch.long), short]), long_])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1] * 6])
    cache = model.new_cache(2, 8)
    model(ids, attention_mask=mask, cache=cache)
    for t in range(2):
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        step = model(nxt[:, t:t + 1], attention_mask=mask, cache=cache)[:, 0]
    for i, prompt in enumerate((short, long_)):
        expected = model(torch.cat([prompt, nxt[i]])[None])[0, -1]
        torch.testing.assert_close(step[i], expected, rtol=0, atol=1e-5)
