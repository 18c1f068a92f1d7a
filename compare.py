"""`python eval.py compare OLD NEW [COMPAT] [--out DIR]`: the compatibility report on the command line.

Reads two or three predictions files (predictions.py), prints the report (report.py) and, with
--out, writes report.json, report.md and report.png. No torch, so comparing is quick anywhere.
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import files
import predictions
import report


def main(argv: Sequence[str] | None = None) -> int:
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
    paths = {role: getattr(args, role) for role in predictions.ROLES if getattr(args, role)}
    try:
        if args.out is not None:
            files.check_writable(args.out, "--out", is_dir=True)
        runs = {role: predictions.read_predictions(path) for role, path in paths.items()}
        result = report.compatibility_report(**runs, sources=paths)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    print(report.format_report_text(result))
    if args.out is None:
        print("(pass --out DIR to write report.json, report.md and report.png)")
        return 0
    try:
        written = report.write_report(result, args.out)
    except OSError as error:
        parser.error(f"cannot write the report to --out {args.out}: {error.strerror or error}")
    print("wrote " + ", ".join(str(p) for p in written))
    if not any(p.suffix == ".png" for p in written):
        print(report.PNG_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
