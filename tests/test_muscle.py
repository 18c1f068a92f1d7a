"""Tests of muscle.py: every mask and the loss on hand-computed logits, chunked == unchunked."""
import math

import pytest
import torch

import muscle
from muscle import MASKS, causal_lm_loss, causal_lm_loss_chunked, muscle_loss, muscle_loss_chunked


def logits_from_probs(*rows, temperature=2.0):
    """Logits whose softmax at `temperature` is exactly the given probability rows: T * log p."""
    return temperature * torch.tensor(rows, dtype=torch.float64).log()


# Three positions; the first label (position 0) is never a target (labels are shifted).
# At T=2: old p1 = [.5,.25,.25], new p2 = [.25,.5,.25], student q = [.5,.25,.25] (argmax 0).
OLD = logits_from_probs([.5, .25, .25], [.5, .25, .25], [1 / 3, 1 / 3, 1 / 3]).unsqueeze(0)
NEW = logits_from_probs([.25, .5, .25], [.25, .5, .25], [1 / 3, 1 / 3, 1 / 3]).unsqueeze(0)
STUDENT = logits_from_probs([.5, .25, .25], [.5, .25, .25], [1 / 3, 1 / 3, 1 / 3]).unsqueeze(0)
# Position 0 predicts label 0 (student right -> new teacher), position 1 predicts 1 (student
# wrong -> old teacher), position 2 has no next label.
LABELS = torch.tensor([[7, 0, 1]])


def test_loss_by_hand():
    # pos 0: T^2 * KL(p2 || q) = 4 * (.25 ln .5 + .5 ln 2) = ln 2;  pos 1: KL(p1 || q) = 0.
    out = muscle_loss(STUDENT, OLD, NEW, LABELS)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert (out.tokens, out.follow_old) == (2, 1)


def test_loss_with_cross_entropy_by_hand():
    # CE at T=1 of logits 2 ln q: softmax = q^2 / sum q^2 = [2/3, 1/6, 1/6];
    # 0.5 * (ln 1.5 + ln 6) = ln 3, so the total is ln 2 + ln 3 = ln 6.
    out = muscle_loss(STUDENT, OLD, NEW, LABELS, ce_weight=0.5)
    assert out.loss.item() == pytest.approx(math.log(6), abs=1e-12)


def test_temperature_squared_factor():
    # Same logits at T=4: softmax(z/4) = sqrt(p) normalised; 16 * KL by hand.
    def soft(p):
        r = torch.tensor(p, dtype=torch.float64).sqrt()
        return r / r.sum()
    p2, q = soft([.25, .5, .25]), soft([.5, .25, .25])
    p1 = soft([.5, .25, .25])
    expected = 16 * ((p2 * (p2 / q).log()).sum() + (p1 * (p1 / q).log()).sum())
    out = muscle_loss(STUDENT, OLD, NEW, LABELS, temperature=4.0)
    assert out.loss.item() == pytest.approx(expected.item(), abs=1e-12)


def test_ignore_index_drops_positions():
    labels = torch.tensor([[7, -100, 1]])  # only position 1 counts: follows old, KL = 0
    out = muscle_loss(STUDENT, OLD, NEW, labels)
    assert (out.loss.item(), out.tokens, out.follow_old) == (0.0, 1, 1)
    labels = torch.tensor([[7, 0, -100]])
    out = muscle_loss(STUDENT, OLD, NEW, labels)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert (out.tokens, out.follow_old) == (1, 0)


# Mask tests: aligned logits [1, 3, 3], labels [1, 3].
S = torch.tensor([[[3., 0, 0], [0, 3, 0], [0, 0, 3]]])   # student argmax 0, 1, 2
O = torch.tensor([[[0., 3, 0], [0, 3, 0], [3, 0, 0]]])   # old argmax 1, 1, 0
N = torch.zeros(1, 3, 3)
Y = torch.tensor([[0, 0, 0]])


@pytest.mark.parametrize("name, expected", [
    ("student_correct", [False, True, True]),   # student right only at position 0
    ("old_correct", [False, False, True]),      # old right only at position 2
    ("token_likelihood", [False, False, True]),  # p_c(0) < p_1(0) only at 2 (equal at 1)
    ("none", [True, True, True]),
    ("new_only", [False, False, False]),
])
def test_token_masks_by_hand(name, expected):
    assert MASKS[name](S, O, N, Y).tolist() == [expected]


def test_instance_likelihood_mask_by_hand():
    # Row 0: student puts 3 on the label twice, old once -> student more likely -> new teacher.
    # Row 1: the reverse -> old teacher for the whole row. Ignored positions do not vote.
    student = torch.tensor([[[3., 0], [3, 0], [0, 0]], [[0., 3], [3, 0], [0, 9]]])
    old = torch.tensor([[[3., 0], [0, 3], [0, 9]], [[3., 0], [3, 0], [0, 0]]])
    labels = torch.tensor([[0, 0, -100], [0, 0, -100]])
    mask = MASKS["instance_likelihood"](student, old, old, labels)
    assert mask.tolist() == [[False] * 3, [True] * 3]


def test_unknown_mask_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown MUSCLE mask 'nope'.*student_correct"):
        muscle_loss(STUDENT, OLD, NEW, LABELS, mask="nope")


def random_case(seed=0, batch=3, length=7, vocab=5):
    g = torch.Generator().manual_seed(seed)
    s, o, n = (torch.randn(batch, length, vocab, generator=g, dtype=torch.float64) for _ in range(3))
    labels = torch.randint(0, vocab, (batch, length), generator=g)
    labels[0, -2:] = -100  # right padding
    return s, o, n, labels


def test_all_correct_is_distillation_from_new_and_none_correct_from_old():
    s, o, n, _ = random_case()
    right = torch.cat([torch.zeros(3, 1, dtype=torch.long), s[:, :-1].argmax(-1)], 1)
    wrong = (right + 1) % 5
    all_new = muscle_loss(s, o, n, right)
    assert all_new.follow_old == 0
    assert all_new.loss.item() == pytest.approx(muscle_loss(s, n, o, right, mask="none").loss.item())
    none_new = muscle_loss(s, o, n, wrong)
    assert none_new.follow_old == none_new.tokens == 18
    assert none_new.loss.item() == pytest.approx(muscle_loss(s, o, n, wrong, mask="none").loss.item())


def test_gradient_reaches_only_the_student():
    s, o, n, labels = random_case()
    s.requires_grad_(), o.requires_grad_(), n.requires_grad_()
    muscle_loss(s, o, n, labels, ce_weight=0.5).loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert o.grad is None and n.grad is None
    # Padded positions and the last position (no next label) get exactly zero gradient.
    assert s.grad[0, -3:].abs().sum() == 0 and s.grad[:, -1].abs().sum() == 0


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_equals_unchunked(mask, chunk_size):
    torch.manual_seed(0)
    batch, length, hidden, vocab = 3, 6, 8, 11
    heads = [torch.nn.Linear(hidden, vocab, dtype=torch.float64) for _ in range(3)]
    hs = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    ho, hn = torch.randn(2, batch, length, hidden, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length))
    labels[1, 3:] = -100
    kwargs = dict(mask=mask, temperature=3.0, ce_weight=0.3)

    full = muscle_loss(heads[0](hs), heads[1](ho), heads[2](hn), labels, **kwargs)
    grads_full = torch.autograd.grad(full.loss, [hs, heads[0].weight])
    chunked = muscle_loss_chunked(hs, ho, hn, heads, labels, chunk_size=chunk_size, **kwargs)
    grads_chunked = torch.autograd.grad(chunked.loss, [hs, heads[0].weight])

    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-12)
    assert (chunked.tokens, chunked.follow_old) == (full.tokens, full.follow_old) != (0, 0)
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert heads[1].weight.grad is None and heads[2].weight.grad is None


def test_chunked_packs_only_real_tokens():
    """Padding is never projected: the student head sees exactly the real label positions."""
    seen = []
    head = torch.nn.Linear(4, 5)
    def spy(h):
        seen.append(h.shape[0])
        return head(h)
    h = torch.randn(2, 5, 4)
    labels = torch.tensor([[1, 2, 3, -100, -100], [1, 2, 3, 4, 0]])
    out = muscle_loss_chunked(h, h, h, [spy, head, head], labels, chunk_size=3)
    assert out.tokens == 2 + 4 and seen == [3, 3]


def test_causal_lm_loss_is_summed_shifted_cross_entropy():
    s, _, _, labels = random_case()
    out = causal_lm_loss(s, labels)
    ref = torch.nn.functional.cross_entropy(s[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1))
    assert out.tokens == 16
    assert out.loss.item() == pytest.approx(ref.item() * 16, rel=1e-12)


@pytest.mark.parametrize("trainable_head", [True, False])
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
def test_chunked_cross_entropy_equals_causal_lm_loss(chunk_size, trainable_head):
    """Value and gradients (hidden states, and the head when it trains) of the chunked task loss,
    also through a later scaling (the loss / tokens of a mean); each real label position is
    projected once (no recomputation) and padding never."""
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, dtype=torch.float64).requires_grad_(trainable_head)
    seen = []
    head.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    h = torch.randn(3, 6, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 6))
    labels[1, 3:] = -100
    labels[2, 1] = -100
    wrt = [h, head.weight, head.bias] if trainable_head else [h]
    full = causal_lm_loss(head(h), labels)
    grads_full = torch.autograd.grad(full.loss / 7, wrt)
    seen.clear()
    chunked = causal_lm_loss_chunked(h, head, labels, chunk_size=chunk_size)
    grads_chunked = torch.autograd.grad(chunked.loss / 7, wrt)
    assert chunked.loss.item() == pytest.approx(full.loss.item(), rel=1e-12)
    assert chunked.tokens == full.tokens == 15 - 3 - 1
    for a, b in zip(grads_chunked, grads_full):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert sum(seen) == 11 and max(seen) <= chunk_size
    with torch.no_grad():
        assert causal_lm_loss_chunked(h, head, labels, chunk_size).loss.item() == pytest.approx(
            full.loss.item(), rel=1e-12)


def test_masks_table_functions_are_the_module_functions():
    assert MASKS["student_correct"] is muscle.student_correct
    assert muscle.SEQUENCE_MASKS <= set(MASKS)


def test_batch_without_label_tokens_still_backpropagates():
    h = torch.randn(2, 4, 3, requires_grad=True)
    head = torch.nn.Linear(3, 5)
    out = muscle_loss_chunked(h, h, h, [head] * 3, torch.full((2, 4), -100))
    out.loss.backward()
    assert (out.loss.item(), out.tokens) == (0.0, 0) and h.grad.abs().sum() == 0


def test_vectorised_loss_equals_a_per_token_loop_with_torch_distributions():
    """Each mask written out per token from its definition; KL from torch.distributions."""
    from torch.distributions import Categorical, kl_divergence

    s, o, n, labels = random_case(seed=3)
    T, w = 1.5, 0.25
    logp = lambda z: torch.log_softmax(z, -1)  # noqa: E731
    rules = {
        "student_correct": lambda b, t, y: s[b, t].argmax() != y,
        "token_likelihood": lambda b, t, y: logp(s[b, t])[y] < logp(o[b, t])[y],
        "old_correct": lambda b, t, y: o[b, t].argmax() == y,
        "none": lambda b, t, y: True,
        "new_only": lambda b, t, y: False,
        "instance_likelihood": lambda b, t, y: sequence_ll(s, b) < sequence_ll(o, b),
    }

    def sequence_ll(z, b):
        return sum(logp(z[b, t])[labels[b, t + 1]] for t in range(labels.shape[1] - 1)
                   if labels[b, t + 1] != -100)
    for name, follow_old in rules.items():
        expected = 0.0
        for b in range(labels.shape[0]):
            for t in range(labels.shape[1] - 1):
                y = labels[b, t + 1]
                if y == -100:
                    continue
                teacher = o[b, t] if follow_old(b, t, y) else n[b, t]
                kl = kl_divergence(Categorical(logits=teacher / T), Categorical(logits=s[b, t] / T))
                expected += T**2 * kl - w * logp(s[b, t])[y]
        got = muscle_loss(s, o, n, labels, mask=name, temperature=T, ce_weight=w).loss
        assert got.item() == pytest.approx(float(expected), rel=1e-10), name


# Stored teachers (TeacherFields): the top-k loss against the online loss.


def stored_case(seed=0, batch=3, length=6, hidden=8, vocab=11):
    """Hidden states and heads of a student and two teachers, and right-padded labels."""
    torch.manual_seed(seed)
    heads = [torch.nn.Linear(hidden, vocab, dtype=torch.float64) for _ in range(3)]
    hs = torch.randn(batch, length, hidden, dtype=torch.float64, requires_grad=True)
    ho, hn = torch.randn(2, batch, length, hidden, dtype=torch.float64)
    labels = torch.randint(0, vocab, (batch, length))
    labels[1, 3:] = -100
    return heads, hs, ho, hn, labels


def fields_of(head, h, labels, k):
    """A teacher's fields at the aligned positions, as a store holds them."""
    return muscle.teacher_fields(head(h[:, :-1]), labels[:, 1:], k)


@pytest.mark.parametrize("mask", sorted(MASKS))
@pytest.mark.parametrize("chunk_size", [1, 4, 1000])
@pytest.mark.parametrize("with_valid", [False, True])
def test_stored_loss_with_k_equal_to_the_vocabulary_is_the_online_loss(mask, chunk_size, with_valid):
    """Also where M1 has no counterpart of some positions (old_valid False: M2 stands in)."""
    heads, hs, ho, hn, labels = stored_case()
    valid = torch.rand(labels.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    kwargs = dict(mask=mask, temperature=3.0, ce_weight=0.3, chunk_size=chunk_size,
                  old_valid=valid if with_valid else None)
    online = muscle_loss_chunked(hs, ho, hn, heads, labels, **kwargs)
    grads_online = torch.autograd.grad(online.loss, [hs, heads[0].weight])
    old, new = (fields_of(head, h, labels, 11) for head, h in ((heads[1], ho), (heads[2], hn)))
    assert torch.isinf(old.tail).all()  # nothing outside the top k = V
    stored = muscle.stored_muscle_loss_chunked(hs, heads[0], old, new, labels, **kwargs)
    grads_stored = torch.autograd.grad(stored.loss, [hs, heads[0].weight])
    assert stored.loss.item() == pytest.approx(online.loss.item(), rel=1e-12)
    assert (stored.tokens, stored.follow_old) == (online.tokens, online.follow_old) != (0, 0)
    for a, b in zip(grads_stored, grads_online):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mask", sorted(MASKS))
def test_stored_loss_with_fewer_tokens_bounds_the_online_kl_from_below(mask):
    """At T = 1 the bucketed KL is the KL of the coarse-grained distributions, so it is at most
    the full one (data processing inequality) and grows with k to it; the masks decide exactly
    as online for every k (argmax and label log-prob are stored exactly). A tail of one token
    (k = V - 1) is that token: exact again."""
    heads, hs, ho, hn, labels = stored_case(seed=1)
    online = muscle_loss_chunked(hs, ho, hn, heads, labels, mask=mask, temperature=1.0)
    previous = 0.0
    for k in (1, 2, 5, 9, 10):
        old, new = (fields_of(head, h, labels, k) for head, h in ((heads[1], ho), (heads[2], hn)))
        stored = muscle.stored_muscle_loss_chunked(hs, heads[0], old, new, labels, mask=mask,
                                                   temperature=1.0)
        assert stored.follow_old == online.follow_old
        if k < 10:
            assert previous <= stored.loss.item() < online.loss.item()
        previous = stored.loss.item()
    assert previous == pytest.approx(online.loss.item(), rel=1e-12)


def test_stored_loss_is_zero_where_the_student_is_its_teacher():
    heads, hs, _, _, labels = stored_case(seed=2)
    same = fields_of(heads[0], hs.detach(), labels, 3)
    out = muscle.stored_muscle_loss_chunked(hs, heads[0], same, same, labels, temperature=2.5)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12) and out.tokens == 12


def test_teacher_fields_by_hand_and_cut_to_fewer_tokens():
    logp = torch.tensor([[.5, .3, .15, .05]], dtype=torch.float64).log()
    f = muscle.teacher_fields(logp + 7.0, torch.tensor([2]), k=2)  # logits up to a constant
    assert f.ids.tolist() == [[0, 1]] and f.argmax(-1).tolist() == [0]
    torch.testing.assert_close(f.logp.exp(), torch.tensor([[.5, .3]], dtype=torch.float64))
    assert f.tail.exp().item() == pytest.approx(.2) and f.label_logp.exp().item() == pytest.approx(.15)
    cut, direct = muscle.teacher_fields(logp, torch.tensor([2]), k=3).top(2), f
    for a, b in zip(cut, direct):
        torch.testing.assert_close(a, b)
