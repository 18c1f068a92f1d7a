"""Issue 9 cases that no module's own tests cover: inputs longer than the model's context (cut
and counted), adapters for another base or architecture, one-line CLI errors, a full disk while
saving an adapter, and a static check that no product code unpickles or runs remote code."""
import ast
import errno
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import data
import eval as ev
import files
import generation
import likelihood
import lora
import models
import muscle
import stage_data
import train
import train_cli
from distributed import Dist
from tiny import CORPUS, ROOT, read_log, tiny_flags

LLAMA = dict(model_type="llama", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
             tie_word_embeddings=False)
PHI = dict(model_type="phi", vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
           num_attention_heads=4, max_position_embeddings=2048)


def tiny(config: dict, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    return models.build_model({**config, **overrides}).eval()


def saved_adapter(model: torch.nn.Module, path: Path) -> Path:
    """A rank-2 adapter with non-zero B (so it changes outputs), saved in PEFT's format."""
    lora.add_adapter(model, "task", rank=2, alpha=4)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "task").values():
            p.normal_(0, 0.3)
    lora.save_adapter(model, path, "task")
    return path


def assert_one_line_error(err: str, *fragments: str) -> None:
    """A message, not a traceback: one line starting with "error: " names the input and the fix
    (progress bars may precede it, a list of the expected files may follow it)."""
    lines = [line for line in err.split("\n") if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in lines[0], err


# ------------------------------------------------------------------ longer than the context


def test_training_examples_longer_than_max_len_are_cut_and_counted(tiny_models, data_dir, capsys):
    args = train_cli.parse_args(tiny_flags(*tiny_models, data_dir, "unused", "--max-len", "100"))
    tok = models.load_tokenizer(tiny_models[1])
    td = stage_data.task_data(args, tok, Dist())
    pairs = [data.training_pair("piqa", it) for it in data.load_task("piqa", "train", data_dir)[:25]]
    lengths = [len(tok.encode(c + t)) + 1 for c, t in pairs]  # + EOS
    too_long = sum(n > 100 for n in lengths)
    assert 0 < too_long < 25  # both kinds present
    out = capsys.readouterr().out
    assert f"note: {too_long} of 25 training sequences were longer than --max-len 100" in out
    examples = td.train + td.val
    assert len(examples) == 25 and sorted(len(ids) for ids, _ in examples) == sorted(min(n, 100) for n in lengths)


def test_answer_length_is_the_shortest_max_len_that_keeps_the_whole_answer(tiny_models, data_dir):
    tok = models.load_tokenizer(tiny_models[0])
    for item in data.load_task("piqa", "train", data_dir)[:25]:
        context, target = data.training_pair("piqa", item)
        ids, _ = data.encode_pair(tok, context, target, 4096)
        answer = ids[len(tok.encode(context)):]  # the target's tokens and EOS
        n = data.answer_length(tok, context, target)
        assert n == 1 + len(answer) and ids[0] == tok.bos_id
        assert data.encode_pair(tok, context, target, n)[0] == [tok.bos_id] + answer  # all of it, no question
        assert data.encode_pair(tok, context, target, n - 1)[0] == [tok.bos_id] + answer[1:]  # cut


def test_a_max_len_that_cuts_answers_is_named_before_stage_1(tiny_models, data_dir, tmp_path, monkeypatch,
                                                             capsys):
    """Some answers cut: a warning with the count and the value that keeps them all, before any
    training; every answer cut: an error, and nothing is started."""
    tok = models.load_tokenizer(tiny_models[0])
    items = data.load_task("piqa", "train", data_dir)[:25]
    needed = sorted(data.answer_length(tok, *data.training_pair("piqa", it)) for it in items)
    assert needed[0] < 48 < needed[-1]  # the flags of the tiny runs cut some answers
    out = tmp_path / "run"
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--max-len", str(needed[0] - 1))) == 2
    assert_one_line_error(capsys.readouterr().err, f"error: --max-len {needed[0] - 1} cuts the answer of 25 of 25 "
                          f"training items of task piqa in --old {tiny_models[0]}'s tokens, all of them: they "
                          f"would train on the end of an answer without its question; pass --max-len "
                          f"{needed[-1]} to keep every answer whole")
    assert not out.exists()
    cut = sum(n > 48 for n in needed)

    def stage_1_reached(*args):
        raise ValueError("stage 1 reached")
    monkeypatch.setattr(train, "stage_task", stage_1_reached)
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--stage", "1")) == 2
    err = capsys.readouterr().err
    for flag, name in (("--old", tiny_models[0]), ("--new", tiny_models[1])):
        assert (f"warning: --max-len 48 cuts the answer of {cut} of 25 training items of task piqa in {flag} "
                f"{name}'s tokens: those lose the start of the answer and all of the question; pass --max-len "
                f"{needed[-1]} to keep every answer whole\n") in err
    assert err.index("warning: --max-len") < err.index("error: stage 1 reached")  # before the training


def test_max_len_beyond_the_models_context_is_refused_before_anything(tiny_models, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--max-len", "4096")) == 2
    assert_one_line_error(capsys.readouterr().err, f"--max-len 4096 is longer than the context of --old "
                          f"{tiny_models[0]} (max_position_embeddings 2048); pass --max-len 2048 or less")
    assert not out.exists()


def loglikelihood(model, inputs: list[int], targets: list[int]) -> float:
    """Sum of log p(targets) predicted by the last len(targets) positions of one plain forward."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([inputs]))[0, -len(targets):], -1)
    return logprobs[torch.arange(len(targets)), targets].sum().item()


def greedy(model, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by full forwards, no cache: the new tokens before EOS."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
    return new


def test_eval_inputs_longer_than_the_context_are_cut_on_the_left_and_counted(tiny_models, capsys):
    """A 16-position model: scoring keeps each request's last 16 tokens, generation the prompt's
    last 16 - max_new_tokens (the harness's rules); a note says how many were cut."""
    tok = models.load_tokenizer(tiny_models[0])
    model = tiny(LLAMA, max_position_embeddings=16)
    context = " ".join(CORPUS[:3])
    assert len(tok.encode(context, add_bos=False)) > 16
    items = [data.MultipleChoice("long", context, ["the lid", "the dog"], 0),
             data.MultipleChoice("short", "to open", ["a jar", "the dishes"], 0)]
    records = likelihood.score_choices(model, tok, items)
    assert "note: 1 of 2 items did not fit in 16 tokens" in capsys.readouterr().err
    for item, record in zip(items, records):
        for choice, ll in zip(item.choices, record["loglikelihoods"]):
            context_ids = tok.encode(item.context, add_bos=False)
            whole = tok.encode(item.context + " " + choice, add_bos=False)
            expected = loglikelihood(model, whole[-17:-1], whole[len(context_ids):])
            assert ll == pytest.approx(expected, abs=1e-4)

    texts = generation.generate(model, tok, [context, "to open"], max_new_tokens=4)
    assert "note: 1 of 2 prompts did not fit in 12 tokens" in capsys.readouterr().err
    for prompt, text in zip([context, "to open"], texts):
        assert text == tok.decode(greedy(model, tok.encode(prompt, add_bos=False)[-12:], 4, tok.eos_id))


# ------------------------------------------------------------------ adapters


def test_adapter_for_another_base_or_architecture_is_refused_and_the_model_is_unchanged(tmp_path):
    x = torch.tensor([[1, 5, 9, 4]])
    model = tiny(LLAMA)
    before = model(x)
    wider = saved_adapter(tiny(LLAMA, hidden_size=48), tmp_path / "wider")
    with pytest.raises(ValueError, match=r"adapter key base_model\.model\.model\.layers\.0\.mlp\.down_proj"
                                         r"\.lora_B\.weight has shape \(48, 2\) but this model needs \(32, 2\): "
                                         r"the adapter was trained on a base model of another shape"):
        lora.load_adapter(model, wider, "task")
    phi_adapter = saved_adapter(tiny(PHI), tmp_path / "phi")
    with pytest.raises(ValueError, match=r"adapter key base_model\.model\.model\.layers\.0\.mlp\.fc1\.lora_A"
                                         r"\.weight names 'model\.layers\.0\.mlp\.fc1', which is not a linear "
                                         r"layer of this model \(is it an adapter for another architecture\?\)"):
        lora.load_adapter(model, phi_adapter, "task")
    assert lora.adapter_names(model) == [] and torch.equal(model(x), before)


def test_disk_full_while_saving_an_adapter_keeps_the_previous_one(tmp_path, monkeypatch):
    model = tiny(LLAMA)
    saved_adapter(model, tmp_path)
    previous = load_file(tmp_path / "adapter_model.safetensors")
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "task").values():
            p.add_(1.0)

    def full_disk(tensors, path, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(lora, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        lora.save_adapter(model, tmp_path, "task")
    assert sorted(os.listdir(tmp_path)) == ["adapter_config.json", "adapter_model.safetensors"]
    kept = load_file(tmp_path / "adapter_model.safetensors")
    assert kept.keys() == previous.keys() and all(torch.equal(kept[k], previous[k]) for k in kept)


def test_disk_full_during_training_is_one_line_and_the_rerun_resumes(tiny_models, data_dir, tmp_path,
                                                                     monkeypatch, capsys):
    """The disk fills up at the third checkpoint of stage 1: the second stays the latest, the
    message says so, and the rerun ends with the adapter of a run that never failed."""
    flags = [*tiny_flags(*tiny_models, data_dir, tmp_path / "run", "--stage", "1", "--save-every", "1")]
    clean = tmp_path / "clean"
    assert train.main([*flags, "--out", str(clean)]) == 0
    real, calls = checkpoint.save_file, []

    def fills_up(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)
    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    run = tmp_path / "run"
    capsys.readouterr()
    assert train.main(flags) == 2
    ckpt = run / train.STAGES[1] / "checkpoint"
    assert_one_line_error(capsys.readouterr().err, f"No space left on device while writing a checkpoint in {ckpt}; "
                          f"the previous checkpoint {ckpt / 'ckpt-000001'} is intact: free some space and rerun")
    assert checkpoint.load(ckpt)[1]["step"] == 2 and not (run / train.STAGES[1] / "DONE").exists()
    monkeypatch.setattr(checkpoint, "save_file", real)
    assert train.main(flags) == 0
    assert [r["step"] for r in read_log(run / train.STAGES[1] / "log.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    adapters = [load_file(out / train.STAGES[1] / "adapter" / "adapter_model.safetensors") for out in (clean, run)]
    for k in adapters[0]:
        torch.testing.assert_close(adapters[1][k], adapters[0][k], rtol=0, atol=1e-6)


def test_nan_loss_at_the_cli_is_one_line_exit_1_and_the_last_checkpoint_is_kept(tiny_models, data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    """The 5th micro-batch of stage 1 (step 3) gives NaN: no update, the step-2 checkpoint stays."""
    real, calls = muscle.causal_lm_loss_chunked, []

    def nan_at_5(*args, **kwargs):
        calls.append(1)
        out = real(*args, **kwargs)
        return out._replace(loss=out.loss * float("nan")) if len(calls) == 5 else out
    monkeypatch.setattr(muscle, "causal_lm_loss_chunked", nan_at_5)
    out = tmp_path / "run"
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--stage", "1", "--save-every", "1")) == 1
    ckpt = out / train.STAGES[1] / "checkpoint"
    assert_one_line_error(capsys.readouterr().err, "loss is nan at step 3; stopped without updating. The last "
                          f"good checkpoint is in {ckpt}; lower --lr or check the data, then rerun")
    assert checkpoint.load(ckpt)[1]["step"] == 2 and not (out / train.STAGES[1] / "DONE").exists()


# ------------------------------------------------------------------ the command lines


def test_eval_cli_user_errors_are_one_line_and_exit_2(tiny_models, data_dir, tmp_path, capsys):
    ckpt = tiny_models[0]
    wider = saved_adapter(tiny(LLAMA, hidden_size=48), tmp_path / "wider")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--model", "no-such-model"], ["unknown model 'no-such-model'", "llama2"]),
        (["--model", str(tmp_path / "missing")], ["missing': not a directory, a registry name"]),
        (["--model", str(tmp_path / "empty")], ["empty is empty: expected a Hugging Face checkpoint"]),
        (["--model", ckpt, "--adapter", str(wider)],
         ["has shape (48, 2) but this model needs (32, 2)", "another shape"]),
        (["--model", ckpt, "--adapter", str(tmp_path / "empty")], ["no adapter_config.json in"]),
        (["--model", ckpt, "--data-dir", str(tmp_path / "empty")], ["piqa/valid.jsonl not found"]),
        (["--model", ckpt, "--task", "mmlu"], ["unknown task 'mmlu'"]),
    ]
    for flags, fragments in cases:
        argv = ["--task", "piqa", "--data-dir", str(data_dir), "--out", str(tmp_path / "p.jsonl"), *flags]
        assert ev.main(argv) == 2, flags
        assert_one_line_error(capsys.readouterr().err, *fragments)
    assert not (tmp_path / "p.jsonl").exists()


def test_eval_cli_warns_when_an_adapter_of_the_same_shape_was_trained_on_another_base(
        tiny_models, data_dir, tmp_path, capsys):
    """v1 and v2 have the same shapes (as Llama-1 and -2): loading works, a warning names both."""
    v1, v2 = tiny_models
    model = models.load_model(v1)
    lora.add_adapter(model, "task", rank=2, alpha=4)
    lora.save_adapter(model, tmp_path / "a1", "task", base_model_name_or_path=v1)
    flags = ["--adapter", str(tmp_path / "a1"), "--task", "piqa", "--data-dir", str(data_dir), "--limit", "2",
             "--out", str(tmp_path / "p.jsonl")]
    assert ev.main(["--model", v2, *flags]) == 0
    assert f"warning: adapter {tmp_path / 'a1'} was trained on {v1!r}, not on --model {v2!r}" in capsys.readouterr().err
    assert ev.main(["--model", v1, *flags]) == 0
    assert "warning" not in capsys.readouterr().err
    assert ev._same_model("llama2", "meta-llama/Llama-2-7b-hf") and not ev._same_model("llama1", "llama2")


def test_train_cli_turns_a_failed_download_into_one_line(tiny_models, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    flags = ["--old", tiny_models[0], "--new", tiny_models[1], "--task", "gsm8k", "--out", str(tmp_path / "run")]
    assert train.main(flags) == 2
    assert_one_line_error(capsys.readouterr().err, "could not download", "openai/gsm8k", "no network",
                          "pass --data-dir")


# ------------------------------------------------------------------ no pickle, no remote code


def product_files() -> list[Path]:
    return sorted(ROOT.glob("*.py"))


def test_no_code_path_unpickles_or_runs_remote_code():
    """Every torch.load passes weights_only=True; nothing imports pickle-like modules or mentions
    trust_remote_code (checked on the syntax tree of each product file)."""
    references, checked_calls = 0, 0
    for path in product_files():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {n.split(".")[0] for n in names} & {"pickle", "dill", "cloudpickle", "joblib"}, path
            if isinstance(node, (ast.keyword, ast.Name, ast.Constant)):
                text = getattr(node, "arg", None) or getattr(node, "id", None) or getattr(node, "value", "")
                assert "trust_remote_code" not in str(text), path
            if isinstance(node, ast.Attribute) and node.attr == "load" and getattr(node.value, "id", "") == "torch":
                references += 1
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "load" \
                    and getattr(node.func.value, "id", "") == "torch":
                assert any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                           for k in node.keywords), f"{path}:{node.lineno}: torch.load without weights_only=True"
                checked_calls += 1
    # Every reference to torch.load is a checked call (no alias escapes the check), and both
    # readers of .bin files (models.py, lora.py) were seen, so the scan is not vacuous.
    assert references == checked_calls == 2


def test_eval_out_is_checked_before_scoring_and_a_full_disk_keeps_the_earlier_file(
        tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    flags = ["--model", tiny_models[0], "--task", "piqa", "--data-dir", str(data_dir), "--limit", "2"]
    (tmp_path / "a_dir").mkdir()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model for an unwritable --out"))
    assert ev.main([*flags, "--out", str(tmp_path / "a_dir")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--out {tmp_path / 'a_dir'} is a directory; --out takes a file "
                                                   f"path: pass another --out")
    monkeypatch.undo()
    out = tmp_path / "p.jsonl"
    out.write_text("finished work\n")

    def full_disk(path):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(files, "fsync_file", full_disk)
    assert ev.main([*flags, "--out", str(out)]) == 2
    assert_one_line_error(capsys.readouterr().err, f"cannot write --out {out} (No space left on device); an earlier "
                                                   f"file there is intact")
    assert out.read_text() == "finished work\n" and sorted(os.listdir(tmp_path)) == ["a_dir", "p.jsonl"]
