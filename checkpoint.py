"""Atomic training checkpoints: tensors in safetensors, everything else in JSON; never pickle.

Layout of a checkpoint root (one per training stage):

    root/ckpt-000007/{tensors.safetensors, state.json}   the newest checkpoint: the highest number
    root/ckpt-000006/                                    the one before it, kept

A new checkpoint is written into a temporary directory, flushed to disk and renamed to its final
name, so a numbered directory is always complete; then the checkpoints older than the previous
one are deleted. A crash, SIGKILL or full disk at any moment leaves the newest complete
checkpoint in place. A checkpoint that is unreadable all the same (a disk error, a file cut short
by a copy) is skipped on loading, with a message, for the one before it. Only the process that
calls `save` writes: under torchrun, rank 0 (the caller gathers sharded tensors first).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

import files

TENSORS = "tensors.safetensors"
STATE = "state.json"


def save(root: Path, tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> Path:
    """Write a new checkpoint, numbered after the newest; the previous one survives any failure here."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    older = _numbered(root)
    final = root / f"ckpt-{older[0][0] + 1 if older else 0:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-ckpt-", dir=root))
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / TENSORS))
        (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True), encoding="utf-8")
        for name in (TENSORS, STATE):
            files.fsync_file(tmp / name)
        os.replace(tmp, final)
    except Exception as e:  # noqa: BLE001 (safetensors reports a failed write as its own error)
        error = files.os_error(e)
        if error is None:
            raise
        kept = f"the previous checkpoint {older[0][1]} is intact" if older else "there was no earlier checkpoint"
        raise OSError(error.errno, f"{error.strerror} while writing a checkpoint in {root}; {kept}: "
                                   f"{files.fix_for(error.errno)} and rerun the same command to resume") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for _, old in older[1:]:  # the newest before this one stays, in case this one is damaged
        shutil.rmtree(old, ignore_errors=True)
    return final


def _numbered(root: Path) -> list[tuple[int, Path]]:
    """(number, directory) of the checkpoints under `root`, newest first."""
    found = []
    for path in root.glob("ckpt-*"):
        with contextlib.suppress(ValueError):
            found.append((int(path.name.split("-", 1)[1]), path))
    return sorted(found, reverse=True)


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    if not isinstance(state, dict):
        raise ValueError(f"{STATE} holds a {type(state).__name__}, not an object")
    return load_file(str(path / TENSORS)), state


def load(root: Path, note: Callable[[str], None] = print) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """(tensors, state) of the newest readable checkpoint under `root`, or None when there is none.

    A checkpoint that cannot be read (truncated tensors, broken state.json) is passed over for
    the one before it, and `note` says so; none readable means starting over, said too."""
    skipped = []
    for _, path in _numbered(Path(root)):
        try:
            found = _read(path)
        except (OSError, ValueError, SafetensorError) as e:  # JSONDecodeError is a ValueError
            skipped.append(f"{path} ({type(e).__name__}: {str(e)[:120]})")
            continue
        if skipped:
            note(f"warning: unreadable checkpoint {'; '.join(skipped)}: resuming from the one before it, "
                 f"{path} (step {found[1].get('step')})")
        return found
    if skipped:
        note(f"warning: no readable checkpoint in {root} ({'; '.join(skipped)}): the stage starts over")
    return None
