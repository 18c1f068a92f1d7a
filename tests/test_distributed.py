"""torchrun on CPU (gloo, FSDP2): two processes equal one, one failing rank stops them all, and a
machine downloads each model once."""
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from tiny import ONE_THREAD, ROOT, read_log, tiny_flags

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")


def torchrun(*args, nproc=2, timeout=300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--standalone", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the whole pipeline twice, once under torchrun
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


@pytest.mark.slow  # torchrun start-up
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


# ------------------------------------------------------------------ teacher store

@pytest.mark.slow  # stages 1-2 once, stage 3 from the store on 1 and 2 processes
def test_two_ranks_finish_a_half_built_teacher_store_and_train_from_it_as_one_process(
        tiny_models, data_dir, tmp_path):
    """A store left as a killed build leaves it (its description and M1's first shard, written
    atomically) is finished by two ranks, each writing its own shards, to the bytes of a
    one-process build; both ranks then read it, and stage 3 equals the one-process run."""
    base, single, double = tmp_path / "base", tmp_path / "one", tmp_path / "two"
    for stage in ("1", "2"):
        assert train.main(tiny_flags(*tiny_models, data_dir, base, "--stage", stage)) == 0
    for out in (single, double):
        shutil.copytree(base, out)
    flags = ("--stage", "3", "--teachers", "store", "--top-k", "8")
    assert train.main(tiny_flags(*tiny_models, data_dir, single, *flags)) == 0
    built, half = single / "teacher_store", double / "teacher_store"
    (half / "old").mkdir(parents=True)
    shutil.copy(built / "old" / "train-00000.safetensors", half / "old")
    description = json.loads((built / "manifest.json").read_text())["description"]
    (half / "building.json").write_text(json.dumps(description, indent=1) + "\n")

    done = torchrun(ROOT / "train.py", *tiny_flags(*tiny_models, data_dir, double, *flags))
    assert done.returncode == 0, done.stderr[-3000:]
    # Shard i is rank i % 2's: rank 0 (which prints) wrote only M2's training shard, so rank 1
    # wrote both validation shards.
    assert [line for line in done.stdout.splitlines() if line.startswith("teacher store:")] == [
        "teacher store: new/train-00000.safetensors written (1/1 on this rank)"]
    names = sorted(p.relative_to(built) for p in built.rglob("*") if p.is_file())
    assert names == sorted(p.relative_to(half) for p in half.rglob("*") if p.is_file())
    assert len(names) == 5  # 2 shards per teacher and the manifest
    for rel in names:
        assert (half / rel).read_bytes() == (built / rel).read_bytes(), rel
    logs = [read_log(out / train.STAGES[3] / "log.jsonl") for out in (single, double)]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]
    for a, b in zip(*logs):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], abs=1e-4), (a, b)
    adapters = [load_file(out / train.STAGES[3] / "adapter" / "adapter_model.safetensors")
                for out in (single, double)]
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------ one download per machine

RECORD_FETCHES = """
import json, os, sys
sys.path.insert(0, {root!r})
import huggingface_hub, train
real = huggingface_hub.snapshot_download
def recording(repo_id, **kw):
    with open({log!r}, "a") as f:
        f.write(json.dumps([int(os.environ["RANK"]), repo_id, kw.get("local_files_only", False)]) + "\\n")
    return real(repo_id, **kw)
huggingface_hub.snapshot_download = recording
sys.exit(train.main(sys.argv[1:]))
"""


def torchrun_on_fake_hub(hub, tmp_path, flags):
    """torchrun, 2 processes, with huggingface_hub pointed at `hub` (empty cache, no token) and
    every snapshot_download call recorded as (rank, repo id, local_files_only)."""
    log = tmp_path / "fetches.jsonl"
    script = tmp_path / "record_fetches.py"
    script.write_text(RECORD_FETCHES.format(root=str(ROOT), log=str(log)))
    env = {k: v for k, v in ONE_THREAD.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           str(script), *flags]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    calls = [tuple(json.loads(line)) for line in log.read_text().splitlines()] if log.is_file() else []
    return done, calls


@pytest.mark.slow  # torchrun start-up and a step of stage 1
def test_local_rank_0_downloads_once_and_the_other_rank_reads_its_files(tiny_models, data_dir, tmp_path):
    from fake_hub import FakeHub

    with FakeHub() as hub:
        hub.add_repo("org/v1", tiny_models[0])
        hub.add_repo("org/v2", tiny_models[1])
        flags = tiny_flags("org/v1", "org/v2", data_dir, tmp_path / "run", "--stage", "1",
                           "--max-steps", "1")
        done, calls = torchrun_on_fake_hub(hub, tmp_path, flags)
    assert done.returncode == 0, done.stderr[-3000:]
    # Each rank asks once per repo (later loads reuse the answer); rank 1 reads the cache only.
    assert sorted(calls) == [(0, "org/v1", False), (0, "org/v2", False),
                             (1, "org/v1", True), (1, "org/v2", True)]
    assert sorted(hub.downloads) == sorted({(repo, f) for repo, f in hub.downloads})  # no file twice
    for repo, directory in (("org/v1", tiny_models[0]), ("org/v2", tiny_models[1])):
        assert hub.fetched(repo) == {p.name for p in Path(directory).iterdir()}


@pytest.mark.slow  # torchrun start-up
def test_a_failed_download_ends_every_rank_with_the_same_line(tiny_models, data_dir, tmp_path):
    from fake_hub import FakeHub

    with FakeHub() as hub:
        hub.add_repo("org/v1", tiny_models[0])
        hub.add_repo("org/v2", tiny_models[1], gated_status=403)
        done, calls = torchrun_on_fake_hub(hub, tmp_path, tiny_flags("org/v1", "org/v2", data_dir,
                                                                     tmp_path / "run"))
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2 and len(set(errors)) == 1, done.stderr[-3000:]
    assert "hub repo 'org/v2' is gated" in errors[0] and "hf auth login" in errors[0]
    assert "models.py" not in done.stderr  # no rank's traceback (torchrun prints its own summary)
    assert {rank for rank, _, _ in calls} == {0}  # rank 1 waited, and never asked the hub
    assert not (tmp_path / "run").exists()


def _slow_first_message(rank: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    import distributed

    store = dist.TCPStore("127.0.0.1", port, 2, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=2))
    if rank == 0:
        time.sleep(5)  # a download longer than the process group's timeout
    message = distributed.first_message("rank 0 failed" if rank == 0 else None,
                                        distributed.Dist(rank, 2), timeout_s=60)
    Path(out, f"rank{rank}").write_text(message)
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes, one sleeping 5 s
def test_ranks_wait_for_a_download_longer_than_the_group_timeout(tmp_path):
    import torch.distributed as dist
    import torch.multiprocessing as mp

    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    mp.spawn(_slow_first_message, args=(store.port, str(tmp_path)), nprocs=2)
    assert [(tmp_path / f"rank{r}").read_text() for r in (0, 1)] == ["rank 0 failed"] * 2
