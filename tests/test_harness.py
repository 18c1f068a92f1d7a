"""harness.py and `compare` on sample files written by lm-evaluation-harness itself.

Once per session the harness CLI (`lm_eval --log_samples`) runs offline on two tiny random Llama
checkpoints, over local task files made of real PIQA, GSM8K and SAMSum items: a multiple-choice
task (acc, acc_norm), a generation task with GSM8K's two filters and a summarisation task with a
continuous per-sample metric and a corpus-level one (BLEU). The oracles are the harness's
own per-sample metrics and its aggregated results file, and eval.py's log-likelihoods of the same
model (a mixed comparison must give the numbers of the harness-only one).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, ROOT
from fake_hub import save_checkpoint, tiny_hf_model
from test_eval import build_tokenizer

import compare
import data
import eval as ev
import harness
import models
import predictions
import regressions

N_CHOICE, N_GEN, N_SUMM = 16, 4, 8


def _task_yaml(task: str, split: str, output_type: str, body: str) -> str:
    """A harness task YAML over the local JSON Lines file {path} (filled in by _write_tasks)."""
    head = (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    {split}: {{path}}\n"
            f"output_type: {output_type}\n{split}_split: {split}\n")
    return head + body


PIQA_YAML = _task_yaml("piqa", "validation", "multiple_choice", """doc_to_text: "Question: {{{{goal}}}}\\nAnswer:"
doc_to_target: label
doc_to_choice: "{{{{[sol1, sol2]}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
""")
# GSM8K's harness task (gsm8k.yaml) with 8 new tokens instead of 256, to keep the test fast.
GSM8K_YAML = _task_yaml("gsm8k", "test", "generate_until", """doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: "strict-match"
    filter:
      - function: "regex"
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: "take_first"
  - name: "flexible-extract"
    filter:
      - function: "regex"
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: "take_first"
""")

# A summarisation task scored per sample by a continuous metric of its own (process_results, as
# many harness tasks do) and by BLEU, which the harness computes over the whole corpus: its
# per-sample field is the (reference, prediction) pair, not a number.
SUMM_YAML = _task_yaml("summ", "test", "generate_until", """doc_to_text: "Dialogue: {{{{dialogue}}}}\\nSummary:"
doc_to_target: "{{{{summary}}}}"
process_results: !function summ_metrics.process_results
metric_list:
  - metric: similarity
    aggregation: mean
    higher_is_better: true
  - metric: bleu
    aggregation: bleu
    higher_is_better: true
generation_kwargs:
  until: ["\\n"]
  do_sample: false
  max_gen_toks: 8
""")
SUMM_METRICS = """import difflib


def process_results(doc, results):
    return {"similarity": difflib.SequenceMatcher(None, doc["summary"], results[0]).ratio(),
            "bleu": (doc["summary"], results[0])}
"""


def _piqa_items():
    """PIQA validation items whose two solutions have about the same length, so that two random
    models (whose log-likelihoods mostly count tokens) disagree on some of them."""
    rows = [json.loads(line) for line in (DATA_DIR / "piqa" / "valid.jsonl").open()]
    labels = (DATA_DIR / "piqa" / "valid-labels.lst").read_text().split()
    chosen = [i for i, r in enumerate(rows) if abs(len(r["sol1"]) - len(r["sol2"])) <= 2][:N_CHOICE]
    return [rows[i] for i in chosen], [labels[i] for i in chosen]


def _write_tasks(root: Path) -> Path:
    """Harness task YAMLs over local JSON Lines, and the same PIQA items in eval.py's layout."""
    rows, labels = _piqa_items()
    (root / "data" / "piqa").mkdir(parents=True)
    (root / "data" / "piqa" / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "data" / "piqa" / "valid-labels.lst").write_text("".join(f"{label}\n" for label in labels))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "piqa.jsonl").write_text("".join(json.dumps({**r, "label": int(label)}) + "\n"
                                              for r, label in zip(rows, labels)))
    gsm8k = (DATA_DIR / "gsm8k" / "test.jsonl").read_text().splitlines()[:N_GEN]
    (tasks / "gsm8k.jsonl").write_text("\n".join(gsm8k) + "\n")
    (tasks / "piqa.yaml").write_text(PIQA_YAML.format(path=tasks / "piqa.jsonl"))
    (tasks / "gsm8k.yaml").write_text(GSM8K_YAML.format(path=tasks / "gsm8k.jsonl"))
    dialogues = json.loads((DATA_DIR / "samsum" / "test.json").read_text())[:N_SUMM]
    (tasks / "summ.jsonl").write_text("".join(json.dumps({"dialogue": d["dialogue"], "summary": d["summary"]}) + "\n"
                                              for d in dialogues))
    (tasks / "summ.yaml").write_text(SUMM_YAML.format(path=tasks / "summ.jsonl"))
    (tasks / "summ_metrics.py").write_text(SUMM_METRICS)
    return tasks


@pytest.fixture(scope="session")
def runs(tmp_path_factory):
    """Two tiny checkpoints (seeds 0 and 1) evaluated by the harness CLI, offline, in parallel.

    Returns {"models": [dir0, dir1], "samples": {(seed, task): file}, "results": [dict0, dict1],
    "data": eval.py's --data-dir of the same PIQA items}.
    """
    pytest.importorskip("lm_eval", reason="lm-evaluation-harness is a test requirement: "
                                          "pip install -r requirements-test.txt")
    if not DATA_DIR.is_dir():
        pytest.skip(f"real task data not found at {DATA_DIR} (set MUSCLE_DATA_DIR)")
    root = tmp_path_factory.mktemp("harness")
    tasks = _write_tasks(root)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HOME": str(root / "hf"), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    dirs, jobs = [], []
    for seed in (0, 1):
        path = root / f"model{seed}"
        vocab = build_tokenizer(path, bos=True, split_words=True)
        hf = tiny_hf_model("llama", seed=seed, vocab_size=vocab, bos_token_id=0, eos_token_id=1,
                           pad_token_id=None, max_position_embeddings=256)
        with torch.no_grad():  # sharper next-token distributions: the two models' choices differ more
            hf.lm_head.weight.mul_(30)
        save_checkpoint(hf, path)
        dirs.append(path)
        command = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
                   f"pretrained={path},dtype=float32", "--tasks", "piqa,gsm8k,summ", "--include_path", str(tasks),
                   "--output_path", str(root / f"out{seed}"), "--log_samples", "--device", "cpu",
                   "--batch_size", "4"]
        jobs.append(subprocess.Popen(command, env=env, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True))
    for job in jobs:
        output = job.communicate(timeout=600)[0]
        assert job.returncode == 0, output[-3000:]
    samples = {(seed, harness.task_of(f)): f for seed in (0, 1) for f in (root / f"out{seed}").rglob("samples_*.jsonl")}
    results = [json.loads(next((root / f"out{seed}").rglob("results_*.json")).read_text()) for seed in (0, 1)]
    return {"models": dirs, "samples": samples, "results": results, "data": root / "data"}


def test_records_reproduce_the_harness_results(runs):
    for seed in (0, 1):
        for task, n, keys in (("piqa", N_CHOICE, ["acc,none", "acc_norm,none"]),
                              ("gsm8k", N_GEN, ["exact_match,strict-match", "exact_match,flexible-extract"])):
            records = predictions.read_run(runs["samples"][seed, task])
            assert len(records) == n and [r["id"] for r in records] == list(range(n))
            assert list(records[0]["metrics"]) == keys  # the task's first metric and filter come first
            for key in keys:
                mean = sum(r["metrics"][key] for r in records) / n
                assert mean == pytest.approx(runs["results"][seed]["results"][task][key])
    rows, labels = _piqa_items()
    piqa = predictions.read_run(runs["samples"][0, "piqa"])
    assert [r["gold"] for r in piqa] == [int(label) for label in labels]
    assert [r["choices"] for r in piqa] == [[row["sol1"], row["sol2"]] for row in rows]
    assert all(r["prompt"] == f"Question: {row['goal']}\nAnswer:" for r, row in zip(piqa, rows))
    assert all((r["prediction"] == r["gold"]) == (r["metrics"]["acc,none"] == 1.0) for r in piqa)


def _flips(old, new, key):
    """NFR and PFR computed straight from the harness's per-sample metric."""
    pairs = [(a["metrics"][key], b["metrics"][key]) for a, b in zip(old, new)]
    return (sum(a == 1 and b == 0 for a, b in pairs) / len(pairs), sum(a == 0 and b == 1 for a, b in pairs) / len(pairs))


def test_compare_two_harness_files(runs, tmp_path, capsys):
    old, new = runs["samples"][0, "piqa"], runs["samples"][1, "piqa"]
    assert compare.main([str(old), str(new), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    records = [predictions.read_run(f) for f in (old, new)]
    nfr, pfr = _flips(*records, "acc,none")
    assert nfr > 0 and pfr > 0, "the two random models should disagree somewhere"
    assert (report["task"], report["n"], report["kind"], report["metric"]) == ("piqa", N_CHOICE, "discrete", "acc,none")
    assert (report["pairs"]["old->new"]["nfr"], report["pairs"]["old->new"]["pfr"]) == (nfr, pfr)
    nfr_norm, pfr_norm = _flips(*records, "acc_norm,none")
    assert report["other_metrics"]["acc_norm,none"]["pairs"]["old->new"] == {"nfr": nfr_norm, "pfr": pfr_norm}
    flips = [json.loads(line) for line in (tmp_path / "regressions.jsonl").read_text().splitlines()]
    assert len(flips) == round(nfr * N_CHOICE)
    by_id = {r["id"]: r for r in records[1]}
    docs = _piqa_items()[0]  # the doc_id is the item's position
    for flip in flips:  # the new model's margin for its wrong answer, from the harness's log-likelihoods
        lls = by_id[flip["id"]]["loglikelihoods"]
        assert flip["margin"] == pytest.approx(lls[flip["model_prediction"]] - lls[flip["gold"]]) and flip["margin"] > 0
        assert flip["prompt"].startswith("Question: ") and flip["old_prediction"] == flip["gold"]
        assert flip["choices"] == [docs[flip["id"]][key] for key in ("sol1", "sol2")]
    cells = regressions.table(flips, "old->new", show=1)[4].split(" | ")  # the worst flip's row
    worst, texts = flips[0], []
    for cell, index in ((cells[2], worst["gold"]), (cells[4], worst["model_prediction"])):
        assert cell.startswith(f"{index}: ")  # "1: ...jeans material, you will ... and a food dish."
        texts.append(cell.removeprefix(f"{index}: ").removeprefix("..."))
        assert all(part and part in " ".join(worst["choices"][index].split()) for part in texts[-1].split(" ... "))
    assert texts[0] != texts[1]
    assert [f["margin"] for f in flips] == sorted((f["margin"] for f in flips), reverse=True)
    assert compare.main([str(old), str(new), "--metric", "acc_norm"]) == 0
    assert f"| new | {100 * report['other_metrics']['acc_norm,none']['accuracy']['new']:.2f} |  | {100 * nfr_norm:.2f} |" \
        in capsys.readouterr().out


def test_gsm8k_filters_are_metrics(runs, tmp_path):
    old, new = runs["samples"][0, "gsm8k"], runs["samples"][1, "gsm8k"]
    for metric, key in ((None, "exact_match,strict-match"), ("exact_match", "exact_match,strict-match"),
                        ("exact_match,flexible-extract", "exact_match,flexible-extract")):
        result = compare.build({"old": str(old), "new": str(new)}, metric)
        assert result["metric"] == key and result["n"] == N_GEN
        # the same answer is the same filtered response (the extracted number), not the same text
        answers = [{json.loads(line)["doc_id"]: json.loads(line)["filtered_resps"] for line in f.read_text().splitlines()
                    if json.loads(line)["filter"] == key.split(",")[1]} for f in (old, new)]
        agree = sum(answers[0][i] == answers[1][i] for i in range(N_GEN)) / N_GEN
        assert result["pairs"]["old->new"]["agreement"] == agree
    texts = [[r["prediction"] for r in predictions.read_run(f)] for f in (old, new)]
    assert agree != sum(a == b for a, b in zip(*texts)) / N_GEN, "the files should tell answers from texts"
    lines = [json.loads(line) for line in old.read_text().splitlines()]
    assert texts[0] == [line["resps"][0][0] for line in lines if line["filter"] == "strict-match"]


def test_a_continuous_harness_metric_gives_the_continuous_report(runs, tmp_path, capsys):
    old, new = runs["samples"][0, "summ"], runs["samples"][1, "summ"]
    scores = [[json.loads(line)["similarity"] for line in f.read_text().splitlines()] for f in (old, new)]
    drops = sorted(b - a for a, b in zip(*scores) if b < a)
    assert drops, "the two random models should differ"
    result = compare.build({"old": str(old), "new": str(new)}, None)
    assert (result["kind"], result["metric"], result["n"]) == ("continuous", "similarity,none", N_SUMM)
    for role, seed in (("old", 0), ("new", 1)):
        assert result["models"][role]["mean_score"] == pytest.approx(runs["results"][seed]["results"]["summ"]["similarity,none"])
    assert result["pairs"]["old->new"]["regression_rate"] == len(drops) / N_SUMM
    assert [row["delta"] for row in result["regressions"]] == pytest.approx(drops)
    # BLEU is aggregated over the corpus: no instance has a BLEU of its own to compare.
    assert (f"old ({old}), line 1: metric 'bleu' is computed over the whole corpus (each sample logs its "
            "inputs to it, not a score), so no instance has a value of its own; pass --metric with one of "
            "similarity,none") in _error([old, new, "--metric", "bleu"], capsys)


def test_eval_records_and_harness_samples_mix(runs, tmp_path):
    """eval.py's predictions of model 0 stand in for the harness's: same log-likelihoods, same report."""
    model_dir = runs["models"][0]
    items = data.load_task("piqa", "validation", runs["data"])
    assert len(items) == N_CHOICE
    model, tokenizer = models.load_model(model_dir), models.load_tokenizer(model_dir)
    ours = ev.write_predictions(ev.evaluate(model, tokenizer, "piqa", items, add_bos=True), tmp_path / "m0.jsonl")
    theirs = predictions.read_run(runs["samples"][0, "piqa"])
    for a, b in zip(predictions.read_run(ours), theirs):
        assert a["loglikelihoods"] == pytest.approx(b["loglikelihoods"], abs=1e-3)
    new = str(runs["samples"][1, "piqa"])
    mixed = compare.build({"old": str(ours), "new": new}, None)
    harness_only = compare.build({"old": str(runs["samples"][0, "piqa"]), "new": new}, None)
    assert mixed["pairs"] == harness_only["pairs"] and mixed["models"] == harness_only["models"]
    assert compare.build({"old": str(ours), "new": new}, "acc_norm")["pairs"] == \
        compare.build({"old": str(runs["samples"][0, "piqa"]), "new": new}, "acc_norm")["pairs"]


def _error(argv, capsys) -> str:
    assert compare.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def _edit(source: Path, target: Path, change) -> Path:
    """A copy of a harness file with `change(line_number, sample)` applied to each parsed line."""
    lines = [change(n, json.loads(line)) for n, line in enumerate(source.read_text().splitlines(), 1)]
    target.write_text("".join(json.dumps(x) + "\n" for x in lines if x is not None))
    return target


def test_bad_harness_inputs_are_one_line_errors(runs, tmp_path, capsys):
    old, new = runs["samples"][0, "piqa"], runs["samples"][1, "piqa"]
    gsm8k = runs["samples"][1, "gsm8k"]
    assert "holds task 'gsm8k' but" in _error([old, gsm8k], capsys)

    def other_doc(n, s):
        return {**s, "doc": {**s["doc"], "goal": "another"}, "doc_hash": "0" * 64} if n == 3 else s
    other = _edit(new, tmp_path / "samples_piqa_2026-01-01T00-00-00.0.jsonl", other_doc)
    err = _error([old, other], capsys)
    assert f"old ({old}), line 3 and new ({other}), line 3 (id 2) are different documents (doc_hash" in err

    def no_hash(n, s):
        return {k: v for k, v in s.items() if k != "doc_hash"}
    unhashed = _edit(new, tmp_path / "samples_piqa_nohash.jsonl", no_hash)
    assert f"{unhashed}:1: harness sample lacks ['doc_hash']" in _error([old, unhashed], capsys)

    def no_filtered(n, s):
        return {k: v for k, v in s.items() if k != "filtered_resps"}
    shape = _edit(new, tmp_path / "samples_piqa_shape.jsonl", no_filtered)
    assert f"{shape}:1: harness sample lacks ['filtered_resps']" in _error([old, shape], capsys)
    assert (f"old ({old}), line 1: no metric 'bleu' in the records (they have acc,none, acc_norm,none); "
            "pass --metric with one of those") in _error([old, new, "--metric", "bleu"], capsys)

    twice = tmp_path / "samples_piqa_twice.jsonl"
    twice.write_text(new.read_text() * 2)
    assert f"{twice}:{N_CHOICE + 1}: doc_id 0 under filter 'none' appears again (first at line 1)" in \
        _error([old, twice], capsys)
    empty = tmp_path / "samples_piqa_empty.jsonl"
    empty.write_text("\n")
    assert f"{empty}: empty file, no records" in _error([old, empty], capsys)


def test_mixing_needs_positions_in_the_ids(runs, tmp_path, capsys):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("".join(json.dumps({"id": f"item-{chr(97 + i)}", "task": "piqa", "prediction": 0, "gold": 0,
                                        "correct": True, "score": 1.0}) + "\n" for i in range(N_CHOICE)))
    err = _error([mine, runs["samples"][1, "piqa"]], capsys)
    assert "id 'item-a': comparing eval.py records with harness samples matches them by the item's position" in err


def test_eval_cli_dispatches_compare_to_harness_files(runs):
    old, new = runs["samples"][0, "piqa"], runs["samples"][1, "piqa"]
    done = subprocess.run([sys.executable, "eval.py", "compare", str(old), str(new)], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0 and "## Compatibility report: piqa (discrete, acc,none, N = 16)" in done.stdout
