"""Weight fake quantization as a :class:`~jaxcompress.core.transform.Transform` (QAT and PTQ).

:func:`weight_quantization` is the one weight quantizer: symmetric or affine grids, per tensor /
channel / group, ``2..8`` bits, binary and ternary, and mixed precision through ``(regex, value)``
rules where the value is a bit width (``2..8``), ``1`` or ``'binary'``, or ``'ternary'``. The
same transform serves post-training quantization: apply it once to trained params
(``t.apply(params, t.init(params))``) and evaluate.

Zeros stay zero under every kind, so it composes after pruning with
:func:`~jaxcompress.core.transform.chain`: zero is on every integer grid (an affine zero point is
an integer, as in PyTorch), and binary and ternary codes keep 0 at 0 (see
:mod:`jaxcompress.quant.lowbit`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, is_none, select, warn_unused_rules
from jaxcompress.core.transform import LeafSpec, Transform, UpdateInfo
from jaxcompress.core.validation import check_int
from jaxcompress.quant.affine import check_ste, fake_quant, tensor_qparams
from jaxcompress.quant.lowbit import binarize, binary_scale, ternarize, ternary_scale

_NAMED = ("binary", "ternary")


class QuantState(NamedTuple):
    """State of :func:`weight_quantization`.

    Attributes:
      count: int32, number of ``update`` calls so far.
    """

    count: jax.Array


def _check_kind(name: str, value: Any):
    if isinstance(value, str):
        if value not in _NAMED:
            raise ValueError(f"{name} must be a bit width 1..8, 'binary' or 'ternary', got {value!r}.")
        return value
    bits = check_int(name, value, minimum=1, maximum=8)
    return "binary" if bits == 1 else bits


def weight_quantization(
    bits: Any = 8,
    *,
    symmetric: bool = True,
    narrow: bool = True,
    channel_axis: Optional[int] = -1,
    group_size: Optional[int] = None,
    group_axis: int = -2,
    ste: str = "clipped",
    rules: Optional[Rules] = None,
) -> Transform:
    """Fake-quantizes the selected weights: the QAT/PTQ view of a params pytree.

    The view holds dequantized values on each leaf's grid; gradients pass straight through
    (:func:`~jaxcompress.quant.affine.fake_quant`, :func:`~jaxcompress.quant.lowbit.binarize`,
    :func:`~jaxcompress.quant.lowbit.ternarize`). ``describe`` gives, per quantized leaf, the bit
    width, scheme, axis or group, and the exact ``scale`` and ``zero_point`` of the view:
    ``view == scale * (q - zero_point)`` with integer ``q`` in range (``zero_point`` ``None`` for
    the symmetric kinds; ``q`` in ``{-1, 0, 1}`` for binary and ternary, 0 only where the weight
    was 0 for binary).

    Args:
      bits: default kind: a bit width ``2..8``, ``1`` or ``'binary'`` (XNOR-Net sign times
        mean magnitude), or ``'ternary'`` (TWN).
      symmetric: symmetric grid (zero point 0) or affine (min/max onto ``[0, 2^b - 1]``).
      narrow: narrow symmetric range (``[-127, 127]`` at 8 bits), a grid symmetric about 0.
      channel_axis: one range per slice along this axis (``-1``: output channel of Dense/Conv);
        ``None`` for per tensor.
      group_size: one range per group of this many weights along ``group_axis`` (the
        contraction dimension), overriding ``channel_axis`` for the ``2..8``-bit kinds.
      group_axis: see ``group_size``.
      ste: ``'clipped'`` or ``'identity'`` straight-through estimator (``2..8`` bits; binary and
        ternary always pass the gradient everywhere).
      rules: ``(regex, value)`` pairs; ``True`` takes ``bits``, an int or ``'binary'``/``'ternary'``
        overrides it (mixed precision), ``None``/``False`` leaves the leaf in float. Default:
        every float leaf with ``ndim >= 2``. Rules that match no leaf are warned about at ``init``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`QuantState`.

    Raises:
      TypeError / ValueError: bad ``bits``, ``ste`` (here) or rule values and axes (at ``init``).

    Example:
      8 bits on the first and last layer, 4 elsewhere:

      >>> import jax.numpy as jnp
      >>> p = {'conv1': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'fc': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'head': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)}}
      >>> t = weight_quantization(4, channel_axis=None, rules=[('conv1|head', 8), ('.*', True)])
      >>> s = t.init(p)
      >>> v = t.apply(p, s)
      >>> [len(set(v[k]['kernel'].ravel().tolist())) for k in ('conv1', 'fc', 'head')]
      [18, 15, 18]
      >>> spec = t.describe(p, s)['fc/kernel']
      >>> spec.bits, spec.scheme, round(float(spec.scale.squeeze()), 4)
      (4, 'symmetric', 0.1429)
    """
    default = _check_kind("bits", bits)
    check_ste(ste)
    if not isinstance(symmetric, bool) or not isinstance(narrow, bool):
        raise TypeError(f"symmetric and narrow must be bools, got {symmetric!r} and {narrow!r}.")
    grid = dict(symmetric=symmetric, narrow=narrow, channel_axis=channel_axis,
                group_size=group_size, group_axis=group_axis)

    def kinds(params):
        def leaf(value):
            if value is None:
                return None
            return default if value is True else _check_kind("per-rule bits", value)

        return jax.tree.map(leaf, select(params, rules), is_leaf=is_none)

    def quantize(kind, w):
        if kind is None:
            return w
        if kind == "binary":
            return binarize(w, channel_axis=channel_axis)
        if kind == "ternary":
            return ternarize(w, channel_axis=channel_axis)
        return fake_quant(w, kind, ste=ste, **grid)

    def spec(kind, w):
        if kind == "binary":
            return LeafSpec(bits=1, scheme="binary", channel_axis=channel_axis, scale=binary_scale(w, channel_axis=channel_axis))
        if kind == "ternary":
            alpha, _ = ternary_scale(w, channel_axis=channel_axis)
            return LeafSpec(bits=2, scheme="ternary", channel_axis=channel_axis, scale=alpha)
        qp = tensor_qparams(w, kind, **grid)
        grouped = group_size is not None
        return LeafSpec(
            bits=kind,
            scheme="symmetric" if symmetric else "affine",
            channel_axis=None if grouped else channel_axis,
            group_size=group_size if grouped else None,
            group_axis=group_axis if grouped else None,
            scale=qp.scale,
            zero_point=None if symmetric else qp.zero_point.astype(jnp.int32),
        )

    def init(params):
        warn_unused_rules(params, rules, "weight_quantization")
        widths = kinds(params)  # validates rule values and axes now, not at the first step
        jax.eval_shape(lambda p: jax.tree.map(quantize, widths, p, is_leaf=is_none), params)
        return QuantState(count=jnp.zeros((), jnp.int32))

    def apply(params, state):
        del state
        return jax.tree.map(quantize, kinds(params), params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params, info
        return QuantState(count=state.count + 1)

    def describe(params, state):
        del state
        flat = jax.tree.leaves_with_path(kinds(params), is_leaf=is_none)
        leaves = jax.tree.leaves(params)
        return {path_name(p): spec(k, w) for (p, k), w in zip(flat, leaves) if k is not None}

    return Transform(init, apply, update, describe)
