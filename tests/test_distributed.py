"""torchrun on CPU (gloo, FSDP2): two processes equal one, and one failing rank stops them all."""
import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train
from test_train import ONE_THREAD, ROOT, read_log, tiny_flags, tiny_models  # noqa: F401 (fixture)

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(*args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # ~25 s: the whole pipeline twice, once under torchrun
def test_two_processes_equal_one_step_by_step(tiny_models, data_dir, tmp_path):
    """Same flags (global batch 4 = 2 rows per rank) on 1 and 2 processes: every stage's losses
    agree step by step, the adapters agree, and the evaluation gives the same predictions.
    (Measured: losses within 1e-6, adapters within 3e-8.)"""
    single, double = tmp_path / "one", tmp_path / "two"
    assert train.main(tiny_flags(*tiny_models, data_dir, single)) == 0
    # Activation checkpointing on the sharded side only: it must not change any number.
    done = torchrun(ROOT / "train.py", *tiny_flags(*tiny_models, data_dir, double),
                    "--grad-checkpointing")
    assert done.returncode == 0, done.stderr[-3000:]

    for stage in (1, 2, 3):
        logs = [read_log(out / train.STAGES[stage] / "log.jsonl") for out in (single, double)]
        assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
        for a, b in zip(*logs):
            key = "loss" if "loss" in a else "val_loss"
            assert b[key] == pytest.approx(a[key], abs=1e-4), (stage, a, b)
        adapters = [load_file(out / train.STAGES[stage] / "adapter" / "adapter_model.safetensors")
                    for out in (single, double)]
        for k in adapters[0]:
            torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=1e-4, atol=1e-5)
    for role in ("m1", "m2", "mc"):
        records = [[json.loads(x) for x in (out / "stage4_eval" / f"{role}.jsonl").read_text().splitlines()]
                   for out in (single, double)]
        assert [r["id"] for r in records[1]] == [r["id"] for r in records[0]]
        assert [r["prediction"] for r in records[1]] == [r["prediction"] for r in records[0]]


@pytest.mark.slow  # ~10 s: torchrun start-up
def test_one_failing_rank_stops_all_ranks_promptly(tiny_models, data_dir, tmp_path):
    """Rank 1 raises in its second optimizer step; rank 0 waits in a collective and must not hang."""
    script = tmp_path / "fail_rank1.py"
    script.write_text(f"""
import os, sys
sys.path.insert(0, {str(ROOT)!r})
import train, trainer
if os.environ["RANK"] == "1":
    calls = []
    real = trainer.accumulate_gradients
    def failing(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("rank 1 failed on purpose")
        return real(*args)
    trainer.accumulate_gradients = failing
sys.exit(train.main(sys.argv[1:]))
""")
    start = time.monotonic()
    done = torchrun(script, *tiny_flags(*tiny_models, data_dir, tmp_path / "run"), "--stage", "1",
                    timeout=120)
    assert done.returncode != 0
    assert "rank 1 failed on purpose" in done.stderr
    assert time.monotonic() - start < 60
    assert not (tmp_path / "run" / train.STAGES[1] / "DONE").exists()
