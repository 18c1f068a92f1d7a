"""Each stage reads its own model's tokens, and stage 3 lines up M1's positions with the
student's (align.py), on a pair of tiny Llamas whose tokenizers differ only in their BOS
convention: the same tokenizer.json, add_bos_token true in one and false in the other."""
import argparse
import json
import shutil

import pytest
import torch

import align
import data
import lora
import losses
import models
import muscle
import stage_data
import train
import train_cli
from distributed import Dist
from tiny import CORPUS, make_checkpoint, tiny_flags


@pytest.mark.parametrize("student, teacher, expected", [
    ([5, 6, 7], [5, 6, 7], [0, 1, -1]),  # same ids: each position is its own counterpart
    ([5, 6, 7], [1, 5, 6, 7], [1, 2, -1]),  # BOS in M1's only: one position later
    ([1, 5, 6, 7], [5, 6, 7], [-1, 0, 1, -1]),  # BOS in the student's only: nothing predicts 5 in M1
    ([5, 9, 7, 2], [5, 8, 8, 7, 2], [-1, 2, 3, -1]),  # a word split otherwise: 9 has no counterpart
    ([5, 6, 7, 8], [6, 7, 8], [-1, 0, 1, -1]),  # M1's copy lost its first token to truncation
])
def test_teacher_positions(student, teacher, expected):
    assert align.teacher_positions(student, teacher) == expected


@pytest.fixture(scope="module")
def bos_pair(tmp_path_factory):
    """(with BOS, without BOS): two tiny Llamas of one tokenizer.json, which only the first
    tells to add BOS."""
    root = tmp_path_factory.mktemp("bos")
    with_bos, without = make_checkpoint(root / "with_bos", seed=1), make_checkpoint(root / "no_bos", seed=2)
    shutil.copy(with_bos / "tokenizer.json", without / "tokenizer.json")
    config = json.loads((with_bos / "tokenizer_config.json").read_text())
    (without / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    return str(with_bos), str(without)


def stage_args(old, new, data_dir):
    return train_cli.parse_args(tiny_flags(old, new, data_dir, "unused", "--max-len", "2048"))


def test_each_stage_reads_its_own_models_tokens(bos_pair, data_dir):
    with_bos, without = bos_pair
    bos = models.load_tokenizer(with_bos).bos_id
    args = stage_args(with_bos, without, data_dir)
    stage1, stage2, stage3 = (stage_data.task_data(args, stage, Dist()) for stage in (1, 2, 3))
    assert all(ids[0] == bos for ids, _ in stage1.train + stage1.val)  # --old's convention
    assert all(ids[0] != bos for ids, _ in stage2.train + stage2.val)  # --new's
    assert stage3.train == stage2.train and stage2.teacher is None
    for (ids, _), (old_ids, positions) in zip(stage3.train, stage3.teacher.train):
        assert old_ids == [bos] + ids
        assert positions == list(range(1, len(ids))) + [align.NO_POSITION]
    assert [row[0] for row in stage3.teacher.val] == [ids for ids, _ in stage1.val]


def test_help_says_which_tokens_each_stage_reads():
    text = " ".join(train_cli.build_parser().format_help().split())
    assert "Tokens: stage 1 reads --old's tokenizer, stages 2 and 3 --new's" in text
    assert "follows M2" in text


def test_same_ids_keep_the_student_batch_for_both_teachers(bos_pair, data_dir):
    args = stage_args(bos_pair[0], bos_pair[0], data_dir)
    td = stage_data.task_data(args, 3, Dist())
    assert td.teacher is None
    batch = td.train_batches(4, 0, Dist())(0)[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "index"}


def task_models(old_dir, new_dir):
    """M1 = old base + a random task adapter; the student = new base with a random task
    adapter (M2) copied to the compat slot, which is active."""
    old, new = models.load_model(old_dir), models.load_model(new_dir)
    torch.manual_seed(0)
    for m in (old, new):
        lora.add_adapter(m, "task", rank=4, alpha=8)
        with torch.no_grad():
            for p in lora.adapter_parameters(m, "task").values():
                p.normal_(0, 0.3)
    lora.copy_adapter(new, "task", "compat")
    lora.set_adapter(new, "compat")
    return old.eval(), new.eval()


@pytest.mark.parametrize("old_has_bos", [True, False])
@pytest.mark.parametrize("mask", ["student_correct", "instance_likelihood"])
def test_stage3_loss_compares_the_positions_that_predict_the_same_token(bos_pair, old_has_bos, mask):
    """The loss on a batch of the two tokenisations equals the plain MUSCLE loss on M1's logits
    moved by hand to the student's positions: one position later when M1 reads a BOS the
    student does not; M2's logits at the student's BOS position, which M1 lacks."""
    old_dir, new_dir = bos_pair if old_has_bos else bos_pair[::-1]
    old_tok, new_tok = models.load_tokenizer(old_dir), models.load_tokenizer(new_dir)
    old, student = task_models(old_dir, new_dir)
    texts = [CORPUS[0], CORPUS[1] + " and " + CORPUS[2]]  # two lengths: padding in the batch
    rows = [new_tok.encode(t) for t in texts]
    old_rows = [old_tok.encode(t) for t in texts]
    teacher = align.teacher_tokens([[(r, r) for r in rows], []], [[(r, r) for r in old_rows], []],
                                   old_tok.pad_id)  # (train, val)
    batch = data.collate([(r, r) for r in rows], new_tok.pad_id)
    batch.update(align.collate(teacher.train, old_tok.pad_id, batch["input_ids"].shape[1]))
    args = argparse.Namespace(mask=mask, temperature=2.0, ce_weight=0.3, chunk_size=5)
    got = losses.compat_loss(student, old, args)(batch)

    expected_loss, expected_tokens = 0.0, 0
    with torch.no_grad():
        for ids, old_ids in zip(rows, old_rows):
            x = torch.tensor([ids])
            z_student = student(x)
            with losses.teacher_mode(student, "task"):
                z_new = student(x)
            z_old = old(torch.tensor([old_ids]))
            # M1's logits at the student's positions, built without align.py
            z_old = z_old[:, 1:] if old_has_bos else torch.cat([z_new[:, :1], z_old], 1)
            out = muscle.muscle_loss(z_student, z_old, z_new, x, mask=mask, temperature=2.0,
                                     ce_weight=0.3)
            expected_loss += out.loss.item()
            expected_tokens += out.tokens
    assert got.tokens == expected_tokens == sum(len(r) - 1 for r in rows)
    assert got.loss.item() == pytest.approx(expected_loss, rel=1e-5)


@pytest.mark.slow  # the whole pipeline on the tiny pair
def test_pipeline_runs_a_pair_that_differs_only_in_bos(bos_pair, data_dir, tmp_path):
    out = tmp_path / "run"
    assert train.main(tiny_flags(*bos_pair, data_dir, out)) == 0
    report = json.loads((out / "stage4_eval" / "report.json").read_text())
    assert report["n"] == 8
    stage3 = json.loads((out / "stage3_compat" / "DONE").read_text())
    assert stage3["steps"] == 6
