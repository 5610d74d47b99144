"""Sensitivity analysis: prune each layer alone, measure, and allocate per-layer sparsities.

Han et al. (2015) chose each layer's sparsity by hand from such curves; :func:`allocate_sparsity`
does it greedily: starting dense, it repeatedly raises the sparsity of the layer whose predicted
metric loss per removed weight is smallest, until the global target is met.
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, explain
from jaxcompress.core.validation import check_fraction
from jaxcompress.prune.masks import magnitude_mask


class Sensitivity(NamedTuple):
    """Result of :func:`sensitivity_analysis`.

    Attributes:
      baseline: the metric of the unpruned params.
      sparsities: the grid, ascending.
      curves: ``{leaf name: [metric at each grid sparsity]}`` with only that leaf pruned.
      sizes: ``{leaf name: number of weights}``.
    """

    baseline: float
    sparsities: tuple
    curves: dict
    sizes: dict


def selected_leaves(params: Any, rules: Optional[Rules], caller: str) -> tuple[list, list, list, Any]:
    """``(selected names, every leaf's name, leaves, treedef)`` of the leaves ``rules`` select.

    Raises:
      ValueError: when the rules select no leaf (the message names ``caller``).
    """
    selected = [d.path for d in explain(params, rules) if d.value is not None]
    if not selected:
        raise ValueError(f"{caller}: the rules select no leaf; check jaxcompress.explain(params, rules).")
    names = [path_name(p) for p, _ in jax.tree.leaves_with_path(params)]
    leaves, treedef = jax.tree.flatten(params)
    return selected, names, leaves, treedef


def sensitivity_analysis(
    params: Any,
    evaluate: Callable[[Any], float],
    *,
    sparsities: Sequence[float] = (0.0, 0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
    rules: Optional[Rules] = None,
) -> Sensitivity:
    """Prunes each selected leaf alone by magnitude over ``sparsities`` and records ``evaluate``.

    Args:
      params: trained params.
      evaluate: ``params -> metric`` (higher is better, e.g. validation accuracy); called
        ``1 + leaves * len(sparsities)`` times.
      sparsities: the grid, each in ``[0, 1)``.
      rules: leaves to analyse (default: every float leaf with ``ndim >= 2``).

    Returns:
      A :class:`Sensitivity` (plot ``curves[name]`` against ``sparsities``).

    Raises:
      ValueError: on a bad grid or when the rules select nothing.
    """
    grid = tuple(sorted(check_fraction("sparsities entry", s) for s in sparsities))
    if not grid:
        raise ValueError("sparsities must not be empty, e.g. (0.5, 0.7, 0.9).")
    names, paths, leaves, treedef = selected_leaves(params, rules, "sensitivity_analysis")
    baseline = float(evaluate(params))
    curves, sizes = {}, {}
    for name in names:
        i = paths.index(name)
        w = leaves[i]
        sizes[name] = int(np.size(w))
        curve = []
        for s in grid:
            pruned = list(leaves)
            pruned[i] = w * magnitude_mask(jnp.abs(w), s).astype(w.dtype)
            curve.append(float(evaluate(jax.tree.unflatten(treedef, pruned))))
        curves[name] = curve
    return Sensitivity(baseline, grid, curves, sizes)


def allocate_sparsity(result: Sensitivity, target: float, *, resolution: float = 0.01) -> dict[str, float]:
    """Per-layer sparsities reaching ``target`` overall with the least predicted metric loss.

    A layer's predicted loss at sparsity ``s`` is ``baseline - curve(s)``, linear between grid
    points; losses of layers are assumed to add. Sparsity is raised in steps of ``resolution``, always in the
    layer with the smallest loss increase per removed weight; the last step is trimmed so the
    overall sparsity is exactly ``target``. No layer goes beyond the grid's largest sparsity.

    Args:
      result: from :func:`sensitivity_analysis`.
      target: overall sparsity of the analysed leaves, in ``[0, 1)``.
      resolution: step of the search.

    Returns:
      ``{leaf name: sparsity}``; pass it to :func:`~jaxcompress.prune.distribution.sparsity_rules`.

    Raises:
      ValueError: if ``target`` exceeds what the grid allows.

    Example:
      >>> r = Sensitivity(1.0, (0.0, 0.5, 0.9), {'a': [1.0, 0.99, 0.9], 'b': [1.0, 0.6, 0.2]},
      ...                 {'a': 100, 'b': 100})
      >>> {k: round(v, 2) for k, v in allocate_sparsity(r, 0.5).items()}
      {'a': 0.9, 'b': 0.1}
    """
    target = check_fraction("target", target)
    grid = np.asarray(result.sparsities, np.float64)
    top = float(grid[-1])
    names = list(result.curves)
    total = sum(result.sizes[k] for k in names)
    if target > top + 1e-12:
        raise ValueError(f"target {target} exceeds the largest analysed sparsity {top}; extend the grid.")

    def loss(name, s):
        drop = result.baseline - np.asarray(result.curves[name], np.float64)
        return float(np.interp(s, grid, drop))

    current = {k: 0.0 for k in names}
    removed = 0.0
    need = target * total
    while removed < need - 1e-9:
        best, best_cost = None, math.inf
        for k in names:
            s_next = min(current[k] + resolution, top)
            if s_next <= current[k]:
                continue
            gain = (s_next - current[k]) * result.sizes[k]
            cost = (loss(k, s_next) - loss(k, current[k])) / gain
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:
            break
        s_next = min(current[best] + resolution, top)
        step = (s_next - current[best]) * result.sizes[best]
        if removed + step > need:
            s_next = current[best] + (need - removed) / result.sizes[best]
            step = need - removed
        current[best] = s_next
        removed += step
    return current
