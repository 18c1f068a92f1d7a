"""Shared test fixtures: the repository root on sys.path and the real data in ../shared/data."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

DATA_DIR = Path(os.environ.get("MUSCLE_DATA_DIR", ROOT.parent / "shared" / "data"))


@pytest.fixture
def data_dir() -> Path:
    """The real task data; tests that need it skip with the reason when it is absent."""
    if not DATA_DIR.is_dir():
        pytest.skip(f"real task data not found at {DATA_DIR} (set MUSCLE_DATA_DIR)")
    return DATA_DIR
