"""Lining up the old model's positions with the student's in stage 3 (train.py).

The MUSCLE loss (paper section 4.1, eq. 1) compares, at every training position, the student's
next-token distribution with M1's and M2's. M2 is the student's own base and reads the
student's tokens. M1 reads the same text through its own tokenizer, which can give other ids
for it: a BOS that only one tokenizer adds, another normalisation of spaces, a truncation that
cut one more token. With one vocabulary, a student position and an M1 position compare when
both predict the same token of the same text.

`teacher_positions` finds them. It aligns the two id sequences by their longest matching blocks
(difflib's SequenceMatcher, Ratcliff-Obershelp), and gives each student position whose next
token is matched to an M1 token the M1 position just before that token. A student position has
no counterpart (-1) when its next token is not matched, or when nothing precedes the matched
token on M1's side (the first text token after a BOS that only the student has). The loss lets
M2's distribution stand in for M1's at those positions (`muscle.muscle_loss_chunked`'s
`old_valid`), so every mask follows M2 there.

When M1's tokenizer gives the student's ids for every example, `teacher_tokens` returns None and
stage 3 feeds the student's batch to M1 unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from difflib import SequenceMatcher
from typing import Sequence

import torch

NO_POSITION = -1

Row = tuple[list[int], list[int]]  # (M1's input ids, M1 position of each student position)


def teacher_positions(student_ids: Sequence[int], teacher_ids: Sequence[int]) -> list[int]:
    """For each student position s (predicting student_ids[s + 1]), the teacher position that
    predicts the same token of the same text, or NO_POSITION (see the module docstring)."""
    positions = [NO_POSITION] * len(student_ids)
    matcher = SequenceMatcher(None, student_ids, teacher_ids, autojunk=False)
    for s_start, t_start, size in matcher.get_matching_blocks():
        for k in range(size):
            s, t = s_start + k - 1, t_start + k - 1  # the positions predicting the matched token
            if s >= 0 and t >= 0:
                positions[s] = t
    return positions


@dataclass
class TeacherTokens:
    """M1's own tokens of the training and validation examples, with their alignment."""
    train: list[Row]
    val: list[Row]
    pad_id: int


def teacher_tokens(student: Sequence[Sequence[tuple[list[int], list[int]]]],
                   teacher: Sequence[Sequence[tuple[list[int], list[int]]]],
                   pad_id: int) -> TeacherTokens | None:
    """The (train, val) examples as M1 tokenises them, aligned to the student's (train, val)
    examples; None when every example has the same ids on both sides."""
    if all(s[0] == t[0] for part_s, part_t in zip(student, teacher) for s, t in zip(part_s, part_t)):
        return None
    train, val = ([(t_ids, teacher_positions(s_ids, t_ids)) for (s_ids, _), (t_ids, _) in zip(ps, pt)]
                  for ps, pt in zip(student, teacher))
    return TeacherTokens(train, val, pad_id)


def collate(rows: Sequence[Row], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """M1's batch: right-padded `old_input_ids` and `old_attention_mask`, and `old_positions`
    [rows, width] (the student batch's width; NO_POSITION on padding)."""
    teacher_width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), teacher_width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), teacher_width), dtype=torch.long)
    positions = torch.full((len(rows), width), NO_POSITION, dtype=torch.long)
    for row, (row_ids, row_positions) in enumerate(rows):
        ids[row, :len(row_ids)] = torch.tensor(row_ids, dtype=torch.long)
        mask[row, :len(row_ids)] = 1
        positions[row, :len(row_positions)] = torch.tensor(row_positions, dtype=torch.long)
    return {"old_input_ids": ids, "old_attention_mask": mask, "old_positions": positions}


def gather(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """M1's hidden states [B, T_teacher, H] at the student's positions [B, T]: [B, T, H].
    Positions without a counterpart read position 0; the loss does not use them."""
    index = positions.clamp(min=0).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    return hidden.gather(1, index)


def teacher_hidden_states(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """M1's final hidden states at the student's positions [B, T, H]: from the student's own ids
    when the batch holds no M1 tokens (same ids), else from M1's ids, gathered."""
    if "old_input_ids" not in batch:
        return model.hidden_states(batch["input_ids"], batch["attention_mask"])
    return gather(model.hidden_states(batch["old_input_ids"], batch["old_attention_mask"]),
                  batch["old_positions"])


def has_counterpart(batch: dict) -> torch.Tensor | None:
    """[B, T] bool: where M1 has a counterpart of the student's position; None: everywhere."""
    return batch["old_positions"] != NO_POSITION if "old_positions" in batch else None
