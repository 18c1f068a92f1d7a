"""bench/gpu_check.sh: the dry run (every part on the CPU on tiny shapes) passes, and a failing
part makes the script exit non-zero and name it. The GPU figures themselves need a GPU."""
import os
import re
import subprocess

import torch

from tiny import ONE_THREAD, ROOT


def gpu_check(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    env = {**ONE_THREAD, "MUSCLE_CACHE": str(tmp_path / "toy"), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_runs_every_part_and_writes_its_figures(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = gpu_check(tmp_path, "--dry-run", "--results", str(results))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "gpu_check: all parts passed (forward, steps, pipeline)" in done.stdout
    text = results.read_text()
    for part in ("forward", "steps", "pipeline"):
        assert f"### {part}: passed" in text
    for family in ("llama", "phi"):  # our fp32 logits equal transformers'; bf16 rounds visibly
        parity = re.search(rf"\| {family} \| ours fp32 vs transformers fp32 \| ([^|]+) \|", text)
        assert float(parity.group(1)) < 1e-3
        bf16 = re.search(rf"\| {family} \| ours bf16 vs ours fp32 \| ([^|]+) \| ([^|]+) \|", text)
        assert 1e-4 < float(bf16.group(1)) < 0.5 and float(bf16.group(2)) > 0.8
    for step, stack in (("task", "ours"), ("task", "peft"), ("compat", "ours")):
        row = re.search(rf"\| {step} \| {stack} \| (\d+) \|", text)
        assert row and int(row.group(1)) > 0
    assert "report written. Accuracy M1 / M2 / Mc" in text


def test_a_failing_part_is_named_and_the_exit_status_is_non_zero(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = gpu_check(tmp_path, "--dry-run", "--parts", "pipeline", "--results", str(results),
                     env={"MUSCLE_TOY_SIZE": "no-such-scenario"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED: pipeline (train.py under torchrun exited 1: error: ")
    assert "no-such-scenario" in last
    assert "### pipeline: **FAILED**" in results.read_text()


def test_without_a_gpu_it_asks_for_the_cuda_build_or_a_dry_run(tmp_path):
    if torch.cuda.is_available():
        return
    done = gpu_check(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: torch sees no CUDA device (torch.cuda.is_available() is False): install the CUDA build "
        "of torch (README, Set-up) or pass --dry-run to check the script on the CPU"]
    assert not os.path.exists(tmp_path / "toy")
