"""The training data of train.py's stages: the task's 80/20 split, tokenised, and micro-batches.

Each stage reads the paper's seeded 80/20 train/validation split of the task's training set
(appendix A.1), tokenised by the stage's own model, with the loss on context and answer tokens.
Micro-batches are global (the same flags give the same batches on any number of processes) and
dealt out round-robin over the ranks. Stage 3 also carries M1's own tokens of the same examples
where M1's tokenizer splits the text differently (align.py), or, across two vocabularies, where
the two tokenizations line up by text (cross_vocab.py).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

import align
import cross_vocab
import data
import models
import muscle
from distributed import Dist


class Batches(Sequence):
    """This rank's micro-batches: global micro-batches of `batch_size` sequences, rows dealt out
    round-robin over ranks (rank r takes rows r, r + W, ...), collated on access. The same
    flags give the same global batches, and the same numbers, on any number of processes.

    `groups` hold indices into `examples`; each batch's "index" is its rows' example keys
    (key_offset + index; -1 for a filler row), which the teacher store is keyed by. With
    `teacher` rows (M1's own tokens of the same examples, align.py), a batch also holds
    M1's inputs and the alignment (align.collate)."""

    def __init__(self, examples: list[data.Example], groups: list[list[int]], pad_id: int, env: Dist,
                 key_offset: int = 0, teacher: list[align.Row] | None = None, teacher_pad_id: int = 0):
        self.examples, self.groups, self.pad_id, self.env = examples, groups, pad_id, env
        self.key_offset, self.teacher, self.teacher_pad_id = key_offset, teacher, teacher_pad_id

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rows = self.groups[i][self.env.rank::self.env.world]
        examples = [self.examples[j] for j in rows]
        keys = [self.key_offset + j for j in rows]
        teacher = [self.teacher[j] for j in rows] if self.teacher is not None else None
        if not rows:
            # A rank left without a row (a short last batch) runs one padding token without a
            # label: FSDP's collectives need every rank in every forward, and it adds 0 tokens.
            examples, keys = [([self.pad_id], [muscle.IGNORE_INDEX])], [-1]
            teacher = [([self.teacher_pad_id], [align.NO_POSITION])] if teacher is not None else None
        batch = {**data.collate(examples, self.pad_id), "index": torch.tensor(keys)}
        if teacher is not None:
            batch.update(align.collate(teacher, self.teacher_pad_id, batch["input_ids"].shape[1]))
        return {k: v.to(self.env.device) for k, v in batch.items()}


@dataclass
class TaskData:
    train: list[data.Example]
    val: list[data.Example]
    pad_id: int
    teacher: align.TeacherTokens | None = None  # stage 3: M1's tokens where they differ

    def _batches(self, part: str, groups: list[list[int]], env: Dist, key_offset: int) -> Batches:
        teacher = getattr(self.teacher, part) if self.teacher is not None else None
        pad = self.teacher.pad_id if self.teacher is not None else 0
        return Batches(getattr(self, part), groups, self.pad_id, env, key_offset, teacher, pad)

    def train_batches(self, batch_size: int, seed: int, env: Dist) -> Callable[[int], Batches]:
        """Epoch -> its micro-batches, shuffled with a seed derived from (seed, epoch)."""
        # data.batches groups by the length of each element's first item (the input ids), so
        # (input ids, index) pairs come back grouped exactly as the examples would.
        keyed = [(ids, i) for i, (ids, _) in enumerate(self.train)]

        def epoch_batches(epoch: int) -> Batches:
            groups = data.batches(keyed, batch_size, seed=seed * 1000 + epoch)
            return self._batches("train", [[i for _, i in g] for g in groups], env, 0)
        return epoch_batches

    def val_batches(self, batch_size: int, env: Dist) -> Batches:
        """Validation examples in order; their keys follow the training examples' keys."""
        order = list(range(len(self.val)))
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        return self._batches("val", groups, env, len(self.train))


def task_data(args: argparse.Namespace, stage: int, env: Dist, cross: bool = False) -> TaskData:
    """The paper's seeded 80/20 train/validation split of the task's training set, tokenised
    (loss on context and answer, appendix A.1; long contexts truncated from the left) by the
    stage's own model: --old's tokenizer for stage 1, the student's (--new's) for stages 2 and
    3. Stage 3 also holds M1's own tokens of the same examples where they differ (align.py), or,
    across two vocabularies (`cross`), aligned by text (cross_vocab.teacher_tokens)."""
    items = training_items(args)
    pairs = [[data.training_pair(args.task, it) for it in part]
             for part in data.split_train_val(items, seed=args.seed, frac=0.8)]
    tokenizer = models.load_tokenizer(args.old if stage == 1 else args.new)
    encoded = [data.encode_pairs(tokenizer, part, args.max_len) for part in pairs]
    truncated = encoded[0][1] + encoded[1][1]
    if truncated and env.main:
        print(f"note: {truncated} of {len(items)} training sequences were longer than --max-len "
              f"{args.max_len} and lost the start of their context")
    examples = [part for part, _ in encoded]
    teacher = None
    if stage == 3:
        old_tokenizer = models.load_tokenizer(args.old)
        if cross:
            teacher = cross_vocab.teacher_tokens(tokenizer, old_tokenizer, pairs, examples,
                                                 args.max_len)
        else:
            old_examples = [data.encode_pairs(old_tokenizer, part, args.max_len)[0] for part in pairs]
            teacher = align.teacher_tokens(examples, old_examples, old_tokenizer.pad_id)
    return TaskData(examples[0], examples[1], tokenizer.pad_id, teacher)


def training_items(args: argparse.Namespace) -> list:
    """The task's training items stages 1-3 read (both parts of the 80/20 split)."""
    return data.load_task(args.task, "train", args.data_dir)[:args.limit_train]
