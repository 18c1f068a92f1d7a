"""The built-in toy update (toy-v1 -> toy-v2) over several seeds and masking strategies.

Reproduces the table in the README (the default scenario, each seed and the mean) and the toy
version of the paper's Table 6 (section 6.5: one row per `--mask`) in bench/RESULTS.md:

    python bench/toy_results.py                      # paper's mask, seeds 0 1 2
    python bench/toy_results.py --masks all          # the ablation, every mask of muscle.MASKS
    python bench/toy_results.py --masks all --teachers store   # the same from one teacher store

Each run is `python train.py @configs/toy-mc.args --seed S --mask M --out RUNS/SECTION/M/sS` in
a subprocess (a finished run is reused: train.py skips completed stages), so the numbers are
exactly what the README's first command prints. Stages 1-2 do not depend on the mask: they run
once per seed (in RUNS/task-adapters/sS) and every mask's run starts from a copy of them. With
`--teachers store` every run of a seed reads one teacher store (RUNS/teacher-store/sS), built by
the first, so the teachers run once per seed for all masks; build it with the largest --top-k
first, as a store serves any k up to its own. The seed moves the 80/20 split, the data order and
the LoRA initialisation; the two base models are the same built-in checkpoints in every run.
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import common

common.setup()
import muscle  # noqa: E402  (needs the repo root on sys.path, set by common.setup)

ARGS_FILE = common.ROOT / "configs" / "toy-mc.args"
COLUMNS = ["acc M1", "acc M2", "acc Mc", "NFR(M1,M2)", "NFR(M1,Mc)", "dNFR%", "PFR(M1,Mc)", "NFR_ext(M1,Mc)"]


def train(seed: int, out: Path, extra: list[str]) -> None:
    cmd = [sys.executable, "train.py", f"@{ARGS_FILE}", "--seed", str(seed), "--out", str(out), *extra]
    subprocess.run(cmd, cwd=common.ROOT, check=True, stdout=subprocess.DEVNULL)


def task_adapters(seed: int, runs: Path, extra: list[str]) -> Path:
    """Stages 1-2 of `seed` (A1, A2), run once and shared by every mask's run."""
    out = runs / "task-adapters" / f"s{seed}"
    for stage in ("1", "2"):
        train(seed, out, [*extra, "--stage", stage])
    return out


def run(seed: int, mask: str, runs: Path, section: str, extra: list[str]) -> dict:
    """One full pipeline run (or the finished one already in its --out); its report.json."""
    out = runs / section / mask / f"s{seed}"
    if not out.exists():
        shared = task_adapters(seed, runs, extra)
        out.mkdir(parents=True)
        for name in ("run_config.json", "stage1_task_old", "stage2_task_new"):
            (shutil.copytree if (shared / name).is_dir() else shutil.copy)(shared / name, out / name)
    store = ["--teacher-store", str(runs / "teacher-store" / f"s{seed}")] if "store" in extra else []
    train(seed, out, ["--mask", mask, *store, *extra])
    return json.loads((out / "stage4_eval" / "report.json").read_text())


def figures(report: dict) -> list[float]:
    """The COLUMNS of one report, in percent."""
    models, new, compat = report["models"], report["pairs"]["old->new"], report["pairs"]["old->compat"]
    acc = [100 * models[role]["accuracy"] for role in ("old", "new", "compat")]
    nfr_new, nfr_compat = 100 * new["nfr"], 100 * compat["nfr"]
    return [*acc, nfr_new, nfr_compat, 100 * (nfr_compat - nfr_new) / nfr_new,
            100 * compat["pfr"], 100 * compat["nfr_ext"]]


def mean_row(rows: list[list[float]]) -> list[float]:
    """Column means; dNFR% of the mean NFRs (not the mean of the per-seed ratios)."""
    mean = [statistics.mean(col) for col in zip(*rows)]
    mean[5] = 100 * (mean[4] - mean[3]) / mean[3]
    return mean


def fmt(values: list[float]) -> list[str]:
    return [f"{v:+.1f}" if i == 5 else f"{v:.2f}" for i, v in enumerate(values)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--masks", nargs="+", default=["student_correct"],
                   help=f"'all' or names from {sorted(muscle.MASKS)}")
    p.add_argument("--runs", type=Path, default=Path("runs/toy-results"), help="where the runs go")
    p.add_argument("--section", default=None,
                   help="bench/RESULTS.md section (and runs subdirectory); None: toy_default for "
                        "one mask, toy_ablation for several")
    args, extra = p.parse_known_args(argv)  # anything else goes to train.py
    masks = sorted(muscle.MASKS) if args.masks == ["all"] else args.masks
    key = args.section or ("toy_ablation" if len(masks) > 1 else "toy_default")
    per_seed_rows, ablation_rows = [], []
    for mask in masks:
        rows = [figures(run(seed, mask, args.runs, key, extra)) for seed in args.seeds]
        mean = mean_row(rows)
        per_seed_rows += [[mask, f"seed {s}", *fmt(r)] for s, r in zip(args.seeds, rows)]
        per_seed_rows.append([mask, "**mean**", *fmt(mean)])
        ablation_rows.append([mask, *fmt(mean)])
        print(f"{mask}: " + ", ".join(f"{c} {v}" for c, v in zip(COLUMNS, fmt(mean))), flush=True)
    section = f" --section {args.section}" if args.section else ""
    body = (f"Command: `python bench/toy_results.py --masks {' '.join(args.masks)}{section}"
            f"{' ' + ' '.join(extra) if extra else ''}` (each run: `python train.py @configs/toy-mc.args "
            f"--seed S --mask M`), seeds {args.seeds}, percent; dNFR% = relative change of NFR from "
            "(M1, M2) to (M1, Mc), of the seed means.\n\n"
            + common.table(["mask", *COLUMNS], ablation_rows) + "\n\nEach seed:\n\n"
            + common.table(["mask", "seed", *COLUMNS], per_seed_rows))
    title = ("Toy update: masking strategies (the paper's Table 6 in miniature)" if len(masks) > 1
             else "Toy update: the default scenario over seeds")
    if extra:
        title += f" ({' '.join(extra)})"
    common.write_section(key, title, body)


if __name__ == "__main__":
    main()
