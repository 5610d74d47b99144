"""One device, pmap and sharded jit give the same compressed, distilled train step (8 fake CPUs)."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.core.transform import chain
from jaxcompress.distill.losses import kd_loss
from jaxcompress.models.cnn import CNN
from jaxcompress.prune import pruning
from jaxcompress.prune.schedules import polynomial_schedule
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.quant.affine import fake_quant_affine
from jaxcompress.quant.weights import weight_quantization
from jaxcompress.train import (
    Teacher, data_mesh, data_parallel, init_train_state, linen_apply_fn, make_train_step,
    per_device_batch_size, scale_learning_rate, shard_batch, split_for_pmap, split_variables,
    step_axis_name,
)

GLOBAL_BATCH = 32
STEPS = 20


def _static_a8(apply_fn, scale=4.0 / 127):
    """Static 8-bit activation fake quantization (fixed calibrated scale) on every layer input."""

    def wrapped(params, model_state, batch, *, train, rng=None):
        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
                args = (fake_quant_affine(args[0], jnp.float32(scale), 0, -127, 127),) + args[1:]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(params, model_state, batch, train=train, rng=rng)

    return wrapped


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * GLOBAL_BATCH, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, 10, size=(STEPS * GLOBAL_BATCH,)).astype(np.int32)
    return x, y


def _setup(axis_name, activations="calibrated"):
    teacher = CNN(channels=(4, 8), hidden=32)
    student = CNN(channels=(4, 8), hidden=16, batch_norm=True, axis_name=axis_name)
    t_vars = teacher.init(jax.random.key(1), jnp.zeros((1, 8, 8, 1)))
    s_params, s_state = split_variables(
        CNN(channels=(4, 8), hidden=16, batch_norm=True).init(jax.random.key(2), jnp.zeros((1, 8, 8, 1)))
    )
    if activations == "static":
        s_apply = _static_a8(linen_apply_fn(student))
        weights = weight_quantization(8)
    else:  # the step passes its axis_name on to the activation quantizer (batch ranges over devices)
        s_apply = linen_apply_fn(student)
        weights = weight_quantization(8, activation_bits=8, activation_range=activations)
    transform = chain(
        pruning(0.75, schedule=polynomial_schedule(begin_step=0, end_step=4, frequency=1)),
        weights,
    )
    compression_state = transform.init(s_params)
    if activations == "calibrated":  # ranges kept in the transform state, EMA-updated in training
        x, _ = _data()
        compression_state = calibrate_activations(
            transform, compression_state, linen_apply_fn(student.clone(axis_name=None)), s_params, s_state,
            [{"image": x[:64]}, {"image": x[64:128]}])
    # SGD, not Adam: the conv biases before BatchNorm get gradients that are exactly zero in exact
    # arithmetic, and Adam would blow their rounding noise (which depends on the summation order,
    # hence on the device count) up to learning-rate-sized steps.
    opt = optax.sgd(0.1, momentum=0.9)
    kd = Teacher(linen_apply_fn(teacher), functools.partial(kd_loss, temperature=4.0, kd_weight=0.9, ce_weight=0.1))
    step = make_train_step(s_apply, opt, transform=transform, teacher=kd, axis_name=axis_name)
    state = init_train_state(s_params, opt, transform=transform, model_state=s_state, rng=0)
    return step, state._replace(compression_state=compression_state), split_variables(t_vars)


def _run(parallel, devices=8, activations="calibrated", x64=True, steps=STEPS):
    """``steps`` steps on ``devices``; with ``x64`` the forward and backward passes run in float64.

    Float64 compute (the params stay float32, as the model declares them) takes the summation
    order out of the comparison: in float32 the per-device partial sums of BatchNorm statistics
    and gradients differ from one device's sums by ulps, and an activation sitting on a rounding
    boundary of the 8-bit grid then flips by one level. That flip is a legitimate float32
    outcome, not a difference between the three paths, so the equality test runs in float64
    and the float32 runs are compared with a bound that allows it.
    """
    with jax.enable_x64(x64):
        step, state, teacher = _setup(step_axis_name(parallel), activations)
        dp = data_parallel(step, parallel=parallel, devices=devices)
        state, teacher = dp.put_state(state), dp.put_teacher(teacher)
        x, y = _data()
        x = x.astype(np.float64 if x64 else np.float32)
        losses = []
        for i in range(steps):
            sl = slice(i * GLOBAL_BATCH, (i + 1) * GLOBAL_BATCH)
            state, metrics = dp.step(state, {"image": x[sl], "label": y[sl]}, teacher)
            losses.append(float(metrics["loss"]))
        return jax.device_get(dp.get_state(state)), losses


def _assert_close(a, b, rel=1e-5):
    """Max abs difference <= ``rel`` relative to the largest magnitude in the reference tree."""
    scale = max(float(np.max(np.abs(np.asarray(x, np.float64)))) for x in jax.tree.leaves(b))
    for (path, la), lb in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
        la, lb = np.asarray(la, np.float64), np.asarray(lb, np.float64)
        assert np.max(np.abs(la - lb)) <= rel * scale, (jax.tree_util.keystr(path), np.max(np.abs(la - lb)))


@pytest.fixture(scope="module")
def single():
    return _run("none", devices=1)


@pytest.mark.parametrize("parallel", ["pmap", "shard"])
def test_prune_w8a8_kd_batchnorm_equal_to_one_device(single, parallel):
    """Calibrated W8A8 + BatchNorm + KD + gradual pruning, 20 steps: 8 devices equal one device."""
    ref, ref_losses = single
    got, losses = _run(parallel)
    assert len(jax.devices()) == 8
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(got.params))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
    _assert_close(got.params, ref.params, rel=1e-6)
    _assert_close(got.model_state, ref.model_state, rel=1e-6)  # BatchNorm statistics
    # Calibrated ranges live in the transform state and moved by their EMA in training (update
    # folds each step's batch range, the min/max over all devices under pmap), equally everywhere.
    ranges, start = got.compression_state[1].ranges, _setup(None)[1].compression_state[1].ranges
    assert sorted(ranges) == ["conv1", "conv2", "fc1", "head"]
    assert all(float(ranges[k]["max"]) != float(start[k]["max"]) for k in ranges)
    _assert_close(ranges, ref.compression_state[1].ranges, rel=1e-6)
    masks_ref = jax.tree.leaves(ref.compression_state[0])
    for a, b in zip(jax.tree.leaves(got.compression_state[0]), masks_ref):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(got.step) == STEPS
    # the pruning really happened: 75% of the pruned kernels are zero after 20 steps
    masks = ref.compression_state[0].masks
    kept = [np.mean(np.asarray(m)) for m in jax.tree.leaves(masks)]
    assert kept and all(abs(k - 0.25) < 0.01 for k in kept)


def test_per_token_activations_equal_to_one_device():
    """Per-token input grids need no cross-device range: pmap and shard equal one device."""
    ref, ref_losses = _run("none", devices=1, activations="token", steps=3)
    for parallel in ("pmap", "shard"):
        got, losses = _run(parallel, activations="token", steps=3)
        np.testing.assert_allclose(losses, ref_losses, rtol=1e-6)
        _assert_close(got.params, ref.params, rel=1e-6)
        _assert_close(got.model_state, ref.model_state, rel=1e-6)


@pytest.mark.slow  # the exact equalities of one device, pmap and shard run in the fast tests of this file
def test_float32_runs_agree_up_to_rounding_flips():
    """In float32 the paths agree to the size of a one-level flip of an 8-bit activation."""
    ref, ref_losses = _run("none", devices=1, x64=False, steps=5)
    got, losses = _run("pmap", x64=False, steps=5)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-3)
    _assert_close(got.params, ref.params, rel=1e-3)


@pytest.mark.slow
def test_static_activation_scale_equal_under_pmap():
    ref, _ = _run("none", devices=1, activations="static")
    got, _ = _run("pmap", activations="static")
    _assert_close(got.params, ref.params)


def test_layouts_and_errors():
    assert per_device_batch_size(64, 8) == 8
    with pytest.raises(ValueError, match="does not split evenly over 8 devices"):
        per_device_batch_size(30, 8)
    x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
    assert split_for_pmap({"x": x}, 8)["x"].shape == (8, 2, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        split_for_pmap({"x": x[:12]}, 8)
    with pytest.raises(ValueError, match="'lr'.*is a scalar"):
        split_for_pmap({"x": x, "lr": np.float32(0.1)}, 8)
    mesh = data_mesh(8)
    g = shard_batch({"x": x}, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(g), x)
    assert len(g.sharding.device_set) == 8 and g.addressable_shards[1].data.shape == (2, 3)
    with pytest.raises(ValueError, match="multiple of 8"):
        shard_batch({"x": x[:10]}, mesh)
    bad = jax.sharding.Mesh(np.array(jax.devices()), ("batch",))
    with pytest.raises(ValueError, match="no 'data' axis"):
        data_parallel(lambda s, b: (s, {}), parallel="shard", mesh=bad)
    with pytest.raises(ValueError, match="parallel must be one of"):
        data_parallel(lambda s, b: (s, {}), parallel="dp")
    step, state, _ = _setup(step_axis_name("shard"), "dynamic")
    dp = data_parallel(step, parallel="shard")
    with pytest.raises(ValueError, match="does not split evenly over 8 devices"):
        dp.step(dp.put_state(state), {"image": np.zeros((12, 8, 8, 1), np.float32),
                                      "label": np.zeros((12,), np.int32)})
    assert scale_learning_rate(0.1, 2048, 256) == pytest.approx(0.8)
    assert scale_learning_rate(1e-3, 64, 256, rule="sqrt") == pytest.approx(5e-4)


def test_a_step_built_for_another_mode_is_refused():
    step_none, _, _ = _setup(None, "dynamic")
    step_pmap, _, _ = _setup("data", "dynamic")
    with pytest.raises(ValueError, match="each device would train its own copy"):
        data_parallel(step_none, parallel="pmap")
    with pytest.raises(ValueError, match="axis_name=None"):
        data_parallel(step_pmap, parallel="shard")
    with pytest.raises(ValueError, match="axis_name=None"):
        data_parallel(step_pmap, parallel="none")


def test_identical_model_state_is_not_averaged_under_pmap():
    """Eight identical float32 copies are kept bitwise; differing entries are averaged."""
    from jaxcompress.train.step import _average_varying

    x = np.float32(0.1) + np.float32(1e-8) * np.arange(3, dtype=np.float32)
    tree = {"same": np.stack([x] * 8), "differs": np.arange(8, dtype=np.float32)[:, None] * np.ones((8, 3), np.float32)}
    out = jax.pmap(lambda t: _average_varying(t, "d"), axis_name="d")(tree)
    np.testing.assert_array_equal(np.asarray(out["same"]), tree["same"])
    np.testing.assert_allclose(np.asarray(out["differs"]), 3.5)


def test_teacher_sharded_over_the_mesh_gives_the_replicated_result():
    """A teacher too large for one device can be laid out by the caller: kernels split over 'data'."""
    from jax.sharding import NamedSharding, PartitionSpec

    with jax.enable_x64(True):
        step, state, teacher = _setup(step_axis_name("shard"), "dynamic")
        dp = data_parallel(step, parallel="shard", devices=8, donate=False)
        x, y = _data()
        batch = {"image": x[:GLOBAL_BATCH].astype(np.float64), "label": y[:GLOBAL_BATCH]}
        state = dp.put_state(state)
        replicated = dp.put_teacher(teacher)

        def lay_out(leaf):  # split every kernel's output axis over the 8 devices where it divides
            spec = PartitionSpec(*([None] * (leaf.ndim - 1) + ["data"])) if leaf.ndim >= 2 and leaf.shape[-1] % 8 == 0 \
                else PartitionSpec()
            return jax.device_put(leaf, NamedSharding(dp.mesh, spec))

        sharded = jax.tree.map(lay_out, teacher)
        kernel = sharded[0]["conv2"]["kernel"]
        assert len(kernel.sharding.device_set) == 8 and kernel.addressable_shards[0].data.shape[-1] == kernel.shape[-1] // 8
        a, ma = dp.step(state, batch, replicated)
        b, mb = dp.step(state, batch, sharded)
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-12)
    _assert_close(dp.get_state(b).params, dp.get_state(a).params, rel=1e-12)
