"""Activation quantization by interception (Linen, part of weight_quantization) and op hooks (NNX);
calibration into the transform state; PACT levels trained by the step; W8A8 QAT."""
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.core.transform import Trainable, chain, intercepted, update_info
from jaxcompress.data import load_mnist
from jaxcompress.models import LeNet5, MLP
from jaxcompress.prune import pruning
from jaxcompress.quant import (
    QuantSpec,
    QuantStat,
    affine_qparams,
    calibrate_activations,
    calibrate_nnx_activations,
    fake_quant_affine,
    moving_average_minmax,
    mse,
    nnx_apply_fn,
    pact,
    percentile,
    quantize_nnx_activations,
    weight_quantization,
)
from jaxcompress.train import evaluate, init_train_state, linen_apply_fn, make_eval_step, make_train_step
from jaxcompress.train import split_variables

FLOAT_WEIGHTS = [(".*", QuantSpec(weights=None))]  # inputs quantized, kernels left in float


def _fq(x, lo, hi, bits):
    s, z, qmin, qmax = affine_qparams(lo, hi, bits)
    return fake_quant_affine(x, s, z, qmin, qmax)


def _mlp_setup(seed=0):
    model = MLP(features=(16,), num_classes=3)
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(32, 4, 4, 1)), jnp.float32)
    params, state = split_variables(model.init(jax.random.key(seed), x))
    return model, params, state, x


def _mlp_by_hand(params, x, in_quant):
    """The MLP forward written out, with ``in_quant(name, x)`` applied to each layer input."""
    h = in_quant("fc1", x.reshape(x.shape[0], -1))
    h = nn.relu(h @ params["fc1"]["kernel"] + params["fc1"]["bias"])
    h = in_quant("head", h)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def _run(model, t, s, params, x, *, train=False, observed=None):
    with intercepted(t, s, train=train, observed=observed):
        return model.apply({"params": params}, x)


def test_dynamic_ranges_quantize_every_layer_input():
    model, params, state, x = _mlp_setup()
    t = weight_quantization(8, activation_bits=4)
    s = t.init(params)
    assert s.ranges is None and s.alpha is None  # dynamic ranges need no state
    got = _run(model, t, s, params, x)
    want = _mlp_by_hand(params, x, lambda name, a: _fq(a, a.min(), a.max(), 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    ref = model.apply({"params": params}, x)
    assert not np.allclose(np.asarray(got), np.asarray(ref), atol=1e-3)  # 4 bits changes the logits
    assert weight_quantization(8).intercept is None  # weights only: the step runs the model plainly


def _np_per_token(a, bits=8):
    """Float64 NumPy per-token symmetric fake quantization: each row's absmax onto 2^(b-1) - 1/2,
    levels [-2^(b-1), 2^(b-1) - 1], round half to even."""
    a64 = np.asarray(a, np.float64)
    scale = np.maximum(np.abs(a64).max(axis=-1, keepdims=True) / (2 ** (bits - 1) - 0.5), 1e-8)
    return np.clip(np.round(a64 / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1) * scale


def test_per_token_ranges_against_numpy_and_independent_of_other_tokens():
    model, params, _, x = _mlp_setup(2)
    t = weight_quantization(8, activation_bits=8, activation_symmetric=True, activation_range="token",
                            rules=FLOAT_WEIGHTS)
    s = t.init(params)
    assert s.ranges is None and s.alpha is None  # nothing calibrated, nothing stored
    # Each row's largest magnitude made positive: -absmax sits exactly on a rounding tie (-127.5
    # levels) that float32 breaks by the scale's last bit; +absmax lands on 127 either way. (The
    # hidden layer's inputs follow a ReLU.)
    flat = x.reshape(x.shape[0], -1)
    x = x * jnp.sign(flat[jnp.arange(x.shape[0]), jnp.argmax(jnp.abs(flat), axis=1)])[:, None, None, None]
    x = x.at[5].multiply(1000.0)  # one token (row) with a huge range
    got = np.asarray(_run(model, t, s, params, x), np.float64)
    want = _mlp_by_hand(params, x, lambda name, a: jnp.asarray(_np_per_token(a), jnp.float32))
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-5)
    # Each row is quantized on its own grid: the other rows do not see the outlier row's range...
    alone = np.asarray(_run(model, t, s, params, jnp.delete(x, 5, axis=0)))
    np.testing.assert_array_equal(np.delete(got, 5, axis=0).astype(np.float32), alone)
    # ...while one grid for the whole batch ('dynamic') does: 8 bits cannot resolve the others.
    per_batch = weight_quantization(8, activation_bits=8, activation_symmetric=True, rules=FLOAT_WEIGHTS)
    coarse = np.asarray(_run(model, per_batch, per_batch.init(params), params, x))
    ref = np.asarray(model.apply({"params": params}, x))
    err = lambda out: np.abs(np.delete(out - ref, 5, axis=0)).max()
    assert err(got) < 0.05 * err(coarse), (err(got), err(coarse))


def test_per_token_input_gradient_passes_straight_through():
    """Each token's range holds its own values, so nothing is clipped: d(out)/d(x) is the float one."""
    model = nn.Dense(3)
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 5)), jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]
    t = weight_quantization(8, activation_bits=4, activation_range="token", rules=FLOAT_WEIGHTS)
    s = t.init(params)

    def loss(x, quantized):
        if not quantized:
            return jnp.sum(jnp.sin(model.apply({"params": params}, x)))
        with intercepted(t, s, train=False):
            return jnp.sum(jnp.sin(model.apply({"params": params}, x)))

    # the straight-through estimate: the float layer's gradient at the quantized input (each
    # row's affine 4-bit grid over its own min/max), passed to x unchanged
    xq = _fq(x, x.min(-1, keepdims=True), x.max(-1, keepdims=True), 4)
    want = jax.grad(loss)(xq, False)
    got = jax.grad(loss)(x, True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(got), np.asarray(jax.grad(loss)(x, False)), atol=1e-4)


def test_rules_choose_bits_per_layer():
    model, params, state, x = _mlp_setup(1)
    t = weight_quantization(8, activation_bits=8, rules=[("head", QuantSpec(activations=None)),
                                                         (".*", QuantSpec(weights=4, activations=3))])
    got = _run(model, t, t.init(params), params, x)
    want = _mlp_by_hand(params, x, lambda n, a: a if n == "head" else _fq(a, a.min(), a.max(), 3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    d = t.describe(params, t.init(params))
    assert (d["fc1/kernel"].bits, d["fc1/kernel"].act_bits) == (4, 3)
    assert (d["head/kernel"].bits, d["head/kernel"].act_bits) == (8, None)
    # A QuantSpec alone turns input quantization on, without activation_bits.
    only = weight_quantization(8, rules=[("fc1", QuantSpec(activations=6)), (".*", True)])
    assert only.intercept is not None and only.describe(params, only.init(params))["fc1/kernel"].act_bits == 6


def test_calibration_fills_the_state_ranges_and_update_moves_them():
    model, params, state, x = _mlp_setup(2)
    apply_fn = linen_apply_fn(model)
    batches = [{"image": x[:16]}, {"image": x[16:]}]
    t = weight_quantization(8, activation_bits=8, activation_range="calibrated", momentum=0.9, rules=FLOAT_WEIGHTS)
    s0 = t.init(params)
    assert sorted(s0.ranges) == ["fc1", "head"]
    s = calibrate_activations(t, s0, apply_fn, params, state, batches)
    flat = np.asarray(x).reshape(32, -1).astype(np.float64)
    hidden = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    np.testing.assert_allclose(float(s.ranges["fc1"]["min"]), flat.min(), rtol=1e-6)
    np.testing.assert_allclose(float(s.ranges["fc1"]["max"]), flat.max(), rtol=1e-6)
    np.testing.assert_allclose(float(s.ranges["head"]["max"]), hidden.max(), rtol=1e-5)
    # eval: the calibrated (not the batch) ranges are used, and nothing is observed
    small, st = x[:4], s.ranges
    observed = {}
    got = _run(model, t, s, params, small, observed=observed)
    want = _mlp_by_hand(params, small, lambda n, a: _fq(a, st[n]["min"], st[n]["max"], 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert observed == {}
    # train: the forward pass uses the EMA of the stored and the batch range, records the batch
    # range, and update folds it into the state the same way
    got = _run(model, t, s, params, small, train=True, observed=observed)
    np.testing.assert_allclose(float(observed["fc1"][0]), float(np.asarray(small).min()), rtol=1e-6)
    new = t.update(params, s, update_info(1, observed=observed)).ranges
    lo = 0.9 * float(st["fc1"]["min"]) + 0.1 * float(np.asarray(small).min())
    np.testing.assert_allclose(float(new["fc1"]["min"]), lo, rtol=1e-6)
    want = _mlp_by_hand(params, small, lambda n, a: _fq(a, new[n]["min"], new[n]["max"], 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # before calibration a range is unset and takes the first batch's
    first = t.update(params, s0, update_info(1, observed=observed)).ranges
    assert float(first["fc1"]["min"]) == float(observed["fc1"][0])


def test_ranges_move_by_ema_through_the_train_step():
    model, params, state, x = _mlp_setup(5)
    apply_fn = linen_apply_fn(model)
    t = chain(pruning(0.5), weight_quantization(8, activation_bits=8, activation_range="calibrated", momentum=0.5))
    opt = optax.sgd(0.0)  # the weights stay put: the ranges move by the batches alone
    st = init_train_state(params, opt, transform=t, model_state=state)
    st = st._replace(compression_state=calibrate_activations(t, st.compression_state, apply_fn, params, state,
                                                             [{"image": x[:8]}]))
    before = st.compression_state[1].ranges
    step = jax.jit(make_train_step(apply_fn, opt, transform=t))
    batch = {"image": x[8:] * 3.0, "label": np.zeros(24, np.int32)}
    st, _ = step(st, batch)
    after = st.compression_state[1].ranges
    flat = np.asarray(batch["image"]).reshape(24, -1)
    np.testing.assert_allclose(float(after["fc1"]["max"]), 0.5 * float(before["fc1"]["max"]) + 0.5 * flat.max(),
                               rtol=1e-6)
    assert st.model_state == {}  # nothing about activations in the model state


def test_observers_against_numpy():
    rng = np.random.default_rng(0)
    xs = [rng.standard_t(2, size=2000).astype(np.float32) for _ in range(3)]
    pct = percentile(99.0)
    acc = None
    for x in xs:
        s = jax.device_get(jax.jit(pct.summarize)(x))
        acc = s if acc is None else pct.combine(acc, s)
    lo, hi = pct.range(acc)
    np.testing.assert_allclose(float(hi), np.mean([np.percentile(x, 99.0) for x in xs]), rtol=1e-4)
    np.testing.assert_allclose(float(lo), np.mean([np.percentile(x, 1.0) for x in xs]), rtol=1e-4)
    ema = moving_average_minmax(0.5)
    a = ema.summarize(xs[0])
    for x in xs[1:]:
        a = ema.combine(a, ema.summarize(x))
    want = 0.25 * xs[0].max() + 0.25 * xs[1].max() + 0.5 * xs[2].max()
    np.testing.assert_allclose(float(ema.range(a)[1]), want, rtol=1e-6)
    # MSE clipping beats min/max on heavy tails at 4 bits
    x = xs[0]
    err = lambda r: float(np.mean((np.asarray(_fq(x, r[0], r[1], 4)) - x) ** 2))  # noqa: E731
    m = mse(4)
    best = err(m.range(m.summarize(x)))
    lo, hi = x.min(), x.max()
    assert best < 0.8 * err((lo, hi))
    for a in (0.25, 0.5, 0.75):  # points of its 64-step grid: the optimum is no worse
        assert best <= err((a * lo, a * hi)) + 1e-7


@pytest.fixture(scope="module")
def mnist_small(mnist_dir):
    ds = load_mnist(mnist_dir, download=False)
    return ds.train_images[:6000], ds.train_labels[:6000], ds.test_images[:2000], ds.test_labels[:2000]


def _train(apply_fn, params, model_state, transform, data, steps=300):
    xtr, ytr, xte, yte = data
    opt = optax.adam(2e-3)
    state = init_train_state(params, opt, transform=transform, model_state=model_state, rng=0)
    step = jax.jit(make_train_step(apply_fn, opt, transform=transform))
    rng = np.random.default_rng(0)
    for _ in range(steps):
        idx = rng.integers(0, len(ytr), 64)
        state, _ = step(state, {"image": xtr[idx], "label": ytr[idx]})
    ev = jax.jit(make_eval_step(apply_fn, transform=transform))
    return state, evaluate(ev, state, {"image": xte, "label": yte}, batch_size=500)["accuracy"]


@pytest.mark.slow  # W8A8 training steps run fast in tests/test_parallel.py and tests/test_recipe_seeds.py
def test_linen_cnn_trains_with_w8a8(mnist_small):
    model = LeNet5()
    params, ms = split_variables(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    w8a8 = weight_quantization(8, activation_bits=8)
    state, acc = _train(linen_apply_fn(model), params, ms, w8a8, mnist_small, steps=150)
    assert acc > 0.9, acc
    # the W8A8 model is on the grid: its first-layer kernel has <= 255 values per output channel
    k = np.asarray(w8a8.apply(state.params, state.compression_state)["conv1"]["kernel"])
    assert max(len(np.unique(k[..., c])) for c in range(k.shape[-1])) <= 255


def test_prune_int4_per_channel_int8_inputs_describe_what_the_model_runs():
    """One chain, one rule: prune 50%, int4 per-channel kernels, int8 layer inputs. The
    self-description matches the view (levels per channel, zeros, scales) and the forward pass."""
    model = LeNet5()
    params, ms = split_variables(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    t = chain(pruning(0.5), weight_quantization(8, rules=[(".*", QuantSpec(weights=4, activations=8))]))
    s = t.init(params)
    view = t.apply(params, s)
    described = t.describe(params, s)
    kernels = sorted(k for k in described)
    assert kernels == ["conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel", "head/kernel"]
    for path, spec in described.items():
        layer = path.split("/")[0]
        v = np.asarray(view[layer]["kernel"], np.float64)
        assert (spec.bits, spec.scheme, spec.channel_axis, spec.act_bits) == (4, "symmetric", -1, 8), path
        mask, scale = np.asarray(spec.mask), np.asarray(spec.scale, np.float64)
        assert mask.shape == v.shape and abs(mask.mean() - 0.5) < 0.01, path
        assert np.all(v[~mask] == 0.0), path  # zeros where pruned
        assert scale.shape == (1,) * (v.ndim - 1) + (v.shape[-1],), path  # one scale per output channel
        q = v / scale
        np.testing.assert_allclose(q, np.round(q), atol=1e-4, err_msg=path)
        assert np.abs(np.round(q)).max() <= 7, path  # narrow int4: -7..7
        per_channel = v.reshape(-1, v.shape[-1])
        assert max(len(np.unique(per_channel[:, c])) for c in range(v.shape[-1])) <= 16, path
    # The forward pass quantizes each selected layer's input to <= 256 levels of a uniform grid.
    seen = {}

    def capture(next_fun, args, kwargs, context):  # inside the transform's interceptor
        if context.method_name == "__call__" and isinstance(context.module, (nn.Dense, nn.Conv)):
            seen["/".join(context.module.path)] = args[0]
        return next_fun(*args, **kwargs)

    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 28, 28, 1)), jnp.float32)
    with intercepted(t, s, train=False), nn.intercept_methods(capture):
        model.apply({"params": view, **ms}, x, train=False)
    assert sorted(seen) == sorted(p.split("/")[0] for p in kernels)
    for layer, a in seen.items():
        levels = np.unique(np.asarray(a, np.float64))
        assert 16 < len(levels) <= 256, (layer, len(levels))
        steps = np.diff(levels) / np.diff(levels).min()
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3, err_msg=layer)


class NNXNet(nnx.Module):
    """A user's NNX model, not written with quantization in mind."""

    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), strides=(2, 2), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.fc = nnx.Linear(14 * 14 * 8, 64, rngs=rngs)
        self.head = nnx.Linear(64, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv(x)))
        x = nnx.relu(self.fc(x.reshape(x.shape[0], -1)))
        return self.head(x)


def test_nnx_hooks_quantize_inputs_and_leave_model_alone():
    model = NNXNet(nnx.Rngs(0))
    model.eval()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 28, 28, 1)), jnp.float32)
    q = quantize_nnx_activations(model, 4, rules=[("conv|fc", True), (".*", None)])
    h = _fq(x, x.min(), x.max(), 4)
    h = nnx.relu(model.bn(model.conv(h)))
    h = h.reshape(4, -1)
    h = nnx.relu(model.fc(_fq(h, h.min(), h.max(), 4)))
    want = model.head(h)  # the head stays in float by the rules
    np.testing.assert_allclose(np.asarray(q(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert model.fc.dot_general is jax.lax.dot_general  # the original is untouched


def test_nnx_model_trains_with_w8a8(mnist_small):
    accs = {}
    for quantized in (False, True):
        model = NNXNet(nnx.Rngs(0))
        model = quantize_nnx_activations(model, 8) if quantized else model
        graphdef, params, ms = nnx.split(model, nnx.Param, ...)
        t = weight_quantization(8) if quantized else None
        accs[quantized] = _train(nnx_apply_fn(graphdef), params, ms, t, mnist_small, steps=200)[1]
    assert accs[True] > 0.85 and abs(accs[True] - accs[False]) < 0.015, accs


def test_pact_forward_and_alpha_gradient_against_hand_derivation():
    """PACT levels are Trainable state: calibrated at the input max, trained by make_train_step
    with the paper's gradient (the upstream gradient summed where x >= alpha)."""
    model, params, state, x = _mlp_setup(3)
    apply_fn = linen_apply_fn(model)
    t = weight_quantization(8, activation_bits=4, activation_range="pact", rules=FLOAT_WEIGHTS)
    s = t.init(params)
    assert isinstance(s.alpha, Trainable) and float(s.alpha.value["head"]) == 10.0
    s = calibrate_activations(t, s, apply_fn, params, state, [{"image": x}])
    flat = np.asarray(x, np.float64).reshape(32, -1)
    hidden = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    # calibrated: each alpha is the max of its layer's input, so nothing is clipped at first
    np.testing.assert_allclose(float(s.alpha.value["fc1"]), flat.max(), rtol=1e-6)
    np.testing.assert_allclose(float(s.alpha.value["head"]), hidden.max(), rtol=1e-5)
    alphas = {"fc1": jnp.float32(0.8 * flat.max()), "head": jnp.float32(0.5 * hidden.max())}
    s = s._replace(alpha=Trainable(alphas))
    got = _run(model, t, s, params, x)
    want = _mlp_by_hand(params, x, lambda n, a: pact(a, alphas[n], 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # One SGD step on loss = mean over examples of sum(logits): alpha moves by -lr * dloss/dalpha,
    # and dloss/dalpha_head = (1/B) * sum over inputs h_j >= alpha of sum_k W_head[j, k].
    lr = 0.1
    opt = optax.sgd(lr)
    st = init_train_state(params, opt, transform=t, model_state=state)._replace(compression_state=s)
    step = jax.jit(make_train_step(apply_fn, opt, transform=t, loss_fn=lambda out, b: out.sum(-1), metrics_fn=None))
    st, _ = step(st, {"image": x})
    h = np.asarray(pact(jnp.asarray(flat, jnp.float32), alphas["fc1"], 4), np.float64)
    h = np.maximum(h @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    w_rows = np.asarray(params["head"]["kernel"], np.float64).sum(axis=1)
    clipped = h >= float(alphas["head"])
    assert clipped.any() and not clipped.all()
    want_g = float((clipped * w_rows).sum()) / len(flat)
    moved = float(alphas["head"]) - float(st.compression_state.alpha.value["head"])
    np.testing.assert_allclose(moved / lr, want_g, rtol=1e-4)
    assert float(jnp.abs(st.params["fc1"]["kernel"] - params["fc1"]["kernel"]).sum()) > 0  # weights train too


def test_activation_settings_bad_input():
    model, params, state, x = _mlp_setup(4)
    apply_fn = linen_apply_fn(model)
    with pytest.raises(ValueError, match="activation_alpha must be > 0"):
        weight_quantization(8, activation_bits=4, activation_range="pact", activation_alpha=0.0)
    with pytest.raises(ValueError, match="activation_range must be one of"):
        weight_quantization(8, activation_bits=4, activation_range="ema")
    with pytest.raises(ValueError, match="no symmetric grid"):
        weight_quantization(8, activation_bits=4, activation_range="pact", activation_symmetric=True)
    with pytest.raises(ValueError, match="per-rule activation bits"):
        weight_quantization(8, rules=[(".*", QuantSpec(activations=12))])
    with pytest.raises(ValueError, match="needs a transform that quantizes activations"):
        calibrate_activations(weight_quantization(8), None, apply_fn, params, state, [{"image": x}])
    t = weight_quantization(8, activation_bits=4, activation_range="pact", rules=[("head", None), (".*", True)])
    s = t.init(params)
    assert set(s.alpha.value) == {"fc1"}  # no alpha for a layer kept in float
    with pytest.raises(ValueError, match="no batches"):
        calibrate_activations(t, s, apply_fn, params, state, [])
    other = weight_quantization(8, activation_bits=4, activation_range="pact")  # other rules than s's
    with pytest.raises(ValueError, match="no PACT alpha for layer 'head'"):
        _run(model, other, s, params, x)


def test_linen_cnn_trains_with_w4_and_pact_a4(mnist_small):
    model = LeNet5()
    apply_fn = linen_apply_fn(model)
    params, ms = split_variables(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    t = weight_quantization(4, activation_bits=4, activation_range="pact")
    start = calibrate_activations(t, t.init(params), apply_fn, params, ms, [{"image": mnist_small[0][:256]}])
    xtr, ytr, xte, yte = mnist_small
    opt = optax.adam(2e-3)
    state = init_train_state(params, opt, transform=t, model_state=ms, rng=0)._replace(compression_state=start)
    step = jax.jit(make_train_step(apply_fn, opt, transform=t))
    rng = np.random.default_rng(0)
    for _ in range(150):
        idx = rng.integers(0, len(ytr), 64)
        state, _ = step(state, {"image": xtr[idx], "label": ytr[idx]})
    acc = evaluate(jax.jit(make_eval_step(apply_fn, transform=t)), state, {"image": xte, "label": yte},
                   batch_size=500)["accuracy"]
    assert acc > 0.9, acc
    a0, a1 = start.alpha.value, state.compression_state.alpha.value
    moved = [abs(float(a1[k]) - float(a0[k])) for k in a0]
    assert max(moved) > 1e-3, moved  # the clipping levels are trained


def test_nnx_calibrated_ranges_live_in_model_state():
    model = NNXNet(nnx.Rngs(1))
    rng = np.random.default_rng(1)
    batches = [jnp.asarray(rng.uniform(size=(8, 28, 28, 1)), jnp.float32) for _ in range(2)]
    q = quantize_nnx_activations(model, 8, momentum=0.9)
    cal = calibrate_nnx_activations(q, batches)
    assert q.conv.conv_general_dilated.min is None  # the input model is untouched
    xs = np.concatenate([np.asarray(b) for b in batches])
    np.testing.assert_allclose(float(cal.conv.conv_general_dilated.min[...]), xs.min(), rtol=1e-6)
    np.testing.assert_allclose(float(cal.conv.conv_general_dilated.max[...]), xs.max(), rtol=1e-6)
    model.eval()
    fc_in = [nnx.relu(model.bn(model.conv(b))).reshape(8, -1) for b in batches]
    np.testing.assert_allclose(float(cal.fc.dot_general.max[...]), max(float(h.max()) for h in fc_in), rtol=1e-5)
    graphdef, params, ms = nnx.split(cal, nnx.Param, ...)
    stats = jax.tree.leaves(nnx.filter_state(ms, QuantStat))
    assert len(stats) == 6  # min and max for conv, fc and head, in the model state
    apply_fn = nnx_apply_fn(graphdef)
    x = batches[0][:2] * 0.5  # a narrower batch: eval must still use the calibrated ranges
    got, new_ms = apply_fn(params, ms, {"image": x}, train=False)
    hooks = {n: (float(getattr(getattr(cal, n), a).min[...]), float(getattr(getattr(cal, n), a).max[...]))
             for n, a in (("conv", "conv_general_dilated"), ("fc", "dot_general"), ("head", "dot_general"))}
    h = nnx.relu(model.bn(model.conv(_fq(x, *hooks["conv"], 8)))).reshape(2, -1)
    h = nnx.relu(model.fc(_fq(h, *hooks["fc"], 8)))
    want = model.head(_fq(h, *hooks["head"], 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
    assert new_ms is ms
    # training mode: the EMA of the batch ranges, returned in the new model state
    _, trained = jax.jit(lambda p, s, x: apply_fn(p, s, {"image": x}, train=True))(params, ms, x)
    lo = trained["conv"]["conv_general_dilated"]["min"][...]
    np.testing.assert_allclose(float(lo), 0.9 * hooks["conv"][0] + 0.1 * float(x.min()), rtol=1e-5)


def test_nnx_calibration_bad_input():
    with pytest.raises(ValueError, match="no activation quantization hooks"):
        calibrate_nnx_activations(NNXNet(nnx.Rngs(0)), [jnp.zeros((1, 28, 28, 1))])
    q = quantize_nnx_activations(NNXNet(nnx.Rngs(0)), 8)
    with pytest.raises(ValueError, match="no batches"):
        calibrate_nnx_activations(q, [])
    with pytest.raises(ValueError, match="already has activation quantization hooks"):
        quantize_nnx_activations(q, 8)


def test_nnx_model_trains_with_calibrated_w8a8(mnist_small):
    q = quantize_nnx_activations(NNXNet(nnx.Rngs(0)), 8)
    cal = calibrate_nnx_activations(q, [mnist_small[0][i : i + 500] for i in range(0, 1000, 500)])
    cal.train()
    graphdef, params, ms = nnx.split(cal, nnx.Param, ...)
    state, acc = _train(nnx_apply_fn(graphdef), params, ms, weight_quantization(8), mnist_small, steps=200)
    assert acc > 0.85, acc
    before = jax.tree.leaves(nnx.filter_state(ms, QuantStat))
    after = jax.tree.leaves(nnx.filter_state(state.model_state, QuantStat))
    assert len(after) == len(before) and any(float(a) != float(b) for a, b in zip(after, before))
