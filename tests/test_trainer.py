"""Tests of trainer.py (the learning-rate schedule, fit's stop, NaN and resume) and checkpoint.py."""
import errno
import signal

import pytest
import torch
from safetensors import SafetensorError

import checkpoint
import trainer
from tiny import FIT, quadratic_problem, read_log


def test_lr_schedule_warmup_then_cosine():
    assert [trainer.lr_factor(s, 4, 12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert trainer.lr_factor(8, 4, 12) == pytest.approx(0.5)
    assert trainer.lr_factor(12, 4, 12) == pytest.approx(0.0)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    model, loss_fn, batches, val = quadratic_problem(nan_at=5)  # step 3's first micro-batch
    with pytest.raises(trainer.Diverged, match="loss is nan at step 3.*last good checkpoint"):
        trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path)
    tensors, state = checkpoint.load(tmp_path / "checkpoint")
    assert state["step"] == 2
    torch.testing.assert_close(tensors["param/weight"], model.weight.detach())  # not updated


def test_sigterm_checkpoints_then_resume_matches_an_uninterrupted_run(tmp_path):
    model, loss_fn, batches, val = quadratic_problem()
    whole = trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "a")
    reference = model.weight.detach().clone()

    model, loss_fn, batches, val = quadratic_problem(signal_at=3)  # during step 2
    with pytest.raises(trainer.Interrupted, match="interrupted at step 2.*rerun") as info:
        trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "b")
    assert info.value.signum == signal.SIGTERM
    assert checkpoint.load(tmp_path / "b" / "checkpoint")[1]["step"] == 2
    model, loss_fn, batches, val = quadratic_problem()
    resumed = trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path / "b")
    assert (resumed.steps, resumed.best_epoch) == (whole.steps, whole.best_epoch) == (6, 1)
    torch.testing.assert_close(model.weight.detach(), reference, rtol=0, atol=0)
    log = read_log(tmp_path / "b" / "log.jsonl")
    assert [r["step"] for r in log if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in log if "val_loss" in r] == [0, 1]


def test_best_epoch_is_kept_not_the_last(tmp_path):
    """Validation targets 0 (the initial weights), which training moves away from: epoch 0 stays
    the best and on_best runs once."""
    model, loss_fn, batches, val = quadratic_problem()
    val = [(x, torch.zeros_like(y)) for x, y in val]
    best = []
    result = trainer.fit(model, dict(model.named_parameters()), loss_fn, batches, val, FIT, tmp_path,
                         on_best=best.append)
    val_losses = [r["val_loss"] for r in read_log(tmp_path / "log.jsonl") if "val_loss" in r]
    assert val_losses[0] < val_losses[1]
    assert (result.best_epoch, best, result.best_val_loss) == (0, [0], val_losses[0])


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   # what safetensors raises on a full disk (seen on a full tmpfs)
                                   SafetensorError("Error while serializing: I/O error: No space left on "
                                                   "device (os error 28)")], ids=["OSError", "SafetensorError"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    checkpoint.save(tmp_path, {"w": torch.ones(3)}, {"step": 1})

    def full_disk(*args, **kwargs):
        raise error
    monkeypatch.setattr(checkpoint, "save_file", full_disk)
    with pytest.raises(OSError) as info:
        checkpoint.save(tmp_path, {"w": torch.zeros(3)}, {"step": 2})
    assert str(info.value) == (f"[Errno 28] No space left on device while writing a checkpoint in {tmp_path}; "
                               f"the previous checkpoint {tmp_path / 'ckpt-000000'} is intact: free some space "
                               f"and rerun the same command to resume")
    tensors, state = checkpoint.load(tmp_path)
    assert state == {"step": 1} and tensors["w"].tolist() == [1, 1, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000"]
