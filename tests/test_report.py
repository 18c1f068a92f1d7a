"""report.py, predictions.py and compare.py: the compatibility report and the `compare` command
end to end, on the hand-computed examples of test_metrics.py."""
import json
import sys
from types import SimpleNamespace

import pytest

import compare
import regressions
import report as r
from test_metrics import COMPAT, COMPAT_S, GOLD, NEW, NEW_S, OLD, OLD_S


def records(preds, task="piqa", order=None):
    rows = [{"id": f"q{i}", "task": task, "prediction": p, "gold": g, "correct": p == g, "score": float(p == g)}
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
    assert compare.main([*files, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["task"], report["n"], report["kind"]) == ("piqa", 8, "discrete")
    assert report["models"] == {"old": {"accuracy": 0.5}, "new": {"accuracy": 0.375}, "compat": {"accuracy": 0.625}}
    assert report["pairs"]["old->new"] == {
        "delta_accuracy": -0.125, "agreement": 0.5, "nfr": 0.25, "pfr": 0.125, "btc": 0.5, "nfr_ext": 0.375,
        "inconsistency_flips": 0.125, "correct_set_flips": 0.0,
        "quadrants": {"both_correct": 2, "positive_flip": 1, "both_wrong": 3, "negative_flip": 2}}
    assert report["pairs"]["old->compat"] == {
        "delta_accuracy": 0.125, "agreement": 0.875, "nfr": 0.0, "pfr": 0.125, "btc": 1.0, "nfr_ext": 0.0,
        "inconsistency_flips": 0.0, "correct_set_flips": 0.0,
        "quadrants": {"both_correct": 4, "positive_flip": 1, "both_wrong": 3, "negative_flip": 0}}
    assert report["relative"] == {"nfr": -100.0, "pfr": 0.0, "btc": 100.0, "nfr_ext": -100.0,
                                  "inconsistency_flips": -100.0, "correct_set_flips": None}
    assert report["paper"] == {"delta_accuracy": 0.25, "dnfr_percent": -100.0}
    assert "regressions" not in report and report["other_metrics"] == {}
    flips = [json.loads(line) for line in (tmp_path / "out" / "regressions.jsonl").read_text().splitlines()]
    assert [(f["pair"], f["id"], f["gold"], f["old_prediction"], f["model_prediction"]) for f in flips] == [
        ("old->new", "q2", 0, 0, 1), ("old->new", "q4", 1, 1, 2)]  # no log-likelihoods: file order
    md = (tmp_path / "out" / "report.md").read_text()
    for row in ["| model | acc | ΔAcc | NFR | dNFR% | PFR | BTC | NFR_ext | agree | dAcc(old) | dNFR |",
                "| old | 50.00 |  |  |  |  |  |  |  |  |  |",
                "| new | 37.50 |  | 25.00 |  | 12.50 | 50.00 | 37.50 | 50.00 | -12.50 |  |",
                "| compat | 62.50 | +25.00 | 0.00 | -100.00 | 12.50 | 100.00 | 0.00 | 87.50 | +12.50 | -25.00 |",
                "Worst regressions old->new (2 of 2; all in regressions.jsonl)",
                "| id | prompt (start) | gold | old | new |",
                "| q2 |  | 0 | 0 | 1 |",
                "| old->new | 2 | 1 | 3 | 2 |",
                "| inconsistency flips | 12.50 | 0.00 | -100.00 |",
                "| correct-set flips | 0.00 | 0.00 | n/a |"]:
        assert row + "\n" in md
    assert "| compat | 62.50 | +25.00 |" in capsys.readouterr().out
    assert "Worst regressions old->compat" not in md


def test_compare_continuous_reproduces_hand_computed_numbers(tmp_path):
    files = [write_jsonl(tmp_path / f"{name}.jsonl", score_records(values))
             for name, values in [("old", OLD_S), ("new", NEW_S), ("compat", COMPAT_S)]]
    compare.main([*files, "--out", str(tmp_path / "out")])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["kind"] == "continuous"
    assert report["models"] == {"old": {"mean_score": 0.55}, "new": {"mean_score": 0.55}, "compat": {"mean_score": 0.6}}
    assert report["pairs"]["old->new"] == {"delta_mean_score": 0.0, "agreement": 1.0, "gain_rate": 0.4, "regression_rate": 0.2,
                                           "expected_gain": 0.25, "expected_regression": -0.5}
    assert report["pairs"]["old->compat"]["expected_regression"] is None
    assert report["relative"] == {"gain_rate": -50.0, "regression_rate": -100.0, "expected_gain": 0.0,
                                  "expected_regression": None}
    assert report["scores"]["compat"] == COMPAT_S
    md = (tmp_path / "out" / "report.md").read_text()
    assert report["paper"] == {"delta_mean_score": pytest.approx(0.05), "dreg_percent": -100.0}
    assert "| model | score | ΔScore | Reg | dReg% | Gain | E[gain] | E[reg] | agree | dScore(old) | dReg |\n" in md
    assert "| new | 55.00 |  | 20.00 |  | 40.00 | 25.00 | -50.00 | 100.00 | +0.00 |  |\n" in md
    assert "| compat | 60.00 | +5.00 | 0.00 | -100.00 | 20.00 | 25.00 | n/a | 100.00 | +5.00 | -20.00 |\n" in md
    assert "| s2 |  |  | summary 2 | summary 2 | 75.00 | 25.00 | -50.00 |\n" in md


def test_report_without_compat_has_one_pair():
    report = r.compatibility_report(records(OLD), records(NEW))
    assert list(report["pairs"]) == ["old->new"] and report["relative"] == {}
    assert "| new | 37.50 |  | 25.00 |  | 12.50 |" in r.format_report_text(report)


@pytest.mark.parametrize("new, message", [
    (records(NEW)[:7], r"old \(o.jsonl\) has 8 records and new \(n.jsonl\) has 7: 1 ids only in old \(e.g. \['q7'\]\)"),
    (records(NEW, task="hellaswag"), "holds task 'hellaswag' but old"),
    (records(NEW) + records(NEW)[:2], r"new \(n.jsonl\): 2 ids appear more than once, e.g. \['q0', 'q1'\]"),
    ([], r"new \(n.jsonl\): no prediction records"),
    ([{"id": "q0", "task": "piqa"}], r"new \(n.jsonl\) record 1: prediction record lacks \['prediction'\]"),
])
def test_mismatched_prediction_files_are_clear_errors(new, message):
    with pytest.raises(ValueError, match=message):
        r.compatibility_report(records(OLD), new, sources={"old": "o.jsonl", "new": "n.jsonl"})


def test_continuous_records_need_scores():
    new = score_records(NEW_S)
    new[2]["score"] = None
    with pytest.raises(ValueError, match="id 's2'.*finite numeric `score`"):
        r.compatibility_report(score_records(OLD_S), new)


def choice_records(preds, lls=None, norm=None):
    """Multiple-choice records with per-choice log-likelihoods and acc_norm's choice (GOLD as gold)."""
    rows = records(preds)
    for i, row in enumerate(rows):
        row["prompt"] = f"Question {i}: which one?\nAnswer:"
        if lls is not None:
            row["loglikelihoods"] = lls[i]
        if norm is not None:
            row.update(acc_norm_prediction=norm[i], correct_norm=norm[i] == GOLD[i])
    return rows


def test_negative_flips_rank_by_the_new_models_margin_and_show_limits_the_table(tmp_path, capsys):
    # old->new flips at q2 (gold 0, new says 1) and q4 (gold 1, new says 2); new is surer of q4's mistake.
    new_lls = [[-1.0, -2.0, -3.0, -4.0]] * 8
    new_lls[2] = [-2.0, -1.5, -3.0, -4.0]  # margin ll[1] - ll[0] = 0.5
    new_lls[4] = [-3.0, -6.0, -2.0, -9.0]  # margin ll[2] - ll[1] = 4.0
    old_lls = [[-1.0, -1.0, -1.0, -1.0]] * 8
    files = [write_jsonl(tmp_path / "old.jsonl", choice_records(OLD, old_lls)),
             write_jsonl(tmp_path / "new.jsonl", choice_records(NEW, new_lls))]
    assert compare.main([*files, "--show", "1", "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "Worst regressions old->new (1 of 2; all in regressions.jsonl)" in printed
    assert ("| q4 | Question 4: which one? Answer: | 1 | 1 | 2 | [-1.0, -1.0, -1.0, -1.0] | "
            "[-3.0, -6.0, -2.0, -9.0] | 4.00 |") in printed and "| q2 |" not in printed
    flips = [json.loads(line) for line in (tmp_path / "out" / "regressions.jsonl").read_text().splitlines()]
    assert [(f["id"], f["margin"]) for f in flips] == [("q4", 4.0), ("q2", 0.5)]
    assert flips[0]["prompt"] == "Question 4: which one?\nAnswer:" and flips[0]["model_loglikelihoods"] == new_lls[4]


def test_regressions_show_the_choices_texts_where_the_records_have_them(tmp_path, capsys):
    # PIQA-like choices that differ only after a shared start: the cells show where they differ.
    choices = [[f"Put the pan on the stove and {end} it." for end in ("heat", "freeze", "paint", "sell")]] * 8
    old, new = choice_records(OLD), choice_records(NEW)
    for row, texts in zip(old, choices):
        row["choices"] = texts
    files = [write_jsonl(tmp_path / "old.jsonl", old), write_jsonl(tmp_path / "new.jsonl", new)]
    assert compare.main([*files, "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out  # q4: gold 1, old 1, new 2; the new file has no choices: old's are used
    assert "| q4 | Question 4: which one? Answer: | 1: ...freeze it. | 1: ...freeze it. | 2: ...paint it. |" in printed
    flips = [json.loads(line) for line in (tmp_path / "out" / "regressions.jsonl").read_text().splitlines()]
    assert [f["choices"] for f in flips] == [choices[2], choices[4]]
    assert (flips[1]["gold"], flips[1]["model_prediction"]) == (1, 2)  # indices kept beside the texts


def gsm8k_records(texts, references):
    import eval as ev  # eval.py's own record of a generated text, as stage 4 writes it

    return [{"id": f"gsm8k/test/{i}", "task": "gsm8k",
             **ev.generation_record("exact_match", SimpleNamespace(references=[ref]), text)}
            for i, (text, ref) in enumerate(zip(texts, references))]


def test_exact_match_compares_the_extracted_answers_not_the_generated_texts(tmp_path):
    references = ["#### 18", "She had 2 + 3 = 5 apples left after giving the others away, so #### 5",
                  "#### 9", "#### 4"]
    # old: right, right, wrong (7), wrong (3). new: right in other words ("18." is 18 to exact
    # match), wrong (6), the same wrong answer in other words, another wrong answer: one negative
    # flip, one inconsistency flip.
    old = gsm8k_records(["So #### 18", "So #### 5", "So #### 7", "So #### 3"], references)
    new = gsm8k_records(["Hence #### 18.", "It is 5, no: #### 6", "Thus #### 7", "#### 2"], references)
    files = [write_jsonl(tmp_path / "old.jsonl", old), write_jsonl(tmp_path / "new.jsonl", new)]
    assert compare.main([*files, "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    pair = report["pairs"]["old->new"]
    assert (pair["agreement"], pair["nfr"], pair["inconsistency_flips"], pair["nfr_ext"]) == (0.5, 0.25, 0.25, 0.5)
    assert r.compatibility_report(old, new)["pairs"] == report["pairs"]  # stage 4's report, from the records
    flips = [json.loads(line) for line in (tmp_path / "out" / "regressions.jsonl").read_text().splitlines()]
    assert [(f["id"], f["old_prediction"], f["model_prediction"], f["old_text"], f["model_text"]) for f in flips] == [
        ("gsm8k/test/1", "5", "6", "So #### 5", "It is 5, no: #### 6")]
    row = regressions.table(flips, "old->new", show=1)[4]
    assert row.startswith("| gsm8k/test/1 |  | She had 2 + 3 = 5 apples left") and " #### 5 | 5 | 6 |" in row
    # flexible-extract takes the last number: "It is 5, no: #### 6" still answers 6
    flexible = compare.build(dict(zip(("old", "new"), files)), "exact_match,flexible-extract")
    assert flexible["pairs"]["old->new"]["agreement"] == 0.5


def test_regressions_table_names_the_compared_model_in_its_columns():
    row = {"pair": "old->compat", "id": "q1", "prompt": "p", "gold": 0, "old_prediction": 0,
           "model_prediction": 1, "old_loglikelihoods": [-1.0, -2.0], "model_loglikelihoods": [-2.0, -1.0],
           "margin": 1.0}
    header = regressions.table([row], "old->compat", show=5)[2]
    assert header == ("| id | prompt (start) | gold | old | compat | log-likelihoods old | "
                      "log-likelihoods compat | margin |")


def test_largest_score_drops_come_first():
    old, new = score_records([0.9, 0.5, 0.8, 0.2]), score_records([0.1, 0.6, 0.7, 0.2])
    flips = r.compatibility_report(old, new)["regressions"]
    assert [(f["id"], round(f["delta"], 6)) for f in flips] == [("s0", -0.8), ("s2", -0.1)]


def test_multiple_choice_reports_nfr_under_acc_norm_too():
    # acc_norm choices: old right at 0-3, new right at 0, 1, 4; compat right at 0-4.
    norm = {"old": [0, 0, 0, 0, 0, 0, 0, 0], "new": [0, 0, 1, 1, 1, 0, 0, 0], "compat": [0, 0, 0, 0, 1, 0, 0, 0]}
    report = r.compatibility_report(*(choice_records(p, norm=norm[role])
                                      for role, p in (("old", OLD), ("new", NEW), ("compat", COMPAT))))
    block = report["other_metrics"]["acc_norm,none"]
    assert block["accuracy"] == {"old": 0.5, "new": 0.375, "compat": 0.625}
    assert block["pairs"] == {"old->new": {"nfr": 0.25, "pfr": 0.125}, "old->compat": {"nfr": 0.0, "pfr": 0.125}}
    assert block["dnfr_percent"] == -100.0
    assert "| acc_norm,none | 50.00 | 37.50 | 62.50 | 25.00 | 0.00 | -100.00 |" in r.format_report_text(report)
    assert list(report["other_metrics"]) == ["acc_norm,none"]  # `score` repeats acc: not listed


def test_under_acc_norm_the_answers_are_acc_norms_choices(tmp_path):
    norm = {"old": [0] * 8, "new": [0, 0, 1, 1, 1, 0, 0, 0]}  # acc_norm: old right at 0-3, new at 0, 1, 4
    paths = {role: write_jsonl(tmp_path / f"{role}.jsonl", choice_records(p, norm=norm[role]))
             for role, p in (("old", OLD), ("new", NEW))}
    result = compare.build(paths, "acc_norm")
    assert result["pairs"]["old->new"]["agreement"] == 5 / 8  # under acc (OLD vs NEW) it is 4 / 8
    assert [(f["id"], f["old_prediction"], f["model_prediction"]) for f in result["regressions"]] == [
        ("q2", 0, 1), ("q3", 0, 1)]


def _error(argv, capsys) -> str:
    """The one `error:` line (exit status 2) of a compare that must refuse its input."""
    assert compare.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_compare_refuses_bad_files_in_one_line_naming_file_and_line(tmp_path, capsys):
    old = write_jsonl(tmp_path / "old.jsonl", records(OLD))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(records(NEW)[0]) + "\n{not json\n")
    assert "predictions file not found" in _error([old, tmp_path / "missing.jsonl"], capsys)
    assert f"{bad}:2: not valid JSON" in _error([old, bad], capsys)
    assert "error: --show -1: pass 0 or more" in _error([old, old, "--show", "-1"], capsys)
    empty = write_jsonl(tmp_path / "empty.jsonl", [])
    assert f"{empty}: empty file, no records: evaluate the model again" in _error([old, empty], capsys)
    twice = write_jsonl(tmp_path / "twice.jsonl", records(NEW) + records(NEW)[3:4])
    assert f"new ({twice}), line 4: 1 ids appear more than once, e.g. ['q3']" in _error([old, twice], capsys)
    other_task = write_jsonl(tmp_path / "hellaswag.jsonl", records(NEW, task="hellaswag"))
    assert f"new ({other_task}) holds task 'hellaswag' but old ({old}) holds 'piqa'" in _error([old, other_task], capsys)
    assert (f"old ({old}), line 1: no metric 'acc_norm' in the records (they have acc,none, score,none); "
            "pass --metric with one of those") in _error([old, old, "--metric", "acc_norm"], capsys)
    normed = write_jsonl(tmp_path / "normed.jsonl", choice_records(OLD, norm=OLD))
    assert (f"new ({old}), line 1 (id 'q0'): no metric 'acc_norm,none' (it has acc,none, score,none); pass "
            "--metric with a metric every file has") in _error([normed, old, "--metric", "acc_norm"], capsys)
    shifted = [dict(r, gold=1) if r["id"] == "q2" else dict(r, gold=GOLD[i]) for i, r in enumerate(records(NEW))]
    gold = write_jsonl(tmp_path / "gold.jsonl", [dict(r, gold=GOLD[i]) for i, r in enumerate(records(OLD))])
    other_docs = write_jsonl(tmp_path / "other_docs.jsonl", shifted)
    assert (f"old ({gold}), line 3 and new ({other_docs}), line 3 (id 'q2') are different documents (gold 0 vs 1)"
            in _error([gold, other_docs], capsys))


def test_write_report_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    for name in ("matplotlib", "matplotlib.figure"):  # None in sys.modules makes the import fail
        monkeypatch.setitem(sys.modules, name, None)
    written = r.write_report(r.compatibility_report(records(OLD), records(NEW)), tmp_path)
    assert [p.name for p in written] == ["report.json", "report.md", "regressions.jsonl"]
    assert "`pip install matplotlib`" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("make", [lambda: r.compatibility_report(records(OLD), records(NEW), records(COMPAT)),
                                  lambda: r.compatibility_report(score_records(OLD_S), score_records(NEW_S))])
def test_write_report_draws_a_png(tmp_path, make):
    pytest.importorskip("matplotlib", reason="report.png needs the optional extra: pip install matplotlib")
    written = r.write_report(make(), tmp_path)
    assert written[-1].name == "report.png" and written[-1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![quadrants and scores](report.png)" in (tmp_path / "report.md").read_text()


# --- `eval.py summary`: several updates in one table ---

def test_summary_of_prediction_folders_has_the_paper_columns(tmp_path, capsys):
    import summary

    first, second = tmp_path / "v1-v2", tmp_path / "v1-v3"
    first.mkdir(), second.mkdir()
    for name, preds in (("old", OLD), ("new", NEW), ("compat", COMPAT)):
        write_jsonl(first / f"{name}.jsonl", records(preds))
    for name, values in (("m1", OLD_S), ("m2", NEW_S)):  # a continuous update, no compat model
        write_jsonl(second / f"{name}.jsonl", score_records(values))
    out = tmp_path / "summary"
    assert summary.main([str(first), str(second), "--out", str(out)]) == 0
    rows = json.loads((out / "summary.json").read_text())["rows"]
    assert {k: rows[0][k] for k in ("update", "task", "metric", "n", "acc_old", "acc_new", "acc_compat",
                                    "delta_acc", "nfr_m1_m2", "nfr_m1_mc", "dnfr_percent", "pfr_m1_m2", "pfr_m1_mc")} \
        == {"update": "v1-v2", "task": "piqa", "metric": "acc,none", "n": 8, "acc_old": 0.5, "acc_new": 0.375,
            "acc_compat": 0.625, "delta_acc": 0.25, "nfr_m1_m2": 0.25, "nfr_m1_mc": 0.0, "dnfr_percent": -100.0,
            "pfr_m1_m2": 0.125, "pfr_m1_mc": 0.125}
    assert (rows[1]["kind"], rows[1]["nfr_m1_m2"], rows[1]["pfr_m1_m2"], rows[1]["acc_compat"]) == \
        ("continuous", 0.2, 0.4, None)
    md = (out / "summary.md").read_text()
    assert "| v1-v2 | piqa | acc,none | 8 | 50.00 | 37.50 | 62.50 | +25.00 | 25.00 | 0.00 | -100.00 | 12.50 | 12.50 |" in md
    assert "| v1-v3 | samsum | score,none | 5 | 55.00 | 55.00 | n/a | n/a | 20.00 | n/a | n/a | 40.00 | n/a |" in md
    assert "| v1-v2 | piqa |" in capsys.readouterr().out
    if (out / "summary.png").exists():
        assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"


def test_summary_refuses_a_folder_without_predictions(tmp_path, capsys):
    import summary

    (tmp_path / "empty").mkdir()
    assert summary.main([str(tmp_path / "empty"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'empty'} holds no m1.jsonl + m2.jsonl") and err.count("\n") == 1
