"""Learned step size quantization (LSQ) of weights as a transform: steps trained with the weights.

The step sizes live in the transform's state as a
:class:`~jaxcompress.core.transform.Trainable`: the params stay the model's own pytree, and the
train step (:func:`~jaxcompress.train.step.make_train_step`) differentiates the view with respect
to the steps and updates them with the user's optimizer, next to the weights.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, is_none, select_values
from jaxcompress.core.transform import LeafSpec, Trainable, Transform, UpdateInfo
from jaxcompress.core.validation import check_int
from jaxcompress.quant.affine import EPS
from jaxcompress.quant.lowbit import lsq_fake_quant, lsq_init_step
from jaxcompress.core.rules import warn_unused_rules


class LSQState(NamedTuple):
    """State of :func:`lsq_quantization`.

    Attributes:
      count: int32, number of ``update`` calls so far.
      steps: ``Trainable`` of a pytree like the params: a float32 scalar step per quantized leaf,
        ``None`` for leaves kept in float. Trained by the optimizer through the train step.
    """

    count: jax.Array
    steps: Trainable


def lsq_quantization(bits: int = 4, *, rules: Optional[Rules] = None) -> Transform:
    """LSQ (Esser et al. 2019) on the selected weights, one learned step per leaf.

    ``init`` sets each step to ``2 mean|w| / sqrt(Qp)``; ``apply`` is
    :func:`~jaxcompress.quant.lowbit.lsq_fake_quant` on the signed grid
    ``[-2^(b-1), 2^(b-1) - 1]``, so zeros (pruned weights) stay zero. ``describe`` gives each
    quantized leaf's bits, ``scheme='lsq'`` and its step as ``scale``.

    Args:
      bits: default bit width ``2..8``.
      rules: ``(regex, value)`` rules (``True`` -> ``bits``, an int overrides, ``None`` = float);
        default every float leaf with ``ndim >= 2``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`LSQState`.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'k': jnp.array([[1.0, -1.0], [3.0, -3.0]])}
      >>> t = lsq_quantization(2)
      >>> s = t.init(p)
      >>> float(s.steps.value['k'])  # 2 * mean|w| / sqrt(1)
      4.0
      >>> t.apply(p, s)['k'].tolist()  # grid {-2, -1, 0, 1} * 4
      [[0.0, 0.0], [4.0, -4.0]]
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)

    def widths(params):
        return select_values(params, rules, bits, lambda v: check_int("per-rule bits", v, minimum=2, maximum=8))

    def init(params):
        warn_unused_rules(params, rules, "lsq_quantization")
        steps = jax.tree.map(
            lambda b, w: None if b is None else lsq_init_step(w, b), widths(params), params, is_leaf=is_none
        )
        return LSQState(count=jnp.zeros((), jnp.int32), steps=Trainable(steps))

    def apply(params, state):
        def quant(b, s, w):
            return w if b is None else lsq_fake_quant(w, s, b)

        return jax.tree.map(quant, widths(params), state.steps.value, params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params, info
        return state._replace(count=state.count + 1)

    def describe(params, state):
        flat = jax.tree.leaves_with_path(widths(params), is_leaf=is_none)
        steps = jax.tree.leaves(state.steps.value, is_leaf=is_none)
        return {
            path_name(p): LeafSpec(bits=b, scheme="lsq", scale=jnp.maximum(s, EPS))
            for (p, b), s in zip(flat, steps)
            if b is not None
        }

    return Transform(init, apply, update, describe)
