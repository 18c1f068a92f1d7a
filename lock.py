"""One process per run directory: a lock file that names its holder.

Two train.py processes on one --out would write each other's checkpoints and logs. `hold(dir)`
creates dir/.lock holding the pid, host and start time of the process, atomically (a complete
file is hard-linked into place, which fails if one exists), and removes it on exit. A second
process is refused with the holder's name. A lock whose process is gone (SIGKILL, power loss:
same host, no such pid) is stale and taken over, with a note. A pid alone can name a later
process (pids are reused, and a reboot starts them over), so on Linux the lock also keeps the
boot id and the process's start time (/proc/<pid>/stat, field 22): a live pid with another one
is another process, and the lock is stale too. Under torchrun rank 0 holds it for every rank
(`hold_on_main`). A teacher store being built is locked the same way (teacher_store.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

import cli
import distributed
import files
from distributed import Dist

NAME = ".lock"


def process_start(pid: int) -> str | None:
    """"<boot id>:<start time in clock ticks since boot>" of process `pid`, which no later process
    with the same pid shares; None where /proc does not tell (not Linux, no such process)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text(encoding="utf-8").strip()
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
    except OSError:
        return None
    # Field 2, the command name in parentheses, may hold spaces: count the fields after it.
    fields = stat.rsplit(")", 1)[-1].split()
    return f"{boot}:{fields[19]}" if len(fields) > 19 else None


def _alive(holder: dict) -> bool:
    """Whether the lock's process may still run: always, when it runs on another host; on this
    host, while its pid runs and (where both are known) started when the holder did."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user
        pass
    started, now = holder.get("started"), process_start(int(holder["pid"]))
    return started is None or now is None or started == now


def _holder(path: Path) -> dict | None:
    """The lock file's content, or None when it is gone or unreadable."""
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None


def _acquire(directory: Path, flag: str) -> Path:
    path = directory / NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(),
          "since": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "started": process_start(os.getpid()),
          "command": " ".join(sys.argv)[:300]}
    tmp = directory / f"{NAME}.{os.getpid()}"
    files.write_text_atomic(tmp, json.dumps(me) + "\n")  # a full disk: an error naming the file
    try:
        while True:
            try:
                os.link(tmp, path)
                return path
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and _alive(holder):
                    raise ValueError(
                        f"{flag} {directory} is in use by pid {holder['pid']} on {holder.get('host')} since "
                        f"{holder.get('since')} ({path}); wait for that run to end or stop it, or choose "
                        f"another {flag}. If no such process runs any more, delete {path}") from None
                if holder is not None:
                    cli.say(f"note: taking over the lock {path} of pid {holder['pid']}, which no longer runs")
                path.unlink(missing_ok=True)  # stale: retry (another process may win the race)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def hold(directory: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Hold the lock of `directory` (created if missing; removed again if it is left empty)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{flag} {directory} is a file, not a directory; choose a directory "
                         f"(nothing was changed)")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        path = _acquire(directory, flag)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                directory.rmdir()
        raise
    try:
        yield path
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # not empty: the run's files stay
                directory.rmdir()


@contextlib.contextmanager
def hold_on_main(directory: str | os.PathLike, env: Dist, flag: str = "--out") -> Iterator[None]:
    """`hold` under torchrun: rank 0 holds the lock of `directory`, and every rank stops with
    its error when it cannot."""
    error = None
    with contextlib.ExitStack() as stack:
        if env.main:
            try:
                stack.enter_context(hold(directory, flag))
            except ValueError as e:
                error = e
        if distributed.all_reduce_sum([float(error is not None)], env)[0]:
            raise error or ValueError(f"{flag} {directory} is in use by another run (rank 0 names it)")
        yield
