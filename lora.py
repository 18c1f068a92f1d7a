"""Hand-written LoRA (Hu et al., 2021) with several named adapters per model, and PEFT's file format.

MUSCLE (the paper, Sec. 4.1 and appendix A.1) keeps two adapters on one copy of base v2:
the new task adapter A2 (the frozen teacher) and the compatibility adapter Ac (the student,
initialised as a copy of A2). So one `LoRALinear` holds any number of named adapters and applies
the active one; switching adapters flips a name, the base weights are never copied.

Adapters are saved in PEFT's on-disk format (`adapter_config.json` + `adapter_model.safetensors`
with keys `base_model.model.<module path>.lora_A.weight`), so an adapter trained here loads in
PEFT and in serving stacks that read PEFT adapters, and a PEFT adapter loads here.

Precision: adapter weights are stored in float32 whatever the base's dtype (float64 stays float64),
as PEFT's default `autocast_adapter_dtype=True` does. On a bfloat16 base, a saved adapter then loads
back bit for bit, the copy that initialises the compatibility adapter equals the task adapter
exactly, and AdamW's small updates are not lost to bf16's 8-bit mantissa. The LoRA branch computes
in the input's dtype (the weights are cast for the matmul; gradients reach the float32 weights
through the cast): on GPU, FSDP's mixed-precision policy casts every parameter to bfloat16 for
compute anyway, so unsharded scoring computes as sharded training did; the bf16 matmuls keep
tensor-core speed (fp32 ones are an order of magnitude slower and the branch is a few percent of
a layer's FLOPs at rank 128); and the branch's output is added to the base's bf16 output, so
computing it in fp32 would be rounded away at that sum.

FSDP2: call `add_adapter` / `load_adapter` / `copy_adapter` before `fully_shard` (they add modules).
A LoRALinear's frozen base weight and trainable A and B are ordinary parameters of one module, so
they shard together; `save_adapter` gathers them (a collective: call it on every rank) and writes
on rank 0 only.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
from collections import Counter
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import distributed
import files

# Paper appendix A.1: rank 128 on all linear layers, dropout 0. The alpha row printed "156" lost
# its label; we default to the common alpha = 2 * rank = 256 (scaling 2). Pass `alpha`
# to reproduce another choice.
DEFAULT_RANK = 128
DEFAULT_ALPHA = 256
OUTPUT_HEADS = ("lm_head",)  # linear, but not a transformer-block layer: LoRA only if named

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"  # older PEFT; read with torch.load(weights_only=True)
PEFT_PREFIX = "base_model.model."
# PEFT's saved key `...q_proj.lora_A.weight`; the in-memory spelling `...lora_A.default.weight` too.
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# adapter_config.json fields that change the LoRA formula and that this module does not implement.
_UNSUPPORTED_IF_NOT = {"peft_type": "LORA", "use_dora": False, "use_rslora": False,
                       "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
                       "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}}


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """Hyper-parameters of one named adapter; `targets` is written as PEFT's target_modules."""

    rank: int
    alpha: float
    dropout: float
    targets: list[str] | str

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """An nn.Linear plus named low-rank updates: y = x W^T + b + (alpha/r) * B(A(dropout(x))).

    Keeps the wrapped layer's `weight` and `bias` parameters under the same names, so the base
    state_dict keys do not change. Adapters live in `lora_A[name]` / `lora_B[name]` (bias-free
    nn.Linear, PEFT's in-memory naming); dropout applies to the LoRA input only (as in PEFT and
    torchtune). `active` names the adapter applied (None = the bare base); `merged` names the
    adapter folded into `weight`, which forward then does not add a second time.
    """

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_dropout = nn.ModuleDict()
        self.specs: dict[str, AdapterSpec] = {}
        self.active: str | None = None
        self.merged: str | None = None

    def add(self, name: str, spec: AdapterSpec) -> None:
        """A new adapter whose update B A is zero: A Kaiming-uniform as in the LoRA paper's code
        and PEFT, B zeros (LoRA section 4.1), so training starts from the base model. The weights
        are float32 (or float64 on a float64 base), whatever the base's dtype."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        like = dict(bias=False, device=self.weight.device, dtype=dtype)
        self.lora_A[name] = nn.Linear(self.in_features, spec.rank, **like)
        self.lora_B[name] = nn.Linear(spec.rank, self.out_features, **like)
        nn.init.kaiming_uniform_(self.lora_A[name].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B[name].weight)
        self.lora_dropout[name] = nn.Dropout(spec.dropout) if spec.dropout > 0 else nn.Identity()
        self.specs[name] = spec

    def delta_weight(self, name: str) -> torch.Tensor:
        """(alpha/r) * B @ A in float32, the update that merging adds to `weight`."""
        a, b = self.lora_A[name].weight.float(), self.lora_B[name].weight.float()
        return (b @ a) * self.specs[name].scaling

    @torch.no_grad()
    def merge(self, name: str) -> None:
        self.weight.copy_((self.weight.float() + self.delta_weight(name)).to(self.weight.dtype))
        self.merged = name

    @torch.no_grad()
    def unmerge(self, name: str) -> None:
        self.weight.copy_((self.weight.float() - self.delta_weight(name)).to(self.weight.dtype))
        self.merged = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        name = self.active
        if name is None or name == self.merged or name not in self.lora_A:
            return out  # an adapter may target a subset of layers: elsewhere it is the base
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        update = F.linear(F.linear(self.lora_dropout[name](x), a.to(x.dtype)), b.to(x.dtype))
        return out + update * self.specs[name].scaling

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"adapters={list(self.specs)}, active={self.active!r}, merged={self.merged!r}")


# ---------------------------------------------------------------- finding layers

def _linear_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(path, layer) for every nn.Linear or LoRALinear, not looking inside a LoRALinear (whose
    A and B are nn.Linear too)."""
    def walk(module: nn.Module, prefix: str) -> Iterator[tuple[str, nn.Module]]:
        for child_name, child in module.named_children():
            path = prefix + child_name
            if isinstance(child, (nn.Linear, LoRALinear)):
                yield path, child
            if not isinstance(child, LoRALinear):
                yield from walk(child, path + ".")
    yield from walk(model, "")


def _lora_layers(model: nn.Module, name: str | None = None) -> list[tuple[str, LoRALinear]]:
    """The LoRA layers, or only those holding adapter `name`."""
    return [(path, layer) for path, layer in _linear_layers(model)
            if isinstance(layer, LoRALinear) and (name is None or name in layer.specs)]


def _layers_with(model: nn.Module, name: str) -> list[tuple[str, LoRALinear]]:
    layers = _lora_layers(model, name)
    if not layers:
        raise ValueError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    return layers


def _matches(path: str, target: str) -> bool:
    """PEFT's rule for a target_modules entry: the full path, or its last dotted components."""
    return path == target or path.endswith("." + target)


def _resolve_targets(model: nn.Module, targets: list[str] | None) -> list[str]:
    """Paths of the linear layers to adapt. None = every linear layer in the transformer blocks
    (paper A.1: all linear layers), i.e. all but the output head."""
    paths = [path for path, _ in _linear_layers(model)]
    if targets is None:
        return [p for p in paths if p.rsplit(".", 1)[-1] not in OUTPUT_HEADS]
    unknown = [t for t in targets if not any(_matches(p, t) for p in paths)]
    if unknown:
        names = sorted({p.rsplit(".", 1)[-1] for p in paths})
        raise ValueError(f"LoRA targets {unknown} match no linear layer of the model; its linear "
                         f"layers are named {names} (give these names or full module paths)")
    return [p for p in paths if any(_matches(p, t) for t in targets)]


def _attach(model: nn.Module, paths: list[str], name: str, spec: AdapterSpec) -> None:
    """Add adapter `name` on the layers at `paths`, wrapping plain nn.Linear in place."""
    if name in adapter_names(model):
        raise ValueError(f"the model already has an adapter named {name!r}; choose another name")
    for path in paths:
        layer = model.get_submodule(path)
        if isinstance(layer, nn.Linear):
            parent, _, leaf = path.rpartition(".")
            layer = LoRALinear(layer)
            model.get_submodule(parent).register_module(leaf, layer)
        layer.add(name, spec)


# ---------------------------------------------------------------- adapters on a model

def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, sorted."""
    return sorted({n for _, layer in _lora_layers(model) for n in layer.specs})


def active_adapter(model: nn.Module) -> str | None:
    """The adapter forward applies (None = the bare base, also when the model has no LoRA)."""
    layers = _lora_layers(model)
    return layers[0][1].active if layers else None


def add_adapter(model: nn.Module, name: str = "default", rank: int = DEFAULT_RANK,
                alpha: float = DEFAULT_ALPHA, dropout: float = 0.0,
                targets: list[str] | None = None) -> None:
    """Put a new adapter `name` (B = 0, so outputs are unchanged) on the target linear layers and
    make it active. `targets`: leaf names ("q_proj") or full paths, matched like PEFT's
    target_modules; None = all linear layers of the transformer blocks (Llama q/k/v/o_proj,
    gate/up/down_proj; Phi q/k/v_proj, dense, fc1, fc2), lm_head only if named. Defaults follow
    paper A.1: rank 128, dropout 0, and alpha 256 = 2 * rank (the paper's printed alpha "156" lost
    its label), so the update is scaled by alpha / rank = 2."""
    if rank <= 0 or not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA needs rank > 0 and 0 <= dropout < 1, got rank={rank}, "
                         f"dropout={dropout}")
    paths = _resolve_targets(model, targets)
    leaf_names = sorted({p.rsplit(".", 1)[-1] for p in paths})
    spec = AdapterSpec(rank, alpha, dropout, list(targets) if targets is not None else leaf_names)
    _attach(model, paths, name, spec)
    set_adapter(model, name)


def set_adapter(model: nn.Module, name: str | None) -> None:
    """Make adapter `name` the one forward applies; None runs the bare base model."""
    layers = [layer for _, layer in _lora_layers(model)]
    if name is not None and not any(name in layer.specs for layer in layers):
        raise ValueError(f"no adapter named {name!r} on the model; it has {adapter_names(model)}")
    merged = {layer.merged for layer in layers} - {None, name}
    if merged:
        raise ValueError(f"adapter {merged.pop()!r} is merged into the base weights; "
                         f"unmerge_adapter it before switching to {name!r}")
    for layer in layers:
        layer.active = name


@contextlib.contextmanager
def use_adapter(model: nn.Module, name: str | None) -> Iterator[nn.Module]:
    """`with use_adapter(model, "task"): ...` runs with that adapter, then restores the previous
    one; MUSCLE uses it for the frozen teacher's forward inside the student's training step."""
    previous = active_adapter(model)
    set_adapter(model, name)
    try:
        yield model
    finally:
        set_adapter(model, previous)


def copy_adapter(model: nn.Module, src: str, dst: str) -> None:
    """A new adapter `dst` equal to `src` (same layers, hyper-parameters and weights), made
    active: MUSCLE initialises the compatibility adapter as a copy of the new task adapter."""
    layers = _layers_with(model, src)
    _attach(model, [path for path, _ in layers], dst, layers[0][1].specs[src])
    with torch.no_grad():
        for _, layer in layers:
            layer.lora_A[dst].weight.copy_(layer.lora_A[src].weight)
            layer.lora_B[dst].weight.copy_(layer.lora_B[src].weight)
    set_adapter(model, dst)


def _adapter_weights(model: nn.Module, name: str) -> Iterator[tuple[str, str, nn.Parameter]]:
    """(module path, "A" or "B", parameter) for adapter `name`."""
    for path, layer in _layers_with(model, name):
        yield path, "A", layer.lora_A[name].weight
        yield path, "B", layer.lora_B[name].weight


def adapter_parameters(model: nn.Module, name: str) -> dict[str, nn.Parameter]:
    """Adapter `name`'s parameters, keyed as in model.named_parameters()."""
    return {f"{path}.lora_{ab}.{name}.weight": p for path, ab, p in _adapter_weights(model, name)}


def mark_trainable(model: nn.Module, name: str) -> None:
    """Freeze every parameter of the model except adapter `name`'s A and B."""
    trainable = adapter_parameters(model, name)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in trainable.values():
        p.requires_grad_(True)


def merge_adapter(model: nn.Module, name: str) -> None:
    """Fold adapter `name` into the base weights (computed in float32, cast back to the weight's
    dtype) and make it active; forward then skips its LoRA branch. For inference on an unsharded
    model; float32 weights come back from unmerge_adapter to within rounding (~1e-7)."""
    layers = _layers_with(model, name)
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    tied = [path for path, layer in layers if uses[id(layer.weight)] > 1]
    if tied:  # e.g. lm_head tied to the embeddings: merging would change the embeddings too
        raise ValueError(f"cannot merge adapter {name!r}: {tied} share their weight with another "
                         f"module (tied embeddings?); use the adapter unmerged")
    set_adapter(model, name)  # refuses if another adapter is merged
    for _, layer in layers:
        if layer.merged is None:
            layer.merge(name)


def unmerge_adapter(model: nn.Module, name: str) -> None:
    """Subtract adapter `name` from the base weights again (float32, cast back)."""
    layers = _layers_with(model, name)
    if any(layer.merged != name for _, layer in layers):
        raise ValueError(f"adapter {name!r} is not merged; nothing to unmerge")
    for _, layer in layers:
        layer.unmerge(name)


# ---------------------------------------------------------------- PEFT file format

def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """Adapter `name`'s A and B as full CPU tensors under PEFT's saved key names."""
    return {f"{PEFT_PREFIX}{path}.lora_{ab}.weight": distributed.full_tensor(p)
            for path, ab, p in _adapter_weights(model, name)}


def _peft_config(spec: AdapterSpec, base_model_name_or_path: str | None) -> dict:
    """adapter_config.json as PEFT (0.21) reads it; fields left out take PEFT's defaults."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": spec.rank,
            "lora_alpha": spec.alpha, "lora_dropout": spec.dropout,
            "target_modules": spec.targets, "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
            "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}


def save_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default",
                 base_model_name_or_path: str | None = None) -> None:
    """Write adapter `name` to directory `path` in PEFT's format. Under torch.distributed every
    rank must call this (sharded parameters are gathered); rank 0 writes. The weights are
    replaced first and adapter_config.json last, so a crash never leaves a config pointing at
    half-written weights."""
    state = adapter_state_dict(model, name)
    if distributed.is_main_process():
        spec = _layers_with(model, name)[0][1].specs[name]
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        files.replace_atomic(out / WEIGHTS_NAME, lambda f: save_file(state, f, metadata={"format": "pt"}))
        config = json.dumps(_peft_config(spec, base_model_name_or_path), indent=2, sort_keys=True)
        files.write_text_atomic(out / CONFIG_NAME, config + "\n")
    if distributed.in_process_group():
        dist.barrier()  # no rank reads the adapter before it is complete


def _read_adapter(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """adapter_config.json (checked for features we do not implement) and the weights."""
    config_file = path / CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: expected a directory written by "
                                f"lora.save_adapter or PEFT's save_pretrained")
    config = files.read_json(config_file, fix="save the adapter again (lora.save_adapter or PEFT)")
    _check_config(config, config_file)
    unsupported = {k: config[k] for k, v in _UNSUPPORTED_IF_NOT.items() if config.get(k, v) != v}
    if unsupported:
        raise ValueError(f"{config_file}: this LoRA implementation supports plain LoRA only; "
                         f"unsupported settings {unsupported}")
    for name in (WEIGHTS_NAME, LEGACY_WEIGHTS_NAME):
        if (path / name).is_file():
            try:
                if name == WEIGHTS_NAME:
                    return config, load_file(path / name)
                return config, torch.load(path / name, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 (torch.load: UnpicklingError, EOFError, RuntimeError)
                raise ValueError(f"cannot read {path / name} ({str(e)[:160]}); the file is probably "
                                 f"truncated or corrupt: save or download the adapter again") from None
    raise FileNotFoundError(f"no {WEIGHTS_NAME} (or {LEGACY_WEIGHTS_NAME}) in {path}")


def _check_config(config: dict, where: Path) -> None:
    """r a positive integer, lora_alpha a positive number (alpha <= 0 would flip or cancel the
    update silently), lora_dropout in [0, 1)."""
    checks = {"r": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
              "lora_alpha": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
                             "a positive number"),
              "lora_dropout": (lambda v: isinstance(v, (int, float)) and 0 <= v < 1, "a number in [0, 1)")}
    for key, (ok, expected) in checks.items():
        if key in ("r", "lora_alpha") or key in config:
            if not ok(config.get(key)):
                raise ValueError(f"{where}: {key} should be {expected}, got {config.get(key)!r:.60}")


def _check_shape(key: str, tensor: torch.Tensor, expected: tuple[int, int]) -> None:
    if tuple(tensor.shape) != expected:
        raise ValueError(f"adapter key {key} has shape {tuple(tensor.shape)} but this model needs "
                         f"{expected}: the adapter was trained on a base model of another shape")


def _group_by_module(state: dict[str, torch.Tensor], linear: dict[str, nn.Module],
                     rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """PEFT keys -> {module path: {"A": tensor, "B": tensor}}, checked against the model."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _PEFT_KEY.match(key)
        if match is None:
            raise ValueError(f"adapter key {key!r} is not a LoRA A/B weight; only LoRA on linear "
                             f"layers is supported")
        path, ab = match["path"], match["ab"]
        if path not in linear:
            raise ValueError(f"adapter key {key} names {path!r}, which is not a linear layer of "
                             f"this model (is it an adapter for another architecture?)")
        layer = linear[path]
        _check_shape(key, tensor, (rank, layer.in_features) if ab == "A"
                     else (layer.out_features, rank))
        modules.setdefault(path, {})[ab] = tensor
    incomplete = [p for p, ab in modules.items() if len(ab) != 2]
    if incomplete:
        raise ValueError(f"adapter has lora_A without lora_B (or the reverse) for {incomplete}")
    return modules


def load_adapter(model: nn.Module, path: str | os.PathLike, name: str = "default") -> None:
    """Load an adapter in PEFT's format (ours or PEFT's) as adapter `name`, wrapping the linear
    layers its keys name, and make it active."""
    config, state = _read_adapter(Path(path))
    spec = AdapterSpec(int(config["r"]), config["lora_alpha"], float(config.get("lora_dropout", 0.0)),
                       config.get("target_modules") or [])
    modules = _group_by_module(state, dict(_linear_layers(model)), spec.rank)
    _attach(model, list(modules), name, spec)
    with torch.no_grad():
        for module_path, weights in modules.items():
            layer = model.get_submodule(module_path)
            layer.lora_A[name].weight.copy_(weights["A"])
            layer.lora_B[name].weight.copy_(weights["B"])
    set_adapter(model, name)
