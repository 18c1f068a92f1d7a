"""The MUSCLE pipeline (paper sections 4-5): task adapters, the compatibility adapter, evaluation.

    python train.py --old llama1 --new llama2 --task piqa [--data-dir ../shared/data]
    torchrun --nproc_per_node 8 train.py --old llama1 --new llama2 --task piqa

Stages, each skipped when its output under --out is complete (a DONE file written last) and
resumed from its checkpoint when it was interrupted:
  1. task adapter A1 on base v1 (cross-entropy on context and answer tokens, paper A.1);
  2. task adapter A2 on base v2;
  3. compatibility adapter Ac on base v2, initialised from A2, trained with the MUSCLE loss
     (muscle.py) against M1 = v1 + A1 and M2 = v2 + A2. With --teachers online both teachers
     run on every batch: M2 is the student's own copy of base v2 with A2 active (two adapter
     slots, switched with lora.use_adapter), so there is no second v2 in memory. With --teachers
     store, one pass of each teacher first writes what they say to disk (teacher_store.py), and
     the student trains with only base v2 and Ac in memory;
  4. evaluation of M1, M2, Mc on the task's test split (eval.py) and the compatibility report
     (report.py), printed and written to --out/stage4_eval.

Tokens: each stage reads its own model's tokens, and stage 3 lines up M1's positions with the
student's where the two tokenizers give other ids (align.py; TOKENS_HELP below).

Dropout: the models being trained run in train mode, so the checkpoint's own dropout applies as
in Hugging Face training (Phi-2's resid_pdrop = 0.1; Llama has none) besides --dropout on the
LoRA input; teachers and validation run in eval mode, without any.

The training loop `fit` lives in trainer.py (toy.py reuses it for full-parameter pre-training),
the torch.distributed helpers in distributed.py, atomic checkpoints in checkpoint.py.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

import align
import cli
import cross_vocab
import data
import distributed
import eval as evaluation
import files
import lock
import lora
import models
import muscle
import pairs
import predictions
import report
import teacher_store
import toy  # noqa: F401  (registers the toy tasks and the toy bases)
from distributed import Dist
from trainer import Diverged, FitConfig, Interrupted, LossFn, fit

# ============================================================================ data


class Batches(Sequence):
    """This rank's micro-batches: global micro-batches of `batch_size` sequences, rows dealt out
    round-robin over ranks (rank r takes rows r, r + W, ...), collated on access. The same
    flags give the same global batches, and the same numbers, on any number of processes.

    `groups` hold indices into `examples`; each batch's "index" is its rows' example keys
    (key_offset + index; -1 for a filler row), which the teacher store is keyed by. With
    `teacher` rows (M1's own tokens of the same examples, align.py), a batch also holds
    M1's inputs and the alignment (align.collate)."""

    def __init__(self, examples: list[data.Example], groups: list[list[int]], pad_id: int, env: Dist,
                 key_offset: int = 0, teacher: list[align.Row] | None = None, teacher_pad_id: int = 0):
        self.examples, self.groups, self.pad_id, self.env = examples, groups, pad_id, env
        self.key_offset, self.teacher, self.teacher_pad_id = key_offset, teacher, teacher_pad_id

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        rows = self.groups[i][self.env.rank::self.env.world]
        examples = [self.examples[j] for j in rows]
        keys = [self.key_offset + j for j in rows]
        teacher = [self.teacher[j] for j in rows] if self.teacher is not None else None
        if not rows:
            # A rank left without a row (a short last batch) runs one padding token without a
            # label: FSDP's collectives need every rank in every forward, and it adds 0 tokens.
            examples, keys = [([self.pad_id], [muscle.IGNORE_INDEX])], [-1]
            teacher = [([self.teacher_pad_id], [align.NO_POSITION])] if teacher is not None else None
        batch = {**data.collate(examples, self.pad_id), "index": torch.tensor(keys)}
        if teacher is not None:
            batch.update(align.collate(teacher, self.teacher_pad_id, batch["input_ids"].shape[1]))
        return {k: v.to(self.env.device) for k, v in batch.items()}


@dataclass
class TaskData:
    train: list[data.Example]
    val: list[data.Example]
    pad_id: int
    teacher: align.TeacherTokens | None = None  # stage 3: M1's tokens where they differ

    def _batches(self, part: str, groups: list[list[int]], env: Dist, key_offset: int) -> Batches:
        teacher = getattr(self.teacher, part) if self.teacher is not None else None
        pad = self.teacher.pad_id if self.teacher is not None else 0
        return Batches(getattr(self, part), groups, self.pad_id, env, key_offset, teacher, pad)

    def train_batches(self, batch_size: int, seed: int, env: Dist) -> Callable[[int], Batches]:
        """Epoch -> its micro-batches, shuffled with a seed derived from (seed, epoch)."""
        # data.batches groups by the length of each element's first item (the input ids), so
        # (input ids, index) pairs come back grouped exactly as the examples would.
        keyed = [(ids, i) for i, (ids, _) in enumerate(self.train)]

        def epoch_batches(epoch: int) -> Batches:
            groups = data.batches(keyed, batch_size, seed=seed * 1000 + epoch)
            return self._batches("train", [[i for _, i in g] for g in groups], env, 0)
        return epoch_batches

    def val_batches(self, batch_size: int, env: Dist) -> Batches:
        """Validation examples in order; their keys follow the training examples' keys."""
        order = list(range(len(self.val)))
        groups = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        return self._batches("val", groups, env, len(self.train))


def task_data(args: argparse.Namespace, stage: int, env: Dist, cross: bool = False) -> TaskData:
    """The paper's seeded 80/20 train/validation split of the task's training set, tokenised
    (loss on context and answer, appendix A.1; long contexts truncated from the left) by the
    stage's own model: --old's tokenizer for stage 1, the student's (--new's) for stages 2 and
    3. Stage 3 also holds M1's own tokens of the same examples where they differ (align.py), or,
    across two vocabularies (`cross`), aligned by text (cross_vocab.teacher_tokens)."""
    items = training_items(args)
    pairs = [[data.training_pair(args.task, it) for it in part]
             for part in data.split_train_val(items, seed=args.seed, frac=0.8)]
    tokenizer = models.load_tokenizer(args.old if stage == 1 else args.new)
    encoded = [data.encode_pairs(tokenizer, part, args.max_len) for part in pairs]
    truncated = encoded[0][1] + encoded[1][1]
    if truncated and env.main:
        print(f"note: {truncated} of {len(items)} training sequences were longer than --max-len "
              f"{args.max_len} and lost the start of their context")
    examples = [part for part, _ in encoded]
    teacher = None
    if stage == 3:
        old_tokenizer = models.load_tokenizer(args.old)
        if cross:
            teacher = cross_vocab.teacher_tokens(tokenizer, old_tokenizer, pairs, examples,
                                                 args.max_len)
        else:
            old_examples = [data.encode_pairs(old_tokenizer, part, args.max_len)[0] for part in pairs]
            teacher = align.teacher_tokens(examples, old_examples, old_tokenizer.pad_id)
    return TaskData(examples[0], examples[1], tokenizer.pad_id, teacher)


def training_items(args: argparse.Namespace) -> list:
    """The task's training items stages 1-3 read (both parts of the 80/20 split)."""
    return data.load_task(args.task, "train", args.data_dir)[:args.limit_train]


def check_answers_fit(args: argparse.Namespace, items: Sequence, env: Dist) -> None:
    """Before stage 1: a sequence longer than --max-len is cut on the left, so an answer longer
    than --max-len less BOS and EOS loses its start and keeps no question. Under each base's
    tokenizer, none kept whole is an error and some a warning, with the smallest --max-len
    that keeps every answer whole."""
    pairs = [data.training_pair(args.task, it) for it in items]
    for flag, name in (("--old", args.old), ("--new", args.new)):
        tokenizer = models.load_tokenizer(name)
        needed = [data.answer_length(tokenizer, context, target) for context, target in pairs]
        cut = sum(n > args.max_len for n in needed)
        what = (f"--max-len {args.max_len} cuts the answer of {cut} of {len(pairs)} training items of "
                f"task {args.task} in {flag} {name}'s tokens")
        fix = f"pass --max-len {max(needed)} to keep every answer whole"
        if cut == len(pairs):
            raise ValueError(f"{what}, all of them: they would train on the end of an answer without "
                             f"its question; {fix}")
        if cut and env.main:
            cli.say(f"warning: {what}: those lose the start of the answer and all of the question; {fix}")


# ============================================================================ models


# How long the other ranks wait for local rank 0's downloads (a 13 GB checkpoint at 1 MB/s takes
# under 4 hours), instead of the process group's timeout for a peer that died.
DOWNLOAD_WAIT_S = 6 * 3600


def fetch_models(args: argparse.Namespace, env: Dist) -> None:
    """Resolve --old and --new (checkpoint and tokenizer files: downloaded, or a toy model built)
    once per machine: local rank 0 first while the other ranks wait, then they read the files it
    fetched from the cache, without the network. If it fails, every rank ends with its message."""
    def resolve_both(local_only: bool) -> None:
        for name in (args.old, args.new):
            models.resolve(name, local_only)
    distributed.local_rank_0_first(resolve_both, env, DOWNLOAD_WAIT_S)


class VocabularyMismatch(ValueError):
    """--old and --new do not share one vocabulary."""


def check_same_vocab(old: str, new: str) -> None:
    """MUSCLE compares the two models' distributions token by token (paper eq. 1), so both must
    share one vocabulary: the same piece under every id, special and added tokens included,
    whichever file (tokenizer.json or tokenizer.model) each side ships, and embeddings of one
    size. Updates into Llama 3 change it (paper section 8)."""
    tokenizers = [models.load_tokenizer(n) for n in (old, new)]
    sizes = [models.read_config(models.resolve(n)).get("vocab_size") for n in (old, new)]
    vocabs = [t.vocabulary() for t in tokenizers]
    differing = [f"id {i}: {a!r} vs {b!r}" for i, (a, b) in enumerate(zip(*vocabs)) if a != b][:3]
    if not differing:  # one vocabulary is a prefix of the other: name what the longer one adds
        n = min(map(len, vocabs))
        extra = max(vocabs, key=len)[n:n + 3]
        differing = [f"id {n + j}: {piece!r} in one only" for j, piece in enumerate(extra)]
    if sizes[0] != sizes[1] or differing:
        raise VocabularyMismatch(
            f"--old {old} and --new {new} do not share a vocabulary (model vocab_size {sizes[0]} vs "
            f"{sizes[1]}, tokenizer sizes {len(vocabs[0])} vs {len(vocabs[1])}; first differing "
            f"pieces: {'; '.join(differing)}). MUSCLE distils logits token by token and needs "
            f"one vocabulary for both")


def vocabulary_changes(args: argparse.Namespace) -> bool:
    """Whether the update changes the vocabulary, which stage 3 then bridges by text
    (cross_vocab.py) if --cross-vocab allows it; one vocabulary takes the paper's exact path."""
    try:
        check_same_vocab(args.old, args.new)
        return False
    except VocabularyMismatch as e:
        if args.cross_vocab == "off":
            raise VocabularyMismatch(f"{e}; pass --cross-vocab fill to align the two tokenizations "
                                     f"by text and map M1's distributions onto the new vocabulary"
                                     ) from None
        return True


def check_max_len(args: argparse.Namespace) -> None:
    """--max-len must fit both models' context: positions beyond max_position_embeddings were
    never trained. Longer examples are cut to --max-len (data.encode_pairs), and counted."""
    for flag, name in (("--old", args.old), ("--new", args.new)):
        context = models.read_config(models.resolve(name)).get("max_position_embeddings")
        if context and args.max_len > context:
            raise ValueError(f"--max-len {args.max_len} is longer than the context of {flag} {name} "
                             f"(max_position_embeddings {context}); pass --max-len {context} or less "
                             f"(longer examples lose the start of their context)")


def check_eval_data(args: argparse.Namespace) -> None:
    """Stage 4's items are read and tokenised before stage 1, so a missing test file or an item
    that cannot be scored stops the run before the training stages, not after them."""
    spec, items = eval_items(args)
    for name in (args.old, args.new):
        context = models.read_config(models.resolve(name)).get("max_position_embeddings") or 2048
        evaluation.check_scorable(spec, items, models.load_tokenizer(name), context)


def eval_items(args: argparse.Namespace) -> tuple[data.Task, list]:
    """The task and the items stage 4 evaluates: the evaluation split, cut to --limit-eval."""
    spec = data.get_task(args.task)
    return spec, data.load_task(args.task, spec.eval_split, args.data_dir)[:args.limit_eval]


def items_digest(items: Sequence) -> str:
    """A fingerprint of data items (ids and content): predictions computed on other evaluation
    items (another --limit-eval, another --data-dir) are never taken for these, and a run's
    training stages never resume on other training items."""
    rows = [dataclasses.asdict(it) for it in items]
    return hashlib.sha256(json.dumps(rows, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def model_dtype(args: argparse.Namespace, env: Dist) -> torch.dtype:
    """--dtype auto: the frozen base in bf16 on GPU, fp32 on CPU."""
    if args.dtype == "auto":
        return torch.bfloat16 if env.device.type == "cuda" else torch.float32
    return getattr(torch, args.dtype)


def prepare(model: nn.Module, env: Dist, grad_checkpointing: bool) -> nn.Module:
    """Optional activation checkpointing, then FSDP sharding. The trainable adapters are float32
    already on any base (lora.py), so they are their own master weights."""
    if grad_checkpointing:
        distributed.enable_activation_checkpointing(model)
    return distributed.shard(model, env)


def frozen_teacher(model: nn.Module, env: Dist) -> nn.Module:
    """A teacher: no gradients, eval mode (no dropout), sharded like the student (as torchtune's
    `_setup_teacher_model`)."""
    model.requires_grad_(False)
    return distributed.shard(model.eval(), env)


@contextlib.contextmanager
def teacher_mode(model: nn.Module, adapter: str) -> Iterator[None]:
    """The student's own base with the frozen task adapter, in eval mode and without gradients:
    M2 as a teacher, sharing the weights of base v2 with the student."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), lora.use_adapter(model, adapter):
            yield
    finally:
        model.train(was_training)


# Positions per chunk of logits in the losses: [256, V] fp32 tensors, small next to the blocks'
# activations, and fewer positions than most batches hold, so the logits are split
# (bench/RESULTS.md compares the peak memory with 256 and 1024).
CHUNK_SIZE = 256


def ce_loss(model: nn.Module, chunk_size: int = CHUNK_SIZE) -> LossFn:
    """Stages 1-2: next-token cross-entropy on every real token (context and answer), from the
    final hidden states `chunk_size` positions at a time, so the batch's full-vocabulary fp32
    logits never exist whole (muscle.causal_lm_loss_chunked)."""
    return lambda b: muscle.causal_lm_loss_chunked(model.hidden_states(b["input_ids"], b["attention_mask"]),
                                                   model.lm_head, b["labels"], chunk_size)


def compat_step_loss(b: dict, student: nn.Module, old: nn.Module, args: argparse.Namespace,
                     vmap: cross_vocab.VocabMap | None = None) -> muscle.LossSum:
    """One compatibility step's loss, teachers online (the paper, Sec. 4.1, Eq. 1-2).

    M1 = base v1 + A1 and M2 = base v2 + A2 run without gradients, then the student Mc = base
    v2 + Ac. At every label token t the mask m_t (`--mask`; the paper's `student_correct`:
    m_t = [argmax z_c[t] != y_t]) picks the teacher the student follows:
        L = sum_t T^2 KL(softmax(z_teacher[t] / T) || softmax(z_c[t] / T))  [+ ce_weight * CE]
    with teacher = M1 where m_t, else M2. The logits z, the mask and the KL are computed a chunk
    of positions at a time from the final hidden states, in `muscle.muscle_loss_chunked`.
    M1 reads its own token ids where its tokenizer splits the text differently (align.py), and a
    student position without an M1 counterpart follows M2. With `vmap` (two vocabularies), M1's
    distribution is first mapped onto the student's vocabulary (cross_vocab.py)."""
    ids, mask = b["input_ids"], b["attention_mask"]
    with torch.no_grad():
        h_old = align.teacher_hidden_states(old, b)  # M1 at the student's positions: [B, T, H_1]
    with teacher_mode(student, "task"):
        h_new = student.hidden_states(ids, mask)  # M2: [B, T, H]
    h = student.hidden_states(ids, mask)  # Mc, with gradients: [B, T, H]
    heads = (student.lm_head, old.lm_head, student.lm_head)
    if vmap is not None:
        return cross_vocab.muscle_loss_cross(
            h, h_old, h_new, heads, b["labels"], align.has_counterpart(b), vmap,
            args.cross_vocab, args.mask, args.temperature, args.ce_weight, args.chunk_size)
    return muscle.muscle_loss_chunked(h, h_old, h_new, heads, b["labels"], mask=args.mask,
                                      temperature=args.temperature, ce_weight=args.ce_weight,
                                      chunk_size=args.chunk_size, old_valid=align.has_counterpart(b))


def stored_compat_step_loss(b: dict, student: nn.Module, store: teacher_store.TeacherStore,
                            args: argparse.Namespace) -> muscle.LossSum:
    """One compatibility step's loss with --teachers store: the same loss as `compat_step_loss`,
    with the teachers' stored top-k distributions in place of their forwards (no teacher runs;
    muscle.stored_muscle_loss_chunked)."""
    old, new = store.batch_fields(b)
    h = student.hidden_states(b["input_ids"], b["attention_mask"])  # Mc: [B, T, H]
    return muscle.stored_muscle_loss_chunked(h, student.lm_head, old, new, b["labels"],
                                             mask=args.mask, temperature=args.temperature,
                                             ce_weight=args.ce_weight, chunk_size=args.chunk_size,
                                             old_valid=align.has_counterpart(b))


def compat_loss(student: nn.Module, old: nn.Module, args: argparse.Namespace,
                vmap: cross_vocab.VocabMap | None = None) -> LossFn:
    """Stage 3's loss function for `fit`, teachers online: `compat_step_loss` on each batch."""
    return lambda b: compat_step_loss(b, student, old, args, vmap)


def stored_compat_loss(student: nn.Module, store: teacher_store.TeacherStore,
                       args: argparse.Namespace) -> LossFn:
    """Stage 3's loss function for `fit`, teachers from the store: `stored_compat_step_loss`."""
    return lambda b: stored_compat_step_loss(b, student, store, args)


# ============================================================================ stages

STAGES = {1: "stage1_task_old", 2: "stage2_task_new", 3: "stage3_compat", 4: "stage4_eval"}
ADAPTER = "adapter"  # each training stage's best adapter, in PEFT's format
DONE = evaluation.STAGE_DONE  # written last: the stage's output is complete
INPUTS = "inputs.json"  # stage 4: the digest of the items each role's predictions were made on


def stage_dir(out: Path, stage: int) -> Path:
    return out / STAGES[stage]


def adapter_dir(out: Path, stage: int) -> Path:
    """The finished adapter of stage 1, 2 or 3; a clear error when that stage has not run."""
    if not (stage_dir(out, stage) / DONE).is_file():
        raise FileNotFoundError(f"{stage_dir(out, stage)} is not complete: run --stage {stage} "
                                f"(or --stage all) before the stages that need its adapter")
    return stage_dir(out, stage) / ADAPTER


def mark_done(out: Path, stage: int, summary: dict, env: Dist) -> None:
    """DONE (with a summary) last; the stage's checkpoint is then of no further use."""
    if env.main:
        files.write_text_atomic(stage_dir(out, stage) / DONE, json.dumps(summary) + "\n")
        shutil.rmtree(stage_dir(out, stage) / "checkpoint", ignore_errors=True)
    distributed.barrier(env)


def fit_config(args: argparse.Namespace) -> FitConfig:
    return FitConfig(args.epochs, args.lr, args.warmup_steps, args.weight_decay, args.grad_accum,
                     args.max_grad_norm, args.max_steps, args.save_every, args.log_every, args.seed)


def train_adapter(args: argparse.Namespace, env: Dist, out: Path, stage: int, model: nn.Module,
                  name: str, loss_fn: LossFn, td: TaskData, base: str) -> dict:
    """Fit adapter `name` of `model` (already prepared) and keep the best epoch's copy."""
    d = stage_dir(out, stage)

    def save_best(epoch: int) -> None:
        lora.save_adapter(model, d / ADAPTER, name, base_model_name_or_path=base)

    result = fit(model, lora.adapter_parameters(model, name), loss_fn,
                 td.train_batches(args.batch_size, args.seed, env),
                 td.val_batches(args.batch_size, env), fit_config(args), d, env,
                 on_best=save_best, desc=f"stage {stage}")
    return {"best_epoch": result.best_epoch, "best_val_loss": result.best_val_loss,
            "steps": result.steps}


def load_base(name: str, args: argparse.Namespace, env: Dist) -> nn.Module:
    return models.load_model(name, dtype=model_dtype(args, env), device=env.device)


def stage_task(args: argparse.Namespace, env: Dist, out: Path, stage: int, td: TaskData) -> dict:
    """Stages 1 and 2: a task adapter on base v1 (--old) or v2 (--new) with cross-entropy."""
    base = args.old if stage == 1 else args.new
    model = load_base(base, args, env)
    torch.manual_seed(args.seed)  # the same LoRA A initialisation on every rank
    lora.add_adapter(model, "task", rank=args.rank, alpha=args.alpha, dropout=args.dropout)
    lora.mark_trainable(model, "task")
    model = prepare(model, env, args.grad_checkpointing)
    return train_adapter(args, env, out, stage, model, "task", ce_loss(model, args.chunk_size), td,
                         base)


def compat_models(args: argparse.Namespace, env: Dist, out: Path) -> tuple[nn.Module, nn.Module]:
    """Stage 3's models, prepared and sharded: the student v2 holding A2 as "task" (M2) and its
    copy "compat" (trainable), and the frozen M1 = v1 + A1. The adapters are float32 on any base,
    so "task" and "compat" start equal to the A2 that stage 2 saved, bit for bit."""
    a1, a2 = adapter_dir(out, 1), adapter_dir(out, 2)  # before loading anything
    student = load_base(args.new, args, env)
    lora.load_adapter(student, a2, "task")
    lora.copy_adapter(student, "task", "compat")
    lora.mark_trainable(student, "compat")
    old = load_base(args.old, args, env)
    lora.load_adapter(old, a1, "task")
    return prepare(student, env, args.grad_checkpointing), frozen_teacher(old, env)


def stage_compat(args: argparse.Namespace, env: Dist, out: Path, td: TaskData,
                 cross: bool = False) -> dict:
    """Stage 3: Ac on base v2, initialised as a copy of A2 (paper A.1), with the MUSCLE loss
    against teachers run online or read from the teacher store (built first if needed). From
    the store, only base v2 and Ac are in memory while the student trains. Across two
    vocabularies (`cross`, teachers online) the summary says how much of the text M1 could teach."""
    if args.teachers == "store":
        if cross:
            raise ValueError(f"--teachers store needs --old and --new of one vocabulary; "
                             f"--cross-vocab {args.cross_vocab} runs with --teachers online")
        store = open_teacher_store(args, env, out, td)
        student = load_base(args.new, args, env)
        lora.load_adapter(student, adapter_dir(out, 2), "compat")
        lora.mark_trainable(student, "compat")
        student = prepare(student, env, args.grad_checkpointing)
        return train_adapter(args, env, out, 3, student, "compat",
                             stored_compat_loss(student, store, args), td, args.new)
    student, old = compat_models(args, env, out)
    if not cross:
        return train_adapter(args, env, out, 3, student, "compat", compat_loss(student, old, args),
                             td, args.new)
    vmap = cross_vocab.model_vocab_map(models.load_tokenizer(args.old), models.load_tokenizer(args.new),
                                       old.lm_head.out_features, student.lm_head.out_features,
                                       args.cross_vocab)
    coverage = cross_vocab.Coverage()
    summary = train_adapter(args, env, out, 3, student, "compat",
                            coverage.counting(compat_loss(student, old, args, vmap)), td, args.new)
    summary["cross_vocab"] = cross_vocab.Coverage.shares(distributed.all_reduce_sum(coverage.totals, env))
    if env.main:
        print(cross_vocab.Coverage.describe(summary["cross_vocab"]))
    return summary


def open_teacher_store(args: argparse.Namespace, env: Dist, out: Path,
                       td: TaskData) -> teacher_store.TeacherStore:
    """This run's teacher store (--teacher-store, default --out/teacher_store), built first when
    it is not complete: M1, then M2, each loaded for its pass and freed after it."""
    bases = {"old": args.old, "new": args.new}
    adapters = {"old": adapter_dir(out, 1), "new": adapter_dir(out, 2)}

    def load(role: str) -> nn.Module:
        model = load_base(bases[role], args, env)
        lora.load_adapter(model, adapters[role], "task")
        return model.eval().requires_grad_(False)

    run = {"task": args.task, "seed": args.seed, "limit_train": args.limit_train,
           "max_len": args.max_len, "dtype": str(model_dtype(args, env))}
    return teacher_store.open_store(
        Path(args.teacher_store or out / "teacher_store"),
        {role: models.resolve(b) for role, b in bases.items()}, adapters,
        {"train": td.train, "validation": td.val}, args.top_k, run, load, td.pad_id, env,
        batch_size=args.batch_size, chunk_size=args.chunk_size, old_tokens=td.teacher)


def predict(base: str, adapter: Path, items: list, path: Path, args: argparse.Namespace,
            env: Dist) -> None:
    """Prediction records of base + adapter on `items`, written to `path` (atomically, in item
    order). Each rank scores items r, r + W, ... with a whole (unsharded) model; rank 0 merges."""
    model = load_base(base, args, env)
    lora.load_adapter(model, adapter, "task")
    try:
        records = evaluation.evaluate(model, models.load_tokenizer(base), args.task,
                                      items[env.rank::env.world], batch_size=args.eval_batch_size)
    except evaluation.NonFinite as e:
        raise evaluation.NonFinite(evaluation.name_broken(e, base, str(adapter))) from None
    parts = [path.with_name(f".{path.stem}.rank{r}.jsonl") for r in range(env.world)]
    evaluation.write_predictions(records, parts[env.rank])
    distributed.barrier(env)
    if env.main:
        shards = [predictions.read_predictions(part) for part in parts]
        merged = [shards[i % env.world][i // env.world] for i in range(len(items))]
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in merged)
        files.write_text_atomic(path, lines)
        for part in parts:
            part.unlink()
    distributed.barrier(env)


def stage_eval(args: argparse.Namespace, env: Dist, out: Path) -> dict:
    """Stage 4: M1, M2, Mc on the task's evaluation split, then the compatibility report."""
    d = stage_dir(out, 4)
    d.mkdir(parents=True, exist_ok=True)
    _, items = eval_items(args)
    digest = items_digest(items)
    roles = {"m1": (args.old, adapter_dir(out, 1)), "m2": (args.new, adapter_dir(out, 2)),
             "mc": (args.new, adapter_dir(out, 3))}
    for role, (base, adapter) in roles.items():
        # Finished predictions survive a restart, and are reused for the same items only.
        inputs = files.read_json(d / INPUTS) if (d / INPUTS).is_file() else {}
        if not (d / f"{role}.jsonl").is_file() or inputs.get(role) != digest:
            predict(base, adapter, items, d / f"{role}.jsonl", args, env)
            if env.main:
                files.write_text_atomic(d / INPUTS, json.dumps({**inputs, role: digest}, indent=1) + "\n")
            gc.collect()
    runs = {role: predictions.read_predictions(d / f"{role}.jsonl") for role in roles}
    sources = {"old": "m1.jsonl", "new": "m2.jsonl", "compat": "mc.jsonl"}
    result = report.compatibility_report(runs["m1"], runs["m2"], runs["mc"], sources=sources)
    if env.main:
        report.write_report(result, d)
        print(report.format_report_text(result))
    distributed.barrier(env)
    return {"n": result["n"], "items": digest}


# ============================================================================ run and CLI

# Flags that do not change what the training stages compute; every other flag must match to
# resume a run. Stage 4 keeps the digest of its items, so --limit-eval and --data-dir may change;
# the training items are compared by their digest (TRAIN_ITEMS), so a copy of the same files in
# another --data-dir resumes too. --data-dir is kept in run_config.json for the record.
NOT_CONFIG = {"out", "overwrite", "stage", "device", "save_every", "log_every", "grad_checkpointing",
              "data_dir", "eval_batch_size", "chunk_size", "teacher_store", "limit_eval"}
RUN_CONFIG = "run_config.json"
TRAIN_ITEMS = "train_items"  # run_config.json: the digest of the items the training stages read
# Flags that only stages 3 and 4 read: they may change in a run whose stage 3 has not started, so
# a copy of a run's stages 1-2 (and its teacher store) serves runs of other masks.
STAGE3_FLAGS = {"mask", "temperature", "ce_weight", "teachers", "top_k"}


def check_run_config(out: Path, args: argparse.Namespace, env: Dist, train_digest: str | None = None) -> None:
    """Refuse an --out that holds a different run (unless --overwrite, which deletes it);
    the same configuration resumes, and so does one that differs only in STAGE3_FLAGS while
    stage 3 has not started. `train_digest` (None when no training stage runs now) must match
    the digest of the training items the run has trained on."""
    config = {k: v for k, v in sorted(vars(args).items()) if k not in NOT_CONFIG}
    path = out / RUN_CONFIG
    record = files.read_json(path, fix=f"delete it to resume the run with the flags given now") \
        if path.is_file() else None
    saved = None if record is None else {k: v for k, v in record.items() if k not in NOT_CONFIG}
    config[TRAIN_ITEMS] = train_digest or (saved or {}).get(TRAIN_ITEMS)
    if saved is not None and TRAIN_ITEMS not in saved:  # a run_config.json older than the digest
        saved[TRAIN_ITEMS] = config[TRAIN_ITEMS]
    if saved is None and out.is_dir() and any(p.name != lock.NAME for p in out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no {RUN_CONFIG}, so it is not a run "
                         f"of train.py; choose another --out (nothing was deleted)")
    diff = {k for k in set(config) | set(saved or {}) if (saved or config).get(k) != config.get(k)}
    if not stage_dir(out, 3).exists():
        diff -= STAGE3_FLAGS
    if diff and not args.overwrite:
        changes = "; ".join(f"{k}: {saved.get(k)!r} there, {config.get(k)!r} now" for k in sorted(diff)
                            if k != TRAIN_ITEMS)
        if TRAIN_ITEMS in diff:
            changes = "; ".join(filter(None, [changes, (
                f"the training items differ from those it was trained on, read from --data-dir "
                f"{record.get('data_dir')} there, {args.data_dir} now")]))
        raise ValueError(f"--out {out} holds a run with a different configuration ({changes}). "
                         f"Rerun with its flags to resume it, choose another --out, or pass "
                         f"--overwrite to delete it and start over")
    distributed.barrier(env)  # every rank has read the old config before rank 0 changes it
    if env.main:
        if saved is not None and args.overwrite:  # everything but the lock this process holds
            for entry in out.iterdir():
                if entry.name != lock.NAME:
                    shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        files.write_text_atomic(path, json.dumps({**config, "data_dir": args.data_dir}, indent=1) + "\n")
    distributed.barrier(env)


def run(args: argparse.Namespace, env: Dist) -> None:
    out = Path(args.out or f"runs/{Path(args.old).name}-{Path(args.new).name}-{args.task}")
    if args.cross_vocab == "off":  # before anything is downloaded
        refused = pairs.refusal(args.old, args.new)
        if refused:
            raise ValueError(refused)
    fetch_models(args, env)
    cross = vocabulary_changes(args)
    check_max_len(args)
    stages = [1, 2, 3, 4] if args.stage == "all" else [int(args.stage)]
    training = [s for s in stages if s < 4 and not is_done(args, out, s)]
    items = training_items(args) if training else None
    if items:
        check_answers_fit(args, items, env)
    if 4 in stages:
        check_eval_data(args)
    with hold_lock(out, env):
        check_run_config(out, args, env, items_digest(items) if items else None)
        run_stages(args, env, out, stages, cross)


@contextlib.contextmanager
def hold_lock(out: Path, env: Dist) -> Iterator[None]:
    """Rank 0 holds --out's lock (lock.py) for the whole run; every rank stops when it cannot."""
    error = None
    with contextlib.ExitStack() as stack:
        if env.main:
            try:
                stack.enter_context(lock.hold(out))
            except ValueError as e:
                error = e
        if distributed.all_reduce_sum([float(error is not None)], env)[0]:
            raise error or ValueError(f"--out {out} is in use by another run (rank 0 names it)")
        yield


def is_done(args: argparse.Namespace, out: Path, stage: int) -> bool:
    """Whether the stage's output is complete: a DONE file, and for stage 4 one written for the
    items evaluated now (a DONE without a digest predates it and counts as done)."""
    done = stage_dir(out, stage) / DONE
    if not done.is_file():
        return False
    if stage < 4:
        return True
    digest = files.read_json(done).get("items")
    return digest is None or digest == items_digest(eval_items(args)[1])


def run_stages(args: argparse.Namespace, env: Dist, out: Path, stages: list[int],
               cross: bool = False) -> None:
    """The stages asked for, in order; a stage with a DONE file is skipped. `cross`: the two
    vocabularies differ (stage 3 bridges them, cross_vocab.py)."""
    td = None
    for stage in stages:
        if is_done(args, out, stage):
            if env.main:
                print(f"stage {stage}: done ({stage_dir(out, stage)}), skipped")
            continue
        td = task_data(args, stage, env, cross) if stage < 4 else None
        summary = (stage_task(args, env, out, stage, td) if stage < 3 else
                   stage_compat(args, env, out, td, cross) if stage == 3 else
                   stage_eval(args, env, out))
        mark_done(out, stage, summary, env)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# BOS, one answer token and EOS: a shorter sequence trains on no answer at all.
MAX_LEN = cli.number(int, 3, hint=" (BOS, one answer token and EOS)")

TOKENS_HELP = (
    "Tokens: stage 1 reads --old's tokenizer, stages 2 and 3 --new's (the student's), stage 4 "
    "scores each model with its own. Where --old's tokenizer gives other ids for a training "
    "text (a BOS only one of them adds, another split), stage 3 feeds M1 its own ids and "
    "compares each student position with the M1 position that predicts the same token "
    "(longest matching blocks of the two id sequences); a student position without one (the "
    "first token after a BOS that only --new adds) follows M2.")


class ListPairs(argparse.Action):
    """--list-pairs: print the paper's model updates (pairs.py) and exit, like --version."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(pairs.table())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """Every hyper-parameter is a flag with the paper's default, shown by --help."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                epilog="@FILE reads flags from FILE (e.g. configs/toy-mc.args; '#' starts "
                                       "a comment); flags after it override the file's. " + TOKENS_HELP,
                                fromfile_prefix_chars="@")
    # A flags file holds several flags per line, with comments (argparse's default is one per line).
    p.convert_arg_line_to_args = lambda line: line.split("#", 1)[0].split()
    a = p.add_argument
    a("--old", required=True, help="base v1: registry name, local checkpoint dir or hub id")
    a("--new", required=True, help="base v2 (another vocabulary than --old needs --cross-vocab)")
    a("--task", required=True, help=f"one of {data.task_names()}")
    a("--data-dir", default=None, help="local copies of the task files; None: the pinned hub copies")
    a("--out", default=None, help="run directory; None: runs/<old>-<new>-<task>")
    a("--stage", default="all", choices=["1", "2", "3", "4", "all"],
      help="1: task adapter on --old, 2: on --new, 3: compatibility adapter, 4: evaluation")
    a("--overwrite", action="store_true", help="delete a different run in --out and start over")
    a("--list-pairs", action=ListPairs,
      help="print the paper's model updates (Table 8) and a 135M one by registry name, with hub "
           "repos, commits and whether each trains as is, then exit")
    g = p.add_argument_group("optimisation (paper appendix A.1)").add_argument
    g("--epochs", type=cli.POSITIVE_INT, default=10, help="passes over the 80%% training split")
    g("--lr", type=cli.POSITIVE_FLOAT, default=1e-4, help="AdamW peak learning rate")
    g("--warmup-steps", type=cli.NON_NEGATIVE_INT, default=500, help="linear warm-up, then cosine decay to 0")
    g("--weight-decay", type=cli.NON_NEGATIVE_FLOAT, default=0.0, help="AdamW weight decay")
    g("--grad-accum", type=cli.POSITIVE_INT, default=8, help="micro-batches per optimizer step")
    g("--batch-size", type=cli.POSITIVE_INT, default=8,
      help="sequences per micro-batch over all processes (split between ranks), so one "
           "optimizer step sees batch-size x grad-accum sequences on any number of GPUs")
    g("--max-grad-norm", type=cli.NON_NEGATIVE_FLOAT, default=1.0, help="0 disables clipping (not in the paper)")
    g("--seed", type=cli.NON_NEGATIVE_INT, default=0, help="split, shuffling, LoRA initialisation, dropout")
    g("--max-len", type=MAX_LEN, default=512, help="tokens per sequence; longer contexts are cut on the left")
    g = p.add_argument_group("LoRA and MUSCLE (paper sections 4.1, 5)").add_argument
    g("--rank", type=cli.POSITIVE_INT, default=128, help="LoRA rank, on every linear layer of the blocks")
    g("--alpha", type=cli.POSITIVE_FLOAT, default=256,
      help="scaling alpha/rank = 2; the paper's printed 156 lost its label, 2 x rank is the usual choice")
    g("--dropout", type=cli.number(float, 0, 1, high_open=True), default=0.0, help="LoRA dropout")
    g("--mask", default="student_correct", choices=sorted(muscle.MASKS),
      help="which teacher each token follows (muscle.MASKS; the paper's is student_correct)")
    g("--temperature", type=cli.POSITIVE_FLOAT, default=2.0, help="KL temperature (the loss carries T^2)")
    g("--ce-weight", type=cli.NON_NEGATIVE_FLOAT, default=0.0, help="weight of the auxiliary CE term (the paper's CE+)")
    g("--cross-vocab", default="off", choices=["off", *cross_vocab.CHOICES],
      help="when the old and new bases have two vocabularies: fill (M1's unmapped mass spread over "
           "the new-only tokens in M2's proportions), renorm (dropped, the rest rescaled), prefix "
           "(an old token the new vocabulary splits maps to its first piece, the rest as fill) or uld "
           "(sorted-probability L1 to M1's own distribution, no map); off "
           "refuses such pairs. One vocabulary ignores it and takes the paper's exact loss")
    g = p.add_argument_group("runs and resources").add_argument
    g("--limit-train", type=cli.number(int, 2, hint="; the 80/20 split needs 2 items or more, or leave the flag out"), default=None, help="use only the first N training items")
    g("--limit-eval", type=cli.LIMIT, default=None, help="evaluate only the first N test items")
    g("--max-steps", type=cli.number(int, 1, hint="; leave the flag out for no limit"), default=None, help="stop each training stage after N optimizer steps")
    g("--save-every", type=cli.NON_NEGATIVE_INT, default=200, help="checkpoint every N steps (and each epoch); 0: epochs only")
    g("--log-every", type=cli.POSITIVE_INT, default=10, help="optimizer steps between log.jsonl records")
    g("--grad-checkpointing", action="store_true", help="recompute transformer blocks in backward")
    g("--chunk-size", type=cli.POSITIVE_INT, default=CHUNK_SIZE,
      help="positions per chunk of logits in the losses (cross-entropy and MUSCLE)")
    g("--teachers", default="online", choices=["online", "store"],
      help="stage 3's teachers M1, M2. online: both run on every batch (the exact loss). store: "
           "one pass of each writes its top-k outputs to --teacher-store, then the student trains "
           "with no teacher in memory (KL over the top-k tokens plus one tail bucket)")
    g("--top-k", type=cli.POSITIVE_INT, default=128,
      help="with --teachers store: tokens per position kept of each teacher's distribution")
    g("--teacher-store", default=None,
      help="with --teachers store: the store's directory, reused by any run of the same teachers, "
           "data and tokenizer (e.g. runs that differ in --mask); None: --out/teacher_store")
    g("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
      help="base weights; auto: bf16 on GPU, fp32 on CPU (adapters always train in fp32)")
    g("--eval-batch-size", type=cli.POSITIVE_INT, default=8, help="items per forward in stage 4")
    g("--device", default="auto", choices=["auto", "cuda", "cpu"],
      help="auto: CUDA when torch sees a GPU (NCCL under torchrun), else the CPU (gloo)")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        run(args, distributed.setup(args.device))
        return 0
    except files.WriteFailed as e:  # every write is atomic: what was there stays whole
        return cli.fail(f"cannot write {e.path} ({e.reason}); finished stages, checkpoints and "
                        f"predictions are kept: {e.fix}, then rerun the same command to resume")
    except evaluation.USER_ERRORS as e:  # a wrong input: the message says what to fix
        return cli.fail(e)
    except KeyboardInterrupt:  # outside the training loop, which checkpoints first (Interrupted)
        return cli.interrupted("finished stages, checkpoints and predictions are kept: rerun the "
                               "same command to resume")
    except Diverged as e:
        return cli.fail(e, status=1)
    except Interrupted as e:
        cli.say(str(e))
        return 128 + e.signum
    finally:
        distributed.teardown()


if __name__ == "__main__":
    sys.exit(main())
