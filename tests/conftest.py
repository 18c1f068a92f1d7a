"""Shared test fixtures: the repository root on sys.path, the real data in ../shared/data and a
real pretrained checkpoint."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread; with two, a busy 2-core CI machine spends its time
# waiting for descheduled threads at every parallel op.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA_DIR = Path(os.environ.get("MUSCLE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real task data; tests that need it skip with the reason when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real task data not found at {DATA_DIR} (set MUSCLE_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> tuple[str, str]:
    """Two tiny random Llama checkpoints (v1, v2) of one tokenizer, built once per session."""
    from tiny import make_checkpoint

    root = tmp_path_factory.mktemp("tiny")
    return str(make_checkpoint(root / "v1", seed=1)), str(make_checkpoint(root / "v2", seed=2))


SMOLLM2_TOOL = ROOT.parent / "shared" / "tools" / "make_smollm2.py"


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A real pretrained checkpoint: SmolLM2-135M-Instruct as a Hugging Face directory, built once
    by ../shared/tools/make_smollm2.py (one package download, then cached under $MUSCLE_CACHE or
    ~/.cache/muscle). Tests that need it skip with the reason when it cannot be built."""
    cache = Path(os.environ.get("MUSCLE_CACHE", Path.home() / ".cache" / "muscle"))
    out = cache / "smollm2-135m-instruct"
    if (out / "BUILD_INFO.json").is_file():
        return out
    if not SMOLLM2_TOOL.is_file():
        pytest.skip(f"SmolLM2-135M-Instruct is not built at {out} and its build tool "
                    f"{SMOLLM2_TOOL} is absent")
    build = subprocess.run([sys.executable, str(SMOLLM2_TOOL), "--out", str(out)],
                           capture_output=True, text=True)
    if build.returncode != 0 or not (out / "BUILD_INFO.json").is_file():
        last = (build.stderr or build.stdout).strip().splitlines()[-1:] or ["no output"]
        pytest.skip(f"SmolLM2-135M-Instruct could not be built at {out} by {SMOLLM2_TOOL} "
                    f"(needs transformers, gguf and the package index): {last[0]}")
    return out
