"""Masks computed once from scores: global thresholds and SNIP at initialisation."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select, warn_unused_rules
from jaxcompress.core.validation import check_fraction
from jaxcompress.prune.masks import global_mask_from_count, num_pruned


def global_masks(scores: Any, sparsity: float, *, normalize: bool = False) -> Any:
    """Keep-masks with one threshold across all leaves (``torch``'s ``global_unstructured``).

    Args:
      scores: a pytree of score arrays (higher = keep), ``None`` at leaves left alone.
      sparsity: fraction of all scored entries removed, in ``[0, 1)``: exactly ``round(s * total)``.
      normalize: divide each leaf's scores by their L2 norm first.

    Returns:
      A pytree of bool masks (``None`` where ``scores`` is ``None``).

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or there are no scores.

    Example:
      >>> import jax.numpy as jnp
      >>> m = global_masks({'a': jnp.array([1., 5.]), 'b': jnp.array([2., 3., 4.]), 'c': None}, 0.4)
      >>> m['a'].tolist(), m['b'].tolist(), m['c']
      ([False, True], [False, True, True], None)
    """
    sparsity = check_fraction("sparsity", sparsity)
    flat_s, treedef = jax.tree.flatten(scores, is_leaf=is_none)
    live = [jnp.asarray(s, jnp.float32) for s in flat_s if s is not None]
    if not live:
        raise ValueError("global_masks: no scores given (every leaf is None).")
    it = iter(global_mask_from_count(live, num_pruned(sum(s.size for s in live), sparsity), normalize=normalize))
    return jax.tree.unflatten(treedef, [None if s is None else next(it) for s in flat_s])


def snip_scores(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any], *,
                rules: Optional[Rules] = None) -> Any:
    """Connection sensitivity ``|w * dL/dw|`` summed over ``batches`` (SNIP, Lee et al. 2019).

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar`` (mean loss of the batch).
      params: the params at initialisation.
      batches: a few batches (SNIP used one; several reduce the variance).
      rules: leaves to score (default: float leaves with ``ndim >= 2``); others get ``None``.

    Returns:
      A pytree of scores (``None`` at leaves not selected).

    Raises:
      ValueError: if ``batches`` is empty.
    """
    selected = select(params, rules)
    warn_unused_rules(params, rules, "pruning")
    grad_fn = jax.jit(jax.grad(loss_fn))
    total, n = None, 0
    for batch in batches:
        g = grad_fn(params, batch)
        total = g if total is None else jax.tree.map(jnp.add, total, g)
        n += 1
    if n == 0:
        raise ValueError("snip_scores: batches is empty; pass at least one batch.")
    return jax.tree.map(
        lambda v, w, g: None if v is None else jnp.abs(w * g), selected, params, total, is_leaf=is_none
    )


def snip_masks(loss_fn: Callable[[Any, Any], jax.Array], params: Any, batches: Iterable[Any], sparsity: float, *,
               rules: Optional[Rules] = None) -> Any:
    """SNIP masks: prune, before training, the globally least sensitive ``sparsity`` of the weights.

    Train with them through :func:`~jaxcompress.prune.pruner.fixed_masks`.

    Args:
      loss_fn, params, batches, rules: as :func:`snip_scores`.
      sparsity: fraction of the selected weights removed, in ``[0, 1)``.

    Returns:
      A masks pytree (bool at selected leaves, ``None`` elsewhere).
    """
    sparsity = check_fraction("sparsity", sparsity)
    return global_masks(snip_scores(loss_fn, params, batches, rules=rules), sparsity)
