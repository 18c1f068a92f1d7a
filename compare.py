"""`python eval.py compare OLD NEW [COMPAT]`: the compatibility report of a model update.

Reads two or three predictions files, eval.py's or lm-evaluation-harness sample files or a mix
(predictions.py), picks the metric (`--metric`, default the task's first metric: acc for
multiple choice, exact_match under strict-match for GSM8K, the score for summaries), prints the
report (report.py) and, with --out, writes report.json, report.md and report.png. No torch, so
comparing is quick anywhere.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import cli
import files
import predictions
import report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="eval.py compare", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Compatibility report of a model update (MUSCLE section 3). Each file is eval.py's "
                    "predictions JSONL or an lm-eval --log_samples file (samples_<task>_<date>.jsonl).")
    parser.add_argument("old", help="predictions of the old model (M1)")
    parser.add_argument("new", help="predictions of the new model (M2)")
    parser.add_argument("compat", nargs="?", help="predictions of the compatibility model (Mc)")
    parser.add_argument("--metric", default=None,
                        help="metric of the records, NAME or NAME,FILTER as the harness names them (acc, "
                             "acc_norm, exact_match,flexible-extract, score, ...). None: the task's first "
                             "metric (acc; exact_match,strict-match; score)")
    parser.add_argument("--show", type=int, default=10,
                        help="worst regressions per pair in the printed report and report.md "
                             "(all of them go to regressions.jsonl)")
    parser.add_argument("--out", default=None,
                        help="directory for report.json, report.md, report.png, regressions.jsonl (None: print only)")
    return parser.parse_args(argv)


def build(paths: dict[str, str], metric: str | None) -> dict:
    """The report of the runs in `paths` (role -> file) under `metric`."""
    names = {role: f"{role} ({path})" for role, path in paths.items()}
    runs = {role: predictions.read_run(path) for role, path in paths.items()}
    predictions.check_tasks(runs, names)
    key = predictions.resolve_metric(runs["old"], metric, names["old"])
    runs = predictions.with_metric(runs, key, names)
    return report.compatibility_report(**runs, sources=paths, metric=key)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: print the compatibility table; with --out DIR also write report.json/.md/.png there.

    Without --out nothing is written, so that comparing never overwrites an earlier report. A bad
    input ends with one `error:` line naming the file and the fix, exit status 2.
    """
    args = parse_args(argv)
    paths = {role: getattr(args, role) for role in predictions.ROLES if getattr(args, role)}
    if args.show < 0:
        return cli.fail(f"--show {args.show}: pass 0 or more regressions to show per pair")
    try:
        if args.out is not None:
            files.check_writable(args.out, "--out", is_dir=True)
        result = build(paths, args.metric)
    except (OSError, ValueError) as error:
        return cli.fail(error)
    print(report.format_report_text(result, args.show))
    if args.out is None:
        print("(pass --out DIR to write report.json, report.md, report.png and regressions.jsonl)")
        return 0
    try:
        written = report.write_report(result, args.out, args.show)
    except OSError as error:
        return cli.fail(f"cannot write the report to --out {args.out}: {error.strerror or error}")
    print("wrote " + ", ".join(str(p) for p in written))
    if not any(p.suffix == ".png" for p in written):
        print(report.PNG_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
