"""The MUSCLE loss: masked knowledge distillation from two teachers (paper section 4.1, eqs. 1-2).

For every training token t with next-token label y_t there are three sets of logits:
z_c (the compatibility model Mc being trained), z_1 (old task model M1, frozen) and z_2 (new task
model M2, frozen). A *mask* decides, per token, which teacher the student follows:

    L = 1/|tokens| * sum_t  T^2 * KL( softmax(z_teacher[t] / T) || softmax(z_c[t] / T) )
        [+ ce_weight * CE(z_c[t], y_t)]        with teacher = M1 where follow_old[t] else M2

The paper's mask (the default, "student_correct") sends the student to the old model exactly
where the student itself gets the token wrong; section 6.5 / Table 6 compares the other entries
of `MASKS`. A new strategy is one function `(student, old, new, labels) -> follow_old` plus one
entry in `MASKS`.

The T^2 factor. The paper's equation has none; we apply Hinton et al.'s T^2 so that gradient
magnitudes do not shrink as 1/T^2 when T grows, which keeps `ce_weight` meaning the same thing
at any temperature. With AdamW and ce_weight = 0 (the paper's default runs) a constant factor on
the loss does not change the update direction, so this choice only matters for the "CE+" runs.

Conventions: labels are the input ids themselves with -100 on positions that carry no loss; the
loss shifts them (logits at position t are scored against labels[t + 1]). Losses come back as a
*sum* over real label tokens plus the token count: the caller divides by the count summed over
micro-batches and ranks, so two micro-batches give the gradient of one batch (torchtune's
SFT recipes normalise the same way; a per-micro-batch mean would weight short batches more).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 for softmax statistics (bf16 logits lose the tails); float64 stays."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


# --------------------------------------------------------------------------------------------
# Masks. Inputs are *aligned* (already shifted): logits [B, T, V] and labels [B, T], position t
# of the logits predicts labels[t] (per-position masks may also get [N, V] and [N]).
# Output: bool of the labels' shape, True = follow the old model M1.
# Values at ignored positions are irrelevant (the loss drops them). Computed without gradient.
# The teachers may also come as stored fields (`TeacherFields`: argmax and label log-prob), so a
# mask that reads only `x.argmax(-1)` and `_label_logprob(x, labels)` of a teacher works with
# teachers stored on disk too (teacher_store.py); the student always comes as full logits.


def _label_logprob(logits: "torch.Tensor | TeacherFields", labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position, at temperature 1; ignored labels read token 0.
    A stored teacher (`TeacherFields`) gives its stored value."""
    if isinstance(logits, TeacherFields):
        return logits.label_logp
    logp = torch.log_softmax(upcast(logits), dim=-1)
    return logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)


def student_correct(student, old, new, labels):
    """The paper's mask (eq. 1): follow M1 where the student's argmax is not the label."""
    return student.argmax(-1) != labels


def token_likelihood(student, old, new, labels):
    """Table 6 ablation: follow M1 where it gives the label a higher probability than the student."""
    return _label_logprob(student, labels) < _label_logprob(old, labels)


def instance_likelihood(student, old, new, labels):
    """Table 6 ablation: as token_likelihood, but on the whole sequence's log-likelihood.

    One decision per sequence (row), broadcast over its tokens. Needs whole rows: see
    `SEQUENCE_MASKS`.
    """
    real = labels != IGNORE_INDEX
    ll_student = (_label_logprob(student, labels) * real).sum(-1, keepdim=True)
    ll_old = (_label_logprob(old, labels) * real).sum(-1, keepdim=True)
    return (ll_student < ll_old).expand_as(labels)


def old_correct(student, old, new, labels):
    """Table 6 ablation: follow M1 where M1 predicts the label."""
    return old.argmax(-1) == labels


def no_mask(student, old, new, labels):
    """Table 6 ablation: plain distillation from M1 at every token."""
    return torch.ones_like(labels, dtype=torch.bool)


def new_only(student, old, new, labels):
    """Control (not in the paper): follow M2 everywhere, so M1 is never used. What is left is
    stage 3 as more training of M2's adapter (self-distillation, + CE when asked); a mask's gain
    over this control is what the old model contributes."""
    return torch.zeros_like(labels, dtype=torch.bool)


MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

MASKS: dict[str, MaskFn] = {
    "student_correct": student_correct,
    "token_likelihood": token_likelihood,
    "instance_likelihood": instance_likelihood,
    "old_correct": old_correct,
    "none": no_mask,
    "new_only": new_only,
}

# Masks that look at a whole row at once; the chunked loss keeps rows whole for them
# (all other masks are per position, and the chunked loss packs real tokens from all rows).
SEQUENCE_MASKS = {"instance_likelihood"}
# Masks that never read M1's logits: a loss that must first compute or map M1's distribution
# for the mask (cross_vocab.muscle_loss_cross) skips that work for them.
MASKS_IGNORING_OLD = {"student_correct", "new_only", "none"}


def get_mask(name: str) -> MaskFn:
    """The mask function registered under `name`, with a clear error for unknown names."""
    if name not in MASKS:
        raise ValueError(f"unknown MUSCLE mask {name!r}; choose one of {sorted(MASKS)}")
    return MASKS[name]


# --------------------------------------------------------------------------------------------
# The loss on aligned logits (the shared core of the plain and the chunked versions).


class LossSum(NamedTuple):
    """A loss summed over real label tokens, their count, and how many followed the old model.

    Across two vocabularies (cross_vocab.py) also: the label tokens whose position aligns with
    one of the old model's, the old model's probability mass mapped at those positions (a sum),
    and the tokens where the mask asked for M1 at a position without one (they follow M2)."""

    loss: torch.Tensor
    tokens: int
    follow_old: int
    aligned: int = 0
    mapped_mass: float = 0.0
    unaligned: int = 0


def _aligned_loss(student: torch.Tensor, old: torch.Tensor, new: torch.Tensor,
                  labels: torch.Tensor, mask: str, temperature: float,
                  ce_weight: float, old_valid: torch.Tensor | None = None) -> LossSum:
    """Summed masked KL (+ CE) over the positions of `labels` that are not IGNORE_INDEX.
    Where `old_valid` is False, M1 has no counterpart of the position (its tokenizer split the
    text otherwise): M2's logits stand in for M1's, so every mask follows M2 there."""
    real = labels != IGNORE_INDEX
    student, old, new = upcast(student), upcast(old), upcast(new)
    with torch.no_grad():
        if old_valid is not None:
            old = torch.where(old_valid.unsqueeze(-1), old, new)
        follow_old = get_mask(mask)(student, old, new, labels) & real
        if old_valid is not None:
            follow_old &= old_valid
        teacher = torch.where(follow_old.unsqueeze(-1), old, new)
        teacher_logp = torch.log_softmax(teacher / temperature, dim=-1)
    per_token = distill_per_token(student, teacher_logp, labels, temperature, ce_weight)
    return LossSum(per_token[real].sum(), int(real.sum()), int(follow_old.sum()))


def distill_per_token(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      temperature: float, ce_weight: float, log_target: bool = True) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(student / T)) (+ ce_weight * CE on labels) per position.

    `student` holds fp32 logits [..., V]; `teacher` the teacher's log-probabilities at T (or its
    probabilities, with log_target False: zero entries then add exactly 0)."""
    student_logp = torch.log_softmax(student / temperature, dim=-1)
    return _kl_plus_ce(student_logp, teacher, student, labels, temperature, ce_weight, log_target)


def _kl_plus_ce(student_logp: torch.Tensor, teacher: torch.Tensor, student: torch.Tensor,
                labels: torch.Tensor, temperature: float, ce_weight: float,
                log_target: bool = True) -> torch.Tensor:
    """T^2 * KL(teacher || student) over the last dimension of two distributions at T (the whole
    vocabulary, or top-k buckets), + ce_weight * CE of the student's full logits, per position."""
    kl = F.kl_div(student_logp, teacher, log_target=log_target, reduction="none").sum(-1)
    per_token = temperature**2 * kl
    if ce_weight:
        ce = F.cross_entropy(student.flatten(0, -2), labels.flatten().clamp(min=0),
                             reduction="none").view_as(labels)
        per_token = per_token + ce_weight * ce
    return per_token


def _shift(x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop the last position of x and the first label: x[:, t] is scored against labels[:, t+1]."""
    return x[:, :-1], labels[:, 1:]


def muscle_loss(student_logits: torch.Tensor, old_logits: torch.Tensor,
                new_logits: torch.Tensor, labels: torch.Tensor, mask: str = "student_correct",
                temperature: float = 2.0, ce_weight: float = 0.0,
                old_valid: torch.Tensor | None = None) -> LossSum:
    """The MUSCLE loss on full logits [B, T, V] and labels [B, T] (= input ids, -100 = no loss).

    Gradients flow only into `student_logits`; the teachers' logits are treated as constants.
    `old_valid` [B, T] (None: everywhere) says at which positions `old_logits` are M1's own.
    Returns the sum over real label tokens; divide by the global token count.
    """
    student, labels = _shift(student_logits, labels)
    valid = None if old_valid is None else old_valid[:, :-1]
    return _aligned_loss(student, old_logits[:, :-1].detach(), new_logits[:, :-1].detach(),
                         labels, mask, temperature, ce_weight, valid)


# --------------------------------------------------------------------------------------------
# Chunked: hidden states in, scalar out; each chunk's logits are made, used and freed in turn.


Head = Callable[[torch.Tensor], torch.Tensor]


def _chunks(labels: torch.Tensor, whole_rows: bool, chunk_size: int):
    """Indices (along dim 0) of the chunks of `labels`, which is already shifted.

    Per-position losses get labels flattened to [B*T]: only real label tokens, packed across rows
    into chunks of `chunk_size` (padding is never projected). Sequence masks (`whole_rows`) get
    [B, T]: groups of whole rows of about `chunk_size` positions.
    """
    if whole_rows:
        rows = max(1, chunk_size // max(labels.shape[1], 1))
        for start in range(0, labels.shape[0], rows):
            yield slice(start, start + rows)
        return
    real = (labels != IGNORE_INDEX).nonzero().squeeze(-1)
    for start in range(0, real.numel(), chunk_size):
        yield real[start:start + chunk_size]


def trainable(head: Head) -> list[torch.Tensor]:
    """The head's parameters that need gradients (none for a frozen lm_head or a plain function)."""
    return [p for p in getattr(head, "parameters", list)() if p.requires_grad]


def chunked_sum(chunk_loss: Callable[..., LossSum], inputs: Sequence[torch.Tensor],
                 labels: torch.Tensor, whole_rows: bool, chunk_size: int,
                 params: Sequence[torch.Tensor] = ()) -> LossSum:
    """Sum of `chunk_loss(*(x[idx] for x in inputs), labels[idx])` over the chunks of `labels`
    (see `_chunks`; inputs and labels already shifted, flattened to positions unless whole_rows).

    Gradients flow into inputs[0] and `params` only. With gradients on, each chunk's gradients
    are taken right after its loss, in the forward pass, and its fp32 logits freed, so at most
    one chunk's logits exist at a time and the heads run once (activation checkpointing would run
    them twice; Liger-Kernel's fused linear cross-entropy uses the same idea).

    What is stored: for each leaf (the hidden states inputs[0], each of `params`), the gradient
    of the whole sum, `grads` (a row slice per chunk for the hidden states, a running sum for the
    head's parameters). What is returned: the sum's value plus `link - link.detach()`, where
    `link = sum(leaf * stored grad)`: that term is exactly 0, and its gradient with respect to
    each leaf is the stored gradient. So `loss.backward()` computes nothing again: it scales the
    stored gradients by the upstream factor (the caller's 1 / token count) and hands them on to
    the blocks below. This is exact because the caller uses the sum linearly, as every loss here
    does; tests/test_muscle.py checks value and gradients against the unchunked loss.
    """
    first, rest = inputs[0], inputs[1:]
    leaves = ([first] if first.requires_grad else []) + list(params)
    with_grad = torch.is_grad_enabled() and bool(leaves)
    grads = [torch.zeros_like(x) for x in leaves]
    # Start from a zero tied to inputs[0], so a batch without label tokens still backpropagates
    # (under FSDP every rank must run the same backward collectives).
    total, counts = upcast(first.sum()) * 0, [0] * (len(LossSum._fields) - 1)
    for idx in _chunks(labels, whole_rows, chunk_size):
        others = (*(x[idx] for x in rest), labels[idx])
        if not with_grad:
            out = chunk_loss(first[idx], *others)
        else:
            with torch.enable_grad():
                x = first[idx].detach().requires_grad_(first.requires_grad)
                out = chunk_loss(x, *others)
                wrt = ([x] if x.requires_grad else []) + list(params)
                chunk_grads = torch.autograd.grad(out.loss, wrt, allow_unused=True)
            for i, g in enumerate(chunk_grads):
                if g is None:
                    continue
                if i == 0 and x.requires_grad:
                    grads[0][idx] = g
                else:
                    grads[i] += g
        total = total + out.loss.detach()
        counts = [a + b for a, b in zip(counts, out[1:])]
    if with_grad:
        # Value exactly 0; its gradient with respect to each leaf is that leaf's stored gradient.
        link = sum((x * g).sum() for x, g in zip(leaves, grads))
        total = total + (link - link.detach())
    return LossSum(total, *counts)


def muscle_loss_chunked(h_student: torch.Tensor, h_old: torch.Tensor, h_new: torch.Tensor,
                        heads: Sequence[Head], labels: torch.Tensor,
                        mask: str = "student_correct", temperature: float = 2.0,
                        ce_weight: float = 0.0, chunk_size: int = 1024,
                        old_valid: torch.Tensor | None = None) -> LossSum:
    """`muscle_loss` from final hidden states [B, T, H] and the three lm_heads (student, old, new).

    Logits exist for one chunk of at most `chunk_size` positions at a time, their gradients
    taken in the forward pass (`chunked_sum`): peak memory is three [chunk_size, V] fp32
    tensors, never three [B*T, V] ones. The teachers' hidden states should come from no_grad
    forwards. Equals `muscle_loss` on the projected logits, in value and gradient.
    """
    get_mask(mask)  # fail on a wrong name before any work
    head_s, head_o, head_n = heads
    whole_rows = mask in SEQUENCE_MASKS
    h_student, labels = _shift(h_student, labels)
    inputs = [h_student, h_old[:, :-1].detach(), h_new[:, :-1].detach()]
    if old_valid is not None:
        inputs.append(old_valid[:, :-1])
    if not whole_rows:  # positions of all rows in one dimension: [B*T, H]
        inputs = [x.flatten(0, 1) for x in inputs]
        labels = labels.flatten()

    def chunk_loss(hs, ho, hn, *valid_and_labels):
        *valid, y = valid_and_labels
        with torch.no_grad():
            zo, zn = head_o(ho), head_n(hn)
        return _aligned_loss(head_s(hs), zo, zn, y, mask, temperature, ce_weight, *valid)

    return chunked_sum(chunk_loss, inputs, labels, whole_rows, chunk_size, trainable(head_s))


# --------------------------------------------------------------------------------------------
# Stored teachers: the loss against what the teachers said, read back instead of recomputed.


class TeacherFields(NamedTuple):
    """What a frozen teacher says at each aligned position [...], all that every mask of MASKS
    and the top-k loss need: its k most likely tokens and their log-probabilities at T = 1
    (most likely first), the log of the probability mass of all other tokens (the tail bucket;
    -inf when k is the vocabulary), the label's log-probability and the argmax."""

    ids: torch.Tensor  # [..., k] int64
    logp: torch.Tensor  # [..., k]
    tail: torch.Tensor  # [...]
    label_logp: torch.Tensor  # [...]
    top1: torch.Tensor  # [...] int64

    def argmax(self, dim: int = -1) -> torch.Tensor:
        """The stored argmax, so that masks read `x.argmax(-1)` of logits and fields alike."""
        return self.top1

    def top(self, k: int) -> TeacherFields:
        """The same positions with only the k most likely tokens kept and the rest folded into
        the tail bucket: exactly what fields of k tokens hold (log-probs of one softmax)."""
        if k >= self.ids.shape[-1]:
            return self
        rest = torch.logsumexp(self.logp[..., k:], dim=-1)
        return self._replace(ids=self.ids[..., :k], logp=self.logp[..., :k],
                             tail=torch.logaddexp(self.tail, rest))

    def where(self, cond: torch.Tensor, other: TeacherFields) -> TeacherFields:
        """Per position, these fields where `cond` (bool, the positions' shape), else other's."""
        return TeacherFields(*(torch.where(cond.view(*cond.shape, *[1] * (a.dim() - cond.dim())),
                                           a, b) for a, b in zip(self, other)))


@torch.no_grad()
def teacher_fields(logits: torch.Tensor, labels: torch.Tensor, k: int) -> TeacherFields:
    """A teacher's `TeacherFields` from its aligned logits [..., V] and labels [...] (k is
    capped at V). The argmax is the logits' own, as the masks take it from online teachers."""
    z = upcast(logits)
    logp = torch.log_softmax(z, dim=-1)
    top_logp, ids = logp.topk(min(k, logp.shape[-1]), dim=-1)
    tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return TeacherFields(ids, top_logp, tail, _label_logprob(z, labels), z.argmax(-1))


def _bucket_logp(top_logp: torch.Tensor, tail: torch.Tensor | None,
                 temperature: float) -> torch.Tensor:
    """Log-probabilities at `temperature` of the k top-k tokens and the tail bucket (None when
    the top k are the whole vocabulary), from their log-probabilities at T = 1. The tail is
    tempered as one token: exact at T = 1 and whenever k is the vocabulary."""
    buckets = top_logp if tail is None else torch.cat([top_logp, tail.unsqueeze(-1)], dim=-1)
    return torch.log_softmax(buckets / temperature, dim=-1)


def _stored_aligned_loss(student: torch.Tensor, old: TeacherFields, new: TeacherFields,
                         labels: torch.Tensor, old_valid: torch.Tensor, mask: str,
                         temperature: float, ce_weight: float) -> LossSum:
    """`_aligned_loss` with stored teachers: the KL over the followed teacher's top-k tokens and
    the tail bucket. The student's own argmax, label log-prob and buckets come from its full
    logits, and the same bucketing on both sides gives 0 where student and teacher agree.
    Where `old_valid` is False M2 stands in for M1, as in `_aligned_loss`."""
    real = labels != IGNORE_INDEX
    student = upcast(student)
    with_tail = old.ids.shape[-1] < student.shape[-1]
    with torch.no_grad():
        old = old.where(old_valid, new)
        follow_old = get_mask(mask)(student, old, new, labels) & real & old_valid
        teacher = old.where(follow_old, new)
        teacher_tail = teacher.tail.to(student.dtype) if with_tail else None
        teacher_logp = _bucket_logp(teacher.logp.to(student.dtype), teacher_tail, temperature)
    logp = torch.log_softmax(student, dim=-1)
    tail = logp.scatter(-1, teacher.ids, float("-inf")).logsumexp(-1) if with_tail else None
    student_logp = _bucket_logp(logp.gather(-1, teacher.ids), tail, temperature)
    per_token = _kl_plus_ce(student_logp, teacher_logp, student, labels, temperature, ce_weight)
    return LossSum(per_token[real].sum(), int(real.sum()), int(follow_old.sum()))


def stored_muscle_loss_chunked(h_student: torch.Tensor, head: Head, old: TeacherFields,
                               new: TeacherFields, labels: torch.Tensor,
                               mask: str = "student_correct", temperature: float = 2.0,
                               ce_weight: float = 0.0, chunk_size: int = 1024,
                               old_valid: torch.Tensor | None = None) -> LossSum:
    """The MUSCLE loss of the student (final hidden states [B, T, H] and its lm_head) against
    stored teachers: `old` and `new` hold fields at the aligned positions [B, T - 1] (position t
    predicts labels[:, t + 1]; values at ignored positions are never read). `old_valid` [B, T]
    as in `muscle_loss`. Chunked like
    `muscle_loss_chunked`, of which it is the top-k approximation; with k = V it equals it."""
    get_mask(mask)  # fail on a wrong name before any work
    whole_rows = mask in SEQUENCE_MASKS
    valid = torch.ones_like(labels, dtype=torch.bool) if old_valid is None else old_valid
    h_student, labels = _shift(h_student, labels)
    fields = (*old, *new, valid[:, :-1])
    if not whole_rows:
        h_student, labels = h_student.flatten(0, 1), labels.flatten()
        fields = tuple(f.flatten(0, 1) for f in fields)
    n = len(TeacherFields._fields)

    def chunk_loss(hs, *rest):
        *f, v, y = rest
        return _stored_aligned_loss(head(hs), TeacherFields(*f[:n]), TeacherFields(*f[n:]), y, v,
                                    mask, temperature, ce_weight)

    return chunked_sum(chunk_loss, (h_student, *fields), labels, whole_rows, chunk_size,
                       trainable(head))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """Summed next-token cross-entropy over real label tokens (task adapters, stages 1 and 2)."""
    return _summed_cross_entropy(*_shift(logits, labels))


def _summed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> LossSum:
    """Summed cross-entropy of aligned logits [..., V] against labels [...] (-100: no loss)."""
    loss = F.cross_entropy(upcast(logits).flatten(0, -2), labels.flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return LossSum(loss, int((labels != IGNORE_INDEX).sum()), 0)


def causal_lm_loss_chunked(hidden: torch.Tensor, head: Head, labels: torch.Tensor,
                           chunk_size: int = 1024) -> LossSum:
    """`causal_lm_loss` on `head(hidden)` (final hidden states [B, T, H], the lm_head), computed
    `chunk_size` real label positions at a time (`chunked_sum`): the whole batch's fp32 logits,
    their log-softmax and its gradient (3 x B x T x V x 4 bytes) never exist. Equals
    `causal_lm_loss` in value and gradient."""
    hidden, labels = _shift(hidden, labels)

    def chunk_loss(h, y):
        return _summed_cross_entropy(head(h), y)

    return chunked_sum(chunk_loss, (hidden.flatten(0, 1),), labels.flatten(), False, chunk_size,
                        trainable(head))
