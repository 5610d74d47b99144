"""Automatic compression under a file-byte budget: per-layer sparsity and bit width from measurements.

Each selected layer is compressed alone at every ``(sparsity, bits)`` of a grid (magnitude pruning,
then a symmetric or affine grid of that many bits on the kept weights), the model is scored with
only that layer changed (e.g. validation accuracy), and the layer is packed as
:func:`~jaxcompress.export.save` would pack it, so every option has a *measured* metric and a
*measured* byte count. :func:`allocate_budget` then picks one option per layer, exactly, by a
multiple-choice knapsack over the Pareto frontier: the least predicted metric loss (losses of
layers assumed to add) whose predicted file size fits a byte budget, or the fewest bytes whose
predicted loss stays within an allowed drop. :func:`budget_transform` builds the compressed model
of a choice, the same view a recipe's fine-tuning stage starts from.

Example:
  >>> import jax, jax.numpy as jnp
  >>> params = {'a': {'kernel': jax.random.normal(jax.random.key(0), (64, 64)), 'bias': jnp.zeros(64)}}
  >>> x = jax.random.normal(jax.random.key(1), (32, 64))
  >>> def score(p):  # higher is better: minus the output error
  ...     return -float(jnp.mean((x @ p['a']['kernel'] - x @ params['a']['kernel']) ** 2))
  >>> sens = budget_sensitivity(params, score, sparsities=(0.0, 0.5, 0.9), bits=(4, 8))
  >>> choice = allocate_budget(sens, budget_bytes=sens.fixed_bytes + 1700)
  >>> option = choice['a/kernel']
  >>> option.nbytes <= 1700, option.sparsity, option.bits
  (True, 0.5, 4)
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules
from jaxcompress.core.transform import Transform, chain
from jaxcompress.core.validation import check_fraction
from jaxcompress.export.artifact import save
from jaxcompress.export.pack import pack_leaf
from jaxcompress.prune.masks import magnitude_mask
from jaxcompress.prune.pruner import fixed_masks
from jaxcompress.prune.sensitivity import selected_leaves
from jaxcompress.quant.weights import weight_quantization


class LayerOption(NamedTuple):
    """One way to store one layer, measured.

    Attributes:
      sparsity: fraction of its weights removed by magnitude.
      bits: bit width of the kept weights.
      nbytes: bytes of the layer in the file (packed values, positions, scales, entropy coded).
      metric: the model's metric with only this layer compressed so.
    """

    sparsity: float
    bits: int
    nbytes: int
    metric: float


class BudgetSensitivity(NamedTuple):
    """Result of :func:`budget_sensitivity`.

    Attributes:
      baseline: the metric of the uncompressed params.
      fixed_bytes: file bytes of everything but the selected layers (the other leaves, the
        metadata), so ``fixed_bytes + sum(option.nbytes)`` predicts a choice's file size.
      options: ``{leaf name: [LayerOption, ...]}``, one per grid point.
      sizes: ``{leaf name: number of weights}``.
    """

    baseline: float
    fixed_bytes: int
    options: dict
    sizes: dict


def _check_bits(bits: Sequence[int]) -> tuple:
    out = tuple(sorted(set(bits)))
    if not out or not all(isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in out):
        raise ValueError(f"bits must be a non-empty list of bit widths in 2..8, e.g. (2, 4, 8), got {bits!r}.")
    return out


def budget_transform(params: Any, choice: dict, *, symmetric: bool = True, per_channel: bool = True) -> Transform:
    """The compression a choice describes: each named layer pruned by magnitude to its sparsity
    (masks fixed from ``params``), then its kept weights quantized to its bits.

    Args:
      params: the params the magnitudes are taken from.
      choice: ``{leaf name: LayerOption}`` (or anything with ``sparsity`` and ``bits``), e.g.
        from :func:`allocate_budget`; leaves not named stay float.
      symmetric, per_channel: the quantization grid (per output channel by default).

    Returns:
      ``chain(fixed_masks(...), weight_quantization(...))``; its ``apply`` and ``describe`` give
      the view and description to :func:`~jaxcompress.export.save`.
    """
    names = [path_name(p) for p, _ in jax.tree.leaves_with_path(params)]
    unknown = sorted(set(choice) - set(names))
    if unknown:
        raise ValueError(f"choice names {unknown}, not leaves of params; the leaves are {names}.")
    leaves, treedef = jax.tree.flatten(params)
    masks = [magnitude_mask(jnp.abs(w), float(choice[n].sparsity)) if n in choice else None
             for n, w in zip(names, leaves)]
    rules = [(f"^{re.escape(n)}$", int(o.bits)) for n, o in choice.items()] + [(".*", None)]
    return chain(fixed_masks(jax.tree.unflatten(treedef, masks)),
                 weight_quantization(8, symmetric=symmetric, channel_axis=-1 if per_channel else None, rules=rules))


def compressed_view(params: Any, transform: Transform) -> tuple[Any, dict]:
    """``(view, description)`` of a freshly initialised ``transform`` on ``params``."""
    state = transform.init(params)
    return transform.apply(params, state), transform.describe(params, state)


def file_bytes(view: Any, description: Optional[dict]) -> int:
    """The size of the artifact :func:`~jaxcompress.export.save` writes for this view, in bytes."""
    with tempfile.TemporaryDirectory() as d:
        return save(os.path.join(d, "model.npz"), view, description).file_bytes


def budget_sensitivity(
    params: Any,
    evaluate: Callable[[Any], float],
    *,
    sparsities: Sequence[float] = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95),
    bits: Sequence[int] = (2, 3, 4, 6, 8),
    rules: Optional[Rules] = None,
    symmetric: bool = True,
    per_channel: bool = True,
) -> BudgetSensitivity:
    """Measures every ``(sparsity, bits)`` of each selected layer alone: metric and packed bytes.

    Args:
      params: trained params (float, or with zeros already pruned).
      evaluate: ``params -> metric`` (higher is better, e.g. validation accuracy); called
        ``1 + layers * len(sparsities) * len(bits)`` times.
      sparsities: the sparsity grid, each in ``[0, 1)``.
      bits: the bit widths, each in ``2..8``.
      rules: the layers to compress (default: every float leaf with ``ndim >= 2``).
      symmetric, per_channel: the quantization grid.

    Returns:
      A :class:`BudgetSensitivity`.

    Raises:
      ValueError: on a bad grid or when the rules select nothing.
    """
    grid = tuple(sorted(set(check_fraction("sparsities entry", s) for s in sparsities)))
    if not grid:
        raise ValueError("sparsities must not be empty, e.g. (0.0, 0.5, 0.9).")
    widths = _check_bits(bits)
    selected, names, leaves, treedef = selected_leaves(params, rules, "budget_sensitivity")
    baseline = float(evaluate(params))
    options, sizes = {}, {}
    for name in selected:
        i = names.index(name)
        sizes[name] = int(np.size(leaves[i]))
        row = []
        for s in grid:
            for b in widths:
                opt = LayerOption(s, b, 0, 0.0)
                view, desc = compressed_view(params, budget_transform(params, {name: opt}, symmetric=symmetric,
                                                                      per_channel=per_channel))
                w = jax.tree.leaves(view)[i]
                _, _, report = pack_leaf(name, np.asarray(w), desc.get(name))
                changed = list(leaves)
                changed[i] = w
                row.append(opt._replace(nbytes=int(report.nbytes),
                                        metric=float(evaluate(jax.tree.unflatten(treedef, changed)))))
        options[name] = row
    reference = {n: o[0] for n, o in options.items()}
    total = file_bytes(*compressed_view(params, budget_transform(params, reference, symmetric=symmetric,
                                                                 per_channel=per_channel)))
    fixed = total - sum(o.nbytes for o in reference.values())
    return BudgetSensitivity(baseline, int(fixed), options, sizes)


def _frontier(sens: BudgetSensitivity) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The Pareto frontier of predicted (bytes, loss) over all choices: bytes ascending, loss
    strictly descending, and per point the option index of every layer."""
    cost = np.zeros(1, np.int64)
    loss = np.zeros(1, np.float64)
    picks = np.zeros((1, 0), np.int64)
    for name, opts in sens.options.items():
        ob = np.array([o.nbytes for o in opts], np.int64)
        ol = np.array([sens.baseline - o.metric for o in opts], np.float64)
        c = (cost[:, None] + ob[None, :]).ravel()
        l_ = (loss[:, None] + ol[None, :]).ravel()
        prev, which = np.divmod(np.arange(c.size), len(opts))
        order = np.lexsort((l_, c))
        c, l_, prev, which = c[order], l_[order], prev[order], which[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(l_)[:-1]])
        keep = l_ < best_before
        cost, loss = c[keep], l_[keep]
        picks = np.concatenate([picks[prev[keep]], which[keep, None]], axis=1)
    return cost, loss, picks


def allocate_budget(sens: BudgetSensitivity, *, budget_bytes: Optional[int] = None,
                    max_drop: Optional[float] = None) -> dict[str, LayerOption]:
    """One option per layer: the least predicted loss within ``budget_bytes`` of file size, or
    the fewest bytes with a predicted loss of at most ``max_drop``.

    A layer's loss is ``baseline - option.metric``; losses of layers are assumed to add, and the
    predicted file size is ``fixed_bytes`` plus the options' bytes. The search is exact over the
    measured options (a multiple-choice knapsack solved on the Pareto frontier).

    Args:
      sens: from :func:`budget_sensitivity`.
      budget_bytes: the file-size budget (give this or ``max_drop``).
      max_drop: the allowed predicted loss of the metric (e.g. 0.01 for one point of accuracy).

    Returns:
      ``{leaf name: LayerOption}``; build the model with :func:`budget_transform`.

    Raises:
      ValueError: neither or both limits given, or no choice meets the limit (the message
        gives the smallest reachable size, or the smallest predicted loss).
    """
    if (budget_bytes is None) == (max_drop is None):
        raise ValueError("allocate_budget: give exactly one of budget_bytes (a file size) or max_drop (an allowed "
                         f"loss of the metric), got budget_bytes={budget_bytes!r}, max_drop={max_drop!r}.")
    cost, loss, picks = _frontier(sens)
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 1:
            raise ValueError(f"budget_bytes must be a positive integer number of bytes, got {budget_bytes!r}.")
        fits = np.nonzero(sens.fixed_bytes + cost <= budget_bytes)[0]
        if not fits.size:
            raise ValueError(f"budget_bytes={budget_bytes:,} is below the smallest reachable file size "
                             f"{sens.fixed_bytes + int(cost[0]):,} bytes with these grids; raise the budget or add "
                             "higher sparsities / fewer bits to the grids.")
        point = int(fits[-1])  # the frontier's loss falls as its bytes grow
    else:
        if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not np.isfinite(max_drop) \
                or max_drop < 0:
            raise ValueError(f"max_drop must be a number >= 0 (e.g. 0.01), got {max_drop!r}.")
        ok = np.nonzero(loss <= max_drop + 1e-12)[0]
        if not ok.size:
            raise ValueError(f"max_drop={max_drop} is below the smallest predicted loss {loss[-1]:.4g} of any choice "
                             "on these grids; allow a larger drop or add sparsity 0 and 8 bits to the grids.")
        point = int(ok[0])
    return {name: sens.options[name][int(k)] for name, k in zip(sens.options, picks[point])}
