"""Automatic compression under a byte budget: measured options, exact allocation, real file sizes."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.export import load
from jaxcompress.export.budget import (BudgetSensitivity, LayerOption, allocate_budget, budget_sensitivity,
                                       budget_transform, compressed_view, file_bytes)
from jaxcompress.export.artifact import save


def _random_sensitivity(rng, layers=3, options=6):
    opts = {}
    for k in range(layers):
        opts[f"l{k}/kernel"] = [LayerOption(0.1 * j, 4, int(rng.integers(100, 5000)), float(rng.uniform(0.5, 1.0)))
                                for j in range(options)]
    return BudgetSensitivity(1.0, 321, opts, {k: 1000 for k in opts})


def _brute(sens):
    names = list(sens.options)
    for combo in itertools.product(*(range(len(sens.options[n])) for n in names)):
        chosen = [sens.options[n][i] for n, i in zip(names, combo)]
        yield (sens.fixed_bytes + sum(o.nbytes for o in chosen), sum(sens.baseline - o.metric for o in chosen))


@pytest.mark.parametrize("seed", range(5))
def test_allocation_is_the_exact_knapsack_optimum(seed):
    rng = np.random.default_rng(seed)
    sens = _random_sensitivity(rng)
    everything = list(_brute(sens))
    sizes = sorted(b for b, _ in everything)
    for budget in [sizes[0], sizes[len(sizes) // 7], sizes[len(sizes) // 2], sizes[-1] + 10]:
        choice = allocate_budget(sens, budget_bytes=int(budget))
        got_bytes = sens.fixed_bytes + sum(o.nbytes for o in choice.values())
        got_loss = sum(sens.baseline - o.metric for o in choice.values())
        best = min(loss for b, loss in everything if b <= budget)
        assert got_bytes <= budget
        assert got_loss == pytest.approx(best, abs=1e-12)
    for drop in [0.2, 0.6, 1.0]:
        feasible = [(b, loss) for b, loss in everything if loss <= drop]
        if not feasible:
            with pytest.raises(ValueError, match="max_drop"):
                allocate_budget(sens, max_drop=drop)
            continue
        choice = allocate_budget(sens, max_drop=drop)
        got_bytes = sens.fixed_bytes + sum(o.nbytes for o in choice.values())
        assert got_bytes == min(b for b, _ in feasible)
        assert sum(sens.baseline - o.metric for o in choice.values()) <= drop + 1e-12


def test_allocation_refuses_bad_limits():
    sens = _random_sensitivity(np.random.default_rng(0))
    smallest = min(b for b, _ in _brute(sens))
    with pytest.raises(ValueError, match="exactly one of budget_bytes"):
        allocate_budget(sens)
    with pytest.raises(ValueError, match="exactly one of budget_bytes"):
        allocate_budget(sens, budget_bytes=10_000, max_drop=0.1)
    with pytest.raises(ValueError, match=f"smallest reachable file size {smallest:,}"):
        allocate_budget(sens, budget_bytes=smallest - 1)
    with pytest.raises(ValueError, match="positive integer"):
        allocate_budget(sens, budget_bytes=1.5e4)
    with pytest.raises(ValueError, match="max_drop must be"):
        allocate_budget(sens, max_drop=-0.1)


def _mlp():
    k = jax.random.split(jax.random.key(0), 4)
    params = {"fc1": {"kernel": jax.random.normal(k[0], (32, 48)), "bias": 0.1 * jnp.ones(48)},
              "fc2": {"kernel": jax.random.normal(k[1], (48, 10)), "bias": jnp.zeros(10)}}
    x = jax.random.normal(k[2], (64, 32))

    def forward(p):
        return jax.nn.relu(x @ p["fc1"]["kernel"] + p["fc1"]["bias"]) @ p["fc2"]["kernel"] + p["fc2"]["bias"]

    reference = forward(params)

    def score(p):
        return -float(jnp.mean((forward(p) - reference) ** 2))

    return params, score


def _numpy_option(w, sparsity, bits):
    """Magnitude pruning then a narrow symmetric per-output-channel grid, in float64."""
    w = np.asarray(w, np.float64)
    n_remove = int(round(sparsity * w.size))
    order = np.argsort(np.abs(w).ravel(), kind="stable")
    keep = np.ones(w.size, bool)
    keep[order[:n_remove]] = False
    kept = np.where(keep.reshape(w.shape), w, 0.0)
    top = 2 ** (bits - 1) - 1
    scale = np.max(np.abs(kept), axis=0, keepdims=True) / top
    return np.clip(np.round(kept / scale), -top, top) * scale, keep.reshape(w.shape)


def test_options_are_measured_on_the_layer_compressed_alone():
    params, score = _mlp()
    sens = budget_sensitivity(params, score, sparsities=(0.0, 0.5, 0.8), bits=(3, 8))
    assert list(sens.options) == ["fc1/kernel", "fc2/kernel"] and sens.sizes == {"fc1/kernel": 1536, "fc2/kernel": 480}
    assert sens.baseline == 0.0
    for name, opts in sens.options.items():
        assert [(o.sparsity, o.bits) for o in opts] == [(0.0, 3), (0.0, 8), (0.5, 3), (0.5, 8), (0.8, 3), (0.8, 8)]
        layer = name.split("/")[0]
        for o in opts:
            expected, keep = _numpy_option(params[layer]["kernel"], o.sparsity, o.bits)
            changed = jax.tree.map(lambda v: v, params)
            changed[layer] = {**params[layer], "kernel": jnp.asarray(expected, jnp.float32)}
            assert o.metric == pytest.approx(score(changed), rel=1e-4, abs=1e-7)
        # fewer bits and more zeros cost fewer bytes
        by = {(o.sparsity, o.bits): o.nbytes for o in opts}
        assert by[(0.0, 3)] < by[(0.0, 8)] and by[(0.8, 8)] < by[(0.5, 8)] < by[(0.0, 8)]
    view, desc = compressed_view(params, budget_transform(params, {"fc1/kernel": LayerOption(0.5, 3, 0, 0.0)}))
    expected, keep = _numpy_option(params["fc1"]["kernel"], 0.5, 3)
    np.testing.assert_allclose(np.asarray(view["fc1"]["kernel"]), expected, rtol=1e-6, atol=1e-7)
    assert np.array_equal(np.asarray(view["fc2"]["kernel"]), np.asarray(params["fc2"]["kernel"]))  # not named: float
    assert set(desc) >= {"fc1/kernel"} and desc["fc1/kernel"].bits == 3


def test_predicted_file_size_matches_the_saved_file(tmp_path):
    params, score = _mlp()
    sens = budget_sensitivity(params, score, sparsities=(0.0, 0.5, 0.9), bits=(2, 4, 8))
    for budget_frac in (0.3, 0.5, 0.8):
        dense = file_bytes(params, None)
        choice = allocate_budget(sens, budget_bytes=int(budget_frac * dense))
        predicted = sens.fixed_bytes + sum(o.nbytes for o in choice.values())
        view, desc = compressed_view(params, budget_transform(params, choice))
        saved = save(tmp_path / "m.npz", view, desc)
        assert abs(saved.file_bytes - predicted) <= 0.02 * predicted
        loaded, _ = load(saved.path, like=view)
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(view)))
        assert score(view) == pytest.approx(score(loaded))


def test_sensitivity_refuses_bad_grids():
    params, score = _mlp()
    with pytest.raises(ValueError, match="bits must be"):
        budget_sensitivity(params, score, bits=(1, 4))
    with pytest.raises(ValueError, match="sparsities entry"):
        budget_sensitivity(params, score, sparsities=(0.5, 1.2))
    with pytest.raises(ValueError, match="select no leaf"):
        budget_sensitivity(params, score, rules=[("nothing", True), (".*", None)])
    with pytest.raises(ValueError, match="not leaves of params"):
        budget_transform(params, {"fc9/kernel": LayerOption(0.5, 4, 0, 0.0)})
