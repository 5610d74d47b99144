"""Pruning: exact-count magnitude masks, the Zhu & Gupta schedule and magnitude pruning with `pruning`."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core import update_info
from jaxcompress.core.rules import is_none
from jaxcompress.prune import (
    PruneState,
    apply_masks,
    fixed_masks,
    magnitude_mask,
    one_shot_schedule,
    polynomial_schedule,
    pruning,
    sparsity_report,
)

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def _reference_mask(scores, sparsity):
    """Independent NumPy reference: prune the round(s*n) lowest scores, earlier position first on ties."""
    flat = np.asarray(scores, np.float64).ravel()
    n = flat.size
    k = round(sparsity * n)  # Python float64 round, half to even (torch's rule)
    order = np.lexsort((np.arange(n), flat))  # by score, then by position
    keep = np.ones(n, bool)
    keep[order[:k]] = False
    return keep.reshape(np.shape(scores))


def _params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "conv": {"kernel": f(3, 3, 2, 4), "bias": f(4)},  # 72
        "dense": {"kernel": f(10, 12), "bias": f(12)},  # 120
        "head": {"kernel": f(12, 7), "bias": f(7)},  # 84
    }


def _zeros(x):
    return int(np.sum(np.asarray(x) == 0))


# ---------------------------------------------------------------------------------------------
# magnitude_mask
# ---------------------------------------------------------------------------------------------


def test_magnitude_mask_golden():
    m = magnitude_mask(jnp.array([0.3, 0.1, 2.0, 0.05, 0.7, 0.2]), 0.5)
    assert m.tolist() == [True, False, True, False, True, False]
    # ties broken by position: the first of the equal scores go first
    m = magnitude_mask(jnp.array([[1.0, 1.0, 1.0], [1.0, 0.5, 1.0]]), 0.5)
    assert m.tolist() == [[False, False, True], [True, False, True]]
    # round half to even: 0.25 * 10 = 2.5 -> 2, 0.35 * 10 = 3.5 -> 4
    scores = jnp.arange(10.0)
    assert int(jnp.sum(~magnitude_mask(scores, 0.25))) == 2
    assert int(jnp.sum(~magnitude_mask(scores, 0.35))) == 4
    assert magnitude_mask(scores, 0.0).all()


_jit_magnitude_mask = jax.jit(magnitude_mask, static_argnums=1)


@SETTINGS
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3).map(tuple),
    sparsity=st.floats(0.0, 0.999, allow_nan=False),
    seed=st.integers(0, 2**16),
    tie_levels=st.sampled_from([None, 1, 3]),
)
def test_magnitude_mask_exact_count_smallest_removed_ties_by_position(shape, sparsity, seed, tie_levels):
    rng = np.random.default_rng(seed)
    if tie_levels is None:
        scores = np.abs(rng.normal(size=shape)).astype(np.float32)
    else:  # many exactly equal scores
        scores = rng.integers(0, tie_levels + 1, size=shape).astype(np.float32)
    # jitted, as the transforms call it (one compile per shape, ~6x cheaper than op-by-op dispatch);
    # the eager path is covered by test_magnitude_mask_golden
    keep = np.asarray(_jit_magnitude_mask(jnp.asarray(scores), sparsity))
    n = scores.size
    assert keep.shape == shape and keep.dtype == bool
    assert int((~keep).sum()) == round(sparsity * n)
    if (~keep).any() and keep.any():
        assert scores[~keep].max() <= scores[keep].min()
    np.testing.assert_array_equal(keep, _reference_mask(scores, sparsity))


@pytest.mark.parametrize(
    "shape,amount",
    [((20,), 0.3), ((8, 16), 0.5), ((16, 8), 0.9), ((3, 3, 4, 5), 0.75), ((7, 11), 0.2), ((5, 5, 5), 0.61)],
)
def test_magnitude_mask_matches_torch_l1_unstructured(shape, amount):
    torch = pytest.importorskip("torch")
    prune = pytest.importorskip("torch.nn.utils.prune")
    rng = np.random.default_rng(hash(shape) % 2**32)
    w = rng.normal(size=shape).astype(np.float32)
    assert np.unique(np.abs(w)).size == w.size  # no ties

    module = torch.nn.Module()
    module.w = torch.nn.Parameter(torch.tensor(w))
    prune.l1_unstructured(module, "w", amount=amount)
    torch_keep = module.w_mask.numpy().astype(bool)

    keep = np.asarray(magnitude_mask(jnp.abs(jnp.asarray(w)), amount))
    assert int((~torch_keep).sum()) == round(amount * w.size)
    np.testing.assert_array_equal(keep, torch_keep)


# Library bug: num_pruned computes round(float32(s) * n) in float32, which differs from
# Python's float64 round(s * n) (the documented rule, and torch's) when s*n is near k + 0.5.
# 0.07 * 150 = 10.500000000000002 -> torch prunes 11; float32(0.07) * 150 = 10.4999... -> 10.
@pytest.mark.parametrize("sparsity,n", [(0.07, 150), (0.14, 75), (0.09, 650), (0.13, 950)])
def test_num_pruned_matches_python_round_near_half(sparsity, n):
    scores = jnp.asarray(np.random.default_rng(n).permutation(n).astype(np.float32) + 1.0)
    keep = magnitude_mask(scores, sparsity)
    assert int(jnp.sum(~keep)) == round(sparsity * n)


def test_pruning_matches_torch_at_half_boundary():
    torch = pytest.importorskip("torch")
    prune = pytest.importorskip("torch.nn.utils.prune")
    w = np.random.default_rng(7).normal(size=(10, 15)).astype(np.float32)
    lin = torch.nn.Linear(15, 10, bias=False)
    lin.weight.data = torch.tensor(w.T.copy())  # torch (out, in) = our kernel transposed
    prune.l1_unstructured(lin, "weight", amount=0.07)
    assert int((lin.weight_mask == 0).sum()) == 11
    t = pruning(0.07)
    p = {"kernel": jnp.asarray(w)}
    mask = np.asarray(t.init(p).masks["kernel"])
    np.testing.assert_array_equal(mask, lin.weight_mask.numpy().T.astype(bool))


def test_magnitude_mask_invalid_sparsity():
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_mask(jnp.ones(4), 1.0)
    with pytest.raises(ValueError, match="sparsity must be in"):
        magnitude_mask(jnp.ones(4), -0.5)


def test_magnitude_mask_traced_sparsity_under_jit():
    scores = jnp.asarray(np.random.default_rng(3).permutation(40).astype(np.float32))
    f = jax.jit(magnitude_mask)
    for s in (0.0, 0.25, 0.5, 0.9):
        np.testing.assert_array_equal(f(scores, s), _reference_mask(scores, s))


# ---------------------------------------------------------------------------------------------
# pruning (magnitude, layer-wise): one-shot
# ---------------------------------------------------------------------------------------------


def test_one_shot_per_layer_exact_sparsity_biases_untouched():
    p = _params(0)
    t = pruning(0.6)
    s = t.init(p)
    assert int(s.count) == 0
    view = t.apply(p, s)
    for name, n in (("conv", 72), ("dense", 120), ("head", 84)):
        k = np.asarray(p[name]["kernel"])
        assert _zeros(view[name]["kernel"]) == round(0.6 * n)
        np.testing.assert_array_equal(s.masks[name]["kernel"], _reference_mask(np.abs(k), 0.6))
        np.testing.assert_array_equal(view[name]["kernel"], k * _reference_mask(np.abs(k), 0.6))
        np.testing.assert_array_equal(view[name]["bias"], p[name]["bias"])
        assert s.masks[name]["bias"] is None
    # each layer on its own (layer-wise, not global): the 60% smallest in every kernel
    rows, total = sparsity_report(view, s.masks)
    assert {r.path: r.sparsity for r in rows} == pytest.approx(
        {"conv/kernel": 43 / 72, "dense/kernel": 72 / 120, "head/kernel": 50 / 84}, abs=1e-7
    )
    assert total.zeros == 43 + 72 + 50
    # the mask is fixed after init: updates with new weights do not change it
    p2 = jax.tree.map(lambda x: -x * 3.0 + 1.0, p)
    s2 = t.update(p2, s, update_info(1))
    assert int(s2.count) == 1
    for a, b in zip(jax.tree.leaves(s.masks), jax.tree.leaves(s2.masks)):
        np.testing.assert_array_equal(a, b)


def test_per_rule_float_sparsity_overrides():
    p = _params(1)
    t = pruning(0.5, rules=[("^head/", 0.25), ("^conv/", None), ("kernel", True)])
    s = t.init(p)
    view = t.apply(p, s)
    assert _zeros(view["head"]["kernel"]) == 21  # round(0.25 * 84)
    assert _zeros(view["dense"]["kernel"]) == 60  # round(0.5 * 120)
    assert _zeros(view["conv"]["kernel"]) == 0
    assert s.masks["conv"]["kernel"] is None
    with pytest.raises(ValueError, match="per-rule sparsity must be in"):
        pruning(0.5, rules=[("head", 1.5)]).init(p)


def test_gradient_of_view_is_the_mask():
    p = _params(2)
    t = pruning(0.7)
    s = t.init(p)
    grads = jax.grad(lambda q: sum(jnp.sum(x) for x in jax.tree.leaves(t.apply(q, s))))(p)
    for name in ("conv", "dense", "head"):
        np.testing.assert_array_equal(grads[name]["kernel"], np.asarray(s.masks[name]["kernel"], np.float32))
        np.testing.assert_array_equal(grads[name]["bias"], np.ones_like(p[name]["bias"]))
    # pruned latent weights get exactly zero gradient even through a nonlinear loss
    g = jax.grad(lambda q: jnp.sum(jnp.sin(t.apply(q, s)["dense"]["kernel"]) ** 2))(p)
    assert np.all(np.asarray(g["dense"]["kernel"])[~np.asarray(s.masks["dense"]["kernel"])] == 0.0)


# ---------------------------------------------------------------------------------------------
# schedules
# ---------------------------------------------------------------------------------------------


def _zhu_gupta(t, s_i, s_f, t0, t_end, power=3.0):
    if t < t0:
        return 0.0
    if t >= t_end:
        return s_f
    return s_f + (s_i - s_f) * (1.0 - (t - t0) / (t_end - t0)) ** power


@pytest.mark.parametrize(
    "step,expected",
    [
        (0, 0.0),  # before begin
        (99, 0.0),
        (100, 0.1),  # at begin: s_i
        (200, 0.8 + (0.1 - 0.8) * (1 - 100 / 1000) ** 3),
        (600, 0.8 + (0.1 - 0.8) * 0.5**3),  # middle: 0.7125
        (1000, 0.8 + (0.1 - 0.8) * 0.1**3),
        (1100, 0.8),  # end
        (5000, 0.8),  # after end
    ],
)
def test_polynomial_schedule_formula(step, expected):
    sched = polynomial_schedule(begin_step=100, end_step=1100, frequency=50, initial_sparsity=0.1)
    assert expected == pytest.approx(_zhu_gupta(step, 0.1, 0.8, 100, 1100))
    np.testing.assert_allclose(float(sched.sparsity(step, 0.8)), expected, rtol=1e-6, atol=1e-7)


def test_polynomial_schedule_golden_middle_and_power():
    sched = polynomial_schedule(begin_step=100, end_step=1100, frequency=50, initial_sparsity=0.1)
    np.testing.assert_allclose(float(sched.sparsity(600, 0.8)), 0.7125, rtol=1e-6)
    lin = polynomial_schedule(begin_step=0, end_step=10, frequency=1, power=1.0)
    np.testing.assert_allclose([float(lin.sparsity(t, 0.5)) for t in range(0, 12, 2)],
                               [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], atol=1e-7)


def test_is_update_step():
    sched = polynomial_schedule(begin_step=10, end_step=45, frequency=10)
    got = [t for t in range(0, 80) if bool(sched.is_update_step(t))]
    assert got == [10, 20, 30, 40, 45]
    sched = polynomial_schedule(begin_step=0, end_step=40, frequency=10)
    assert [t for t in range(0, 60) if bool(sched.is_update_step(t))] == [0, 10, 20, 30, 40]
    one = one_shot_schedule(7)
    assert [t for t in range(0, 20) if bool(one.is_update_step(t))] == [7]
    assert float(one.sparsity(6, 0.9)) == 0.0
    np.testing.assert_allclose(float(one.sparsity(7, 0.9)), 0.9, rtol=1e-7)


def test_schedule_errors():
    with pytest.raises(ValueError, match=r"end_step \(5\) must be >= begin_step \(10\)"):
        polynomial_schedule(begin_step=10, end_step=5)
    with pytest.raises(ValueError, match="frequency must be >= 1"):
        polynomial_schedule(end_step=10, frequency=0)
    with pytest.raises(TypeError, match="frequency must be an int"):
        polynomial_schedule(end_step=10, frequency=2.5)
    with pytest.raises(ValueError, match="initial_sparsity must be in"):
        polynomial_schedule(end_step=10, initial_sparsity=1.0)
    with pytest.raises(ValueError, match="power must be > 0"):
        polynomial_schedule(end_step=10, power=0.0)
    with pytest.raises(ValueError, match="begin_step must be >= 0"):
        polynomial_schedule(begin_step=-1, end_step=10)


@pytest.mark.parametrize("bad,exc", [(1.0, ValueError), (1.5, ValueError), (-0.1, ValueError),
                                     ("0.5", TypeError), (None, TypeError), (True, TypeError)])
def test_sparsity_errors_name_argument(bad, exc):
    with pytest.raises(exc, match="^sparsity must be"):
        pruning(bad)


def test_schedule_type_error():
    with pytest.raises(TypeError, match=r"schedule must come from polynomial_schedule\(...\)"):
        pruning(0.5, schedule={"end_step": 10})


# ---------------------------------------------------------------------------------------------
# pruning (magnitude, layer-wise): gradual
# ---------------------------------------------------------------------------------------------


def test_gradual_pruning_step_by_step_matches_schedule_and_is_monotone():
    s_i, s_f, t0, t_end, freq = 0.1, 0.8, 2, 12, 3
    sched = polynomial_schedule(begin_step=t0, end_step=t_end, frequency=freq, initial_sparsity=s_i)
    update_steps = {2, 5, 8, 11, 12}
    sizes = {"conv": 72, "dense": 120, "head": 84}
    # precondition: no target count sits near a rounding boundary (float32 vs float64)
    for t in update_steps:
        for n in sizes.values():
            frac = (_zhu_gupta(t, s_i, s_f, t0, t_end) * n) % 1.0
            assert abs(frac - 0.5) > 1e-3

    tr = pruning(s_f, schedule=sched)
    update = jax.jit(tr.update)  # one compile for all steps (eager == jit: test_gradual_update_under_jit_matches_eager)
    rng = np.random.default_rng(11)
    params = _params(3)
    state = tr.init(params)
    ref = {k: np.ones(n, bool).reshape(np.shape(params[k]["kernel"])) for k, n in sizes.items()}
    for k in sizes:
        np.testing.assert_array_equal(state.masks[k]["kernel"], ref[k])
    for step in range(1, 16):
        params = jax.tree.map(
            lambda x: x + jnp.asarray(rng.normal(scale=0.3, size=x.shape), jnp.float32), params
        )
        prev = state
        state = update(params, state, update_info(step))
        assert int(state.count) == step
        target = _zhu_gupta(step, s_i, s_f, t0, t_end)
        for k, n in sizes.items():
            m, m_prev = np.asarray(state.masks[k]["kernel"]), np.asarray(prev.masks[k]["kernel"])
            if step in update_steps:
                # independent reference: prune from |w| * previous mask
                w = np.abs(np.asarray(params[k]["kernel"])) * ref[k]
                ref[k] = _reference_mask(w, target)
                assert int((~m).sum()) == round(target * n), (step, k)
            else:
                np.testing.assert_array_equal(m, m_prev)  # masks change only on update steps
            np.testing.assert_array_equal(m, ref[k])
            assert not np.any(m & ~m_prev)  # monotone: a pruned weight never comes back
            view = tr.apply(params, state)
            assert _zeros(view[k]["kernel"]) == int((~m).sum())
            np.testing.assert_array_equal(view[k]["bias"], params[k]["bias"])
    assert {k: int((~np.asarray(state.masks[k]["kernel"])).sum()) for k in sizes} == {
        "conv": 58, "dense": 96, "head": 67,  # round(0.8 * n)
    }


def test_gradual_update_under_jit_matches_eager():
    sched = polynomial_schedule(begin_step=0, end_step=6, frequency=2, initial_sparsity=0.2)
    tr = pruning(0.75, schedule=sched)
    rng = np.random.default_rng(5)
    params = _params(4)
    s_eager = s_jit = tr.init(params)
    jupdate = jax.jit(tr.update)
    for step in range(1, 8):
        params = jax.tree.map(lambda x: x + jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
        s_eager = tr.update(params, s_eager, update_info(step))
        s_jit = jupdate(params, s_jit, update_info(step))
        assert isinstance(s_jit, PruneState) and int(s_jit.count) == step
        for a, b in zip(jax.tree.leaves(s_eager.masks), jax.tree.leaves(s_jit.masks)):
            np.testing.assert_array_equal(a, b)
    assert _zeros(tr.apply(params, s_jit)["dense"]["kernel"]) == 90  # round(0.75 * 120)


def test_one_shot_at_later_step():
    tr = pruning(0.5, schedule=one_shot_schedule(3))
    p = _params(5)
    s = tr.init(p)
    for step in (1, 2):
        s = tr.update(p, s, update_info(step))
        assert all(bool(np.all(m)) for m in jax.tree.leaves(s.masks))
    s = tr.update(p, s, update_info(3))
    assert _zeros(tr.apply(p, s)["dense"]["kernel"]) == 60
    np.testing.assert_array_equal(s.masks["dense"]["kernel"], _reference_mask(np.abs(p["dense"]["kernel"]), 0.5))


# Library bug: masks are recomputed from |w| * mask, so a previously pruned weight (score 0)
# ties with any kept latent weight that is exactly 0, and the position tie-break can prune the
# kept zero instead and bring the pruned weight back, although the docs promise masks only shrink.
def test_masks_monotone_when_a_kept_latent_weight_is_exactly_zero():
    sched = polynomial_schedule(begin_step=0, end_step=2, frequency=1, initial_sparsity=0.25)
    tr = pruning(0.25, schedule=sched)
    s = tr.init({"k": jnp.array([[5.0, 0.1], [2.0, 3.0]])})
    assert s.masks["k"].tolist() == [[True, False], [True, True]]
    s = tr.update({"k": jnp.array([[0.0, 0.1], [2.0, 3.0]])}, s, update_info(1))
    assert not bool(s.masks["k"][0, 1])  # the pruned weight must stay pruned


# ---------------------------------------------------------------------------------------------
# apply_masks / fixed_masks / sparsity_report / describe
# ---------------------------------------------------------------------------------------------


def test_apply_masks_values_and_none_passthrough():
    p = {"w": jnp.array([[1.0, -2.0], [3.0, 4.0]]), "b": jnp.array([5.0]), "i": [jnp.array([1.0, 2.0])]}
    m = {"w": jnp.array([[True, False], [False, True]]), "b": None, "i": [jnp.array([0.0, 1.0])]}
    out = apply_masks(p, m)
    assert out["w"].tolist() == [[1.0, 0.0], [0.0, 4.0]]
    assert out["b"].tolist() == [5.0]
    assert out["i"][0].tolist() == [0.0, 2.0]


def test_apply_masks_structure_and_shape_errors_name_path():
    p = {"a": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)}, "b": jnp.ones((4, 4))}
    with pytest.raises(ValueError, match=r"missing in masks: \['b'\]"):
        apply_masks(p, {"a": {"kernel": None, "bias": None}})
    with pytest.raises(ValueError, match=r"not in params: \['c'\]"):
        apply_masks(p, {"a": {"kernel": None, "bias": None}, "b": None, "c": None})
    with pytest.raises(ValueError, match=r"masks at 'a/kernel' has shape \(3, 2\) but the param has shape \(2, 3\)"):
        apply_masks(p, {"a": {"kernel": jnp.ones((3, 2), bool), "bias": None}, "b": None})


def test_fixed_masks_validates_at_init_and_keeps_masks():
    p = {"k": jnp.array([[1.0, 2.0], [3.0, 4.0]]), "b": jnp.array([1.0, 1.0])}
    masks = {"k": jnp.array([[False, True], [True, False]]), "b": None}
    tr = fixed_masks(masks)
    s = tr.init(p)
    s = tr.update(jax.tree.map(lambda x: x * 10, p), s, update_info(1))
    assert int(s.count) == 1
    assert tr.apply(p, s)["k"].tolist() == [[0.0, 2.0], [3.0, 0.0]]
    with pytest.raises(ValueError, match=r"masks at 'k' has shape \(2, 3\)"):
        fixed_masks({"k": jnp.ones((2, 3), bool), "b": None}).init(p)
    with pytest.raises(ValueError, match=r"missing in masks: \['b'\]"):
        fixed_masks({"k": jnp.ones((2, 2), bool)}).init(p)


def test_sparsity_report_counts_zeros_of_masked_leaves_only():
    tree = {"a": jnp.array([0.0, 1.0, 0.0, 2.0]), "b": jnp.array([[0.0, 3.0, 4.0]])}
    rows, total = sparsity_report(tree)
    assert [(r.path, r.zeros, r.size) for r in rows] == [("a", 2, 4), ("b", 1, 3)]
    assert total.sparsity == pytest.approx(3 / 7)
    rows, total = sparsity_report(tree, {"a": None, "b": jnp.ones((1, 3), bool)})
    assert [r.path for r in rows] == ["b"] and total.sparsity == pytest.approx(1 / 3)
    masks = {"a": jnp.ones(4, bool), "b": None}
    assert [r.path for r in sparsity_report(tree, masks)[0]] == ["a"]
    assert jax.tree.structure(masks, is_leaf=is_none).num_leaves == 2


def test_describe_gives_each_pruned_leaf_its_mask_and_structure():
    from jaxcompress.prune import NM, Unstructured, straight_through

    p = _params(6)
    t = pruning(0.5, rules=[("^conv/", None), (".*", True)])
    s = t.init(p)
    d = t.describe(p, s)
    assert sorted(d) == ["dense/kernel", "head/kernel"]
    for k in ("dense", "head"):
        np.testing.assert_array_equal(d[f"{k}/kernel"].mask, s.masks[k]["kernel"])
        assert d[f"{k}/kernel"].structure == Unstructured() and d[f"{k}/kernel"].bits is None
    nm = straight_through(pruning(0.5, structure=NM(2, 4, axis=1), rules=[("^dense/", True), (".*", None)]))
    assert {k: v.structure for k, v in nm.describe(p, nm.init(p)).items()} == {"dense/kernel": NM(2, 4, axis=1)}
    fixed = fixed_masks(s.masks, structure=Unstructured())
    fd = fixed.describe(p, fixed.init(p))
    assert sorted(fd) == sorted(d) and all(np.array_equal(fd[k].mask, d[k].mask) for k in d)
