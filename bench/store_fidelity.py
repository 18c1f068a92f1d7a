"""How far the teacher store's top-k loss moves the compatibility adapter from the online loss.

For each seed of the toy update (configs/toy-mc.args) and each k, one epoch of stage 3 from the
same A2, on the same batches, with `--teachers store --top-k k` and with `--teachers online`
(the exact loss); reported: the relative distance of the two adapters,
||Ac(k) - Ac(online)|| / ||Ac(online) - A2|| over all LoRA weights (0: the same adapter; 1: as
far from the online adapter as the online adapter moved in the epoch), and the largest weight
difference. The toy's vocabulary has 303 tokens, so k >= 303 keeps every token: the loss is then
the online loss up to float rounding. Stages 1-2 and the teacher stores are bench/toy_results.py's
(RUNS/task-adapters/sS, RUNS/teacher-store/sS; built here when missing, with the largest k).

    python bench/store_fidelity.py [--seeds 0 1 2] [--ks 512 128 32 8] [--runs runs/toy-results]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from pathlib import Path

import common

common.setup()
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

import stage_data  # noqa: E402
import toy_results  # noqa: E402
import train  # noqa: E402
import train_cli  # noqa: E402
from distributed import Dist  # noqa: E402


def one_epoch(seed: int, runs: Path, variant: str, extra: list[str]) -> dict[str, torch.Tensor]:
    """The compatibility adapter after one epoch of stage 3 (a finished one is reused)."""
    out = runs / "fidelity" / variant / f"s{seed}"
    adapter = out / train.STAGES[3] / train.ADAPTER / "adapter_model.safetensors"
    if not adapter.is_file():
        shared = toy_results.task_adapters(seed, runs, [])
        shutil.rmtree(out, ignore_errors=True)
        for stage in (1, 2):
            shutil.copytree(train.stage_dir(shared, stage), train.stage_dir(out, stage))
        args = train_cli.parse_args([f"@{toy_results.ARGS_FILE}", "--seed", str(seed), "--out", str(out),
                                 "--epochs", "1", *extra])
        td = stage_data.task_data(args, 3, Dist())
        train.stage_compat(args, Dist(), out, td)
    return load_file(adapter)


def distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return torch.cat([(a[k] - b[k]).flatten() for k in sorted(a)]).norm().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--ks", type=int, nargs="+", default=[512, 128, 32, 8])
    p.add_argument("--runs", type=Path, default=Path("runs/toy-results"))
    args = p.parse_args()
    ks = sorted(args.ks, reverse=True)  # the largest first: its store serves the others
    rows, rel = [], {k: [] for k in ks}
    for seed in args.seeds:
        online = one_epoch(seed, args.runs, "online", [])
        a2 = load_file(toy_results.task_adapters(seed, args.runs, []) / train.STAGES[2] / train.ADAPTER
                       / "adapter_model.safetensors")
        moved = distance(online, a2)
        for k in ks:
            store = ["--teachers", "store", "--top-k", str(k),
                     "--teacher-store", str(args.runs / "teacher-store" / f"s{seed}")]
            stored = one_epoch(seed, args.runs, f"k{k}", store)
            rel[k].append(distance(stored, online) / moved)
            worst = max((stored[n] - online[n]).abs().max().item() for n in online)
            rows.append([seed, k, f"{rel[k][-1]:.2e}", f"{worst:.1e}", f"{moved:.3f}"])
            print(f"seed {seed} k {k}: relative distance {rel[k][-1]:.2e}, max |diff| {worst:.1e}",
                  flush=True)
    summary = [[k, "yes" if k >= 303 else "no", f"{statistics.mean(v):.2e}", f"{max(v):.2e}"]
               for k, v in rel.items()]
    body = (f"Command: `python bench/store_fidelity.py --seeds {' '.join(map(str, args.seeds))} "
            f"--ks {' '.join(map(str, args.ks))}`. The toy update (configs/toy-mc.args, 303-token "
            "vocabulary), one epoch of stage 3 from A2 on the same batches; relative distance = "
            "||Ac(k) - Ac(online)|| / ||Ac(online) - A2|| over all LoRA weights.\n\n"
            + common.table(["k", "k >= vocabulary (exact)", "relative distance, mean over seeds", "max"],
                           summary)
            + "\n\nEach seed:\n\n"
            + common.table(["seed", "k", "relative distance", "max |weight difference|",
                            "||Ac(online) - A2||"], rows))
    common.write_section("store_fidelity", "Teacher store: the adapter after one epoch vs online", body)


if __name__ == "__main__":
    sys.exit(main())
