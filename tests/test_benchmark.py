"""The benchmark harness: interleaving, the A/A control, intervals, verdicts, cost analysis."""
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.benchmark import CONTROL, _interval, compare, cost_analysis, verdict


def test_compare_measures_a_known_ratio_and_an_aa_control():
    # 4x; sleeps overshoot by up to a few ms on a loaded machine, so they are long enough for
    # that overshoot to keep the ratio above 2
    slow = lambda: time.sleep(0.016)  # noqa: E731
    fast = lambda: time.sleep(0.004)  # noqa: E731
    r = compare({"base": fast, "slow": slow}, baseline="base", blocks=8, calls=2, warmup=1)
    assert set(r["seconds"]) == {"base", "slow", CONTROL}
    assert all(len(v) == 8 for v in r["seconds"].values())
    # every block runs every program once, in a shuffled order
    assert all(sorted(o) == sorted(["base", "slow", CONTROL]) for o in r["order"])
    assert len({tuple(o) for o in r["order"]}) > 1
    slow_r = r["ratios"]["slow"]
    assert 2.0 < slow_r["low"] <= slow_r["ratio"] <= slow_r["high"] < 8.0
    assert verdict(slow_r, 1.0) == "misses"
    aa = r["ratios"][CONTROL]
    assert aa["low"] <= aa["ratio"] <= aa["high"] and 0.5 < aa["ratio"] < 2.0


def test_interval_is_the_bootstrap_of_the_ratio_of_medians():
    a, b = np.array([2.0, 2.0, 2.0, 2.0]), np.array([1.0, 1.0, 1.0, 1.0])
    assert _interval(a, b, np.random.default_rng(0), 100, 0.95) == (2.0, 2.0, 2.0)
    a = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    r, lo, hi = _interval(a, np.ones(5), np.random.default_rng(0), 4000, 0.9)
    assert r == 3.0 and 1.0 <= lo < 3.0 < hi <= 5.0


def test_verdict_and_errors():
    assert verdict({"ratio": 1.2, "low": 1.1, "high": 1.3}, 1.05) == "misses"
    assert verdict({"ratio": 1.2, "low": 1.1, "high": 1.3}, 1.05, lower_is_better=False) == "meets"
    with pytest.raises(ValueError, match="baseline 'x'"):
        compare({"a": lambda: 0}, baseline="x")
    with pytest.raises(ValueError, match="reserved"):
        compare({"a": lambda: 0, CONTROL: lambda: 0}, baseline="a")
    with pytest.raises(ValueError, match="blocks"):
        compare({"a": lambda: 0}, baseline="a", blocks=0)


def test_cost_analysis_counts_matmul_flops():
    c = cost_analysis(lambda a, b: a @ b, jnp.ones((16, 8)), jnp.ones((8, 4)))
    assert c["flops"] == 2 * 16 * 8 * 4
    assert c["bytes_accessed"] >= 4 * (16 * 8 + 8 * 4 + 16 * 4)
