"""Affine/symmetric fake quantization against PyTorch's fake-quant ops, bit for bit."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.quant import affine_qparams, fake_quant, fake_quant_affine, quant_range

torch = pytest.importorskip("torch")


def _boundary_inputs(scale, zp, qmin, qmax, n_random, rng):
    """Random values plus values exactly on, half a step around and beyond the grid ends."""
    ks = np.arange(qmin - zp - 2, qmax - zp + 3, dtype=np.float64)
    fr = np.array([-0.5, -0.25, 0.0, 0.25, 0.5])
    edge = ((ks[:, None] + fr[None, :]).ravel() * scale).astype(np.float32)
    rand = (rng.normal(size=n_random) * scale * (qmax - qmin) / 3).astype(np.float32)
    return np.concatenate([edge, rand])


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor_matches_torch_values_and_grads(bits, signed):
    rng = np.random.default_rng(bits)
    qmin, qmax = quant_range(bits, signed=signed)
    scale = np.float32(rng.uniform(0.01, 0.3))
    zp = 0 if signed else int(rng.integers(qmin, qmax + 1))
    x = _boundary_inputs(float(scale), zp, qmin, qmax, 500, rng)
    up = rng.normal(size=x.shape).astype(np.float32)

    t = torch.tensor(x, requires_grad=True)
    out_t = torch.fake_quantize_per_tensor_affine(t, float(scale), zp, qmin, qmax)
    (out_t * torch.tensor(up)).sum().backward()

    f = lambda a: fake_quant_affine(a, scale, zp, qmin, qmax)  # noqa: E731
    out_j, vjp = jax.vjp(f, jnp.asarray(x))
    (g_j,) = vjp(jnp.asarray(up))
    np.testing.assert_array_equal(np.asarray(out_j), out_t.detach().numpy())
    np.testing.assert_array_equal(np.asarray(g_j), t.grad.numpy())
    # the boundary rule: gradient passes exactly where round(x / s) + zp is in range
    q = np.round(x.astype(np.float32) * np.float32(1.0 / scale)) + zp
    np.testing.assert_array_equal(np.asarray(g_j) != 0, (q >= qmin) & (q <= qmax) & (up != 0))


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_channel_matches_torch(bits, axis, symmetric):
    rng = np.random.default_rng(100 + bits)
    x = (rng.normal(size=(6, 7, 5)) * rng.uniform(0.1, 3, size=(1, 7, 1))).astype(np.float32)
    ax = axis % x.ndim
    others = tuple(i for i in range(x.ndim) if i != ax)
    # qparams from a narrower range than the data, so some values clip
    lo, hi = 0.7 * x.min(axis=others), 0.7 * x.max(axis=others)
    scale, zp, qmin, qmax = affine_qparams(lo, hi, bits, symmetric=symmetric)
    scale, zp = np.asarray(scale), np.asarray(zp).astype(np.int32)
    up = rng.normal(size=x.shape).astype(np.float32)

    t = torch.tensor(x, requires_grad=True)
    out_t = torch.fake_quantize_per_channel_affine(
        t, torch.tensor(scale), torch.tensor(zp), ax, qmin, qmax
    )
    (out_t * torch.tensor(up)).sum().backward()
    f = lambda a: fake_quant_affine(a, scale, zp, qmin, qmax, axis=axis)  # noqa: E731
    out_j, vjp = jax.vjp(f, jnp.asarray(x))
    (g_j,) = vjp(jnp.asarray(up))
    np.testing.assert_array_equal(np.asarray(out_j), out_t.detach().numpy())
    np.testing.assert_array_equal(np.asarray(g_j), t.grad.numpy())
    assert 0 < (np.asarray(g_j) == 0).sum() < x.size  # clipping happened, not everywhere


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_match_torch_observer(bits, symmetric):
    """Scale and zero point equal torch's MinMaxObserver for the same integer range."""
    from torch.ao.quantization.observer import MinMaxObserver

    rng = np.random.default_rng(bits)
    x = (rng.normal(size=1000) * 2 + 0.3).astype(np.float32)
    qmin, qmax = quant_range(bits, signed=symmetric)
    obs = MinMaxObserver(
        dtype=torch.qint8 if symmetric else torch.quint8,
        qscheme=torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine,
        quant_min=qmin, quant_max=qmax,
    )
    obs(torch.tensor(x))
    s_t, z_t = obs.calculate_qparams()
    s, z, lo, hi = affine_qparams(x.min(), x.max(), bits, symmetric=symmetric)
    assert (lo, hi) == (qmin, qmax)
    np.testing.assert_allclose(float(s), float(s_t), rtol=1e-6)
    assert int(z) == int(z_t)


def test_identity_ste_passes_everything():
    x = jnp.linspace(-10, 10, 41)
    g = jax.grad(lambda a: fake_quant_affine(a, 0.1, 0, -8, 7, ste="identity").sum())(x)
    np.testing.assert_array_equal(np.asarray(g), np.ones(41))
    g = jax.grad(lambda a: fake_quant_affine(a, 0.1, 0, -8, 7).sum())(x)
    np.testing.assert_array_equal(np.asarray(g), (np.abs(np.round(np.asarray(x) * np.float32(10.0))) <= 7) * 1.0
                                  * (np.round(np.asarray(x) * np.float32(10.0)) >= -8))


def test_fake_quant_per_tensor_equals_float64_reference():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)).astype(np.float32)
    for bits in range(2, 9):
        got = np.asarray(fake_quant(x, bits, symmetric=False, channel_axis=None))
        lo, hi = min(x.min(), 0.0), max(x.max(), 0.0)
        n = 2**bits - 1
        s = np.float32((np.float32(hi) - np.float32(lo)) / np.float32(n))
        z = np.clip(0 - np.round(lo / s), 0, n)
        q = np.clip(np.round(x * np.float32(1 / s)) + z, 0, n)
        np.testing.assert_array_equal(got, ((q - z) * s).astype(np.float32))
        # the whole range is covered: error at most half a step
        assert np.max(np.abs(got - x)) <= s / 2 + 1e-6


def test_group_quantization_has_one_scale_per_group():
    rng = np.random.default_rng(1)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    w[:4] *= 100.0  # the first group is much larger than the second
    got = np.asarray(fake_quant(w, 4, group_size=4, group_axis=0))
    for g in range(2):
        for c in range(3):
            blk = w[4 * g : 4 * g + 4, c]
            s = np.abs(blk).max() / 7.0
            np.testing.assert_allclose(got[4 * g : 4 * g + 4, c], np.clip(np.round(blk / s), -7, 7) * s, rtol=1e-6)
    # per-tensor would flatten the small group to zero; per-group keeps it
    assert np.count_nonzero(np.asarray(fake_quant(w, 4))[4:]) < np.count_nonzero(got[4:])


@settings(max_examples=30, deadline=None)
@given(
    bits=st.integers(2, 8),
    symmetric=st.booleans(),
    seed=st.integers(0, 2**16),
    scale=st.floats(1e-3, 1e3),
    mode=st.sampled_from(["tensor", "channel", "group"]),
)
def test_at_most_2_pow_b_values_per_channel(bits, symmetric, seed, scale, mode):
    w = (np.random.default_rng(seed).standard_t(3, size=(16, 5)) * scale).astype(np.float32)
    kw = {"tensor": {"channel_axis": None}, "channel": {"channel_axis": -1},
          "group": {"group_size": 4, "group_axis": 0}}[mode]
    q = np.asarray(fake_quant(w, bits, symmetric=symmetric, **kw))
    assert np.all(np.isfinite(q))
    blocks = {"tensor": [q.ravel()], "channel": list(q.T),
              "group": [q[i : i + 4, c] for i in range(0, 16, 4) for c in range(5)]}[mode]
    for b in blocks:
        assert len(np.unique(b)) <= 2**bits
