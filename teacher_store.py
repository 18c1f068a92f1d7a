"""The teachers' outputs on disk: stage 3 without the old model in memory (train.py --teachers store).

Stage 3's teachers, M1 = v1 + A1 and M2 = v2 + A2, are frozen and run in eval mode, so what they
say about a training token is the same in every epoch and in every stage-3 run that differs only
in --mask, --temperature, --ce-weight or the student's seed. One pass of each teacher over the
training and validation splits writes, for every real label position, the fields of
`muscle.TeacherFields` (top-k token ids and log-probabilities at T = 1, the log-mass of the
other tokens, the label's log-probability, the argmax); stage 3 then loads only base v2 with the
compatibility adapter and reads the teachers back (`muscle.stored_muscle_loss_chunked`). Offline
distillation at scale stores teacher outputs the same way (Megatron-LM's offline logits
distillation, MaxText's stored top-k teacher logits).

A store directory:

    building.json                    what is being built (a description), while it is built
    old/train-00000.safetensors      M1's fields for training examples 0 .. SHARD_EXAMPLES - 1
    new/validation-00000.safetensors M2's fields for the first validation examples, ...
    manifest.json                    written last: the description and each shard's size, sha256

The description names what produced the store: the sha256 of each base checkpoint's weight files,
of each adapter and of the tokenizer files, the task, seed, training limit, --max-len, dtype, k
and each split's example count and sha256 of its token ids and labels. A store serves a run whose
description is the same, with a k of at most the store's (`TeacherFields.top` cuts it exactly);
anything else is refused with what differs. Shards are checked against the manifest's sizes and
hashes before any is used, so a truncated, missing or foreign shard never becomes a target.

A shard holds the fields of its examples' real label positions in order (ids and argmax int32,
the rest float32, as computed in fp32 from the teacher's logits) with `keys` (the examples' keys,
stage_data.Batches') and `offsets` (where each example's positions start). Each is written to a temp
file, fsynced and renamed, and built from the same examples in the same batches whatever came
before: a build killed at any point resumes with the shards it lacks, deletes the temp file it was
writing, and ends with the bytes of an uninterrupted build. One run builds a store at a time (it
holds the store's lock, lock.py): another run given the same --teacher-store meanwhile is refused
with the builder's name, and reads the store once it is complete. Under torchrun rank r builds
shards r, r + W, ... with a whole copy of one teacher at a time (M1, freed, then M2), rank 0 holds
the lock and writes the manifest, and every rank reads the store.
"""
from __future__ import annotations

import gc
import hashlib
import json
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

import align
import data
import distributed
import files
import lock
import models
import muscle
from distributed import Dist

SHARD_EXAMPLES = 1024  # examples per shard file
FORMAT = 1
MANIFEST, BUILDING = "manifest.json", "building.json"
ROLES = ("old", "new")  # M1, M2
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")
FIELDS = muscle.TeacherFields._fields
DISK_DTYPE = {"ids": torch.int32, "logp": torch.float32, "tail": torch.float32,
              "label_logp": torch.float32, "top1": torch.int32}


# ============================================================================ description


def sha256_files(paths: Sequence[Path]) -> str:
    """One sha256 over the contents of `paths`, in order (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def examples_sha256(examples: Sequence[data.Example]) -> str:
    """sha256 of a split's token ids and labels: another tokenizer, data or split differs here."""
    return hashlib.sha256(json.dumps(examples).encode()).hexdigest()


def describe(weights: dict[str, Sequence[Path]], adapters: dict[str, Path],
             tokenizer_files: dict[str, Sequence[Path]], splits: dict[str, Sequence[data.Example]],
             top_k: int, vocab_size: int, run: dict,
             old_tokens: align.TeacherTokens | None = None) -> dict:
    """What a store of these teachers (role -> weight files, adapter directory, tokenizer
    files) on these splits holds; `run` adds the flags that made the splits (task, seed, ...),
    `old_tokens` M1's own tokens where its tokenizer gives other ids (align.py)."""
    return {
        "format": FORMAT,
        **{role: {"weights_sha256": sha256_files(weights[role]),
                  "adapter_sha256": sha256_files([adapters[role] / "adapter_model.safetensors"]),
                  "tokenizer_sha256": sha256_files(tokenizer_files[role])}
           for role in ROLES},
        "old_tokens_sha256": None if old_tokens is None else examples_sha256(
            [old_tokens.train, old_tokens.val]),
        **run,
        "top_k": min(top_k, vocab_size),
        "splits": {name: {"examples": len(ex), "label_tokens": sum(real_count(e) for e in ex),
                          "sha256": examples_sha256(ex)} for name, ex in splits.items()},
    }


def real_count(example: data.Example) -> int:
    """Label positions of one example that carry a loss (labels are shifted by one)."""
    return sum(y != muscle.IGNORE_INDEX for y in example[1][1:])


def differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    """'key: X there, Y now' for every field of two descriptions that differs (nested keys
    dotted); a store's k may be larger than the one asked for."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif key == "top_k" and not prefix and isinstance(a, int) and isinstance(b, int):
            if a < b:
                out.append(f"top_k: {a} there, fewer than the {b} asked for now")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} there, {_short(b)} now")
    return out


def _short(value) -> str:
    """Hashes cut to 12 characters in messages."""
    return repr(value[:12] + "...") if isinstance(value, str) and len(value) == 64 else repr(value)


def check_description(path: Path, saved: dict, now: dict) -> None:
    """Refuse a store whose description (in file `path`) differs from this run's."""
    diff = differences(saved, now)
    if diff:
        raise ValueError(f"teacher store {path} was built for another run ({'; '.join(diff)}); "
                         f"pass --teacher-store with another directory, or delete "
                         f"{path.parent} to build it for this run")


# ============================================================================ building


class Shard(NamedTuple):
    name: str  # "train-00000.safetensors"
    index: int  # position in the list of all shards (rank index % world builds it)
    keys: list[int]  # example keys (stage_data.Batches)
    examples: list[data.Example]
    old_rows: list[align.Row] | None  # M1's own tokens of the examples, where they differ


def shards(splits: dict[str, Sequence[data.Example]], shard_examples: int = SHARD_EXAMPLES,
           old_tokens: align.TeacherTokens | None = None) -> list[Shard]:
    """Every shard of a store, in order; keys count training examples first, then validation."""
    out, key = [], 0
    for split, examples in splits.items():
        rows = None if old_tokens is None else old_tokens.train if split == "train" else old_tokens.val
        for i, start in enumerate(range(0, len(examples), shard_examples)):
            part = list(examples[start:start + shard_examples])
            out.append(Shard(f"{split}-{i:05d}.safetensors", len(out),
                             list(range(key + start, key + start + len(part))), part,
                             None if rows is None else rows[start:start + shard_examples]))
        key += len(examples)
    return out


@torch.no_grad()
def teacher_outputs(model: nn.Module, examples: Sequence[data.Example], pad_id: int, k: int,
                    batch_size: int, chunk_size: int, rows: Sequence[align.Row] | None = None,
                    rows_pad_id: int = 0) -> tuple[muscle.TeacherFields, list[int]]:
    """The teacher's fields at every real label position of `examples` (in order), and how many
    positions each example has; with `rows`, the teacher reads its own tokens of the examples
    and its outputs are gathered at their positions (align.teacher_hidden_states). Batches of
    similar lengths, each projected `chunk_size` positions at a time, as the chunked losses do;
    the same examples always make the same batches."""
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))
    per_example: list[muscle.TeacherFields | None] = [None] * len(examples)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = data.collate([examples[i] for i in chunk], pad_id)
        if rows is not None:
            batch.update(align.collate([rows[i] for i in chunk], rows_pad_id, batch["input_ids"].shape[1]))
        batch = {n: t.to(device) for n, t in batch.items()}
        hidden = align.teacher_hidden_states(model, batch)[:, :-1]
        labels = batch["labels"][:, 1:]
        real = labels != muscle.IGNORE_INDEX
        h, y = hidden[real], labels[real]
        parts = [muscle.teacher_fields(model.lm_head(h[i:i + chunk_size]), y[i:i + chunk_size], k)
                 for i in range(0, len(y), chunk_size)]
        fields = muscle.TeacherFields(*(torch.cat(f).cpu() for f in zip(*parts)))
        for row, piece in zip(chunk, zip(*(f.split(real.sum(1).tolist()) for f in fields))):
            per_example[row] = muscle.TeacherFields(*piece)
    counts = [len(f.top1) for f in per_example]
    return muscle.TeacherFields(*(torch.cat(f) for f in zip(*per_example))), counts


def write_shard(path: Path, fields: muscle.TeacherFields, keys: list[int], counts: list[int],
                fingerprint: str) -> None:
    """One shard, atomically (temp file, fsync, rename); `fingerprint` ties it to its store."""
    tensors = {name: getattr(fields, name).to(DISK_DTYPE[name]).contiguous() for name in FIELDS}
    tensors["keys"] = torch.tensor(keys, dtype=torch.int64)
    tensors["offsets"] = torch.tensor([0, *counts], dtype=torch.int64).cumsum(0)
    files.replace_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata={"store": fingerprint}))


def fingerprint(description: dict) -> str:
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()


def build(root: Path, description: dict, splits: dict[str, Sequence[data.Example]],
          teachers: dict[str, Callable[[], nn.Module]], pad_id: int, env: Dist = Dist(),
          batch_size: int = 8, chunk_size: int = 256, shard_examples: int = SHARD_EXAMPLES,
          log: Callable[[str], None] = print, old_tokens: align.TeacherTokens | None = None) -> None:
    """Build the store of `description` in `root`, or finish an interrupted build; nothing to do
    when it is complete. `teachers[role]()` loads that teacher (eval mode), only when this rank
    has shards of it left to write; it is freed before the next one is loaded. M1 reads
    `old_tokens` where given (its own tokenizer's ids, align.py)."""
    root = Path(root)
    if not (root / MANIFEST).is_file():
        with lock.hold_on_main(root, env, "--teacher-store"):  # one build of a store at a time
            if not (root / MANIFEST).is_file():  # another run may have finished it meanwhile
                _build(root, description, splits, teachers, pad_id, env, batch_size, chunk_size,
                       shard_examples, log, old_tokens)
    check_description(root / MANIFEST, _read_json(root / MANIFEST)["description"], description)


def _build(root: Path, description: dict, splits: dict[str, Sequence[data.Example]],
           teachers: dict[str, Callable[[], nn.Module]], pad_id: int, env: Dist, batch_size: int,
           chunk_size: int, shard_examples: int, log: Callable[[str], None],
           old_tokens: align.TeacherTokens | None) -> None:
    """`build` of an incomplete store, while this run holds its lock."""
    _start(root, description, env)
    description = _read_json(root / BUILDING)  # an earlier build's k (>= this run's) wins
    k, mark = description["top_k"], fingerprint(description)
    todo = [s for s in shards(splits, shard_examples, old_tokens) if s.index % env.world == env.rank]
    for role in ROLES:
        missing = [s for s in todo if not (root / role / s.name).is_file()]
        if not missing:
            continue
        model = teachers[role]()
        for n, shard in enumerate(missing):
            rows = shard.old_rows if role == "old" else None
            fields, counts = teacher_outputs(model, shard.examples, pad_id, k, batch_size, chunk_size,
                                             rows, old_tokens.pad_id if old_tokens else 0)
            write_shard(root / role / shard.name, fields, shard.keys, counts, mark)
            log(f"teacher store: {role}/{shard.name} written ({n + 1}/{len(missing)} on this rank)")
        del model
        gc.collect()
    distributed.barrier(env)
    if env.main:
        written = [f"{role}/{s.name}" for role in ROLES for s in shards(splits, shard_examples)]
        index = {rel: {"bytes": (root / rel).stat().st_size, "sha256": sha256_files([root / rel])}
                 for rel in written}
        files.write_text_atomic(root / MANIFEST, json.dumps(
            {"description": description, "shards": index}, indent=1) + "\n")
        (root / BUILDING).unlink()
    distributed.barrier(env)


def _start(root: Path, description: dict, env: Dist) -> None:
    """Record what is being built, or check that an interrupted build was of the same store and
    delete the temp files a kill left in it (no other process writes there: the lock)."""
    if (root / BUILDING).is_file():
        check_description(root / BUILDING, _read_json(root / BUILDING), description)
    elif root.is_dir() and any(p.name != lock.NAME for p in root.iterdir()):
        raise ValueError(f"--teacher-store {root} is not empty and holds no {MANIFEST} or "
                         f"{BUILDING}, so it is not a teacher store; choose another directory "
                         f"(nothing was deleted)")
    distributed.barrier(env)
    if env.main:
        for tmp in root.rglob(".*.tmp-*"):  # files.replace_atomic's temp files
            tmp.unlink()
        if not (root / BUILDING).is_file():
            files.write_text_atomic(root / BUILDING, json.dumps(description, indent=1) + "\n")
    distributed.barrier(env)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete {path.parent} to build the "
                         f"teacher store again") from e


def open_store(root: Path, bases: dict[str, Path], adapters: dict[str, Path],
               splits: dict[str, Sequence[data.Example]], top_k: int, run: dict,
               load: Callable[[str], nn.Module], pad_id: int, env: Dist = Dist(),
               batch_size: int = 8, chunk_size: int = 256,
               old_tokens: align.TeacherTokens | None = None) -> TeacherStore:
    """The store of the teachers (role -> base checkpoint directory, adapter directory) on these
    splits, built first when it is not complete (`load(role)` gives a teacher in eval mode);
    `old_tokens`: M1's own tokens where they differ from the splits' (align.py)."""
    tokenizers = {role: [d / name for name in TOKENIZER_FILES if (d / name).is_file()]
                  for role, d in bases.items()}
    description = describe({role: models.weight_files(d) for role, d in bases.items()}, adapters,
                           tokenizers, splits, top_k, models.read_config(bases["new"])["vocab_size"],
                           run, old_tokens)
    build(root, description, splits, {role: partial(load, role) for role in ROLES}, pad_id, env,
          batch_size, chunk_size, log=print if env.main else lambda line: None,
          old_tokens=old_tokens)
    return TeacherStore(root, description, top_k)


# ============================================================================ reading


class TeacherStore:
    """A complete store, checked against this run's description and the manifest's shard
    hashes, held in host memory; `batch_fields` gives a training batch's teachers."""

    def __init__(self, root: Path, description: dict, top_k: int):
        root = Path(root)
        if not (root / MANIFEST).is_file():
            raise ValueError(f"{root} holds no {MANIFEST}: the teacher store is not complete; "
                             f"rerun stage 3 to finish building it")
        manifest = _read_json(root / MANIFEST)
        check_description(root / MANIFEST, manifest["description"], description)
        self.top_k = top_k
        self.fields: dict[str, muscle.TeacherFields] = {}
        self.index: dict[int, tuple[int, int]] = {}  # key -> (first position, count), both roles
        for role in ROLES:
            parts = [_load_shard(root, rel, info)
                     for rel, info in manifest["shards"].items() if rel.startswith(f"{role}/")]
            self.fields[role] = muscle.TeacherFields(*(torch.cat([p[n] for p in parts])
                                                       for n in FIELDS))
            self._index(parts, root / role)

    def _index(self, parts: list[dict[str, torch.Tensor]], where: Path) -> None:
        """Key -> (first position, count); both teachers must give every example the same."""
        index, first = {}, 0
        for p in parts:
            for key, start, end in zip(p["keys"].tolist(), p["offsets"][:-1].tolist(),
                                       p["offsets"][1:].tolist()):
                index[key] = (first + start, end - start)
            first += int(p["offsets"][-1])
        if self.index and index != self.index:
            raise ValueError(f"teacher store shards in {where} index other examples than the "
                             f"other teacher's; delete {where.parent} to build it again")
        self.index = index

    def batch_fields(self, batch: dict) -> tuple[muscle.TeacherFields, muscle.TeacherFields]:
        """(M1, M2) fields of a batch (stage_data.Batches: input ids, labels, example keys), at the
        aligned positions [B, T - 1] on the batch's device; zero where there is no label."""
        labels = batch["labels"][:, 1:].cpu()
        real = labels != muscle.IGNORE_INDEX
        source = []
        for row, key in enumerate(batch["index"].tolist()):
            count = int(real[row].sum())
            start, stored = self.index.get(key, (0, 0)) if key >= 0 else (0, 0)
            if key >= 0 and stored != count:
                raise ValueError(f"teacher store has {stored} label positions for example {key}, "
                                 f"the batch {count}: the store was built from other data")
            source.append(torch.arange(start, start + count))
        source = torch.cat(source)
        out = []
        for role in ROLES:
            stored = self.fields[role]
            fields = []
            for name in FIELDS:
                values = getattr(stored, name)[source]
                full = values.new_zeros(*real.shape, *values.shape[1:])
                full[real] = values
                fields.append(full.to(batch["labels"].device, torch.int64 if name in ("ids", "top1")
                                      else torch.float32))
            out.append(muscle.TeacherFields(*fields).top(self.top_k))
        return out[0], out[1]


def _load_shard(root: Path, rel: str, info: dict) -> dict[str, torch.Tensor]:
    """A shard's tensors after checking its size and sha256 against the manifest."""
    path = root / rel
    if not path.is_file():
        raise ValueError(f"teacher store shard {path} is missing (listed in {root / MANIFEST}); "
                         f"delete {root} to build the store again")
    size = path.stat().st_size
    if size != info["bytes"]:
        raise ValueError(f"teacher store shard {path} has {size} bytes, {info['bytes']} in "
                         f"{root / MANIFEST}: it is truncated or was replaced; delete {root} to "
                         f"build the store again")
    if sha256_files([path]) != info["sha256"]:
        raise ValueError(f"teacher store shard {path} does not match its sha256 in "
                         f"{root / MANIFEST}: it is corrupt or from another store; delete {root} "
                         f"to build the store again")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read teacher store shard {path} ({e}); delete {root} to build "
                         f"the store again") from e
