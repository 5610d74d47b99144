"""An honest estimate of the stored size of a compressed model.

Until weights are packed to files, the size is estimated from what a packed file must hold:
for each compressed leaf, the non-zero values at their bit width, the positions of the
non-zeros (a bitmask, or a list of indices when that is smaller), and one float32 scale per
quantization channel; every other leaf is stored as float32.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from jaxcompress.core.rules import is_none


class SizeReport(NamedTuple):
    """Size of a params pytree.

    Attributes:
      params: number of scalars.
      nonzero_params: number of non-zero scalars.
      bytes_float32: size if every scalar were float32.
      bytes_compressed: estimated stored size (see the module docstring).
    """

    params: int
    nonzero_params: int
    bytes_float32: int
    bytes_compressed: int


def leaf_bits(values: np.ndarray, *, bits: Optional[int], sparse: bool, num_scales: int) -> int:
    """Bits needed to store one leaf.

    Args:
      values: the leaf as the model runs it (pruned and/or fake-quantized view).
      bits: bit width of its values, or ``None`` for float32.
      sparse: whether to store it as a sparse tensor (positions + non-zero values), when smaller.
      num_scales: quantization scales stored with it (float32 each).

    Returns:
      An upper bound on the bits of an encoding that reproduces ``values`` exactly.
    """
    n = int(values.size)
    value_bits = 32 if bits is None else int(bits)
    dense = n * value_bits
    best = dense
    if sparse and n:
        nnz = int(np.count_nonzero(values))
        bitmask = n + nnz * value_bits
        index_bits = max(1, math.ceil(math.log2(n)))
        indices = nnz * (index_bits + value_bits)
        best = min(dense, bitmask, indices)
    return best + 32 * num_scales


def size_report(view: Any, *, bits: Any = None, masks: Any = None, per_channel: bool = True) -> SizeReport:
    """Counts params, non-zeros and estimated bytes of a compressed view.

    Args:
      view: the params as the model runs them (``transform.apply(params, state)``).
      bits: a pytree shaped like ``view`` with an int bit width at quantized leaves and ``None``
        elsewhere (see :func:`~jaxcompress.quant.weights.bit_widths`), or ``None``.
      masks: a pytree with a mask at pruned leaves and ``None`` elsewhere, or ``None``.
      per_channel: quantized leaves carry one scale per output channel (last axis) if true, else one.

    Returns:
      A :class:`SizeReport`.
    """
    leaves = [np.asarray(x) for x in jax.tree.leaves(view)]
    n_leaves = len(leaves)
    bit_leaves = jax.tree.leaves(bits, is_leaf=is_none) if bits is not None else [None] * n_leaves
    mask_leaves = jax.tree.leaves(masks, is_leaf=is_none) if masks is not None else [None] * n_leaves
    if len(bit_leaves) != n_leaves or len(mask_leaves) != n_leaves:
        raise ValueError(
            f"bits/masks must have one entry per leaf of view ({n_leaves}), got "
            f"{len(bit_leaves)} and {len(mask_leaves)}."
        )
    total = nonzero = bits_total = 0
    for x, b, m in zip(leaves, bit_leaves, mask_leaves):
        total += x.size
        nonzero += int(np.count_nonzero(x))
        scales = 0 if b is None else (x.shape[-1] if per_channel and x.ndim else 1)
        bits_total += leaf_bits(x, bits=b, sparse=m is not None, num_scales=scales)
    return SizeReport(total, nonzero, 4 * total, math.ceil(bits_total / 8))
