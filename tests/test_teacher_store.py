"""Tests of teacher_store.py on a tiny random Llama: what it stores, resume after SIGKILL, bad stores."""
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import lock
import models
import muscle
import teacher_store
import train
from test_align import bos_pair  # noqa: F401 (fixture)
from tiny import CORPUS, ROOT, make_checkpoint, tiny_flags

VOCAB = 300


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    """Two tiny teachers (role -> checkpoint dir), their tokenizer's examples, and a fake adapter
    file per role (its bytes are all the description reads)."""
    root = tmp_path_factory.mktemp("store-teachers")
    dirs = {"old": make_checkpoint(root / "v1", seed=1), "new": make_checkpoint(root / "v2", seed=2)}
    for role in dirs:
        (root / f"a-{role}").mkdir()
        (root / f"a-{role}" / "adapter_model.safetensors").write_bytes(role.encode())
    tok = models.load_tokenizer(dirs["old"])
    examples, _ = data.encode_pairs(tok, [(t[:20], t[20:]) for t in CORPUS[:11]], 48)
    splits = {"train": examples[:8], "validation": examples[8:]}
    return root, dirs, splits, tok.pad_id


def description(teachers, top_k=16, seed=0):
    root, dirs, splits, _ = teachers
    return teacher_store.describe({r: models.weight_files(d) for r, d in dirs.items()},
                                  {r: root / f"a-{r}" for r in dirs},
                                  {r: [d / "tokenizer.json"] for r, d in dirs.items()}, splits, top_k, VOCAB,
                                  {"task": "piqa", "seed": seed})


def build(teachers, store, top_k=16, shard_examples=3):
    _, dirs, splits, pad_id = teachers
    loaders = {r: (lambda d=d: models.load_model(d).eval()) for r, d in dirs.items()}
    teacher_store.build(store, description(teachers, top_k), splits, loaders, pad_id,
                        batch_size=2, chunk_size=5, shard_examples=shard_examples, log=lambda s: None)


def batch_of(splits, pad_id, keys):
    """A training batch as stage_data.Batches makes it: rows by example key, then their keys."""
    everything = [*splits["train"], *splits["validation"]]
    return {**data.collate([everything[k] for k in keys], pad_id), "index": torch.tensor(keys)}


def test_stored_fields_are_the_teachers_own_at_every_label_position(teachers, tmp_path):
    root, dirs, splits, pad_id = teachers
    build(teachers, tmp_path / "store")
    store = teacher_store.TeacherStore(tmp_path / "store", description(teachers, top_k=4), top_k=4)
    batch = batch_of(splits, pad_id, [9, 2, 5])  # validation and training rows, any order
    real = batch["labels"][:, 1:] != -100
    for role, fields in zip(teacher_store.ROLES, store.batch_fields(batch)):
        model = models.load_model(dirs[role]).eval()
        with torch.no_grad():
            logits = model(batch["input_ids"], batch["attention_mask"])[:, :-1]
        expected = muscle.teacher_fields(logits, batch["labels"][:, 1:], 4)
        assert fields.ids.shape == (3, real.shape[1], 4)
        assert torch.equal(fields.ids[real], expected.ids[real])
        assert torch.equal(fields.top1[real], expected.top1[real])
        for name in ("logp", "tail", "label_logp"):
            torch.testing.assert_close(getattr(fields, name)[real], getattr(expected, name)[real],
                                       rtol=1e-5, atol=1e-5)
        assert fields.logp[~real].abs().sum() == 0
    manifest = json.loads((tmp_path / "store" / "manifest.json").read_text())
    # 8 training examples in shards of 3, 3 validation examples in 1: 4 files per teacher.
    assert sorted(manifest["shards"]) == [f"{r}/{s}" for r in ("new", "old") for s in
                                          ("train-00000.safetensors", "train-00001.safetensors",
                                           "train-00002.safetensors", "validation-00000.safetensors")]
    assert not (tmp_path / "store" / "building.json").exists()


def test_a_store_of_more_tokens_serves_fewer_and_refuses_more(teachers, tmp_path):
    build(teachers, tmp_path / "store", top_k=8)
    teacher_store.TeacherStore(tmp_path / "store", description(teachers, top_k=2), top_k=2)
    with pytest.raises(ValueError, match=r"manifest.json was built for another run \(top_k: 8 "
                                         r"there, fewer than the 32 asked for now\)"):
        teacher_store.TeacherStore(tmp_path / "store", description(teachers, top_k=32), top_k=32)
    build(teachers, tmp_path / "store", top_k=4)  # complete and matching: nothing to do


def test_bad_stores_are_refused_naming_the_file_and_what_differs(teachers, tmp_path):
    good = tmp_path / "good"
    build(teachers, good)
    desc = description(teachers)

    def refused(store, pattern):
        with pytest.raises(ValueError, match=pattern):
            teacher_store.TeacherStore(store, desc, 16)

    # Another run (seed), another tokenizer.
    with pytest.raises(ValueError, match=r"good/manifest.json was built for another run \(seed: 0 there, 1 now\)"):
        teacher_store.TeacherStore(good, description(teachers, seed=1), 16)
    other_tok = {**desc, "old": {**desc["old"], "tokenizer_sha256": "0" * 64}}
    with pytest.raises(ValueError, match=r"old.tokenizer_sha256: '.{12}\.\.\.' there, '000000000000\.\.\.' now"):
        teacher_store.TeacherStore(good, other_tok, 16)
    # A truncated shard, a missing shard, a shard of another store in its place.
    for case in ("truncated", "missing", "foreign"):
        store = tmp_path / case
        shutil.copytree(good, store)
        shard = store / "old" / "train-00001.safetensors"
        if case == "truncated":
            shard.write_bytes(shard.read_bytes()[:-10])
            refused(store, rf"shard {shard} has \d+ bytes, \d+ in .*manifest.json: it is truncated")
        elif case == "missing":
            shard.unlink()
            refused(store, rf"shard {shard} is missing \(listed in .*manifest.json\)")
        else:
            shutil.copy(store / "new" / "train-00001.safetensors", shard)  # same size
            refused(store, rf"shard {shard} does not match its sha256 .*: it is corrupt or from another store")
    # An interrupted build of another run in the same directory is not mixed with this one.
    manifest = json.loads((good / "manifest.json").read_text())
    (good / "building.json").write_text(json.dumps(manifest["description"]))
    (good / "manifest.json").unlink()
    with pytest.raises(ValueError, match=r"building.json was built for another run \(seed: 0 there, 1 now\)"):
        teacher_store.build(good, description(teachers, seed=1), teachers[2], {}, teachers[3])


def test_a_store_being_built_by_another_process_is_refused_naming_it(teachers, tmp_path):
    """Two runs sharing one --teacher-store (a mask sweep started in parallel) do not build it
    twice into one directory: the second is refused while the first holds the store's lock."""
    store = tmp_path / "store"
    with lock.hold(store, "--teacher-store"):
        with pytest.raises(ValueError, match=rf"--teacher-store {store} is in use by pid {os.getpid()}"):
            build(teachers, store)
        assert [p.name for p in store.iterdir()] == [lock.NAME]  # nothing built
    build(teachers, store)
    assert (store / "manifest.json").is_file() and not (store / lock.NAME).exists()


KILL_SCRIPT = """
import os, signal, sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
torch.set_num_threads(1)
import test_teacher_store as t
calls = []
real = getattr(t.teacher_store, {target!r})
def write_then_die(*args, **kwargs):
    real(*args, **kwargs)
    calls.append(1)
    if len(calls) == {after}:
        os.kill(os.getpid(), signal.SIGKILL)
setattr(t.teacher_store, {target!r}, write_then_die)
t.build(t.teachers_at({cache!r}), {store!r})
"""


def teachers_at(cache: str):
    """The fixture's value rebuilt from its directory (for a subprocess)."""
    root = Path(cache)
    dirs = {"old": root / "v1", "new": root / "v2"}
    tok = models.load_tokenizer(dirs["old"])
    examples, _ = data.encode_pairs(tok, [(t[:20], t[20:]) for t in CORPUS[:11]], 48)
    return root, dirs, {"train": examples[:8], "validation": examples[8:]}, tok.pad_id


# A kill after the 1st shard (in M1's pass), after the 5th (in M2's), or in the 3rd shard's
# write: its temp file is complete, not yet renamed.
@pytest.mark.parametrize("target, after", [("write_shard", 1), ("write_shard", 5), ("save_file", 3)])
def test_sigkill_during_the_build_then_rerun_gives_the_bytes_of_an_uninterrupted_build(
        teachers, tmp_path, target, after):
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    build(teachers, clean)
    script = KILL_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), target=target,
                                after=after, cache=str(teachers[0]), store=str(killed))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert (killed / "building.json").is_file() and not (killed / "manifest.json").exists()
    written = sorted(p.relative_to(killed) for p in killed.rglob("*.safetensors"))
    in_write = target == "save_file"
    assert len(written) == after - in_write and len(list(killed.rglob(".*.tmp-*"))) == in_write
    build(teachers_at(str(teachers[0])), killed)  # the dead build's lock is taken over
    files = sorted(p.relative_to(clean) for p in clean.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(killed) for p in killed.rglob("*") if p.is_file())
    assert len(files) == 9  # 8 shards and the manifest
    for rel in files:
        assert (clean / rel).read_bytes() == (killed / rel).read_bytes(), rel


@pytest.mark.slow  # stages 1-2 of the tiny BOS pair once, stage 3 online and from the store
def test_store_of_a_pair_whose_tokenizers_differ_in_bos_gives_the_online_adapter(bos_pair, data_dir,
                                                                                 tmp_path):
    """M1 reads its own tokens in the store's build as it does online (align.py), so with k = V
    the adapter is the online one, and the description holds M1's tokens."""
    pair, base = bos_pair, tmp_path / "base"
    for stage in ("1", "2"):
        assert train.main(tiny_flags(*pair, data_dir, base, "--stage", stage)) == 0
    adapters = {}
    for name, extra in (("online", ()), ("store", ("--teachers", "store", "--top-k", "300"))):
        shutil.copytree(base, tmp_path / name)
        assert train.main(tiny_flags(*pair, data_dir, tmp_path / name, "--stage", "3", *extra)) == 0
        adapters[name] = load_file(tmp_path / name / "stage3_compat" / "adapter" / "adapter_model.safetensors")
    for k in adapters["online"]:
        torch.testing.assert_close(adapters["store"][k], adapters["online"][k], rtol=0, atol=1e-5)
    manifest = json.loads((tmp_path / "store" / "teacher_store" / "manifest.json").read_text())
    assert manifest["description"]["old_tokens_sha256"] is not None
