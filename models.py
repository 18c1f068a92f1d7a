"""Model registry and loading: a registry name, a local HF checkpoint directory or a hub repo id.

The paper's update chains (its Table 8) are Llama-1 -> Llama-2 -> Vicuna and Phi-1 -> Phi-1.5 ->
Phi-2; REGISTRY maps the short names used on the command line to their hub repos, and PINS
pins each repo to one hub commit, so a name always downloads the same files (pairs.py lists the
paper's updates by these names). Loading builds the
model on the meta device and assigns checkpoint tensors shard by shard, so a 7B model never needs
twice its size in memory. Only safetensors, or `.bin` through `torch.load(weights_only=True)`: never
pickle, never remote code.
"""
from __future__ import annotations

from pathlib import Path
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

import files as fileio
import llama
import phi
from tokenizer import Tokenizer, load_tokenizer_dir

REGISTRY: dict[str, str] = {
    "llama1": "huggyllama/llama-7b",
    "llama2": "meta-llama/Llama-2-7b-hf",
    "llama3": "meta-llama/Meta-Llama-3-8B",
    "vicuna1.3": "lmsys/vicuna-7b-v1.3",
    "vicuna1.5": "lmsys/vicuna-7b-v1.5",
    "phi1": "microsoft/phi-1",
    "phi1.5": "microsoft/phi-1_5",
    "phi2": "microsoft/phi-2",
    "smollm-135m": "HuggingFaceTB/SmolLM-135M",
    "smollm2-135m": "HuggingFaceTB/SmolLM2-135M",
}

@dataclass(frozen=True)
class Pin:
    """The hub commit a registry repo is downloaded at, and `source`: where public code names that
    commit for that repo (a Hugging Face cache's snapshots/<commit> directory is named by the commit
    it holds), the record that it exists on the hub. `commit` None: no such record was found,
    `source` says why, and the repo's main branch is downloaded (--list-pairs: "unpinned")."""
    commit: str | None
    source: str


PINS: dict[str, Pin] = {
    "huggyllama/llama-7b": Pin(
        "8416d3fefb0cb3ff5775a7b13c1692d10ff1aa16",
        "its snapshot directory in public scripts (LLaVA-Med's apply_delta --base, tinygrad's llama.py --model)"),
    "meta-llama/Llama-2-7b-hf": Pin(
        "01c7f73d771dfac7d292323805ebc428287df4f9",
        "embeddings-benchmark/mteb mteb/models/repllama_models.py (RepLLaMA's base revision), "
        "a public MODEL_REVISIONS dict"),
    "meta-llama/Meta-Llama-3-8B": Pin(
        "8cde5ca8380496c9a6cc7ef3a8b46a0372a1d920",
        "a public dict of pinned hub revisions, its snapshot directory in public scripts"),
    "lmsys/vicuna-7b-v1.3": Pin(
        "236eeeab96f0dc2e463f2bebb7bb49809279c6d6",
        "its snapshot directory in public code (Spec-Bench scripts, an experiment's pinned snapshot: 2 .bin shards)"),
    "lmsys/vicuna-7b-v1.5": Pin(
        "3321f76e3f527bd14065daf69dad9344000a201d",
        "TOKENIZER_REVISION of lmsys/vicuna-7b-v1.5 in public code, its snapshot directory in public scripts"),
    "microsoft/phi-1": Pin(
        "b9ac0e6d78d43970ecf88e9e0154b3a7da20ed89",
        "its snapshot directory in one public script that reads its config with AutoConfig"),
    "microsoft/phi-1_5": Pin(
        "675aa382d814580b22651a30acb1a585d7c25963",
        "the revision of a public --revision download test, its snapshot directory in public scripts"),
    "microsoft/phi-2": Pin(
        "ef382358ec9e382308935a992d908de099b64c23",
        "dottxt-ai/outlines-core tests/fsm/test_serialization.py (AutoTokenizer revision=)"),
    "HuggingFaceTB/SmolLM-135M": Pin(
        "1d461723eec654e65efdc40cf49301c89c0c92f4",
        "revision= in public model registries (config_revision, tokenizer_revision; an immutable revision URL)"),
    "HuggingFaceTB/SmolLM2-135M": Pin(
        "93efa2f097d58c2a74874c7e644dbc9b0cee75a2",
        "MODEL_REVISION / --model-revision of HuggingFaceTB/SmolLM2-135M in public code"),
}


def revision(repo_id: str) -> str | None:
    """The pinned hub commit of a repo; None (its main branch) for a repo outside PINS or unpinned."""
    pin = PINS.get(repo_id)
    return pin.commit if pin else None


def unpinned() -> list[str]:
    """Registry names whose repo has no verified commit (they follow the repo's main branch)."""
    return sorted(name for name, repo in REGISTRY.items() if revision(repo) is None)

# model_type -> (config class, model class)
FAMILIES: dict[str, tuple[Any, type[nn.Module]]] = {
    "llama": (llama.LlamaConfig, llama.LlamaForCausalLM),
    "phi": (phi.PhiConfig, phi.PhiForCausalLM),
}

# Pre-Jan-2024 Phi repos used custom MixFormer code (transformers PR #28163 ported Phi to
# PhiForCausalLM; litgpt's `copy_weights_phi` rejects the old keys the same way).
OLD_PHI_TYPES = ("phi-msft", "mixformer-sequential")


def read_config(ckpt_dir: Path) -> dict[str, Any]:
    """config.json of a checkpoint directory, with clear errors for the usual mistakes."""
    path = ckpt_dir / "config.json"
    if not path.is_file():
        what = "is empty" if not any(ckpt_dir.iterdir()) else "has no config.json"
        raise FileNotFoundError(
            f"{ckpt_dir} {what}: expected a Hugging Face checkpoint directory "
            "(config.json, *.safetensors, tokenizer files)"
        )
    return fileio.read_json(path, fix=FIX_CONFIG)


FIX_CONFIG = "copy the config.json of the original checkpoint into the directory"
# Sizes every family reads from config.json: required, then optional (the family has a default).
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
OPTIONAL_SIZES = ("num_key_value_heads", "head_dim", "max_position_embeddings")


def check_sizes(hf_config: dict[str, Any], source: str) -> None:
    """The model's sizes are positive integers and the heads divide the width (and the query
    heads the key/value heads), so that a wrong config.json is named here, not deep in torch."""
    for key in SIZES + OPTIONAL_SIZES:
        value = hf_config.get(key)
        if (key in SIZES or value is not None) and (not isinstance(value, int) or isinstance(value, bool)
                                                    or value <= 0):
            raise ValueError(f"{source}: {key} should be a positive integer, got {value!r:.60}; {FIX_CONFIG}")
    heads, width = hf_config["num_attention_heads"], hf_config["hidden_size"]
    if hf_config.get("head_dim") is None and width % heads:
        raise ValueError(f"{source}: num_attention_heads {heads} does not divide hidden_size {width}; {FIX_CONFIG}")
    kv = hf_config.get("num_key_value_heads") or heads
    if heads % kv:
        raise ValueError(f"{source}: num_key_value_heads {kv} does not divide num_attention_heads {heads}; "
                         f"{FIX_CONFIG}")


def build_model(hf_config: dict[str, Any], source: str = "config") -> nn.Module:
    """Instantiate the family's model from a config.json dict (on the current default device)."""
    model_type = hf_config.get("model_type")
    if model_type in OLD_PHI_TYPES:
        raise ValueError(
            f"{source}: outdated Phi checkpoint (model_type {model_type!r}, MixFormer layout); "
            "download the current revision of the repo, whose config has model_type 'phi'"
        )
    if model_type not in FAMILIES:
        raise ValueError(
            f"{source}: unsupported model_type {model_type!r}; supported: {', '.join(sorted(FAMILIES))}"
        )
    check_sizes(hf_config, source)
    config_cls, model_cls = FAMILIES[model_type]
    try:
        return model_cls(config_cls.from_hf(hf_config))
    except (KeyError, TypeError) as e:  # a field missing or of a wrong type that check_sizes leaves
        raise ValueError(f"{source}: field {e} is missing or of the wrong type; {FIX_CONFIG}") from None


def weight_files(ckpt_dir: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors (single or sharded with an index), else .bin."""
    for index_name, pattern in (("model.safetensors.index.json", "*.safetensors"),
                                ("pytorch_model.bin.index.json", "*.bin")):
        index = ckpt_dir / index_name
        if index.is_file():
            weight_map = fileio.read_json(index, fix="download the checkpoint again").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: expected a 'weight_map' object (tensor name -> file name); "
                                 f"download the checkpoint again")
            shards = sorted(set(map(str, weight_map.values())))
            missing = [s for s in shards if not (ckpt_dir / s).is_file()]
            if missing:
                raise FileNotFoundError(f"{ckpt_dir}: shards listed in {index_name} are missing: {missing}")
            return [ckpt_dir / s for s in shards]
        files = sorted(ckpt_dir.glob(pattern))
        if files:
            return files
    raise FileNotFoundError(f"{ckpt_dir} has no weights (*.safetensors or pytorch_model*.bin)")


def iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of one weight file, read lazily (safetensors) or memory-mapped (.bin)."""
    if path.suffix == ".bin":
        yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
        return
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
    except (SafetensorError, OSError) as e:
        raise ValueError(
            f"cannot read {path} ({e}); the file is probably truncated or corrupt: delete it and download "
            "the checkpoint again"
        ) from e


def load_weights(model: nn.Module, files: list[Path], dtype: torch.dtype, device: torch.device) -> None:
    """Assign checkpoint tensors to a meta-device model, one file at a time.

    Each tensor is cast and moved before the next file is opened, so peak memory is about one
    shard plus the model in its target dtype.
    """
    tied = getattr(model.config, "tie_word_embeddings", False)
    expected = set(model.state_dict())
    seen: set[str] = set()
    for path in files:
        shard: dict[str, torch.Tensor] = {}
        for name, tensor in iter_tensors(path):
            if name.endswith("rotary_emb.inv_freq"):  # recomputed from the config; some old files carry it
                continue
            if name not in expected:
                raise ValueError(_unexpected_tensor(path, name, model.config.model_type))
            if not tensor.is_floating_point():
                raise ValueError(f"{path}: tensor {name!r} is {tensor.dtype}, not floating point; "
                                 f"quantized or integer checkpoints are not supported: use the "
                                 f"float16/bfloat16/float32 weights of the model")
            shard[name] = tensor.to(device=device, dtype=dtype)
        _check_shapes(model, shard, path)
        model.load_state_dict(shard, strict=False, assign=True)
        seen.update(shard)
    missing = expected - seen - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ValueError(f"checkpoint is missing tensors: {sorted(missing)[:5]} ({len(missing)} in all)")
    model.tie_weights()


def _check_shapes(model: nn.Module, shard: dict[str, torch.Tensor], path: Path) -> None:
    """Every tensor of the file has the shape config.json gives it."""
    expected = model.state_dict()
    for name, tensor in shard.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)} but config.json "
                             f"gives {tuple(expected[name].shape)}: the weights and the config are of "
                             f"different models; {FIX_CONFIG}")


def _unexpected_tensor(path: Path, name: str, model_type: str) -> str:
    if model_type == "phi" and name.startswith(("layers.", "transformer.")):
        return (f"{path}: outdated Phi checkpoint (MixFormer keys such as {name!r}); download the current "
                "revision of the repo (HF-native Phi layout, model.layers.*)")
    return f"{path}: unexpected tensor {name!r} for model_type {model_type!r}"


def load_model(name_or_path: str | Path, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> nn.Module:
    """Load a model in eval mode from a registry name, a local checkpoint dir or a hub repo id.

    dtype None means float32 (exact parity with transformers' fp32 logits; pass torch.bfloat16 for
    big models on GPU). device None means CPU.
    """
    ckpt_dir = resolve(name_or_path)
    dtype = dtype or torch.float32
    device = torch.device(device or "cpu")
    hf_config = read_config(ckpt_dir)
    files = weight_files(ckpt_dir)
    with torch.device("meta"):
        model = build_model(hf_config, source=str(ckpt_dir / "config.json"))
    load_weights(model, files, dtype, device)
    model.to(device)  # non-persistent buffers (RoPE inv_freq) were built on the CPU
    return model.eval()


def load_tokenizer(name_or_path: str | Path) -> Tokenizer:
    """The tokenizer of a registry name, local checkpoint dir or hub repo id (see tokenizer.py),
    checked against the checkpoint's own config.json: an id at or past `vocab_size` has no row
    in the embedding, so a tokenizer with more tokens belongs to another model. Fewer is usual
    (Phi pads its embedding to 51200 rows for 50295 tokens)."""
    ckpt_dir = resolve(name_or_path)
    tok = load_tokenizer_dir(ckpt_dir)
    vocab_size = read_config(ckpt_dir).get("vocab_size")
    if vocab_size is not None and tok.vocab_size > vocab_size:
        raise ValueError(
            f"{tok.backend.path} has {tok.vocab_size} tokens but {ckpt_dir / 'config.json'} has "
            f"vocab_size {vocab_size}: ids from {vocab_size} on have no embedding, so the tokenizer "
            f"files belong to another model; copy those of the checkpoint's own repo")
    return tok


# Names of checkpoints built on this machine instead of downloaded: name -> build(name), which
# returns the checkpoint directory (building it on first use). toy.py registers its bases here.
BUILDERS: dict[str, Callable[[str], Path]] = {}


def register_builder(name: str, build: Callable[[str], Path]) -> None:
    """Make `name` resolve to `build(name)`; a name is registered once (again with the same builder
    is a no-op), and cannot shadow a REGISTRY name."""
    if name in REGISTRY or BUILDERS.get(name, build) != build:
        raise ValueError(f"a different model named {name!r} is already registered")
    BUILDERS[name] = build


def resolve(name_or_path: str | Path, local_only: bool = False) -> Path:
    """A local directory, a registry name, a hub repo id (org/name) or a built model's name
    (BUILDERS) -> a local checkpoint dir (downloaded or built on first use). `local_only`: a hub
    repo must already be in the Hugging Face cache (another process of this machine downloaded it);
    no network."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = str(name_or_path)
    if name in REGISTRY:
        return download(REGISTRY[name], local_only)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return download(name, local_only)
    if name in BUILDERS:
        return Path(BUILDERS[name](name))
    raise ValueError(
        f"unknown model {name!r}: not a directory, a registry name or a hub repo id (org/name). "
        f"Known names: {', '.join(sorted(REGISTRY) + sorted(BUILDERS))}"
    )


# Only the files a checkpoint needs from the hub; weights are chosen below.
HUB_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
             "tokenizer_config.json", "special_tokens_map.json"]
SAFETENSORS_FILES = ["model*.safetensors", "model.safetensors.index.json"]
BIN_FILES = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


# (Hugging Face cache dir, repo id) -> snapshot dir: the hub is asked once per process and repo.
_SNAPSHOTS: dict[tuple[str, str], Path] = {}


def download(repo_id: str, local_only: bool = False) -> Path:
    """Download config, tokenizer and weights of a hub repo into the HF cache; return the snapshot dir.

    Weights are safetensors when the repo has them, else `.bin` (e.g. lmsys/vicuna-7b-v1.3), never
    both; other files (flax/tf weights, Meta's original/ folder) are not fetched. A repo pinned in
    PINS is fetched at that commit, any other at its main branch. The answer is kept for the
    process, so the later loads of a run do not query the hub again.
    `local_only`: read the cache only (huggingface_hub's local_files_only).
    """
    from huggingface_hub import constants

    key = (str(constants.HF_HUB_CACHE), repo_id)
    if key not in _SNAPSHOTS:
        _SNAPSHOTS[key] = _snapshot(repo_id, local_only)
    return _SNAPSHOTS[key]


def _snapshot(repo_id: str, local_only: bool) -> Path:
    commit = revision(repo_id)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        path = Path(snapshot_download(repo_id, revision=commit, local_files_only=local_only,
                                      allow_patterns=HUB_FILES + SAFETENSORS_FILES))
        if not any(path.glob("model*.safetensors")):
            path = Path(snapshot_download(repo_id, revision=commit, local_files_only=local_only,
                                          allow_patterns=BIN_FILES))
    except GatedRepoError as e:
        raise PermissionError(_login_help(repo_id, "is gated")) from e
    except RepositoryNotFoundError as e:
        raise ValueError(f"hub repo {repo_id!r} not found; {_login_help(repo_id, 'if it is private')}") from e
    except RevisionNotFoundError as e:
        raise ValueError(
            f"hub repo {repo_id!r} has no commit {commit} (its pin in models.PINS): download the repo "
            f"yourself (hf download {repo_id} --local-dir DIR) and pass DIR instead of its name") from e
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code in (401, 403):
            raise PermissionError(_login_help(repo_id, "needs authentication")) from e
        raise
    except LocalEntryNotFoundError as e:
        raise FileNotFoundError(
            f"cannot download {repo_id!r} and it is not in the Hugging Face cache (offline? HF_HUB_OFFLINE set?)"
        ) from e
    return path


def _login_help(repo_id: str, why: str) -> str:
    return (
        f"hub repo {repo_id!r} {why}: accept its licence on https://huggingface.co/{repo_id} with your account, "
        "then log in with `hf auth login` (or set HF_TOKEN to an access token) and run again"
    )
