"""metrics.py: hand-computed compatibility metrics, their identities (hypothesis), GSM8K exact
match as lm-evaluation-harness scores it, ROUGE-1, and the `compare` report end to end."""
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


# --- the report and the `compare` command ---

def records(preds, task="piqa", order=None):
    rows = [{"id": f"q{i}", "task": task, "prediction": p, "correct": p == g, "score": float(p == g)}
            for i, (p, g) in enumerate(zip(preds, GOLD))]
    return [rows[i] for i in order] if order else rows


def score_records(values):
    return [{"id": f"s{i}", "task": "samsum", "prediction": f"summary {i}", "correct": None, "score": v}
            for i, v in enumerate(values)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_compare_discrete_reproduces_hand_computed_numbers(tmp_path, capsys):
    files = [write_jsonl(tmp_path / "old.jsonl", records(OLD)), write_jsonl(tmp_path / "new.jsonl", records(NEW)),
             write_jsonl(tmp_path / "compat.jsonl", records(COMPAT, order=[7, 3, 0, 5, 1, 6, 2, 4]))]
    assert m.compare_main([*files, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["task"], report["n"], report["kind"]) == ("piqa", 8, "discrete")
    assert report["models"] == {"old": {"accuracy": 0.5}, "new": {"accuracy": 0.375}, "compat": {"accuracy": 0.625}}
    assert report["pairs"]["old->new"] == {
        "delta_accuracy": -0.125, "nfr": 0.25, "pfr": 0.125, "btc": 0.5, "nfr_ext": 0.375,
        "inconsistency_flips": 0.125, "correct_set_flips": 0.0,
        "quadrants": {"both_correct": 2, "positive_flip": 1, "both_wrong": 3, "negative_flip": 2}}
    assert report["pairs"]["old->compat"] == {
        "delta_accuracy": 0.125, "nfr": 0.0, "pfr": 0.125, "btc": 1.0, "nfr_ext": 0.0,
        "inconsistency_flips": 0.0, "correct_set_flips": 0.0,
        "quadrants": {"both_correct": 4, "positive_flip": 1, "both_wrong": 3, "negative_flip": 0}}
    assert report["relative"] == {"nfr": -100.0, "pfr": 0.0, "btc": 100.0, "nfr_ext": -100.0,
                                  "inconsistency_flips": -100.0, "correct_set_flips": None}
    md = (tmp_path / "out" / "report.md").read_text()
    for row in ["| model | acc | dAcc | NFR | dNFR | dNFR% | PFR | BTC | NFR_ext |",
                "| old | 50.00 |  |  |  |  |  |  |  |",
                "| new | 37.50 | -12.50 | 25.00 |  |  | 12.50 | 50.00 | 37.50 |",
                "| compat | 62.50 | +12.50 | 0.00 | -25.00 | -100.00 | 12.50 | 100.00 | 0.00 |",
                "| old->new | 2 | 1 | 3 | 2 |",
                "| inconsistency flips | 12.50 | 0.00 | -100.00 |",
                "| correct-set flips | 0.00 | 0.00 | n/a |"]:
        assert row + "\n" in md
    assert "| compat | 62.50 | +12.50 |" in capsys.readouterr().out


def test_compare_continuous_reproduces_hand_computed_numbers(tmp_path):
    files = [write_jsonl(tmp_path / f"{name}.jsonl", score_records(values))
             for name, values in [("old", OLD_S), ("new", NEW_S), ("compat", COMPAT_S)]]
    m.compare_main([*files, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "continuous"
    assert report["models"] == {"old": {"mean_score": 0.55}, "new": {"mean_score": 0.55}, "compat": {"mean_score": 0.6}}
    assert report["pairs"]["old->new"] == {"delta_mean_score": 0.0, "gain_rate": 0.4, "regression_rate": 0.2,
                                           "expected_gain": 0.25, "expected_regression": -0.5}
    assert report["pairs"]["old->compat"]["expected_regression"] is None
    assert report["relative"] == {"gain_rate": -50.0, "regression_rate": -100.0, "expected_gain": 0.0,
                                  "expected_regression": None}
    assert report["scores"]["compat"] == COMPAT_S
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| new | 55.00 | +0.00 | 20.00 |  |  | 40.00 | 25.00 | -50.00 |\n" in md
    assert "| compat | 60.00 | +5.00 | 0.00 | -20.00 | -100.00 | 20.00 | 25.00 | n/a |\n" in md


def test_report_without_compat_has_one_pair():
    report = m.compatibility_report(records(OLD), records(NEW))
    assert list(report["pairs"]) == ["old->new"] and report["relative"] == {}
    assert "| new | 37.50 | -12.50 | 25.00 |" in m.format_report_text(report)


@pytest.mark.parametrize("new, message", [
    (records(NEW)[:7], r"old \(o.jsonl\) has 8 records and new \(n.jsonl\) has 7: 1 ids only in old \(e.g. \['q7'\]\)"),
    (records(NEW, task="hellaswag"), "holds task 'hellaswag' but old"),
    (records(NEW) + records(NEW)[:2], r"new \(n.jsonl\): 2 ids appear more than once, e.g. \['q0', 'q1'\]"),
    ([], r"new \(n.jsonl\): no prediction records"),
    ([{"id": "q0", "task": "piqa"}], r"new \(n.jsonl\) record 1: prediction record lacks \['prediction'\]"),
])
def test_mismatched_prediction_files_are_clear_errors(new, message):
    with pytest.raises(ValueError, match=message):
        m.compatibility_report(records(OLD), new, sources={"old": "o.jsonl", "new": "n.jsonl"})


def test_continuous_records_need_scores():
    new = score_records(NEW_S)
    new[2]["score"] = None
    with pytest.raises(ValueError, match="id 's2'.*finite numeric `score`"):
        m.compatibility_report(score_records(OLD_S), new)


def test_compare_reports_bad_files_with_their_location(tmp_path, capsys):
    old = write_jsonl(tmp_path / "old.jsonl", records(OLD))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records(NEW)[0]) + "\n{not json\n")
    for argv, message in [([old, str(tmp_path / "missing.jsonl")], "predictions file not found"),
                          ([old, str(bad)], f"{bad}:2: not valid JSON")]:
        with pytest.raises(SystemExit) as exit_info:
            m.compare_main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_write_report_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):  # None in sys.modules makes the import fail
        monkeypatch.setitem(sys.modules, name, None)
    written = m.write_report(m.compatibility_report(records(OLD), records(NEW)), tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md"]
    assert "`pip install matplotlib`" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("make", [lambda: m.compatibility_report(records(OLD), records(NEW), records(COMPAT)),
                                  lambda: m.compatibility_report(score_records(OLD_S), score_records(NEW_S))])
def test_write_report_draws_a_png(tmp_path, make):
    pytest.importorskip("matplotlib", reason="report.png needs the optional extra: pip install matplotlib")
    written = m.write_report(make(), tmp_path)
    assert written[-1].name == "report.png" and written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![quadrants and scores](report.png)" in (tmp_path / "report.md").read_text()


def test_metrics_does_not_import_torch():
    code = "import sys, metrics; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=Path(m.__file__).parent).returncode == 0
