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
    PACT_KEY,
    QuantStat,
    affine_qparams,
    calibrate_activations,
    calibrate_nnx_activations,
    fake_quant_affine,
    minmax,
    moving_average_minmax,
    mse,
    nnx_apply_fn,
    pact,
    pact_activations,
    pact_params,
    percentile,
    quantize_activations,
    quantize_nnx_activations,
    weight_quantization,
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
    got, _ = f(params, state, {"image": x}, train=False)
    want = _mlp_by_hand(params, x, lambda name, a: _fq(a, a.min(), a.max(), 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    ref, _ = linen_apply_fn(model)(params, state, {"image": x}, train=False)
    assert not np.allclose(np.asarray(got), np.asarray(ref), atol=1e-3)  # 4 bits changes the logits


def test_rules_choose_bits_per_layer():
    model, params, state, x = _mlp_setup(1)
    f = quantize_activations(linen_apply_fn(model), 8, rules=[("head", None), (".*", 3)])
    got, _ = f(params, state, {"image": x}, train=False)
    want = _mlp_by_hand(params, x, lambda n, a: a if n == "head" else _fq(a, a.min(), a.max(), 3))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)


def test_calibration_records_layer_input_ranges_and_static_eval():
    model, params, state, x = _mlp_setup(2)
    batches = [{"image": x[:16]}, {"image": x[16:]}]
    cal = calibrate_activations(linen_apply_fn(model), params, state, batches)
    flat = np.asarray(x).reshape(32, -1).astype(np.float64)
    hidden = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    np.testing.assert_allclose(float(cal["quant_stats"]["fc1"]["min"]), flat.min(), rtol=1e-6)
    np.testing.assert_allclose(float(cal["quant_stats"]["fc1"]["max"]), flat.max(), rtol=1e-6)
    np.testing.assert_allclose(float(cal["quant_stats"]["head"]["max"]), hidden.max(), rtol=1e-5)
    f = quantize_activations(linen_apply_fn(model), 8, momentum=0.9)
    # eval: the calibrated (not the batch) ranges are used, and nothing changes
    small = x[:4]
    got, new_state = f(params, cal, {"image": small}, train=False)
    st = cal["quant_stats"]
    want = _mlp_by_hand(params, small, lambda n, a: _fq(a, st[n]["min"], st[n]["max"], 8))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), new_state, cal))
    # train: ranges follow the moving average of the batch ranges
    _, trained = f(params, cal, {"image": small}, train=True, rng=jax.random.key(0))
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
    return state, evaluate(ev, state, {"image": xte, "label": yte}, batch_size=500)["accuracy"]


def test_linen_cnn_trains_with_w8a8(mnist_small):
    model = LeNet5()
    params, ms = split_variables(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    w8 = weight_quantization(8)
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
        t = weight_quantization(8) if quantized else None
        accs[quantized] = _train(nnx_apply_fn(graphdef), params, ms, t, mnist_small, steps=200)[1]
    assert accs[True] > 0.85 and abs(accs[True] - accs[False]) < 0.015, accs


def test_pact_forward_and_alpha_gradient_against_hand_derivation():
    model, params, state, x = _mlp_setup(3)
    apply_fn = linen_apply_fn(model)
    p = pact_params(apply_fn, params, state, {"image": x})
    flat = np.asarray(x, np.float64).reshape(32, -1)
    hidden = np.maximum(flat @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    # default init: each alpha is the max of its layer's input, so nothing is clipped at first
    np.testing.assert_allclose(float(p[PACT_KEY]["fc1"]), flat.max(), rtol=1e-6)
    np.testing.assert_allclose(float(p[PACT_KEY]["head"]), hidden.max(), rtol=1e-5)
    alphas = {"fc1": jnp.float32(0.8 * flat.max()), "head": jnp.float32(0.5 * hidden.max())}
    p = {**p, PACT_KEY: alphas}
    f = pact_activations(apply_fn, 4)
    got, _ = f(p, state, {"image": x}, train=False)
    want = _mlp_by_hand(params, x, lambda n, a: pact(a, alphas[n], 4))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # d sum(logits) / d alpha_head = sum over inputs h_j >= alpha of sum_k W_head[j, k]
    g = jax.grad(lambda q: f(q, state, {"image": x}, train=True, rng=jax.random.key(0))[0].sum())(p)
    h = np.asarray(pact(jnp.asarray(flat, jnp.float32), alphas["fc1"], 4), np.float64)
    h = np.maximum(h @ np.asarray(params["fc1"]["kernel"], np.float64) + np.asarray(params["fc1"]["bias"]), 0)
    w_rows = np.asarray(params["head"]["kernel"], np.float64).sum(axis=1)
    want_g = float(((h >= float(alphas["head"])) * w_rows).sum())
    assert (h >= float(alphas["head"])).any()
    np.testing.assert_allclose(float(g[PACT_KEY]["head"]), want_g, rtol=1e-4)
    # and the weights get their gradient through the clipped inputs
    assert float(jnp.abs(g["fc1"]["kernel"]).sum()) > 0


def test_pact_bad_input():
    model, params, state, x = _mlp_setup(4)
    apply_fn = linen_apply_fn(model)
    with pytest.raises(ValueError, match="pact_alpha"):
        pact_activations(apply_fn, 4)(params, state, {"image": x}, train=False)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        pact_params(apply_fn, params, state, {"image": x}, alpha=0.0)
    p = pact_params(apply_fn, params, state, {"image": x}, rules=[("head", None), (".*", True)])
    assert set(p[PACT_KEY]) == {"fc1"}
    with pytest.raises(ValueError, match="already hold"):
        pact_params(apply_fn, p, state, {"image": x})
    with pytest.raises(ValueError, match="no alpha for layer 'head'"):
        pact_activations(apply_fn, 4)(p, state, {"image": x}, train=False)  # rules differ from pact_params'
    with pytest.raises(ValueError, match="bits"):
        pact_activations(apply_fn, 9)


def test_linen_cnn_trains_with_w4_and_pact_a4(mnist_small):
    model = LeNet5()
    apply_fn = linen_apply_fn(model)
    params, ms = split_variables(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1))))
    params = pact_params(apply_fn, params, ms, {"image": mnist_small[0][:256]})
    state, acc = _train(pact_activations(apply_fn, 4), params, ms, weight_quantization(4), mnist_small, steps=150)
    assert acc > 0.9, acc
    moved = [abs(float(state.params[PACT_KEY][k]) - float(params[PACT_KEY][k])) for k in params[PACT_KEY]]
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
