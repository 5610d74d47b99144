"""Pruning masks: exact-count magnitude masks and applying masks to params."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import is_none
from jaxcompress.core.validation import check_fraction, check_same_structure


def num_pruned(size: int, sparsity):
    """How many of ``size`` weights a ``sparsity`` removes: ``round(sparsity * size)``.

    For a Python number this is exactly Python's :func:`round` in double precision, matching
    ``torch.nn.utils.prune``'s ``round(amount * n)``; a traced sparsity rounds in float32.
    """
    if isinstance(sparsity, (int, float)):
        return round(float(sparsity) * size)
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def mask_from_count(scores: jax.Array, num_remove) -> jax.Array:
    """A keep-mask removing exactly ``num_remove`` lowest-scoring entries (ties: earlier first).

    No sort: the ``num_remove``-th smallest score is found by a 32-step radix select on the
    order-preserving integer image of the float32 scores (one counting pass per bit), then ties at
    that value are removed in flat order. The result equals a stable argsort's, about 10x faster
    on CPU for tensors with millions of entries. ``num_remove`` may be traced.
    """
    flat = jnp.ravel(jnp.asarray(scores, jnp.float32))
    flat = jnp.where(flat == 0, jnp.float32(0), flat)  # -0.0 ties with 0.0 (XLA folds `x + 0`)
    bits = jax.lax.bitcast_convert_type(flat, jnp.uint32)
    # Order-preserving map float32 -> uint32: flip every bit of negatives, the sign bit of the rest.
    keys = jnp.where((bits >> 31) == 1, ~bits, bits | jnp.uint32(0x80000000))
    k = jnp.asarray(num_remove, jnp.int32)

    def set_bit(i, threshold):
        candidate = threshold | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(jnp.sum(keys < candidate, dtype=jnp.int32) < k, candidate, threshold)

    # The largest t with fewer than k keys below it: the k-th smallest key.
    threshold = jax.lax.fori_loop(0, 32, set_bit, jnp.uint32(0))
    below = jnp.sum(keys < threshold, dtype=jnp.int32)
    tied = keys == threshold
    remove = (keys < threshold) | (tied & (jnp.cumsum(tied, dtype=jnp.int32) <= k - below))
    return (~remove).reshape(jnp.shape(scores))


def magnitude_mask(scores: jax.Array, sparsity) -> jax.Array:
    """A boolean keep-mask that removes exactly ``round(sparsity * n)`` lowest-scoring entries.

    Ties are broken by position (earlier entries are removed first), so the count is exact
    even when many scores are equal (e.g. weights already pruned to zero).

    Args:
      scores: array of importance scores (e.g. ``abs(w)``), any shape.
      sparsity: fraction in ``[0, 1)``; a Python float is validated, a traced scalar is allowed
        inside ``jit``.

    Returns:
      A bool array shaped like ``scores``, ``True`` where the weight is kept.

    Raises:
      ValueError: if a Python ``sparsity`` is outside ``[0, 1)``.

    Example:
      >>> import jax.numpy as jnp
      >>> magnitude_mask(jnp.array([0.3, -0.1, 2.0, 0.05]), 0.5).tolist()
      [True, False, True, False]
    """
    if isinstance(sparsity, (int, float)):
        check_fraction("sparsity", sparsity)
    return mask_from_count(scores, num_pruned(jnp.size(scores), sparsity))


def apply_masks(params: Any, masks: Any) -> Any:
    """Multiplies each param by its mask; leaves whose mask is ``None`` pass through.

    Args:
      params: a pytree of arrays.
      masks: a pytree of the same structure with a boolean (or 0/1) array of the same shape at
        each pruned leaf and ``None`` elsewhere.

    Returns:
      The masked params (a new pytree).

    Raises:
      ValueError: if ``masks`` and ``params`` differ in structure or in a leaf's shape.

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({'w': jnp.array([1., 2.]), 'b': jnp.array([3.])},
      ...             {'w': jnp.array([True, False]), 'b': None})['w'].tolist()
      [1.0, 0.0]
    """
    check_same_structure("masks", masks, params)
    return jax.tree.map(
        lambda m, p: p if m is None else p * m.astype(p.dtype), masks, params, is_leaf=is_none
    )


def sparsity_of(tree: Any, masks: Any = None) -> dict[str, float]:
    """Fraction of zeros per leaf of ``tree`` (only leaves with a mask when ``masks`` is given)."""
    from jaxcompress.core.paths import path_name

    out = {}
    mask_leaves = (
        jax.tree.leaves(masks, is_leaf=is_none) if masks is not None else [True] * len(jax.tree.leaves(tree))
    )
    for (path, leaf), m in zip(jax.tree.leaves_with_path(tree), mask_leaves):
        if m is None:
            continue
        leaf = jnp.asarray(leaf)
        out[path_name(path)] = float(jnp.mean(leaf == 0)) if leaf.size else 0.0
    return out
