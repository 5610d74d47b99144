"""Affine and symmetric fake quantization, per tensor, per channel or per group, 2..8 bits.

The arithmetic is PyTorch's (``torch.fake_quantize_per_tensor_affine`` and
``torch.fake_quantize_per_channel_affine``), step for step in float32, so outputs agree bit for
bit::

    q   = round_half_even(x * (1 / scale)) + zero_point
    out = (clip(q, quant_min, quant_max) - zero_point) * scale

Gradients are straight-through. ``ste='clipped'`` passes the gradient where
``quant_min <= q <= quant_max`` (before clipping, PyTorch's rule, boundaries included) and zero
elsewhere; ``ste='identity'`` passes it everywhere. No gradient reaches ``scale`` or
``zero_point`` here (learned steps are :func:`~jaxcompress.quant.lowbit.lsq_fake_quant`).

Safe behaviour: scales are clamped to ``>= 1e-8`` (PyTorch observers' ``eps`` is 2^-23 times
the range), so an all-zero or constant tensor quantizes without NaN. Non-finite values follow
the library's policy (:mod:`jaxcompress.core.finite`): ranges are the min/max of the finite
values only, a NaN in ``x`` stays NaN at its own position and ``+-inf`` clip to the grid ends;
a concrete NaN or infinite ``scale``/``zero_point`` is a ``ValueError``. Use
:func:`check_finite` outside jit to refuse non-finite weights instead.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.finite import finite_min_max, is_concrete
from jaxcompress.core.validation import check_axis, check_int

#: The smallest scale or step of every quantizer: a zero or constant range gives no NaN.
EPS = 1e-8
_STE = ("clipped", "identity")


def quant_range(bits: int, *, signed: bool = True, narrow: bool = False) -> tuple[int, int]:
    """The integer range ``(quant_min, quant_max)`` of a ``bits``-bit grid.

    Args:
      bits: bit width in ``2..8``.
      signed: ``[-2^(b-1), 2^(b-1) - 1]`` (int8-like) instead of ``[0, 2^b - 1]`` (uint8-like).
      narrow: drop the lowest level so a signed grid is symmetric (``[-127, 127]`` for 8 bits) or
        an unsigned one starts at 1.

    Example:
      >>> quant_range(8), quant_range(8, narrow=True), quant_range(4, signed=False)
      ((-128, 127), (-127, 127), (0, 15))
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
    return (lo + 1 if narrow else lo), hi


def check_ste(ste: str) -> str:
    if ste not in _STE:
        raise ValueError(f"ste must be one of {_STE}, got {ste!r}.")
    return ste


def check_finite(name: str, x) -> None:
    """Raises ``ValueError`` when ``x`` holds NaN or Inf (call outside jit: it reads the values)."""
    arr = np.asarray(x)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"{name} has {int(bad.sum())} non-finite values (NaN/Inf) of {arr.size}; quantization "
            "needs finite values. Check the weights (diverged training?) before quantizing."
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fq(x, scale, zero_point, quant_min, quant_max, clipped):
    out, _ = _fq_fwd(x, scale, zero_point, quant_min, quant_max, clipped)
    return out


def _fq_fwd(x, scale, zero_point, quant_min, quant_max, clipped):
    s = scale.astype(jnp.float32)
    inv = 1.0 / s
    q = jnp.round(x.astype(jnp.float32) * inv) + zero_point.astype(jnp.float32)
    out = ((jnp.clip(q, quant_min, quant_max) - zero_point) * s).astype(x.dtype)
    mask = (q >= quant_min) & (q <= quant_max) if clipped else None
    return out, (mask, scale, zero_point)


def _fq_bwd(quant_min, quant_max, clipped, res, g):
    mask, scale, zero_point = res
    gx = jnp.where(mask, g, jnp.zeros_like(g)) if clipped else g
    return gx, jnp.zeros_like(scale), jnp.zeros_like(zero_point)


_fq.defvjp(_fq_fwd, _fq_bwd)


def fake_quant_affine(
    x: jax.Array,
    scale,
    zero_point,
    quant_min: int,
    quant_max: int,
    *,
    axis: Optional[int] = None,
    ste: str = "clipped",
) -> jax.Array:
    """Quantize-dequantize with given scale and zero point (PyTorch's fake-quant arithmetic).

    Args:
      x: float array.
      scale: a scalar, or one value per slice along ``axis``, or an array broadcastable to ``x``.
      zero_point: integer-valued, shaped like ``scale``.
      quant_min, quant_max: the integer range, e.g. from :func:`quant_range`.
      axis: the channel axis when ``scale`` is a 1-D per-channel vector (as in
        ``torch.fake_quantize_per_channel_affine``); ``None`` when it already broadcasts.
      ste: ``'clipped'`` (zero gradient where ``q`` leaves the range) or ``'identity'``.

    Returns:
      An array like ``x`` on the grid ``(k - zero_point) * scale``.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant_affine(jnp.array([-1.0, 0.26, 3.0]), 0.5, 1, 0, 3).tolist()
      [-0.5, 0.5, 1.0]
    """
    check_ste(ste)
    x = jnp.asarray(x)
    if not int(quant_min) < int(quant_max):
        raise ValueError(f"quant_min={quant_min} must be < quant_max={quant_max}.")
    for name, v in (("scale", scale), ("zero_point", zero_point)):
        if is_concrete(v) and not np.isfinite(np.asarray(v, np.float64)).all():
            raise ValueError(f"{name} must be finite, got {np.asarray(v).ravel()[:4].tolist()}; compute it "
                             "from finite values (affine_qparams of a finite range).")
    scale = jnp.maximum(jnp.asarray(scale, jnp.float32), EPS)
    zero_point = jnp.asarray(zero_point, jnp.float32)
    ax = check_axis("axis", axis, x.ndim)
    if ax is not None:
        shape = [1] * x.ndim
        shape[ax] = x.shape[ax]
        if scale.size != x.shape[ax]:
            raise ValueError(
                f"scale has {scale.size} values but axis {axis} of x has {x.shape[ax]} channels."
            )
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return _fq(x, scale, zero_point, int(quant_min), int(quant_max), ste == "clipped")


def affine_qparams(
    x_min,
    x_max,
    bits: int,
    *,
    symmetric: bool = False,
    narrow: bool = False,
    signed: Optional[bool] = None,
) -> tuple[jax.Array, jax.Array, int, int]:
    """Scale and zero point that map ``[x_min, x_max]`` onto a ``bits``-bit grid.

    As PyTorch's observers: the range is first widened to include 0 (so 0 is exact).
    Symmetric: ``scale = max(|min|, |max|) / ((quant_max - quant_min) / 2)``, zero point 0 (signed)
    or the grid middle (unsigned). Affine: ``scale = (max - min) / (quant_max - quant_min)`` and
    ``zero_point = quant_min - round(min / scale)`` clipped into the range.

    Args:
      x_min, x_max: range arrays (any matching shape: one per tensor, channel or group).
      bits: ``2..8``.
      symmetric: symmetric scheme (zero point fixed) instead of affine.
      narrow: narrow range (see :func:`quant_range`).
      signed: signed grid; default ``symmetric`` (affine uses ``[0, 2^b - 1]``, like quint8).

    Returns:
      ``(scale, zero_point, quant_min, quant_max)``, scale clamped to ``>= 1e-8``.

    Example:
      >>> s, z, lo, hi = affine_qparams(-1.0, 3.0, 2)
      >>> float(s), float(z), lo, hi
      (1.3333333730697632, 1.0, 0, 3)
    """
    signed = symmetric if signed is None else bool(signed)
    qmin, qmax = quant_range(bits, signed=signed, narrow=narrow)
    lo = jnp.minimum(jnp.asarray(x_min, jnp.float32), 0.0)
    hi = jnp.maximum(jnp.asarray(x_max, jnp.float32), 0.0)
    if symmetric:
        scale = jnp.maximum(jnp.maximum(-lo, hi) / ((qmax - qmin) / 2.0), EPS)
        zp = jnp.full_like(scale, 0.0 if signed else float((qmin + qmax + 1) // 2))
    else:
        scale = jnp.maximum((hi - lo) / float(qmax - qmin), EPS)
        zp = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
    return scale, zp, qmin, qmax


class QuantParams(NamedTuple):
    """The grid a tensor was quantized on: ``view = scale * (clip(q, quant_min, quant_max) - zero_point)``.

    Attributes:
      scale: float32, one per tensor, channel or group (see :func:`tensor_qparams`).
      zero_point: float32 holding integers, shaped like ``scale``.
      quant_min, quant_max: the integer range.
    """

    scale: jax.Array
    zero_point: jax.Array
    quant_min: int
    quant_max: int


def _grouped(x: jax.Array, channel_axis, group_size, group_axis):
    """``x`` reshaped so that one range per tensor/channel/group is a reduction over ``axes``.

    Returns ``(reshaped x, axes, group axis in the reshaped x or None)``.
    """
    if group_size is None:
        ax = check_axis("channel_axis", channel_axis, x.ndim)
        axes = None if ax is None else tuple(i for i in range(x.ndim) if i != ax)
        return x, axes, None
    group_size = check_int("group_size", group_size, minimum=1)
    gax = check_axis("group_axis", group_axis, x.ndim)
    n = x.shape[gax]
    if n % group_size:
        raise ValueError(
            f"group_size={group_size} does not divide axis {group_axis} of length {n}; choose a "
            f"divisor of {n}."
        )
    shape = x.shape[:gax] + (n // group_size, group_size) + x.shape[gax + 1 :]
    return x.reshape(shape), (gax + 1,), gax


def _qparams(xr, axes, bits, symmetric, narrow) -> QuantParams:
    # over the finite values only: one NaN or inf must not move every other value's grid
    x_min, x_max = finite_min_max(jax.lax.stop_gradient(xr), axis=axes, keepdims=True)
    return QuantParams(*affine_qparams(x_min, x_max, bits, symmetric=symmetric, narrow=narrow and symmetric))


def tensor_qparams(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    narrow: bool = True,
    channel_axis: Optional[int] = None,
    group_size: Optional[int] = None,
    group_axis: int = -2,
) -> QuantParams:
    """The grid :func:`fake_quant` puts ``x`` on: min/max of each tensor, channel or group.

    Args: as :func:`fake_quant`.

    Returns:
      :class:`QuantParams`. Per tensor or channel, ``scale`` keeps ``x``'s dimensions and
      broadcasts against it; per group it has ``x.shape[group_axis] // group_size`` entries along
      ``group_axis`` (``jnp.repeat(scale, group_size, group_axis)`` broadcasts against ``x``).

    Example:
      >>> import jax.numpy as jnp
      >>> qp = tensor_qparams(jnp.array([[0.7, -1.4], [0.1, 0.2]]), 4, channel_axis=-1)
      >>> qp.scale.tolist(), qp.quant_min, qp.quant_max
      ([[0.10000000149011612, 0.20000000298023224]], -7, 7)
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    x = jnp.asarray(x)
    xr, axes, gax = _grouped(x, channel_axis, group_size, group_axis)
    qp = _qparams(xr, axes, bits, symmetric, narrow)
    if gax is None:
        return qp
    squeeze = lambda a: jnp.squeeze(a, gax + 1)  # noqa: E731
    return qp._replace(scale=squeeze(qp.scale), zero_point=squeeze(qp.zero_point))


def fake_quant(
    x: jax.Array,
    bits: int,
    *,
    symmetric: bool = True,
    narrow: bool = True,
    channel_axis: Optional[int] = None,
    group_size: Optional[int] = None,
    group_axis: int = -2,
    ste: str = "clipped",
) -> jax.Array:
    """Fake quantization with the range taken from ``x`` itself (min/max, no gradient to it).

    The grid is :func:`tensor_qparams`'s and the arithmetic :func:`fake_quant_affine`'s
    (PyTorch's). Zero is always on the grid, so zeros (pruned weights) stay exactly zero.

    Args:
      x: float array (weights, or activations with a dynamic per-batch range).
      bits: ``2..8``.
      symmetric: symmetric (zero point 0) or affine (min/max mapped onto ``[0, 2^b - 1]``).
      narrow: narrow signed range for the symmetric scheme (``[-127, 127]``; the grid is
        symmetric, the convention for weights).
      channel_axis: ``None`` per tensor, else one range per slice along this axis (``-1``: the
        output channel of Flax ``Dense`` and ``Conv`` kernels).
      group_size: one range per group of this many consecutive elements along ``group_axis``
        (the contraction dimension: ``-2`` is the input axis of Dense ``(in, out)`` and Conv
        ``(h, w, in, out)`` kernels), separately for every other index. Overrides ``channel_axis``.
      group_axis: see ``group_size``.
      ste: ``'clipped'`` or ``'identity'`` straight-through estimator.

    Returns:
      An array like ``x`` with at most ``2^bits`` distinct values per channel/group. The range
      is that of the finite values: a NaN stays NaN at its position only, ``+-inf`` go to the
      grid ends.

    Raises:
      TypeError / ValueError: bits outside ``2..8``, a missing axis, a group size that does not
        divide the axis.

    Example:
      >>> import jax.numpy as jnp
      >>> fake_quant(jnp.array([[0.1, -1.0], [0.5, 2.0]]), 2, channel_axis=-1).tolist()
      [[0.0, 0.0], [0.5, 2.0]]
      >>> fake_quant(jnp.array([1.0, jnp.nan, -0.5, jnp.inf]), 2).tolist()
      [1.0, nan, 0.0, 1.0]
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    check_ste(ste)
    x = jnp.asarray(x)
    xr, axes, gax = _grouped(x, channel_axis, group_size, group_axis)
    scale, zp, qmin, qmax = _qparams(xr, axes, bits, symmetric, narrow)
    out = fake_quant_affine(xr, scale, zp, qmin, qmax, ste=ste)
    return out if gax is None else out.reshape(x.shape)
