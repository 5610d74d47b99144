"""Integer arithmetic of one layer: quantize, int8 x int8 -> int32 products, requantize, fold BatchNorm.

The real value of a code is ``r = S (q - Z)`` (Jacob et al. 2018, eq. 1). A product of an input
``x = S_x (q_x - Z_x)`` and symmetric weights ``w = S_w q_w`` (``Z_w = 0``, one ``S_w`` per
output channel) is ``S_x S_w (sum q_x q_w - Z_x sum q_w)``: the sum ``sum q_x q_w`` runs in int32
on int8 codes (:func:`int8_dot`, :func:`int8_conv`) and the zero-point term is a constant per
output channel. :func:`requantize` maps an int32 accumulator straight onto the next layer's
8-bit grid (the paper's ``M = S_x S_w / S_out``).

Input codes are signed: an unsigned grid ``[0, 255]`` with zero point ``Z`` is the signed grid
``[-128, 127]`` with zero point ``Z - 128`` (the same real values), so both of
the activation quantizer's grids (affine and symmetric) run on int8.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

def quantize(x, scale, zero_point, quant_min: int, quant_max: int) -> jax.Array:
    """Integer codes of ``x`` on the grid ``scale * (q - zero_point)``, as int32.

    The arithmetic is :func:`~jaxcompress.quant.affine.fake_quant_affine`'s (``round(x * (1 /
    scale)) + zero_point`` in float32, then clipped), so ``scale * (q - zero_point)`` is exactly
    the fake-quantized ``x``.

    Example:
      >>> import jax.numpy as jnp
      >>> quantize(jnp.array([-1.0, 0.26, 3.0]), 0.5, 1, 0, 3).tolist()
      [0, 2, 3]
    """
    s = jnp.asarray(scale, jnp.float32)
    q = jnp.round(jnp.asarray(x, jnp.float32) * (1.0 / s)) + jnp.asarray(zero_point, jnp.float32)
    return jnp.clip(q, quant_min, quant_max).astype(jnp.int32)


def int8_dot(xq: jax.Array, wq: jax.Array) -> jax.Array:
    """``xq @ wq`` over ``xq``'s last axis and ``wq``'s first, int8 x int8 accumulated in int32.

    Example:
      >>> import jax.numpy as jnp
      >>> a = jnp.array([[127, -128]], jnp.int8)
      >>> int8_dot(a, jnp.array([[127], [-128]], jnp.int8)).tolist()
      [[32513]]
    """
    dims = (((xq.ndim - 1,), (0,)), ((), ()))
    return jax.lax.dot_general(xq, wq, dims, preferred_element_type=jnp.int32)


def int8_conv(xq: jax.Array, wq: jax.Array, strides: Sequence[int], padding, *, kernel_dilation=None,
              feature_group_count: int = 1) -> jax.Array:
    """An NHWC x HWIO convolution of int8 codes accumulated in int32.

    Args:
      xq, wq: int8 input (N, H, W, C) and kernel (kh, kw, C, O); any number of spatial axes.
      strides: one per spatial axis.
      padding: ``'VALID'`` or explicit ``[(low, high), ...]``. Padding inserts the code 0, so an
        input with a zero point must be padded with its zero point by the caller instead.
      kernel_dilation: one per spatial axis, or ``None``.
      feature_group_count: as :func:`jax.lax.conv_general_dilated`.
    """
    dims = conv_dims(xq.shape, wq.shape)
    return jax.lax.conv_general_dilated(
        xq, wq, tuple(strides), padding, rhs_dilation=kernel_dilation, dimension_numbers=dims,
        feature_group_count=feature_group_count, preferred_element_type=jnp.int32)


def _dims(n: int):
    sp = "HWD"[:n] if n <= 3 else None
    if sp is None:
        raise ValueError(f"convolutions with {n} spatial axes are not supported; use 1, 2 or 3.")
    return ("N" + sp + "C", sp + "IO", "N" + sp + "C")


def conv_dims(xshape, wshape):
    """Channels-last dimension numbers for an input and kernel of these shapes."""
    return jax.lax.conv_dimension_numbers(xshape, wshape, _dims(len(xshape) - 2))


def requantize(acc: jax.Array, multiplier, zero_point, quant_min: int = -128, quant_max: int = 127) -> jax.Array:
    """An int32 accumulator on the next layer's grid: ``clip(round(M * acc) + Z_out)`` (Jacob et al. eq. 5).

    ``M = S_x S_w / S_out`` (float32, one per output channel or a scalar). Exact to the float64
    derivation except where ``M * acc`` lies within float32 rounding of a half-integer.

    Example:
      >>> import jax.numpy as jnp
      >>> requantize(jnp.array([1000, -1000, 10**6]), 0.01, 3).tolist()
      [13, -7, 127]
    """
    m = jnp.asarray(multiplier, jnp.float32)
    q = jnp.round(acc.astype(jnp.float32) * m) + jnp.asarray(zero_point, jnp.float32)
    return jnp.clip(q, quant_min, quant_max).astype(jnp.int8)


def fold_batch_norm(scale, bias, bn_scale, bn_bias, mean, var, epsilon: float):
    """Per-channel ``(scale, bias)`` of a layer followed by BatchNorm in inference mode, folded.

    ``BN(y) = (y - mean) / sqrt(var + eps) * bn_scale + bn_bias``. With ``y = scale * acc + bias``
    (``scale`` the weights' per-channel step, or 1 for float kernels), the folded layer is
    ``scale * g * acc + (bias - mean) * g + bn_bias`` with ``g = bn_scale / sqrt(var + eps)``:
    a per-channel weight scale absorbs BatchNorm exactly, with the same integer codes.

    Any of ``bias``, ``bn_scale``, ``bn_bias`` may be ``None`` (0, 1, 0).

    Example:
      >>> import jax.numpy as jnp
      >>> s, b = fold_batch_norm(jnp.array([2.0]), None, jnp.array([3.0]), jnp.array([1.0]),
      ...                        jnp.array([0.5]), jnp.array([3.0]), 1.0)
      >>> s.tolist(), b.tolist()
      ([3.0], [0.25])
    """
    g = jax.lax.rsqrt(jnp.asarray(var, jnp.float32) + epsilon)
    if bn_scale is not None:
        g = g * bn_scale
    b = -jnp.asarray(mean, jnp.float32) if bias is None else bias - mean
    b = b * g
    if bn_bias is not None:
        b = b + bn_bias
    return scale * g, b


def pack_int4(q: jax.Array) -> jax.Array:
    """Signed 4-bit codes (any shape, values in [-8, 7]) packed two per byte, flattened: uint8.

    Element ``2i`` is the low nibble of byte ``i``; an odd count is padded with a 0 code.

    Example:
      >>> import jax.numpy as jnp
      >>> pack_int4(jnp.array([-8, 7, 1])).tolist()
      [120, 1]
    """
    flat = jnp.ravel(jnp.asarray(q, jnp.int32))
    if flat.size % 2:
        flat = jnp.concatenate([flat, jnp.zeros((1,), jnp.int32)])
    nib = flat & 0xF
    return (nib[0::2] | (nib[1::2] << 4)).astype(jnp.uint8)


def unpack_int4(packed: jax.Array, shape) -> jax.Array:
    """Inverse of :func:`pack_int4`: int8 codes of ``shape`` (sign-extended nibbles).

    Example:
      >>> import jax.numpy as jnp
      >>> unpack_int4(pack_int4(jnp.array([-8, 7, 1])), (3,)).tolist()
      [-8, 7, 1]
    """
    b = packed.astype(jnp.int8)
    low = jnp.left_shift(b, 4) >> 4  # arithmetic shift sign-extends the nibble
    high = b >> 4
    size = 1
    for d in shape:
        size *= d
    return jnp.stack([low, high], axis=-1).reshape(-1)[:size].reshape(shape)
