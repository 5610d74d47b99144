"""Mask shapes: which groups of weights are removed together.

A structure turns a score tensor (higher = more important) and a number of groups to remove into
a boolean keep-mask of the same shape:

* :class:`Unstructured`: single weights.
* :class:`Channels`: whole slices along ``axis`` (output channels, filters, neurons), ranked by
  the L1 or L2 norm of their scores, like ``torch.nn.utils.prune.ln_structured``.
* :class:`Blocks`: tiles of ``shape`` over the last ``len(shape)`` axes, ranked by their L1 norm.
* :class:`NM`: N kept out of every M consecutive weights along ``axis`` (2:4 for sparse tensor
  cores); its sparsity is ``1 - N/M`` whatever target is asked.
"""
from __future__ import annotations

from typing import NamedTuple, Union

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_fraction, check_int
from jaxcompress.prune.masks import mask_from_count, num_pruned


class Unstructured(NamedTuple):
    """Prune single weights."""


class Channels(NamedTuple):
    """Prune whole slices along ``axis`` ranked by their ``ord``-norm (1 or 2).

    Attributes:
      axis: the axis indexing the channels (``-1``: output features of a Flax kernel).
      ord: 1 (L1) or 2 (L2) norm over every other axis.
    """

    axis: int = -1
    ord: int = 1


class Blocks(NamedTuple):
    """Prune tiles of ``shape`` over the last ``len(shape)`` axes, ranked by their L1 norm.

    Attributes:
      shape: the tile, e.g. ``(4, 4)``; each trailing axis must be divisible by it.
    """

    shape: tuple = (4, 4)


class NM(NamedTuple):
    """Keep ``n`` of every ``m`` consecutive weights along ``axis``.

    Attributes:
      n: weights kept per group, ``1 <= n <= m``.
      m: group size; the axis length must be divisible by it.
      axis: the grouped axis; ``-2`` is the input dimension of Flax Dense and Conv kernels.
    """

    n: int = 2
    m: int = 4
    axis: int = -2


Structure = Union[Unstructured, Channels, Blocks, NM]


def _axis(shape, axis, what):
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"{what}.axis must be an int, got {axis!r}.")
    if not -len(shape) <= axis < len(shape):
        raise ValueError(
            f"{what}.axis={axis} does not exist for a tensor of shape {tuple(shape)} "
            f"(valid: {-len(shape)}..{len(shape) - 1})."
        )
    return axis % len(shape)


def validate(structure, shape) -> None:
    """Checks that ``structure`` is valid for a tensor of ``shape``; raises ValueError/TypeError."""
    if isinstance(structure, Unstructured):
        return
    if isinstance(structure, Channels):
        _axis(shape, structure.axis, "Channels")
        if structure.ord not in (1, 2):
            raise ValueError(f"Channels.ord must be 1 or 2, got {structure.ord!r}.")
        return
    if isinstance(structure, Blocks):
        block = tuple(structure.shape)
        if not block or len(block) > len(shape):
            raise ValueError(f"Blocks.shape={block} needs 1..{len(shape)} axes for a tensor of shape {tuple(shape)}.")
        for b, d in zip(block, shape[-len(block):]):
            check_int("Blocks.shape entry", b, minimum=1)
            if d % b:
                raise ValueError(f"Blocks.shape={block} does not divide the trailing axes of shape {tuple(shape)}.")
        return
    if isinstance(structure, NM):
        if isinstance(structure.n, int) and not isinstance(structure.n, bool) and structure.n == 0:
            raise ValueError("NM.n must be >= 1, got 0: NM(0, m) would remove every weight; keep at least "
                             "one per group, e.g. NM(2, 4).")
        n = check_int("NM.n", structure.n, minimum=1)
        m = check_int("NM.m", structure.m, minimum=1)
        if n > m:
            raise ValueError(f"NM needs n <= m, got n={n}, m={m}: keep n of every m weights, e.g. NM(2, 4).")
        ax = _axis(shape, structure.axis, "NM")
        if shape[ax] % m:
            raise ValueError(
                f"NM: axis {structure.axis} has length {shape[ax]}, not divisible by m={m} (shape {tuple(shape)})."
            )
        return
    raise TypeError(
        f"structure must be Unstructured(), Channels(axis, ord), Blocks(shape) or NM(n, m, axis), "
        f"got {type(structure).__name__}."
    )


def structured_mask(scores: jax.Array, sparsity, structure: Structure = Unstructured()) -> jax.Array:
    """A keep-mask removing ``round(fraction * groups)`` lowest-scoring groups of ``structure``.

    Args:
      scores: non-negative importance scores (e.g. ``|w|``), any shape.
      sparsity: the sparsity (fraction of groups to remove); ignored by :class:`NM`.
        A Python float is rounded exactly like ``torch.nn.utils.prune`` (``round(s * groups)``).
      structure: :class:`Unstructured`, :class:`Channels`, :class:`Blocks` or :class:`NM`.

    Returns:
      A bool array shaped like ``scores``.

    Raises:
      ValueError / TypeError: if the structure does not fit the tensor.

    Example:
      >>> import jax.numpy as jnp
      >>> w = jnp.array([[1., 0.1, 3.], [2., 0.2, 1.]])
      >>> structured_mask(jnp.abs(w), 1 / 3, Channels(axis=1)).astype(int).tolist()
      [[1, 0, 1], [1, 0, 1]]
      >>> structured_mask(jnp.array([[4., 1., 3., 2.]]), 0.0, NM(2, 4, axis=1)).astype(int).tolist()
      [[1, 0, 1, 0]]
    """
    validate(structure, jnp.shape(scores))
    if isinstance(sparsity, (int, float)):
        check_fraction("sparsity", sparsity)
    return mask_for_count(scores, num_pruned(group_count(structure, jnp.shape(scores)), sparsity), structure)


def mask_for_count(scores: jax.Array, num_remove, structure: Structure = Unstructured()) -> jax.Array:
    """Like :func:`structured_mask` with the number of groups to remove given (may be traced)."""
    shape = jnp.shape(scores)
    if isinstance(structure, Unstructured):
        return mask_from_count(scores, num_remove)
    if isinstance(structure, Channels):
        ax = structure.axis % len(shape)
        others = tuple(i for i in range(len(shape)) if i != ax)
        a = jnp.abs(scores)
        norms = jnp.sum(a, axis=others) if structure.ord == 1 else jnp.sqrt(jnp.sum(a * a, axis=others))
        keep = mask_from_count(norms, num_remove)
        return jnp.broadcast_to(jnp.expand_dims(keep, others), shape)
    if isinstance(structure, Blocks):
        block = tuple(structure.shape)
        lead = shape[: len(shape) - len(block)]
        split = list(lead)
        for b, d in zip(block, shape[len(lead):]):
            split += [d // b, b]
        tiles = jnp.reshape(jnp.abs(scores), split)
        inner = tuple(len(lead) + 2 * i + 1 for i in range(len(block)))
        sums = jnp.sum(tiles, axis=inner)
        keep = mask_from_count(sums, num_remove)
        return jnp.reshape(jnp.broadcast_to(jnp.expand_dims(keep, inner), split), shape)
    # N:M: rank inside each group of m along the axis.
    ax = structure.axis % len(shape)
    moved = jnp.moveaxis(scores, ax, -1)
    groups = jnp.reshape(moved, moved.shape[:-1] + (moved.shape[-1] // structure.m, structure.m))
    # Stable double argsort: rank 0 is the largest score; ties keep the earlier weight.
    order = jnp.argsort(-groups, axis=-1, stable=True)
    ranks = jnp.argsort(order, axis=-1, stable=True)
    keep = jnp.reshape(ranks < structure.n, moved.shape)
    return jnp.moveaxis(keep, -1, ax)


def group_count(structure: Structure, shape) -> int:
    """How many prunable groups a tensor of ``shape`` has under ``structure``."""
    validate(structure, shape)
    size = 1
    for d in shape:
        size *= d
    if isinstance(structure, Channels):
        return shape[structure.axis % len(shape)]
    if isinstance(structure, Blocks):
        for b in structure.shape:
            size //= b
    return size
