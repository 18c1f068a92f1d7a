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
