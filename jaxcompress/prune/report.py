"""Sparsity reports: per-layer and global counts of zeros."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import is_none


class SparsityRow(NamedTuple):
    """One leaf of a sparsity report.

    Attributes:
      path: the leaf's name.
      shape: its shape.
      size: number of weights.
      zeros: number of exact zeros.
      sparsity: ``zeros / size``.
    """

    path: str
    shape: tuple
    size: int
    zeros: int
    sparsity: float


def sparsity_report(params: Any, masks: Optional[Any] = None) -> tuple[list[SparsityRow], SparsityRow]:
    """Counts zeros per leaf and overall.

    Args:
      params: the (pruned) params or view.
      masks: optional masks pytree; only leaves with a mask are reported (and counted in the total).

    Returns:
      ``(rows, total)``; ``total.path`` is ``'total'``.

    Example:
      >>> import jax.numpy as jnp
      >>> rows, total = sparsity_report({'a': jnp.array([0., 1.]), 'b': jnp.zeros(2)})
      >>> [(r.path, r.zeros) for r in rows], total.sparsity
      ([('a', 1), ('b', 2)], 0.75)
    """
    leaves = jax.tree.leaves_with_path(params)
    mask_leaves = [True] * len(leaves) if masks is None else jax.tree.leaves(masks, is_leaf=is_none)
    if len(mask_leaves) != len(leaves):
        raise ValueError(f"masks has {len(mask_leaves)} leaves but params has {len(leaves)}; build both from one tree.")
    rows = []
    for (path, leaf), m in zip(leaves, mask_leaves):
        if m is None:
            continue
        a = np.asarray(leaf)
        zeros = int(np.sum(a == 0))
        rows.append(SparsityRow(path_name(path), tuple(a.shape), int(a.size), zeros, zeros / max(a.size, 1)))
    size, zeros = sum(r.size for r in rows), sum(r.zeros for r in rows)
    return rows, SparsityRow("total", (), size, zeros, zeros / max(size, 1))


def format_sparsity(params: Any, masks: Optional[Any] = None) -> str:
    """:func:`sparsity_report` as a Markdown table (one row per leaf and a total row)."""
    rows, total = sparsity_report(params, masks)
    lines = ["| leaf | shape | weights | zeros | sparsity |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows + [total]:
        lines.append(f"| {r.path} | {r.shape if r.shape else ''} | {r.size:,} | {r.zeros:,} | {100 * r.sparsity:.2f}% |")
    return "\n".join(lines)
