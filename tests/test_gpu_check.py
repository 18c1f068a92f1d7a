"""bench/gpu_check.sh: the dry run (every part on the CPU on tiny shapes) passes, and a failing
part makes the script exit non-zero and name it. The GPU figures themselves need a GPU."""
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch

from bench import gpu_check
from tiny import ONE_THREAD, ROOT


def run_script(tmp_path, *args, env=None) -> subprocess.CompletedProcess:
    cmd = ["bash", str(ROOT / "bench" / "gpu_check.sh"), *args]
    env = {**ONE_THREAD, "MUSCLE_CACHE": str(tmp_path / "toy"), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_dry_run_runs_every_part_and_writes_its_figures(tmp_path):
    results = tmp_path / "RESULTS.md"
    done = run_script(tmp_path, "--dry-run", "--results", str(results))
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
    done = run_script(tmp_path, "--dry-run", "--parts", "pipeline", "--results", str(results),
                     env={"MUSCLE_TOY_SIZE": "no-such-scenario"})
    assert done.returncode == 1
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("gpu_check: FAILED: pipeline (train.py under torchrun exited 1: error: ")
    assert "no-such-scenario" in last
    assert "### pipeline: **FAILED**" in results.read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_without_a_gpu_it_asks_for_the_cuda_build_or_a_dry_run(tmp_path):
    done = run_script(tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: torch sees no CUDA device (torch.cuda.is_available() is False): install the CUDA build "
        "of torch (README, Set-up) or pass --dry-run to check the script on the CPU"]
    assert not os.path.exists(tmp_path / "toy")


def test_every_failed_part_is_named_on_the_last_line_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    """A part whose numbers are out of bounds and a part that raises are both named, with their
    reasons, and the part after them still runs and is recorded."""
    def out_of_bounds(size, device, env):
        raise gpu_check.CheckFailed("llama: ours bf16 max error 0.9 > 1.5 x transformers bf16's 0.1 + 0.01",
                                    "the forward table")

    def crashing(size, device, env):
        raise RuntimeError("CUDA out of memory")
    monkeypatch.setattr(gpu_check, "PARTS", {"forward": out_of_bounds, "steps": crashing,
                                             "pipeline": lambda size, device, env: "the report"})
    monkeypatch.setattr(gpu_check.common, "setup", lambda: None)  # keeps this process's threads
    results = tmp_path / "RESULTS.md"
    assert gpu_check.main(["--dry-run", "--results", str(results)]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gpu_check: FAILED: forward (llama: ours bf16 max error 0.9 > 1.5 x transformers bf16's 0.1 + 0.01); "
        "steps (RuntimeError: CUDA out of memory)")
    text = results.read_text()
    assert "### forward: **FAILED**\n\nthe forward table" in text
    assert "### steps: **FAILED**\n\nerror: `RuntimeError: CUDA out of memory`" in text
    assert "### pipeline: passed\n\nthe report" in text


def test_the_forward_check_fails_when_the_causal_path_attends_to_the_future(monkeypatch):
    """The bounds bite: with SDPA's causal path made non-causal, the right-padded batch on that
    path is far from fp32 while the masked path is not, and the part names the causal path."""
    real = torch.nn.functional.scaled_dot_product_attention

    def not_causal(*args, is_causal=False, **kw):
        return real(*args, is_causal=False, **kw)
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", not_causal)
    with pytest.raises(gpu_check.CheckFailed) as failed:
        gpu_check.forward_family("llama", "dry", torch.device("cpu"))
    assert re.match(r"llama: the causal path (top-1 agreement|max error) [0-9.]+ [<>] the masked path's",
                    failed.value.args[0])


def processes_with(variable: str) -> list[int]:
    """Ids of the other live processes whose environment holds `variable` (NAME=value)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if variable.encode() in environ.read_bytes().split(b"\0"):
                found.append(int(environ.parent.name))
        except OSError:  # ended meanwhile, or not ours
            continue
    return [pid for pid in found if pid != os.getpid()]


@pytest.mark.slow  # torchrun start-up, then the time limit
def test_a_part_running_at_the_time_limit_is_stopped_named_and_leaves_no_process(tmp_path, monkeypatch, capsys):
    """The pipeline is still building the default toy bases (minutes) when the limit falls: its
    torchrun and train.py worker end (the worker runs in a session of its own, so killing
    torchrun alone would leave it running), the part is named, and the results say so."""
    cache = tmp_path / "toy"
    monkeypatch.setenv("MUSCLE_TOY_SIZE", "default")
    monkeypatch.setenv("MUSCLE_CACHE", str(cache))
    monkeypatch.setattr(gpu_check, "LIMIT_S", 20)
    monkeypatch.setattr(gpu_check.common, "setup", lambda: None)
    results = tmp_path / "RESULTS.md"
    assert gpu_check.main(["--dry-run", "--parts", "pipeline", "--results", str(results)]) == 1
    assert (cache / "default").is_dir()  # the worker had started building
    assert processes_with(f"MUSCLE_CACHE={cache}") == []
    assert not (cache / "default" / "toy-v2").exists()  # ended then, not waited for until it finished
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "gpu_check: FAILED: pipeline (stopped: the check reached its 20 s limit during this part)")
    assert "### pipeline: **FAILED**\n\nstopped: the check reached its 20 s limit during this part" in results.read_text()


def test_on_a_gpu_the_results_name_the_card_and_the_date(tmp_path, monkeypatch):
    """The section a GPU run writes (the card mocked here): card, memory, CUDA version and the
    day's date, then each part, those after a stop marked not run; other sections are kept."""
    import datetime
    import types

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(total_memory=80 * 2**30))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\n<!-- bench:other -->\nkept\n<!-- /bench:other -->\n")
    gpu_check.record({"forward": (True, "the forward table")}, ["forward", "steps"], dry_run=False, path=results)
    text = results.read_text()
    assert "<!-- bench:other -->\nkept\n<!-- /bench:other -->" in text
    section = text.split("<!-- bench:gpu_check -->")[1]
    assert section.startswith(f"\n## GPU self-check (bench/gpu_check.sh)\n\n_{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}, ")
    assert f"Card: **NVIDIA H100 80GB HBM3** (80 GiB), CUDA 12.8, torch {torch.__version__}." in section
    assert "### forward: passed\n\nthe forward table" in section
    assert "### steps: not run\n\nnot run (the check stopped before this part)" in section
