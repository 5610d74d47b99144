"""ERK, RigL/SET through the train step and the optax adapter (same masks), moment resets, rewinding."""
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
from jaxcompress.train import TrainState, split_variables


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


def test_erk_rule_values_are_density_multipliers():
    """power=0 with multipliers: density proportional to the multiplier, capped at 1 (the demo's allocation)."""
    shapes = {"conv1": (3, 3, 1, 8), "conv2": (3, 3, 8, 16), "fc1": (784, 64), "head": (64, 10)}
    params = {k: {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[-1])} for k, s in shapes.items()}
    rules = [("^conv1/", 50.0), ("^conv2/", 2.0), ("^head/", 3.0), (".*", True)]
    got = erk_sparsities(params, 0.9, rules=rules, power=0.0)
    n = {k: math.prod(s) for k, s in shapes.items()}
    assert got["conv1/kernel"] == 0.0  # 50 x the base density exceeds 1: kept dense
    eps = (0.1 * sum(n.values()) - n["conv1"]) / (2 * n["conv2"] + n["fc1"] + 3 * n["head"])
    for k, m in (("conv2", 2.0), ("fc1", 1.0), ("head", 3.0)):
        assert got[f"{k}/kernel"] == pytest.approx(1 - eps * m, abs=1e-12)
    kept = sum((1 - got[f"{k}/kernel"]) * n[k] for k in shapes)
    assert kept == pytest.approx(0.1 * sum(n.values()), rel=1e-12)
    with pytest.raises(ValueError, match="ERK density multiplier"):
        erk_sparsities(params, 0.9, rules=[("^head/", -1.0), (".*", True)])


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


def _step_path(module, batch, params, pruner, steps):
    """RigL/SET as the step's transform; yields (masks, view) after every step."""
    opt = optax.sgd(0.05)
    state = jc.init_train_state(params, opt, transform=pruner)
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), opt, transform=pruner))
    yield state.compression_state.masks, pruner.apply(state.params, state.compression_state)
    for _ in range(steps):
        state, _ = step(state, batch)
        yield state.compression_state.masks, pruner.apply(state.params, state.compression_state), state


def _adapter_path(module, batch, params, pruner, steps):
    """The same pruner through sparse_optimizer (params kept sparse); yields (masks, params)."""
    opt = sparse_optimizer(optax.sgd(0.05), pruner)
    params = pruner.apply(params, pruner.init(params))
    # Built by hand: the step needs no compression state here (no transform).
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params), jc.identity().init(params), None, {},
                       jax.random.key(0))
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), opt))
    yield state.opt_state.pruner.masks, state.params
    for _ in range(steps):
        state, _ = step(state, batch)
        yield state.opt_state.pruner.masks, state.params


@pytest.mark.parametrize("make", [rigl, set_pruning])
def test_rigl_set_through_the_step_equal_the_adapter_path(make):
    module, batch, params = _mlp_setup()
    pruner = make(0.8, end_step=30, update_every=3, drop_fraction=0.5, distribution="erk", seed=4)
    steps = 12
    first = None
    changed_updates, stale_regrown = 0, 0
    for i, (a, b) in enumerate(zip(_step_path(module, batch, params, pruner, steps),
                                   _adapter_path(module, batch, params, pruner, steps))):
        masks, view = a[0], a[1]
        a_masks, a_params = b
        if first is None:
            first = {k: np.asarray(masks[k]["kernel"]) for k in masks}
            counts = {k: int(v.sum()) for k, v in first.items()}
            prev = first
        for k in counts:
            m = np.asarray(masks[k]["kernel"])
            np.testing.assert_array_equal(m, np.asarray(a_masks[k]["kernel"]), err_msg=f"step {i} {k}")
            np.testing.assert_allclose(np.asarray(view[k]["kernel"]), np.asarray(a_params[k]["kernel"]),
                                       rtol=1e-5, atol=1e-6, err_msg=f"step {i} {k}")
            np.testing.assert_allclose(np.asarray(view[k]["bias"]), np.asarray(a_params[k]["bias"]),
                                       rtol=1e-5, atol=1e-6)
            assert int(m.sum()) == counts[k]  # constant per layer, so constant overall
            v = np.asarray(view[k]["kernel"])
            assert np.all(v[~m] == 0)
            grown = m & ~prev[k]
            assert np.all(v[grown] == 0)  # grown weights start at zero in the view
            if i > 0 and grown.any():
                latent = np.asarray(a[2].params[k]["kernel"])
                stale_regrown += int(np.sum(latent[grown] != 0))  # without offsets the view would be stale
        if i > 0 and i % 3 == 0:
            changed_updates += any(np.any(np.asarray(masks[k]["kernel"]) != prev[k]) for k in counts)
        elif i > 0:
            assert all(np.array_equal(np.asarray(masks[k]["kernel"]), prev[k]) for k in counts)
        prev = {k: np.asarray(masks[k]["kernel"]) for k in masks}
    assert changed_updates == 4  # every mask update (steps 3, 6, 9, 12) swapped weights
    assert stale_regrown > 0
    total = sum(np.prod(v.shape) for v in first.values())
    assert abs(sum(counts.values()) / total - 0.2) < 0.01


def test_rigl_through_the_step_grows_by_dense_gradient_numpy():
    """One RigL update inside make_train_step against a float64 NumPy re-derivation."""
    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 6)).astype(np.float32)
    y = rng.normal(size=(16, 5)).astype(np.float32)
    w0 = rng.normal(size=(6, 5)).astype(np.float32)
    apply_fn = lambda p, ms, batch, *, train, rng: (batch["x"] @ p["w"], ms)  # noqa: E731
    loss_fn = lambda out, batch: jnp.sum((out - batch["y"]) ** 2, -1)  # noqa: E731
    lr, end_step, drop_fraction = 0.1, 10, 0.8
    pruner = rigl(0.6, end_step=end_step, update_every=1, drop_fraction=drop_fraction, distribution="uniform", seed=1)
    opt = optax.sgd(lr)
    state = jc.init_train_state({"w": jnp.asarray(w0)}, opt, transform=pruner)
    step = jax.jit(jc.make_train_step(apply_fn, opt, loss_fn=loss_fn, metrics_fn=None, transform=pruner))
    batch = {"x": jnp.asarray(x), "y": jnp.asarray(y)}
    mask = np.asarray(state.compression_state.masks["w"])
    latent = w0.astype(np.float64)
    offset = np.zeros_like(latent)
    for t in (1, 2):
        view = np.where(mask, latent - offset, 0.0)
        g = 2.0 * x.astype(np.float64).T @ (x @ view - y) / len(x)  # dense gradient at the view
        latent = latent - lr * g * mask
        w = latent - offset  # the weights the model sees where active
        k = math.floor(drop_fraction / 2 * (1 + math.cos(math.pi * t / end_step)) * mask.sum())
        assert k >= 2
        active = np.flatnonzero(mask)
        dropped = active[np.argsort(np.abs(w.ravel()[active]), kind="stable")[:k]]
        kept = mask.ravel().copy()
        kept[dropped] = False
        candidates = np.flatnonzero(~kept)
        grown = candidates[np.argsort(-np.abs(g.ravel()[candidates]), kind="stable")[:k]]
        new = kept.copy()
        new[grown] = True
        new = new.reshape(mask.shape)
        offset = np.where(new & ~mask, latent, offset)
        state, _ = step(state, batch)
        got = np.asarray(state.compression_state.masks["w"])
        np.testing.assert_array_equal(got, new, err_msg=f"update {t}")
        assert np.any(new & ~mask)  # something was grown ...
        assert not np.all(np.isin(grown, dropped))  # ... and not only the dropped weights back
        np.testing.assert_allclose(np.asarray(state.params["w"]), latent, rtol=1e-5, atol=1e-6)
        view = np.asarray(pruner.apply(state.params, state.compression_state)["w"])
        np.testing.assert_allclose(view, np.where(new, latent - offset, 0.0), rtol=1e-5, atol=1e-6)
        assert np.all(view[new & ~mask] == 0)
        mask = new


def test_rigl_set_describe_their_masks():
    p = {"a": {"kernel": jnp.ones((8, 8)), "bias": jnp.ones(8)}, "b": {"kernel": jnp.ones((8, 4))}}
    for make in (rigl, set_pruning):
        t = make(0.5, end_step=10, rules=[("^b/", None), (".*", True)])
        s = t.init(p)
        d = t.describe(p, s)
        assert list(d) == ["a/kernel"] and d["a/kernel"].structure == jc.prune.Unstructured()
        np.testing.assert_array_equal(d["a/kernel"].mask, s.masks["a"]["kernel"])


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


def test_adapter_with_pruning_and_lottery_rewind():
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
