"""The model updates of the paper (appendix A.2, Table 8) by registry name, and one small real
update anyone can run on a laptop; `train.py --list-pairs` prints them.

MUSCLE as published distils logits token by token, so it trains an update whose two models
share one vocabulary. The four updates into Llama 3 change it (128,256 tokens against Llama 1/2's
and Vicuna's 32,000), which the paper leaves to future work (section 8): train.py refuses them
before downloading anything unless --cross-vocab asks for stage 3 across two vocabularies
(cross_vocab.py), and `eval.py` with `eval.py compare` measures their flips alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import data
import models

TRAINS = "trains"
CHANGES_VOCABULARY = "changes the vocabulary"


@dataclass(frozen=True)
class Pair:
    """One model update: `old` -> `new` registry names, where it comes from, and its status
    (TRAINS, or CHANGES_VOCABULARY: train.py needs --cross-vocab for it)."""
    old: str
    new: str
    source: str
    status: str = TRAINS


PAIRS: list[Pair] = [
    Pair("phi1", "phi1.5", "Table 8"),
    Pair("phi1", "phi2", "Table 8"),
    Pair("phi1.5", "phi2", "Table 8"),
    Pair("vicuna1.3", "vicuna1.5", "Table 8"),
    Pair("llama1", "llama2", "Table 8"),
    Pair("llama1", "vicuna1.5", "Table 8"),
    Pair("llama1", "vicuna1.3", "Table 8"),
    Pair("vicuna1.3", "llama2", "Table 8"),
    Pair("llama2", "vicuna1.5", "Table 8"),
    Pair("llama2", "llama3", "Table 8", CHANGES_VOCABULARY),
    Pair("llama1", "llama3", "Table 8", CHANGES_VOCABULARY),
    Pair("vicuna1.3", "llama3", "Table 8", CHANGES_VOCABULARY),
    Pair("vicuna1.5", "llama3", "Table 8", CHANGES_VOCABULARY),
    # Same architecture, new data and longer training: the paper's kind of update at 135M.
    Pair("smollm-135m", "smollm2-135m", "added: a 135M update for a laptop"),
]


def find(old: str, new: str) -> Pair | None:
    """The listed pair of two --old/--new spellings (registry names or their hub repos)."""
    def canonical(name: str) -> str:
        return models.REGISTRY.get(name, name)
    return next((p for p in PAIRS if (canonical(p.old), canonical(p.new)) ==
                 (canonical(old), canonical(new))), None)


def refusal(old: str, new: str) -> str | None:
    """Why train.py cannot train --old -> --new as is (without --cross-vocab), with how to
    measure its flips; None when it can (or when the pair is not listed: the vocabulary check
    then decides)."""
    pair = find(old, new)
    if pair is None or pair.status == TRAINS:
        return None
    return (f"--old {old} -> --new {new} {pair.status}: MUSCLE distils logits token by token and "
            f"needs one vocabulary for both (the paper leaves such updates to future work, "
            f"section 8), so nothing was started. Pass --cross-vocab fill to train it across the "
            f"two vocabularies, or measure its flips alone: python eval.py "
            f"--model {old} --task TASK --out m1.jsonl; python eval.py --model {new} --task TASK "
            f"--out m2.jsonl (each with --adapter DIR of a task adapter, if you have one); "
            f"python eval.py compare m1.jsonl m2.jsonl")


def _hub(name: str) -> str:
    repo = models.REGISTRY[name]
    pin = models.PINS.get(repo, models.Pin(None, "not in models.PINS"))
    return f"`{repo}@{pin.commit[:10]}`" if pin.commit else f"`{repo}` (unpinned: {pin.source})"


def table() -> str:
    """The pairs as a Markdown table (the README's table is this output)."""
    rows = ["| `--old` | `--new` | old repo @ commit | new repo @ commit | from | train.py |",
            "| --- | --- | --- | --- | --- | --- |"]
    for p in PAIRS:
        status = "trains as is" if p.status == TRAINS else f"needs `--cross-vocab`: {p.status}"
        rows.append(f"| `{p.old}` | `{p.new}` | {_hub(p.old)} | {_hub(p.new)} | {p.source} | {status} |")
    return "\n".join(rows)


def pins_table() -> str:
    """Every hub repository the code downloads, its pinned commit and where public code names it
    (the README's table of pins is this output)."""
    rows = ["| repository | kind | commit | seen in |", "| --- | --- | --- | --- |"]
    for repo, pin in models.PINS.items():
        rows.append(f"| `{repo}` | model | {f'`{pin.commit}`' if pin.commit else 'unpinned'} | {pin.source} |")
    for copy in data.HUB.values():
        rows.append(f"| `{copy.repo}` | data set | `{copy.revision}` | {copy.source} |")
    return "\n".join(rows)
