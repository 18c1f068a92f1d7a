"""Tiny shared pieces of the tests: random Llama checkpoints with a byte-level BPE tokenizer, the
flags of a short pipeline run, and a 3-parameter problem for `trainer.fit`."""
import json
import math
import os
import signal
from pathlib import Path

import torch

import trainer
from fake_hub import write_tiny_llama

ROOT = Path(__file__).resolve().parent.parent
# Tiny models: one thread, so that a busy 2-core machine does not wait for descheduled threads.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}
CORPUS = ["the quick brown fox jumps over the lazy dog", "to open a jar, twist the lid",
          "use a towel to dry the dishes", "Goal: clean a shoe. Solution: brush it"] * 20


def make_tokenizer(directory: Path, vocab_size: int = 300, corpus=CORPUS) -> None:
    """A tiny byte-level BPE tokenizer.json with <s>, </s> (Llama-style: BOS added)."""
    from tokenizers import Tokenizer, decoders, models as tok_models, pre_tokenizers, trainers

    tok = Tokenizer(tok_models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))


def make_checkpoint(directory: Path, seed: int, vocab_size: int = 300, corpus=CORPUS) -> Path:
    """A 2-layer, hidden-32 random Llama (GQA) with the tiny tokenizer, as a HF checkpoint dir."""
    make_tokenizer(directory, vocab_size, corpus)
    return write_tiny_llama(directory, seed, vocab_size)


def tiny_flags(old, new, data_dir, out, *extra) -> list[str]:
    """A few seconds of the whole pipeline: 25 PIQA items (20 train / 5 val: the last validation
    batch has one row, the last step one micro-batch), 8 test items."""
    return ["--old", old, "--new", new, "--task", "piqa", "--data-dir", str(data_dir),
            "--out", str(out), "--limit-train", "25", "--limit-eval", "8", "--epochs", "2",
            "--batch-size", "4", "--grad-accum", "2", "--rank", "4", "--alpha", "8",
            "--max-len", "48", "--warmup-steps", "2", "--log-every", "1", "--chunk-size", "16",
            *extra]


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def quadratic_problem(nan_at=None, signal_at=None):
    """A 3-parameter least-squares problem for fit, with an optional NaN or SIGTERM at a call.

    Batches are (x, y) with y = x . [1, -2, 0.5]; the weights start at 0."""
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    target = torch.tensor([[1.0, -2.0, 0.5]])
    calls = {"n": 0}

    def loss_fn(batch):
        x, y = batch
        calls["n"] += 1
        if calls["n"] == signal_at:
            os.kill(os.getpid(), signal.SIGTERM)
        loss = ((model(x) - y) ** 2).sum()
        return (loss * math.nan if calls["n"] == nan_at else loss), x.shape[0]

    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, generator=g) for _ in range(6)]
    data = [(x, x @ target.T) for x in xs]
    return model, loss_fn, (lambda epoch: data), data[:2]


FIT = trainer.FitConfig(epochs=2, lr=0.1, warmup_steps=1, grad_accum=2, save_every=1, log_every=1)
