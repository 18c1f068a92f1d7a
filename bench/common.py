"""Shared helpers of the benchmark scripts: timing, peak memory, random checkpoints, RESULTS.md.

Every script measures our code and the reference stack in the same process (interleaved repeats
after a warm-up, medians), so the ratio holds on a noisy shared machine even when absolute
numbers drift. Peak memory is per process (the kernel's RSS high-water mark), so it is measured in a fresh
subprocess per side: torch's allocator is invisible to tracemalloc, and a process that already
ran the other side keeps its high-water mark.
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
CACHE = Path(os.environ.get("MUSCLE_BENCH_CACHE", "/tmp/muscle-bench"))  # random checkpoints, tokenizer
# Both sides get the same thread count. One by default: on the project's shared 2-core machines
# other jobs keep the load above 2, and with 2 threads every parallel op then waits for a
# descheduled thread (bench/RESULTS.md), which buries the comparison in scheduler noise. MUSCLE_BENCH_THREADS=2 on a quiet machine.
THREADS = int(os.environ.get("MUSCLE_BENCH_THREADS", "1"))


def setup(threads: int = THREADS) -> None:
    """Same thread count and seed for both sides; the repo root importable."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    torch.set_num_threads(threads)
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Wall-clock seconds of each repeat of one side."""

    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def spread(self) -> str:
        return f"{min(self.seconds):.3f}-{max(self.seconds):.3f} s"


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def interleave(sides: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1) -> dict[str, Timing]:
    """Run each side `warmup` times, then `repeats` rounds of one run per side, alternating which
    goes first, so slow phases of the shared machine hit both sides alike."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    timings = {name: Timing() for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            timings[name].seconds.append(timed(sides[name])[0])
    return timings


# ------------------------------------------------------------------------------------ peak memory
def rss_mib() -> float:
    """Current resident set size of this process (Linux /proc), MiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    """High-water resident set size (VmHWM) since the start or the last reset_peak(), MiB."""
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024


def reset_peak() -> None:
    """Restart the high-water mark at the current RSS (Linux: write 5 to clear_refs), so a phase
    (the training steps) is measured apart from an earlier spike (loading the checkpoint)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure_in_subprocess(script: Path, args: list[str], timeout: int = 600) -> dict[str, Any]:
    """Run `script args` in a fresh interpreter; it prints one JSON object as its last line."""
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True,
                         timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- random checkpoints
def save_random_hf_checkpoint(hf_config: dict[str, Any], path: Path, seed: int = 0) -> Path:
    """A randomly initialised transformers model saved with save_pretrained (safetensors), once.

    Both sides load the same file: ours through models.load_model, the reference through
    from_pretrained, so they start from identical weights.
    """
    if (path / "config.json").is_file():
        return path
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(**hf_config)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    return path


def load_reference(path: Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


# ------------------------------------------------------------------------------------ RESULTS.md
def machine() -> str:
    cpu = "unknown"
    if Path("/proc/cpuinfo").is_file():
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = match.group(1).strip() if match else cpu
    return (f"{time.strftime('%Y-%m-%d', time.gmtime())}, {os.cpu_count()} CPUs ({cpu}), "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}, load average {os.getloadavg()[0]:.1f} at the end "
            f"(the machine is shared: other processes slow both sides alike, see the interleaving)")


def write_section(key: str, title: str, body: str, path: Path = RESULTS) -> None:
    """Replace (or append) the section `key` of `path` (bench/RESULTS.md), leaving the others."""
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    section = f"{start}\n## {title}\n\n_{machine()}_\n\n{body.strip()}\n{end}"
    text = path.read_text() if path.is_file() else "# Benchmark results\n\nWritten by the scripts in bench/.\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    path.write_text(text.rstrip() + "\n")
    print(section)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------- a small LM with a real tokenizer
DATA = ROOT.parent / "shared" / "data"
# A small random Llama for scoring and generation. The model's vocabulary is Llama-1/2's size
# (32000) while the BPE tokenizer uses its first SMALL_LM_TOKENS ids, as real checkpoints often
# pad their vocabulary: the full-vocabulary softmax costs what it costs on the paper's models.
SMALL_LM = dict(model_type="llama", vocab_size=32000, hidden_size=512, intermediate_size=1408,
                num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=4,
                max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                bos_token_id=None, eos_token_id=None, pad_token_id=None)
SMALL_LM_TOKENS = 8192
EOS = "<|endoftext|>"


def _tokenizer_texts() -> list[str]:
    """PIQA train goals and solutions plus GSM8K train questions: the text the benchmarks score."""
    texts = []
    for line in (DATA / "piqa" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        texts += [r["goal"], r["sol1"], r["sol2"]]
    for line in (DATA / "gsm8k" / "train.jsonl").read_text().splitlines():
        r = json.loads(line)
        texts += [r["question"], r["answer"]]
    return texts


def save_bpe_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer.json (GPT-2 style: no BOS, EOS = <|endoftext|> at id 0) trained
    with the `tokenizers` library on the task text, plus the tokenizer_config.json both
    transformers and tokenizer.py read."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=SMALL_LM_TOKENS, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_tokenizer_texts(), trainer)
    tok.save(str(path / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
              "add_bos_token": False, "model_max_length": SMALL_LM["max_position_embeddings"]}
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def small_lm() -> Path:
    """The random small Llama checkpoint with its BPE tokenizer (built once under CACHE)."""
    path = CACHE / "small-lm"
    if not (path / "tokenizer.json").is_file():
        save_random_hf_checkpoint(SMALL_LM, path)
        save_bpe_tokenizer(path)
    return path


def reference_tokenizer(path: Path):
    import transformers

    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token=EOS,
                                                pad_token=EOS)
