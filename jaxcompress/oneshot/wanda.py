"""Wanda (Sun et al. 2023): prune by weight magnitude times input activation norm, per output.

The score of weight ``W_ij`` (output ``i``, input ``j``) is ``|W_ij| * ||X_j||_2``, the norm taken
over all calibration tokens; weights are compared within each output (for a Flax Dense kernel
``(in, out)``: within each column, across the inputs), and no weight is updated.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_fraction
from jaxcompress.prune.masks import num_pruned
from jaxcompress.prune.structures import NM, Unstructured, mask_for_count


def wanda_scores(kernel, sum_sq) -> jax.Array:
    """``|kernel| * sqrt(sum_sq)[:, None]``: Wanda's score of each weight of an ``(in, out)`` kernel.

    Args:
      kernel: float ``(in, out)``.
      sum_sq: ``sum over tokens of x_j^2`` per input ``j``, shape ``(in,)``.
    """
    return jnp.abs(kernel) * jnp.sqrt(jnp.asarray(sum_sq, kernel.dtype))[:, None]


def wanda_mask(kernel, sum_sq, sparsity: float = 0.5, *, structure=Unstructured()) -> jax.Array:
    """Wanda's keep-mask of a Dense kernel.

    Args:
      kernel: float ``(in, out)`` kernel.
      sum_sq: per-input sum of squared activations over the calibration tokens, ``(in,)``.
      sparsity: with ``Unstructured()``, each output loses its ``round(sparsity * in)`` lowest
        scores (ties: the earlier input first).
      structure: ``Unstructured()`` or ``NM(n, m)``: ``n`` of every ``m`` consecutive inputs kept
        per output (``axis=-2``).

    Returns:
      A bool keep-mask shaped like ``kernel``.

    Raises:
      ValueError: bad shapes, sparsity or structure.

    Example:
      >>> import jax.numpy as jnp
      >>> k = jnp.array([[1.0, 1.0], [2.0, 0.1]])
      >>> wanda_mask(k, jnp.array([9.0, 1.0]), 0.5).tolist()   # scores [[3, 3], [2, 0.1]]
      [[True, True], [False, False]]
    """
    kernel = jnp.asarray(kernel)
    sum_sq = jnp.asarray(sum_sq)
    if kernel.ndim != 2 or sum_sq.shape != kernel.shape[:1]:
        raise ValueError(
            f"wanda_mask needs a 2-D kernel (in, out) and sum_sq of shape (in,), got {kernel.shape} and {sum_sq.shape}."
        )
    scores = wanda_scores(kernel, sum_sq)
    if isinstance(structure, NM):
        if structure.axis not in (0, -2) or kernel.shape[0] % structure.m or not 0 < structure.n <= structure.m:
            raise ValueError(f"structure={structure!r} needs axis=-2 and m dividing the {kernel.shape[0]} inputs.")
        return mask_for_count(scores, 0, structure)
    if not isinstance(structure, Unstructured):
        raise ValueError(f"structure must be Unstructured() or NM(n, m), got {structure!r}.")
    count = num_pruned(kernel.shape[0], check_fraction("sparsity", sparsity))
    ranks = jnp.argsort(jnp.argsort(scores, axis=0, stable=True), axis=0, stable=True)
    return ranks >= count
