"""Compatibility metrics (MUSCLE section 3), task scores and the compatibility report.

Everything here works on per-instance lists (correctness, scores, outputs), so a report can be
recomputed from predictions files on any machine: no torch.

Conventions (see ../shared/PAPER.md, "Metrics"):
- Rates are fractions of the N instances, in [0, 1]; relative changes are percents.
- An undefined value (BTC when the old model gets nothing right, the expected gain when nothing
  gains, a relative change from 0) is None in JSON and "n/a" in tables, never a silent 0 or nan.
- The "output" that NFR_ext, inconsistency flips and correct-set flips compare is the record's
  `prediction`, compared exactly: the choice index for multiple choice, the generated text for
  generation. Raw text rather than the extracted answer because (a) the paper's quadrant-1 flip
  "within the ground-truth options" only exists for texts (two correct GSM8K answers always
  extract to the same number), and (b) equal texts always get equal correctness whatever
  extraction eval.py used, so NFR_ext - NFR = inconsistency flips holds by construction.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np

# --- task scores: GSM8K exact match (lm-evaluation-harness v0.4.3 gsm8k.yaml), ROUGE-1 ---

INVALID = "[invalid]"
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# The harness's `regexes_to_ignore`, applied in this order to prediction and reference alike,
# then lower-case (`ignore_case: true`).
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _regex_filter(pattern: re.Pattern, text: str, pick: int) -> str:
    """The harness's RegexFilter: match number `pick` of findall, first non-empty group, stripped."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[pick]
    if isinstance(match, tuple):  # several groups: the one that matched
        match = next((group for group in match if group), INVALID)
    return match.strip()


def extract_strict(text: str) -> str:
    """GSM8K "strict-match": the first `#### N` of the text, or "[invalid]"."""
    return _regex_filter(_STRICT, text, 0)


def extract_flexible(text: str) -> str:
    """GSM8K "flexible-extract": the last number-like run of the text, or "[invalid]"."""
    return _regex_filter(_FLEXIBLE, text, -1)


def normalize_answer(text: str) -> str:
    """Drop `,`, `$`, everything up to the last "#### " and a trailing `.`; lower-case."""
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(pred: str, ref: str) -> bool:
    """GSM8K exact match of an extracted answer against a reference (e.g. the full "... #### 18")."""
    return normalize_answer(pred) == normalize_answer(ref)


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer  # imported here: it pulls in nltk (~1 s), `compare` never needs it

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)


def rouge1(pred: str, ref: str, use_stemmer: bool = True) -> float:
    """ROUGE-1 F-measure of `pred` against `ref` (rouge-score, called score(reference, prediction)).

    Stemming defaults to on: the harness scores its summarisation tasks with use_stemmer=True and
    the paper does not say otherwise (../shared/EVAL_FORMATS.md, SAMSum).
    """
    return _rouge_scorer(use_stemmer).score(ref, pred)["rouge1"].fmeasure


# --- per-instance compatibility metrics ---

def _check_columns(*columns: Sequence) -> int:
    """The number of instances; the columns must be non-empty and describe the same instances."""
    lengths = [len(column) for column in columns]
    if lengths[0] == 0:
        raise ValueError("empty input: the metrics need at least one instance")
    if len(set(lengths)) > 1:
        raise ValueError(f"per-instance lists differ in length {lengths}: "
                         "they must describe the same instances in the same order")
    return lengths[0]


def _flags(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    _check_columns(old_correct, new_correct)
    return np.asarray(old_correct, dtype=bool), np.asarray(new_correct, dtype=bool)


def quadrants(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> dict[str, int]:
    """Counts of the four quadrants of the paper's Fig. 2 (old -> new)."""
    old, new = _flags(old_correct, new_correct)
    return {"both_correct": int(np.sum(old & new)), "positive_flip": int(np.sum(~old & new)),
            "both_wrong": int(np.sum(~old & ~new)), "negative_flip": int(np.sum(old & ~new))}


def nfr(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float:
    """Negative flip rate: the fraction right before the update and wrong after it."""
    old, new = _flags(old_correct, new_correct)
    return float(np.mean(old & ~new))


def pfr(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float:
    """Positive flip rate: the fraction wrong before the update and right after it."""
    old, new = _flags(old_correct, new_correct)
    return float(np.mean(~old & new))


def btc(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float | None:
    """Backward trust compatibility: #(both right) / #(old right); None when the old model has none right."""
    old, new = _flags(old_correct, new_correct)
    if not old.any():
        return None
    return float(np.sum(old & new) / np.sum(old))


def _changes(old_correct: Sequence[bool], new_correct: Sequence[bool],
             old_outputs: Sequence, new_outputs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correctness flags and 'the output changed' flags; equal outputs must be scored alike."""
    _check_columns(old_correct, new_correct, old_outputs, new_outputs)
    old, new = np.asarray(old_correct, dtype=bool), np.asarray(new_correct, dtype=bool)
    changed = np.array([a != b for a, b in zip(old_outputs, new_outputs)], dtype=bool)
    clash = np.flatnonzero(~changed & (old != new))
    if clash.size:
        raise ValueError(f"instances {clash[:5].tolist()} have the same output in both models but "
                         "different correctness: correctness must depend on the output only")
    return old, new, changed


def nfr_ext(old_correct: Sequence[bool], new_correct: Sequence[bool],
            old_outputs: Sequence, new_outputs: Sequence) -> float:
    """Extended NFR: the fraction where the new model is wrong and its output changed (section 3)."""
    _, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(~new & changed))


def inconsistency_flips(old_correct: Sequence[bool], new_correct: Sequence[bool],
                        old_outputs: Sequence, new_outputs: Sequence) -> float:
    """The fraction where both models are wrong but differently (quadrant 3, a changed mistake)."""
    old, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(~old & ~new & changed))


def correct_set_flips(old_correct: Sequence[bool], new_correct: Sequence[bool],
                      old_outputs: Sequence, new_outputs: Sequence) -> float:
    """The fraction where both are right with different outputs (quadrant 1; several valid answers)."""
    old, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(old & new & changed))


def score_deltas(old_scores: Sequence[float], new_scores: Sequence[float]) -> np.ndarray:
    """d_i = S(new output) - S(old output) per instance; d_i == 0 exactly is a tie."""
    _check_columns(old_scores, new_scores)
    return np.asarray(new_scores, dtype=float) - np.asarray(old_scores, dtype=float)


def gain_rate(old_scores: Sequence[float], new_scores: Sequence[float]) -> float:
    """The fraction of instances whose score rose (d_i > 0)."""
    return float(np.mean(score_deltas(old_scores, new_scores) > 0))


def regression_rate(old_scores: Sequence[float], new_scores: Sequence[float]) -> float:
    """The fraction of instances whose score fell (d_i < 0): the negative flips of generation."""
    return float(np.mean(score_deltas(old_scores, new_scores) < 0))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def expected_gain(old_scores: Sequence[float], new_scores: Sequence[float]) -> float | None:
    """The mean d_i over the gains (> 0): how much a gain is worth; None when nothing gains."""
    deltas = score_deltas(old_scores, new_scores)
    return _mean_or_none(deltas[deltas > 0])


def expected_regression(old_scores: Sequence[float], new_scores: Sequence[float]) -> float | None:
    """The mean d_i over the regressions (< 0, so a negative number); None when nothing regresses."""
    deltas = score_deltas(old_scores, new_scores)
    return _mean_or_none(deltas[deltas < 0])


def relative_change(before: float | None, after: float | None) -> float | None:
    """100 * (after - before) / before, e.g. dNFR% from NFR(M1, M2) to NFR(M1, Mc); None if before is 0."""
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (after - before) / before


# --- the compatibility report on prediction records (eval.py's JSON Lines) ---

ROLES = ("old", "new", "compat")
_DISCRETE = {"nfr": nfr, "pfr": pfr, "btc": btc}
_WITH_OUTPUTS = {"nfr_ext": nfr_ext, "inconsistency_flips": inconsistency_flips,
                 "correct_set_flips": correct_set_flips}
_CONTINUOUS = {"gain_rate": gain_rate, "regression_rate": regression_rate,
               "expected_gain": expected_gain, "expected_regression": expected_regression}
_LEVEL = {"discrete": "accuracy", "continuous": "mean_score"}


def _check_record(record: Any, where: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a prediction record must be a JSON object, got {type(record).__name__}")
    missing = [key for key in ("id", "task", "prediction") if key not in record]
    if missing:
        raise ValueError(f"{where}: prediction record lacks {missing} (eval.py writes id, task, "
                         "prediction, correct, score)")
    if not isinstance(record["id"], (str, int)):
        raise ValueError(f"{where}: id must be a string or an integer, got {record['id']!r}")


def _index(records: Sequence[dict], name: str) -> dict:
    """id -> record for one predictions file, checking it is non-empty, of one task, ids unique."""
    if not records:
        raise ValueError(f"{name}: no prediction records (empty input)")
    for number, record in enumerate(records, 1):
        _check_record(record, f"{name} record {number}")
    duplicates = [i for i, count in Counter(r["id"] for r in records).items() if count > 1]
    if duplicates:
        raise ValueError(f"{name}: {len(duplicates)} ids appear more than once, e.g. {duplicates[:3]}; "
                         "each instance must be predicted once")
    tasks = sorted({str(r["task"]) for r in records})
    if len(tasks) > 1:
        raise ValueError(f"{name}: records of several tasks {tasks}; compare one task at a time")
    return {r["id"]: r for r in records}


def _align(runs: dict[str, Sequence[dict]], names: dict[str, str]) -> dict[str, list[dict]]:
    """The records of every run, in the old run's order; same task and same ids everywhere."""
    indexes = {role: _index(records, names[role]) for role, records in runs.items()}
    old = indexes["old"]
    task = next(iter(old.values()))["task"]
    for role, index in indexes.items():
        other_task = next(iter(index.values()))["task"]
        if other_task != task:
            raise ValueError(f"{names[role]} holds task {other_task!r} but {names['old']} holds "
                             f"{task!r}: compare predictions of the same task")
        only_old = [i for i in old if i not in index]
        only_here = [i for i in index if i not in old]
        if only_old or only_here:
            raise ValueError(
                f"{names['old']} has {len(old)} records and {names[role]} has {len(index)}: "
                f"{len(only_old)} ids only in old (e.g. {only_old[:3]}), {len(only_here)} only in "
                f"{role} (e.g. {only_here[:3]}); compare predictions of the same instances")
    return {role: [index[i] for i in old] for role, index in indexes.items()}


def _scores(records: list[dict], name: str) -> list[float]:
    """The per-instance `score`s of a continuous report: finite numbers, checked."""
    scores = [r.get("score") for r in records]
    for record, score in zip(records, scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{name}, id {record['id']!r}: without a boolean `correct` on every record "
                             f"the report needs a finite numeric `score`, got {score!r}")
    return [float(s) for s in scores]


def _pair(kind: str, old: list, other: list, old_out: list, other_out: list) -> dict:
    """Every metric of one update old -> other (correctness or scores, and outputs, per instance)."""
    pair = {f"delta_{_LEVEL[kind]}": float(np.mean(other) - np.mean(old))}
    if kind == "continuous":
        return pair | {key: f(old, other) for key, f in _CONTINUOUS.items()}
    pair |= {key: f(old, other) for key, f in _DISCRETE.items()}
    pair |= {key: f(old, other, old_out, other_out) for key, f in _WITH_OUTPUTS.items()}
    return pair | {"quadrants": quadrants(old, other)}


def compatibility_report(old: Sequence[dict], new: Sequence[dict], compat: Sequence[dict] | None = None,
                         sources: dict[str, str] | None = None) -> dict:
    """The report.json content for an update old -> new and, if given, old -> compat.

    Records are matched by `id`. The report is "discrete" when every record has a boolean
    `correct` (accuracy, NFR, PFR, BTC, NFR_ext, flips, quadrant counts) and "continuous"
    otherwise (mean `score`, gain/regression rates and expectations, per-instance scores for the
    scatter plot). `sources` (role -> file name) only labels error messages and the report.
    """
    runs = {"old": old, "new": new, **({"compat": compat} if compat is not None else {})}
    names = {role: f"{role} ({sources[role]})" if sources and role in sources else role for role in runs}
    aligned = _align(runs, names)
    kind = ("discrete" if all(isinstance(r.get("correct"), bool) for rows in aligned.values() for r in rows)
            else "continuous")
    values = {role: [r["correct"] for r in rows] if kind == "discrete" else _scores(rows, names[role])
              for role, rows in aligned.items()}
    outputs = {role: [r["prediction"] for r in rows] for role, rows in aligned.items()}
    report: dict[str, Any] = {"task": aligned["old"][0]["task"], "n": len(aligned["old"]), "kind": kind}
    if sources:
        report["sources"] = {role: str(sources[role]) for role in runs if role in sources}
    report["models"] = {role: {_LEVEL[kind]: float(np.mean(v))} for role, v in values.items()}
    report["pairs"] = {f"old->{role}": _pair(kind, values["old"], values[role], outputs["old"], outputs[role])
                       for role in runs if role != "old"}
    report["relative"] = {}
    if compat is not None:
        before, after = report["pairs"]["old->new"], report["pairs"]["old->compat"]
        report["relative"] = {key: relative_change(before[key], after[key]) for key in _metric_keys(kind)}
    if kind == "continuous":  # per-instance scores for the scatter plot of report.png
        report["scores"] = {"ids": [r["id"] for r in aligned["old"]], **values}
    return report


def _metric_keys(kind: str) -> list[str]:
    return [*_DISCRETE, *_WITH_OUTPUTS] if kind == "discrete" else list(_CONTINUOUS)


# --- tables ---

_LABELS = {"nfr": "NFR", "pfr": "PFR", "btc": "BTC", "nfr_ext": "NFR_ext",
           "inconsistency_flips": "inconsistency flips", "correct_set_flips": "correct-set flips",
           "gain_rate": "gain rate", "regression_rate": "regression rate",
           "expected_gain": "expected gain", "expected_regression": "expected regression"}
# Main table in the spirit of the paper's Tables 3-5: level (acc or mean score) and its change
# from old, the headline flip metric with its change from old->new to old->compat, then the rest.
_TABLE = {
    "discrete": {"level": ("acc", "dAcc"), "headline": ("nfr", "NFR"),
                 "others": {"pfr": "PFR", "btc": "BTC", "nfr_ext": "NFR_ext"}},
    "continuous": {"level": ("score", "dScore"), "headline": ("regression_rate", "Reg"),
                   "others": {"gain_rate": "Gain", "expected_gain": "E[gain]", "expected_regression": "E[reg]"}},
}
_LEGEND = {
    "discrete": "Percent. dAcc: points from old; dNFR: points from old->new to old->compat; dNFR%: "
                "relative change; BTC: n/a when old has nothing right.",
    "continuous": "Percent (scores x 100). Reg/Gain: regression/gain rate; E[reg]/E[gain]: mean change "
                  "when one happens (n/a: none); dScore: points from old; dReg: points from old->new to "
                  "old->compat; dReg%: relative change.",
}
PNG_HINT = "No report.png: matplotlib is not installed (`pip install matplotlib`)."


def _pct(value: float | None, signed: bool = False) -> str:
    """A fraction as percent (or points) with 2 decimals; None is "n/a"."""
    if value is None:
        return "n/a"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def _rel(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| --- |" + " ---: |" * (len(header) - 1)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _main_table(report: dict) -> list[str]:
    spec, kind = _TABLE[report["kind"]], report["kind"]
    level_key, delta_key = _LEVEL[kind], f"delta_{_LEVEL[kind]}"
    head_key, head = spec["headline"]
    header = ["model", *spec["level"], head, f"d{head}", f"d{head}%", *spec["others"].values()]
    rows = [["old", _pct(report["models"]["old"][level_key])] + [""] * (len(header) - 2)]
    reference = report["pairs"]["old->new"][head_key]
    for role in list(report["models"])[1:]:
        pair = report["pairs"][f"old->{role}"]
        changes = (["", ""] if role == "new" else
                   [_pct(pair[head_key] - reference, signed=True), _rel(report["relative"][head_key])])
        rows.append([role, _pct(report["models"][role][level_key]), _pct(pair[delta_key], signed=True),
                     _pct(pair[head_key]), *changes, *(_pct(pair[k]) for k in spec["others"])])
    return _table(header, rows)


def format_report_md(report: dict) -> str:
    """The report as markdown: main table, quadrant counts (discrete), every metric with its relative change."""
    kind, pairs = report["kind"], report["pairs"]
    lines = [f"## Compatibility report: {report['task']} ({kind}, N = {report['n']})", ""]
    sources = [f"- {role}: {path}" for role, path in report.get("sources", {}).items()]
    lines += [*sources, *([""] if sources else []), *_main_table(report), "", _LEGEND[kind], ""]
    if kind == "discrete":
        keys = ("both_correct", "positive_flip", "both_wrong", "negative_flip")
        lines += ["Quadrants (instance counts)", ""]
        lines += _table(["pair", *(k.replace("_", " ") for k in keys)],
                        [[name, *(str(pair["quadrants"][k]) for k in keys)] for name, pair in pairs.items()])
        lines.append("")
    has_compat = "old->compat" in pairs
    header = ["metric", *pairs, *(["relative change %"] if has_compat else [])]
    rows = [[_LABELS[key], *(_pct(pair[key]) for pair in pairs.values()),
             *([_rel(report["relative"][key])] if has_compat else [])] for key in _metric_keys(kind)]
    lines += ["All metrics (percent)", "", *_table(header, rows)]
    return "\n".join(lines) + "\n"


def format_report_text(report: dict) -> str:
    """The report for a terminal: the same markdown, which reads fine as plain text."""
    return format_report_md(report)


# --- files: report.json, report.md, report.png ---

def _draw_quadrants(ax, counts: dict[str, int], target: str) -> None:
    """The paper's Fig. 2 layout: x = old wrong/right, y = target right (top) / wrong (bottom).

    The colour scale is 0..N in every panel, so panels of one report compare at a glance.
    """
    grid = [["positive_flip", "both_correct"], ["both_wrong", "negative_flip"]]
    n = sum(counts.values())
    ax.imshow([[counts[k] for k in row] for row in grid], cmap="Blues", vmin=0, vmax=n)
    for y, row in enumerate(grid):
        for x, key in enumerate(row):
            ax.text(x, y, f"{key.replace('_', ' ')}\n{counts[key]} ({100 * counts[key] / n:.1f}%)",
                    ha="center", va="center", color="darkred" if key == "negative_flip" else "black",
                    bbox={"facecolor": "white", "alpha": 0.85, "edgecolor": "none"})
    ax.set_xticks([0, 1], ["old wrong", "old right"])
    ax.set_yticks([0, 1], [f"{target} right", f"{target} wrong"])


def _draw_scatter(ax, old: list[float], other: list[float], target: str) -> None:
    """Per-instance old vs target scores: above the diagonal a gain, below it a regression."""
    deltas = np.asarray(other) - np.asarray(old)
    for label, chosen, colour in (("gain", deltas > 0, "tab:green"), ("tie", deltas == 0, "tab:gray"),
                                  ("regression", deltas < 0, "tab:red")):
        ax.scatter(np.asarray(old)[chosen], np.asarray(other)[chosen], c=colour, s=8, alpha=0.6,
                   label=f"{label} ({int(chosen.sum())})")
    low, high = min(min(old), min(other)), max(max(old), max(other))
    ax.plot([low, high], [low, high], color="black", linewidth=0.8)
    ax.set_aspect("equal")
    ax.set_xlabel("old score")
    ax.set_ylabel(f"{target} score")
    ax.legend(loc="upper left")


def _write_png(report: dict, path: Path) -> bool:
    """Draw one panel per pair; False when matplotlib is absent (it is an optional extra)."""
    try:
        from matplotlib.figure import Figure  # object API: no pyplot, no global backend switch
    except ImportError:
        return False
    pairs = list(report["pairs"])
    fig = Figure(figsize=(4.8 * len(pairs), 4.4))
    for ax, name in zip(fig.subplots(1, len(pairs), squeeze=False)[0], pairs):
        target = name.split("->")[1]
        if report["kind"] == "discrete":
            _draw_quadrants(ax, report["pairs"][name]["quadrants"], target)
        else:
            _draw_scatter(ax, report["scores"]["old"], report["scores"][target], target)
        ax.set_title(f"{report['task']}: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """Write report.json, report.md and (with matplotlib) report.png to out_dir; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    png = out / "report.png"
    png.unlink(missing_ok=True)  # a stale picture must not outlive the numbers it showed
    has_png = _write_png(report, png)
    note = "![quadrants and scores](report.png)" if has_png else PNG_HINT
    written[1].write_text(format_report_md(report) + "\n" + note + "\n", encoding="utf-8")
    return written + [png] if has_png else written


# --- command line: python eval.py compare OLD.jsonl NEW.jsonl [COMPAT.jsonl] [--out DIR] ---

def read_predictions(path: str | Path) -> list[dict]:
    """The prediction records of a JSON Lines file written by eval.py (blank lines skipped)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"predictions file not found: {path} (eval.py writes one per model)")
    records = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not valid JSON ({error.msg}); "
                                 "each line must be one prediction record") from None
            _check_record(record, f"{path}:{number}")
            records.append(record)
    return records


def compare_main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the compatibility table; with --out DIR also write report.json/.md/.png there.

    Without --out nothing is written, so that comparing never overwrites an earlier report.
    """
    parser = argparse.ArgumentParser(prog="eval.py compare",
                                     description="Compatibility report of a model update (MUSCLE section 3).")
    parser.add_argument("old", help="predictions JSONL of the old model (M1)")
    parser.add_argument("new", help="predictions JSONL of the new model (M2)")
    parser.add_argument("compat", nargs="?", help="predictions JSONL of the compatibility model (Mc)")
    parser.add_argument("--out", help="directory for report.json, report.md, report.png (default: print only)")
    args = parser.parse_args(argv)
    paths = {role: getattr(args, role) for role in ROLES if getattr(args, role)}
    try:
        runs = {role: read_predictions(path) for role, path in paths.items()}
        report = compatibility_report(**runs, sources=paths)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(format_report_text(report))
    if args.out is None:
        print("(pass --out DIR to write report.json, report.md and report.png)")
        return 0
    written = write_report(report, args.out)
    print("wrote " + ", ".join(str(p) for p in written))
    if not any(p.suffix == ".png" for p in written):
        print(PNG_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(compare_main())
