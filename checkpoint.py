"""Atomic training checkpoints: tensors in safetensors, everything else in JSON; never pickle.

Layout of a checkpoint root (one per training stage):

    root/ckpt-000007/{tensors.safetensors, state.json}   the newest complete checkpoint
    root/latest                                          "ckpt-000007", replaced atomically

A new checkpoint is written into a temporary directory, flushed to disk, renamed to its final
name, and only then does `latest` move to it (write a temp file + os.replace); older checkpoints
are deleted after that. A crash, SIGKILL or full disk at any moment leaves `latest` pointing at
a complete checkpoint. Only the process that calls `save` writes: under torchrun,
rank 0 (the caller gathers sharded tensors first).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import files

POINTER = "latest"
TENSORS = "tensors.safetensors"
STATE = "state.json"


def latest(root: Path) -> Path | None:
    """The newest complete checkpoint directory under `root`, or None."""
    pointer = Path(root) / POINTER
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text(encoding="utf-8").strip()
    return path if (path / STATE).is_file() else None


def save(root: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a new checkpoint and make it the latest; the previous one survives any failure here."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    previous = latest(root)
    number = int(previous.name.split("-")[1]) + 1 if previous else 0
    final = root / f"ckpt-{number:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        for name in (TENSORS, STATE):
            files.fsync_file(tmp / name)
        shutil.rmtree(final, ignore_errors=True)  # a leftover of a crash before `latest` moved
        os.replace(tmp, final)
        files.write_text_atomic(root / POINTER, final.name)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        kept = f"the previous checkpoint {previous} is intact" if previous else "there was no earlier checkpoint"
        raise OSError(e.errno, f"No space left on device while writing a checkpoint in {root}; {kept}: "
                               f"free some space and rerun the same command to resume") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob("ckpt-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load(root: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the latest checkpoint under `root`, or None when there is none."""
    path = latest(Path(root))
    if path is None:
        return None
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    return load_file(str(path / TENSORS)), state
