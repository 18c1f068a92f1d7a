"""Tests of train.py on tiny random Llama checkpoints (CPU): the losses of stages 1-3, the
pipeline end to end, its flags, interruptions and the teacher store."""
import argparse
import hashlib
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import checkpoint
import data
import lora
import losses
import models
import train
import train_cli
import trainer
from distributed import Dist
from tiny import CORPUS, ONE_THREAD, ROOT, make_checkpoint, read_log, tiny_flags


# ------------------------------------------------------------------------- loss normalisation


def example(tok, text):
    ids = tok.encode(text)
    return ids, list(ids)


@pytest.mark.parametrize("stage", ["task", "compat"])
def test_unequal_micro_batches_give_the_gradient_of_one_batch(tiny_models, stage):
    old, new = (models.load_model(p) for p in tiny_models)
    tok = models.load_tokenizer(tiny_models[0])
    for m in (old, new):
        lora.add_adapter(m, "task", rank=4, alpha=8)
        with torch.no_grad():  # a non-zero B, so that the two teachers differ from the bases
            for p in lora.adapter_parameters(m, "task").values():
                p.normal_(0, 0.3)
    lora.copy_adapter(new, "task", "compat")
    name = "compat" if stage == "compat" else "task"
    lora.mark_trainable(new, name)
    lora.set_adapter(new, name)
    args = argparse.Namespace(mask="student_correct", temperature=2.0, ce_weight=0.5, chunk_size=5)
    loss_fn = losses.compat_loss(new, old, args) if stage == "compat" else losses.ce_loss(new)
    params = lora.adapter_parameters(new, name)
    short = [example(tok, t) for t in CORPUS[:2]]
    long = [example(tok, t + " and " + t) for t in CORPUS[2:5]]

    def grads(micro_batches):
        _, tokens = trainer.accumulate_gradients(loss_fn, micro_batches)
        trainer.scale_gradients(params.values(), 1 / tokens)
        out = {k: p.grad.clone() for k, p in params.items()}
        new.zero_grad(set_to_none=True)
        return out, tokens

    split, n_split = grads([data.collate(short, tok.pad_id), data.collate(long, tok.pad_id)])
    whole, n_whole = grads([data.collate(short + long, tok.pad_id)])
    assert n_split == n_whole == sum(len(ids) - 1 for ids, _ in short + long)
    for k in whole:
        torch.testing.assert_close(split[k], whole[k], rtol=1e-4, atol=1e-7)
    # Per-micro-batch means would weigh the 2 short sequences like the 3 long ones: not equal.
    assert any(v.abs().sum() > 0 for v in whole.values())


def test_gradients_reach_only_the_compatibility_adapter(tiny_models):
    old, new = (models.load_model(p) for p in tiny_models)
    lora.add_adapter(old, "task", rank=4, alpha=8)
    lora.add_adapter(new, "task", rank=4, alpha=8)
    lora.copy_adapter(new, "task", "compat")
    lora.mark_trainable(new, "compat")
    old.requires_grad_(False)
    tok = models.load_tokenizer(tiny_models[0])
    batch = data.collate([example(tok, t) for t in CORPUS[:3]], tok.pad_id)
    args = argparse.Namespace(mask="student_correct", temperature=2.0, ce_weight=0.1, chunk_size=7)
    losses.compat_loss(new, old, args)(batch).loss.backward()
    compat = set(lora.adapter_parameters(new, "compat"))
    with_grad = {n for m in (old, new) for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad == compat
    assert sum(new.get_parameter(n).grad.abs().sum() for n in compat) > 0
    assert lora.active_adapter(new) == "compat"  # the teacher's adapter switch was undone


def test_training_losses_pass_no_attention_mask_for_right_padded_batches(tiny_models, monkeypatch):
    """Collated batches are right-padded, so the student's and both teachers' forwards take SDPA's
    causal path (FlashAttention on GPU): no mask is passed in any layer."""
    from fake_hub import SDPACalls

    old, new = (models.load_model(p) for p in tiny_models)
    for m in (old, new):
        lora.add_adapter(m, "task", rank=4, alpha=8)
    lora.copy_adapter(new, "task", "compat")
    tok = models.load_tokenizer(tiny_models[0])
    batch = data.collate([example(tok, t) for t in CORPUS[:3]], tok.pad_id)
    assert not batch["attention_mask"].bool().all()  # padded rows
    args = argparse.Namespace(mask="student_correct", temperature=2.0, ce_weight=0.1, chunk_size=7)
    sdpa = SDPACalls(monkeypatch)
    losses.ce_loss(new)(batch).loss.backward()
    losses.compat_loss(new, old, args)(batch).loss.backward()
    assert (sdpa.calls, sdpa.masked) == (4 * new.config.num_hidden_layers, 0)


def test_activation_checkpointing_keeps_names_and_gradients(tiny_models):
    import distributed

    tok = models.load_tokenizer(tiny_models[1])
    batch = data.collate([example(tok, t) for t in CORPUS[:3]], tok.pad_id)
    grads = []
    for checkpointing in (False, True):
        model = models.load_model(tiny_models[1])
        torch.manual_seed(0)
        lora.add_adapter(model, "task", rank=4, alpha=8)
        lora.mark_trainable(model, "task")
        names = sorted(lora.adapter_parameters(model, "task"))
        if checkpointing:
            distributed.enable_activation_checkpointing(model)
        losses.ce_loss(model.train())(batch).loss.backward()
        params = lora.adapter_parameters(model, "task")
        assert sorted(params) == names
        grads.append({n: p.grad for n, p in params.items()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-8)


# ------------------------------------------------------------------------- the pipeline


@pytest.mark.parametrize("vocab_size, corpus, expected", [
    (280, CORPUS, r"vocab_size 300 vs 280, tokenizer sizes 300 vs 280; first differing pieces: "
                  r"id 280: '.+' in one only"),
    (300, [t.upper() for t in CORPUS], r"vocab_size 300 vs 300, tokenizer sizes 300 vs 300; "
                                       r"first differing pieces: id \d+: '.+' vs '.+'"),
])
def test_different_vocabularies_are_refused_before_training(tiny_models, tmp_path, data_dir,
                                                            vocab_size, corpus, expected):
    other = make_checkpoint(tmp_path / "other", seed=3, vocab_size=vocab_size, corpus=corpus)
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=expected + r".*; pass --cross-vocab fill to align"):
        train.run(train_cli.parse_args(tiny_flags(tiny_models[0], str(other), data_dir, out)), Dist())
    assert not out.exists()


def test_user_errors_exit_2_with_one_line(tiny_models, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_flags("no-such-model", tiny_models[1], data_dir, out)) == 2
    assert "error: unknown model 'no-such-model'" in capsys.readouterr().err
    assert train.main(tiny_flags(*tiny_models, data_dir, out, "--stage", "3")) == 2
    err = capsys.readouterr().err
    assert "stage1_task_old is not complete: run --stage 1 (or --stage all)" in err
    assert "Traceback" not in err
    if not torch.cuda.is_available():
        assert train.main(tiny_flags(*tiny_models, data_dir, out, "--device", "cuda")) == 2
        assert "error: --device cuda, but torch sees no CUDA device" in capsys.readouterr().err


def test_help_shows_every_default():
    parser = train_cli.build_parser()
    options = [a for a in parser._actions if a.dest != "help"]
    assert all(a.help for a in options)  # ArgumentDefaultsHelpFormatter shows defaults only then
    text = " ".join(parser.format_help().split())
    assert text.count("(default: ") == len(options) == 37
    for flag, default in [("--epochs EPOCHS", "10"), ("--lr LR", "0.0001"), ("--rank RANK", "128"),
                          ("--warmup-steps WARMUP_STEPS", "500"), ("--alpha ALPHA", "256"),
                          ("--temperature TEMPERATURE", "2.0"), ("--grad-accum GRAD_ACCUM", "8")]:
        assert text.split(flag + " ", 1)[1].split(" --", 1)[0].endswith(f"(default: {default})")


def test_flags_file_with_comments_then_overrides():
    """`train.py @configs/toy-mc.args` (the README's first command) reads the file's flags; later
    flags win."""
    args = train_cli.parse_args([f"@{ROOT / 'configs' / 'toy-mc.args'}", "--seed", "2", "--rank", "4"])
    assert (args.old, args.new, args.task, args.batch_size, args.lr, args.ce_weight) == \
        ("toy-v1", "toy-v2", "toy-mc", 16, 2e-3, 0.5)
    assert args.epochs == 10  # not in the file: the paper's default
    assert (args.seed, args.rank, args.mask) == (2, 4, "student_correct")  # the paper's mask


def test_out_with_another_configuration_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "run"
    flags = ["--old", "a", "--new", "b", "--task", "piqa", "--out", str(out)]
    train.check_run_config(out, train_cli.parse_args(flags), Dist())
    (out / "stage1_task_old").mkdir()
    train.check_run_config(out, train_cli.parse_args(flags + ["--save-every", "3"]), Dist())  # resumes
    assert (out / "stage1_task_old").is_dir()
    with pytest.raises(ValueError, match=r"different configuration \(lr: 0.0001 there, 0.001 now\)"
                                         r".*--overwrite"):
        train.check_run_config(out, train_cli.parse_args(flags + ["--lr", "1e-3"]), Dist())
    train.check_run_config(out, train_cli.parse_args(flags + ["--lr", "1e-3", "--overwrite"]), Dist())
    assert not (out / "stage1_task_old").exists()
    assert json.loads((out / "run_config.json").read_text())["lr"] == 1e-3
    stranger = tmp_path / "not_a_run"
    stranger.mkdir()
    (stranger / "precious.txt").write_text("x")
    with pytest.raises(ValueError, match="holds no run_config.json.*nothing was deleted"):
        train.check_run_config(stranger, train_cli.parse_args(flags + ["--overwrite"]), Dist())


def test_training_items_are_compared_by_digest_and_data_dir_is_recorded(tmp_path):
    """Another --data-dir of the same training items resumes; other items are refused while a
    training stage is to run, and a run that only evaluates (no digest now) keeps the one it has."""
    out = tmp_path / "run"
    flags = ["--old", "a", "--new", "b", "--task", "piqa", "--out", str(out), "--data-dir", "copy1"]
    train.check_run_config(out, train_cli.parse_args(flags), Dist(), "digest-1")
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["data_dir"], saved[train.TRAIN_ITEMS]) == ("copy1", "digest-1")
    (out / "stage1_task_old").mkdir()
    moved = flags[:-1] + ["copy2"]
    train.check_run_config(out, train_cli.parse_args(moved), Dist(), "digest-1")  # the same items elsewhere
    assert json.loads((out / "run_config.json").read_text())["data_dir"] == "copy2"
    with pytest.raises(ValueError) as info:
        train.check_run_config(out, train_cli.parse_args(flags[:-1] + ["edited"]), Dist(), "digest-2")
    assert str(info.value) == (
        f"--out {out} holds a run with a different configuration (the training items differ from those "
        f"it was trained on, read from --data-dir copy2 there, edited now). Rerun with its flags to resume "
        f"it, choose another --out, or pass --overwrite to delete it and start over")
    assert (out / "stage1_task_old").is_dir()
    train.check_run_config(out, train_cli.parse_args(flags[:-1] + ["edited"]), Dist(), None)  # stage 4 only
    assert json.loads((out / "run_config.json").read_text())[train.TRAIN_ITEMS] == "digest-1"
    older = {k: v for k, v in saved.items() if k not in ("data_dir", train.TRAIN_ITEMS)}
    (out / "run_config.json").write_text(json.dumps(older))  # written before the digest was kept
    train.check_run_config(out, train_cli.parse_args(flags), Dist(), "digest-2")
    assert json.loads((out / "run_config.json").read_text())[train.TRAIN_ITEMS] == "digest-2"


def test_stage3_flags_may_change_until_stage3_starts(tmp_path):
    """A copy of a run's stages 1-2 serves a run of another mask (or cross-vocabulary rule);
    once stage 3 has started, it belongs to its mask."""
    out = tmp_path / "run"
    flags = ["--old", "a", "--new", "b", "--task", "piqa", "--out", str(out)]
    train.check_run_config(out, train_cli.parse_args(flags), Dist())
    other_mask = flags + ["--mask", "none", "--teachers", "store", "--top-k", "8", "--cross-vocab", "uld"]
    train.check_run_config(out, train_cli.parse_args(other_mask), Dist())
    saved = json.loads((out / "run_config.json").read_text())
    assert (saved["mask"], saved["cross_vocab"]) == ("none", "uld")
    (out / "stage3_compat").mkdir()
    with pytest.raises(ValueError, match=r"mask: 'none' there, 'student_correct' now"):
        train.check_run_config(out, train_cli.parse_args(flags + ["--teachers", "store", "--top-k", "8"]), Dist())


@pytest.mark.slow  # three stages of training and three evaluations
def test_all_four_stages_end_to_end_then_skipped(tiny_models, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(tiny_flags(*tiny_models, data_dir, out)) == 0
    for stage in train.STAGES.values():
        assert (out / stage / "DONE").is_file()
    for stage in (1, 2, 3):
        adapter = load_file(out / train.STAGES[stage] / "adapter" / "adapter_model.safetensors")
        assert len(adapter) == 2 * 7 * 2  # A and B of 7 linear layers in each of 2 blocks
        assert not (out / train.STAGES[stage] / "checkpoint").exists()
        log = read_log(out / train.STAGES[stage] / "log.jsonl")
        steps = [r for r in log if "loss" in r]
        assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]  # ceil(20 / (4 x 2)) x 2 epochs
        assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in steps)
        assert [r["epoch"] for r in log if "val_loss" in r] == [0, 1]
    report = json.loads((out / "stage4_eval" / "report.json").read_text())
    assert report["n"] == 8 and set(report["models"]) == {"old", "new", "compat"}
    assert (out / "stage4_eval" / "report.md").is_file()
    records = [json.loads(x) for x in (out / "stage4_eval" / "mc.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [f"piqa/validation/{i}" for i in range(8)]
    capsys.readouterr()
    assert train.main(tiny_flags(*tiny_models, data_dir, out)) == 0
    assert capsys.readouterr().out.count("skipped") == 4


@pytest.mark.slow  # stages 1 and 2
def test_stage3_on_a_bf16_base_starts_from_a2_exactly(tiny_models, data_dir, tmp_path, monkeypatch):
    """--dtype bfloat16 (the GPU default; here on CPU): stage 3's compat adapter at step 0 equals
    the A2 that stage 2 saved, bit for bit in float32, and the teachers' logits in stage 3 equal
    those of the models stages 1 and 2 held when they saved A1 and A2."""
    ids = torch.randint(3, 300, (2, 11), generator=torch.Generator().manual_seed(0))
    at_save: dict[str, torch.Tensor] = {}
    real_save = lora.save_adapter

    def save_and_record(model, path, name="default", **kw):
        real_save(model, path, name, **kw)
        with losses.teacher_mode(model, name):
            at_save[Path(path).parent.name] = model(ids)
    monkeypatch.setattr(lora, "save_adapter", save_and_record)
    out = tmp_path / "run"
    flags = tiny_flags(*tiny_models, data_dir, out, "--dtype", "bfloat16")
    for stage in ("1", "2"):
        assert train.main(flags + ["--stage", stage]) == 0
    student, old = train.compat_models(train_cli.parse_args(flags), Dist(), out)
    assert student.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    a2 = load_file(out / train.STAGES[2] / "adapter" / "adapter_model.safetensors")
    for adapter in ("task", "compat"):
        state = lora.adapter_state_dict(student, adapter)
        assert state.keys() == a2.keys()
        for k in a2:
            assert state[k].dtype == torch.float32 and torch.equal(state[k], a2[k]), (adapter, k)
    assert any(not torch.equal(t, t.bfloat16().float()) for t in a2.values())  # rounding would show
    with losses.teacher_mode(student, "task"):
        assert torch.equal(student(ids), at_save[train.STAGES[2]])
    with torch.no_grad():
        assert torch.equal(old(ids), at_save[train.STAGES[1]])


# Stage 3 in 24 small steps (16 train items, 2 per step, 3 epochs), a checkpoint after each.
KILL_FLAGS = ["--limit-train", "20", "--epochs", "3", "--batch-size", "2", "--grad-accum", "1",
              "--save-every", "1"]


def run_stage3(tiny_models, data_dir, out, *extra):
    cmd = [sys.executable, str(ROOT / "train.py"), *tiny_flags(*tiny_models, data_dir, out),
           *KILL_FLAGS, "--stage", "3", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)


@pytest.mark.slow  # five train.py subprocesses
def test_sigkill_or_sigint_in_stage3_then_rerun_gives_the_uninterrupted_adapter(
        tiny_models, data_dir, tmp_path):
    """SIGKILL: the last checkpoint is intact. SIGINT: a checkpoint, a one-line message, exit
    130. Either way the rerun ends with the adapter of a run that was never interrupted."""
    base = tmp_path / "base"
    for stage in ("1", "2"):
        assert train.main(tiny_flags(*tiny_models, data_dir, base, *KILL_FLAGS, "--stage", stage)) == 0
    runs = {name: tmp_path / name for name in ("clean", "sigkill", "sigint")}
    for out in runs.values():
        subprocess.run(["cp", "-r", str(base), str(out)], check=True)

    for name, signum in (("sigkill", signal.SIGKILL), ("sigint", signal.SIGINT)):
        proc = run_stage3(tiny_models, data_dir, runs[name])
        root = runs[name] / "stage3_compat" / "checkpoint"
        while not any(root.glob("ckpt-*")) and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(0.05)
        proc.send_signal(signum)
        code, stderr = proc.wait(), proc.stderr.read().decode()
        if signum == signal.SIGKILL:
            assert code == -signal.SIGKILL, stderr[-2000:]
        else:
            assert code == 130 and "Traceback" not in stderr, stderr[-2000:]
            assert "checkpoint saved" in stderr and "rerun the same command to resume" in stderr
        assert not (runs[name] / "stage3_compat" / "DONE").exists()
        assert 0 < checkpoint.load(runs[name] / "stage3_compat" / "checkpoint")[1]["step"] < 24

    for name, out in runs.items():
        proc = run_stage3(tiny_models, data_dir, out)
        assert proc.wait() == 0, proc.stderr.read().decode()[-2000:]
    adapters = {name: load_file(out / "stage3_compat" / "adapter" / "adapter_model.safetensors")
                for name, out in runs.items()}
    a2 = load_file(base / "stage2_task_new" / "adapter" / "adapter_model.safetensors")
    for name in ("sigkill", "sigint"):
        assert adapters[name].keys() == adapters["clean"].keys()
        for k in adapters["clean"]:
            torch.testing.assert_close(adapters[name][k], adapters["clean"][k], rtol=0, atol=1e-6)
    # Stage 3 started from A2 and moved away from it.
    assert any(not torch.equal(adapters["clean"][k], a2[k]) for k in a2)
    for out in runs.values():  # each step logged once: work after the last checkpoint is not doubled
        log = read_log(out / "stage3_compat" / "log.jsonl")
        assert [r["step"] for r in log if "loss" in r] == list(range(1, 25))
    done = [json.loads((out / "stage3_compat" / "DONE").read_text()) for out in runs.values()]
    assert done[0] == done[1] == done[2] and done[0]["steps"] == 24


# ------------------------------------------------------------------------- teacher store


@pytest.mark.slow  # stages 1-2 once, stage 3 four times
def test_stage3_from_the_teacher_store(tiny_models, data_dir, tmp_path, monkeypatch):
    """With k = V the store gives the online adapter; M1 is freed before the student trains; a
    run of another mask reuses the store without loading a teacher; the manifest names what
    built the store; a store of another run and a bad shard are one error line each (exit 2),
    and nothing is trained."""
    import gc
    import weakref
    base = tmp_path / "base"
    assert train.main(tiny_flags(*tiny_models, data_dir, base, "--stage", "1")) == 0
    assert train.main(tiny_flags(*tiny_models, data_dir, base, "--stage", "2")) == 0
    loaded, real_load, real_fit = [], models.load_model, train.fit

    def load_model(name, *args, **kwargs):  # every model any code loads
        model = real_load(name, *args, **kwargs)
        loaded.append((str(name), weakref.ref(model)))
        return model

    def fit(*args, **kwargs):
        gc.collect()
        alive = [name for name, ref in loaded if ref() is not None]
        assert alive == [tiny_models[1]], alive  # only the student's base v2
        return real_fit(*args, **kwargs)
    monkeypatch.setattr(models, "load_model", load_model)
    monkeypatch.setattr(train, "fit", fit)
    store = tmp_path / "teacher_outputs"
    runs = {name: tmp_path / name for name in ("online", "store", "other_mask")}
    for name, out in runs.items():
        subprocess.run(["cp", "-r", str(base), str(out)], check=True)
    adapters = {}
    for name, extra in (("store", ()), ("other_mask", ("--mask", "old_correct"))):
        loaded.clear()
        assert train.main(tiny_flags(*tiny_models, data_dir, runs[name], "--stage", "3", "--teachers",
                                     "store", "--top-k", "300", "--teacher-store", str(store), *extra)) == 0
        assert [n for n, _ in loaded] == ([tiny_models[0], tiny_models[1]] if name == "store" else []) \
            + [tiny_models[1]]  # M1 and M2 once, for the build; then the student alone
    monkeypatch.setattr(train, "fit", real_fit)
    described = json.loads((store / "manifest.json").read_text())["description"]
    for role, stage, base_dir in (("old", 1, tiny_models[0]), ("new", 2, tiny_models[1])):
        assert described[role] == {
            "weights_sha256": sha256(Path(base_dir) / "model.safetensors"),
            "adapter_sha256": sha256(train.adapter_dir(base, stage) / "adapter_model.safetensors"),
            "tokenizer_sha256": sha256(Path(base_dir) / "tokenizer.json",
                                       Path(base_dir) / "tokenizer_config.json")}
    assert {k: described[k] for k in ("task", "seed", "limit_train", "max_len", "dtype", "top_k")} == {
        "task": "piqa", "seed": 0, "limit_train": 25, "max_len": 48, "dtype": "torch.float32", "top_k": 300}
    assert [(n, d["examples"]) for n, d in described["splits"].items()] == [("train", 20), ("validation", 5)]
    assert train.main(tiny_flags(*tiny_models, data_dir, runs["online"], "--stage", "3")) == 0
    for name, out in runs.items():
        adapters[name] = load_file(out / "stage3_compat" / "adapter" / "adapter_model.safetensors")
    for k in adapters["online"]:
        torch.testing.assert_close(adapters["store"][k], adapters["online"][k], rtol=0, atol=1e-5)
    assert any(not torch.equal(adapters["other_mask"][k], adapters["store"][k]) for k in adapters["store"])

    def refusal(out: Path) -> str:
        """The one error line of stage 3 from the store in `out`, which trains nothing."""
        proc = subprocess.run([sys.executable, "train.py", *tiny_flags(
            *tiny_models, data_dir, out, "--stage", "3", "--teachers", "store", "--teacher-store", str(store))],
            cwd=ROOT, capture_output=True, text=True, env=ONE_THREAD)
        lines = [line for line in proc.stderr.splitlines() if not line.startswith("warning: --max-len 48 cuts")]
        assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]  # the tiny flags cut some answers
        assert not (out / "stage3_compat").exists()
        return lines[0]
    # Another run: its A2 differs (as after retraining stage 2) from the one the store was built with.
    retrained = tmp_path / "retrained"
    subprocess.run(["cp", "-r", str(base), str(retrained)], check=True)
    a2 = train.adapter_dir(retrained, 2) / "adapter_model.safetensors"
    a2.write_bytes((train.adapter_dir(retrained, 1) / "adapter_model.safetensors").read_bytes())
    assert refusal(retrained).startswith(
        f"error: teacher store {store / 'manifest.json'} was built for another run (new.adapter_sha256: ")
    bad = tmp_path / "bad"
    subprocess.run(["cp", "-r", str(base), str(bad)], check=True)
    shard = store / "new" / "train-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])
    assert refusal(bad).startswith(f"error: teacher store shard {shard} has 100 bytes")


def sha256(*paths: Path) -> str:
    """One sha256 over the files' bytes, in order."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in paths)).hexdigest()


def test_teacher_store_across_two_vocabularies_is_refused(tiny_models, data_dir, tmp_path):
    args = train_cli.parse_args(tiny_flags(*tiny_models, data_dir, tmp_path, "--teachers", "store",
                                       "--cross-vocab", "fill"))
    with pytest.raises(ValueError, match="--teachers store needs --old and --new of one vocabulary; "
                                         "--cross-vocab fill runs with --teachers online"):
        train.stage_compat(args, Dist(), tmp_path, None, cross=True)
