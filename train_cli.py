"""train.py's command line: its flags with the paper's defaults, and the checks of a pair of bases.

Every hyper-parameter is a flag whose default is the paper's (appendix A.1) and shows in
--help; each numeric flag is range-checked when parsed (cli.py). Before anything trains, the
pair --old/--new is checked: MUSCLE's loss compares the two models' distributions token by
token (paper Eq. 1), so both must share one vocabulary unless --cross-vocab bridges them
(cross_vocab.py), and --max-len must fit both models' context.
"""
from __future__ import annotations

import argparse
from typing import Sequence

import cli
import cross_vocab
import data
import losses
import models
import muscle
import pairs
from distributed import Dist

# --help's first line: train.py's docstring's.
DESCRIPTION = ("The MUSCLE pipeline (paper sections 4-5): task adapters, the compatibility adapter, "
               "evaluation.")


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


def check_answers_fit(args: argparse.Namespace, items: Sequence, env: Dist) -> None:
    """Before stage 1: a sequence longer than --max-len is cut on the left, so an answer longer
    than --max-len less BOS and EOS loses its start and keeps no question. Under each base's
    tokenizer, none kept whole is an error and some a warning, with the smallest --max-len
    that keeps every answer whole."""
    pairs = [data.training_pair(args.task, it) for it in items]
    bases = {args.old: "--old"}
    bases.setdefault(args.new, "--new")  # one pass per base: --old == --new is read once
    for name, flag in bases.items():
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
    p = argparse.ArgumentParser(description=DESCRIPTION,
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
    g("--chunk-size", type=cli.POSITIVE_INT, default=losses.CHUNK_SIZE,
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
