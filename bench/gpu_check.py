"""GPU self-check: bf16 forward passes, LoRA and MUSCLE steps against transformers + PEFT, and the
whole toy pipeline under torchrun; the figures go into bench/RESULTS.md with the card's name.

    bash bench/gpu_check.sh              # one CUDA GPU, the CUDA build of torch; at most 10 minutes
    bash bench/gpu_check.sh --dry-run    # every part on the CPU on tiny shapes (the test suite)

Parts, each passing or failing on its own (the exit status is 1 when one fails, and the last line
names it; what finished is written after each part, so a stopped run keeps it). The check stops
itself after LIMIT_S seconds, naming the part it stopped, inside bench/gpu_check.sh's 10 minutes:
- forward: llama.py and phi.py in bf16 against fp32 on the same random weights (max |logit error|
  and top-1 agreement on random token ids), next to transformers in bf16 against the same
  reference; a right-padded batch through SDPA's causal path (FlashAttention on GPU) next to the
  masked path. Fails when ours is further from fp32 than transformers is (top-1 agreement lower
  by more than TOP1_SLACK, max error above ERROR_SLACK times transformers' + ERROR_FLOOR), when
  the causal path is further from fp32 than the masked path by as much, or when fp32 logits
  differ from transformers' fp32 by more than FP32_PARITY.
- steps: bench/gpu_train.py's `measure` on TinyLlama-1.1B's shape, batch 4 x 512, bf16 base:
  a LoRA task step, ours and transformers + PEFT, and a MUSCLE compatibility step (ours):
  tokens/s, peak memory and MFU against a bf16 matmul rate measured first on the same card.
  Fails on an error or a non-finite loss.
- pipeline: `torchrun --nproc_per_node 1 train.py @configs/toy-mc.args --device cuda` in a fresh
  --out; fails unless it exits 0 with the compatibility report.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import cli
from bench import common, gpu_train

TOP1_SLACK, ERROR_SLACK, ERROR_FLOOR, FP32_PARITY = 0.01, 1.5, 1e-2, 1e-3

# Random checkpoints for the forward part (HF config.json fields). A larger initializer range than
# the default 0.02 spreads the logits, so top-1 agreement is not decided by near-ties.
FORWARD = {
    "gpu": {"llama": dict(model_type="llama", vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8),
            "phi": dict(model_type="phi", vocab_size=51200, hidden_size=1024, intermediate_size=4096,
                        num_hidden_layers=8, num_attention_heads=16, partial_rotary_factor=0.4)},
    "dry": {"llama": dict(model_type="llama", vocab_size=160, hidden_size=64, intermediate_size=96,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
            "phi": dict(model_type="phi", vocab_size=160, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=2, num_attention_heads=4, partial_rotary_factor=0.5)},
}
FORWARD_BATCH = {"gpu": (4, 256), "dry": (4, 16)}
STEP_FLAGS = {"gpu": ["--shape", "1b", "--batch-size", "4", "--seq-len", "512", "--steps", "5"],
              "dry": ["--shape", "tiny", "--batch-size", "2", "--seq-len", "16", "--steps", "1"]}
STEPS = [("task", "ours"), ("task", "peft"), ("compat", "ours")]
# bench/gpu_check.sh ends the process at 600 s; stopping here first leaves the time to end a running
# torchrun (it gives its workers 30 s) and write the results, and names the part that was running.
LIMIT_S = 540
STOP_WAIT_S = 40
# The dry run shrinks the toy pipeline as the suite's end-to-end test does.
DRY_PIPELINE_FLAGS = ["--epochs", "1", "--limit-train", "40", "--limit-eval", "30", "--rank", "2"]


class CheckFailed(Exception):
    """A part ran but its numbers are out of bounds; the message says which and by how much."""


class Stopped(BaseException):
    """The time limit (or a SIGTERM) fell during a part. Not an Exception, so no handler inside
    a part takes it for the part's own error."""


def stop_check(signum: int, frame) -> None:
    raise Stopped(f"the check reached its {LIMIT_S} s limit during this part" if signum == signal.SIGALRM
                  else f"{signal.Signals(signum).name} during this part")


# ------------------------------------------------------------------------------------ forward
def compare(logits: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Max |logit difference| and the fraction of positions with the same argmax."""
    logits, reference = logits.float(), reference.float()
    return {"max_err": (logits - reference).abs().max().item(),
            "top1": (logits.argmax(-1) == reference.argmax(-1)).float().mean().item()}


def right_padded(ids: torch.Tensor) -> torch.Tensor:
    """A right-padding mask for `ids`: rows of full, 3/4, 1/2 and 1/4 length."""
    batch, t = ids.shape
    lengths = [max(1, t * (4 - i % 4) // 4) for i in range(batch)]
    return (torch.arange(t)[None, :] < torch.tensor(lengths)[:, None]).long().to(ids.device)


@torch.no_grad()
def padded_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """Logits at the real positions of a right-padded batch, by SDPA's causal path or the mask."""
    import llama

    real = llama.is_right_padded
    llama.is_right_padded = real if causal else (lambda m: False)
    try:
        return model(ids, attention_mask=mask)[mask.bool()]
    finally:
        llama.is_right_padded = real


@torch.no_grad()
def forward_family(family: str, size: str, device: torch.device) -> list[list]:
    """Rows of the forward table for one family; raises CheckFailed when a bound is broken."""
    import models

    batch, seq = FORWARD_BATCH[size]
    cfg = {**FORWARD[size][family], "initializer_range": 0.05}
    bf16, fp32 = torch.bfloat16, torch.float32
    with tempfile.TemporaryDirectory() as tmp:
        path = common.save_random_hf_checkpoint(cfg, Path(tmp))
        ours = {dt: models.load_model(path, dtype=dt, device=device) for dt in (fp32, bf16)}
        theirs = {dt: common.load_reference(path, dt).to(device) for dt in (fp32, bf16)}
    ids = torch.randint(0, cfg["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(device)
    logits = {("ours", dt): ours[dt](ids) for dt in (fp32, bf16)}
    logits.update({("transformers", dt): theirs[dt](ids).logits for dt in (fp32, bf16)})
    mask = right_padded(ids)
    padded = {kind: padded_logits(ours[bf16], ids, mask, causal=kind == "causal") for kind in ("causal", "masked")}
    padded_ref = padded_logits(ours[fp32], ids, mask, causal=False)
    r = {"ours bf16 vs ours fp32": compare(logits["ours", bf16], logits["ours", fp32]),
         "transformers bf16 vs ours fp32": compare(logits["transformers", bf16], logits["ours", fp32]),
         "ours bf16 vs transformers bf16": compare(logits["ours", bf16], logits["transformers", bf16]),
         "ours fp32 vs transformers fp32": compare(logits["ours", fp32], logits["transformers", fp32]),
         "right-padded bf16, causal path vs fp32": compare(padded["causal"], padded_ref),
         "right-padded bf16, masked path vs fp32": compare(padded["masked"], padded_ref)}
    rows = [[family, name, f"{v['max_err']:.3g}", f"{v['top1']:.4f}"] for name, v in r.items()]
    parity = r["ours fp32 vs transformers fp32"]["max_err"]
    problems = [p for p in (
        no_worse(r["ours bf16 vs ours fp32"], r["transformers bf16 vs ours fp32"], "ours bf16", "transformers bf16"),
        no_worse(r["right-padded bf16, causal path vs fp32"], r["right-padded bf16, masked path vs fp32"],
                 "the causal path", "the masked path"),
        None if parity <= FP32_PARITY else f"fp32 logits differ from transformers' by {parity:.3g} > {FP32_PARITY}",
    ) if p]
    if problems:
        raise CheckFailed(f"{family}: " + "; ".join(problems), rows)
    return rows


def no_worse(ours: dict[str, float], reference: dict[str, float], name: str, ref_name: str) -> str | None:
    """None when `ours` is as close to fp32 as `reference` within the slacks, else the reason."""
    if ours["top1"] < reference["top1"] - TOP1_SLACK:
        return f"{name} top-1 agreement {ours['top1']:.4f} < {ref_name}'s {reference['top1']:.4f} - {TOP1_SLACK}"
    if ours["max_err"] > ERROR_SLACK * reference["max_err"] + ERROR_FLOOR:
        return f"{name} max error {ours['max_err']:.3g} > {ERROR_SLACK} x {ref_name}'s {reference['max_err']:.3g} + {ERROR_FLOOR}"
    return None


def part_forward(size: str, device: torch.device, env) -> str:
    rows, problems = [], []
    for family in ("llama", "phi"):
        try:
            rows += forward_family(family, size, device)
        except CheckFailed as e:
            problems.append(e.args[0])
            rows += e.args[1]
    batch, seq = FORWARD_BATCH[size]
    text = (f"Random {', '.join(f'{f}: ' + shape_text(c) for f, c in FORWARD[size].items())} "
            f"(initializer range 0.05); {batch} x {seq} random token ids; the right-padded batch has rows of "
            f"{seq}, {3 * seq // 4}, {seq // 2} and {seq // 4} tokens.\n\n"
            + common.table(["family", "comparison", "max abs logit error", "top-1 agreement"], rows))
    if problems:
        raise CheckFailed("; ".join(problems), text)
    return text


def shape_text(cfg: dict) -> str:
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return ", ".join(f"{k}={cfg[k]}" for k in keys)


# ------------------------------------------------------------------------------------ steps
def part_steps(size: str, device: torch.device, env) -> str:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = gpu_train.matmul_tflops(device, dtype)
    results = []
    for step, stack in STEPS:
        args = gpu_train.parser().parse_args([*STEP_FLAGS[size], "--step", step, "--stack", stack])
        results.append(gpu_train.measure(args, env, peak))
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    rows = [[r["step"], r["stack"], f"{r['tokens_per_s']:.0f}", r["peak_memory_gib"] or "n/a", f"{r['mfu']:.3f}",
             f"{r['loss']:.4f}"] for r in results]
    ours, peft, compat = results
    memory = (f"{ours['peak_memory_gib'] / peft['peak_memory_gib']:.2f}x" if ours["peak_memory_gib"] else "n/a (CPU)")
    rank = gpu_train.parser().parse_args(STEP_FLAGS[size]).rank
    text = (f"{STEPS_TEXT[size]}, LoRA rank {rank} on all block linears, "
            f"{ours['batch']} x {ours['seq_len']} tokens, {ours['params_base'] / 1e6:.1f} M base parameters; "
            f"{str(dtype).removeprefix('torch.')} matmul rate measured here: {peak:.2f} TFLOP/s (the MFU "
            f"denominator). Random weights: the two stacks' losses differ.\n\n"
            + common.table(["step", "stack", "tokens/s", "peak GiB", "MFU", "loss"], rows)
            + f"\n\nOurs / transformers + PEFT, task step: **{ours['tokens_per_s'] / peft['tokens_per_s']:.2f}x** "
              f"tokens/s, {memory} peak memory. Compat / task step time (ours): "
              f"**{compat['step_s'] / ours['step_s']:.2f}x**.")
    bad = [f"{r['step']} step ({r['stack']}) loss {r['loss']}" for r in results if not math.isfinite(r["loss"])]
    if bad:
        raise CheckFailed("non-finite loss: " + ", ".join(bad), text)
    return text


STEPS_TEXT = {"gpu": "TinyLlama-1.1B-shaped Llama (bench/gpu_train.py --shape 1b), bf16 base, fp32 adapters",
              "dry": "Tiny Llama (bench/gpu_train.py --shape tiny), float32 on the CPU"}


# ------------------------------------------------------------------------------------ pipeline
def part_pipeline(size: str, device: torch.device, env) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        flags = ["@configs/toy-mc.args", "--device", device.type, "--out", str(out)]
        child_env = dict(os.environ)
        if size == "dry":
            flags += DRY_PIPELINE_FLAGS
            child_env.update(MUSCLE_TOY_SIZE=child_env.get("MUSCLE_TOY_SIZE", "micro"),
                             MUSCLE_CACHE=child_env.get("MUSCLE_CACHE", str(Path(tmp) / "toy")))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--standalone",
               "train.py", *flags]
        start = time.perf_counter()
        returncode, stderr = run_torchrun(cmd, child_env)
        seconds = time.perf_counter() - start
        report_file = out / "stage4_eval" / "report.json"
        if returncode != 0 or not report_file.is_file():
            lines = stderr.strip().splitlines() or ["(no output)"]
            reason = next((line for line in reversed(lines) if line.startswith("error:")), lines[-1])
            raise CheckFailed(f"train.py under torchrun exited {returncode}: {reason}",
                              f"`{' '.join(cmd[1:])}` failed:\n\n```\n{stderr[-2000:]}\n```")
        report = json.loads(report_file.read_text())
    acc = {role: report["models"][role]["accuracy"] * 100 for role in ("old", "new", "compat")}
    nfr = {pair: report["pairs"][pair]["nfr"] * 100 for pair in ("old->new", "old->compat")}
    return (f"`torchrun --nproc_per_node 1 train.py {' '.join(flags[:3])}` ({'toy default' if size == 'gpu' else 'micro toy, ' + ' '.join(DRY_PIPELINE_FLAGS)}): "
            f"exit 0 in {seconds:.0f} s, report written. Accuracy M1 / M2 / Mc: {acc['old']:.2f} / {acc['new']:.2f} / "
            f"{acc['compat']:.2f}; NFR(M1, M2) {nfr['old->new']:.2f}, NFR(M1, Mc) {nfr['old->compat']:.2f} (percent, "
            f"{report['n']} items).")


def run_torchrun(cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """(exit status, stderr) of torchrun. Stopped meanwhile, it gets SIGTERM, so that it ends its
    workers: they run in sessions of their own, and a SIGKILL to torchrun would leave them
    running (on the GPU). SIGKILL only if it has not ended after STOP_WAIT_S."""
    proc = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        stderr = proc.communicate()[1]
    except BaseException:
        proc.terminate()
        try:
            proc.communicate(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        raise
    return proc.returncode, stderr


# ------------------------------------------------------------------------------------ running
PARTS: dict[str, Callable[[str, torch.device, object], str]] = {
    "forward": part_forward, "steps": part_steps, "pipeline": part_pipeline}


def header(dry_run: bool) -> str:
    if dry_run:
        return "**Dry run** on the CPU, tiny shapes: the code paths only; no GPU figures."
    props = torch.cuda.get_device_properties(0)
    return (f"Card: **{torch.cuda.get_device_name(0)}** ({props.total_memory / 2**30:.0f} GiB), CUDA "
            f"{torch.version.cuda}, torch {torch.__version__}.")


def record(results: dict[str, tuple[bool, str]], parts: list[str], dry_run: bool, path: Path | None) -> None:
    """Write the parts run so far (and those not run yet) into the results file's section."""
    body = [header(dry_run)]
    for name in parts:
        ok, text = results.get(name, (None, "not run (the check stopped before this part)"))
        status = "not run" if ok is None else "passed" if ok else "**FAILED**"
        body.append(f"### {name}: {status}\n\n{text}")
    if path is not None:
        common.write_section("gpu_check", "GPU self-check (bench/gpu_check.sh)", "\n\n".join(body), path)


def run_parts(parts: list[str], size: str, device: torch.device, env,
              write: Callable[[dict[str, tuple[bool, str]]], None]) -> list[str]:
    """Run `parts` in turn, writing the results after each; the failed ones with their reasons.
    A part stopped by the time limit is the last one run."""
    results: dict[str, tuple[bool, str]] = {}
    failed = []
    for name in parts:
        print(f"gpu_check: {name} ...", flush=True)
        stopped = False
        try:
            results[name] = (True, PARTS[name](size, device, env))
        except CheckFailed as e:
            results[name] = (False, e.args[1])
            failed.append(f"{name} ({e.args[0]})")
        except Stopped as e:
            results[name] = (False, f"stopped: {e}")
            failed.append(f"{name} (stopped: {e})")
            stopped = True
        except Exception as e:  # an error in one part must not hide the others' results
            traceback.print_exc()
            results[name] = (False, f"error: `{type(e).__name__}: {e}`")
            failed.append(f"{name} ({type(e).__name__}: {e})")
        write(results)
        print(f"gpu_check: {name} {'passed' if results[name][0] else 'FAILED'}", flush=True)
        if stopped:
            break
    return failed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="every part on the CPU on tiny shapes")
    p.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS), help="parts to run")
    p.add_argument("--results", type=Path, default=None,
                   help="file whose GPU self-check section is rewritten; None: bench/RESULTS.md on a GPU, "
                        "nothing in a dry run")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        return cli.fail("torch sees no CUDA device (torch.cuda.is_available() is False): install the CUDA "
                        "build of torch (README, Set-up) or pass --dry-run to check the script on the CPU")
    handlers = {s: signal.signal(s, stop_check) for s in (signal.SIGALRM, signal.SIGTERM)}
    signal.alarm(LIMIT_S)
    common.setup()
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 references stay fp32
    size, device = ("dry", torch.device("cpu")) if args.dry_run else ("gpu", torch.device("cuda"))
    results_path = args.results or (None if args.dry_run else common.RESULTS)
    import distributed

    try:
        env = distributed.setup(device.type)
        failed = run_parts(args.parts, size, device, env, lambda results: record(
            results, args.parts, args.dry_run, results_path))
    finally:
        signal.alarm(0)
        for s, handler in handlers.items():
            signal.signal(s, handler)
        distributed.teardown()
    if failed:
        cli.say("gpu_check: FAILED: " + "; ".join(failed))
        return 1
    print(f"gpu_check: all parts passed ({', '.join(args.parts)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
