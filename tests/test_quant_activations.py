"""Activation quantization by interception (Linen) and op hooks (NNX); calibration; W8A8 QAT."""
import flax.linen as nn
import flax.nnx as nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.data import load_mnist
from jaxcompress.models import LeNet5, MLP
from jaxcompress.quant import (
    affine_qparams,
    calibrate_activations,
    fake_quant_affine,
    minmax,
    moving_average_minmax,
    mse,
    nnx_apply_fn,
    percentile,
    quantize_activations,
    quantize_nnx_activations,
    quantize_weights,
)
from jaxcompress.train import evaluate, init_train_state, linen_apply_fn, make_eval_step, make_train_step
from jaxcompress.train import split_variables


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


def test_dynamic_ranges_quantize_every_layer_input():
    model, params, state, x = _mlp_setup()
    f = quantize_activations(linen_apply_fn(model), 4)
    got, _ = f(params, state, x, train=False)
    want = _mlp_by_hand(params, x, lambda name, a: _fq(a, a.min(), a.max(), 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    ref, _ = linen_apply_fn(model)(params, state, x, train=False)
    assert not np.allclose(np.asarray(got), np.asarray(ref), atol=1e-3)  # 4 bits changes the logits


def test_rules_choose_bits_per_layer():
    model, params, state, x = _mlp_setup(1)
    f = quantize_activations(linen_apply_fn(model), 8, rules=[("head", None), (".*", 3)])
    got, _ = f(params, state, x, train=False)
    want = _mlp_by_hand(params, x, lambda n, a: a if n == "head" else _fq(a, a.min(), a.max(), 3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_calibration_records_layer_input_ranges_and_static_eval():
    model, params, state, x = _mlp_setup(2)
    batches = [x[:16], x[16:]]
    cal = calibrate_activations(linen_apply_fn(model), params, state, batches)
    flat = np.asarray(x).reshape(32, -1).astype(np.float64)
    hidden = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    np.testing.assert_allclose(float(cal["quant_stats"]["fc1"]["min"]), flat.min(), rtol=1e-6)
    np.testing.assert_allclose(float(cal["quant_stats"]["fc1"]["max"]), flat.max(), rtol=1e-6)
    np.testing.assert_allclose(float(cal["quant_stats"]["head"]["max"]), hidden.max(), rtol=1e-5)
    f = quantize_activations(linen_apply_fn(model), 8, momentum=0.9)
    # eval: the calibrated (not the batch) ranges are used, and nothing changes
    small = x[:4]
    got, new_state = f(params, cal, small, train=False)
    st = cal["quant_stats"]
    want = _mlp_by_hand(params, small, lambda n, a: _fq(a, st[n]["min"], st[n]["max"], 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), new_state, cal))
    # train: ranges follow the moving average of the batch ranges
    _, trained = f(params, cal, small, train=True, rng=jax.random.key(0))
    lo = 0.9 * float(st["fc1"]["min"]) + 0.1 * float(np.asarray(small).min())
    np.testing.assert_allclose(float(trained["quant_stats"]["fc1"]["min"]), lo, rtol=1e-6)


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
    return state, evaluate(ev, state, xte, yte, batch_size=500)["accuracy"]


def test_linen_cnn_trains_with_w8a8(mnist_small):
    model = LeNet5()
    params, ms = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    w8 = quantize_weights(8)
    a8 = quantize_activations(linen_apply_fn(model), 8)
    state, acc = _train(a8, params, ms, w8, mnist_small, steps=150)
    assert acc > 0.9, acc
    # the W8A8 model is on the grid: its first-layer kernel has <= 255 values per output channel
    k = np.asarray(w8.apply(state.params, state.compression_state)["conv1"]["kernel"])
    assert max(len(np.unique(k[..., c])) for c in range(k.shape[-1])) <= 255


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
        t = quantize_weights(8) if quantized else None
        accs[quantized] = _train(nnx_apply_fn(graphdef), params, ms, t, mnist_small, steps=200)[1]
    assert accs[True] > 0.85 and abs(accs[True] - accs[False]) < 0.015, accs
