"""The train and eval steps: tracing, BatchNorm state, teacher, compression, axis_name."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.core.transform import chain
from jaxcompress.distill.losses import cross_entropy, kd_loss
from jaxcompress.models import CNN, MLP
from jaxcompress.prune import pruning
from jaxcompress.prune.schedules import polynomial_schedule
from jaxcompress.quant.weights import weight_quantization
from jaxcompress.train import (
    Teacher,
    evaluate,
    init_train_state,
    linen_apply_fn,
    make_eval_step,
    make_train_step,
    split_variables,
)


def _batch(seed, n=16, shape=(8, 8, 1), classes=10):
    rng = np.random.default_rng(seed)
    return {"image": rng.normal(size=(n,) + shape).astype(np.float32),
            "label": rng.integers(0, classes, size=n).astype(np.int32)}


def _setup(model, transform=None, lr=1e-2):
    params, mstate = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    opt = optax.sgd(lr)
    state = init_train_state(params, opt, transform=transform, model_state=mstate, rng=1)
    return state, opt


def test_step_traces_once_over_three_steps():
    model = MLP(features=(32,))
    inner = linen_apply_fn(model)
    traces = []

    def counting_apply(*args, **kwargs):
        traces.append(1)
        return inner(*args, **kwargs)

    t = chain(pruning(0.5, schedule=polynomial_schedule(end_step=2, frequency=1)), weight_quantization(8))
    state, opt = _setup(model, t)
    step = jax.jit(make_train_step(counting_apply, opt, transform=t), donate_argnums=0)
    for i in range(3):
        state, _ = step(state, _batch(i))
    assert len(traces) == 1
    assert int(state.step) == 3
    assert int(state.compression_state[0].count) == 3


def test_plain_step_equals_manual_sgd():
    model = MLP(features=(16,))
    state, opt = _setup(model, lr=0.1)
    batch = _batch(0)
    apply = linen_apply_fn(model)

    def loss(p):
        logits, _ = apply(p, {}, batch, train=True)
        return cross_entropy(logits, batch["label"]).mean()

    want = jax.tree.map(lambda p, g: p - 0.1 * g, state.params, jax.grad(loss)(state.params))
    new, metrics = make_train_step(apply, opt)(state, batch)
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(metrics["loss"], loss(state.params), rtol=1e-6)


def test_pruned_weights_stay_zero_and_get_no_update():
    model = MLP(features=(32,))
    t = pruning(0.75)
    state, opt = _setup(model, t)
    masks = state.compression_state.masks
    before = state.params
    step = jax.jit(make_train_step(linen_apply_fn(model), opt, transform=t))
    for i in range(3):
        state, _ = step(state, _batch(i))
    view = t.apply(state.params, state.compression_state)
    for m, w0, w1, v in zip(jax.tree.leaves(masks, is_leaf=lambda x: x is None), jax.tree.leaves(before),
                            jax.tree.leaves(state.params), jax.tree.leaves(view)):
        if m is None:
            continue
        m = np.asarray(m)
        assert np.mean(~m) == pytest.approx(0.75, abs=1 / m.size)
        np.testing.assert_array_equal(np.asarray(v)[~m], 0.0)
        np.testing.assert_array_equal(np.asarray(w1)[~m], np.asarray(w0)[~m])  # SGD, zero grad
        assert not np.array_equal(np.asarray(w1)[m], np.asarray(w0)[m])


def test_batchnorm_state_updates_in_train_and_is_used_in_eval():
    model = CNN(channels=(4, 8), hidden=16, batch_norm=True)
    state, opt = _setup(model)
    assert "batch_stats" in state.model_state
    step = jax.jit(make_train_step(linen_apply_fn(model), opt))
    batch = _batch(0)
    new, _ = step(state, batch)
    mean0 = np.asarray(state.model_state["batch_stats"]["bn1"]["mean"])
    mean1 = np.asarray(new.model_state["batch_stats"]["bn1"]["mean"])
    assert not np.allclose(mean0, mean1)
    # The running mean is momentum 0.9 towards the batch mean of conv1's output.
    variables = {"params": state.params, **state.model_state}
    _, inter = model.apply(variables, batch["image"], train=True, mutable=["batch_stats", "intermediates"],
                           capture_intermediates=lambda mdl, _: mdl.name == "conv1")
    conv1 = inter["intermediates"]["conv1"]["__call__"][0]
    np.testing.assert_allclose(mean1, 0.9 * mean0 + 0.1 * np.asarray(conv1).mean((0, 1, 2)), rtol=1e-4, atol=1e-6)
    # Eval uses running statistics: result independent of the batch composition.
    ev = jax.jit(make_eval_step(linen_apply_fn(model)))
    full = ev(new, batch)
    halves = [ev(new, {k: v[s] for k, v in batch.items()}) for s in (slice(0, 8), slice(8, 16))]
    np.testing.assert_allclose(full["loss_sum"], halves[0]["loss_sum"] + halves[1]["loss_sum"], rtol=1e-5)


def test_teacher_is_frozen_and_kd_loss_used():
    teacher, student = MLP(features=(32,)), MLP(features=(8,))
    t_params, _ = split_variables(teacher.init(jax.random.key(5), jnp.zeros((1, 8, 8, 1))))
    loss = functools.partial(kd_loss, temperature=3.0, kd_weight=0.7, ce_weight=0.3)
    state, opt = _setup(student)
    step = jax.jit(make_train_step(linen_apply_fn(student), opt, teacher=Teacher(linen_apply_fn(teacher), loss)),
                   donate_argnums=0)
    batch = _batch(0)
    kept = jax.tree.map(np.array, t_params)
    new, metrics = step(jax.tree.map(jnp.copy, state), batch, (t_params, {}))
    assert not hasattr(new, "teacher_variables")
    for a, b in zip(jax.tree.leaves(t_params), jax.tree.leaves(kept)):  # not donated, not changed
        np.testing.assert_array_equal(a, b)
    s_logits = student.apply({"params": state.params}, batch["image"])
    t_logits = teacher.apply({"params": t_params}, batch["image"])
    want = loss(s_logits, t_logits, labels=batch["label"]).mean()
    np.testing.assert_allclose(metrics["loss"], want, rtol=1e-5)


def test_teacher_without_variables_and_class_mismatch_raise():
    student = MLP(features=(8,))
    state, opt = _setup(student)
    teacher = MLP(features=(8,), num_classes=5)
    loss = functools.partial(kd_loss, temperature=2.0)
    step = make_train_step(linen_apply_fn(student), opt, teacher=Teacher(linen_apply_fn(teacher), loss))
    with pytest.raises(ValueError, match="teacher_variables"):
        step(state, _batch(0))
    t_params, _ = split_variables(teacher.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    with pytest.raises(ValueError, match="same classes"):
        step(state, _batch(0), (t_params, {}))
    with pytest.raises(ValueError, match="without teacher="):
        make_train_step(linen_apply_fn(student), opt)(state, _batch(0), (t_params, {}))


def test_pmap_step_equals_single_device_step():
    n = jax.local_device_count()
    model = MLP(features=(16,))
    t = chain(pruning(0.5), weight_quantization(8))
    state, opt = _setup(model, t, lr=0.1)
    batch = _batch(0, n=8 * n)
    single = jax.jit(make_train_step(linen_apply_fn(model), opt, transform=t))
    par = jax.pmap(make_train_step(linen_apply_fn(model), opt, transform=t, axis_name="d"), axis_name="d")
    stacked = jax.tree.map(lambda x: jnp.stack([x] * n), state)
    assert n == 8  # the root conftest gives eight fake CPU devices
    per_device = jax.tree.map(lambda x: x.reshape((n, -1) + x.shape[1:]), batch)
    s1 = state
    for _ in range(3):
        s1, m1 = single(s1, batch)
        stacked, mp = par(stacked, per_device)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(stacked.params)):
        for d in range(n):
            np.testing.assert_allclose(np.asarray(b)[d], a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(mp["loss"]), float(m1["loss"]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(mp["accuracy"]), float(m1["accuracy"]), rtol=1e-6)


def test_evaluate_pads_last_batch_without_retracing():
    model = MLP(features=(8,))
    state, _ = _setup(model)
    calls = []
    inner = linen_apply_fn(model)

    def counting(*a, **k):
        calls.append(1)
        return inner(*a, **k)

    data = _batch(0, n=25)
    ev = evaluate(jax.jit(make_eval_step(counting)), state, data, batch_size=10)
    logits = model.apply({"params": state.params}, data["image"])
    assert ev["count"] == 25
    assert len(calls) == 1
    assert ev["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == data["label"])))
    assert ev["loss"] == pytest.approx(float(cross_entropy(logits, data["label"]).mean()), rel=1e-5)


def test_bad_batch_and_optimizer_raise():
    model = MLP(features=(8,))
    state, opt = _setup(model)
    with pytest.raises(ValueError, match="'image' entry"):
        make_train_step(linen_apply_fn(model), opt)(state, (1, 2))
    with pytest.raises(ValueError, match="'label' entry"):
        make_train_step(linen_apply_fn(model), opt)(state, {"image": _batch(0)["image"]})
    with pytest.raises(ValueError, match="empty data set"):
        evaluate(make_eval_step(linen_apply_fn(model)), state, {"image": np.zeros((0, 8, 8, 1))})
    with pytest.raises(ValueError, match="batch_size"):
        evaluate(make_eval_step(linen_apply_fn(model)), state, _batch(0), batch_size=0)
    with pytest.raises(TypeError, match="optax"):
        init_train_state(state.params, "adam")
    with pytest.raises(TypeError, match="Transform"):
        make_train_step(linen_apply_fn(model), opt, transform=lambda p: p)


def test_augment_runs_inside_step_and_teacher_sees_augmented_batch():
    teacher, student = MLP(features=(16,)), MLP(features=(8,))
    t_params, _ = split_variables(teacher.init(jax.random.key(5), jnp.zeros((1, 8, 8, 1))))
    seen = []

    def recording_teacher(params, mstate, batch, *, train, rng=None):
        seen.append(batch["image"])
        return linen_apply_fn(teacher)(params, mstate, batch, train=train, rng=rng)

    def flip(rng, batch):
        return {**batch, "image": -batch["image"]}

    state, opt = _setup(student)
    loss = functools.partial(kd_loss, temperature=2.0)
    step = make_train_step(linen_apply_fn(student), opt, augment=flip,
                           teacher=Teacher(recording_teacher, loss))
    batch = _batch(0)
    _, metrics = step(state, batch, (t_params, {}))
    np.testing.assert_array_equal(np.asarray(seen[0]), -batch["image"])
    s_logits = student.apply({"params": state.params}, -batch["image"])
    t_logits = teacher.apply({"params": t_params}, -batch["image"])
    np.testing.assert_allclose(metrics["loss"], loss(s_logits, t_logits).mean(), rtol=1e-5)


def test_custom_loss_and_metrics_on_a_batch_of_another_shape():
    # A regression batch with other keys: the loss, the metrics and the inputs are the user's.
    model = MLP(features=(8,), num_classes=1)
    params, _ = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 3))))
    opt = optax.sgd(0.05)
    apply = linen_apply_fn(model, inputs="x")
    loss_fn = lambda out, b: (out[:, 0] - b["y"]) ** 2  # noqa: E731
    metrics_fn = lambda out, b: {"abs_err": jnp.abs(out[:, 0] - b["y"])}  # noqa: E731
    rng = np.random.default_rng(0)
    batch = {"x": rng.normal(size=(32, 3)).astype(np.float32), "y": rng.normal(size=32).astype(np.float32)}
    state = init_train_state(params, opt)
    step = jax.jit(make_train_step(apply, opt, loss_fn=loss_fn, metrics_fn=metrics_fn))
    new, metrics = step(state, batch)
    out = model.apply({"params": params}, batch["x"])[:, 0]
    np.testing.assert_allclose(metrics["loss"], np.mean((out - batch["y"]) ** 2), rtol=1e-5)
    np.testing.assert_allclose(metrics["abs_err"], np.mean(np.abs(out - batch["y"])), rtol=1e-5)
    ev = evaluate(jax.jit(make_eval_step(apply, loss_fn=loss_fn, metrics_fn=metrics_fn)), new, batch, batch_size=12)
    out1 = model.apply({"params": new.params}, batch["x"])[:, 0]
    assert ev["count"] == 32
    np.testing.assert_allclose(ev["abs_err"], np.mean(np.abs(out1 - batch["y"])), rtol=1e-5)


def test_init_train_state_never_aliases_the_callers_arrays():
    model = MLP(features=(8,))
    params, _ = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    opt = optax.sgd(0.1)
    a = init_train_state(params, opt)
    b = init_train_state(params, opt)
    step = jax.jit(make_train_step(linen_apply_fn(model), opt), donate_argnums=0)
    step(a, _batch(0))
    step(b, _batch(1))  # would fail on deleted buffers if b shared a's arrays
    assert np.isfinite(np.asarray(params["fc1"]["kernel"])).all()  # the caller's arrays are alive
    with pytest.raises(TypeError, match="rng"):
        init_train_state(params, opt, rng=0.5)
    # nor the arrays a transform hands back, such as the masks given to fixed_masks
    from jaxcompress.prune import fixed_masks

    masks = jax.tree.map(lambda w: jnp.abs(w) > 0.05 if w.ndim == 2 else None, params)
    t = fixed_masks(masks)
    c = init_train_state(params, opt, transform=t)
    jax.jit(make_train_step(linen_apply_fn(model), opt, transform=t), donate_argnums=0)(c, _batch(2))
    assert np.asarray(masks["fc1"]["kernel"]).any()  # still alive


def test_trainable_state_values_are_trained_by_the_optimizer():
    # A toy transform with one trainable scale per kernel: view = w * s. The step must pull the
    # view gradient back to s (ds = sum(g * w)) and update it with the user's optimizer.
    from jaxcompress.core.transform import Trainable, Transform

    def init(params):
        return Trainable(jax.tree.map(lambda w: jnp.float32(1.0), params))

    def apply(params, state):
        return jax.tree.map(lambda w, s: w * s, params, state.value)

    t = Transform(init, apply, lambda p, s, i: s)
    model = MLP(features=(8,))
    params, _ = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1))))
    opt = optax.sgd(0.1)
    state = init_train_state(params, opt, transform=t)
    batch = _batch(0)
    new, _ = jax.jit(make_train_step(linen_apply_fn(model), opt, transform=t))(state, batch)

    def loss(p):
        return cross_entropy(model.apply({"params": p}, batch["image"]), batch["label"]).mean()

    g = jax.grad(loss)(params)
    for s_new, w, gw in zip(jax.tree.leaves(new.compression_state.value), jax.tree.leaves(params), jax.tree.leaves(g)):
        np.testing.assert_allclose(s_new, 1.0 - 0.1 * np.sum(np.asarray(gw) * np.asarray(w)), rtol=1e-4)
