"""Llama 1/2/3 and Vicuna (Hugging Face `LlamaForCausalLM` layout), plus the pieces Phi reuses.

MUSCLE (the paper, Sec. 5 and Table 8) updates Llama-1 -> Llama-2 -> Vicuna and Phi-1 -> Phi-1.5 -> Phi-2, so the
models must reproduce Hugging Face's logits on the published checkpoints. Module names and state_dict
keys are HF's exactly, so checkpoints load without renaming and LoRA module paths equal PEFT's.

Numerics follow transformers' `modeling_llama.py` (the test oracle):
- RoPE in the *rotate-half* convention (x[i] pairs with x[i + d/2]); HF's conversion script already
  permuted q/k rows for it, so HF weights need no permutation (Meta's reference pairs adjacent dims instead; torchtune and
  gpt-fast permute q/k on load for that).
- cos/sin are computed in float32 and cast to the activation dtype (transformers PR #29285).
- RMSNorm normalises in float32, casts back, *then* multiplies by the weight (Meta's order too).
- Grouped-query attention: KV head j serves query heads j*g .. j*g+g-1 (SDPA's `enable_gqa`).

Shared with phi.py: `rope_settings`, `RotaryEmbedding`, `apply_rope`, `KVCache`, `attend`,
`attention_context` and the `CausalLM` base class (embedding -> blocks -> final norm -> lm_head).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------- RoPE
@dataclass
class RopeSettings:
    """RoPE parameters, whichever of the three config.json spellings carried them."""

    theta: float = 10000.0
    rope_type: str = "default"  # "default" | "linear" | "llama3"
    scaling: dict[str, Any] = field(default_factory=dict)  # factor, low/high_freq_factor, ...
    partial_rotary_factor: float = 1.0


def rope_settings(hf: dict[str, Any], default_partial_rotary_factor: float = 1.0) -> RopeSettings:
    """Read RoPE settings from a HF config dict.

    Hub config.json files use `rope_theta` + `rope_scaling` (whose kind is under `rope_type`, or `type`
    in older files); transformers v5 writes a single `rope_parameters` dict with `rope_theta` inside.
    """
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    theta = params.pop("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    partial = params.pop("partial_rotary_factor", hf.get("partial_rotary_factor", default_partial_rotary_factor))
    if rope_type not in ("default", "linear", "llama3"):
        raise ValueError(
            f"RoPE scaling type {rope_type!r} is not supported (supported: default, linear, llama3)"
        )
    if rope_type == "llama3":
        params.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return RopeSettings(float(theta), rope_type, params, float(partial))


def rope_inv_freq(dim: int, rope: RopeSettings) -> torch.Tensor:
    """Inverse frequencies for `dim` rotary dims (float32, CPU), as transformers' ROPE_INIT_FUNCTIONS."""
    # arange in int64 then float, as HF does, so the frequencies match bit for bit.
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.scaling["factor"]
    if rope.rope_type == "llama3":
        return _llama3_scaled(inv_freq, rope.scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 frequency scaling (transformers `_compute_llama3_parameters`).

    Wavelengths shorter than orig/high_freq_factor are kept, longer than orig/low_freq_factor are
    divided by `factor`, and those in between blend the two linearly in orig/wavelen.
    """
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    orig = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > orig / low, inv_freq / factor, inv_freq)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < orig / high) & ~(wavelen > orig / low)
    return torch.where(is_medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. `inv_freq` is a non-persistent buffer (not in checkpoints).

    It is created on the CPU even when the model is built on the meta device, because loading with
    `assign=True` only replaces checkpoint tensors; `model.to(device)` moves it with the rest.
    """

    def __init__(self, dim: int, rope: RopeSettings):
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(dim, rope), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, 1, T, dim], computed in float32 then cast to `dtype`."""
        with torch.autocast(device_type=positions.device.type, enabled=False):
            freqs = positions[..., None].float() * self.inv_freq.float().to(positions.device)
            emb = torch.cat((freqs, freqs), dim=-1)[:, None]
            return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim (GPT-NeoX / HF convention)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, H, T, D]; the rest pass through (Phi's partial RoPE)."""
    n = cos.shape[-1]
    if n == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :n], x[..., n:]
    return torch.cat((rot * cos + rotate_half(rot) * sin, rest), dim=-1)


# ------------------------------------------------------------------------------- KV cache + masks
class KVCache:
    """Preallocated keys/values, one [B, n_kv, max_len, head_dim] pair per layer.

    `length` counts the positions already stored; the model advances it by T after each forward, so
    every layer of one forward writes at the same offset.
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str):
        shape = (batch_size, num_kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_len = max_len
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv, T, hd] after the current length; return all keys/values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} positions needed, max_len={self.max_len}")
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass
class AttentionContext:
    """What every layer of one forward needs: RoPE tables, the boolean mask (None = SDPA's causal path)."""

    cos: torch.Tensor
    sin: torch.Tensor
    mask: torch.Tensor | None  # [B, 1, T, S], True = may attend
    cache: KVCache | None


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """Every row is its real tokens, then padding only (or no padding): a 1 in the first column
    and no 0 -> 1 step. One host-device sync per forward, not per layer."""
    real = attention_mask.bool()
    return bool((real[:, 0].all() & (real[:, 1:] <= real[:, :-1]).all()).item())


def attention_context(rotary: RotaryEmbedding, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      cache: KVCache | None, dtype: torch.dtype) -> AttentionContext:
    """Positions and mask from the padding mask, so padded rows equal the sequence alone.

    Without a mask, or with right padding and no cached positions (training, validation,
    scoring's prefixes): positions 0..T-1 and no mask, so SDPA takes its `is_causal` path
    (FlashAttention on GPU) and no [B, 1, T, T] mask is built. A real token then never sees a pad,
    which only ever follows it; pad positions carry no loss and are never read.

    Otherwise (left padding in generation, tokens after a cache): positions are
    cumsum(attention_mask) - 1 (left padding does not shift the real tokens) and a query may
    attend to key j when j is a real token and j <= its own index. Pad queries also attend to
    themselves: a left-pad row would otherwise be fully masked and SDPA would return NaN.
    """
    batch, t = input_ids.shape
    past = cache.length if cache is not None else 0
    if attention_mask is not None and attention_mask.shape != (batch, past + t):
        raise ValueError(
            f"attention_mask has shape {tuple(attention_mask.shape)}, expected {(batch, past + t)} "
            "(it must cover the cached positions plus the new tokens)"
        )
    if past == 0 and (attention_mask is None or is_right_padded(attention_mask)):
        positions = torch.arange(t, device=input_ids.device).expand(batch, t)
        cos, sin = rotary(positions, dtype)
        return AttentionContext(cos, sin, None, cache)
    if attention_mask is None:
        attention_mask = torch.ones(batch, past + t, dtype=torch.long, device=input_ids.device)
    real = attention_mask.bool()
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:]
    query_idx = torch.arange(past, past + t, device=input_ids.device)[:, None]
    key_idx = torch.arange(past + t, device=input_ids.device)[None, :]
    mask = (real[:, None, :] & (key_idx <= query_idx)) | (key_idx == query_idx)
    cos, sin = rotary(positions, dtype)
    return AttentionContext(cos, sin, mask[:, None], cache)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext, layer: int,
           dropout_p: float = 0.0) -> torch.Tensor:
    """SDPA over q [B, H, T, hd] and the new k, v [B, n_kv, T, hd] (appended to the cache) -> [B, T, H*hd]."""
    if ctx.cache is not None:
        k, v = ctx.cache.update(layer, k, v)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None, dropout_p=dropout_p,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.transpose(1, 2).flatten(2)


# ------------------------------------------------------------------------------------- the model
@dataclass
class LlamaConfig:
    """The config.json keys a Llama checkpoint needs (transformers' `LlamaConfig` names)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeSettings = field(default_factory=RopeSettings)
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    attention_dropout: float = 0.0
    model_type: str = "llama"

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "LlamaConfig":
        """Build from a config.json dict; rms_norm_eps and rope come from the file (they differ by version)."""
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"Llama hidden_act {hf['hidden_act']!r} is not supported (only 'silu')")
        heads = hf["num_attention_heads"]
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope=rope_settings(hf),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            attention_dropout=hf.get("attention_dropout", 0.0),
        )


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) in float32, cast back, then times weight (HF/Meta order)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.cfg = layer, cfg
        h, hd, bias = cfg.hidden_size, cfg.head_dim, cfg.attention_bias
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * hd, bias=bias)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * hd, bias=bias)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * hd, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, h, bias=bias)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        b, t, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(b, t, -1, hd).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, hd).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        p = self.cfg.attention_dropout if self.training else 0.0
        return self.o_proj(attend(q, k, v, ctx, self.layer, p))


class LlamaMLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        h, i, bias = cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + mlp(norm(h))."""

    def __init__(self, cfg: LlamaConfig, layer: int):
        super().__init__()
        self.self_attn = LlamaAttention(cfg, layer)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), ctx)
        return h + self.mlp(self.post_attention_layernorm(h))


class CausalLM(nn.Module):
    """Shared forward for Llama and Phi: `self.model` holds embed_tokens, rotary_emb and layers;
    subclasses provide `final_norm` and may override `embed`.

    `forward == lm_head(hidden_states(...))`; the MUSCLE loss (the paper, Sec. 4.1, Eq. 1-2) calls the two halves
    itself so that it can project logits chunk by chunk.
    """

    config: Any
    model: nn.Module
    lm_head: nn.Linear

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(input_ids)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                      cache: KVCache | None = None) -> torch.Tensor:
        """[B, T] token ids -> [B, T, hidden] after the final norm.

        `attention_mask` [B, past + T] is 1 at real tokens and 0 at pads; without it every token
        is real. `attention_context` turns it into positions and the causal mask."""
        x = self.embed(input_ids)
        ctx = attention_context(self.model.rotary_emb, input_ids, attention_mask, cache, x.dtype)
        for layer in self.model.layers:
            x = layer(x, ctx)
        if cache is not None:
            cache.length += input_ids.shape[1]
        return self.final_norm(x)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] in the dtype of the parameters."""
        return self.lm_head(self.hidden_states(input_ids, attention_mask, cache))

    def new_cache(self, batch_size: int, max_len: int) -> KVCache:
        """An empty KV cache on the model's device and dtype."""
        c = self.config
        w = self.model.embed_tokens.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, max_len, c.head_dim,
                       w.dtype, w.device)

    def tie_weights(self) -> None:
        """Share the embedding matrix with lm_head when the config says so (e.g. Llama 3.2 1B, SmolLM).

        Called again after `load_state_dict(assign=True)`, which replaces Parameter objects.
        """
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope)


class LlamaForCausalLM(CausalLM):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.norm(x)
