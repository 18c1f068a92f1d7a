"""Writing the files a run keeps: every write is atomic, and an output is checked before the work.

`replace_atomic` writes into a temporary file beside the target, flushes it to disk (fsync),
renames it over the target (os.replace, atomic on POSIX and Windows) and syncs the directory, so
a reader, a crash, SIGKILL or a full disk leaves the old content or the new one, never a fragment,
and a failed write leaves no temporary file behind. `append_line` adds one record to a log and
on failure cuts the file back to where it was, so a log never ends in half a record. Either
failing raises `WriteFailed`, which names the file, the cause and the fix; the file is unchanged.
`check_writable` tells before hours of scoring or training that an output path cannot be written.
`read_json` reads a JSON file and names the file, line and column of what is wrong with it.

No torch here: metrics.py (torch-free) writes its reports through it too.
"""
from __future__ import annotations

import errno
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable


FIXES = {errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
         errno.EACCES: "make its directory writable", errno.EPERM: "make its directory writable",
         errno.EROFS: "write to a file system that is not read-only"}


class WriteFailed(OSError):
    """Writing `path` failed (a full disk, a quota, a read-only place) and left the file as it
    was: the message names the file, the cause and the fix."""

    def __init__(self, path: Path, error: OSError):
        self.reason = error.strerror or str(error)
        super().__init__(error.errno, self.reason, str(path))
        self.path, self.fix = path, fix_for(error.errno)

    def __str__(self) -> str:
        return f"cannot write {self.path} ({self.reason}); the file is unchanged: {self.fix}, then rerun"


def fix_for(code: int | None) -> str:
    """What to do about a failed write with this errno."""
    return FIXES.get(code, "check the disk")


def os_error(error: BaseException) -> OSError | None:
    """`error` as an OSError, or None when it is none: safetensors reports a failed write as its
    own error ("I/O error: No space left on device (os error 28)"), which holds the errno."""
    if isinstance(error, OSError):
        return error
    found = re.search(r"\(os error (\d+)\)", str(error))
    if found is None:
        return None
    code = int(found.group(1))
    return OSError(code, os.strerror(code))


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

    Parent folders are created. Readers see the old or the new file, never a mix; a write that
    fails for the file system's sake (`os_error`) is a `WriteFailed` naming `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        fsync_file(tmp)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:  # noqa: BLE001 (safetensors raises its own error type for an OSError)
        error = os_error(e)
        if error is None or isinstance(e, WriteFailed):
            raise
        raise WriteFailed(path, error) from e
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Replace `path` with `text` (UTF-8) atomically."""
    return replace_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def append_line(path: str | os.PathLike, line: str) -> None:
    """Append one line (a newline is added) and flush it to disk; on failure (a full disk) the
    file is cut back to its previous end, so it never ends in a partial line (`WriteFailed`)."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            end = f.tell()
            try:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                f.truncate(end)
                raise
    except OSError as e:
        raise WriteFailed(Path(path), e) from e


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


def read_text(path: str | os.PathLike, fix: str = "") -> str:
    """The UTF-8 text of `path`; other bytes are a ValueError naming the file and the offset."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})"
                         f"{'; ' + fix if fix else ''}") from None


def read_json(path: str | os.PathLike, expected: type = dict, fix: str = "") -> Any:
    """The JSON value in `path`, of type `expected`; anything else is a ValueError naming the
    file (and the line and column of a syntax error), what was expected, and `fix`."""
    path = Path(path)
    fix = f"; {fix}" if fix else ""
    try:
        value = json.loads(read_text(path, fix[2:]))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}){fix}") from None
    if not isinstance(value, expected):
        names = {dict: "a JSON object", list: "a JSON array"}
        raise ValueError(f"{path}: expected {names.get(expected, expected.__name__)}, got "
                         f"{type(value).__name__}{fix}")
    return value
