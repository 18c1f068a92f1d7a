"""Compatibility metrics (MUSCLE section 3) and the task scores they count (exact match, ROUGE-1).

Everything here works on per-instance lists (correctness, scores, outputs), so a report can be
recomputed from predictions files on any machine: no torch. The report built from these metrics
is report.py's; reading predictions files is predictions.py's.

Conventions:
- Rates are fractions of the N instances, in [0, 1]; relative changes are percents.
- An undefined value (BTC when the old model gets nothing right, the expected gain when nothing
  gains, a relative change from 0) is None in JSON and "n/a" in tables, never a silent 0 or nan.
- The "output" that NFR_ext, inconsistency flips and correct-set flips compare is the record's
  `prediction`, compared exactly: the choice index for multiple choice, the generated text for
  generation. Raw text rather than the extracted answer because (a) the paper's quadrant-1 flip
  "within the ground-truth options" only exists for texts (two correct GSM8K answers always
  extract to the same number), and (b) equal texts always get equal correctness whatever
  extraction eval.py used, so NFR_ext - NFR = inconsistency flips holds by construction.
"""
from __future__ import annotations

import functools
import re
from typing import Sequence

import numpy as np

# --- task scores: GSM8K exact match (lm-evaluation-harness v0.4.3 gsm8k.yaml), ROUGE-1 ---

INVALID = "[invalid]"
_STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")
_FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# The harness's `regexes_to_ignore`, applied in this order to prediction and reference alike,
# then lower-case (`ignore_case: true`).
_IGNORE = (",", r"\$", r"(?s).*#### ", r"\.$")


def _regex_filter(pattern: re.Pattern, text: str, pick: int) -> str:
    """The harness's RegexFilter: match number `pick` of findall, first non-empty group, stripped."""
    matches = pattern.findall(text)
    if not matches:
        return INVALID
    match = matches[pick]
    if isinstance(match, tuple):  # several groups: the one that matched
        match = next((group for group in match if group), INVALID)
    return match.strip()


def extract_strict(text: str) -> str:
    """GSM8K "strict-match": the first `#### N` of the text, or "[invalid]"."""
    return _regex_filter(_STRICT, text, 0)


def extract_flexible(text: str) -> str:
    """GSM8K "flexible-extract": the last number-like run of the text, or "[invalid]"."""
    return _regex_filter(_FLEXIBLE, text, -1)


def normalize_answer(text: str) -> str:
    """Drop `,`, `$`, everything up to the last "#### " and a trailing `.`; lower-case."""
    for pattern in _IGNORE:
        text = re.sub(pattern, "", text)
    return text.lower()


def exact_match(pred: str, ref: str) -> bool:
    """GSM8K exact match of an extracted answer against a reference (e.g. the full "... #### 18")."""
    return normalize_answer(pred) == normalize_answer(ref)


@functools.lru_cache(maxsize=2)
def _rouge_scorer(use_stemmer: bool):
    from rouge_score import rouge_scorer  # imported here: it pulls in nltk (~1 s), `compare` never needs it

    return rouge_scorer.RougeScorer(["rouge1"], use_stemmer=use_stemmer)


def rouge1(pred: str, ref: str, use_stemmer: bool = True) -> float:
    """ROUGE-1 F-measure of `pred` against `ref` (rouge-score, called score(reference, prediction)).

    Stemming defaults to on: the harness scores its summarisation tasks with use_stemmer=True and
    the paper does not say otherwise.
    """
    return _rouge_scorer(use_stemmer).score(ref, pred)["rouge1"].fmeasure


# --- per-instance compatibility metrics ---

def _check_columns(*columns: Sequence) -> int:
    """The number of instances; the columns must be non-empty and describe the same instances."""
    lengths = [len(column) for column in columns]
    if lengths[0] == 0:
        raise ValueError("empty input: the metrics need at least one instance")
    if len(set(lengths)) > 1:
        raise ValueError(f"per-instance lists differ in length {lengths}: "
                         "they must describe the same instances in the same order")
    return lengths[0]


def _flags(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> tuple[np.ndarray, np.ndarray]:
    _check_columns(old_correct, new_correct)
    return np.asarray(old_correct, dtype=bool), np.asarray(new_correct, dtype=bool)


def quadrants(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> dict[str, int]:
    """Counts of the four quadrants of the paper's Fig. 2 (old -> new)."""
    old, new = _flags(old_correct, new_correct)
    return {"both_correct": int(np.sum(old & new)), "positive_flip": int(np.sum(~old & new)),
            "both_wrong": int(np.sum(~old & ~new)), "negative_flip": int(np.sum(old & ~new))}


def nfr(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float:
    """Negative flip rate: the fraction right before the update and wrong after it."""
    old, new = _flags(old_correct, new_correct)
    return float(np.mean(old & ~new))


def pfr(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float:
    """Positive flip rate: the fraction wrong before the update and right after it."""
    old, new = _flags(old_correct, new_correct)
    return float(np.mean(~old & new))


def btc(old_correct: Sequence[bool], new_correct: Sequence[bool]) -> float | None:
    """Backward trust compatibility: #(both right) / #(old right); None when the old model has none right."""
    old, new = _flags(old_correct, new_correct)
    if not old.any():
        return None
    return float(np.sum(old & new) / np.sum(old))


def _changes(old_correct: Sequence[bool], new_correct: Sequence[bool],
             old_outputs: Sequence, new_outputs: Sequence) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Correctness flags and 'the output changed' flags; equal outputs must be scored alike."""
    _check_columns(old_correct, new_correct, old_outputs, new_outputs)
    old, new = np.asarray(old_correct, dtype=bool), np.asarray(new_correct, dtype=bool)
    changed = np.array([a != b for a, b in zip(old_outputs, new_outputs)], dtype=bool)
    clash = np.flatnonzero(~changed & (old != new))
    if clash.size:
        raise ValueError(f"instances {clash[:5].tolist()} have the same output in both models but "
                         "different correctness: correctness must depend on the output only")
    return old, new, changed


def nfr_ext(old_correct: Sequence[bool], new_correct: Sequence[bool],
            old_outputs: Sequence, new_outputs: Sequence) -> float:
    """Extended NFR: the fraction where the new model is wrong and its output changed (section 3)."""
    _, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(~new & changed))


def inconsistency_flips(old_correct: Sequence[bool], new_correct: Sequence[bool],
                        old_outputs: Sequence, new_outputs: Sequence) -> float:
    """The fraction where both models are wrong but differently (quadrant 3, a changed mistake)."""
    old, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(~old & ~new & changed))


def correct_set_flips(old_correct: Sequence[bool], new_correct: Sequence[bool],
                      old_outputs: Sequence, new_outputs: Sequence) -> float:
    """The fraction where both are right with different outputs (quadrant 1; several valid answers)."""
    old, new, changed = _changes(old_correct, new_correct, old_outputs, new_outputs)
    return float(np.mean(old & new & changed))


def score_deltas(old_scores: Sequence[float], new_scores: Sequence[float]) -> np.ndarray:
    """d_i = S(new output) - S(old output) per instance; d_i == 0 exactly is a tie."""
    _check_columns(old_scores, new_scores)
    return np.asarray(new_scores, dtype=float) - np.asarray(old_scores, dtype=float)


def gain_rate(old_scores: Sequence[float], new_scores: Sequence[float]) -> float:
    """The fraction of instances whose score rose (d_i > 0)."""
    return float(np.mean(score_deltas(old_scores, new_scores) > 0))


def regression_rate(old_scores: Sequence[float], new_scores: Sequence[float]) -> float:
    """The fraction of instances whose score fell (d_i < 0): the negative flips of generation."""
    return float(np.mean(score_deltas(old_scores, new_scores) < 0))


def _mean_or_none(values: np.ndarray) -> float | None:
    return float(np.mean(values)) if values.size else None


def expected_gain(old_scores: Sequence[float], new_scores: Sequence[float]) -> float | None:
    """The mean d_i over the gains (> 0): how much a gain is worth; None when nothing gains."""
    deltas = score_deltas(old_scores, new_scores)
    return _mean_or_none(deltas[deltas > 0])


def expected_regression(old_scores: Sequence[float], new_scores: Sequence[float]) -> float | None:
    """The mean d_i over the regressions (< 0, so a negative number); None when nothing regresses."""
    deltas = score_deltas(old_scores, new_scores)
    return _mean_or_none(deltas[deltas < 0])


def relative_change(before: float | None, after: float | None) -> float | None:
    """100 * (after - before) / before, e.g. dNFR% from NFR(M1, M2) to NFR(M1, Mc); None if before is 0."""
    if before is None or after is None or before == 0:
        return None
    return 100.0 * (after - before) / before
