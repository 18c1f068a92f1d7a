"""The teachers' hidden states kept across epochs of stage 3 (train.py --teacher-cache memory).

Stage 3 runs two frozen teachers (M1, M2) on every batch. Their outputs for one sequence never
change, so from the second epoch on they can be read back instead of recomputed.
"""
from __future__ import annotations

from typing import Callable

import torch


class TeacherCache:
    """The two teachers' final hidden states (M1, M2) of each example seen, kept in host memory.

    Both teachers are frozen and run in eval mode (no dropout), so their hidden states for one
    sequence are the same in every epoch: from the second epoch on, a step needs only the
    student's forward and backward and the loss (bench/RESULTS.md: a compatibility step costs
    about 1.25x a task step instead of 2x). Entries are keyed by example (a batch's "index":
    batches are reshuffled every epoch) and hold each row's real positions in the model's
    dtype, exactly what the teachers would recompute; cost: 2 x hidden x dtype bytes per token
    (7B in bf16: 16 KiB). A restarted run starts empty and refills as it goes.
    """

    def __init__(self) -> None:
        self.store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # key -> [length, hidden] x 2, CPU

    def get(self, batch: dict, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_old, h_new) [B, T, hidden] of `batch`: from the store when it holds every row,
        else from `compute()`, whose rows are then stored. Positions past a row's length (and
        filler rows, key -1) are zero: they carry no label, so the loss never reads them."""
        keys, lengths = batch["index"].tolist(), batch["attention_mask"].sum(1).tolist()
        if not self.store or not all(k in self.store for k in keys if k >= 0):
            h_old, h_new = compute()
            for row, (key, n) in enumerate(zip(keys, lengths)):
                if key >= 0:
                    self.store[key] = tuple(h[row, :n].to("cpu", copy=True) for h in (h_old, h_new))
            return h_old, h_new
        width, device = batch["input_ids"].shape[1], batch["input_ids"].device
        outs = tuple(h.new_zeros(len(keys), width, h.shape[-1], device=device)
                     for h in next(iter(self.store.values())))
        for row, key in enumerate(keys):
            for out, h in zip(outs, self.store.get(key, ())):
                out[row, :len(h)] = h
        return outs
