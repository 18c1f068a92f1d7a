"""MUSCLE across two vocabularies: align the old and new tokenizations of one text by character
offsets, and map the old model's next-token distribution onto the new vocabulary.

The paper's loss (section 4.1, eqs. 1-2) compares M1's and the student's distributions token by
token, which needs one vocabulary; updates such as Llama 2 -> Llama 3 change it, and the paper
leaves vocabulary mapping to future work (section 8). Here both models read the same text, each
through its own tokenizer:

- Positions. A position has read the text up to the end of its token. Two positions, one per
  tokenization, are *aligned* when they have read the same prefix of the text: both predict a
  token that starts at the same character. Only there can M1's prediction teach the student.
  Positions inside a character split into byte tokens have read no whole prefix and never align.
- Tokens. Each token id writes some bytes into the text (`Tokenizer.surfaces`: "▁" and "Ġ" are
  spaces, "<0xNN>" and byte-level tokens are single bytes). An old token maps to the new token
  that writes the same bytes; special tokens map by role (EOS to EOS). The mapped distribution
  sums to the *kept mass*, the share of M1's probability on tokens the new vocabulary also has.
- The rest of M1's mass ("fill", the default). Tokens only the old vocabulary has (a whole word
  the new one splits, say) get no direct target. Dropping them and renormalising (as the
  "renorm" choice does, and as exact-match mapping in GOLD, TRL's cross-tokenizer distillation,
  does for its matched part) tells the student that everything it alone can spell is wrong,
  exactly where the two vocabularies differ. "fill" keeps M1's split between the tokens both
  vocabularies share and the rest, and spreads the rest over the new-only tokens in M2's
  proportions: the teacher is a full distribution over the student's vocabulary, equal to M1's
  where M1 can name the token and to M2's shape where it cannot. The Universal Logit
  Distillation loss (Boizard et al. 2024) compares sorted probability vectors instead, which
  needs no mapping but also ignores which token carries which probability.
- "prefix". To M1, a word the new vocabulary splits is one token, whose probability is that of
  the text going on with that word, and so probability that the student's next token is the
  word's first piece. "prefix" maps such a token to the new token writing the longest proper
  prefix of its bytes (" black" -> " bl"), so that M1 teaches also where what it predicts is a
  word the student spells in pieces; what still maps nowhere is filled as in "fill".
- "uld", the Universal Logit Distillation loss (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation"): where the student follows M1 it matches M1's whole distribution without any
  map, by the L1 distance between the two probability vectors sorted in decreasing order (the
  shorter padded with zeros; the Wasserstein distance when every pair of tokens is equally far
  apart). It keeps M1's confidence and ignores which token carries it.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

import align
import muscle
from tokenizer import Tokenizer

Span = tuple[int, int]
CHOICES = ("fill", "renorm", "prefix", "uld")  # how M1's distribution teaches (module docstring)


# ----------------------------------------------------------------------------------- vocabularies


def vocab_map(old: Tokenizer, new: Tokenizer, prefix: bool = False) -> torch.Tensor:
    """[V_old] long tensor: for each old id, the new id that writes the same bytes, else -1.

    Several old ids may map to one new id (a byte piece and a normal piece for the same byte);
    their probabilities then add up. Among new ids writing the same bytes, an ordinary piece is
    taken before a byte-fallback piece ("▁" before "<0x20>": sentencepiece writes a byte piece
    only for bytes no piece covers, so that is the id the new model reads and predicts), then
    the lowest. BOS and EOS map to their counterparts. With `prefix`, an old id that no new id
    spells maps to the new id writing the longest proper prefix of its bytes (" black" -> " bl"):
    the new tokenizer's first piece of that text, if it matches longest first as WordPiece does
    and BPE mostly does.
    """
    new_ids: dict[bytes, int] = {}
    pieces = new.vocabulary()
    for fallback in (False, True):
        for i, surface in enumerate(new.surfaces()):
            if surface is not None and _is_byte_piece(pieces[i]) == fallback:
                new_ids.setdefault(surface, i)

    def new_id(surface: bytes | None) -> int:
        if surface is None:
            return -1
        if surface in new_ids or not prefix:
            return new_ids.get(surface, -1)
        return next((new_ids[surface[:n]] for n in range(len(surface) - 1, 0, -1)
                     if surface[:n] in new_ids), -1)

    mapping = torch.tensor([new_id(s) for s in old.surfaces()], dtype=torch.long)
    for a, b in ((old.bos_id, new.bos_id), (old.eos_id, new.eos_id)):
        if a is not None and b is not None and a < len(mapping):
            mapping[a] = b
    return mapping


def _is_byte_piece(piece: str | None) -> bool:
    """A byte-fallback piece of sentencepiece ("<0x0A>"), as tokenizer.Tokenizer.vocabulary spells it."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


class VocabMap(NamedTuple):
    """The old -> new id map sized to the models' logits, and the new ids no old id maps to."""

    old_to_new: torch.Tensor  # [V_old model] long, -1: unmapped
    new_only: torch.Tensor  # [V_new model] bool: spelled by the new tokenizer, reached by no old id


def model_vocab_map(old: Tokenizer, new: Tokenizer, old_vocab: int, new_vocab: int,
                    rule: str = "fill") -> VocabMap:
    """`vocab_map` (by prefix for the rule "prefix") padded to the old model's logits width (ids
    past the tokenizer map nowhere), with the new-only ids among the new tokenizer's ordinary
    tokens (specials and padding ids of the new model get no mass)."""
    mapping = torch.full((old_vocab,), -1, dtype=torch.long)
    ids = vocab_map(old, new, prefix=rule == "prefix")[:old_vocab]
    mapping[:len(ids)] = ids
    mapping[mapping >= new_vocab] = -1
    spelled = torch.zeros(new_vocab, dtype=torch.bool)
    surfaces = new.surfaces()[:new_vocab]
    spelled[:len(surfaces)] = torch.tensor([s is not None for s in surfaces])
    reached = torch.zeros(new_vocab, dtype=torch.bool)
    reached[mapping[mapping >= 0]] = True
    return VocabMap(mapping, spelled & ~reached)


# ----------------------------------------------------------------------------------- positions


def read_up_to(ids: list[int], spans: list[Span], bos_id: int | None) -> list[int | None]:
    """For each position, how many characters of the text it has read (None: not a whole prefix).

    A leading BOS has read 0. Any other token has read up to its end, unless it is empty (a
    leading byte of a split character, as sentencepiece reports it) or the next token starts
    before that end (the same character's next byte, as byte-level BPE reports it).
    """
    out: list[int | None] = []
    for t, (start, end) in enumerate(spans):
        if t == 0 and bos_id is not None and ids[0] == bos_id and (start, end) == (0, 0):
            out.append(0)
        elif end == start or (t + 1 < len(spans) and spans[t + 1][0] < end
                              and spans[t + 1][1] > spans[t + 1][0]):
            out.append(None)
        else:
            out.append(end)
    return out


def match_positions(new_read: list[int | None], old_read: list[int | None]) -> list[int]:
    """For each new position, the old position that has read the same characters, else -1.

    When several old positions have read the same prefix (a token writing no character, such
    as EOS), the first one is taken: it is the one whose next token starts there.
    """
    where: dict[int, int] = {}
    for s, n in enumerate(old_read):
        if n is not None:
            where.setdefault(n, s)
    return [where.get(n, -1) if n is not None else -1 for n in new_read]


def encode_aligned(new: Tokenizer, old: Tokenizer, text: str, new_ids: list[int],
                   max_len: int) -> tuple[list[int], list[int]]:
    """The old model's tokens of `text` and, per new position, its aligned old position (-1).

    `new_ids` are the student's tokens of `text` + EOS, cut on the left to max_len after a BOS
    as data.encode_pair does. The old tokens are cut to start at the same character and to at
    most max_len tokens, the same way; a BOS followed by a cut text has read no prefix of it.
    """
    ids_n, spans_n = _with_eos(new, text)
    ids_o, spans_o = _with_eos(old, text)
    read_n = read_up_to(ids_n, spans_n, new.bos_id)
    read_o = read_up_to(ids_o, spans_o, old.bos_id)
    bos_n, bos_o = _has_bos(new, ids_n), _has_bos(old, ids_o)
    cut = len(ids_n) - len(new_ids)
    ids_n, read_n = _cut_left(ids_n, read_n, bos_n, cut)
    if ids_n != list(new_ids):
        raise ValueError(f"{text[:40]!r}...: the student's tokens differ from its tokenizer's "
                         f"encoding with offsets")
    if cut:
        first_char = spans_n[bos_n + cut][0]
        before = sum(1 for start, _ in spans_o[bos_o:] if start < first_char)
        ids_o, read_o = _cut_left(ids_o, read_o, bos_o, before)
    ids_o, read_o = _cut_left(ids_o, read_o, bos_o, max(0, len(ids_o) - max_len))
    return ids_o, match_positions(read_n, read_o)


def teacher_tokens(new: Tokenizer, old: Tokenizer, pairs: Sequence[Sequence[tuple[str, str]]],
                   examples: Sequence[Sequence[tuple[list[int], list[int]]]],
                   max_len: int) -> align.TeacherTokens:
    """M1's tokens of the (train, val) examples, aligned by text to the student's (train, val)
    `examples` of the same (context, target) `pairs`, in stage 3's batch layout (align.py)."""
    rows = [[encode_aligned(new, old, context + target, ids, max_len)
             for (context, target), (ids, _) in zip(part_pairs, part)]
            for part_pairs, part in zip(pairs, examples)]
    return align.TeacherTokens(rows[0], rows[1], old.pad_id)


def _has_bos(tok: Tokenizer, ids: list[int]) -> int:
    return int(tok.bos_id is not None and bool(ids) and ids[0] == tok.bos_id)


def _with_eos(tok: Tokenizer, text: str) -> tuple[list[int], list[Span]]:
    """encode_with_offsets plus EOS (an empty span at the end), as training sequences end."""
    ids, spans = tok.encode_with_offsets(text)
    if tok.eos_id is not None:
        ids, spans = ids + [tok.eos_id], spans + [(len(text), len(text))]
    return ids, spans


def _cut_left(ids: list[int], read: list[int | None], bos: int, n: int):
    """Drop n tokens after the leading BOS (if any); the BOS then reads no prefix of what is left."""
    if n <= 0:
        return ids, read
    return ids[:bos] + ids[bos + n:], [None] * bos + read[bos + n:]


# ----------------------------------------------------------------------------------- distributions


def map_probs(old_probs: torch.Tensor, mapping: torch.Tensor, new_vocab: int) -> torch.Tensor:
    """Old-vocabulary probabilities [N, V_old] -> [N, V_new], summing each old id into the new id
    it maps to; unmapped ids are dropped, so rows sum to the kept mass."""
    src = (mapping >= 0).nonzero().squeeze(-1)
    out = old_probs.new_zeros(old_probs.shape[0], new_vocab)
    return out.index_add_(1, mapping[src], old_probs[:, src])


def teacher_from_old(mapped: torch.Tensor, new_probs: torch.Tensor, new_only: torch.Tensor,
                     rule: str) -> torch.Tensor:
    """The old model's teacher distribution over the new vocabulary [N, V_new], rows summing to 1.

    `mapped` is `map_probs` of M1's probabilities, `new_probs` M2's at the same positions and
    `new_only` [V_new] marks the ids no old id maps to. "renorm": the mapped mass rescaled to 1;
    "fill" (and "prefix", whose map leaves less unmapped): the unmapped mass spread over the
    new-only ids in M2's proportions (module docstring). "uld" teaches without it
    (`sorted_l1`); masks that read M1 see the "fill" teacher.
    Rows whose kept mass is 0 are not meaningful under "renorm" (the caller does not follow them).
    """
    kept = mapped.sum(-1, keepdim=True)
    if rule == "renorm":
        return mapped / kept.clamp_min(torch.finfo(mapped.dtype).tiny)
    if rule not in ("fill", "prefix", "uld"):
        raise ValueError(f"unknown cross-vocabulary rule {rule!r}; choose one of {CHOICES}")
    rest = new_probs * new_only
    rest = rest / rest.sum(-1, keepdim=True).clamp_min(torch.finfo(rest.dtype).tiny)
    return mapped + (1 - kept).clamp_min(0) * rest


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, the L1 distance between two probability vectors sorted in decreasing order, the
    shorter vocabulary padded with zeros (the Universal Logit Distillation distance, Boizard et
    al. 2024): [n, V_p], [n, V_q] -> [n]. Gradients flow into both through the sort."""
    width = max(p.shape[-1], q.shape[-1])
    p, q = (torch.nn.functional.pad(x, (0, width - x.shape[-1])) for x in (p, q))
    return (p.sort(dim=-1, descending=True).values - q.sort(dim=-1, descending=True).values).abs().sum(-1)


# ----------------------------------------------------------------------------------- the loss


def muscle_loss_cross(h_student: torch.Tensor, h_old: torch.Tensor, h_new: torch.Tensor,
                      heads: Sequence[muscle.Head], labels: torch.Tensor, old_valid: torch.Tensor,
                      vmap: VocabMap, rule: str = "fill", mask: str = "student_correct",
                      temperature: float = 2.0, ce_weight: float = 0.0,
                      chunk_size: int = 1024) -> muscle.LossSum:
    """`muscle.muscle_loss_chunked` when M1 reads its own tokens of the same text.

    h_student, h_new [B, T, H] and labels [B, T] are on the student's tokens; h_old [B, T, H] are
    M1's final hidden states at the M1 position aligned with each student position
    (`encode_aligned`), which exists where old_valid [B, T] is True. The mask keeps its meaning
    (eq. 1): where it asks for M1 at an aligned position, the teacher is M1's distribution mapped
    onto the student's vocabulary (`teacher_from_old`); at a position without one (or where none
    of M1's mass maps) the student follows M2, and the LossSum counts it. Masks that read M1 see
    its mapped distribution at temperature 1. With `rule` "uld", T^2 * `sorted_l1` to M1's own
    distribution replaces the KL where the student follows M1. Chunked as `muscle.chunked_sum`:
    one chunk's student and M2 logits [chunk, V_new] and M1 logits of its aligned positions
    [<= chunk, V_old] exist at a time.
    """
    muscle.get_mask(mask)
    if mask in muscle.SEQUENCE_MASKS:
        raise ValueError(f"--mask {mask} scores whole sequences with M1's likelihood, which two "
                         f"vocabularies do not share; choose a per-token mask")
    head_s, head_o, head_n = heads
    new_only = vmap.new_only.to(h_new.device)

    def chunk_loss(hs, ho, hn, ok, y):
        student = muscle.upcast(head_s(hs))
        real = y != muscle.IGNORE_INDEX
        with torch.no_grad():
            new = muscle.upcast(head_n(hn))
            p_new = torch.softmax(new / temperature, dim=-1)
            z_old = muscle.upcast(head_o(ho[ok]))
            old_teacher, usable, mass = _old_teacher(z_old, ok, p_new, vmap, new_only, rule,
                                                     temperature, real)
            old_logits = new  # what the mask sees of M1, when it reads M1 at all:
            if mask not in muscle.MASKS_IGNORING_OLD:  # its mapped distribution at T = 1, as logits
                at_one, _, _ = _old_teacher(z_old, ok, torch.softmax(new, dim=-1), vmap, new_only,
                                            rule, 1.0, real)
                old_logits = torch.where(usable.unsqueeze(-1), at_one.clamp_min(1e-300).log(), new)
            wants_old = muscle.get_mask(mask)(student, old_logits, new, y) & real
            follow = wants_old & usable
            if rule == "uld":  # no KL where the student follows M1: its own distribution
                old_teacher = torch.softmax(student / temperature, dim=-1)
            teacher = torch.where(follow.unsqueeze(-1), old_teacher, p_new)
        per_token = muscle.distill_per_token(student, teacher, y, temperature, ce_weight,
                                             log_target=False)
        if rule == "uld" and follow.any():  # ... and T^2 * the sorted-L1 distance instead
            p_old = torch.softmax(z_old[follow[ok]] / temperature, dim=-1)
            uld = sorted_l1(torch.softmax(student[follow] / temperature, dim=-1), p_old)
            per_token = per_token.index_put((follow.nonzero().squeeze(-1),),
                                            per_token[follow] + temperature**2 * uld)
        return muscle.LossSum(per_token[real].sum(), int(real.sum()), int(follow.sum()),
                              int((ok & real).sum()), mass, int((wants_old & ~usable).sum()))

    inputs = (h_student[:, :-1], h_old[:, :-1].detach(), h_new[:, :-1].detach(), old_valid[:, :-1])
    return muscle.chunked_sum(chunk_loss, [x.flatten(0, 1) for x in inputs],
                              labels[:, 1:].flatten(), False, chunk_size, muscle.trainable(head_s))


def _old_teacher(z_old, aligned, p_new, vmap, new_only, rule, temperature, real):
    """(M1's teacher at `temperature` over the new vocabulary [n, V_new] from its logits z_old at
    the aligned positions (p_new's rows elsewhere), the positions where it has one, its kept mass
    summed over those that carry a label)."""
    teacher, usable, mass = p_new.clone(), aligned.clone(), 0.0
    if aligned.any():
        p_old = torch.softmax(z_old / temperature, dim=-1)
        mapped = map_probs(p_old, vmap.old_to_new.to(p_old.device), p_new.shape[-1])
        kept = mapped.sum(-1)
        teacher[aligned] = teacher_from_old(mapped, p_new[aligned], new_only, rule)
        usable[aligned] = kept > 0
        mass = float(kept[real[aligned]].sum())
    return teacher, usable, mass


class Coverage:
    """How much of stage 3's training text M1 could teach: running sums of the cross-vocabulary
    loss's counts over training forwards (validation, under no_grad, is not counted; a resumed
    stage counts the steps it ran)."""

    FIELDS = ("tokens", "follow_old", "aligned", "mapped_mass", "unaligned")

    def __init__(self) -> None:
        self.totals = [0.0] * len(self.FIELDS)

    def counting(self, loss_fn):
        """`loss_fn`, adding each training forward's counts to the totals."""
        def counted(batch):
            out = loss_fn(batch)
            if torch.is_grad_enabled():
                self.totals = [t + float(getattr(out, f)) for t, f in zip(self.totals, self.FIELDS)]
            return out
        return counted

    @classmethod
    def shares(cls, totals: Sequence[float]) -> dict[str, float]:
        """Label tokens whose position aligns, M1's mass mapped at those (mean), tokens that
        followed M1, and tokens where the mask asked for M1 without an aligned position."""
        n = dict(zip(cls.FIELDS, totals))
        tokens, aligned = max(n["tokens"], 1), max(n["aligned"], 1)
        return {"aligned": n["aligned"] / tokens, "mapped_mass": n["mapped_mass"] / aligned,
                "followed_old": n["follow_old"] / tokens, "unaligned_asked_old": n["unaligned"] / tokens}

    @staticmethod
    def describe(shares: dict[str, float]) -> str:
        """One line for the log: what the shares mean."""
        return (f"stage 3 across vocabularies: {shares['aligned']:.1%} of label tokens aligned with "
                f"an M1 position, {shares['mapped_mass']:.1%} of M1's mass mapped there (mean, at "
                f"the distillation temperature); {shares['followed_old']:.1%} followed M1, "
                f"{shares['unaligned_asked_old']:.1%} followed M2 for want of an aligned position")
