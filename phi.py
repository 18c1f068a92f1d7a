"""Phi-1, Phi-1.5 and Phi-2 in the current Hugging Face layout (`PhiForCausalLM`, model_type "phi").

The paper's second update chain (its Table 8) is Phi-1 -> Phi-1.5 -> Phi-2. Differences from Llama,
numerics as transformers' `modeling_phi.py`:
- one `input_layernorm` (LayerNorm with bias) feeds attention and MLP *in parallel*:
  out = x + dropout(attn(ln(x))) + dropout(mlp(ln(x))), dropout = `resid_pdrop` (0.1 for Phi-2),
  active only in train mode, as in HF (transformers#28488);
- partial rotary: only the first int(head_dim * partial_rotary_factor) dims of q/k are rotated, and the
  RoPE frequencies use that rotary dim as denominator;
- biases on every linear layer, attention output named `dense`, MLP fc1 -> gelu(tanh) -> fc2,
  optional per-head `q_layernorm`/`k_layernorm`, `model.final_layernorm`, lm_head with bias.
The RoPE, KV cache, masking and forward loop are llama.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from llama import AttentionContext, CausalLM, RopeSettings, RotaryEmbedding, apply_rope, attend, rope_settings


@dataclass
class PhiConfig:
    """The config.json keys a Phi checkpoint needs."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    layer_norm_eps: float = 1e-5
    rope: RopeSettings = field(default_factory=RopeSettings)
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attention_dropout: float = 0.0
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "phi"

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.rope.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "PhiConfig":
        """Build from a config.json dict (partial_rotary_factor top-level or in v5 `rope_parameters`)."""
        if "rotary_dim" in hf and "partial_rotary_factor" not in hf and "rope_parameters" not in hf:
            raise ValueError("outdated Phi config (uses `rotary_dim`); download the current repo revision")
        if hf.get("hidden_act", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"Phi hidden_act {hf['hidden_act']!r} is not supported (only 'gelu_new')")
        heads = hf["num_attention_heads"]
        rope = rope_settings(hf, default_partial_rotary_factor=0.5)  # PhiConfig's default (phi-1 style)
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            layer_norm_eps=hf.get("layer_norm_eps", 1e-5), rope=rope,
            resid_pdrop=hf.get("resid_pdrop", 0.0), embd_pdrop=hf.get("embd_pdrop", 0.0),
            attention_dropout=hf.get("attention_dropout", 0.0), qk_layernorm=hf.get("qk_layernorm", False),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
        )


class PhiAttention(nn.Module):
    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * hd)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * hd)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * hd)
        self.dense = nn.Linear(cfg.num_attention_heads * hd, h)
        if cfg.qk_layernorm:
            self.q_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)
            self.k_layernorm = nn.LayerNorm(hd, eps=cfg.layer_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        if self.cfg.qk_layernorm:  # per head, after the reshape (transformers 5.x)
            q, k = self.q_layernorm(q), self.k_layernorm(k)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        p = self.cfg.attention_dropout if self.training else 0.0
        return self.dense(attend(q, k, v, ctx, self.layer, p))


class PhiMLP(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # `gelu_new`


class PhiDecoderLayer(nn.Module):
    """Parallel block: attention and MLP read the same normed input, both added to the residual."""

    def __init__(self, cfg: PhiConfig, layer: int):
        super().__init__()
        self.self_attn = PhiAttention(cfg, layer)
        self.mlp = PhiMLP(cfg)
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.resid_dropout = nn.Dropout(cfg.resid_pdrop)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = self.input_layernorm(x)
        attn = self.resid_dropout(self.self_attn(h, ctx))
        return attn + self.resid_dropout(self.mlp(h)) + x


class PhiModel(nn.Module):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_dropout = nn.Dropout(cfg.embd_pdrop)
        self.layers = nn.ModuleList(PhiDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.rotary_dim, cfg.rope)


class PhiForCausalLM(CausalLM):
    def __init__(self, cfg: PhiConfig):
        super().__init__()
        self.config = cfg
        self.model = PhiModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=True)
        self.tie_weights()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_dropout(self.model.embed_tokens(input_ids))

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.final_layernorm(x)
