"""metrics.py: hand-computed compatibility metrics, their identities (hypothesis), GSM8K exact
match as lm-evaluation-harness scores it, ROUGE-1."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import metrics as m

# --- a hand-computed discrete example (N = 8, one gold answer per instance) ---
# i:        0  1  2  3  4  5  6  7
GOLD = [0, 0, 0, 0, 1, 1, 1, 1]
OLD = [0, 0, 0, 1, 1, 2, 2, 3]     # right at 0,1,2,4            -> acc 4/8
NEW = [0, 0, 1, 1, 2, 1, 3, 3]     # right at 0,1,5              -> acc 3/8
COMPAT = [0, 0, 0, 1, 1, 1, 2, 3]  # right at 0,1,2,4,5          -> acc 5/8
# old->new: both right 0,1; negative flips 2,4; positive flip 5; both wrong 3 (1 == 1, same),
# 6 (2 -> 3, an inconsistency flip) and 7 (3 == 3, same).
# old->compat: no negative flip, positive flip 5, both wrong 3, 6, 7 all unchanged.


def correct(preds):
    return [p == g for p, g in zip(preds, GOLD)]


def test_discrete_metrics_hand_computed():
    old, new = correct(OLD), correct(NEW)
    assert m.quadrants(old, new) == {"both_correct": 2, "positive_flip": 1, "both_wrong": 3, "negative_flip": 2}
    assert m.nfr(old, new) == 2 / 8
    assert m.pfr(old, new) == 1 / 8
    assert m.btc(old, new) == 2 / 4
    assert m.inconsistency_flips(old, new, OLD, NEW) == 1 / 8
    assert m.nfr_ext(old, new, OLD, NEW) == 3 / 8
    assert m.correct_set_flips(old, new, OLD, NEW) == 0.0


def test_correct_set_flips_counts_different_correct_texts():
    # GSM8K-like: two solutions reach the right number with different wording (quadrant 1).
    old_out = ["2 + 2 = 4\n#### 4", "#### 7", "#### 1"]
    new_out = ["4 apples\n#### 4", "#### 7", "#### 2"]
    old_c, new_c = [True, True, False], [True, True, False]
    assert m.correct_set_flips(old_c, new_c, old_out, new_out) == 1 / 3
    assert m.inconsistency_flips(old_c, new_c, old_out, new_out) == 1 / 3
    assert m.nfr_ext(old_c, new_c, old_out, new_out) == 1 / 3


def test_no_instance_correct_in_old_makes_btc_undefined():
    old, new = [False, False, False], [True, False, False]
    assert m.btc(old, new) is None
    assert m.nfr(old, new) == 0.0 and m.pfr(old, new) == 1 / 3


def test_all_correct():
    everything = [True] * 4
    assert (m.nfr(everything, everything), m.pfr(everything, everything), m.btc(everything, everything)) == (0, 0, 1)
    assert m.nfr(everything, [False] * 4) == 1.0 and m.btc(everything, [False] * 4) == 0.0
    assert m.nfr_ext(everything, everything, [1, 2, 3, 4], [1, 2, 3, 4]) == 0.0


@pytest.mark.parametrize("metric", [m.nfr, m.pfr, m.btc, m.quadrants, m.gain_rate, m.expected_regression])
def test_empty_and_mismatched_inputs_are_errors(metric):
    with pytest.raises(ValueError, match="empty input"):
        metric([], [])
    with pytest.raises(ValueError, match=r"differ in length \[2, 3\]"):
        metric([True, False], [True, False, True])


def test_same_output_with_different_correctness_is_an_error():
    with pytest.raises(ValueError, match=r"instances \[1\] have the same output"):
        m.nfr_ext([True, True], [True, False], ["a", "b"], ["a", "b"])


# --- continuous scores: d = [+0.25, 0 (tie), -0.5, 0 (tie), +0.25] ---
OLD_S = [0.5, 0.25, 0.75, 1.0, 0.25]
NEW_S = [0.75, 0.25, 0.25, 1.0, 0.5]
COMPAT_S = [0.5, 0.5, 0.75, 1.0, 0.25]  # d = [0, +0.25, 0, 0, 0]


def test_continuous_metrics_hand_computed_ties_count_as_neither():
    assert m.gain_rate(OLD_S, NEW_S) == 2 / 5
    assert m.regression_rate(OLD_S, NEW_S) == 1 / 5
    assert m.expected_gain(OLD_S, NEW_S) == 0.25
    assert m.expected_regression(OLD_S, NEW_S) == -0.5
    assert m.expected_regression(OLD_S, COMPAT_S) is None
    same = [0.3, 0.6]
    assert (m.gain_rate(same, same), m.regression_rate(same, same)) == (0, 0)
    assert m.expected_gain(same, same) is None and m.expected_regression(same, same) is None


def test_relative_change():
    assert m.relative_change(0.25, 0.125) == -50.0
    assert m.relative_change(0.2, 0.3) == pytest.approx(50.0)
    assert m.relative_change(0.0, 0.1) is None  # from zero: undefined, not inf
    assert m.relative_change(None, 0.1) is None and m.relative_change(0.1, None) is None


# --- identities of section 3, on random consistent predictions ---
instances = st.lists(st.tuples(*[st.integers(0, 3)] * 3), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(instances)
def test_flip_identities(rows):
    gold, old_out, new_out = map(list, zip(*rows))
    old = [p == g for p, g in zip(old_out, gold)]
    new = [p == g for p, g in zip(new_out, gold)]
    n, acc_old, acc_new = len(rows), sum(old) / len(rows), sum(new) / len(rows)
    assert m.pfr(old, new) - m.nfr(old, new) == pytest.approx(acc_new - acc_old)
    assert m.nfr(old, new) <= m.nfr_ext(old, new, old_out, new_out)
    assert m.nfr_ext(old, new, old_out, new_out) - m.nfr(old, new) == pytest.approx(
        m.inconsistency_flips(old, new, old_out, new_out))
    assert sum(m.quadrants(old, new).values()) == n
    if acc_old > 0:
        assert m.btc(old, new) == pytest.approx(1 - m.nfr(old, new) / acc_old)
    else:
        assert m.btc(old, new) is None


scores = st.lists(st.tuples(*[st.sampled_from([0.0, 0.25, 0.5, 0.75, 1.0])] * 2), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(scores)
def test_mean_change_splits_into_gains_and_regressions(rows):
    old, new = map(list, zip(*rows))
    gain, regression = m.expected_gain(old, new) or 0.0, m.expected_regression(old, new) or 0.0
    assert m.gain_rate(old, new) * gain + m.regression_rate(old, new) * regression == pytest.approx(
        sum(new) / len(new) - sum(old) / len(old))
    assert m.gain_rate(old, new) + m.regression_rate(old, new) <= 1


# --- GSM8K exact match and ROUGE-1 ---

@pytest.mark.parametrize("text, strict, flexible", [
    ("so 1,000 + 5 = 1,005\n#### 1,005", "1,005", "1,005"),
    ("The answer is 1,000.", m.INVALID, "1,000."),
    ("It costs $5.", m.INVALID, "$5."),
    ("#### -3", "-3", "-3"),
    ("5 apples and 7 pears", m.INVALID, "7"),
    ("#### 4\n#### 5", "4", "5"),
    ("no number here", m.INVALID, m.INVALID),
])
def test_answer_extraction(text, strict, flexible):
    assert m.extract_strict(text) == strict
    assert m.extract_flexible(text) == flexible


@pytest.mark.parametrize("pred, ref, expected", [
    ("1,000.", "so it is 1000.\n#### 1000", True),   # comma and trailing dot removed
    ("$5", "#### 5", True),
    ("-3", "#### -3", True),
    ("3", "#### -3", False),
    ("18", "16 - 3 - 4 = 9 eggs ...\n#### 18", True),  # everything up to "#### " removed
    ("18.00", "#### 18", False),                        # the harness does not parse numbers
    ("3.5", "#### 35", False),                          # only a *trailing* dot is removed
    ("1E3", "#### 1e3", True),                          # case is ignored
    (m.INVALID, "#### 18", False),
])
def test_exact_match(pred, ref, expected):
    assert m.exact_match(pred, ref) is expected


def test_every_gsm8k_reference_matches_itself(data_dir):
    rows = [json.loads(line) for line in (data_dir / "gsm8k" / "test.jsonl").open()]
    assert len(rows) == 1319
    for extract in (m.extract_strict, m.extract_flexible):
        assert all(m.exact_match(extract(r["answer"]), r["answer"]) for r in rows), extract.__name__


def test_rouge1_hand_computed():
    # prediction "the cats sat" vs reference "the cat sat on the mat" (6 tokens):
    # stemmed, the/cat/sat overlap: P = 3/3, R = 3/6, F = 2/3; unstemmed, the/sat: P = 2/3, R = 2/6, F = 4/9.
    assert m.rouge1("the cats sat", "the cat sat on the mat") == pytest.approx(2 / 3)
    assert m.rouge1("the cats sat", "the cat sat on the mat", use_stemmer=False) == pytest.approx(4 / 9)
    assert m.rouge1("Same words.", "same words") == 1.0
    assert m.rouge1("", "a summary") == 0.0


@pytest.mark.parametrize("module", ["metrics", "predictions", "harness", "regressions", "report", "compare", "summary"])
def test_comparing_needs_no_torch(module):
    code = f"import sys, {module}; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(m.__file__).parent).returncode == 0
