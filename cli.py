"""The command-line boundary of train.py and eval.py: flag values checked when they are parsed.

Every numeric flag has a range, checked by its argparse `type`, so a value that could only fail
hours later (an evaluation limit of 0 after three training stages, a temperature of 0 in stage 3)
ends the command at once, in argparse's own format (`error: argument --epochs: ...`, exit 2),
with the range and the fix. `short` cuts long values (a 50k-character data item) inside messages.

An error a user caused ends a command with one `error:` line (`fail`, exit 2) of at most a few
hundred characters; Ctrl-C outside a training loop ends it with one line too (`interrupted`,
exit 130, as a shell reports SIGINT).

No torch at import time: the compare command, which needs none, uses this module too.
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Callable

MAX_MESSAGE = 600  # characters of an error line: the start (what and where) and the end (the fix)


def short(value: object, limit: int = 80) -> str:
    """repr(value), its middle cut out when longer than `limit` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False, hint: str = "") -> Callable[[str], float]:
    """An argparse type: a `kind` (int or float) in [low, high] (open where said), finite.
    `hint` ends the message (what to pass instead)."""
    name = "an integer" if kind is int else "a number"
    bounds = [f"> {low}" if low_open else f">= {low}"] if low is not None else []
    bounds += [f"< {high}" if high_open else f"<= {high}"] if high is not None else []
    expected = f"{name} {' and '.join(bounds)}".strip()

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {name}{hint}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or too_low or too_high:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {expected}{hint}")
        return value
    return parse


POSITIVE_INT = number(int, 1)
NON_NEGATIVE_INT = number(int, 0)
POSITIVE_FLOAT = number(float, 0, low_open=True)
NON_NEGATIVE_FLOAT = number(float, 0)
LIMIT = number(int, 1, hint="; leave the flag out to use every item")


def device(text: str) -> str:
    """An argparse type for --device: a device torch knows and this machine has."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a torch device (cpu, cuda, cuda:1, "
                                         f"mps)") from None
    available = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
                 "mps": lambda: torch.backends.mps.is_available()}.get(dev.type, lambda: False)
    if not available():
        raise argparse.ArgumentTypeError(f"{text!r} is not available on this machine; pass "
                                         f"--device cpu, or leave --device out")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} "
                                         f"CUDA device(s), numbered from 0")
    return text


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """`text` with its middle cut out when longer than `limit`: the start says what and where,
    the end says the fix."""
    if len(text) <= limit:
        return text
    return f"{text[:limit * 2 // 3]} ... {text[-(limit // 3 - 5):]}"


def say(line: str) -> None:
    """Write `line` and its newline to stderr in one write: the ranks of a torchrun job share
    one stderr pipe, and a message written in two pieces (as `print` does) can interleave with
    another rank's, gluing two lines into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def fail(error: BaseException | str, status: int = 2) -> int:
    """Print the `error:` line (clipped) and return exit `status` (2, a wrong input, by default)."""
    say(f"error: {clip(str(error))}")
    return status


def interrupted(kept: str) -> int:
    """Print the one line of a Ctrl-C and return 130 (128 + SIGINT)."""
    say(f"interrupted (Ctrl-C); {kept}")
    return 130
