"""Criteria (saliency, movement), schedules, STE pruning, SNIP, sensitivity allocation and reports."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core import update_info
from jaxcompress.prune import (
    Sensitivity,
    allocate_sparsity,
    format_sparsity,
    iterative_schedule,
    polynomial_schedule,
    pruning,
    sensitivity_analysis,
    snip_masks,
    snip_scores,
    sparsity_report,
    sparsity_rules,
    straight_through,
)


def _keep_top(scores, k_remove):
    flat = np.asarray(scores, np.float64).ravel()
    keep = np.ones(flat.size, bool)
    keep[np.argsort(flat, kind="stable")[:k_remove]] = False
    return keep.reshape(np.shape(scores))


def test_saliency_criterion_uses_step_gradients():
    rng = np.random.default_rng(0)
    w, g = rng.normal(size=(6, 5)).astype(np.float32), rng.normal(size=(6, 5)).astype(np.float32)
    t = pruning(0.6, criterion="saliency", schedule=polynomial_schedule(begin_step=1, end_step=1, frequency=1))
    s = t.init({"k": jnp.asarray(w)})
    assert bool(jnp.all(s.masks["k"]))  # nothing before begin_step
    s = t.update({"k": jnp.asarray(w)}, s, update_info(1, {"k": jnp.asarray(g)}))
    np.testing.assert_array_equal(np.asarray(s.masks["k"]), _keep_top(np.abs(w.astype(np.float64) * g), 18))


def test_movement_scores_accumulate_minus_w_times_g():
    rng = np.random.default_rng(1)
    t = pruning(0.5, criterion="movement", schedule=polynomial_schedule(begin_step=3, end_step=3, frequency=1))
    ws = [rng.normal(size=(4, 4)).astype(np.float32) for _ in range(3)]
    gs = [rng.normal(size=(4, 4)).astype(np.float32) for _ in range(3)]
    s = t.init({"k": jnp.asarray(ws[0])})
    update = jax.jit(t.update)
    ref = np.zeros((4, 4))
    for i, (w, g) in enumerate(zip(ws, gs)):
        s = update({"k": jnp.asarray(w)}, s, update_info(i + 1, {"k": jnp.asarray(g)}))
        ref -= w.astype(np.float64) * g
    np.testing.assert_allclose(np.asarray(s.scores["k"]), ref, rtol=1e-5, atol=1e-6)
    # Movement keeps the weights moving away from zero (largest accumulated -w*g), not the largest |w|.
    np.testing.assert_array_equal(np.asarray(s.masks["k"]), _keep_top(ref, 8))


def test_iterative_schedule_prunes_a_fraction_of_survivors_per_round():
    sched = iterative_schedule(rate=0.2, round_steps=10, num_rounds=5)
    w = jnp.asarray(np.random.default_rng(2).normal(size=(10, 10)), jnp.float32)
    t = pruning(0.6, schedule=sched)
    s = t.init({"k": w})
    update = jax.jit(t.update)
    kept = [int(s.masks["k"].sum())]
    for step in range(1, 41):
        s = update({"k": w}, s, update_info(step))
        if step % 10 == 0:
            kept.append(int(s.masks["k"].sum()))
    # 1 - 0.8^r: 20%, 36%, 48.8%, 59.04% and the last round exactly 60%
    assert kept == [80, 64, 51, 41, 40]
    assert [bool(sched.is_update_step(t)) for t in (0, 5, 10, 40, 50)] == [True, False, True, True, False]


def test_polynomial_schedule_with_initial_sparsity_and_power():
    sched = polynomial_schedule(begin_step=10, end_step=110, frequency=10, initial_sparsity=0.3, power=2.0)
    for step in (10, 35, 60, 110, 200):
        progress = min((step - 10) / 100, 1.0)
        assert float(sched.sparsity(step, 0.9)) == pytest.approx(0.9 + (0.3 - 0.9) * (1 - progress) ** 2, abs=1e-6)
    assert float(sched.sparsity(5, 0.9)) == 0.0


def test_global_normalize_balances_layers_of_different_scale():
    rng = np.random.default_rng(3)
    p = {"a": jnp.asarray(rng.normal(size=(10, 10)) * 100, jnp.float32),
         "b": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)}
    a, b = (np.abs(np.asarray(p[k], np.float64)) for k in "ab")
    plain = pruning(0.5, scope="global").init(p).masks
    want = _keep_top(np.concatenate([a.ravel(), b.ravel()]), 100)
    np.testing.assert_array_equal(np.concatenate([np.ravel(plain["a"]), np.ravel(plain["b"])]), want)
    assert int(plain["b"].sum()) < 5  # the small layer nearly dies
    normed = pruning(0.5, scope="global", normalize=True).init(p).masks
    want = _keep_top(np.concatenate([(a / np.linalg.norm(a)).ravel(), (b / np.linalg.norm(b)).ravel()]), 100)
    np.testing.assert_array_equal(np.concatenate([np.ravel(normed["a"]), np.ravel(normed["b"])]), want)
    assert 30 < int(normed["a"].sum()) < 70


def test_straight_through_sparse_forward_dense_gradient():
    w = jnp.asarray(np.random.default_rng(4).normal(size=(5, 3)), jnp.float32)
    x = jnp.asarray(np.random.default_rng(5).normal(size=(7, 5)), jnp.float32)
    base = pruning(0.6)
    t = straight_through(base)
    s = t.init({"k": w})
    mask = np.asarray(s.masks["k"])
    view = t.apply({"k": w}, s)["k"]
    np.testing.assert_array_equal(np.asarray(view), np.where(mask, np.asarray(w), 0))
    loss = lambda p, tr: jnp.sum(jnp.tanh(x @ tr.apply(p, s)["k"]))  # noqa: E731
    g_ste = np.asarray(jax.grad(loss)({"k": w}, t)["k"])
    g_mask = np.asarray(jax.grad(loss)({"k": w}, base)["k"])
    # float64 reference: dL/dview at the sparse view, for every weight
    xv = np.asarray(x, np.float64)
    ref = xv.T @ (1 - np.tanh(xv @ np.where(mask, np.asarray(w, np.float64), 0)) ** 2)
    np.testing.assert_allclose(g_ste, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(g_mask, ref * mask, rtol=1e-4, atol=1e-5)


def test_snip_scores_match_numpy_gradient():
    rng = np.random.default_rng(6)
    w = rng.normal(size=(4, 3)).astype(np.float32)
    xs = [rng.normal(size=(8, 4)).astype(np.float32) for _ in range(2)]
    ys = [rng.normal(size=(8, 3)).astype(np.float32) for _ in range(2)]
    loss = lambda p, b: jnp.mean((b[0] @ p["k"] - b[1]) ** 2) + 0 * jnp.sum(p["b"])  # noqa: E731
    params = {"k": jnp.asarray(w), "b": jnp.zeros(3)}
    scores = snip_scores(loss, params, list(zip(xs, ys)))
    g = sum(2 * x.astype(np.float64).T @ (x @ w.astype(np.float64) - y) / y.size for x, y in zip(xs, ys))
    np.testing.assert_allclose(np.asarray(scores["k"]), np.abs(w * g), rtol=1e-4)
    assert scores["b"] is None
    masks = snip_masks(loss, params, list(zip(xs, ys)), 0.5)
    np.testing.assert_array_equal(np.asarray(masks["k"]), _keep_top(np.abs(w * g), 6))
    with pytest.raises(ValueError, match="batches is empty"):
        snip_scores(loss, params, [])


def test_sensitivity_curves_and_allocation():
    rng = np.random.default_rng(7)
    params = {"a": {"kernel": jnp.asarray(rng.normal(size=(20, 10)), jnp.float32)},
              "b": {"kernel": jnp.asarray(rng.normal(size=(10, 10)), jnp.float32)}}

    def evaluate(p):  # a stand-in metric: the fraction of |w| mass kept, weighted 1:3
        keep = lambda k: float(jnp.sum(jnp.abs(p[k]["kernel"])) / jnp.sum(jnp.abs(params[k]["kernel"])))  # noqa: E731
        return (keep("a") + 3 * keep("b")) / 4

    r = sensitivity_analysis(params, evaluate, sparsities=(0.0, 0.5, 0.9))
    assert r.baseline == pytest.approx(1.0)
    for name, weight in (("a/kernel", 1), ("b/kernel", 3)):
        w = np.abs(np.asarray(params[name.split("/")[0]]["kernel"], np.float64)).ravel()
        for s, got in zip(r.sparsities, r.curves[name]):
            kept = np.sort(w)[round(s * w.size):].sum() / w.sum()
            assert got == pytest.approx((weight * kept + (4 - weight)) / 4, rel=1e-5)
    alloc = allocate_sparsity(r, 0.6)
    assert (alloc["a/kernel"] * 200 + alloc["b/kernel"] * 100) / 300 == pytest.approx(0.6, abs=1e-9)
    assert alloc["a/kernel"] > alloc["b/kernel"]  # the layer that matters less is pruned more
    t = pruning(0.6, rules=sparsity_rules(alloc))
    s = t.init(params)
    removed = sum(int((~s.masks[k]["kernel"]).sum()) for k in ("a", "b"))
    assert abs(removed - 180) <= 1
    with pytest.raises(ValueError, match="exceeds the largest"):
        allocate_sparsity(r, 0.95)


def test_allocation_golden():
    r = Sensitivity(1.0, (0.0, 0.5, 0.9), {"a": [1.0, 0.99, 0.9], "b": [1.0, 0.6, 0.2]}, {"a": 100, "b": 300})
    got = allocate_sparsity(r, 0.3)
    assert got["a"] == pytest.approx(0.9) and got["b"] == pytest.approx(0.1, abs=1e-9)


def test_sparsity_report_counts():
    view = {"fc": {"kernel": jnp.array([[0.0, 1.0], [0.0, 0.0]]), "bias": jnp.array([0.0, 1.0])},
            "head": {"kernel": jnp.array([[2.0, 0.0, 3.0]]), "bias": jnp.zeros(3)}}
    masks = {"fc": {"kernel": True, "bias": None}, "head": {"kernel": True, "bias": None}}
    rows, total = sparsity_report(view, masks)
    assert [(r.path, r.size, r.zeros) for r in rows] == [("fc/kernel", 4, 3), ("head/kernel", 3, 1)]
    assert total.sparsity == pytest.approx(4 / 7)
    table = format_sparsity(view, masks)
    assert "| fc/kernel | (2, 2) | 4 | 3 | 75.00% |" in table and "| total |  | 7 | 4 | 57.14% |" in table


def test_pruning_update_compiles_once_and_skips_work_off_schedule():
    t = pruning(0.5, schedule=polynomial_schedule(end_step=100, frequency=10))
    p = {"k": jnp.asarray(np.random.default_rng(8).normal(size=(8, 8)), jnp.float32)}
    traces = []

    def upd(params, state, info):
        traces.append(1)
        return t.update(params, state, info)

    update = jax.jit(upd)
    s = t.init(p)
    for step in range(1, 25):
        s = update(p, s, update_info(step))
    assert len(traces) == 1
    text = jax.jit(t.update).lower(p, s, update_info(3)).as_text()
    assert "stablehlo.case" in text or "stablehlo.if" in text or "cond" in text


def test_mask_from_count_equals_stable_sort_reference_with_ties_and_infinities():
    """The radix-select mask removes exactly the k first entries of a stable sort (float64 NumPy)."""
    from jaxcompress.prune.masks import mask_from_count

    rng = np.random.default_rng(9)
    f = jax.jit(mask_from_count)
    for trial in range(60):
        kind = trial % 3
        if kind == 0:
            s = rng.integers(-3, 4, 48).astype(np.float32)  # many ties, negatives
        elif kind == 1:
            s = (rng.normal(size=48) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
        else:
            s = rng.normal(size=48).astype(np.float32)
            s[rng.random(48) < 0.2] = -np.inf
            s[rng.random(48) < 0.2] = np.inf
            s[rng.random(48) < 0.2] = -0.0
            s[rng.random(48) < 0.2] = 0.0
        k = int(rng.integers(0, 49))
        order = np.lexsort((np.arange(48), s.astype(np.float64)))
        want = np.ones(48, bool)
        want[order[:k]] = False
        np.testing.assert_array_equal(np.asarray(f(jnp.asarray(s), k)), want)


def test_movement_through_the_step_accumulates_minus_w_times_dense_view_gradient():
    """Sanh et al.'s score -sum(w * dL/dW') with W' = W * M: inside the step, UpdateInfo.grads is dL/dW'."""
    import optax

    import jaxcompress as jc
    from jaxcompress.prune import one_shot_schedule

    rng = np.random.default_rng(10)
    x, y = rng.normal(size=(16, 6)).astype(np.float32), rng.normal(size=(16, 4)).astype(np.float32)
    w0 = rng.normal(size=(6, 4)).astype(np.float32)
    apply_fn = lambda p, ms, batch, *, train, rng: (batch["x"] @ p["w"], ms)  # noqa: E731
    loss_fn = lambda out, batch: jnp.sum((out - batch["y"]) ** 2, -1)  # noqa: E731
    t = pruning(0.5, criterion="movement", schedule=one_shot_schedule(1))
    opt = optax.sgd(0.05)
    state = jc.init_train_state({"w": jnp.asarray(w0)}, opt, transform=t)
    step = jax.jit(jc.make_train_step(apply_fn, opt, loss_fn=loss_fn, metrics_fn=None, transform=t))
    latent, mask, score = w0.astype(np.float64), np.ones(w0.shape, bool), np.zeros(w0.shape)
    for i in range(1, 4):
        g = 2.0 * x.T.astype(np.float64) @ (x @ np.where(mask, latent, 0.0) - y) / len(x)
        latent = latent - 0.05 * g * mask
        score = score - latent * g
        if i == 1:
            mask = _keep_top(score, 12)
        state, _ = step(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
        np.testing.assert_allclose(np.asarray(state.compression_state.scores["w"]), score, rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(state.compression_state.masks["w"]), mask)
    # pruned weights keep accumulating (their gradient at the view is dense, not masked to zero)
    assert np.all(np.abs(g[~mask]) > 0)
