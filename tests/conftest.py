"""Shared fixtures: where the real data sets live."""
from pathlib import Path

import pytest

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = DATA_ROOT / "mnist"
    if not (d / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {d}")
    return d
