"""The built-in toy model update: tiny base models toy-v1 -> toy-v2 (and toy-v3) of the toy world, its two tasks.

Why it exists: a newcomer's first command must run all of MUSCLE (the paper, Sec. 4: task adapters on the old
and new base, the compatibility adapter, the report) on a laptop CPU with nothing downloaded. So the
project builds its own model update on first use, deterministically from a seed.

The update (the paper's Table 8 in miniature). v1 is a Llama pre-trained briefly (600 steps) on one
sample of the corpus; v2 is a Phi as wide, of the same vocabulary, pre-trained twice as long on
another sample. What a model knows is what it memorised or inferred from its corpus, so v2 knows
more, but not everything v1 knew: the update moves which instances each model gets right (negative
flips, the paper's Sec. 3). MUSCLE needs the same vocabulary, not the same architecture.

toy-v3 reads the world through another tokenizer (toy_vocab.py: two-syllable names in two pieces,
other ids), so toy-v1 -> toy-v3 is an update that changes the vocabulary, for MUSCLE across
vocabularies (train.py --cross-vocab). It is a Phi as wide as v2 that reads a corpus sample twice
as large for twice as many steps, as Llama 3 read more text than Llama 2 through its new
tokenizer: facts bind less easily to names in pieces, so v3 needs more reading than v2 to know
more than v1.

What this toy shows (`train.py @configs/toy-mc.args`; the figures are in the README): v2 is more
accurate than v1, yet gets wrong some items v1 got right, and the paper's mask removes part of
those negative flips. The control mask new_only (stage 3 without M1) separates what stage 3 gains
by training v2 more from what it gains by following M1 where the student is wrong. The flips no
adapter can undo are facts of test-only creatures that v1 memorised and v2 never read.

Checkpoints are ordinary Hugging Face directories (config.json, model.safetensors, tokenizer.json,
tokenizer_config.json) under $MUSCLE_CACHE or ~/.cache/muscle/toy, written atomically (temp dir +
os.replace) with a manifest of sha256 sums; a missing or corrupt directory is rebuilt. The world,
its corpus, its tasks' items and its tokenizers are in toy_world.py.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import data
import models
import toy_vocab
import toy_world


# ------------------------------------------------------------------------------------- the base models
@dataclass(frozen=True)
class BaseSpec:
    """One toy base model: architecture (config.json keys), its corpus sample and its pre-training."""

    model_type: str  # "llama" | "phi"
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    n_sentences: int  # corpus sample size
    corpus_seed: int
    steps: int
    batch_size: int = 32
    seq_len: int = 32
    lr: float = 3e-3
    p_qa: float = 0.0  # share of facts written as question + answer (see `toy_world.corpus`)
    seed: int = 0
    attribute_weights: dict[str, float] = field(default_factory=dict)

    def hf_config(self, vocab_size: int) -> dict[str, Any]:
        """config.json in Hugging Face's keys for the family (read back by models.build_model)."""
        common = {"model_type": self.model_type, "vocab_size": vocab_size, "hidden_size": self.hidden_size,
                  "intermediate_size": 4 * self.hidden_size, "num_hidden_layers": self.num_hidden_layers,
                  "num_attention_heads": self.num_attention_heads,
                  "num_key_value_heads": self.num_attention_heads, "max_position_embeddings": 128,
                  "bos_token_id": toy_world.SPECIALS.index(toy_world.BOS),
                  "eos_token_id": toy_world.SPECIALS.index(toy_world.EOS),
                  "pad_token_id": toy_world.SPECIALS.index(toy_world.PAD), "tie_word_embeddings": False,
                  "torch_dtype": "float32", "rope_theta": 10000.0}
        if self.model_type == "llama":
            return {**common, "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
                    "rms_norm_eps": 1e-6}
        return {**common, "architectures": ["PhiForCausalLM"], "hidden_act": "gelu_new",
                "layer_norm_eps": 1e-5, "partial_rotary_factor": 0.5, "qk_layernorm": False}


@dataclass(frozen=True)
class Scenario:
    """A world and the base models pre-trained on it; v3 reads the world through toy_vocab's
    tokenizer (two-syllable names in two pieces, other ids), so toy-v1 -> toy-v3 changes the vocabulary."""

    world: toy_world.WorldConfig
    v1: BaseSpec
    v2: BaseSpec
    v3: BaseSpec


SCENARIOS: dict[str, Scenario] = {
    # The default update (measured in the README): v1 a Llama pre-trained briefly on a large sample,
    # v2 a Phi as wide, pre-trained twice as long on another sample. Both read facts only as
    # statements (p_qa 0), so answering the tasks' questions is a skill that fine-tuning teaches
    # (see `toy_world.corpus`). v3 (another tokenizer) reads a sample twice as large as v2's
    # for twice as many steps.
    "default": Scenario(
        world=toy_world.WorldConfig(),
        v1=BaseSpec("llama", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                    n_sentences=40000, corpus_seed=2, steps=600),
        v2=BaseSpec("phi", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                    n_sentences=20000, corpus_seed=1, steps=1200),
        v3=BaseSpec("phi", hidden_size=96, num_hidden_layers=2, num_attention_heads=4,
                    n_sentences=40000, corpus_seed=1, steps=2400),
    ),
    # Seconds to build, for the test suite (MUSCLE_TOY_SIZE=micro): same code path, no claims.
    "micro": Scenario(
        world=toy_world.WorldConfig(n_creatures=24),
        v1=BaseSpec("llama", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    n_sentences=800, corpus_seed=2, steps=4, batch_size=8, seq_len=16),
        v2=BaseSpec("phi", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    n_sentences=400, corpus_seed=1, steps=6, batch_size=8, seq_len=16),
        v3=BaseSpec("phi", hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                    n_sentences=400, corpus_seed=1, steps=6, batch_size=8, seq_len=16),
    ),
}
TOY_MODELS: dict[str, str] = {"toy-v1": "v1", "toy-v2": "v2", "toy-v3": "v3"}  # name -> Scenario field


def scenario(size: str | None = None) -> tuple[str, Scenario]:
    """The scenario named by `size`, else $MUSCLE_TOY_SIZE, else "default"."""
    size = size or os.environ.get("MUSCLE_TOY_SIZE") or "default"
    if size not in SCENARIOS:
        raise ValueError(f"MUSCLE_TOY_SIZE={size!r} is not a toy scenario; choose one of {sorted(SCENARIOS)}")
    return size, SCENARIOS[size]


def cache_root() -> Path:
    return Path(os.environ.get("MUSCLE_CACHE") or Path.home() / ".cache" / "muscle" / "toy")


# ------------------------------------------------------------------------------------- pre-training
def _windows(stream, n: int, seq_len: int, rng: random.Random, bos_id: int):
    """n random windows of the token stream, each starting with BOS (as task sequences do)."""
    import torch

    starts = [rng.randrange(len(stream) - seq_len) for _ in range(n)]
    x = torch.tensor([[bos_id] + stream[s:s + seq_len - 1] for s in starts], dtype=torch.long)
    return x


def _lm_loss(model, x):
    """(summed next-token cross-entropy, number of predicted tokens): the loss `trainer.fit` expects."""
    import torch.nn.functional as F

    logits = model(x)[:, :-1]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1), reduction="sum")
    return loss, x[:, 1:].numel()


def pretrain(spec: BaseSpec, creatures: list[toy_world.Creature], tok, run_dir: Path, desc: str):
    """A freshly initialised model of `spec` trained on its corpus sample with `trainer.fit`."""
    import torch

    import trainer

    torch.manual_seed(spec.seed)
    model = models.build_model(spec.hf_config(tok.get_vocab_size()), source=desc)
    sentences = toy_world.corpus(creatures, spec.n_sentences, spec.corpus_seed, spec.p_qa,
                       spec.attribute_weights or None)
    text = " ".join(sentences)
    stream = tok.encode(text).ids
    bos = tok.token_to_id(toy_world.BOS)
    rng = random.Random(spec.corpus_seed)
    batches = [_windows(stream, spec.batch_size, spec.seq_len, rng, bos) for _ in range(spec.steps)]
    val = [_windows(stream, spec.batch_size, spec.seq_len, rng, bos) for _ in range(2)]
    # No gradient clipping: the high learning rate of from-scratch pre-training is what lets a model
    # this small memorise facts in few steps.
    cfg = trainer.FitConfig(epochs=1, lr=spec.lr, warmup_steps=max(1, spec.steps // 20), weight_decay=0.01,
                            grad_accum=1, max_grad_norm=0.0, log_every=50, seed=spec.seed)
    params = dict(model.named_parameters())
    # One thread: float sums reduce in a thread-count-dependent order, and over 1000 steps that
    # changes which facts a model ends up knowing. Pinned, every machine with the same torch build
    # builds the same bytes, so the README's numbers reproduce.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trainer.fit(model, params, lambda x: _lm_loss(model, x), lambda epoch: batches, val, cfg, run_dir,
                    desc=desc)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# ------------------------------------------------------------------------------------- the cache
MANIFEST = "manifest.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def recipe(size: str, which: str) -> str:
    """A fingerprint of everything a checkpoint is built from: a changed recipe means a rebuild."""
    _, sc = scenario(size)
    parts = [asdict(sc.world), asdict(getattr(sc, which))] + ([toy_vocab.RECIPE] if which == "v3" else [])
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def is_valid(ckpt_dir: Path, expected_recipe: str) -> bool:
    """The directory holds exactly what its manifest lists, byte for byte, for this recipe."""
    try:
        manifest = json.loads((ckpt_dir / MANIFEST).read_text())
        return manifest["recipe"] == expected_recipe and all(
            _sha256(ckpt_dir / name) == digest for name, digest in manifest["files"].items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def write_checkpoint(model, tok, hf_config: dict[str, Any], out_dir: Path, recipe_id: str) -> None:
    """An ordinary HF checkpoint directory (+ manifest.json with the files' sha256)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True)
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(out_dir / "tokenizer.json"))
    config = toy_world.tokenizer_config(hf_config["max_position_embeddings"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    files = sorted(p.name for p in out_dir.iterdir())
    manifest = {"recipe": recipe_id, "files": {name: _sha256(out_dir / name) for name in files}}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")


def build(name: str, out_dir: Path, size: str | None = None) -> None:
    """Pre-train toy model `name` and write it to `out_dir` (which must not exist)."""
    size, sc = scenario(size)
    which = TOY_MODELS[name]
    spec: BaseSpec = getattr(sc, which)
    creatures = toy_world.build_world(sc.world)
    tok = (toy_world.build_syllable_tokenizer if which == "v3" else toy_world.build_tokenizer)(creatures)
    with tempfile.TemporaryDirectory(prefix=f"{name}-fit-") as run_dir:
        model = pretrain(spec, creatures, tok, Path(run_dir), desc=f"pre-train {name} ({size})")
    write_checkpoint(model, tok, spec.hf_config(tok.get_vocab_size()), out_dir, recipe(size, which))


def ensure_model(name: str, size: str | None = None) -> Path:
    """The checkpoint directory of toy model `name`, built on first use or when missing/corrupt.

    Built in a temporary directory beside the final one and moved into place with os.replace, so
    an interrupted build never leaves a half-written checkpoint where a reader would take it.
    """
    if name not in TOY_MODELS:
        raise ValueError(f"{name!r} is not a toy model; choose one of {sorted(TOY_MODELS)}")
    size, _ = scenario(size)
    root = cache_root() / size
    final = root / name
    expected = recipe(size, TOY_MODELS[name])
    if is_valid(final, expected):
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-build-", dir=root))
    try:
        build(name, staging / name, size)
        if final.exists():  # stale or corrupt: move it aside first, os.replace cannot overwrite a directory
            os.replace(final, staging / "old")
        os.replace(staging / name, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


# ------------------------------------------------------------------------------------- task registry
SPLITS = ("train", "test")


def load_items(task: str, split: str, size: str | None = None) -> list:
    """The items of a toy task's split, for the scenario's world (the same one the models read)."""
    if split not in SPLITS:
        raise ValueError(f"{task} has no split {split!r}; choose one of {list(SPLITS)}")
    _, sc = scenario(size)
    creatures = toy_world.split_creatures(toy_world.build_world(sc.world), sc.world)[split]
    if task == "toy-mc":
        return toy_world.mc_items(creatures, split, sc.world.seed)
    return toy_world.gen_items(creatures, split)


def register() -> None:
    """Add toy-mc and toy-gen to data.TASKS and the toy bases to models.BUILDERS (idempotent)."""
    data.register_task(data.Task("toy-mc", "multiple_choice", "test", _loader("toy-mc")))
    # Answers are "#### N" with N one token: at most 4 new tokens ("####", N, EOS and one spare).
    data.register_task(data.Task("toy-gen", "generation", "test", _loader("toy-gen"), metric="exact_match",
                                 max_new_tokens=4, stop=("Question:", toy_world.EOS)))
    for name in TOY_MODELS:
        models.register_builder(name, ensure_model)


@dataclass(frozen=True)
class _loader:
    """data.Task's loader for a toy task; a dataclass so that re-registering compares equal."""

    task: str

    def __call__(self, split: str, data_dir=None) -> list:
        return load_items(self.task, split)


register()  # importing toy makes its tasks and models known to data and models


# ------------------------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    """`python toy.py [NAME ...]`: build the toy bases if needed and print each one's sha256."""
    import argparse

    p = argparse.ArgumentParser(
        prog="toy.py", description="Build the toy bases (if not cached) and print, per base, the sha256 of its "
        "weights (model.safetensors) and its directory. Two machines built the same toy world when the sums agree.")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"toy bases (default: all of {', '.join(TOY_MODELS)})")
    p.add_argument("--size", choices=sorted(SCENARIOS), default=None,
                   help="scenario (default: $MUSCLE_TOY_SIZE, else 'default')")
    args = p.parse_args(argv)
    unknown = sorted(set(args.names) - set(TOY_MODELS))
    if unknown:
        p.error(f"unknown toy base {unknown[0]!r}; choose from {', '.join(TOY_MODELS)}")
    for name in args.names or TOY_MODELS:
        path = ensure_model(name, args.size)
        print(f"{name}  {_sha256(path / 'model.safetensors')}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
