"""Weight fake quantization as a :class:`~jaxcompress.core.transform.Transform` (QAT)."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select_values
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_bits
from jaxcompress.quant.fake_quant import fake_quant_symmetric


class QuantState(NamedTuple):
    """State of :func:`weight_quantization`.

    Attributes:
      count: int32, number of ``update`` calls so far.
    """

    count: jax.Array


def bit_widths(params: Any, rules: Optional[Rules], bits: int) -> Any:
    """Per-leaf bit widths under ``rules`` (``True`` -> ``bits``, an int overrides, ``None`` = float)."""
    return select_values(params, rules, bits, lambda v: check_bits("per-rule bits", v))


def weight_quantization(
    bits: int = 8,
    *,
    per_channel: bool = True,
    channel_axis: int = -1,
    rules: Optional[Rules] = None,
) -> Transform:
    """Symmetric fake quantization of the selected weights, for quantization-aware training.

    The view holds dequantized values on the ``bits``-bit grid (max-abs scale per tensor or per
    output channel); gradients pass straight through. Zeros stay zero, so it composes after
    pruning with :func:`~jaxcompress.core.transform.chain`.

    Args:
      bits: default bit width, ``1..8`` (``1`` is binary sign times mean magnitude).
      per_channel: one scale per slice along ``channel_axis`` instead of one per tensor.
      channel_axis: the output-channel axis (``-1`` for Flax ``Dense``/``Conv`` kernels).
      rules: ``(regex, value)`` pairs selecting leaves; an int value is that leaf's bit width.
        Default: every float leaf with ``ndim >= 2``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`QuantState`.

    Example:
      >>> import jax.numpy as jnp
      >>> t = weight_quantization(2, per_channel=False)
      >>> p = {'kernel': jnp.array([[0.1, -0.9], [1.0, 0.4]])}
      >>> t.apply(p, t.init(p))['kernel'].tolist()
      [[0.0, -1.0], [1.0, 0.0]]
    """
    bits = check_bits("bits", bits)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {per_channel!r}.")
    axis = channel_axis if per_channel else None

    def init(params):
        bit_widths(params, rules, bits)  # validates per-rule bit widths early
        return QuantState(count=jnp.zeros((), jnp.int32))

    def apply(params, state):
        del state
        widths = bit_widths(params, rules, bits)
        return jax.tree.map(
            lambda b, w: w if b is None else fake_quant_symmetric(w, b, channel_axis=axis),
            widths,
            params,
            is_leaf=is_none,
        )

    def update(params, state, info: UpdateInfo):
        del params, info
        return QuantState(count=state.count + 1)

    return Transform(init, apply, update)
