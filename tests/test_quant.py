"""Quantization: symmetric fake quantization (STE) against PyTorch and the weight_quantization transform."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core import chain, update_info
from jaxcompress.quant import binarize, fake_quant, fake_quant_affine, quant_range, tensor_qparams, weight_quantization

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True, database=None)


def _f32(x):
    return jnp.asarray(np.asarray(x, np.float32))


def qmax(bits):
    return quant_range(bits, narrow=True)[1]


def sym_scale(x, bits, *, channel_axis=None):
    return tensor_qparams(x, bits, channel_axis=channel_axis).scale


def sym_levels(x, bits, *, channel_axis=None):
    """Integer levels of the symmetric view, and its scale."""
    s = sym_scale(x, bits, channel_axis=channel_axis)
    y = fake_quant(x, bits, channel_axis=channel_axis)
    levels = np.asarray(y) / np.asarray(s)
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-5)
    return jnp.asarray(np.round(levels).astype(np.int8)), s


def fq_sym(x, bits, *, channel_axis=None, scale=None):
    """The symmetric narrow-range fake quantization, from the tensor's range or a given scale."""
    if scale is None:
        return fake_quant(x, bits, channel_axis=channel_axis)
    m = qmax(bits)
    return fake_quant_affine(x, jnp.asarray(scale, jnp.float32), jnp.zeros(jnp.shape(scale)), -m, m)


# ---------------------------------------------------------------------------------------------
# golden values by hand
# ---------------------------------------------------------------------------------------------


def test_narrow_range():
    assert [quant_range(b, narrow=True) for b in range(2, 9)] == [(-m, m) for m in (1, 3, 7, 15, 31, 63, 127)]


def test_golden_2bit_per_tensor():
    # scale = 1 / 1; round half to even: +-0.5 -> 0
    x = _f32([-1.0, -0.6, -0.5, 0.0, 0.25, 0.5, 0.51, 1.0])
    assert fq_sym(x, 2).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    q, s = sym_levels(x, 2)
    assert q.dtype == jnp.int8 and q.tolist() == [-1, -1, 0, 0, 0, 0, 1, 1] and float(s.squeeze()) == 1.0


def test_golden_4bit_per_tensor():
    # max 3.5, qmax 7 -> scale 0.5; x/s = -7, 2, .5, 1.5, 2.5, 4, 7, -.4 -> -7, 2, 0, 2, 2, 4, 7, 0
    x = _f32([-3.5, 1.0, 0.25, 0.75, 1.25, 2.0, 3.5, -0.2])
    assert fq_sym(x, 4).tolist() == [-3.5, 1.0, 0.0, 1.0, 1.0, 2.0, 3.5, 0.0]
    assert sym_levels(x, 4)[0].tolist() == [-7, 2, 0, 2, 2, 4, 7, 0]


def test_golden_8bit_per_tensor():
    # max 1.27, qmax 127 -> scale 0.01; x/s = -127, .4, 1.6, 63.4, 127, -99.9
    x = _f32([-1.27, 0.004, 0.016, 0.634, 1.27, -0.999])
    q, s = sym_levels(x, 8)
    assert q.tolist() == [-127, 0, 2, 63, 127, -100]
    np.testing.assert_allclose(float(s.squeeze()), 0.01, rtol=1e-6)
    np.testing.assert_allclose(
        fq_sym(x, 8), np.array([-127, 0, 2, 63, 127, -100]) * 0.01, rtol=2e-7, atol=0
    )


def test_golden_2bit_per_channel_both_axes():
    x = _f32([[1.0, -2.0, 0.1], [-0.4, 1.5, -4.0]])
    # columns: max 1, 2, 4 -> levels {-m, 0, m}
    assert fq_sym(x, 2, channel_axis=-1).tolist() == [[1.0, -2.0, 0.0], [0.0, 2.0, -4.0]]
    assert fq_sym(x, 2, channel_axis=1).tolist() == [[1.0, -2.0, 0.0], [0.0, 2.0, -4.0]]
    # rows: max 2, 4; 1/2 = .5 -> 0 (half to even), 1.5/4 = .375 -> 0
    assert fq_sym(x, 2, channel_axis=0).tolist() == [[0.0, -2.0, 0.0], [0.0, 0.0, -4.0]]
    assert sym_scale(x, 2, channel_axis=0).tolist() == [[2.0], [4.0]]
    assert sym_scale(x, 2, channel_axis=-1).tolist() == [[1.0, 2.0, 4.0]]


def test_golden_4bit_per_channel():
    # column maxima 3.5, 7 -> scales 0.5, 1.0
    x = _f32([[3.5, -7.0], [1.75, 2.5], [-0.3, 6.4]])
    # col 0: x/s = 7, 3.5 -> 4, -0.6 -> -1; col 1: -7, 2.5 -> 2, 6.4 -> 6
    assert fq_sym(x, 4, channel_axis=-1).tolist() == [[3.5, -7.0], [2.0, 2.0], [-0.5, 6.0]]
    assert sym_levels(x, 4, channel_axis=-1)[0].tolist() == [[7, -7], [4, 2], [-1, 6]]


def test_golden_8bit_per_channel():
    x = _f32([[1.27, -0.254], [0.3333, 0.1], [-0.0149, 0.0011]])
    # scales 0.01 and 0.002: col 0 -> 127, 33.33 -> 33, -1.49 -> -1; col 1 -> -127, 50, 0.55 -> 1
    q, s = sym_levels(x, 8, channel_axis=-1)
    assert q.tolist() == [[127, -127], [33, 50], [-1, 1]]
    np.testing.assert_allclose(np.asarray(s), [[0.01, 0.002]], rtol=1e-6)
    np.testing.assert_allclose(
        fq_sym(x, 8, channel_axis=-1),
        [[1.27, -0.254], [0.33, 0.1], [-0.01, 0.002]], rtol=1e-6, atol=0,
    )


def test_scale_is_max_abs_over_qmax():
    x = np.random.default_rng(0).normal(size=(9, 6)).astype(np.float32)
    for bits in range(2, 9):
        np.testing.assert_allclose(
            np.asarray(sym_scale(jnp.asarray(x), bits, channel_axis=-1)).ravel(),
            np.abs(x).max(axis=0).astype(np.float64) / qmax(bits), rtol=2.5e-7,
        )
        np.testing.assert_allclose(
            float(sym_scale(jnp.asarray(x), bits).squeeze()), np.abs(x).max() / qmax(bits), rtol=2.5e-7
        )


def test_binarize_is_sign_times_mean_abs_and_keeps_zeros():
    x = _f32([-2.0, 0.5, 0.0, 1.5])  # mean |x| over the non-zeros = 4 / 3; sign(0) = 0
    np.testing.assert_allclose(binarize(x, channel_axis=None), [-4 / 3, 4 / 3, 0.0, 4 / 3], rtol=1e-6)
    w = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    expect = np.where(w >= 0, 1.0, -1.0) * np.abs(w.astype(np.float64)).mean(axis=0)
    np.testing.assert_allclose(binarize(jnp.asarray(w), channel_axis=-1), expect, rtol=1e-6)
    expect_t = np.where(w >= 0, 1.0, -1.0) * np.abs(w.astype(np.float64)).mean()
    np.testing.assert_allclose(binarize(jnp.asarray(w), channel_axis=None), expect_t, rtol=1e-6)
    # weight_quantization(1) is binarize
    p = {"k": jnp.asarray(w)}
    np.testing.assert_array_equal(weight_quantization(1).apply(p, None)["k"], binarize(p["k"]))
    # binary STE passes the gradient everywhere
    g = jax.grad(lambda v: jnp.sum(binarize(v, channel_axis=None) * 3.0))(jnp.asarray(w))
    np.testing.assert_array_equal(g, np.full(w.shape, 3.0, np.float32))


# ---------------------------------------------------------------------------------------------
# torch as an oracle
# ---------------------------------------------------------------------------------------------


def _torch_fq_per_tensor(torch, x, scale, bits):
    m = qmax(bits)
    xt = torch.tensor(x, requires_grad=True)
    yt = torch.fake_quantize_per_tensor_affine(xt, float(scale), 0, -m, m)
    yt.sum().backward()
    return yt.detach().numpy(), xt.grad.numpy()


def _torch_fq_per_channel(torch, x, scale, bits, axis):
    m = qmax(bits)
    xt = torch.tensor(x, requires_grad=True)
    sc = torch.tensor(np.asarray(scale, np.float32).ravel())
    zp = torch.zeros(sc.numel(), dtype=torch.int32)
    yt = torch.fake_quantize_per_channel_affine(xt, sc, zp, axis, -m, m)
    yt.sum().backward()
    return yt.detach().numpy(), xt.grad.numpy()


def _assert_forward_matches(got, want, x, scale, bits):
    got, want = np.asarray(got), np.asarray(want)
    inside = np.abs(np.round(x / scale)) <= qmax(bits)
    # inside the range: bit-exact
    np.testing.assert_array_equal(got[inside], want[inside])
    # clipped values: equal up to float32 rounding of |x| (exactness is checked in
    # test_clipped_values_lie_exactly_on_the_grid)
    np.testing.assert_allclose(got[~inside], want[~inside], rtol=0, atol=1e-6 * max(1.0, np.abs(x).max()))


def _boundary_values(bits, s):
    m = qmax(bits)
    k = np.array([m, m + 0.5, m - 0.5, m + 0.49, m + 0.51, m + 3.0, 0.5, 1.5], np.float64)
    return np.concatenate([k, -k]) * s


@pytest.mark.parametrize("bits", range(2, 9))
def test_per_tensor_matches_torch_values_and_gradients(bits):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(100 + bits)
    x = rng.normal(size=(24, 16)).astype(np.float32)
    jx = jnp.asarray(x)
    scale = np.float32(sym_scale(jx, bits).squeeze())
    want_y, want_g = _torch_fq_per_tensor(torch, x, scale, bits)
    got_g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits)))(jx)
    np.testing.assert_array_equal(fq_sym(jx, bits), want_y)
    np.testing.assert_array_equal(got_g, want_g)
    assert np.all(want_g == 1.0)  # a max-abs scale puts every value inside

    # a fixed, smaller scale: clipping happens; values exactly at the boundary included
    for s in (np.float32(scale * 0.37), np.float32(2.0**-4)):
        xs = np.concatenate([x.ravel(), _boundary_values(bits, float(s)).astype(np.float32)])
        want_y, want_g = _torch_fq_per_tensor(torch, xs, s, bits)
        got_y = fq_sym(jnp.asarray(xs), bits, scale=s)
        got_g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits, scale=s)))(jnp.asarray(xs))
        _assert_forward_matches(got_y, want_y, xs, s, bits)
        np.testing.assert_array_equal(got_g, want_g)
        assert 0 < want_g.sum() < want_g.size  # both 1s and 0s occur


def test_boundary_gradients_by_hand():
    # bits 4, scale 1/16: qmax * s = 7/16. |x/s| = 7 -> inside; 7.5 -> rounds to 8 -> clipped;
    # 7.49 -> 7 inside; 6.5 -> 6 inside.
    s = np.float32(2.0**-4)
    x = _f32(np.array([7.0, 7.5, 7.49, 6.5, -7.0, -7.5, -7.49, 10.0]) / 16)
    g = jax.grad(lambda v: jnp.sum(fq_sym(v, 4, scale=s)))(x)
    assert g.tolist() == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0]
    y = fq_sym(x, 4, scale=s)
    np.testing.assert_array_equal(y, np.array([7, 7, 7, 6, -7, -7, -7, 7], np.float32) / 16)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_matches_torch_values_and_gradients(bits, axis):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(200 + bits)
    x = rng.normal(size=(12, 10)).astype(np.float32)
    jx = jnp.asarray(x)
    scale = np.asarray(sym_scale(jx, bits, channel_axis=axis))  # keepdims, float32
    want_y, want_g = _torch_fq_per_channel(torch, x, scale, bits, axis % 2)
    np.testing.assert_array_equal(fq_sym(jx, bits, channel_axis=axis), want_y)
    got_g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits, channel_axis=axis)))(jx)
    np.testing.assert_array_equal(got_g, want_g)

    small = (scale * np.float32(0.4)).astype(np.float32)
    want_y, want_g = _torch_fq_per_channel(torch, x, small, bits, axis % 2)
    got_y = fq_sym(jx, bits, scale=small)
    got_g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits, scale=small)))(jx)
    _assert_forward_matches(got_y, want_y, x, small, bits)
    np.testing.assert_array_equal(got_g, want_g)
    assert 0 < want_g.sum() < want_g.size

    # dyadic per-channel scales with every channel holding values exactly at the boundary
    ax = axis % 2
    n_ch = x.shape[ax]
    dyadic = (2.0 ** -(np.arange(n_ch) % 5 + 2)).astype(np.float32)
    dyadic_kd = dyadic.reshape((n_ch, 1) if ax == 0 else (1, n_ch))
    b = np.stack([_boundary_values(bits, float(sc)) for sc in dyadic], axis=ax).astype(np.float32)
    xb = np.concatenate([x, b], axis=1 - ax)
    want_y, want_g = _torch_fq_per_channel(torch, xb, dyadic, bits, ax)
    got_y = fq_sym(jnp.asarray(xb), bits, scale=dyadic_kd)
    got_g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits, scale=dyadic_kd)))(jnp.asarray(xb))
    _assert_forward_matches(got_y, want_y, xb, dyadic_kd, bits)
    np.testing.assert_array_equal(got_g, want_g)
    # on the boundary rows/columns: inside iff |round_half_even(x / s)| <= qmax, e.g. qmax + 0.49 in,
    # qmax + 0.5 out (qmax is odd, so the tie rounds up to the even qmax + 1)
    gb = np.asarray(got_g).take(np.arange(x.shape[1 - ax], xb.shape[1 - ax]), axis=1 - ax)
    levels = _boundary_values(bits, 1.0)
    pattern = (np.abs(np.round(levels)) <= qmax(bits)).astype(np.float32)
    assert pattern[:6].tolist() == [1, 0, 1, 1, 0, 0]
    np.testing.assert_array_equal(gb, np.broadcast_to(pattern if ax == 0 else pattern[:, None], gb.shape))


# A forward value written as x + stop_gradient(dq - x) would round for a clipped value far
# outside the range (0.69999695 instead of 0.7); the fake-quant arithmetic returns dq exactly.
def test_clipped_values_lie_exactly_on_the_grid():
    s = np.float32(0.1)
    x = _f32([100.1234, -57.3, 3.3, 0.71])
    y = np.asarray(fq_sym(x, 4, scale=s))
    edge = np.float32(7) * s  # what torch returns: qmax * scale in float32
    np.testing.assert_array_equal(y, np.array([edge, -edge, edge, edge], np.float32))


# ---------------------------------------------------------------------------------------------
# STE and grid properties
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits,axis", [(2, None), (3, -1), (4, 0), (8, -1), (8, None)])
def test_ste_gradient_is_identity_inside(bits, axis):
    rng = np.random.default_rng(bits)
    x = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    g = jax.grad(lambda v: jnp.sum(w * fq_sym(v, bits, channel_axis=axis)))(x)
    np.testing.assert_array_equal(g, w)


_jit_fake_quant_per_channel = jax.jit(lambda x, bits: fq_sym(x, bits, channel_axis=-1), static_argnums=1)


@SETTINGS
@given(
    bits=st.integers(2, 8),
    rows=st.sampled_from([1, 2, 5, 16, 33]),
    cols=st.sampled_from([1, 3, 6]),
    seed=st.integers(0, 2**16),
    zero_frac=st.sampled_from([0.0, 0.3, 0.9]),
    magnitude=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_per_channel_grid_property(bits, rows, cols, seed, zero_frac, magnitude):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(rows, cols)) * magnitude).astype(np.float32)
    x[rng.random(size=x.shape) < zero_frac] = 0.0
    y = np.asarray(_jit_fake_quant_per_channel(jnp.asarray(x), bits))  # jitted: one compile per shape
    assert np.all(np.isfinite(y))
    assert np.all(y[x == 0] == 0.0)  # zeros map to zero
    scale = np.asarray(sym_scale(jnp.asarray(x), bits, channel_axis=-1))
    levels = y / scale
    np.testing.assert_allclose(levels, np.round(levels), atol=1e-4)  # on the grid
    assert np.all(np.abs(np.round(levels)) <= qmax(bits))
    for c in range(cols):
        assert np.unique(y[:, c]).size <= 2**bits - 1
        # every value is within half a step of the input (nothing clips with a max-abs scale)
        assert np.all(np.abs(y[:, c] - x[:, c]) <= 0.5 * scale[0, c] * (1 + 1e-5))


@pytest.mark.parametrize("bits", range(2, 9))
def test_all_zero_tensor_gives_zeros_without_nan(bits):
    z = jnp.zeros((4, 3), jnp.float32)
    for axis in (None, -1):
        y = fq_sym(z, bits, channel_axis=axis)
        assert y.tolist() == [[0.0] * 3] * 4
        g = jax.grad(lambda v: jnp.sum(fq_sym(v, bits, channel_axis=axis)))(z)
        assert np.all(np.asarray(g) == 1.0)
    # a channel of zeros next to a non-zero channel
    x = _f32([[0.0, 1.0], [0.0, -0.5]])
    y = fq_sym(x, bits, channel_axis=-1)
    assert np.all(np.isfinite(np.asarray(y))) and np.asarray(y)[:, 0].tolist() == [0.0, 0.0]


def test_one_bit_all_zero_is_zero():
    y = np.asarray(binarize(jnp.zeros(4), channel_axis=None))
    assert np.all(y == 0.0)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,exc", [(1, ValueError), (9, ValueError), (-2, ValueError),
                                     (2.5, TypeError), (True, TypeError), ("8", TypeError)])
def test_bits_errors_name_bits(bad, exc):
    x = jnp.ones((2, 2))
    for fn in (fake_quant, tensor_qparams):
        with pytest.raises(exc, match=r"^bits must be"):
            fn(x, bad)
    if bad != 1:
        with pytest.raises(ValueError if bad == "8" else exc, match=r"^bits must be"):
            weight_quantization(bad)


@pytest.mark.parametrize("axis", [2, -3, 5])
def test_channel_axis_out_of_range(axis):
    with pytest.raises(ValueError, match=rf"channel_axis={axis} does not exist for an array with 2 dimensions"):
        fake_quant(jnp.ones((2, 3)), 4, channel_axis=axis)
    with pytest.raises(ValueError, match="channel_axis"):
        tensor_qparams(jnp.ones((2, 3)), 4, channel_axis=axis)
    with pytest.raises(ValueError, match="channel_axis"):
        binarize(jnp.ones((2, 3)), channel_axis=axis)


# ---------------------------------------------------------------------------------------------
# weight_quantization transform
# ---------------------------------------------------------------------------------------------


def _params(seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32)  # noqa: E731
    return {
        "Conv_0": {"kernel": f(3, 3, 2, 4), "bias": f(4)},
        "Dense_0": {"kernel": f(8, 6), "bias": f(6)},
        "Dense_1": {"kernel": f(6, 3), "bias": f(3)},
    }


def test_weight_quantization_kernels_quantized_biases_untouched():
    p = _params(0)
    t = weight_quantization(4)
    s = t.init(p)
    view = t.apply(p, s)
    for name in p:
        k = np.asarray(p[name]["kernel"], np.float64)
        v = np.asarray(view[name]["kernel"])
        # independent float64 derivation, per output channel (last axis)
        red = tuple(range(k.ndim - 1))
        scale = np.abs(k).max(axis=red, keepdims=True) / 7
        np.testing.assert_allclose(v, np.clip(np.round(k / scale), -7, 7) * scale, rtol=1e-6)
        for c in range(k.shape[-1]):
            assert np.unique(v[..., c]).size <= 15
        np.testing.assert_array_equal(view[name]["bias"], p[name]["bias"])
    assert int(t.update(p, s, update_info(1)).count) == 1
    # the straight-through view passes gradients unchanged to every leaf
    g = jax.grad(lambda q: sum(jnp.sum(x) for x in jax.tree.leaves(t.apply(q, s))))(p)
    assert all(bool(np.all(np.asarray(x) == 1.0)) for x in jax.tree.leaves(g))


def test_weight_quantization_per_rule_int_bits_override():
    p = _params(1)
    rules = [("^Dense_1/", None), ("^Dense_0/", 2), ("kernel", True)]
    t = weight_quantization(8, rules=rules)
    assert {k: v.bits for k, v in t.describe(p, t.init(p)).items()} == {"Conv_0/kernel": 8, "Dense_0/kernel": 2}
    view = t.apply(p, None)
    np.testing.assert_array_equal(view["Dense_0"]["kernel"], fq_sym(p["Dense_0"]["kernel"], 2, channel_axis=-1))
    np.testing.assert_array_equal(view["Conv_0"]["kernel"], fq_sym(p["Conv_0"]["kernel"], 8, channel_axis=-1))
    np.testing.assert_array_equal(view["Dense_1"]["kernel"], p["Dense_1"]["kernel"])
    d0 = np.asarray(view["Dense_0"]["kernel"])
    for c in range(d0.shape[-1]):
        col = np.asarray(p["Dense_0"]["kernel"])[:, c]
        assert set(np.unique(np.abs(d0[:, c]))) <= {0.0, np.float32(np.abs(col).max())}
    with pytest.raises(ValueError, match="per-rule bits must be in 1..8"):
        weight_quantization(8, rules=[("kernel", 12)]).init(p)
    with pytest.raises(TypeError, match="per-rule bits must be an int"):
        weight_quantization(8, rules=[("kernel", 0.5)]).init(p)


def test_weight_quantization_per_tensor_uses_one_scale():
    p = _params(2)
    t = weight_quantization(3, channel_axis=None)
    view = t.apply(p, t.init(p))
    for name in p:
        k = np.asarray(p[name]["kernel"], np.float64)
        v = np.asarray(view[name]["kernel"])
        scale = np.abs(k).max() / 3
        np.testing.assert_allclose(v, np.clip(np.round(k / scale), -3, 3) * scale, rtol=1e-6)
        assert np.unique(v).size <= 7  # one grid for the whole tensor
        np.testing.assert_array_equal(v, fq_sym(p[name]["kernel"], 3))
    with pytest.raises(TypeError, match="symmetric and narrow must be bools"):
        weight_quantization(8, symmetric=1)


def test_weight_quantization_channel_axis_0():
    p = {"k": _f32([[1.0, -2.0, 0.1], [-0.4, 1.5, -4.0]])}
    t = weight_quantization(2, channel_axis=0)
    assert t.apply(p, t.init(p))["k"].tolist() == [[0.0, -2.0, 0.0], [0.0, 0.0, -4.0]]


def test_quantization_after_pruning_keeps_zeros_exact():
    from jaxcompress.prune import pruning

    p = _params(3)
    t = chain(pruning(0.75), weight_quantization(3))
    s = t.init(p)
    view = t.apply(p, s)
    for name in p:
        m = np.asarray(s[0].masks[name]["kernel"])
        v = np.asarray(view[name]["kernel"])
        assert np.all(v[~m] == 0.0)
        assert int(np.sum(v == 0)) >= round(0.75 * m.size)
