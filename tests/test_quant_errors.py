"""Bad input: clear errors, or documented safe behaviour (no NaN from zero ranges)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.quant import (
    affine_qparams,
    binarize,
    check_finite,
    fake_quant,
    fake_quant_affine,
    lsq_fake_quant,
    weight_quantization,
    ternarize,
    weight_sharing,
)


@pytest.mark.parametrize("bits", [0, 9, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="bits must be in"):
        fake_quant(jnp.ones((2, 2)), bits)
    with pytest.raises(ValueError, match="bits"):
        weight_quantization(bits)
    with pytest.raises(ValueError, match="activation_bits"):
        weight_quantization(8, activation_bits=bits)


def test_bits_wrong_type_and_bad_rule_values():
    with pytest.raises(TypeError, match="bits must be an int"):
        fake_quant(jnp.ones((2, 2)), 4.0)
    with pytest.raises(ValueError, match="'binary' or 'ternary'"):
        weight_quantization("quaternary")
    t = weight_quantization(8, rules=[(".*", 12)])
    with pytest.raises(ValueError, match="per-rule bits"):
        t.init({"k": jnp.ones((2, 2))})


def test_missing_axis_is_named():
    x = jnp.ones((3, 4))
    with pytest.raises(ValueError, match=r"channel_axis=2 does not exist .* \[-2, 1\]"):
        fake_quant(x, 8, channel_axis=2)
    with pytest.raises(ValueError, match="axis=5 does not exist"):
        fake_quant_affine(x, jnp.ones(4), jnp.zeros(4), -8, 7, axis=5)
    with pytest.raises(ValueError, match="channel_axis=-3 does not exist"):
        binarize(x, channel_axis=-3)
    with pytest.raises(ValueError, match="channel_axis"):
        weight_quantization(8, channel_axis=3).init({"k": x})  # caught at init, not at the first step
    with pytest.raises(ValueError, match="scale has 3 values but axis 1"):
        fake_quant_affine(x, jnp.ones(3), jnp.zeros(3), -8, 7, axis=1)
    with pytest.raises(ValueError, match="group_size=3 does not divide"):
        fake_quant(jnp.ones((8, 2)), 4, group_size=3, group_axis=0)
    with pytest.raises(ValueError, match="ste must be one of"):
        fake_quant(x, 8, ste="smooth")


@pytest.mark.parametrize("fn", [
    lambda x: fake_quant(x, 8), lambda x: fake_quant(x, 4, symmetric=False, channel_axis=-1),
    lambda x: fake_quant(x, 2, group_size=2, group_axis=0), binarize, ternarize,
    lambda x: lsq_fake_quant(x, jnp.float32(0.0), 4),
])
@pytest.mark.parametrize("value", [0.0, 3.5])
def test_zero_and_constant_tensors_give_no_nan(fn, value):
    x = jnp.full((4, 3), value, jnp.float32)
    out, g = jax.value_and_grad(lambda a: jnp.sum(fn(a)))(x)
    y = np.asarray(fn(x))
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(np.asarray(g))) and np.isfinite(float(out))
    if value == 0.0:
        np.testing.assert_array_equal(y, 0.0)
    s, z, _, _ = affine_qparams(value, value, 8)
    assert float(s) >= np.float32(1e-8) and np.isfinite(float(z))


def test_non_finite_weights():
    w = np.ones((3, 3), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(ValueError, match="1 non-finite values"):
        check_finite("params['fc']['kernel']", w)
    check_finite("ok", np.ones(3))
    # documented behaviour inside jit: NaN stays NaN (visible, not silently zeroed); inf clips
    y = np.asarray(fake_quant_affine(jnp.array([np.nan, np.inf, -np.inf, 1.0]), 0.1, 0, -128, 127))
    assert np.isnan(y[0]) and y[1] == pytest.approx(12.7) and y[2] == pytest.approx(-12.8) and y[3] == pytest.approx(1.0)


def test_quant_range_and_sharing_arguments():
    with pytest.raises(ValueError, match="quant_min=5 must be < quant_max=5"):
        fake_quant_affine(jnp.ones(2), 0.1, 0, 5, 5)
    with pytest.raises(ValueError, match="clusters must be >= 2"):
        weight_sharing(1)
    with pytest.raises(TypeError, match="clusters must be an int"):
        weight_sharing(4.0)
    with pytest.raises(ValueError, match="momentum"):
        weight_quantization(8, activation_bits=8, activation_range="calibrated", momentum=1.5)
