"""The loss of one batch in each training stage of train.py, as trainer.fit calls it.

Stages 1-2: next-token cross-entropy on context and answer tokens (paper appendix A.1).
Stage 3: the MUSCLE compatibility loss (paper Sec. 4.1, Eq. 1-2): M1 = base v1 + A1 and M2 =
base v2 + A2 teach the student Mc = base v2 + Ac, each label token following the teacher its
mask picks (muscle.MASKS). The teachers run online, M2 being the student's own base with A2
active (`teacher_mode`), or are read from the teacher store (teacher_store.py). Every loss is
computed from the final hidden states a chunk of positions at a time (muscle.py), so no
full-vocabulary fp32 logits of a whole batch exist.
"""
from __future__ import annotations

import argparse
import contextlib
from typing import Iterator

import torch
from torch import nn

import align
import cross_vocab
import lora
import muscle
import teacher_store
from trainer import LossFn


@contextlib.contextmanager
def teacher_mode(model: nn.Module, adapter: str) -> Iterator[None]:
    """The student's own base with the frozen task adapter, in eval mode and without gradients:
    M2 as a teacher, sharing the weights of base v2 with the student."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), lora.use_adapter(model, adapter):
            yield
    finally:
        model.train(was_training)


# Positions per chunk of logits in the losses: [256, V] fp32 tensors, small next to the blocks'
# activations, and fewer positions than most batches hold, so the logits are split
# (bench/RESULTS.md compares the peak memory with 256 and 1024).
CHUNK_SIZE = 256


def ce_loss(model: nn.Module, chunk_size: int = CHUNK_SIZE) -> LossFn:
    """Stages 1-2: next-token cross-entropy on every real token (context and answer), from the
    final hidden states `chunk_size` positions at a time, so the batch's full-vocabulary fp32
    logits never exist whole (muscle.causal_lm_loss_chunked)."""
    return lambda b: muscle.causal_lm_loss_chunked(model.hidden_states(b["input_ids"], b["attention_mask"]),
                                                   model.lm_head, b["labels"], chunk_size)


def compat_step_loss(b: dict, student: nn.Module, old: nn.Module, args: argparse.Namespace,
                     vmap: cross_vocab.VocabMap | None = None) -> muscle.LossSum:
    """One compatibility step's loss, teachers online (the paper, Sec. 4.1, Eq. 1-2).

    M1 = base v1 + A1 and M2 = base v2 + A2 run without gradients, then the student Mc = base
    v2 + Ac. At every label token t the mask m_t (`--mask`; the paper's `student_correct`:
    m_t = [argmax z_c[t] != y_t]) picks the teacher the student follows:
        L = sum_t T^2 KL(softmax(z_teacher[t] / T) || softmax(z_c[t] / T))  [+ ce_weight * CE]
    with teacher = M1 where m_t, else M2. The logits z, the mask and the KL are computed a chunk
    of positions at a time from the final hidden states, in `muscle.muscle_loss_chunked`.
    M1 reads its own token ids where its tokenizer splits the text differently (align.py), and a
    student position without an M1 counterpart follows M2. With `vmap` (two vocabularies), M1's
    distribution is first mapped onto the student's vocabulary (cross_vocab.py)."""
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        h_old = align.teacher_hidden_states(old, b)  # M1 at the student's positions: [B, T, H_1]
    with teacher_mode(student, "task"):
        h_new = student.hidden_states(ids, mask)  # M2: [B, T, H]
    h = student.hidden_states(ids, mask)  # Mc, with gradients: [B, T, H]
    heads = (student.lm_head, old.lm_head, student.lm_head)
    if vmap is not None:
        return cross_vocab.muscle_loss_cross(
            h, h_old, h_new, heads, b["labels"], align.has_counterpart(b), vmap,
            args.cross_vocab, args.mask, args.temperature, args.ce_weight, args.chunk_size)
    return muscle.muscle_loss_chunked(h, h_old, h_new, heads, b["labels"], mask=args.mask,
                                      temperature=args.temperature, ce_weight=args.ce_weight,
                                      chunk_size=args.chunk_size, old_valid=align.has_counterpart(b))


def stored_compat_step_loss(b: dict, student: nn.Module, store: teacher_store.TeacherStore,
                            args: argparse.Namespace) -> muscle.LossSum:
    """One compatibility step's loss with --teachers store: the same loss as `compat_step_loss`,
    with the teachers' stored top-k distributions in place of their forwards (no teacher runs;
    muscle.stored_muscle_loss_chunked)."""
    old, new = store.batch_fields(b)
    h = student.hidden_states(b["input_ids"], b["attention_mask"])  # Mc: [B, T, H]
    return muscle.stored_muscle_loss_chunked(h, student.lm_head, old, new, b["labels"],
                                             mask=args.mask, temperature=args.temperature,
                                             ce_weight=args.ce_weight, chunk_size=args.chunk_size,
                                             old_valid=align.has_counterpart(b))


def compat_loss(student: nn.Module, old: nn.Module, args: argparse.Namespace,
                vmap: cross_vocab.VocabMap | None = None) -> LossFn:
    """Stage 3's loss function for `fit`, teachers online: `compat_step_loss` on each batch."""
    return lambda b: compat_step_loss(b, student, old, args, vmap)


def stored_compat_loss(student: nn.Module, store: teacher_store.TeacherStore,
                       args: argparse.Namespace) -> LossFn:
    """Stage 3's loss function for `fit`, teachers from the store: `stored_compat_step_loss`."""
    return lambda b: stored_compat_step_loss(b, student, store, args)
