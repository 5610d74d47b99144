"""Per-layer sparsity: uniform, Erdos-Renyi-Kernel (ERK), and per-leaf targets as rules."""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

from jaxcompress.core.rules import Rules, explain
from jaxcompress.core.validation import check_fraction


def selected_shapes(params: Any, rules: Optional[Rules] = None) -> dict[str, tuple]:
    """``{leaf name: shape}`` of the leaves ``rules`` select (any value other than ``None``)."""
    return {d.path: d.shape for d in explain(params, rules) if d.value is not None}


def erk_sparsities(params: Any, sparsity: float, *, rules: Optional[Rules] = None, power: float = 1.0) -> dict[str, float]:
    """Per-layer sparsities of the Erdos-Renyi-Kernel distribution (Evci et al. 2020, RigL).

    The density of a layer with shape ``(d_1, ..., d_k)`` is ``eps * (sum d_i / prod d_i) ** power``,
    with ``eps`` chosen so that the selected layers together keep ``(1 - sparsity)`` of their
    weights; a layer whose density would exceed 1 is kept dense and ``eps`` is solved again.

    Args:
      params: the params pytree.
      sparsity: overall sparsity of the selected leaves, in ``[0, 1)``.
      rules: which leaves are pruned (default: every float leaf with ``ndim >= 2``).
      power: exponent on the ERK ratio (``erk_power_scale`` in the RigL code; 0 gives uniform).

    Returns:
      ``{leaf name: sparsity}`` for the selected leaves.

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)`` or nothing is selected.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'a': {'kernel': jnp.ones((100, 100))}, 'b': {'kernel': jnp.ones((100, 10))}}
      >>> s = erk_sparsities(p, 0.9)
      >>> round(s['a/kernel'], 4), round(s['b/kernel'], 4)
      (0.929, 0.6097)
    """
    sparsity = check_fraction("sparsity", sparsity)
    power = float(power)
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}.")
    shapes = selected_shapes(params, rules)
    if not shapes:
        raise ValueError("erk_sparsities: the rules select no leaf; check them with jaxcompress.explain(params, rules).")
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: (sum(s) / math.prod(s)) ** power for k, s in shapes.items()}
    total_keep = (1.0 - sparsity) * sum(sizes.values())
    dense: set[str] = set()
    while True:
        free = [k for k in shapes if k not in dense]
        budget = total_keep - sum(sizes[k] for k in dense)
        eps = budget / sum(raw[k] * sizes[k] for k in free)
        over = [k for k in free if eps * raw[k] > 1.0]
        if not over:
            break
        dense.add(max(over, key=lambda k: raw[k]))
    return {k: 0.0 if k in dense else 1.0 - eps * raw[k] for k in shapes}


def uniform_sparsities(params: Any, sparsity: float, *, rules: Optional[Rules] = None) -> dict[str, float]:
    """``{leaf name: sparsity}``: the same sparsity for every selected leaf."""
    sparsity = check_fraction("sparsity", sparsity)
    return {k: sparsity for k in selected_shapes(params, rules)}


def sparsity_rules(per_leaf: Mapping[str, float]) -> list[tuple[str, Any]]:
    """Turns ``{leaf name: sparsity}`` into exact-name rules for any pruner's ``rules=``.

    Leaves not named are left alone.

    Example:
      >>> sparsity_rules({'fc1/kernel': 0.9})
      [('^fc1/kernel$', 0.9), ('.*', None)]
    """
    out = []
    for name, s in per_leaf.items():
        out.append((f"^{re.escape(name)}$", check_fraction(f"sparsity of {name!r}", s)))
    return out + [(".*", None)]


def overall_sparsity(params: Any, per_leaf: Mapping[str, float]) -> float:
    """The fraction of the named leaves' weights that ``per_leaf`` sparsities remove."""
    sizes = {d.path: math.prod(d.shape) for d in explain(params, [(".*", True)], min_ndim=0)}
    total = sum(sizes[k] for k in per_leaf)
    return sum(per_leaf[k] * sizes[k] for k in per_leaf) / max(total, 1)

