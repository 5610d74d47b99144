"""ERK, RigL/SET, the optax adapter (moment resets for any optimizer) and lottery-ticket rewinding."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.core import update_info
from jaxcompress.models import MLP
from jaxcompress.prune import (
    drop_and_grow,
    drop_fraction_at,
    erk_sparsities,
    one_shot_schedule,
    pruning,
    rigl,
    set_pruning,
    sparse_optimizer,
)
from jaxcompress.train import split_variables


def test_erk_matches_formula():
    shapes = {"conv": (3, 3, 16, 32), "fc1": (512, 256), "fc2": (256, 128), "head": (128, 10)}
    params = {k: {"kernel": jnp.zeros(s)} for k, s in shapes.items()}
    got = erk_sparsities(params, 0.9)
    # Independent float64 derivation: density_l = eps * sum(shape)/prod(shape), dense layers capped at 1.
    n = {k: float(np.prod(s)) for k, s in shapes.items()}
    raw = {k: sum(s) / np.prod(s) for k, s in shapes.items()}
    dense = set()
    while True:
        eps = (0.1 * sum(n.values()) - sum(n[k] for k in dense)) / sum(raw[k] * n[k] for k in shapes if k not in dense)
        over = [k for k in shapes if k not in dense and eps * raw[k] > 1]
        if not over:
            break
        dense |= set(over[:1]) if len(over) == 1 else {max(over, key=raw.get)}
    for k in shapes:
        want = 0.0 if k in dense else 1 - eps * raw[k]
        assert got[f"{k}/kernel"] == pytest.approx(want, abs=1e-12)
    kept = sum((1 - got[f"{k}/kernel"]) * n[k] for k in shapes)
    assert kept == pytest.approx(0.1 * sum(n.values()), rel=1e-12)
    assert got["head/kernel"] < got["fc2/kernel"] < got["fc1/kernel"]  # small layers stay denser


def test_erk_caps_dense_layers():
    params = {"big": {"kernel": jnp.zeros((1000, 1000))}, "tiny": {"kernel": jnp.zeros((4, 2))}}
    got = erk_sparsities(params, 0.5)
    assert got["tiny/kernel"] == 0.0
    assert got["big/kernel"] == pytest.approx(1 - (0.5 * 1_000_008 - 8) / 1_000_000)


def test_drop_fraction_cosine():
    assert float(drop_fraction_at(0, 0.3, 100)) == pytest.approx(0.3)
    assert float(drop_fraction_at(50, 0.3, 100)) == pytest.approx(0.15)
    assert float(drop_fraction_at(100, 0.3, 100)) == pytest.approx(0.0, abs=1e-7)


def test_drop_and_grow_golden():
    mask = jnp.array([True, True, True, False, False, False])
    w = jnp.array([5.0, 0.1, 3.0, 0.0, 0.0, 0.0])
    g = jnp.array([0.0, 0.0, 0.0, 0.2, 9.0, 1.0])
    new = drop_and_grow(mask, w, g, 2)  # drop 0.1 and 3.0, grow positions 4 and 5
    assert new.tolist() == [True, False, False, False, True, True]


def _mlp_setup(seed=0):
    module = MLP(features=(32,))
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(64, 6, 6, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 64), jnp.int32)
    params, _ = split_variables(module.init(jax.random.key(seed), x[:1]))
    return module, {"image": x, "label": y}, params


def _active_sets(masks):
    return {k: np.asarray(v["kernel"]).copy() for k, v in masks.items()}


@pytest.mark.parametrize("make", [rigl, set_pruning])
def test_rigl_set_keep_sparsity_while_active_set_changes(make):
    module, batch, params = _mlp_setup()
    pruner = make(0.8, end_step=30, update_every=5, drop_fraction=0.5, distribution="erk")
    opt = sparse_optimizer(optax.adam(1e-2), pruner)
    params = pruner.apply(params, pruner.init(params))
    state = jc.init_train_state(params, opt)
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), opt))
    first = _active_sets(state.opt_state.pruner.masks)
    counts = {k: int(v.sum()) for k, v in first.items()}
    changed = False
    for i in range(12):
        before = _active_sets(state.opt_state.pruner.masks)
        state, _ = step(state, batch)
        masks = state.opt_state.pruner.masks
        for k in counts:
            m = np.asarray(masks[k]["kernel"])
            assert int(m.sum()) == counts[k]  # constant per layer, so constant overall
            w = np.asarray(state.params[k]["kernel"])
            assert np.all(w[~m] == 0)  # sparsity holds after every update, no extra call
            grown = m & ~before[k]
            assert np.all(w[grown] == 0)  # grown weights start at zero
            changed |= bool(np.any(grown))
        if (i + 1) % 5 == 0:
            assert any(np.any(np.asarray(masks[k]["kernel"]) != before[k]) for k in counts)
    assert changed
    total = sum(np.prod(v.shape) for v in first.values())
    assert abs(sum(counts.values()) / total - 0.2) < 0.01


def test_rigl_grows_largest_dense_gradient():
    p = {"k": jnp.array([[4.0, 3.0, 0.0], [0.0, 0.0, 1.0]])}
    pruner = rigl(0.5, end_step=10, update_every=1, drop_fraction=1.0, distribution="uniform", seed=3)
    s = pruner.init(p)._replace(masks={"k": jnp.array([[True, True, False], [False, False, True]])})
    g = {"k": jnp.array([[0.0, 0.0, 7.0], [0.5, 0.1, 0.0]])}
    # f_1 = (1 + cos(pi/10)) / 2 = 0.976 -> floor(f * 3) = 2 swaps: drop |1| and |3|, grow 7.0 and 0.5
    s = pruner.update(p, s, update_info(1, g))
    assert np.asarray(s.masks["k"]).tolist() == [[True, False, True], [True, False, False]]


OPTIMIZERS = {
    "sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
    "adam": lambda: optax.adam(0.05),
    "adamw_chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(0.05, weight_decay=0.1)),
    "lion": lambda: optax.lion(0.01),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_adapter_resets_moments_of_grown_weights_for_any_optimizer(name):
    inner = OPTIMIZERS[name]()
    p = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(6, 8)), jnp.float32), "b": jnp.ones(8)}
    pruner = rigl(0.75, end_step=100, update_every=2, drop_fraction=0.5, distribution="uniform")
    opt = sparse_optimizer(inner, pruner)
    p = pruner.apply(p, pruner.init(p))
    s = opt.init(p)
    update = jax.jit(opt.update)
    rng = np.random.default_rng(1)
    for i in range(6):
        g = {"k": jnp.asarray(rng.normal(size=(6, 8)), jnp.float32), "b": jnp.asarray(rng.normal(size=8), jnp.float32)}
        old = np.asarray(s.pruner.masks["k"])
        u, s = update(g, s, p)
        p = optax.apply_updates(p, u)
        new = np.asarray(s.pruner.masks["k"])
        assert int(new.sum()) == 12 and np.all(np.asarray(p["k"])[~new] == 0)
        if i % 2 == 1:
            assert np.any(new != old)
        # every params-shaped leaf of the inner state is zero where a weight was not active throughout
        fresh = ~(new & old)
        leaves = {"k": [], "b": []}
        optax.tree_utils.tree_map_params(
            inner, lambda v, name: leaves[name].append(np.asarray(v)) or v, s.inner, {"k": "k", "b": "b"}
        )
        assert leaves["k"], "no params-shaped state found"
        for v in leaves["k"]:
            assert np.all(v[fresh] == 0)
        biases = leaves["b"]
        assert any(np.any(b != 0) for b in biases)  # dense leaves keep their moments


def test_adapter_with_magnitude_pruning_and_lottery_rewind():
    p0 = {"k": jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32), "b": jnp.zeros(4)}
    pruner = pruning(0.5, schedule=one_shot_schedule(3))  # prune once, at update 3
    opt = sparse_optimizer(optax.sgd(0.1), pruner, rewind_step=1)
    s = opt.init(p0)
    p = p0
    g = {"k": jnp.ones((5, 4)), "b": jnp.ones(4)}
    history = []
    for _ in range(3):
        u, s = opt.update(g, s, p)
        p = optax.apply_updates(p, u)
        history.append(p)
    mask = np.asarray(s.pruner.masks["k"])
    assert mask.sum() == 10
    # masks from the step-3 weights (before rewinding), survivors rewound to the step-1 weights
    step3 = np.asarray(p0["k"]) - 0.3
    np.testing.assert_array_equal(mask, np.asarray(jc.prune.magnitude_mask(jnp.abs(step3), 0.5)))
    np.testing.assert_allclose(np.asarray(p["k"]), np.where(mask, np.asarray(p0["k"]) - 0.1, 0.0), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(p["b"]), -0.1, rtol=1e-6)
    # afterwards masks are fixed and sparsity holds
    u, s = opt.update(g, s, p)
    p = optax.apply_updates(p, u)
    assert np.all(np.asarray(p["k"])[~mask] == 0)
    assert math.isclose(float(np.asarray(p["b"])[0]), -0.2, rel_tol=1e-6)


def test_adapter_errors():
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        sparse_optimizer("adam", pruning(0.5))
    with pytest.raises(TypeError, match="Transform"):
        sparse_optimizer(optax.adam(1e-3), optax.adam(1e-3))
    opt = sparse_optimizer(optax.adam(1e-3), pruning(0.5))
    s = opt.init({"k": jnp.ones((2, 2))})
    with pytest.raises(ValueError, match="needs params"):
        opt.update({"k": jnp.ones((2, 2))}, s)
    with pytest.raises(ValueError, match="needs UpdateInfo.grads"):
        t = rigl(0.5, end_step=5)
        t.update({"k": jnp.ones((2, 2))}, t.init({"k": jnp.ones((2, 2))}), update_info(1))
