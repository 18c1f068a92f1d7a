"""Nothing silently wrong: broken weights, references, records and adapters are refused by name."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import compare
import data
import eval as ev
import lora
import models
from test_reliability import assert_one_line_error


def broken_copy(ckpt: str, dest, change) -> str:
    """A copy of checkpoint `ckpt` whose tensors went through change(dict) before saving."""
    shutil.copytree(ckpt, dest)
    tensors = load_file(dest / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    return str(dest)


def nan_adapter(base: str, path) -> str:
    model = models.load_model(base)
    lora.add_adapter(model, "task", rank=2, alpha=4)
    with torch.no_grad():
        for p in lora.adapter_parameters(model, "task").values():
            p.fill_(float("nan"))
    lora.save_adapter(model, path, "task", base_model_name_or_path=base)
    return str(path)


def test_nan_weights_end_scoring_with_an_error_naming_the_model_or_adapter(tiny_models, data_dir, tmp_path, capsys):
    def poison(tensors):
        tensors["model.norm.weight"][0] = float("nan")
    broken = broken_copy(tiny_models[0], tmp_path / "nan-base", poison)
    out = tmp_path / "p.jsonl"
    flags = ["--data-dir", str(data_dir), "--limit", "2", "--out", str(out)]
    assert ev.main(["--model", broken, "--task", "piqa", *flags]) == 2
    assert_one_line_error(capsys.readouterr().err, f"--model {broken}: non-finite log-likelihoods [nan, nan] on item "
                          f"piqa/validation/0; its weights hold NaN or inf values, so no accuracy is reported: check "
                          f"the checkpoint (a diverged training run?)")
    adapter = nan_adapter(tiny_models[0], tmp_path / "nan-adapter")
    for task, what in (("piqa", "non-finite log-likelihoods"), ("gsm8k", "non-finite logits (nan) while generating")):
        assert ev.main(["--model", tiny_models[0], "--adapter", adapter, "--task", task, *flags]) == 2
        assert_one_line_error(capsys.readouterr().err, f"--model {tiny_models[0]} with --adapter {adapter}: {what}",
                              "check the checkpoint and the adapter")
    assert not out.exists()


def test_an_integer_base_is_refused_by_name(tiny_models, tmp_path):
    def quantize(tensors):
        tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.int8)
    broken = broken_copy(tiny_models[0], tmp_path / "int8", quantize)
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight' is "
                                         r"torch.int8, not floating point; quantized or integer checkpoints"):
        models.load_model(broken)


@pytest.mark.parametrize("answer", ["She makes 18 dollars.", "#### ", "the answer is ####"])
def test_a_gsm8k_reference_without_its_final_number_is_refused(data_dir, tmp_path, answer):
    (tmp_path / "gsm8k").mkdir()
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:3]
    lines[1] = json.dumps({**json.loads(lines[1]), "answer": answer})
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"test.jsonl:2: field 'answer' has no final '#### N' line .*GSM8K's strict "
                                         r"match scores that number"):
        data.load_task("gsm8k", "test", tmp_path)


@pytest.mark.parametrize("correct", ["yes", 1, 0.5, [True]])
def test_a_record_whose_correct_is_not_a_bool_is_refused(tmp_path, capsys, correct):
    rows = [{"id": f"q{i}", "task": "piqa", "prediction": 0, "correct": True, "score": 1.0} for i in range(3)]
    (tmp_path / "old.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rows[2]["correct"] = correct
    (tmp_path / "new.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert compare.main([str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl")]) == 2
    assert_one_line_error(capsys.readouterr().err, f"new.jsonl:3: `correct` must be true, false or null, got "
                                                   f"{correct!r}")


@pytest.mark.parametrize("change, message", [
    ({"lora_alpha": 0}, "lora_alpha should be a positive number, got 0"),
    ({"lora_alpha": -16}, "lora_alpha should be a positive number, got -16"),
    ({"lora_alpha": "16"}, "lora_alpha should be a positive number, got '16'"),
    ({"r": 0}, "r should be a positive integer, got 0"),
    ({"r": None}, "r should be a positive integer, got None"),
    ({"lora_dropout": 1.5}, "lora_dropout should be a number in [0, 1), got 1.5"),
])
def test_an_adapter_config_out_of_range_is_refused_and_the_model_is_unchanged(tiny_models, tmp_path, change, message):
    path = tmp_path / "adapter"
    model = models.load_model(tiny_models[0])
    lora.add_adapter(model, "task", rank=2, alpha=4)
    lora.save_adapter(model, path, "task")
    config = json.loads((path / lora.CONFIG_NAME).read_text())
    (path / lora.CONFIG_NAME).write_text(json.dumps({**config, **change}))
    fresh = models.load_model(tiny_models[0])
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(ValueError) as info:
        lora.load_adapter(fresh, path)
    assert str(info.value) == f"{path / lora.CONFIG_NAME}: {message}"
    assert fresh.state_dict().keys() == before.keys()


def test_ctrl_c_outside_training_is_one_line_and_exit_130(tiny_models, data_dir, tmp_path, monkeypatch, capsys):
    import predictions
    import train
    from tiny import tiny_flags

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(data, "load_task", ctrl_c)
    out = tmp_path / "p.jsonl"
    assert ev.main(["--model", tiny_models[0], "--task", "piqa", "--data-dir", str(data_dir), "--out", str(out)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"interrupted (Ctrl-C); nothing was written to --out {out}"
    assert train.main(tiny_flags(*tiny_models, data_dir, tmp_path / "run")) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == (
        "interrupted (Ctrl-C); finished stages, checkpoints and predictions are kept: rerun the same command to resume")
    monkeypatch.setattr(predictions, "read_run", ctrl_c)
    assert ev.main(["compare", "a.jsonl", "b.jsonl"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C); no report was written"


def test_a_huge_value_in_a_message_is_cut(data_dir, tiny_models, tmp_path, capsys):
    shutil.copytree(data_dir / "piqa", tmp_path / "piqa")
    labels = tmp_path / "piqa" / "valid-labels.lst"
    labels.write_text("x" * 50_000 + "\n" + labels.read_text().split("\n", 1)[1])
    assert ev.main(["--model", tiny_models[0], "--task", "piqa", "--data-dir", str(tmp_path), "--out",
                    str(tmp_path / "p.jsonl")]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][0]
    assert len(line) <= 620 and line.startswith(f"error: {labels}:1: label 'xxx") and " ... " in line
