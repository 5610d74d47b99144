"""Magnitude pruning as a :class:`~jaxcompress.core.transform.Transform`."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select_values
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_fraction
from jaxcompress.prune.masks import apply_masks, mask_from_count, num_pruned
from jaxcompress.prune.pruner import warn_unused_rules
from jaxcompress.prune.schedules import PolynomialSchedule, one_shot_schedule


class PruneState(NamedTuple):
    """State of a pruning transform.

    Attributes:
      count: int32, number of ``update`` calls so far (optimizer steps seen); the schedule's ``t``.
      masks: pytree shaped like the params: a bool keep-mask at each pruned leaf, ``None`` elsewhere.
    """

    count: jax.Array
    masks: Any


def _targets(params, rules, final_sparsity):
    """Per-leaf final sparsity: ``True`` takes the default, a float overrides it."""
    return select_values(params, rules, final_sparsity, lambda v: check_fraction("per-rule sparsity", v))


def magnitude_pruning(
    final_sparsity: float,
    *,
    schedule: Optional[PolynomialSchedule] = None,
    rules: Optional[Rules] = None,
) -> Transform:
    """Layer-wise unstructured magnitude pruning, reached gradually or at once.

    Each selected leaf loses exactly ``round(s_t * size)`` of its smallest-magnitude weights. Masks
    are recomputed only on the schedule's update steps, from ``|w| * mask`` so that pruned weights
    stay pruned (masks only shrink, as in Zhu & Gupta 2017). The latent params are never changed;
    ``apply`` multiplies by the masks, so gradients of pruned weights are zero.

    Args:
      final_sparsity: fraction of weights removed from each selected leaf at the end, in ``[0, 1)``.
      schedule: a :class:`~jaxcompress.prune.schedules.PolynomialSchedule`; default: one-shot at
        ``init`` (masks are computed at once and then fixed).
      rules: ``(regex, value)`` pairs selecting leaves (see :mod:`jaxcompress.core.rules`); a float
        value is that leaf's own final sparsity. Default: every float leaf with ``ndim >= 2``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`PruneState`.

    Raises:
      ValueError: if a sparsity is outside ``[0, 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> t = magnitude_pruning(0.5)
      >>> p = {'kernel': jnp.array([[1., -4.], [0.5, 3.]]), 'bias': jnp.array([0.1, 0.2])}
      >>> t.apply(p, t.init(p))['kernel'].tolist()
      [[0.0, -4.0], [0.0, 3.0]]
    """
    final_sparsity = check_fraction("final_sparsity", final_sparsity)
    schedule = one_shot_schedule() if schedule is None else schedule
    if not isinstance(schedule, PolynomialSchedule):
        raise TypeError(
            f"schedule must be a PolynomialSchedule (polynomial_schedule(...) or one_shot_schedule()), "
            f"got {type(schedule).__name__}."
        )

    def compute(params, masks, step):
        targets = _targets(params, rules, final_sparsity)

        def new_mask(t, m, w):
            if t is None:
                return None
            n = w.size
            # The final count is rounded in double precision (exactly torch's round(s * n)).
            k = jnp.where(jnp.asarray(step) >= schedule.end_step, num_pruned(n, t),
                          num_pruned(n, schedule.sparsity(step, t)))
            # Pruned entries score below every kept one (even a kept exact zero): masks only shrink.
            return mask_from_count(jnp.where(m, jnp.abs(w), -1.0), k)

        return jax.tree.map(new_mask, targets, masks, params, is_leaf=is_none)

    def init(params):
        warn_unused_rules(params, rules)
        targets = _targets(params, rules, final_sparsity)
        ones = jax.tree.map(
            lambda t, w: None if t is None else jnp.ones(jnp.shape(w), bool), targets, params, is_leaf=is_none
        )
        count = jnp.zeros((), jnp.int32)
        masks = jax.lax.cond(
            schedule.is_update_step(count), lambda: compute(params, ones, count), lambda: ones
        )
        return PruneState(count=count, masks=masks)

    def apply(params, state):
        return apply_masks(params, state.masks)

    def update(params, state, info: UpdateInfo):
        del info
        count = state.count + 1
        masks = jax.lax.cond(
            schedule.is_update_step(count), lambda: compute(params, state.masks, count), lambda: state.masks
        )
        return PruneState(count=count, masks=masks)

    return Transform(init, apply, update)


def fixed_masks(masks: Any) -> Transform:
    """A transform that applies given masks and never changes them.

    Use it to keep the masks of a finished pruning run while training on (e.g. during
    quantization-aware training: ``chain(fixed_masks(masks), weight_quantization(8))``).

    Args:
      masks: a pytree shaped like the params with a bool mask at pruned leaves, ``None`` elsewhere.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`PruneState`.

    Raises:
      ValueError: at ``init``, if ``masks`` and the params differ in structure or shape.
    """

    def init(params):
        apply_masks(params, masks)  # validates structure and shapes
        return PruneState(count=jnp.zeros((), jnp.int32), masks=masks)

    def apply(params, state):
        return apply_masks(params, state.masks)

    def update(params, state, info):
        del params, info
        return state._replace(count=state.count + 1)

    return Transform(init, apply, update)
