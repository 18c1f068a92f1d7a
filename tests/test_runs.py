"""A run directory's safety: one process per --out (lock.py), a damaged checkpoint passed over
for the one before it, stage 4 resumed with flags that do not change training."""
import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import files
import lock
import train
import trainer
from test_reliability import assert_one_line_error
from tiny import FIT, quadratic_problem, read_log, tiny_flags


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def write_lock(directory, pid: int, **more) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / lock.NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                   "since": "2026-01-01 00:00:00 UTC", **more}))


def test_a_held_lock_refuses_a_second_holder_and_names_it(tmp_path):
    with lock.hold(tmp_path / "run") as path:
        holder = json.loads(path.read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(ValueError) as info:
            with lock.hold(tmp_path / "run"):
                pass
        assert str(info.value).startswith(f"--out {tmp_path / 'run'} is in use by pid {os.getpid()} on "
                                          f"{socket.gethostname()} since {holder['since']} ({path}); wait for "
                                          f"that run to end or stop it, or choose another --out")
        assert path.is_file()  # the refused holder did not remove the holder's lock
    assert not (tmp_path / "run").exists()  # created for the lock and left empty: removed


@pytest.mark.parametrize("flag", ["--out", "--teacher-store"])
def test_a_file_where_the_directory_should_be_is_one_error_naming_it(tmp_path, flag):
    (tmp_path / "run").write_text("not a directory")
    with pytest.raises(ValueError, match=rf"^{flag} {tmp_path / 'run'} is a file, not a directory; "
                                         rf"choose a directory \(nothing was changed\)$"):
        with lock.hold(tmp_path / "run", flag):
            pass
    assert (tmp_path / "run").read_text() == "not a directory"


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, capsys):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    (tmp_path / "kept.txt").write_text("run files")
    with lock.hold(tmp_path) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert f"note: taking over the lock {tmp_path / lock.NAME} of pid {pid}, which no longer runs" in \
        capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


@pytest.mark.skipif(lock.process_start(os.getpid()) is None, reason="no /proc/<pid>/stat here")
def test_a_lock_whose_pid_now_names_a_later_process_is_stale(tmp_path, capsys):
    """A reboot or a reused pid: the pid runs, but not the process that took the lock."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        started = lock.process_start(holder.pid)
        assert started is not None and started != lock.process_start(os.getpid())
        write_lock(tmp_path, holder.pid, started=started)  # the holder itself: refused
        with pytest.raises(ValueError, match=f"is in use by pid {holder.pid} on "):
            with lock.hold(tmp_path):
                pass
        boot, ticks = started.rsplit(":", 1)
        for other in (f"{boot}:{int(ticks) - 1}", f"another-boot-id:{ticks}"):
            write_lock(tmp_path, holder.pid, started=other)
            with lock.hold(tmp_path) as path:
                assert json.loads(path.read_text())["started"] == lock.process_start(os.getpid())
            assert f"note: taking over the lock {tmp_path / lock.NAME} of pid {holder.pid}, which no " \
                   f"longer runs" in capsys.readouterr().err
            assert holder.poll() is None  # the process that has the pid now was left alone
    finally:
        holder.kill()
        holder.wait()


def test_a_full_disk_when_the_lock_is_written_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "fsync_file", full_disk)
    with pytest.raises(files.WriteFailed) as info:
        with lock.hold(tmp_path / "run"):
            pass
    assert str(info.value) == (f"cannot write {tmp_path / 'run' / lock.NAME}.{os.getpid()} (No space left on "
                               f"device); the file is unchanged: free some space, then rerun")
    assert os.listdir(tmp_path) == []  # the directory created for the lock is gone again


def test_train_on_an_out_in_use_is_refused_then_runs_once_the_holder_is_gone(tiny_models, data_dir, tmp_path,
                                                                              capsys):
    out = tmp_path / "run"
    flags = tiny_flags(*tiny_models, data_dir, out, "--stage", "1", "--max-steps", "2")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        write_lock(out, holder.pid)
        assert train.main(flags) == 2
        assert_one_line_error(capsys.readouterr().err, f"--out {out} is in use by pid {holder.pid} on "
                              f"{socket.gethostname()} since 2026-01-01 00:00:00 UTC")
        assert sorted(p.name for p in out.iterdir()) == [lock.NAME]  # nothing written beside it
    finally:
        holder.kill()
        holder.wait()
    assert train.main(flags) == 0
    assert (out / train.STAGES[1] / "DONE").is_file() and not (out / lock.NAME).exists()
    assert train.main([*flags, "--lr", "1e-3", "--overwrite"]) == 0  # --overwrite under the lock
    assert json.loads((out / train.RUN_CONFIG).read_text())["lr"] == 1e-3 and not (out / lock.NAME).exists()


def test_an_unreadable_checkpoint_is_passed_over_for_the_one_before(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(tmp_path, {"w": torch.full((2,), float(step))}, {"step": step})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000001", "ckpt-000002"]
    tensors_file = tmp_path / "ckpt-000002" / checkpoint.TENSORS
    tensors_file.write_bytes(tensors_file.read_bytes()[:40])  # cut short
    notes = []
    tensors, state = checkpoint.load(tmp_path, note=notes.append)
    assert state == {"step": 2} and tensors["w"].tolist() == [2.0, 2.0]
    assert len(notes) == 1 and notes[0].startswith(f"warning: unreadable checkpoint {tmp_path / 'ckpt-000002'} (")
    assert notes[0].endswith(f"resuming from the one before it, {tmp_path / 'ckpt-000001'} (step 2)")
    assert checkpoint.save(tmp_path, {"w": torch.zeros(2)}, {"step": 3}).name == "ckpt-000003"
    (tmp_path / "ckpt-000003" / checkpoint.STATE).write_text('{"step": ')
    tensors_file.unlink()
    notes.clear()
    assert checkpoint.load(tmp_path, note=notes.append) is None
    assert notes[0].startswith(f"warning: no readable checkpoint in {tmp_path} (") and \
        notes[0].endswith("the stage starts over")


def test_resume_after_a_damaged_checkpoint_equals_an_uninterrupted_run(tmp_path, capsys):
    model, loss_fn, batches, val = quadratic_problem()
    trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "a")
    reference = model.weight.detach().clone()

    model, loss_fn, batches, val = quadratic_problem(signal_at=7)  # during step 4
    with pytest.raises(trainer.Interrupted, match="interrupted at step 4"):
        trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "b")
    root = tmp_path / "b" / "checkpoint"
    newest = sorted(root.iterdir())[-1]
    (newest / checkpoint.TENSORS).write_bytes(b"\0" * 16)
    model, loss_fn, batches, val = quadratic_problem()
    result = trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "b")
    err = capsys.readouterr().err
    assert f"warning: unreadable checkpoint {newest}" in err and "(step 3)" in err
    assert result.steps == 6
    torch.testing.assert_close(model.weight.detach(), reference, rtol=0, atol=0)
    assert [r["step"] for r in read_log(tmp_path / "b" / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_stage_4_resumes_with_another_limit_eval_and_reuses_only_matching_predictions(
        tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    """--limit-eval changes no training: a rerun with another value needs no --overwrite, keeps
    the adapters, and evaluates again; predictions finished before a stage-4 failure are reused
    for the same items and only for them."""
    out = tmp_path / "run"
    flags = [f for f in tiny_flags(*tiny_models, data_dir, out, "--max-steps", "2")]
    assert train.main(flags) == 0
    adapters = {s: (out / train.STAGES[s] / "adapter" / "adapter_model.safetensors").read_bytes() for s in (1, 2, 3)}
    scored, real_predict = [], train.predict

    def counting_predict(base, adapter, items, path, args, env):
        scored.append((path.stem, len(items)))
        if path.stem == "mc" and fail["mc"]:
            raise OSError(28, "No space left on device")
        return real_predict(base, adapter, items, path, args, env)
    fail = {"mc": True}
    monkeypatch.setattr(train, "predict", counting_predict)
    i = flags.index("--limit-eval")
    four = flags[:i + 1] + ["4"] + flags[i + 2:]
    assert train.main(four) == 2  # stage 4 fails at Mc
    assert scored == [("m1", 4), ("m2", 4), ("mc", 4)]
    fail["mc"], scored[:] = False, []
    capsys.readouterr()
    assert train.main([*four, "--eval-batch-size", "3"]) == 0  # no --overwrite: the fixed flag resumes
    assert scored == [("mc", 4)]  # M1's and M2's predictions on these 4 items were reused
    out_text = capsys.readouterr().out
    assert all(f"stage {s}: done" in out_text for s in (1, 2, 3))
    assert {s: (out / train.STAGES[s] / "adapter" / "adapter_model.safetensors").read_bytes()
            for s in (1, 2, 3)} == adapters
    stage4 = out / train.STAGES[4]
    assert json.loads((stage4 / "report.json").read_text())["n"] == 4
    assert all(len((stage4 / f"{r}.jsonl").read_text().splitlines()) == 4 for r in ("m1", "m2", "mc"))
    scored[:] = []
    assert train.main(four) == 0 and scored == []  # the same items: stage 4 is done
    assert "stage 4: done" in capsys.readouterr().out
    assert train.main(flags) == 0 and scored == [("m1", 8), ("m2", 8), ("mc", 8)]  # other items: redone
    assert json.loads((stage4 / "report.json").read_text())["n"] == 8


def test_a_full_disk_while_stage_4_writes_names_the_file_and_keeps_finished_work(
        tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    """The disk fills up at each file stage 4 writes, in turn (the disk is full when the file is
    flushed): one error: line names the file, the adapters and the finished predictions stay,
    nothing temporary is left, and the last rerun ends the stage without scoring M1 or M2 again."""
    out = tmp_path / "run"
    flags = tiny_flags(*tiny_models, data_dir, out, "--max-steps", "2")
    stage4 = out / train.STAGES[4]
    real_fsync, real_predict, scored, full = files.fsync_file, train.predict, [], {"name": None}

    def fsync(path):
        if full["name"] and Path(path).name.startswith(f".{full['name']}.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(path)

    def counting_predict(base, adapter, items, path, args, env):
        scored.append(path.stem)
        return real_predict(base, adapter, items, path, args, env)
    monkeypatch.setattr(files, "fsync_file", fsync)
    monkeypatch.setattr(train, "predict", counting_predict)
    kept = {}
    for name in ["mc.jsonl", train.INPUTS, "report.json", "regressions.jsonl", "report.md", train.DONE]:
        full["name"] = name
        assert train.main(flags) == 2
        assert_one_line_error(capsys.readouterr().err, f"error: cannot write {stage4 / name} (No space left on "
                              f"device); finished stages, checkpoints and predictions are kept: free some "
                              f"space, then rerun the same command to resume")
        assert not (stage4 / train.DONE).exists() and not [p for p in stage4.iterdir() if ".tmp-" in p.name]
        finished = {p: p.read_bytes() for s in (1, 2, 3) for p in (out / train.STAGES[s]).rglob("*") if p.is_file()}
        finished.update({stage4 / f"{r}.jsonl": (stage4 / f"{r}.jsonl").read_bytes() for r in ("m1", "m2")})
        assert kept.items() <= finished.items()  # nothing finished before was changed or lost
        kept = finished
    # Mc again after its own file and after inputs.json (its digest unrecorded): never M1 or M2.
    assert scored == ["m1", "m2", "mc", "mc", "mc"]
    full["name"] = None
    assert train.main(flags) == 0 and len(scored) == 5
    assert json.loads((stage4 / "report.json").read_text())["n"] == 8 and (stage4 / train.DONE).is_file()


def test_training_data_that_changed_under_data_dir_is_refused_and_a_copy_resumes(
        tiny_models, data_dir, tmp_path, capsys):
    """--data-dir may move (the training items are compared by their digest), but stage 2 never
    trains on other items than stage 1 did; the stages already trained are kept."""
    import shutil
    copies = {}
    for name, edit in (("copy", False), ("edited", True)):
        copies[name] = tmp_path / name / "piqa"
        shutil.copytree(data_dir / "piqa", copies[name])
        if edit:  # one word of the first training item's goal
            lines = (copies[name] / "train.jsonl").read_text().splitlines(keepends=True)
            record = json.loads(lines[0])
            lines[0] = json.dumps({**record, "goal": record["goal"] + " now"}) + "\n"
            (copies[name] / "train.jsonl").write_text("".join(lines))
    out = tmp_path / "run"
    flags = tiny_flags(*tiny_models, data_dir, out, "--max-steps", "1")
    at = flags.index("--data-dir") + 1
    assert train.main([*flags, "--stage", "1"]) == 0
    adapter = (out / train.STAGES[1] / "adapter" / "adapter_model.safetensors").read_bytes()
    edited = flags[:at] + [str(copies["edited"].parent)] + flags[at + 1:]
    capsys.readouterr()
    assert train.main([*edited, "--stage", "2"]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--out {out} holds a run with a different configuration (the "
                          f"training items differ from those it was trained on, read from --data-dir {data_dir} "
                          f"there, {copies['edited'].parent} now)")
    assert not (out / train.STAGES[2]).exists()
    moved = flags[:at] + [str(copies["copy"].parent)] + flags[at + 1:]
    assert train.main([*moved, "--stage", "2"]) == 0  # the same items from another directory
    assert (out / train.STAGES[2] / train.DONE).is_file()
    assert json.loads((out / train.RUN_CONFIG).read_text())["data_dir"] == str(copies["copy"].parent)
    assert (out / train.STAGES[1] / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_eval_warns_about_an_adapter_of_an_unfinished_stage(tiny_models, data_dir, tmp_path, capsys):
    import eval as ev
    import lora
    import models
    stage = tmp_path / "stage1_task_old"
    model = models.load_model(tiny_models[0])
    lora.add_adapter(model, "task", rank=2, alpha=4)
    lora.save_adapter(model, stage / "adapter", "task", base_model_name_or_path=tiny_models[0])
    log = [{"stage": "stage 1", "epoch": 0, "step": 1, "loss": 2.5}, {"epoch": 0, "step": 3, "val_loss": 2.0,
           "best_epoch": 0}, {"epoch": 1, "step": 6, "val_loss": 1.5, "best_epoch": 1},
           {"epoch": 2, "step": 7, "loss": 1.2}]
    (stage / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log) + '{"epoch": 2, "st')  # cut
    argv = ["--model", tiny_models[0], "--adapter", str(stage / "adapter"), "--task", "piqa", "--data-dir",
            str(data_dir), "--limit", "2", "--out", str(tmp_path / "p.jsonl")]
    assert ev.main(argv) == 0
    assert (f"warning: adapter {stage / 'adapter'} is from an unfinished training stage ({stage} has no DONE; "
            f"its log ends at step 7): it is the best epoch so far (epoch 1), not the stage's result; rerun "
            f"train.py to finish the stage\n") in capsys.readouterr().err
    assert len((tmp_path / "p.jsonl").read_text().splitlines()) == 2  # evaluated all the same
    (stage / "log.jsonl").write_text("")  # a stage killed before its first log line
    assert ev.main(argv) == 0
    assert (f"({stage} has no DONE): it is the best epoch so far, not the stage's result; rerun train.py to "
            f"finish the stage\n") in capsys.readouterr().err
    (stage / "DONE").write_text("{}\n")
    assert ev.main(argv) == 0 and "warning" not in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("{not json", "run_config.json:1: not valid JSON (Expecting property name enclosed in double quotes at line 1 "
                  "column 2); delete it to resume the run with the flags given now"),
    ("[1, 2]", "run_config.json: expected a JSON object, got list; delete it"),
    (b"\xff\xfe{}", "run_config.json: not UTF-8 text (byte 0xff at offset 0); delete it"),
])
def test_a_damaged_run_config_is_named(tiny_models, data_dir, tmp_path, capsys, content, message):
    out = tmp_path / "run"
    out.mkdir()
    path = out / train.RUN_CONFIG
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--stage", "1")) == 2
    assert_one_line_error(capsys.readouterr().err, f"{out / message}")
    assert sorted(p.name for p in out.iterdir()) == [train.RUN_CONFIG]
