"""Binary, ternary, LSQ and PACT against float64 NumPy derivations of the papers' formulas."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.quant import binarize, lsq_fake_quant, lsq_init_step, pact, ternarize, weight_quantization


def test_binary_is_sign_times_channel_mean_of_non_zeros():
    w = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    w[0, 0] = 0.0  # a pruned weight: stays 0 and does not lower its channel's scale
    a = np.abs(w.astype(np.float64))
    alpha = a.sum(axis=0) / (a != 0).sum(axis=0)
    want = np.sign(w) * alpha
    np.testing.assert_allclose(np.asarray(binarize(w)), want, rtol=1e-6)
    assert float(binarize(w)[0, 0]) == 0.0
    g = jax.grad(lambda a: (binarize(a) * 3.0).sum())(jnp.asarray(w))
    np.testing.assert_array_equal(np.asarray(g), np.full(w.shape, 3.0))


def test_ternary_follows_twn():
    w = np.random.default_rng(1).normal(size=(30, 3)).astype(np.float32)
    got = np.asarray(ternarize(w))
    for c in range(3):
        a = np.abs(w[:, c].astype(np.float64))
        delta = 0.7 * a.mean()
        keep = a > delta
        alpha = a[keep].mean()
        np.testing.assert_allclose(got[:, c], np.where(keep, np.sign(w[:, c]) * alpha, 0.0), rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-4, 1e4), kind=st.sampled_from(["binary", "ternary"]))
def test_binary_ternary_value_counts(seed, scale, kind):
    w = (np.random.default_rng(seed).normal(size=(9, 4)) * scale).astype(np.float32)
    q = np.asarray((binarize if kind == "binary" else ternarize)(w))
    for col in q.T:
        assert len(np.unique(col)) <= (2 if kind == "binary" else 3)


def _lsq_reference(x, s, qn, qp, up, g):
    """Esser et al. (2019) eq. 3: d xhat / d s and d xhat / d x, in float64."""
    x = x.astype(np.float64)
    v = x / s
    below, above = v <= -qn, v >= qp
    inside = ~(below | above)
    out = np.clip(np.round(v), -qn, qp) * s
    ds = np.where(inside, -v + np.round(v), np.where(below, -qn, qp))
    dx = inside.astype(np.float64)
    return out, (up * ds).sum() * g, up * dx


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_lsq_gradients_equal_paper_formulas(bits, signed):
    rng = np.random.default_rng(bits)
    x = rng.normal(size=(64, 10)).astype(np.float32)
    qn, qp = (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    s0 = float(lsq_init_step(x, bits, signed=signed))
    np.testing.assert_allclose(s0, 2 * np.abs(x.astype(np.float64)).mean() / np.sqrt(qp), rtol=1e-6)
    s = np.float32(s0 * {2: 0.8, 3: 0.8, 4: 0.2, 8: 0.05}[bits])  # some values clip
    up = rng.normal(size=x.shape).astype(np.float32)
    out, vjp = jax.vjp(lambda a, b: lsq_fake_quant(a, b, bits, signed=signed), jnp.asarray(x), jnp.float32(s))
    gx, gs = vjp(jnp.asarray(up))
    g = 1.0 / np.sqrt(x.size * qp)
    want_out, want_gs, want_gx = _lsq_reference(x, np.float64(s), qn, qp, up, g)
    np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gx), want_gx, atol=1e-6)
    np.testing.assert_allclose(float(gs), want_gs, rtol=1e-4)
    assert 0 < (np.asarray(gx) == 0).sum() < x.size


def test_pact_values_and_gradients():
    x = np.linspace(-2, 6, 81).astype(np.float32)
    alpha, bits = np.float32(4.0), 3
    out, vjp = jax.vjp(lambda a, b: pact(a, b, bits), jnp.asarray(x), jnp.float32(alpha))
    gx, ga = vjp(jnp.ones_like(jnp.asarray(x)))
    y = np.clip(x.astype(np.float64), 0, alpha)
    step = alpha / 7
    np.testing.assert_allclose(np.asarray(out), np.round(y / step) * step, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(gx), ((x >= 0) & (x < alpha)).astype(np.float32))
    assert float(ga) == float((x >= alpha).sum())


def test_weight_quantization_mixed_kinds_by_rule():
    rng = np.random.default_rng(3)
    p = {n: {"kernel": jnp.asarray(rng.normal(size=(40, 6)), jnp.float32)} for n in ("conv1", "mid", "tern", "head")}
    t = weight_quantization(4, rules=[("conv1|head", 8), ("tern", "ternary"), ("mid", 1), (".*", True)])
    v = t.apply(p, t.init(p))
    per_col = lambda a: max(len(np.unique(c)) for c in np.asarray(a).T)  # noqa: E731
    assert per_col(v["mid"]["kernel"]) == 2
    assert per_col(v["tern"]["kernel"]) == 3
    assert 15 < per_col(v["conv1"]["kernel"]) <= 255
    np.testing.assert_allclose(np.asarray(v["mid"]["kernel"]), np.asarray(binarize(p["mid"]["kernel"])))


def test_lsq_transform_trains_steps_in_the_train_step():
    import optax

    from jaxcompress.core.transform import trainable_part, with_trainable
    from jaxcompress.models import MLP
    from jaxcompress.quant import lsq_quantization
    from jaxcompress.train import init_train_state, linen_apply_fn, make_train_step, split_variables

    model = MLP(features=(16,), num_classes=4)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 3, 3, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 4, 64), jnp.int32)
    params, ms = split_variables(model.init(jax.random.key(0), x))
    t = lsq_quantization(3)
    opt = optax.sgd(0.05)
    state = init_train_state(params, opt, transform=t, model_state=ms)
    assert jax.tree.structure(state.params) == jax.tree.structure(params)  # the params keep their type
    s0 = state.compression_state
    step = jax.jit(make_train_step(linen_apply_fn(model), opt, transform=t))
    # the gradient for a step size is the paper's formula applied to d loss / d (quantized weight)
    view_loss = lambda v: jnp.mean(  # noqa: E731
        optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": v}, x), y))
    g = jax.grad(lambda tr: view_loss(t.apply(params, with_trainable(s0, tr))))(trainable_part(s0))
    up = np.asarray(jax.grad(view_loss)(t.apply(params, s0))["fc1"]["kernel"], np.float64)
    w, s = np.asarray(params["fc1"]["kernel"], np.float64), float(s0.steps.value["fc1"]["kernel"])
    v = w / s
    ds = np.where(v <= -4, -4.0, np.where(v >= 3, 3.0, -v + np.round(v)))
    want = (up * ds).sum() / np.sqrt(w.size * 3)
    np.testing.assert_allclose(float(g.steps.value["fc1"]["kernel"]), want, rtol=1e-4)
    # one SGD step of the train step moves the step size by -lr times that gradient
    state1, _ = step(state, {"image": x, "label": y})
    np.testing.assert_allclose(float(state1.compression_state.steps.value["fc1"]["kernel"]), s - 0.05 * want, rtol=1e-5)
    state = state1
    for _ in range(4):
        state, _ = step(state, {"image": x, "label": y})
    new_s = float(state.compression_state.steps.value["fc1"]["kernel"])
    assert new_s != pytest.approx(s)
    view = np.asarray(t.apply(state.params, state.compression_state)["fc1"]["kernel"])
    k = view / new_s
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert k.min() >= -4 and k.max() <= 3
    spec = t.describe(state.params, state.compression_state)["fc1/kernel"]
    assert (spec.bits, spec.scheme, float(spec.scale)) == (3, "lsq", new_s)
