"""An honest estimate of the stored size of a compressed model, read from its self-description.

The size is estimated from what a packed file must hold,
as the transform describes each leaf (``transform.describe(params, state)``, a
``{path: LeafSpec}`` dict): the values at the leaf's bit width; for a pruned leaf (a ``mask``)
only the non-zero values plus their positions (a bitmask, or a list of indices when that is
smaller; or, when its structure is ``NM(n, m)``, its mask keeps exactly ``n`` of every ``m`` and
that is smaller, every kept value with its ``ceil(log2(m))``-bit position in its group); every
scale it has as float32 (one per tensor, channel or group: the size of its ``scale``), every
zero point at the leaf's bit width, and a codebook's entries as float32; when the view holds a
``-0.0`` that is not pruned, one sign bit per zero (the file keeps it). Leaves the description
does not name are stored as float32.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import LeafSpec
from jaxcompress.export.pack import nm_slots


class SizeReport(NamedTuple):
    """Size of a params pytree.

    Attributes:
      params: number of scalars.
      nonzero_params: number of non-zero scalars.
      bytes_float32: size if every scalar were float32.
      bytes_compressed: estimated stored size (see the module docstring).
      file_bytes: the size of the saved artifact file (``os.path.getsize``) when
        :func:`size_report` is given one, else ``None``.
    """

    params: int
    nonzero_params: int
    bytes_float32: int
    bytes_compressed: int
    file_bytes: Optional[int] = None


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


def _sign_code_bits(x: np.ndarray) -> int:
    """Bits of a binary leaf that holds zeros: a sign code has no zero, so either 2 bits a value
    or the positions of the non-zeros (bitmask or index list) and their 1-bit signs."""
    n, nnz = int(x.size), int(np.count_nonzero(x))
    index_bits = max(1, math.ceil(math.log2(n)))
    return min(2 * n, n + nnz, nnz * (index_bits + 1))


def _spec_bits(x: np.ndarray, spec: LeafSpec) -> int:
    mask = None if spec.mask is None else np.asarray(spec.mask, bool)
    if mask is not None:
        x = np.where(mask, x, 0)  # a latent leaf counts as its pruned view
    extra = 0
    if spec.zero_point is not None:
        extra += int(np.size(spec.zero_point)) * (32 if spec.bits is None else int(spec.bits))
    if spec.codebook is not None:
        extra += 32 * int(np.size(spec.codebook))
    if (spec.bits is not None or spec.codebook is not None or mask is not None) and np.any(np.signbit(x) & (x == 0)):
        extra += int(np.count_nonzero(x == 0))  # a -0.0 its codes do not give: a sign flag per zero
    num_scales = 0 if spec.scale is None else int(np.size(spec.scale))
    nm = nm_slots(mask, spec.structure)
    nm_bits = math.inf
    if nm is not None:  # every kept value, zero or not, with its slot in the group
        where, slots, (_, m, _) = nm
        value_bits = 32 if spec.bits is None else int(spec.bits)
        if spec.scheme == "binary" and np.any(x.reshape(-1)[where] == 0):
            value_bits = 2  # a sign code has no zero
        nm_bits = slots.size * (value_bits + (m - 1).bit_length())
    if spec.scheme == "binary" and x.size and np.any(x == 0):
        return min(_sign_code_bits(x), nm_bits) + 32 * num_scales + extra
    return min(leaf_bits(x, bits=spec.bits, sparse=mask is not None, num_scales=0), nm_bits) + 32 * num_scales + extra


def size_report(view: Any, description: Optional[dict] = None, *, artifact=None) -> SizeReport:
    """Counts params, non-zeros and estimated stored bytes, as the transform describes each leaf.

    The estimate is what the description implies; the bytes a file really takes are those of the
    artifact :func:`jaxcompress.export.save` writes (packed, Huffman-coded), given as
    ``artifact=`` (its path, or the report ``save`` returned) and reported as ``file_bytes``.

    Args:
      view: the params as the model runs them (``transform.apply(params, state)``), or the latent
        params (pruned leaves then count by their mask).
      description: ``transform.describe(params, state)``: ``{path: LeafSpec}`` for the leaves the
        transform compressed; ``None`` or ``{}`` for an uncompressed model.
      artifact: optional path of the saved artifact file (or :func:`jaxcompress.export.save`'s
        report); its size on disk becomes ``file_bytes``.

    Returns:
      A :class:`SizeReport`.

    Raises:
      TypeError: when ``description`` is not a dict of ``LeafSpec``.
      ValueError: when it names a leaf that ``view`` does not have.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcompress.quant import weight_quantization
      >>> p = {'w': jnp.ones((4, 2))}
      >>> t = weight_quantization(8)
      >>> s = t.init(p)
      >>> size_report(t.apply(p, s), t.describe(p, s))  # 8 int8 values + 2 float32 scales
      SizeReport(params=8, nonzero_params=8, bytes_float32=32, bytes_compressed=16, file_bytes=None)
    """
    description = {} if description is None else description
    if not isinstance(description, dict) or not all(isinstance(v, LeafSpec) for v in description.values()):
        raise TypeError(
            f"description must be the {{path: LeafSpec}} dict of transform.describe(params, state), "
            f"got {type(description).__name__}."
        )
    leaves = {path_name(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(view)}
    unknown = sorted(set(description) - set(leaves))
    if unknown:
        raise ValueError(
            f"description names leaves that view does not have: {unknown[:5]} (view has "
            f"{sorted(leaves)[:5]}...). Describe the same params: transform.describe(params, state)."
        )
    total = nonzero = bits_total = 0
    for name, x in leaves.items():
        spec = description.get(name)
        total += x.size
        counted = x if spec is None or spec.mask is None else np.where(np.asarray(spec.mask, bool), x, 0)
        nonzero += int(np.count_nonzero(counted))
        bits_total += leaf_bits(x, bits=None, sparse=False, num_scales=0) if spec is None else _spec_bits(x, spec)
    file_bytes = None
    if artifact is not None:
        file_bytes = os.path.getsize(getattr(artifact, "path", artifact))
    return SizeReport(total, nonzero, 4 * total, math.ceil(bits_total / 8), file_bytes)
