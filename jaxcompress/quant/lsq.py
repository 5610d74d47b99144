"""Learned step size quantization (LSQ) of weights as a transform: steps trained with the weights.

A learned step needs a gradient and an optimizer, so it must live in the trained pytree, not in
the transform state (which only ``update`` changes). :func:`lsq_params` wraps the model's params
as ``LSQParams(model, steps)``; the optimizer then trains both, and the transform's ``apply``
maps ``LSQParams`` to the model's quantized params, so the train step and the model stay as they
are: pass ``lsq_params(params)`` to ``init_train_state`` and ``lsq_quantization()`` as the
transform.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select_values
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_bits
from jaxcompress.quant.lowbit import lsq_fake_quant, lsq_init_step
from jaxcompress.quant.weights import QuantState


class LSQParams(NamedTuple):
    """Trainable params for LSQ.

    Attributes:
      model: the model's latent float params.
      steps: a float32 scalar step per quantized leaf (``None`` for leaves kept in float).
    """

    model: Any
    steps: Any


def _widths(params, rules, bits):
    return select_values(params, rules, bits, lambda v: check_bits("per-rule bits", v, low=2))


def lsq_params(params: Any, bits: int = 4, *, rules: Optional[Rules] = None) -> LSQParams:
    """Wraps ``params`` with LSQ steps initialised at ``2 mean|w| / sqrt(Qp)``.

    Args:
      params: the model's params.
      bits: default weight bit width ``2..8``; rules use the same values as
        :func:`lsq_quantization` (and must be the same rules).
      rules: ``(regex, value)`` rules (``True`` -> ``bits``, an int overrides, ``None`` = float).

    Returns:
      :class:`LSQParams` to train in place of ``params``.

    Example:
      >>> import jax.numpy as jnp
      >>> p = lsq_params({'k': jnp.array([[1.0, -1.0], [3.0, -3.0]])}, 2)
      >>> float(p.steps['k'])  # 2 * mean|w| / sqrt(1)
      4.0
    """
    bits = check_bits("bits", bits, low=2)
    steps = jax.tree.map(
        lambda b, w: None if b is None else lsq_init_step(w, b), _widths(params, rules, bits), params, is_leaf=is_none
    )
    return LSQParams(params, steps)


def lsq_quantization(bits: int = 4, *, rules: Optional[Rules] = None) -> Transform:
    """LSQ (Esser et al. 2019) on the selected weights; the view is the model's quantized params.

    Args:
      bits: default bit width ``2..8`` (signed grid ``[-2^(b-1), 2^(b-1) - 1]``).
      rules: as for :func:`lsq_params`.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` over :class:`LSQParams`.

    Raises:
      TypeError: when the params are not :class:`LSQParams`.

    Example:
      >>> import jax.numpy as jnp
      >>> p = lsq_params({'k': jnp.array([[1.0, -1.0], [3.0, -3.0]])}, 2)
      >>> t = lsq_quantization(2)
      >>> t.apply(p, t.init(p))['k'].tolist()  # grid {-2, -1, 0, 1} * 4
      [[0.0, 0.0], [4.0, -4.0]]
    """
    bits = check_bits("bits", bits, low=2)

    def check(params):
        if not isinstance(params, LSQParams):
            raise TypeError(
                f"lsq_quantization needs LSQParams(model, steps), got {type(params).__name__}; "
                "wrap the model's params with lsq_params(params) before init_train_state."
            )

    def init(params):
        check(params)
        return QuantState(count=jnp.zeros((), jnp.int32))

    def apply(params, state):
        del state
        check(params)
        widths = _widths(params.model, rules, bits)

        def quant(b, s, w):
            return w if b is None else lsq_fake_quant(w, s, b)

        return jax.tree.map(quant, widths, params.steps, params.model, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params, info
        return QuantState(count=state.count + 1)

    return Transform(init, apply, update)
