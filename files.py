"""Writing the files a run keeps: every write is atomic, and an output is checked before the work.

`replace_atomic` writes into a temporary file beside the target, flushes it to disk (fsync),
renames it over the target (os.replace, atomic on POSIX and Windows) and syncs the directory, so
a reader, a crash, SIGKILL or a full disk leaves the old content or the new one, never a fragment,
and a failed write leaves no temporary file behind. `append_line` adds one record to a log and
on failure cuts the file back to where it was, so a log never ends in half a record.
`check_writable` tells before hours of scoring or training that an output path cannot be written.

No torch here: metrics.py (torch-free) writes its reports through it too.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable


def fsync_file(path: Path) -> None:
    """Flush a written file's content to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX); a no-op where directories cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Replace `path` by what `write(tmp)` writes into a temporary file of the same directory.

    Parent folders are created. Readers see the old or the new file, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically."""
    return replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) and flush it to disk; on failure (a full disk) the
    file is cut back to its previous end, so it never ends in a partial line."""
    with open(path, "a", encoding="utf-8") as f:
        end = f.tell()
        try:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
        except OSError:
            f.truncate(end)
            raise


def check_writable(path: str | os.PathLike, flag: str, is_dir: bool = False) -> Path:
    """`path` as an output of option `flag`: a file (or, with is_dir, a directory) that can be
    created or replaced. Raises a ValueError naming the flag and the fix when it cannot."""
    path = Path(path)
    kind = "directory" if is_dir else "file"
    if path.exists() and path.is_dir() != is_dir:
        raise ValueError(f"{flag} {path} is {'a file' if is_dir else 'a directory'}; "
                         f"{flag} takes a {kind} path: pass another {flag}")
    existing = path if path.exists() else next(p for p in path.parents if p.exists())
    if not existing.is_dir() and existing != path:
        raise ValueError(f"{flag} {path}: {existing} is a file, not a directory; pass another {flag}")
    target = existing if existing.is_dir() else existing.parent
    try:  # a real probe: permission bits say nothing for root or on a read-only mount
        tempfile.TemporaryFile(dir=target).close()
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot create a file in {target} ({e.strerror}); pass a "
                         f"{kind} in a directory you can write to") from None
    return path
