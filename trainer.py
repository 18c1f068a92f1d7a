"""The training loop shared by train.py's stages and toy.py's pre-training: `fit`.

`fit` trains any set of parameters on any loss `(batch) -> (loss_sum, n_tokens)`: AdamW, linear
warm-up then cosine decay, gradient accumulation with the loss normalised by the number of label
tokens over micro-batches and ranks (muscle.py, "Conventions"), gradient clipping, validation loss after
each epoch with a callback on the best epoch (paper appendix A.1), atomic checkpoints every
`save_every` steps and every epoch, exact resume, a clean stop on SIGINT/SIGTERM (checkpoint
first) and on a NaN/infinite loss (nothing updated), tqdm progress and a JSON-lines log.
"""
from __future__ import annotations

import contextlib
import json
import math
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from tqdm import tqdm

import checkpoint
import cli
import distributed
import files
from distributed import Dist

@dataclass
class FitConfig:
    """Optimisation settings; the defaults are the paper's (appendix A.1) where it gives them."""

    epochs: int = 10
    lr: float = 1e-4
    warmup_steps: int = 500
    weight_decay: float = 0.0
    grad_accum: int = 8
    max_grad_norm: float = 1.0  # not stated in the paper; the HF Trainer / DeepSpeed default
    max_steps: int | None = None
    save_every: int = 0  # optimizer steps between checkpoints (0: at the end of each epoch only)
    log_every: int = 10
    seed: int = 0


@dataclass
class FitResult:
    best_epoch: int
    best_val_loss: float
    steps: int


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint is from before it happened."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; a checkpoint was written. `signum` says which signal."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


LossFn = Callable[[Any], tuple[torch.Tensor, int]]


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (HF's cosine schedule).

    `step` counts finished optimizer steps, so the first update uses factor 1/warmup.
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@contextlib.contextmanager
def stop_requests() -> Iterator[list[int]]:
    """Turn SIGINT/SIGTERM into a request ([signum, ...]) that the loop honours at the next step
    boundary, with a checkpoint. A second Ctrl-C interrupts at once; SIGTERM never does, because
    torchrun forwards one to every worker after a Ctrl-C and the checkpoint must still finish."""
    requested: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # only it may set handlers
        yield requested
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and signal.SIGINT in requested:
            raise KeyboardInterrupt
        requested.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _step_seed(seed: int, step: int, rank: int) -> int:
    """Dropout's RNG is reseeded from (seed, step, rank) each step, so a resumed run draws the
    same masks as an uninterrupted one and the checkpoint needs no RNG state."""
    return (seed * 1_000_003 + step) * 1009 + rank


def accumulate_gradients(loss_fn: LossFn, micro_batches: Sequence[Any],
                         model: nn.Module | None = None) -> tuple[float, int]:
    """Backpropagate the *summed* loss of each micro-batch; returns (loss sum, label tokens).

    Gradients are normalised afterwards by the token count of the whole step (scale_gradients),
    so micro-batches of unequal length weigh each token equally, as one big batch would. An
    FSDP `model` reduces gradients across ranks once, after the last micro-batch.
    """
    loss_sum, tokens = 0.0, 0
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss, n = loss_fn(batch)[:2]
        loss.backward()
        loss_sum, tokens = loss_sum + loss.item(), tokens + n
    return loss_sum, tokens


def scale_gradients(params, factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


class Trainer:
    """State of one `fit` call: the optimizer, the position in the data, the best epoch so far."""

    def __init__(self, model: nn.Module, params: dict[str, nn.Parameter], loss_fn: LossFn,
                 cfg: FitConfig, run_dir: Path, env: Dist, desc: str = "train"):
        self.model, self.params, self.loss_fn, self.cfg, self.env = model, params, loss_fn, cfg, env
        self.desc = desc
        self.run_dir = Path(run_dir)
        self.optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.state = {"epoch": 0, "step_in_epoch": 0, "step": 0, "best_val_loss": math.inf,
                      "best_epoch": -1}

    # ----------------------------------------------------------------- checkpoints
    def save(self) -> None:
        """Gather parameters and AdamW moments on every rank; rank 0 writes the checkpoint."""
        tensors = {f"param/{n}": distributed.full_tensor(p) for n, p in self.params.items()}
        for n, p in self.params.items():
            for key, value in self.optimizer.state.get(p, {}).items():
                tensors[f"optim/{n}/{key}"] = distributed.full_tensor(value)
        if self.env.main:
            checkpoint.save(self.run_dir / "checkpoint", tensors, self.state)
        distributed.barrier(self.env)

    def restore(self) -> bool:
        """Load the latest checkpoint if there is one (all ranks read it)."""
        found = checkpoint.load(self.run_dir / "checkpoint", note=self.note)
        if found is None:
            return False
        tensors, self.state = found
        for n, p in self.params.items():
            distributed.load_full(p, tensors[f"param/{n}"])
            moments = {k.rsplit("/", 1)[1]: v for k, v in tensors.items()
                       if k.startswith(f"optim/{n}/")}
            if moments:
                self.optimizer.state[p] = {k: self._like(p, k, v) for k, v in moments.items()}
        return True

    @staticmethod
    def _like(p: nn.Parameter, key: str, value: torch.Tensor) -> torch.Tensor:
        if key == "step":  # AdamW keeps a scalar step count
            return value.clone()
        target = torch.zeros_like(p)
        distributed.load_full(target, value)
        return target

    # ----------------------------------------------------------------- one optimizer step
    def step(self, micro_batches: Sequence[Any], stop: list[int],
             total_steps: int) -> tuple[float, int, bool]:
        """One optimizer step on `micro_batches`: token-normalised gradients, clipping, AdamW.

        Returns (mean loss over the step's label tokens on all ranks, tokens, stop requested on
        any rank); raises Diverged, without updating, on a NaN or infinite loss."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(_step_seed(cfg.seed, self.state["step"], env.rank))
        self.model.train()
        loss_sum, tokens = accumulate_gradients(self.loss_fn, micro_batches, self.model)
        loss_sum, tokens, stop_votes = distributed.all_reduce_sum(
            [loss_sum, float(tokens), float(bool(stop))], env)
        mean = loss_sum / max(tokens, 1)
        if not math.isfinite(mean):
            self.optimizer.zero_grad(set_to_none=True)
            raise Diverged(f"loss is {mean} at step {self.state['step'] + 1}; stopped without "
                           f"updating. The last good checkpoint is in {self.run_dir / 'checkpoint'}; "
                           f"lower --lr or check the data, then rerun to resume from it")
        # FSDP averages gradients over ranks, so the sum over ranks is world size times that.
        scale_gradients(self.params.values(), env.world / max(tokens, 1))
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), cfg.max_grad_norm)
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.state["step"], cfg.warmup_steps, total_steps)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state["step"] += 1
        self.state["step_in_epoch"] += 1
        return mean, int(tokens), stop_votes > 0

    @torch.no_grad()
    def validation_loss(self, batches: Sequence[Any]) -> float:
        self.model.eval()
        loss_sum, tokens = 0.0, 0
        for batch in batches:
            loss, n = self.loss_fn(batch)[:2]
            loss_sum, tokens = loss_sum + loss.item(), tokens + n
        loss_sum, tokens = distributed.all_reduce_sum([loss_sum, float(tokens)], self.env)
        return loss_sum / max(tokens, 1)

    def note(self, message: str) -> None:
        if self.env.main:
            cli.say(message)

    def log(self, record: dict) -> None:
        if self.env.main:
            files.append_line(self.run_dir / "log.jsonl", json.dumps({"stage": self.desc, **record}))

    def trim_log(self) -> None:
        """Drop the log records of work after the checkpoint being resumed (a crash, SIGKILL or
        full disk before it was saved): that work is redone and logged again, once."""
        path = self.run_dir / "log.jsonl"
        if not (self.env.main and path.is_file()):
            return
        kept = []
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):  # a line cut short by SIGKILL
                record = json.loads(line)
                if (record["epoch"] < self.state["epoch"] if "val_loss" in record
                        else record["step"] <= self.state["step"]):
                    kept.append(line + "\n")
        files.write_text_atomic(path, "".join(kept))

    def train_epoch(self, steps: Sequence[Sequence[Any]], stop: list[int], total: int,
                    bar: tqdm) -> None:
        """The epoch's remaining optimizer steps, with logging, periodic checkpoints and the
        checkpoint-then-Interrupted exit on a stop request."""
        state, cfg = self.state, self.cfg
        tick, seen = time.perf_counter(), 0
        while state["step_in_epoch"] < len(steps) and state["step"] < total:
            loss, tokens, stop_now = self.step(steps[state["step_in_epoch"]], stop, total)
            seen += tokens
            rate = seen / (time.perf_counter() - tick)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}", epoch=state["epoch"])
            if state["step"] % cfg.log_every == 0 or state["step"] == 1:
                self.log({"epoch": state["epoch"], "step": state["step"], "loss": loss,
                          "lr": self.optimizer.param_groups[0]["lr"], "tokens_per_s": rate})
            if stop_now:
                self.interrupt(stop)
            if cfg.save_every and state["step"] % cfg.save_every == 0:
                self.save()

    def end_epoch(self, val_batches: Sequence[Any], on_best: Callable[[int], None] | None) -> None:
        """Validation loss; on a new best, `on_best`; then a checkpoint at the next epoch's start."""
        state = self.state
        val = self.validation_loss(val_batches)
        if val < state["best_val_loss"]:
            state["best_val_loss"], state["best_epoch"] = val, state["epoch"]
            if on_best is not None:
                on_best(state["epoch"])
        self.log({"epoch": state["epoch"], "step": state["step"], "val_loss": val,
                  "best_epoch": state["best_epoch"]})
        state["epoch"] += 1
        state["step_in_epoch"] = 0
        self.save()

    def interrupt(self, stop: list[int]) -> None:
        """Checkpoint, then raise Interrupted (every rank, after a vote that reached all)."""
        self.save()
        raise Interrupted(stop[0] if stop else signal.SIGTERM,
                          f"interrupted at step {self.state['step']}: checkpoint saved in "
                          f"{self.run_dir / 'checkpoint'}; rerun the same command to resume")


def fit(model: nn.Module, params: dict[str, nn.Parameter], loss_fn: LossFn,
        train_batches: Callable[[int], Sequence[Any]], val_batches: Sequence[Any],
        cfg: FitConfig, run_dir: str | Path, env: Dist = Dist(),
        on_best: Callable[[int], None] | None = None, desc: str = "train") -> FitResult:
    """Train `params` to minimise loss_fn, validating after each epoch; resume if run_dir has a
    checkpoint.

    `loss_fn(batch)` returns (loss summed over label tokens, number of label tokens);
    `train_batches(epoch)` gives this rank's micro-batches of that epoch (the same number on every
    rank), `grad_accum` of which make one optimizer step. `on_best(epoch)` runs (on every rank)
    when the validation loss improves, to save the best model (paper A.1: selection by validation
    loss after each epoch). Writes run_dir/log.jsonl and run_dir/checkpoint.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, params, loss_fn, cfg, run_dir, env, desc)
    trainer.restore()
    trainer.trim_log()
    state = trainer.state
    total = cfg.epochs * math.ceil(len(train_batches(0)) / cfg.grad_accum)
    total = min(total, cfg.max_steps) if cfg.max_steps else total
    with stop_requests() as stop, tqdm(total=total, initial=state["step"], desc=desc,
                                       disable=not env.main, dynamic_ncols=True) as bar:
        while state["epoch"] < cfg.epochs and state["step"] < total:
            micro = train_batches(state["epoch"])
            steps = [micro[i:i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
            trainer.train_epoch(steps, stop, total, bar)
            trainer.end_epoch(val_batches, on_best)
        # A signal during the last validation: the stage is complete, but the process must stop.
        if distributed.all_reduce_sum([float(bool(stop))], env)[0]:
            trainer.interrupt(stop)
    return FitResult(state["best_epoch"], state["best_val_loss"], state["step"])
