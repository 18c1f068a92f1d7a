"""The compatibility report of a model update (MUSCLE section 3): report.json, .md and .png.

`compatibility_report` turns the prediction records of the old model, the new one and, if given,
the compatibility model into every metric of metrics.py per pair (old->new, old->compat) and the
relative change between the pairs (dNFR%). The report is "discrete" when every record has a
boolean `correct`, "continuous" (scores such as ROUGE-1) otherwise. No torch.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

import files
import predictions
import regressions
from metrics import (btc, correct_set_flips, expected_gain, expected_regression, gain_rate,
                     inconsistency_flips, nfr, nfr_ext, pfr, quadrants, regression_rate,
                     relative_change)

_DISCRETE = {"nfr": nfr, "pfr": pfr, "btc": btc}
_WITH_OUTPUTS = {"nfr_ext": nfr_ext, "inconsistency_flips": inconsistency_flips,
                 "correct_set_flips": correct_set_flips}
_CONTINUOUS = {"gain_rate": gain_rate, "regression_rate": regression_rate,
               "expected_gain": expected_gain, "expected_regression": expected_regression}
_LEVEL = {"discrete": "accuracy", "continuous": "mean_score"}


def _scores(records: list[dict], name: str) -> list[float]:
    """The per-instance `score`s of a continuous report: finite numbers, checked."""
    scores = [r.get("score") for r in records]
    for record, score in zip(records, scores):
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"{name}, id {record['id']!r}: without a boolean `correct` on every record "
                             f"the report needs a finite numeric `score`, got {score!r}")
    return [float(s) for s in scores]


def _pair(kind: str, old: list, other: list, old_out: list, other_out: list) -> dict:
    """Every metric of one update old -> other (correctness or scores, and outputs, per instance).

    `agreement` is the fraction of instances where both models give the same output.
    """
    pair = {f"delta_{_LEVEL[kind]}": float(np.mean(other) - np.mean(old)),
            "agreement": float(np.mean([a == b for a, b in zip(old_out, other_out)]))}
    if kind == "continuous":
        return pair | {key: f(old, other) for key, f in _CONTINUOUS.items()}
    pair |= {key: f(old, other) for key, f in _DISCRETE.items()}
    pair |= {key: f(old, other, old_out, other_out) for key, f in _WITH_OUTPUTS.items()}
    return pair | {"quadrants": quadrants(old, other)}


def compatibility_report(old: Sequence[dict], new: Sequence[dict], compat: Sequence[dict] | None = None,
                         sources: dict[str, str] | None = None, metric: str | None = None) -> dict:
    """The report.json content for an update old -> new and, if given, old -> compat.

    Records are matched by `id` (predictions.align). The report is "discrete" when every record has a boolean
    `correct` (accuracy, NFR, PFR, BTC, NFR_ext, flips, quadrant counts) and "continuous"
    otherwise (mean `score`, gain/regression rates and expectations, per-instance scores for the
    scatter plot). `sources` (role -> file name) labels error messages and the report; `metric`
    (the metric `correct` and `score` come from; None: the records' first) labels the report and
    picks the answers that agreement, NFR_ext and the regressions compare (predictions.answer:
    acc_norm's choice, the number an exact-match filter extracts).
    """
    runs = {"old": old, "new": new, **({"compat": compat} if compat is not None else {})}
    names = {role: f"{role} ({sources[role]})" if sources and role in sources else role for role in runs}
    aligned = predictions.align(runs, names)
    kind = ("discrete" if all(isinstance(r.get("correct"), bool) for rows in aligned.values() for r in rows)
            else "continuous")
    values = {role: [r["correct"] for r in rows] if kind == "discrete" else _scores(rows, names[role])
              for role, rows in aligned.items()}
    scored = metric or next(iter(predictions.metric_values(old[0])), None)
    outputs = {role: [predictions.answer(r, scored) for r in rows] for role, rows in aligned.items()}
    report: dict[str, Any] = {"task": aligned["old"][0]["task"], "n": len(aligned["old"]), "kind": kind}
    if metric:
        report["metric"] = metric
    if sources:
        report["sources"] = {role: str(sources[role]) for role in runs if role in sources}
    report["models"] = {role: {_LEVEL[kind]: float(np.mean(v))} for role, v in values.items()}
    report["pairs"] = {f"old->{role}": _pair(kind, values["old"], values[role], outputs["old"], outputs[role])
                       for role in runs if role != "old"}
    report["relative"] = {}
    if compat is not None:
        before, after = report["pairs"]["old->new"], report["pairs"]["old->compat"]
        report["relative"] = {key: relative_change(before[key], after[key]) for key in _metric_keys(kind)}
        report["paper"] = _paper_columns(report)
    report["other_metrics"] = _other_metrics(aligned, scored)
    if kind == "continuous":  # per-instance scores for the scatter plot of report.png
        report["scores"] = {"ids": [r["id"] for r in aligned["old"]], **values}
    report["regressions"] = regressions.collect(kind, aligned, values, outputs)
    return report


def _paper_columns(report: dict) -> dict[str, float | None]:
    """The columns of the paper's Tables 3-5: the accuracy (or mean score) change from M2 to Mc,
    acc(Mc) - acc(M2), and the relative change of the headline flip rate from (M1, M2) to (M1, Mc)."""
    level, models = _LEVEL[report["kind"]], report["models"]
    head = _TABLE[report["kind"]]["headline"][0]
    name = {"nfr": "dnfr_percent", "regression_rate": "dreg_percent"}[head]
    return {f"delta_{level}": models["compat"][level] - models["new"][level], name: report["relative"][head]}


def _other_metrics(aligned: dict[str, list[dict]], main: str | None) -> dict[str, dict]:
    """Accuracy, NFR and PFR under every other discrete metric all records have (multiple choice:
    acc_norm beside acc; GSM8K: flexible-extract beside strict-match)."""
    values = [predictions.metric_values(r) for rows in aligned.values() for r in rows]
    shared = [key for key in values[0] if key not in (main, "score,none")
              and all(key in v and v[key] in (0.0, 1.0) for v in values)]
    out = {}
    for key in shared:
        flags = {role: [predictions.metric_values(r)[key] == 1.0 for r in rows] for role, rows in aligned.items()}
        pairs = {f"old->{role}": {"nfr": nfr(flags["old"], f), "pfr": pfr(flags["old"], f)}
                 for role, f in flags.items() if role != "old"}
        out[key] = {"accuracy": {role: float(np.mean(f)) for role, f in flags.items()}, "pairs": pairs,
                    "dnfr_percent": relative_change(pairs["old->new"]["nfr"], pairs["old->compat"]["nfr"])
                    if "old->compat" in pairs else None}
    return out


def _metric_keys(kind: str) -> list[str]:
    return [*_DISCRETE, *_WITH_OUTPUTS] if kind == "discrete" else list(_CONTINUOUS)


# --- tables ---

_LABELS = {"nfr": "NFR", "pfr": "PFR", "btc": "BTC", "nfr_ext": "NFR_ext",
           "inconsistency_flips": "inconsistency flips", "correct_set_flips": "correct-set flips",
           "gain_rate": "gain rate", "regression_rate": "regression rate",
           "expected_gain": "expected gain", "expected_regression": "expected regression"}
# Main table: the paper's columns of Tables 3-5 (level, its change from new to compat, the headline
# flip rate and its relative change), then the other flip metrics, agreement with old, and the
# changes counted from old in points.
_TABLE = {
    "discrete": {"level": ("acc", "ΔAcc"), "headline": ("nfr", "NFR"),
                 "others": {"pfr": "PFR", "btc": "BTC", "nfr_ext": "NFR_ext", "agreement": "agree"}},
    "continuous": {"level": ("score", "ΔScore"), "headline": ("regression_rate", "Reg"),
                   "others": {"gain_rate": "Gain", "expected_gain": "E[gain]", "expected_regression": "E[reg]",
                              "agreement": "agree"}},
}
_LEGEND = {
    "discrete": "Percent. The paper's columns (Tables 3-5): ΔAcc = acc(compat) - acc(new), points; dNFR% = "
                "100 * (NFR(old, compat) - NFR(old, new)) / NFR(old, new). Others: agree = the same answer as old; "
                "dAcc(old) = acc - acc(old), points; dNFR = NFR(old, compat) - NFR(old, new), points; BTC: n/a "
                "when old has nothing right.",
    "continuous": "Percent (scores x 100). Reg/Gain: regression/gain rate; E[reg]/E[gain]: mean change when "
                  "one happens (n/a: none). The paper's columns (Table 5): ΔScore = score(compat) - "
                  "score(new), points; dReg% = relative change of Reg from old->new to old->compat. Others: "
                  "agree = the same output as old; dScore(old) = score - score(old), points; dReg = "
                  "Reg(old, compat) - Reg(old, new), points.",
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
    (level, paper_delta), (head_key, head) = spec["level"], spec["headline"]
    header = ["model", level, paper_delta, head, f"d{head}%", *spec["others"].values(),
              f"d{level.capitalize()}(old)", f"d{head}"]
    models = report["models"]
    rows = [["old", _pct(models["old"][level_key])] + [""] * (len(header) - 2)]
    reference = report["pairs"]["old->new"][head_key]
    for role in list(models)[1:]:
        pair, is_compat = report["pairs"][f"old->{role}"], role == "compat"
        paper = [_pct(models[role][level_key] - models["new"][level_key], signed=True) if is_compat else "",
                 _pct(pair[head_key]), _rel(report["relative"][head_key]) if is_compat else ""]
        rows.append([role, _pct(models[role][level_key]), *paper, *(_pct(pair[k]) for k in spec["others"]),
                     _pct(pair[delta_key], signed=True),
                     _pct(pair[head_key] - reference, signed=True) if is_compat else ""])
    return _table(header, rows)


def _other_metrics_table(report: dict) -> list[str]:
    """Accuracy and NFR under the records' other discrete metrics (acc_norm, flexible-extract)."""
    others = report.get("other_metrics") or {}
    if not others:
        return []
    roles, pairs = list(report["models"]), list(report["pairs"])
    header = ["metric", *(f"acc {r}" for r in roles), *(f"NFR {p}" for p in pairs),
              *(["dNFR%"] if "old->compat" in pairs else [])]
    rows = [[key, *(_pct(block["accuracy"][r]) for r in roles), *(_pct(block["pairs"][p]["nfr"]) for p in pairs),
             *([_rel(block["dnfr_percent"])] if "old->compat" in pairs else [])] for key, block in others.items()]
    return ["Other metrics of the records (percent)", "", *_table(header, rows), ""]


def format_report_md(report: dict, show: int = 10) -> str:
    """The report as markdown: main table, quadrant counts (discrete), the other metrics, every
    metric with its relative change, and the `show` worst regressions of each pair."""
    kind, pairs = report["kind"], report["pairs"]
    metric = f", {report['metric']}" if "metric" in report else ""
    lines = [f"## Compatibility report: {report['task']} ({kind}{metric}, N = {report['n']})", ""]
    sources = [f"- {role}: {path}" for role, path in report.get("sources", {}).items()]
    lines += [*sources, *([""] if sources else []), *_main_table(report), "", _LEGEND[kind], ""]
    if kind == "discrete":
        keys = ("both_correct", "positive_flip", "both_wrong", "negative_flip")
        lines += ["Quadrants (instance counts)", ""]
        lines += _table(["pair", *(k.replace("_", " ") for k in keys)],
                        [[name, *(str(pair["quadrants"][k]) for k in keys)] for name, pair in pairs.items()])
        lines.append("")
    lines += _other_metrics_table(report)
    has_compat = "old->compat" in pairs
    header = ["metric", *pairs, *(["relative change %"] if has_compat else [])]
    rows = [[_LABELS[key], *(_pct(pair[key]) for pair in pairs.values()),
             *([_rel(report["relative"][key])] if has_compat else [])] for key in _metric_keys(kind)]
    lines += ["All metrics (percent)", "", *_table(header, rows), ""]
    for name in pairs:
        lines += regressions.table(report.get("regressions", []), name, show)
    return "\n".join(lines).rstrip("\n") + "\n"


def format_report_text(report: dict, show: int = 10) -> str:
    """The report for a terminal: the same markdown, which reads fine as plain text."""
    return format_report_md(report, show)


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
    files.replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return True


def write_report(report: dict, out_dir: str | Path, show: int = 10) -> list[Path]:
    """Write report.json, report.md (with the `show` worst regressions per pair), regressions.jsonl
    (all of them) and, with matplotlib, report.png to out_dir, each atomically; the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.json", out / "report.md", out / "regressions.jsonl"]
    summary = {key: value for key, value in report.items() if key != "regressions"}
    files.write_text_atomic(written[0], json.dumps(summary, indent=2) + "\n")
    files.write_text_atomic(written[2], regressions.to_jsonl(report.get("regressions", [])))
    png = out / "report.png"
    png.unlink(missing_ok=True)  # a stale picture must not outlive the numbers it showed
    has_png = _write_png(report, png)
    note = "![quadrants and scores](report.png)" if has_png else PNG_HINT
    files.write_text_atomic(written[1], format_report_md(report, show) + "\n" + note + "\n")
    return written + [png] if has_png else written

