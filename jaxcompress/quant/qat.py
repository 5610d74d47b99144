"""Weight quantization with a choice of scheme and mixed precision by path rules (QAT and PTQ).

:func:`quantize_weights` generalises :func:`~jaxcompress.quant.weights.weight_quantization`:
symmetric or affine grids, per tensor / channel / group, binary and ternary, and a per-leaf
choice through ``(regex, value)`` rules where the value is a bit width (``2..8``), ``1`` or
``'binary'``, or ``'ternary'``. The same transform serves post-training quantization: apply it
once to trained params (``t.apply(params, t.init(params))``) and evaluate.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_bits
from jaxcompress.quant.affine import _check_ste, fake_quant
from jaxcompress.quant.lowbit import binary, ternary
from jaxcompress.quant.weights import QuantState

_NAMED = ("binary", "ternary")


def _check_kind(name: str, value: Any):
    if isinstance(value, str):
        if value not in _NAMED:
            raise ValueError(f"{name} must be a bit width 1..8, 'binary' or 'ternary', got {value!r}.")
        return value
    bits = check_bits(name, value)
    return "binary" if bits == 1 else bits


def quantize_weights(
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

    Args:
      bits: default kind: a bit width ``2..8``, ``1`` or ``'binary'`` (XNOR-Net sign times
        mean magnitude), or ``'ternary'`` (TWN).
      symmetric: symmetric grid (zero point 0) or affine (min/max onto ``[0, 2^b - 1]``).
      narrow: narrow symmetric range (``[-127, 127]`` at 8 bits), keeps pruned zeros at zero.
      channel_axis: one range per slice along this axis (``-1``: output channel of Dense/Conv);
        ``None`` for per tensor.
      group_size: one range per group of this many weights along ``group_axis`` (the
        contraction dimension), overriding ``channel_axis`` for the ``2..8``-bit kinds.
      group_axis: see ``group_size``.
      ste: ``'clipped'`` or ``'identity'`` straight-through estimator.
      rules: ``(regex, value)`` pairs; ``True`` takes ``bits``, an int or ``'binary'``/``'ternary'``
        overrides it (mixed precision), ``None``/``False`` leaves the leaf in float.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with
      :class:`~jaxcompress.quant.weights.QuantState`.

    Example:
      8 bits on the first and last layer, 4 elsewhere:

      >>> import jax.numpy as jnp
      >>> p = {'conv1': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'fc': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'head': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)}}
      >>> t = quantize_weights(4, channel_axis=None, rules=[('conv1|head', 8), ('.*', True)])
      >>> v = t.apply(p, t.init(p))
      >>> [len(set(v[k]['kernel'].ravel().tolist())) for k in ('conv1', 'fc', 'head')]
      [18, 15, 18]
    """
    default = _check_kind("bits", bits)
    _check_ste(ste)

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
            return binary(w, channel_axis=channel_axis)
        if kind == "ternary":
            return ternary(w, channel_axis=channel_axis)
        return fake_quant(
            w, kind, symmetric=symmetric, narrow=narrow, channel_axis=channel_axis,
            group_size=group_size, group_axis=group_axis, ste=ste,
        )

    def init(params):
        widths = kinds(params)  # validates rule values and axes now, not at the first step
        jax.eval_shape(lambda p: jax.tree.map(quantize, widths, p, is_leaf=is_none), params)
        return QuantState(count=jnp.zeros((), jnp.int32))

    def apply(params, state):
        del state
        return jax.tree.map(quantize, kinds(params), params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params, info
        return QuantState(count=state.count + 1)

    return Transform(init, apply, update)
