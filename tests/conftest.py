"""Shared fixtures: where the real data sets live; the environment of a test's child process; bad recipes."""
import os
import time
from pathlib import Path

import pytest

DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    d = DATA_ROOT / "mnist"
    if not (d / "t10k-labels-idx1-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found at {d}")
    return d


@pytest.fixture
def child_env():
    """``child_env(devices)``: this session's environment and XLA flags for a child JAX process on
    ``devices`` CPU devices, with the repository importable."""

    def make(devices: int = 1) -> dict:
        env = dict(os.environ)
        flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
        env.update(PYTHONPATH=str(Path(__file__).resolve().parents[1]), JAX_PLATFORMS="cpu",
                   XLA_FLAGS=" ".join(flags + [f"--xla_force_host_platform_device_count={devices}"]))
        return env

    return make


@pytest.fixture
def recipe_fails():
    """``fails(text, key, match)``: reading the recipe TOML ``text`` raises, in under a second, a
    ``RecipeError`` matching ``match`` that names ``key`` and a line; returns the error."""
    from jaxcompress.recipes.schema import RecipeError, parse_recipe

    def fails(text, key, match):
        t0 = time.perf_counter()
        with pytest.raises(RecipeError, match=match) as e:
            parse_recipe(text, source="r.toml")
        assert time.perf_counter() - t0 < 1.0
        assert e.value.key == key and e.value.line is not None
        return e.value

    return fails
