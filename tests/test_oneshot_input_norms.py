"""experiments/oneshot_input_norms.py: the spread of a layer's input norms, from its sums of squares."""
import doctest
import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "oneshot_input_norms.py"


def _module():
    spec = importlib.util.spec_from_file_location("oneshot_input_norms", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_norm_spread_is_max_and_99th_percentile_over_the_median_norm():
    m = _module()
    assert doctest.testmod(m).failed == 0
    x = np.random.default_rng(0).normal(size=(1000, 64))
    x[:, 5] *= 30.0  # one outlier feature
    got = m.norm_spread((x**2).sum(axis=0))
    norms = np.linalg.norm(x, axis=0)
    assert got["inputs"] == 64
    assert got["max_over_median"] == round(norms.max() / np.median(norms), 3) and got["max_over_median"] > 25
    even = m.norm_spread((np.random.default_rng(1).normal(size=(1000, 64)) ** 2).sum(axis=0))
    assert even["max_over_median"] < 1.2  # features of one scale: no spread
