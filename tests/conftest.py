"""Shared test fixtures: the repository root on sys.path and the real data in ../shared/data."""
import os
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
