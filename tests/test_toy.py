"""toy.py: the synthetic world is deterministic, its tasks split cleanly, and its checkpoints are
ordinary HF directories that load through models.py (and transformers, the oracle), rebuilt when
missing or corrupt. Uses the micro scenario so every build takes seconds."""
import contextlib
import hashlib
import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import data
import models
import toy
import toy_world

MICRO = toy.SCENARIOS["micro"].world


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private cache with both micro models built once for the module."""
    root = tmp_path_factory.mktemp("toy-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MUSCLE_CACHE", str(root))
        mp.setenv("MUSCLE_TOY_SIZE", "micro")
        paths = {name: toy.ensure_model(name) for name in toy.TOY_MODELS}
        yield root, paths


@pytest.fixture
def micro_env(cache, monkeypatch):
    monkeypatch.setenv("MUSCLE_CACHE", str(cache[0]))
    monkeypatch.setenv("MUSCLE_TOY_SIZE", "micro")
    return cache[1]


# ---------------------------------------------------------------- the world
def test_same_seed_same_world_corpus_and_tokenizer_bytes():
    a, b = toy_world.build_world(MICRO), toy_world.build_world(MICRO)
    assert a == b
    assert toy_world.corpus(a, 50, seed=3) == toy_world.corpus(b, 50, seed=3)
    assert toy_world.corpus(a, 50, seed=3) != toy_world.corpus(a, 50, seed=4)
    assert toy_world.build_tokenizer(a).to_str() == toy_world.build_tokenizer(b).to_str()
    other = toy_world.build_world(replace(MICRO, seed=1))
    assert [c.name for c in other] != [c.name for c in a]


def test_rules_hold_for_about_p_rule_of_creatures():
    creatures = toy_world.build_world(toy_world.WorldConfig(n_creatures=2000))
    for i, attribute in enumerate(("home", "food", "legs")):
        follows = sum(c.value(attribute) == str(toy_world.KINDS[c.kind][i]) for c in creatures) / len(creatures)
        assert abs(follows - 0.7) < 0.04, attribute


def test_corpus_states_only_true_facts_in_both_formats():
    creatures = {c.name: c for c in toy_world.build_world(MICRO)}
    sentences = toy_world.corpus(list(creatures.values()), 300, seed=0, p_qa=0.5)
    for sentence in sentences:
        c = creatures[next(w for w in sentence.split() if w in creatures)]
        true = [s.format(e=c.name, v=c.kind if a == "kind" else c.value(a)) for a, s in toy_world.STATEMENTS.items()]
        true += [toy_world.qa_text(c, a) for a in toy_world.QA]
        assert sentence in true, sentence
    # p_qa of the facts that have a question (5 of the 6 attributes; "kind" is only stated)
    questions = sum(s.startswith("Question: ") for s in sentences) / len(sentences)
    assert abs(questions - 0.5 * 5 / 6) < 0.08
    c = next(iter(creatures.values()))
    assert toy_world.qa_text(c, "legs") == f"Question: how many legs does the {c.name} have ?\nAnswer: #### {c.legs}"


def test_every_task_word_is_in_the_vocabulary():
    tok = toy_world.build_tokenizer(toy_world.build_world(MICRO))
    unk = tok.token_to_id(toy_world.UNK)
    for task in ("toy-mc", "toy-gen"):
        for split in toy.SPLITS:
            for item in toy.load_items(task, split, size="micro"):
                context, target = data.training_pair(task, item)
                assert unk not in tok.encode(context + target).ids, (context, target)


# ---------------------------------------------------------------- the tasks
def test_splits_are_disjoint_deterministic_and_complete():
    n = MICRO.n_creatures
    for task, per_creature in (("toy-mc", 3), ("toy-gen", 2)):
        train = toy.load_items(task, "train", size="micro")
        test = toy.load_items(task, "test", size="micro")
        assert len(train) + len(test) == per_creature * n
        assert len(test) == per_creature * round(MICRO.test_frac * n)
        creatures = [{i.id.split("/")[2] for i in part} for part in (train, test)]
        assert not creatures[0] & creatures[1]
        assert test == toy.load_items(task, "test", size="micro")
        assert len({i.id for i in train + test}) == len(train) + len(test)


def test_mc_items_have_the_fact_as_gold_and_the_rule_as_trap():
    creatures = toy_world.build_world(MICRO)
    by_name = {c.name: c for c in creatures}
    for item in toy_world.mc_items(creatures, "train", seed=0):
        _, _, name, attribute = item.id.split("/")
        c = by_name[name]
        assert len(item.choices) == len(set(item.choices)) == 4
        assert item.choices[item.gold] == c.value(attribute)
        if attribute in ("home", "food"):
            assert toy_world.KINDS[c.kind][("home", "food").index(attribute)] in item.choices


def test_gen_items_are_scored_by_gsm8k_exact_match():
    import metrics

    item = toy_world.gen_items(toy_world.build_world(MICRO)[:1], "test")[0]
    answer = item.target.strip()
    assert metrics.exact_match(metrics.extract_strict(answer), item.references[0])
    assert not metrics.exact_match(metrics.extract_strict("#### 99"), item.references[0])


def test_importing_toy_registers_its_tasks_in_data_and_its_bases_in_models():
    assert data.TASKS["toy-mc"].kind == "multiple_choice"
    assert data.TASKS["toy-gen"].metric == "exact_match"
    assert {name: models.BUILDERS[name] for name in toy.TOY_MODELS} == dict.fromkeys(toy.TOY_MODELS, toy.ensure_model)
    toy.register()  # idempotent
    assert len(data.load_task("toy-mc", "test")) > 0
    with pytest.raises(ValueError, match="no split"):
        toy.load_items("toy-mc", "validation")


# ---------------------------------------------------------------- the checkpoints
def test_checkpoints_load_through_models_and_match_transformers(micro_env):
    transformers = pytest.importorskip("transformers")
    for name, family in (("toy-v1", "LlamaForCausalLM"), ("toy-v2", "PhiForCausalLM")):
        model = models.load_model(name, dtype=torch.float32)
        assert type(model).__name__ == family
        tok = models.load_tokenizer(name)
        assert tok.add_bos and tok.bos_id == 1 and tok.eos_id == 2 and tok.pad_id == 3
        ids = torch.tensor([tok.encode("Question: what colour is the " + toy_world.build_world(MICRO)[0].name + " ?")])
        assert toy_world.UNK not in [models.load_tokenizer(name).decode([i]) for i in ids[0].tolist()]
        oracle = transformers.AutoModelForCausalLM.from_pretrained(micro_env[name], dtype=torch.float32)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), oracle(ids).logits, atol=1e-5, rtol=1e-4)


def test_same_vocabulary_different_architectures(micro_env):
    configs = [json.loads((micro_env[n] / "config.json").read_text()) for n in ("toy-v1", "toy-v2")]
    assert [c["model_type"] for c in configs] == ["llama", "phi"]
    assert (micro_env["toy-v1"] / "tokenizer.json").read_bytes() == (micro_env["toy-v2"] / "tokenizer.json").read_bytes()


def test_valid_cache_is_reused(micro_env):
    before = (micro_env["toy-v1"] / "model.safetensors").stat().st_mtime_ns
    assert toy.ensure_model("toy-v1") == micro_env["toy-v1"]
    assert (micro_env["toy-v1"] / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("damage", ["flip_byte", "delete_weights", "delete_manifest"])
def test_corrupt_or_missing_cache_is_rebuilt(micro_env, damage):
    path = micro_env["toy-v2"]
    weights = path / "model.safetensors"
    original = weights.read_bytes()
    if damage == "flip_byte":
        weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    elif damage == "delete_weights":
        weights.unlink()
    else:
        (path / toy.MANIFEST).unlink()
    assert not toy.is_valid(path, toy.recipe("micro", "v2"))
    assert toy.ensure_model("toy-v2") == path
    assert toy.is_valid(path, toy.recipe("micro", "v2"))
    # Deterministic from the seed: the rebuilt weights are the same bytes.
    assert weights.read_bytes() == original
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_build_does_not_depend_on_the_callers_thread_count(tmp_path):
    # Pre-training pins one thread, so every machine builds the same bytes (the README's numbers).
    threads = torch.get_num_threads()
    digests = []
    try:
        for n, sub in ((1, "one"), (2, "two")):
            torch.set_num_threads(n)
            toy.build("toy-v2", tmp_path / sub, size="micro")
            digests.append(json.loads((tmp_path / sub / toy.MANIFEST).read_text())["files"]["model.safetensors"])
            assert torch.get_num_threads() == n  # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    assert digests[0] == digests[1]


def test_toy_command_prints_each_bases_weights_sha256(micro_env, capsys):
    """`python toy.py` lets two machines compare the worlds they built: one line per base."""
    assert toy.main([]) == 0
    lines = [line.split("  ") for line in capsys.readouterr().out.splitlines()]
    assert [name for name, _, _ in lines] == list(toy.TOY_MODELS)
    for name, digest, path in lines:
        assert Path(path) == micro_env[name]
        assert digest == hashlib.sha256((micro_env[name] / "model.safetensors").read_bytes()).hexdigest()
    assert toy.main(["toy-v2"]) == 0 and capsys.readouterr().out.split("  ")[0] == "toy-v2"
    with pytest.raises(SystemExit) as err:
        toy.main(["toy-v9"])
    assert err.value.code == 2 and "unknown toy base 'toy-v9'; choose from toy-v1, toy-v2, toy-v3" in capsys.readouterr().err


def test_unknown_names_raise_clear_errors(monkeypatch):
    with pytest.raises(ValueError, match="not a toy model"):
        toy.ensure_model("toy-v9")
    monkeypatch.setenv("MUSCLE_TOY_SIZE", "huge")
    with pytest.raises(ValueError, match="MUSCLE_TOY_SIZE"):
        toy.scenario()


# ---------------------------------------------------------------- the README's first command, smaller
def _micro_flags(out, *extra):
    flags_file = Path(__file__).resolve().parent.parent / "configs" / "toy-mc.args"
    return [f"@{flags_file}", "--out", str(out), "--epochs", "1", "--limit-train", "40",
            "--limit-eval", "30", "--rank", "2", *extra]


def _train_once(cache, out, *extra):
    """train.py on the micro models, once per module; (run directory, what it printed)."""
    import train

    printed = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(printed):
        mp.setenv("MUSCLE_CACHE", str(cache[0]))
        mp.setenv("MUSCLE_TOY_SIZE", "micro")
        assert train.main(_micro_flags(out, *extra)) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def toy_run(cache, tmp_path_factory):
    """`train.py @configs/toy-mc.args` (toy-v1 -> toy-v2) on the micro models and a slice of the task."""
    return _train_once(cache, tmp_path_factory.mktemp("toy-run") / "run")


@pytest.fixture(scope="module")
def cross_vocab_run(cache, tmp_path_factory):
    """toy-v1 -> toy-v3, an update that changes the vocabulary, trained with --cross-vocab fill."""
    return _train_once(cache, tmp_path_factory.mktemp("cross-vocab-run") / "run", "--new", "toy-v3",
                       "--cross-vocab", "fill")


def test_first_command_end_to_end_on_micro_models(toy_run):
    """Every stage writes its outputs and the report has every field."""
    out, printed = toy_run
    for stage in ("stage1_task_old", "stage2_task_new", "stage3_compat"):
        assert (out / stage / "DONE").is_file()
        assert {p.name for p in (out / stage / "adapter").iterdir()} >= {"adapter_config.json",
                                                                          "adapter_model.safetensors"}
        assert any(json.loads(line).get("epoch") is not None for line in (out / stage / "log.jsonl").open())
    evald = out / "stage4_eval"
    for role in ("m1", "m2", "mc"):
        records = [json.loads(line) for line in (evald / f"{role}.jsonl").open()]
        assert len(records) == 30 and all(isinstance(r["correct"], bool) for r in records)
    report = json.loads((evald / "report.json").read_text())
    assert set(report["models"]) == {"old", "new", "compat"}
    assert all(0.0 <= report["models"][m]["accuracy"] <= 1.0 for m in report["models"])
    for pair in ("old->new", "old->compat"):
        assert {"nfr", "pfr", "btc", "nfr_ext", "inconsistency_flips", "quadrants"} <= set(report["pairs"][pair])
        assert sum(report["pairs"][pair]["quadrants"].values()) == 30
    assert "nfr" in report["relative"] and (evald / "report.md").is_file()
    flips = (evald / "regressions.jsonl").read_text().splitlines()
    assert len(flips) == sum(report["pairs"][p]["quadrants"]["negative_flip"] for p in report["pairs"])
    assert "Compatibility report: toy-mc" in printed


def test_cross_vocab_end_to_end_on_micro_models(micro_env, cross_vocab_run, tmp_path, capsys):
    """toy-v1 -> toy-v3 changes the vocabulary: refused without --cross-vocab (exit 2, the
    error names the flag), trained with it; stage 3's summary holds the coverage shares."""
    import train

    assert train.main(_micro_flags(tmp_path / "refused", "--new", "toy-v3")) == 2
    err = capsys.readouterr().err
    assert "do not share a vocabulary" in err and "pass --cross-vocab fill" in err
    out, printed = cross_vocab_run
    shares = json.loads((out / "stage3_compat" / "DONE").read_text())["cross_vocab"]
    # Names are the only words the two vocabularies spell differently: most label tokens align.
    assert 0.6 < shares["aligned"] < 1 and 0 < shares["mapped_mass"] < 1
    assert 0 < shares["followed_old"] <= shares["aligned"]  # the micro student is mostly wrong
    assert "of label tokens aligned with an M1 position" in printed
    report = json.loads((out / "stage4_eval" / "report.json").read_text())
    assert report["n"] == 30


@pytest.mark.parametrize("rule", ["prefix", "uld"])
def test_cross_vocab_rules_end_to_end_on_micro_models(micro_env, cache, cross_vocab_run, tmp_path,
                                                       rule):
    """The other rules train the same pair: prefix maps every split name to its first piece, so
    all of M1's mass maps but that on <unk> and <pad> (fill: the names v3 splits are lost too);
    uld maps as fill."""
    out, _ = _train_once(cache, tmp_path / rule, "--new", "toy-v3", "--cross-vocab", rule)
    shares = json.loads((out / "stage3_compat" / "DONE").read_text())["cross_vocab"]
    fill = json.loads((cross_vocab_run[0] / "stage3_compat" / "DONE").read_text())["cross_vocab"]
    assert shares["aligned"] == fill["aligned"]
    if rule == "prefix":
        assert fill["mapped_mass"] < shares["mapped_mass"] and 0.95 < shares["mapped_mass"] <= 1
    report = json.loads((out / "stage4_eval" / "report.json").read_text())
    assert report["n"] == 30 and 0 <= report["models"]["compat"]["accuracy"] <= 1


def test_summary_of_two_toy_updates(toy_run, cross_vocab_run, tmp_path):
    """`eval.py summary` over two finished runs: one row per update, the numbers of each run's report."""
    import summary

    assert summary.main([str(toy_run[0]), str(cross_vocab_run[0]), "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "summary.json").read_text())["rows"]
    assert [(r["update"], r["task"], r["n"]) for r in rows] == [("toy-v1 -> toy-v2", "toy-mc", 30),
                                                                 ("toy-v1 -> toy-v3", "toy-mc", 30)]
    for row, (out, _) in zip(rows, (toy_run, cross_vocab_run)):
        report = json.loads((out / "stage4_eval" / "report.json").read_text())
        assert (row["acc_old"], row["acc_new"], row["acc_compat"]) == tuple(
            report["models"][m]["accuracy"] for m in ("old", "new", "compat"))
        assert (row["nfr_m1_m2"], row["nfr_m1_mc"], row["dnfr_percent"]) == (
            report["pairs"]["old->new"]["nfr"], report["pairs"]["old->compat"]["nfr"], report["relative"]["nfr"])
        assert row["delta_acc"] == report["paper"]["delta_accuracy"]
    assert "| toy-v1 -> toy-v3 | toy-mc | acc,none | 30 |" in (tmp_path / "summary.md").read_text()


def test_one_vocabulary_ignores_cross_vocab_bit_for_bit(micro_env, tmp_path):
    """toy-v1 -> toy-v2 shares a vocabulary: --cross-vocab fill takes the paper's exact path,
    the same stage-3 losses and adapter bytes as without it."""
    import train

    runs = {}
    for flag in ("off", "fill"):
        out = tmp_path / flag
        assert train.main(_micro_flags(out, "--cross-vocab", flag, "--max-steps", "2",
                                       "--stage", "all")) == 0
        logs = [json.loads(line) for line in (out / "stage3_compat" / "log.jsonl").open()]
        runs[flag] = ([r.get("loss", r.get("val_loss")) for r in logs],
                      (out / "stage3_compat" / "adapter" / "adapter_model.safetensors").read_bytes())
        assert "cross_vocab" not in json.loads((out / "stage3_compat" / "DONE").read_text())
    assert runs["off"] == runs["fill"]
