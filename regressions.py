"""The regressed instances of a model update, worst first: what a user of the old model will notice.

Discrete metrics: the negative flips (old right, new wrong), each with the prompt, the gold
answer, both predictions, the choices' texts and both models' per-choice log-likelihoods where
the records have them (the paper's Fig. 1 is one such row). They rank by the new model's margin
for its wrong answer, log p(its choice) - log p(gold), so confident mistakes come first. Continuous scores:
every instance whose score fell, largest drop first. All rows go to regressions.jsonl; the report
shows the first few of each pair. No torch.
"""
from __future__ import annotations

import json
import os
from typing import Any, Sequence

CELL = 60  # characters of a prompt or a prediction shown in a table cell


def _margin(record: dict, answer: Any) -> float | None:
    """log p(answer) - log p(gold) under the record's model; None without log-likelihoods."""
    lls, gold = record.get("loglikelihoods"), record.get("gold")
    if not isinstance(lls, list) or not all(isinstance(i, int) and 0 <= i < len(lls) for i in (gold, answer)):
        return None
    return float(lls[answer] - lls[gold])


def _row(pair: str, role: str, old: dict, other: dict, answers: tuple[Any, Any]) -> dict[str, Any]:
    """One regressed instance: the answers the metric scores and, where they were extracted from
    generated text, the texts too."""
    row = {"pair": pair, "model": role, "id": old["id"], "prompt": old.get("prompt") or other.get("prompt"),
           "gold": old.get("gold", old.get("reference")), "old_prediction": answers[0],
           "model_prediction": answers[1]}
    choices = old.get("choices") or other.get("choices")
    if isinstance(choices, list) and all(isinstance(c, str) for c in choices):
        row["choices"] = choices
    for who, record, answer in (("old", old, answers[0]), ("model", other, answers[1])):
        if isinstance(record["prediction"], str) and record["prediction"] != answer:
            row[f"{who}_text"] = record["prediction"]
    for who, record in (("old", old), ("model", other)):
        if "loglikelihoods" in record:
            row[f"{who}_loglikelihoods"] = record["loglikelihoods"]
    return row


def collect(kind: str, aligned: dict[str, list[dict]], values: dict[str, list],
            answers: dict[str, list]) -> list[dict[str, Any]]:
    """Every regressed instance of every pair old -> other, worst first within each pair.

    `aligned` holds the matched records per role, `values` the per-instance correctness
    (discrete) or scores (continuous) the report counts, `answers` the outputs it compares.
    """
    rows = []
    for role in (r for r in aligned if r != "old"):
        pair, found = f"old->{role}", []
        for i, (old, other) in enumerate(zip(aligned["old"], aligned[role])):
            before, after = values["old"][i], values[role][i]
            if not ((before and not after) if kind == "discrete" else after < before):
                continue
            row = _row(pair, role, old, other, (answers["old"][i], answers[role][i]))
            found.append(row | ({"margin": _margin(other, answers[role][i])} if kind == "discrete" else
                                {"old_score": before, "model_score": after, "delta": after - before}))
        if kind == "discrete":  # rows with a margin first, largest first; the others in file order
            found.sort(key=lambda r: (r["margin"] is None, -(r["margin"] or 0.0)))
        else:
            found.sort(key=lambda r: r["delta"])
        rows += found
    return rows


def _cell(value: Any) -> str:
    """A value for one markdown table cell: one line, no pipes, at most CELL characters."""
    if value is None:
        return ""
    if isinstance(value, list):
        text = "[" + ", ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in value) + "]"
    else:
        text = str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    tail = CELL // 3  # the end of a long text: a question's last words, GSM8K's "#### 18"
    return text if len(text) <= CELL else text[:CELL - tail - 5] + " ... " + text[-tail:]


def _answer(row: dict, key: str) -> Any:
    """A choice index with the choice's text ("1: ...freeze it."), after the words every choice
    starts with, so that choices which differ only near their end (PIQA's solutions) show where
    they differ; the value as it is for generated text or records without the choices' texts."""
    index, choices = row[key], row.get("choices")
    if not (choices and isinstance(index, int) and not isinstance(index, bool) and 0 <= index < len(choices)):
        return index
    shared = os.path.commonprefix(choices)
    cut = shared.rfind(" ") + 1 if len(choices) > 1 else 0
    return f"{index}: {'...' if cut else ''}{choices[index][cut:]}"


def table(rows: Sequence[dict], pair: str, show: int) -> list[str]:
    """Markdown lines for the first `show` regressions of one pair (none: nothing)."""
    chosen = [r for r in rows if r["pair"] == pair]
    if not chosen or show <= 0:
        return []
    has_lls = any("model_loglikelihoods" in r for r in chosen)
    continuous = "delta" in chosen[0]
    model = pair.split("->")[1]
    header = ["id", "prompt (start)", "gold", "old", model]
    header += ["old score", "score", "change"] if continuous else []
    header += ["log-likelihoods old", f"log-likelihoods {model}", "margin"] if has_lls else []
    lines = [f"Worst regressions {pair} ({min(show, len(chosen))} of {len(chosen)}; all in regressions.jsonl)", "",
             "| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for r in chosen[:show]:
        cells = [r["id"], r["prompt"], *(_answer(r, key) for key in ("gold", "old_prediction", "model_prediction"))]
        if continuous:
            cells += [f"{100 * r['old_score']:.2f}", f"{100 * r['model_score']:.2f}", f"{100 * r['delta']:+.2f}"]
        if has_lls:
            margin = r.get("margin")
            cells += [r.get("old_loglikelihoods"), r.get("model_loglikelihoods"),
                      None if margin is None else f"{margin:.2f}"]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return lines + [""]


def to_jsonl(rows: Sequence[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
