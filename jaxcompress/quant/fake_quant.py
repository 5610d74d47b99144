"""Symmetric fake quantization with a straight-through estimator.

``b``-bit symmetric quantization uses the narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]``,
so zero maps to zero exactly and the grid is symmetric (pruned weights stay zero). The scale is
``max|x| / qmax`` over the whole tensor or per channel. ``b = 1`` is binary: ``sign(x)`` times the
mean ``|x|`` (XNOR-Net's optimal scale), with ``sign(0) = +1``.

Gradients use the straight-through estimator ``x + stop_gradient(q(x) - x)``: the identity inside
the representable range ``|round(x / scale)| <= qmax`` and zero outside it (only possible when a
``scale`` is given; a max-abs scale puts every value inside).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_bits

_TINY = 1e-12  # scales are clamped here so an all-zero tensor quantizes to zeros, not NaN


def qmax(bits: int) -> int:
    """Largest integer level of ``bits``-bit narrow symmetric quantization (0 for binary)."""
    return 2 ** (bits - 1) - 1


def _reduce_axes(ndim: int, channel_axis: Optional[int]) -> Optional[tuple[int, ...]]:
    if channel_axis is None:
        return None
    if not -ndim <= channel_axis < ndim:
        raise ValueError(
            f"channel_axis={channel_axis} does not exist for an array with {ndim} dimensions; "
            f"use an axis in [{-ndim}, {ndim - 1}] or None for one scale per tensor."
        )
    axis = channel_axis % ndim
    return tuple(i for i in range(ndim) if i != axis)


def symmetric_scale(x: jax.Array, bits: int, *, channel_axis: Optional[int] = None) -> jax.Array:
    """The scale of symmetric quantization: ``max|x| / qmax`` (``mean|x|`` for ``bits == 1``).

    Args:
      x: float array.
      bits: bit width in ``1..8``.
      channel_axis: ``None`` for one scale per tensor, else the axis that keeps its own scales.

    Returns:
      The scale, broadcastable against ``x`` (kept dims), float32, clamped to ``>= 1e-12``.
    """
    bits = check_bits("bits", bits)
    x = jnp.asarray(x)
    axes = _reduce_axes(x.ndim, channel_axis)
    ax = jnp.abs(x).astype(jnp.float32)
    if bits == 1:
        s = jnp.mean(ax, axis=axes, keepdims=True)
    else:
        s = jnp.max(ax, axis=axes, keepdims=True) / qmax(bits)
    return jnp.maximum(s, _TINY)


def quantize_symmetric(
    x: jax.Array, bits: int, *, channel_axis: Optional[int] = None, scale: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """Integer levels and scale: ``x ~= q * scale`` with ``q`` int8 in ``[-qmax, qmax]``.

    Returns:
      ``(q, scale)``; for ``bits == 1``, ``q`` is in ``{-1, +1}``.

    Example:
      >>> import jax.numpy as jnp
      >>> q, s = quantize_symmetric(jnp.array([-1.0, 0.0, 0.5, 1.0]), 2)
      >>> q.tolist(), float(s.squeeze())
      ([-1, 0, 0, 1], 1.0)
    """
    bits = check_bits("bits", bits)
    x = jnp.asarray(x)
    s = symmetric_scale(x, bits, channel_axis=channel_axis) if scale is None else jnp.asarray(scale, jnp.float32)
    xs = x.astype(jnp.float32) / s
    if bits == 1:
        q = jnp.where(xs >= 0, 1, -1)
    else:
        m = qmax(bits)
        q = jnp.clip(jnp.round(xs), -m, m)
    return q.astype(jnp.int8), s


def fake_quant_symmetric(
    x: jax.Array, bits: int, *, channel_axis: Optional[int] = None, scale: Optional[jax.Array] = None
) -> jax.Array:
    """Quantize-dequantize ``x`` with a straight-through gradient.

    Args:
      x: float array.
      bits: bit width in ``1..8``.
      channel_axis: ``None`` for per-tensor, else the axis with its own scale (``-1`` is the output
        channel of Flax ``Dense`` and ``Conv`` kernels).
      scale: optional fixed scale (broadcastable to ``x``); values beyond ``qmax * scale`` clip and
        get zero gradient. Default: the max-abs scale of ``x`` (no gradient flows into it).

    Returns:
      An array like ``x`` whose values lie on the quantization grid.

    Raises:
      TypeError / ValueError: for bits outside ``1..8`` or a channel axis that does not exist.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant_symmetric(jnp.array([0.1, -0.52, 1.0]), 2).tolist()
      [0.0, -1.0, 1.0]
    """
    bits = check_bits("bits", bits)
    x = jnp.asarray(x)
    s = jax.lax.stop_gradient(
        symmetric_scale(x, bits, channel_axis=channel_axis) if scale is None else jnp.asarray(scale, jnp.float32)
    )
    q, _ = quantize_symmetric(jax.lax.stop_gradient(x), bits, scale=s)
    dq = (q.astype(jnp.float32) * s).astype(x.dtype)
    if bits == 1:
        inside = jnp.ones(x.shape, x.dtype)
    else:
        inside = (jnp.abs(jnp.round(x / s)) <= qmax(bits)).astype(x.dtype)
    # Straight-through: forward value dq, gradient 1 inside the range and 0 where it clipped.
    x_ste = x * inside + jax.lax.stop_gradient(x * (1 - inside))
    # Written so the forward value is exactly dq (x + (dq - x) would round in float32).
    return jax.lax.stop_gradient(dq) + (x_ste - jax.lax.stop_gradient(x_ste))
