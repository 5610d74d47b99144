"""Pruning masks: exact-count magnitude masks, applying masks to params, and describing them."""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.finite import is_concrete
from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import is_none
from jaxcompress.core.transform import LeafSpec
from jaxcompress.core.validation import check_fraction, check_same_structure


def num_pruned(size: int, sparsity):
    """How many of ``size`` weights a ``sparsity`` removes: ``round(sparsity * size)``.

    For a Python number this is exactly Python's :func:`round` in double precision, matching
    ``torch.nn.utils.prune``'s ``round(amount * n)``; a traced sparsity rounds in float32.
    """
    if isinstance(sparsity, (int, float)):
        return round(float(sparsity) * size)
    return jnp.round(jnp.asarray(sparsity, jnp.float32) * size).astype(jnp.int32)


def check_keeps_some(name: str, sparsity: float, groups: int, where: str = "the tensor") -> None:
    """Raises ``ValueError`` when ``sparsity`` would remove every one of ``groups`` (``round(s * n) == n``).

    A sparsity below 1 can still round to all of a small layer; removing a whole layer silently
    disconnects the model, so the pruning transforms refuse it with the largest sparsity that
    keeps one group. (The array functions such as :func:`magnitude_mask` remove exactly
    ``round(s * n)``, as ``torch.nn.utils.prune`` does, whatever that leaves.)

    Example:
      >>> check_keeps_some('sparsity', 0.999999, 128)
      Traceback (most recent call last):
      ...
      ValueError: sparsity=0.999999 removes all 128 weights (or groups) of the tensor; use at most 0.99 (127/128 keeps one).
    """
    if groups > 0 and num_pruned(groups, sparsity) >= groups:
        most = (groups - 1) / groups
        raise ValueError(
            f"{name}={sparsity} removes all {groups} weights (or groups) of {where}; use at most "
            f"{math.floor(most * 100) / 100:g} ({groups - 1}/{groups} keeps one)."
        )


def mask_from_count(scores: jax.Array, num_remove) -> jax.Array:
    """A keep-mask removing exactly ``num_remove`` lowest-scoring entries (ties: earlier first;
    a NaN score ranks lowest, with ``-inf``).

    No sort: the ``num_remove``-th smallest score is found by a 32-step radix select on the
    order-preserving integer image of the float32 scores (one counting pass per bit), then ties at
    that value are removed in flat order. The result equals a stable argsort's, about 10x faster
    on CPU for tensors with millions of entries. ``num_remove`` may be traced.
    """
    flat = jnp.ravel(jnp.asarray(scores, jnp.float32))
    flat = jnp.where(flat == 0, jnp.float32(0), flat)  # -0.0 ties with 0.0 (XLA folds `x + 0`)
    flat = jnp.where(jnp.isnan(flat), -jnp.inf, flat)  # a NaN score is removed first
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


def global_mask_from_count(scores: list, num_remove, *, normalize: bool = False) -> list:
    """Keep-masks for several score arrays with one threshold: ``num_remove`` lowest entries overall.

    Args:
      scores: a list of score arrays (``-inf`` marks entries already removed).
      num_remove: how many entries to remove over all arrays together (may be traced).
      normalize: divide each array by the L2 norm of its finite scores first, so arrays of
        different scale compete fairly.

    Returns:
      A list of bool keep-masks shaped like ``scores``.
    """
    if normalize:
        scores = [s / (jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(s), s * s, 0.0))) + 1e-12) for s in scores]
    keep = mask_from_count(jnp.concatenate([jnp.ravel(s) for s in scores]), num_remove)
    out, offset = [], 0
    for s in scores:
        out.append(keep[offset : offset + s.size].reshape(s.shape))
        offset += s.size
    return out


def apply_masks(params: Any, masks: Any) -> Any:
    """Multiplies each param by its mask; leaves whose mask is ``None`` pass through.

    Args:
      params: a pytree of arrays.
      masks: a pytree of the same structure with a boolean (or 0/1) array of the same shape at
        each pruned leaf and ``None`` elsewhere. Inside ``jit`` a numeric mask cannot be read
        and any non-zero value keeps its weight.

    Returns:
      The masked params (a new pytree); removed entries are exactly 0 (also a NaN weight).

    Raises:
      ValueError: if ``masks`` and ``params`` differ in structure or in a leaf's shape, or a
        concrete numeric mask holds a value other than 0 and 1 (naming the leaf).

    Example:
      >>> import jax.numpy as jnp
      >>> apply_masks({'w': jnp.array([1., 2.]), 'b': jnp.array([3.])},
      ...             {'w': jnp.array([True, False]), 'b': None})['w'].tolist()
      [1.0, 0.0]
    """
    check_same_structure("masks", masks, params)
    for path, m in jax.tree.leaves_with_path(masks, is_leaf=is_none):
        check_mask(path_name(path), m)
    # where, not multiply: a pruned entry is exactly 0 even if its latent weight is NaN or inf
    return jax.tree.map(
        lambda m, p: p if m is None else jnp.where(_as_bool(m), p, jnp.zeros_like(p)), masks, params, is_leaf=is_none
    )


def _as_bool(mask):
    mask = jnp.asarray(mask)
    return mask if mask.dtype == jnp.bool_ else mask != jnp.zeros((), mask.dtype)


def check_mask(path: str, mask: Any) -> None:
    """A mask must be bool, or numbers that are all 0 or 1 (checked when concrete); else ``ValueError``
    (``TypeError`` for a dtype that is neither), naming the leaf."""
    if mask is None:
        return
    dtype = jnp.asarray(mask).dtype if not hasattr(mask, "dtype") else mask.dtype
    if dtype == jnp.bool_:
        return
    if not (jnp.issubdtype(dtype, jnp.number)):
        raise TypeError(f"the mask at {path!r} must be bool (True keeps), got dtype {dtype}.")
    if is_concrete(mask):
        arr = np.asarray(mask)
        bad = ~((arr == 0) | (arr == 1))
        if bad.any():
            raise ValueError(
                f"the mask at {path!r} must be bool or hold only 0 and 1, got {arr[bad].ravel()[:3].tolist()}; "
                "a mask keeps or removes a weight, it does not scale it. Use mask.astype(bool) or mask > 0."
            )


def describe_masks(params: Any, masks: Any, structure: Any = None) -> dict:
    """The ``describe`` of a masking transform: ``{path: LeafSpec(mask, structure)}`` per masked leaf.

    Args:
      params: the params (for the leaf paths).
      masks: a pytree like ``params`` with a bool mask at pruned leaves, ``None`` elsewhere.
      structure: the masks' structure (e.g. ``Unstructured()``), or ``None``.

    Example:
      >>> import jax.numpy as jnp
      >>> d = describe_masks({'a': {'kernel': jnp.ones(2)}, 'b': jnp.ones(1)},
      ...                    {'a': {'kernel': jnp.array([True, False])}, 'b': None})
      >>> list(d), d['a/kernel'].mask.tolist()
      (['a/kernel'], [True, False])
    """
    check_same_structure("masks", masks, params)
    leaves = jax.tree.leaves_with_path(masks, is_leaf=is_none)
    return {path_name(p): LeafSpec(mask=m, structure=structure) for p, m in leaves if m is not None}
