"""Per-layer sparsity: the Erdos-Renyi-Kernel (ERK) allocation, and per-leaf targets as rules."""
from __future__ import annotations

import math
import re
from typing import Any, Mapping, Optional

import jax

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, is_none, select_values
from jaxcompress.core.validation import check_fraction, check_positive


def erk_sparsities(params: Any, sparsity: float, *, rules: Optional[Rules] = None, power: float = 1.0) -> dict[str, float]:
    """Per-layer sparsities of the Erdos-Renyi-Kernel distribution (Evci et al. 2020, RigL).

    The density of a selected layer with shape ``(d_1, ..., d_k)`` is
    ``eps * m * (sum d_i / prod d_i) ** power``, with ``m`` the layer's multiplier (its rule value;
    ``True`` means 1) and ``eps`` chosen so that the selected layers together keep
    ``(1 - sparsity)`` of their weights; a layer whose density would exceed 1 is kept dense and
    ``eps`` is solved again. ``power=0`` with multipliers allocates density in proportion to the
    multipliers alone (e.g. keep the first and last layers denser).

    Args:
      params: the params pytree.
      sparsity: overall sparsity of the selected leaves, in ``[0, 1)``.
      rules: ``(regex, value)`` rules choosing the leaves (default: every float leaf with
        ``ndim >= 2``); a number value is that leaf's density multiplier (``> 0``).
      power: exponent on the ERK ratio (``erk_power_scale`` in the RigL code; 0 gives uniform).

    Returns:
      ``{leaf name: sparsity}`` for the selected leaves (exact, not rounded to whole weights;
      the pruners prune ``round(s * size)``).

    Raises:
      ValueError: if ``sparsity`` is outside ``[0, 1)``, ``power < 0``, a multiplier is not
        positive, or nothing is selected.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'a': {'kernel': jnp.ones((100, 100))}, 'b': {'kernel': jnp.ones((100, 10))}}
      >>> s = erk_sparsities(p, 0.9)
      >>> round(s['a/kernel'], 4), round(s['b/kernel'], 4)
      (0.929, 0.6097)
      >>> s = erk_sparsities(p, 0.9, rules=[('^b/', 4.0), ('.*', True)], power=0.0)
      >>> round((1 - s['b/kernel']) / (1 - s['a/kernel']), 6)
      4.0
    """
    sparsity = check_fraction("sparsity", sparsity)
    power = float(power)
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}.")
    mult = select_values(params, rules, 1.0, lambda v: check_positive("ERK density multiplier (rule value)", v))
    shapes, scale = {}, {}
    for (path, w), m in zip(jax.tree.leaves_with_path(params), jax.tree.leaves(mult, is_leaf=is_none)):
        if m is not None:
            shapes[path_name(path)], scale[path_name(path)] = tuple(w.shape), m
    if not shapes:
        raise ValueError("erk_sparsities: the rules select no leaf; check them with jaxcompress.explain(params, rules).")
    sizes = {k: math.prod(s) for k, s in shapes.items()}
    raw = {k: scale[k] * (sum(s) / math.prod(s)) ** power for k, s in shapes.items()}
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
