"""Stage 1 of train.py on real PIQA with SmolLM2-135M-Instruct on CPU: does the task adapter raise
PIQA accuracy on held-out items over the base model, beyond noise?

Each setting is one `python train.py --old D --new D --task piqa --stage 1 ...` run in a subprocess
(a finished run in RUNS/<setting> is reused: train.py skips completed stages), then the base model
and the base with the run's adapter score the first N items of PIQA's validation split (which no
training split holds). Base and adapter answer the same items, so the difference of their
accuracies is a paired difference: its standard error is the standard deviation of the per-item
differences (-1, 0, +1) over sqrt(N), which counts only the items that flip. A rise of more than
two standard errors is one a re-draw of the held-out items would rarely undo.

    python bench/real_piqa.py                          # every setting of SETTINGS, 1000 items
    python bench/real_piqa.py --settings test --held-out 200
    python bench/real_piqa.py --checkpoint D --runs /tmp/muscle-piqa

The checkpoint defaults to the one tests/test_real_model.py uses ($MUSCLE_CACHE or ~/.cache/muscle,
smollm2-135m-instruct, built by ../shared/tools/make_smollm2.py). Seeded: the figures do not depend
on the machine's load, only how long they take.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import common
import torch

common.setup()  # one thread: on a loaded 2-core machine two threads run 30x slower (bench/RESULTS.md)
import data  # noqa: E402  (needs the repo root on sys.path, set by common.setup)
import eval as evaluation  # noqa: E402
import lora  # noqa: E402
import models  # noqa: E402
import losses  # noqa: E402
import stage_data  # noqa: E402
import train_cli  # noqa: E402
from distributed import Dist  # noqa: E402

CHECKPOINT = Path(os.environ.get("MUSCLE_CACHE", Path.home() / ".cache" / "muscle")) / "smollm2-135m-instruct"
DATA_DIR = common.ROOT.parent / "shared" / "data"
COMMON = ["--task", "piqa", "--stage", "1", "--batch-size", "8", "--grad-accum", "1",
          "--warmup-steps", "2", "--max-len", "96", "--log-every", "5", "--save-every", "0"]
# name -> the flags that make it (on top of COMMON); "test" is tests/test_real_model.py's run.
SETTINGS = {
    "test": ["--limit-train", "400", "--epochs", "1", "--rank", "8", "--alpha", "16", "--lr", "1e-3"],
    "1600-r8-lr1e-3": ["--limit-train", "1600", "--epochs", "1", "--rank", "8", "--alpha", "16", "--lr", "1e-3"],
    "4000-r8-lr1e-3": ["--limit-train", "4000", "--epochs", "1", "--rank", "8", "--alpha", "16", "--lr", "1e-3"],
}


def run_stage1(checkpoint: Path, out: Path, flags: list[str]) -> float:
    """Run stage 1 into `out` (reused when finished); its best validation loss."""
    done = out / "stage1_task_old" / "DONE"
    if not done.is_file():
        cmd = [sys.executable, "train.py", "--old", str(checkpoint), "--new", str(checkpoint),
               "--data-dir", str(DATA_DIR), "--out", str(out), *COMMON, *flags]
        threads = {"OMP_NUM_THREADS": str(torch.get_num_threads())}  # the same count as this process
        subprocess.run(cmd, cwd=common.ROOT, check=True, stdout=subprocess.DEVNULL, env={**os.environ, **threads})
    return json.loads(done.read_text())["best_val_loss"]


def correct(model, tok, items) -> tuple[list[int], list[int]]:
    """Per item: 1 when acc (and acc_norm) picks the gold choice."""
    records = evaluation.evaluate(model, tok, "piqa", items)
    return [int(r["correct"]) for r in records], [int(r["correct_norm"]) for r in records]


def paired(base: list[int], new: list[int]) -> dict[str, float]:
    """Accuracies, the difference and its standard error, and the items gained and lost."""
    n = len(base)
    diffs = [b - a for a, b in zip(base, new)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    return {"base": sum(base) / n, "adapter": sum(new) / n, "diff": mean, "se": sd / math.sqrt(n),
            "gained": diffs.count(1), "lost": diffs.count(-1)}


def base_val_loss(model, checkpoint: Path, flags: list[str]) -> float:
    """The base model's loss on the validation sequences of a setting (stage 1's own split)."""
    args = train_cli.parse_args(["--old", str(checkpoint), "--new", str(checkpoint), "--data-dir",
                                str(DATA_DIR), "--out", "unused", *COMMON, *flags])
    td = stage_data.task_data(args, 1, Dist())
    with torch.no_grad():
        sums = [losses.ce_loss(model)(b) for b in td.val_batches(args.batch_size, Dist())]
    return sum(r.loss.item() for r in sums) / sum(r.tokens for r in sums)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=CHECKPOINT, help="default: %(default)s")
    p.add_argument("--runs", type=Path, default=common.CACHE / "real-piqa", help="default: %(default)s")
    p.add_argument("--held-out", type=int, default=1000,
                   help="first N PIQA validation items scored (default: %(default)s)")
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                   help="default: all")
    args = p.parse_args(argv)
    items = data.load_task("piqa", "validation", DATA_DIR)[:args.held_out]
    model, tok = models.load_model(args.checkpoint), models.load_tokenizer(args.checkpoint)
    base_path = args.runs / f"base-{len(items)}.json"
    if not base_path.is_file():
        args.runs.mkdir(parents=True, exist_ok=True)
        base_path.write_text(json.dumps(correct(model, tok, items)))
    base_acc, base_norm = json.loads(base_path.read_text())
    rows: dict[str, dict] = {}
    for name in args.settings:
        out = args.runs / name
        best = run_stage1(args.checkpoint, out, SETTINGS[name])
        lora.load_adapter(model, out / "stage1_task_old" / "adapter", name)  # and makes it active
        acc, norm = correct(model, tok, items)
        lora.set_adapter(model, None)
        row = {"setting": name, "flags": " ".join(SETTINGS[name]), "held_out": len(items),
               "val_loss_base": base_val_loss(model, args.checkpoint, SETTINGS[name]), "val_loss_a1": best,
               "acc": paired(base_acc, acc), "acc_norm": paired(base_norm, norm)}
        print(json.dumps(row), flush=True)
        results = args.runs / f"results-{len(items)}.json"
        rows = {**(json.loads(results.read_text()) if results.is_file() else {}), name: row}
        results.write_text(json.dumps(rows, indent=1))
    write_results(rows.values())


def cell(m: dict[str, float]) -> str:
    return (f"{m['base']:.3f} -> {m['adapter']:.3f} | {100 * m['diff']:+.1f} +- {100 * m['se']:.1f} "
            f"| +{m['gained']} -{m['lost']}")


def write_results(rows) -> None:
    """The section of bench/RESULTS.md: one row per setting measured on these held-out items."""
    header = ["setting (train.py flags besides COMMON)", "held-out items", "val loss base -> A1",
              "acc base -> A1", "acc diff (points) +- SE", "items gained / lost",
              "acc_norm base -> A1", "acc_norm diff +- SE", "gained / lost"]
    body = common.table(header, [[f"`{r['flags']}`", r["held_out"],
                                  f"{r['val_loss_base']:.3f} -> {r['val_loss_a1']:.3f}",
                                  cell(r["acc"]), cell(r["acc_norm"])] for r in rows])
    common.write_section("real_piqa", "Stage 1 on real PIQA with SmolLM2-135M-Instruct (CPU)",
                         f"`python bench/real_piqa.py`; COMMON: `{' '.join(COMMON)}`. SE: the paired "
                         f"standard error of the difference (same items for base and A1).\n\n{body}")


if __name__ == "__main__":
    main()
