"""Every file kind the project reads, corrupted in several ways: each ends the command with exit
status 2, one `error:` line that names the file, and no traceback (a table of mutations)."""
import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

import compare
import eval as ev
import lora
import models
import train
from tiny import make_checkpoint, tiny_flags


def cut(data: bytes) -> bytes:
    return data[:len(data) // 2]


def edit_json(**changes):
    def apply(data: bytes) -> bytes:
        return json.dumps({**json.loads(data), **changes}).encode()
    return apply


GENERIC = {"truncated": cut, "empty": lambda d: b"", "not UTF-8": lambda d: b"\xff\xfe\x00" + d[3:],
           "garbage": lambda d: bytes(range(256)) * 4}
JSON_KINDS = {**GENERIC, "a list": lambda d: b"[1, 2]", "null": lambda d: b"null"}
CASES = [
    *[("model", "config.json", name, f) for name, f in JSON_KINDS.items()],
    ("model", "config.json", "string size", edit_json(hidden_size="32")),
    ("model", "config.json", "null size", edit_json(num_hidden_layers=None)),
    ("model", "config.json", "list size", edit_json(vocab_size=[300])),
    ("model", "config.json", "negative size", edit_json(intermediate_size=-64)),
    ("model", "config.json", "heads do not divide the width", edit_json(num_attention_heads=5)),
    ("model", "config.json", "kv heads do not divide the heads", edit_json(num_key_value_heads=3)),
    ("model", "config.json", "weights of another width", edit_json(hidden_size=48)),
    ("model", "config.json", "weights of another vocabulary", edit_json(vocab_size=280)),
    *[("model", "tokenizer.json", name, f) for name, f in GENERIC.items()],
    *[("model", "tokenizer_config.json", name, f) for name, f in JSON_KINDS.items()],
    *[("model", "model.safetensors", name, f) for name, f in GENERIC.items()],
    *[("adapter", lora.CONFIG_NAME, name, f) for name, f in JSON_KINDS.items()],
    ("adapter", lora.CONFIG_NAME, "string rank", edit_json(r="2")),
    ("adapter", lora.CONFIG_NAME, "no alpha", edit_json(lora_alpha=None)),
    ("adapter", lora.CONFIG_NAME, "negative alpha", edit_json(lora_alpha=-4)),
    *[("adapter", lora.WEIGHTS_NAME, name, f) for name, f in GENERIC.items()],
    *[("data", "piqa/valid.jsonl", name, f) for name, f in GENERIC.items() if name != "empty"],
    ("data", "piqa/valid.jsonl", "a list line", lambda d: b"[1, 2]\n" + d),
    ("data", "piqa/valid.jsonl", "a number for a text", lambda d: json.dumps({"goal": 3, "sol1": "a", "sol2": "b"})
     .encode() + b"\n" + d),
    ("data", "piqa/valid-labels.lst", "not UTF-8", lambda d: b"\xff\n" + d),
    ("data", "piqa/valid-labels.lst", "a label of 7", lambda d: b"7\n" + d[2:]),
    *[("predictions", "new.jsonl", name, f) for name, f in GENERIC.items() if name != "empty"],
    ("predictions", "new.jsonl", "correct is a string", lambda d: d.replace(b'"correct": true', b'"correct": "yes"')),
    ("predictions", "new.jsonl", "a list record", lambda d: b"[1, 2]\n" + d),
    ("predictions", "new.jsonl", "no records", lambda d: b"\n\n"),
    *[("run", train.RUN_CONFIG, name, f) for name, f in JSON_KINDS.items() if name != "empty"],
    *[("index", "model.safetensors.index.json", name, f) for name, f in JSON_KINDS.items()],
    ("index", "model.safetensors.index.json", "weight_map a list", edit_json(weight_map=["model.safetensors"])),
    ("index", "model.safetensors.index.json", "a missing shard", edit_json(weight_map={"lm_head.weight": "x.safetensors"})),
    *[("gsm8k", "gsm8k/test.jsonl", name, f) for name, f in GENERIC.items() if name != "empty"],
    ("gsm8k", "gsm8k/test.jsonl", "no final number", lambda d: json.dumps({"question": "q", "answer": "42"}).encode()
     + b"\n" + d),
    *[("samsum", "samsum/test.json", name, f) for name, f in JSON_KINDS.items()],
    ("samsum", "samsum/test.json", "a number for a summary", lambda d: b'[{"id": "1", "dialogue": "a", "summary": 3}]'),
]
TASKS = {"gsm8k": "gsm8k", "samsum": "samsum"}


@pytest.fixture(scope="module")
def originals(tiny_models, data_dir, tmp_path_factory):
    """A model, an adapter for it, the PIQA files, two predictions files and a run directory."""
    root = tmp_path_factory.mktemp("originals")
    model = models.load_model(tiny_models[0])
    lora.add_adapter(model, "task", rank=2, alpha=4)
    lora.save_adapter(model, root / "adapter", "task", base_model_name_or_path=tiny_models[0])
    shutil.copytree(data_dir / "piqa", root / "data" / "piqa")
    rows = [{"id": f"q{i}", "task": "piqa", "prediction": 0, "correct": True, "score": 1.0} for i in range(3)]
    for name in ("old.jsonl", "new.jsonl"):
        (root / "predictions").mkdir(exist_ok=True)
        (root / "predictions" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    for task, name in (("gsm8k", "test.jsonl"), ("samsum", "test.json")):
        (root / task / task).mkdir(parents=True)
        shutil.copy(data_dir / task / name, root / task / task / name)
    shutil.copytree(tiny_models[0], root / "index")
    names = list(load_file(root / "index" / "model.safetensors"))
    (root / "index" / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {n: "model.safetensors" for n in names}}))
    (root / "run").mkdir()
    (root / "run" / train.RUN_CONFIG).write_text(json.dumps({"lr": 1e-4}))
    return {"model": Path(tiny_models[0]), "adapter": root / "adapter", "data": root / "data",
            "predictions": root / "predictions", "run": root / "run", "index": root / "index",
            "gsm8k": root / "gsm8k", "samsum": root / "samsum"}


def command(kind: str, copy: Path, originals: dict, tiny_models, out: Path):
    """The CLI call that reads the file kind, on the corrupted copy."""
    data = ["--data-dir", str(copy if kind in ("data", *TASKS) else originals["data"])]
    if kind in ("model", "index", "adapter", "data", *TASKS):
        model = str(copy if kind in ("model", "index") else originals["model"])
        adapter = ["--adapter", str(copy)] if kind == "adapter" else []
        task = TASKS.get(kind, "piqa")
        return ev.main, ["--model", model, *adapter, "--task", task, *data, "--limit", "2", "--out", str(out)]
    if kind == "predictions":
        return compare.main, [str(copy / "old.jsonl"), str(copy / "new.jsonl")]
    return train.main, tiny_flags(*tiny_models, originals["data"], copy, "--stage", "1")


@pytest.mark.parametrize("kind, name, mutation, change", CASES, ids=[f"{k}:{n}:{m}" for k, n, m, _ in CASES])
def test_a_corrupted_file_is_one_named_error(kind, name, mutation, change, originals, tiny_models, tmp_path, capsys):
    copy = tmp_path / kind
    shutil.copytree(originals[kind], copy)
    target = copy / name
    target.write_bytes(change(target.read_bytes()))
    main, argv = command(kind, copy, originals, tiny_models, tmp_path / "p.jsonl")
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert Path(name).name in lines[0] and len(lines[0]) <= 700, lines[0]
    assert not (tmp_path / "p.jsonl").exists()


def test_a_tokenizer_larger_than_the_models_vocabulary_names_both_files(tiny_models, data_dir, tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "small", seed=3, vocab_size=280)
    shutil.copy(Path(tiny_models[0]) / "tokenizer.json", ckpt / "tokenizer.json")  # 300 tokens
    assert ev.main(["--model", str(ckpt), "--task", "piqa", "--data-dir", str(data_dir), "--limit", "2",
                    "--out", str(tmp_path / "p.jsonl")]) == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error: ")][0]
    assert f"{ckpt / 'tokenizer.json'} has 300 tokens but {ckpt / 'config.json'} has vocab_size 280" in line
