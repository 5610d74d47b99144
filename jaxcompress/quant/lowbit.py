"""Binary and ternary weights, learned step size (LSQ) and PACT activation clipping.

- :func:`binarize`: ``sign(w) * alpha`` per output channel with ``alpha`` the mean ``|w|`` (XNOR-Net,
  Rastegari et al. 2016; the L2-optimal scale for a sign code; BinaryConnect, Courbariaux et al.
  2015, is the unscaled special case). Zeros stay zero: ``sign(0) = 0`` and ``alpha`` is the mean
  over the non-zero weights, so after pruning the kept weights are ``+-alpha`` and the pruned
  ones 0 (a mask plus a 1-bit code, the mean that is L2-optimal for the kept weights).
- :func:`ternarize`: Ternary Weight Networks (Li et al. 2016): threshold ``0.7 * mean|w|``, scale the
  mean ``|w|`` above the threshold, per output channel; means over the non-zero weights, as above.
- :func:`lsq_fake_quant`: Learned Step Size Quantization (Esser et al. 2019): the step ``s`` is a
  trained parameter, initialised at ``2 mean|w| / sqrt(Qp)`` (:func:`lsq_init_step`) and its gradient
  scaled by ``1 / sqrt(N * Qp)``.
- :func:`pact`: PACT (Choi et al. 2018): ``clip(x, 0, alpha)`` with a trained ``alpha``, then an
  unsigned ``bits``-bit grid on ``[0, alpha]``.

Binary and ternary use the identity straight-through estimator (gradient 1 everywhere), as the
papers do for the latent weights.

Non-finite values (:mod:`jaxcompress.core.finite`): scales and means are taken over the finite
weights only, so a NaN stays NaN at its own position and ``+-inf`` take the extreme code
(``+-alpha``, or the grid ends). A concrete LSQ ``step`` that is not finite, or PACT ``alpha``
that is not finite and ``> 0``, is a ``ValueError``; a step or a traced alpha at or below
``1e-8`` is clamped there.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.finite import check_finite_positive, straight_through
from jaxcompress.core.validation import check_axis, check_int, check_positive
from jaxcompress.quant.affine import EPS


_ste = straight_through  # forward ``q``, the identity's gradient to ``x`` (none where ``x`` is inf)


def _nonzero_mean(a, channel_axis):
    """Mean of ``a`` over its finite non-zero entries per slice along ``channel_axis`` (0 where
    none), keepdims."""
    ax = check_axis("channel_axis", channel_axis, a.ndim)
    axes = None if ax is None else tuple(i for i in range(a.ndim) if i != ax)
    ok = (a != 0) & jnp.isfinite(a)
    count = jnp.sum(ok, axis=axes, keepdims=True)
    return jnp.sum(jnp.where(ok, a, 0.0), axis=axes, keepdims=True) / jnp.maximum(count, 1).astype(a.dtype), axes


def binary_scale(w: jax.Array, *, channel_axis: Optional[int] = -1) -> jax.Array:
    """The scale ``alpha`` of :func:`binarize`: mean ``|w|`` over the non-zero weights, keepdims, float32."""
    w = jax.lax.stop_gradient(jnp.asarray(w))
    return _nonzero_mean(jnp.abs(w).astype(jnp.float32), channel_axis)[0]


def binarize(w: jax.Array, *, channel_axis: Optional[int] = -1) -> jax.Array:
    """``sign(w) * alpha`` per channel (XNOR-Net) with a straight-through gradient; zeros stay zero.

    Args:
      w: float weights.
      channel_axis: axis with its own scale (``-1``: output channel of Dense/Conv); ``None`` for one.

    Returns:
      An array like ``w`` with values ``+-alpha`` per channel (:func:`binary_scale`), and 0
      where ``w`` is 0.

    Example:
      >>> import jax.numpy as jnp
      >>> binarize(jnp.array([[0.5, -2.0], [-1.5, 1.0]])).tolist()
      [[1.0, -1.5], [-1.0, 1.5]]
      >>> binarize(jnp.array([0.0, -1.0, 3.0]), channel_axis=None).tolist()  # a pruned zero
      [0.0, -2.0, 2.0]
    """
    w = jnp.asarray(w)
    alpha = binary_scale(w, channel_axis=channel_axis)
    return _ste(w, (jnp.sign(jax.lax.stop_gradient(w)) * alpha).astype(w.dtype))


def ternary_scale(w: jax.Array, *, channel_axis: Optional[int] = -1, threshold: float = 0.7):
    """``(alpha, keep)`` of :func:`ternarize`: the scale (keepdims, float32) and the mask of weights
    above ``threshold`` times the mean non-zero ``|w|``."""
    threshold = check_positive("threshold", threshold)
    a = jnp.abs(jax.lax.stop_gradient(jnp.asarray(w))).astype(jnp.float32)
    mean, axes = _nonzero_mean(a, channel_axis)
    keep = a > threshold * mean
    kept = keep & jnp.isfinite(a)  # an inf is kept (the extreme code) but not averaged
    alpha = jnp.sum(jnp.where(kept, a, 0.0), axis=axes, keepdims=True) / jnp.maximum(
        jnp.sum(kept, axis=axes, keepdims=True), 1
    ).astype(a.dtype)
    return alpha, keep


def ternarize(w: jax.Array, *, channel_axis: Optional[int] = -1, threshold: float = 0.7) -> jax.Array:
    """Ternary Weight Networks: ``alpha * sign(w)`` where ``|w| > threshold * mean|w|``, else 0.

    Args:
      w: float weights.
      channel_axis: axis with its own threshold and scale; ``None`` for one per tensor.
      threshold: the factor of the mean non-zero ``|w|`` below which weights become 0 (TWN's 0.7).

    Returns:
      An array like ``w`` with values in ``{-alpha, 0, +alpha}`` per channel, where ``alpha`` is the
      mean ``|w|`` above the threshold (0 when no weight passes it).

    Example:
      >>> import jax.numpy as jnp
      >>> ternarize(jnp.array([0.1, -1.0, 2.0, 0.3]), channel_axis=None).tolist()
      [0.0, -1.5, 1.5, 0.0]
    """
    w = jnp.asarray(w)
    alpha, keep = ternary_scale(w, channel_axis=channel_axis, threshold=threshold)
    ws = jax.lax.stop_gradient(w)
    q = jnp.where(keep, jnp.sign(ws) * alpha, jnp.where(jnp.isnan(ws), ws, 0.0)).astype(w.dtype)
    return _ste(w, q)


def _lsq_levels(bits: int, signed: bool) -> tuple[int, int]:
    bits = check_int("bits", bits, minimum=2, maximum=8)
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def lsq_init_step(x: jax.Array, bits: int, *, signed: bool = True) -> jax.Array:
    """LSQ's initial step: ``2 * mean|x| / sqrt(Qp)`` over the finite ``x`` (a float32 scalar, ``>= 1e-8``)."""
    _, qp = _lsq_levels(bits, signed)
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    ok = jnp.isfinite(a)
    mean = jnp.sum(jnp.where(ok, a, 0.0)) / jnp.maximum(jnp.sum(ok), 1).astype(jnp.float32)
    return jnp.maximum(2.0 * mean / jnp.sqrt(jnp.float32(qp)), EPS)


def _scale_grad(v, g):
    """Forward ``v``, gradient multiplied by ``g`` (LSQ's ``gradscale``)."""
    return jax.lax.stop_gradient(v - v * g) + v * g


def lsq_fake_quant(
    x: jax.Array,
    step: jax.Array,
    bits: int,
    *,
    signed: bool = True,
    grad_scale: Optional[float] = None,
) -> jax.Array:
    """LSQ quantizer ``round(clip(x / s, -Qn, Qp)) * s`` with a learned step ``s``.

    Gradients (Esser et al. 2019, eq. 3 and section 2.2): to ``x``, 1 inside ``[-Qn s, Qp s]`` and
    0 outside; to ``s``, ``(-x/s + round(x/s))`` inside, ``-Qn`` below and ``Qp`` above, summed over
    elements and multiplied by ``grad_scale``.

    Args:
      x: float array.
      step: the step size ``s`` (a scalar, or broadcastable per channel), a trained parameter.
      bits: ``2..8``.
      signed: ``Qn = 2^(b-1), Qp = 2^(b-1) - 1`` (weights) or ``Qn = 0, Qp = 2^b - 1``
        (activations after ReLU).
      grad_scale: the step's gradient factor; default ``1 / sqrt(x.size * Qp)`` (weights; for
        activations pass ``1 / sqrt(features * Qp)``).

    Returns:
      An array like ``x`` on the grid ``k * s``.

    Example:
      >>> import jax.numpy as jnp
      >>> lsq_fake_quant(jnp.array([0.26, -3.0, 0.9]), jnp.float32(0.5), 2).tolist()
      [0.5, -1.0, 0.5]
    """
    qn, qp = _lsq_levels(bits, signed)
    check_finite_positive("step", step, "initialise it with lsq_init_step(x, bits).", positive=False)
    x = jnp.asarray(x)
    g = 1.0 / jnp.sqrt(x.size * qp) if grad_scale is None else grad_scale
    # a step at or below 1e-8 is clamped there (no NaN from x / 0; no gradient below the clamp)
    s = _scale_grad(jnp.maximum(jnp.asarray(step, x.dtype), EPS), g)
    v = jnp.clip(x / s, -qn, qp)
    return _ste(v, jnp.round(v)) * s


def pact(x: jax.Array, alpha: jax.Array, bits: int) -> jax.Array:
    """PACT: ``clip(x, 0, alpha)`` quantized to ``2^bits`` levels on ``[0, alpha]``.

    Gradients: to ``x``, 1 on ``[0, alpha]`` (straight through the rounding) and 0 outside; to
    ``alpha``, 1 where ``x >= alpha`` and 0 elsewhere (the paper's eq. 3 with the STE).

    Args:
      x: activations.
      alpha: the learned clipping level (scalar, ``> 0``).
      bits: ``2..8``.

    Returns:
      An array like ``x`` on the grid ``k * alpha / (2^bits - 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> pact(jnp.array([-1.0, 0.4, 5.0]), jnp.float32(3.0), 2).tolist()
      [0.0, 0.0, 3.0]
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    check_finite_positive("alpha", alpha, "PACT clips to [0, alpha]; start it at the inputs' max (e.g. 10).")
    x = jnp.asarray(x)
    # a traced alpha that trained to <= 0 is clamped, so the grid step is never 0 (no 0 / 0)
    alpha = jnp.maximum(jnp.asarray(alpha, x.dtype), EPS)
    levels = 2**bits - 1
    # clip(x, 0, alpha) written so d/d alpha is 1 above alpha (jnp.clip's gradient is ambiguous there).
    y = jnp.where(x >= alpha, alpha, jnp.where((x >= 0) | jnp.isnan(x), x, jnp.zeros_like(x)))
    step = jax.lax.stop_gradient(alpha) / levels
    return _ste(y, jnp.round(y / step) * step)
