"""`python eval.py summary RUN_DIR... [--out DIR]`: many model updates in one table and one figure.

Each RUN_DIR is a finished train.py run (its `stage4_eval/m1.jsonl`, `m2.jsonl`, `mc.jsonl`, the
update named by its run_config.json) or a directory of predictions files named `m1`, `m2`,
`mc` or `old`, `new`, `compat` (`.jsonl`; eval.py's or harness sample files; the compatibility
model is optional). Every run is compared as `eval.py compare` does; the summary has one row per
(update, task): accuracy of old, new and compat, the paper's ΔAcc = acc(Mc) - acc(M2), NFR and
PFR of both pairs and dNFR%, as the paper's Tables 3-5, and a figure of NFR(M1, M2) against
NFR(M1, Mc) per row, as its Fig. 4. Continuous tasks put the mean score and the regression and
gain rates in the same columns; the `metric` column says which. No torch.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import cli
import compare
import files

NAMES = ({"old": "m1", "new": "m2", "compat": "mc"}, {"old": "old", "new": "new", "compat": "compat"})
PNG_HINT = "No summary.png: matplotlib is not installed (`pip install matplotlib`)."


def run_files(run_dir: Path) -> dict[str, str]:
    """role -> predictions file of one run directory (train.py --out or a folder of files)."""
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir} (pass train.py --out directories "
                                "or folders holding m1.jsonl, m2.jsonl[, mc.jsonl])")
    folder = run_dir / "stage4_eval" if (run_dir / "stage4_eval").is_dir() else run_dir
    for names in NAMES:
        paths = {role: folder / f"{name}.jsonl" for role, name in names.items()}
        if paths["old"].is_file() and paths["new"].is_file():
            return {role: str(p) for role, p in paths.items() if p.is_file()}
    raise FileNotFoundError(f"{folder} holds no m1.jsonl + m2.jsonl (or old.jsonl + new.jsonl): is the run "
                            "finished? Run its stage 4 (train.py --stage 4) or put the predictions files there")


def update_name(run_dir: Path) -> str:
    """"old -> new" from a train.py run's run_config.json, else the directory's name."""
    config = run_dir / "run_config.json"
    if config.is_file():
        flags = files.read_json(config)
        if "old" in flags and "new" in flags:
            return f"{flags['old']} -> {flags['new']}"
    return run_dir.resolve().name


def row(run_dir: Path, metric: str | None) -> dict[str, Any]:
    """One summary row: the run's compatibility report reduced to the paper's columns."""
    result = compare.build(run_files(run_dir), metric)
    discrete = result["kind"] == "discrete"
    level, flip, gain = ("accuracy", "nfr", "pfr") if discrete else ("mean_score", "regression_rate", "gain_rate")
    pairs, models = result["pairs"], result["models"]
    out: dict[str, Any] = {"run": str(run_dir), "update": update_name(run_dir), "task": result["task"],
                           "metric": result.get("metric"), "kind": result["kind"], "n": result["n"]}
    out |= {f"acc_{role}": models[role][level] if role in models else None for role in ("old", "new", "compat")}
    out["delta_acc"] = (models["compat"][level] - models["new"][level]) if "compat" in models else None
    for pair, short in (("old->new", "m1_m2"), ("old->compat", "m1_mc")):
        out[f"nfr_{short}"] = pairs[pair][flip] if pair in pairs else None
        out[f"pfr_{short}"] = pairs[pair][gain] if pair in pairs else None
    out["dnfr_percent"] = result["relative"].get(flip) if "old->compat" in pairs else None
    return out


COLUMNS = [("update", "update"), ("task", "task"), ("metric", "metric"), ("n", "N"), ("acc_old", "acc M1"),
           ("acc_new", "acc M2"), ("acc_compat", "acc Mc"), ("delta_acc", "ΔAcc"), ("nfr_m1_m2", "NFR(M1,M2)"),
           ("nfr_m1_mc", "NFR(M1,Mc)"), ("dnfr_percent", "dNFR%"), ("pfr_m1_m2", "PFR(M1,M2)"),
           ("pfr_m1_mc", "PFR(M1,Mc)")]
LEGEND = ("Percent. ΔAcc = acc(Mc) - acc(M2), points; dNFR% = 100 * (NFR(M1,Mc) - NFR(M1,M2)) / NFR(M1,M2). "
          "Continuous metrics: acc is the mean score, NFR the regression rate, PFR the gain rate.")


def _cell(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key == "dnfr_percent":
        return f"{value:+.2f}"
    if key == "delta_acc":
        return f"{100 * value:+.2f}"
    if isinstance(value, float):
        return f"{100 * value:.2f}"
    return str(value).replace("|", "\\|")


def format_md(rows: Sequence[dict]) -> str:
    """The summary table as markdown, one row per (update, task)."""
    lines = ["## Compatibility of model updates", "",
             "| " + " | ".join(label for _, label in COLUMNS) + " |",
             "| --- | --- | --- |" + " ---: |" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(_cell(key, r[key]) for key, _ in COLUMNS) + " |" for r in rows]
    return "\n".join(lines + ["", LEGEND]) + "\n"


def _write_png(rows: Sequence[dict], path: Path) -> bool:
    """Bars of NFR(M1, M2) and NFR(M1, Mc) per (update, task), dNFR% above each pair; False
    without matplotlib (an optional extra)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    fig = Figure(figsize=(max(4.0, 1.4 * len(rows) + 1.5), 4.2))
    ax = fig.subplots()
    x = list(range(len(rows)))
    before = [100 * r["nfr_m1_m2"] for r in rows]
    with_compat = [i for i in x if rows[i]["nfr_m1_mc"] is not None]
    after = {i: 100 * rows[i]["nfr_m1_mc"] for i in with_compat}
    ax.bar([i - 0.2 for i in x], before, width=0.4, color="tab:red", label="NFR(M1, M2)")
    ax.bar([i + 0.2 for i in with_compat], list(after.values()), width=0.4, color="tab:blue", label="NFR(M1, Mc)")
    for i in with_compat:
        if rows[i]["dnfr_percent"] is not None:
            ax.annotate(f"{rows[i]['dnfr_percent']:+.0f}%", (i, max(before[i], after[i])), ha="center", va="bottom")
    ax.set_xticks(x, [f"{r['update']}\n{r['task']}" for r in rows], fontsize=8)
    ax.set_ylabel("negative flip rate (%)")
    ax.legend()
    fig.tight_layout()
    files.replace_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    return True


def write(rows: Sequence[dict], out_dir: str | Path) -> list[Path]:
    """summary.json, summary.md and (with matplotlib) summary.png in out_dir, each atomically."""
    out = Path(out_dir)
    written = [out / "summary.json", out / "summary.md"]
    files.write_text_atomic(written[0], json.dumps({"rows": list(rows)}, indent=2, ensure_ascii=False) + "\n")
    png = out / "summary.png"
    png.unlink(missing_ok=True)  # a stale figure must not outlive the numbers it showed
    has_png = _write_png(rows, png)
    files.write_text_atomic(written[1], format_md(rows) + "\n" + ("![NFR per update](summary.png)" if has_png
                                                                   else PNG_HINT) + "\n")
    return written + [png] if has_png else written


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the summary table and write summary.json/.md/.png; a bad input is one `error:` line."""
    parser = argparse.ArgumentParser(
        prog="eval.py summary", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="NFR, PFR, accuracy and dNFR% of several model updates (the paper's Tables 3-5, Fig. 4).")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="train.py --out directories, or folders of m1/m2[/mc].jsonl (or old/new[/compat].jsonl)")
    parser.add_argument("--metric", default=None, help="metric of every run, as for compare (None: each task's first)")
    parser.add_argument("--out", default="summary", help="directory for summary.json, summary.md, summary.png")
    args = parser.parse_args(argv)
    try:
        files.check_writable(args.out, "--out", is_dir=True)
        rows = [row(Path(run), args.metric) for run in args.runs]
        print(format_md(rows))
        written = write(rows, args.out)
    except (OSError, ValueError) as error:
        return cli.fail(error)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
