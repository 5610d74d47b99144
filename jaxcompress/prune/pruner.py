"""The general pruning transform: a criterion, a structure, a scope and a schedule."""
from __future__ import annotations

import re
import warnings
from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, explain, is_none, select
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_fraction
from jaxcompress.prune.masks import apply_masks, num_pruned
from jaxcompress.prune.schedules import IterativeSchedule, PolynomialSchedule, one_shot_schedule
from jaxcompress.prune.structures import NM, Structure, Unstructured, group_count, mask_for_count, validate

#: Criteria: ``'magnitude'`` |w|; ``'random'``; ``'saliency'`` |w * g| (first-order Taylor, from the
#: step's gradients); ``'movement'`` scores accumulated from ``-w * g`` every step (Sanh et al. 2020).
CRITERIA = ("magnitude", "random", "saliency", "movement")
Schedule = Union[PolynomialSchedule, IterativeSchedule]


class PrunerState(NamedTuple):
    """State of :func:`pruning`.

    Attributes:
      count: int32, ``update`` calls so far (the schedule's step).
      masks: bool keep-mask at each pruned leaf, ``None`` elsewhere.
      scores: movement scores (float, like the masks) for ``criterion='movement'``; ``None`` leaves otherwise.
      rng: PRNG key for ``criterion='random'``.
    """

    count: jax.Array
    masks: Any
    scores: Any
    rng: jax.Array


def warn_unused_rules(params: Any, rules: Optional[Rules]) -> None:
    """Warns (``UserWarning``) listing the rules that matched no candidate leaf."""
    if rules is None:
        return
    used = {d.rule for d in explain(params, rules) if d.rule is not None}
    # A trailing catch-all ('.*', ...) is a default, not a user's guess at a name.
    unused = [f"{i}: {r[0]!r}" for i, r in enumerate(rules) if i not in used and r[0] not in (".*", "")]
    if unused:
        warnings.warn(
            f"these pruning rules match no float leaf with ndim >= 2: {unused}. "
            "Check the names with jaxcompress.explain(params, rules).",
            UserWarning,
            stacklevel=3,
        )


def check_candidates(params: Any, rules: Optional[Rules]) -> None:
    """Raises TypeError when a rule names a non-float leaf (first match wins; catch-alls skip them)."""
    if rules is None:
        return
    for d in explain(params, [(".*", True)], min_ndim=0):
        if d.reason != "not floating":
            continue
        for pattern, value in rules:
            if not re.search(pattern, d.path):
                continue
            if pattern not in (".*", "") and value not in (None, False):
                raise TypeError(
                    f"rule {pattern!r} selects {d.path!r} of dtype {d.dtype}, which is not floating and cannot "
                    "be pruned; exclude it or give it the value None."
                )
            break


def _targets(params, rules, sparsity, structure):
    def target(value):
        if value is None:
            return None
        return sparsity if value is True else check_fraction("per-rule sparsity", value)

    targets = jax.tree.map(target, select(params, rules), is_leaf=is_none)
    for t, w in zip(jax.tree.leaves(targets, is_leaf=is_none), jax.tree.leaves(params)):
        if t is not None:
            validate(structure, jnp.shape(w))
    return targets


def pruning(
    sparsity: float,
    *,
    criterion: str = "magnitude",
    structure: Structure = Unstructured(),
    scope: str = "layer",
    normalize: bool = False,
    schedule: Optional[Schedule] = None,
    rules: Optional[Rules] = None,
    seed: int = 0,
) -> Transform:
    """Pruning with any criterion, structure, scope and schedule.

    On each of the schedule's update steps (inside ``jit``, under ``lax.cond``; other steps only
    count) every selected leaf gets a new keep-mask removing ``round(s_t * groups)`` of its
    lowest-scoring groups; pruned groups score lowest, so masks only shrink.

    Args:
      sparsity: final sparsity of each selected leaf (``scope='layer'``) or of all of them together
        (``scope='global'``), in ``[0, 1)``. Ignored by :class:`~jaxcompress.prune.structures.NM`
        (sparsity ``1 - n/m`` from the first update step).
      criterion: one of :data:`CRITERIA`. ``'saliency'`` and ``'movement'`` read the gradients in
        ``UpdateInfo.grads``; at ``init`` (no gradients) they fall back to magnitude.
      structure: ``Unstructured()``, ``Channels(axis, ord)``, ``Blocks(shape)`` or ``NM(n, m, axis)``.
      scope: ``'layer'`` (each leaf its own sparsity; rule values may override it) or ``'global'``
        (one threshold over all selected leaves, unstructured only, like ``global_unstructured``).
      normalize: with ``scope='global'``, divide each leaf's scores by their L2 norm first, so
        layers of different scale compete fairly.
      schedule: :func:`~jaxcompress.prune.schedules.polynomial_schedule`,
        :func:`~jaxcompress.prune.schedules.iterative_schedule` or one-shot at ``init`` (default).
      rules: ``(regex, value)`` rules choosing the leaves; a float value is that leaf's sparsity.
      seed: seed of ``criterion='random'``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`PrunerState`.

    Raises:
      ValueError / TypeError: bad sparsity, criterion, scope, structure (e.g. an axis the tensor
        does not have, ``n > m``), schedule, or a rule selecting a non-float leaf. Rules matching
        nothing give a ``UserWarning`` at ``init``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcompress.prune.structures import Channels
      >>> t = pruning(0.5, structure=Channels(axis=-1))
      >>> p = {'kernel': jnp.array([[1., -4.], [0.5, 3.]])}
      >>> t.apply(p, t.init(p))['kernel'].tolist()
      [[0.0, -4.0], [0.0, 3.0]]
    """
    sparsity = check_fraction("sparsity", sparsity)
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}.")
    if scope not in ("layer", "global"):
        raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}.")
    if scope == "global" and not isinstance(structure, Unstructured):
        raise ValueError(f"scope='global' supports only Unstructured(), got {structure!r}; use scope='layer'.")
    if criterion == "movement" and not isinstance(structure, (Unstructured, NM)):
        raise ValueError(f"criterion='movement' supports Unstructured() and NM(...), got {structure!r}.")
    schedule = one_shot_schedule() if schedule is None else schedule
    if not isinstance(schedule, (PolynomialSchedule, IterativeSchedule)):
        raise TypeError(
            "schedule must come from polynomial_schedule(...), iterative_schedule(...) or one_shot_schedule(), "
            f"got {type(schedule).__name__}."
        )

    def leaf_scores(w, g, mv, key):
        if criterion == "random":
            return jax.random.uniform(key, jnp.shape(w))
        if criterion == "movement" and mv is not None:
            return mv
        if criterion == "saliency" and g is not None:
            return jnp.abs(w * g)
        return jnp.abs(w)

    def count_for(n, t, step):
        exact = num_pruned(n, t)  # Python float64 rounding, as torch.nn.utils.prune
        return jnp.where(jnp.asarray(step) >= schedule.end_step, exact, num_pruned(n, schedule.sparsity(step, t)))

    def compute(params, state, grads, step):
        targets = _targets(params, rules, sparsity, structure)
        flat_t, treedef = jax.tree.flatten(targets, is_leaf=is_none)
        flat_w = treedef.flatten_up_to(params)
        flat_m = treedef.flatten_up_to(state.masks)
        flat_g = [None] * len(flat_w) if grads is None else treedef.flatten_up_to(grads)
        flat_mv = treedef.flatten_up_to(state.scores)
        key = jax.random.fold_in(state.rng, step)
        scores = []
        for i, (t, w, m, g, mv) in enumerate(zip(flat_t, flat_w, flat_m, flat_g, flat_mv)):
            if t is None:
                scores.append(None)
                continue
            s = leaf_scores(w, g, mv, jax.random.fold_in(key, i))
            if isinstance(structure, (Unstructured, NM)):
                s = jnp.where(m, s, -jnp.inf)
            else:
                s = jnp.where(m, s, 0.0)
            scores.append(s)
        if scope == "layer":
            new = [
                None if t is None else mask_for_count(s, count_for(group_count(structure, s.shape), t, step), structure)
                for t, s in zip(flat_t, scores)
            ]
            return jax.tree.unflatten(treedef, new)
        live = [s for s in scores if s is not None]
        if normalize:
            live = [s / (jnp.sqrt(jnp.sum(jnp.where(jnp.isfinite(s), s * s, 0.0))) + 1e-12) for s in live]
        flat = jnp.concatenate([jnp.ravel(s) for s in live])
        keep = mask_for_count(flat, count_for(flat.size, sparsity, step))
        new, offset = [], 0
        for s in scores:
            if s is None:
                new.append(None)
                continue
            new.append(keep[offset : offset + s.size].reshape(s.shape))
            offset += s.size
        return jax.tree.unflatten(treedef, new)

    def init(params):
        warn_unused_rules(params, rules)
        check_candidates(params, rules)
        targets = _targets(params, rules, sparsity, structure)
        if scope == "global" and any(
            t not in (None, sparsity) for t in jax.tree.leaves(targets, is_leaf=is_none)
        ):
            raise ValueError("scope='global' uses one sparsity for all leaves; rule values must be True or None.")
        like = lambda dtype: jax.tree.map(  # noqa: E731
            lambda t, w: None if t is None else jnp.ones(jnp.shape(w), dtype), targets, params, is_leaf=is_none
        )
        scores = jax.tree.map(lambda m: None if m is None else m * 0, like(jnp.float32), is_leaf=is_none)
        if criterion != "movement":
            scores = jax.tree.map(lambda _: None, targets, is_leaf=is_none)
        state = PrunerState(jnp.zeros((), jnp.int32), like(bool), scores, jax.random.key(seed))
        masks = jax.lax.cond(
            schedule.is_update_step(state.count),
            lambda: compute(params, state, None, state.count),
            lambda: state.masks,
        )
        return state._replace(masks=masks)

    def apply(params, state):
        return apply_masks(params, state.masks)

    def update(params, state, info: UpdateInfo):
        count = state.count + 1
        grads = None if info is None else info.grads
        if criterion == "movement" and grads is not None:
            state = state._replace(
                scores=jax.tree.map(
                    lambda s, w, g: None if s is None else s - w * g, state.scores, params, grads, is_leaf=is_none
                )
            )
        masks = jax.lax.cond(
            schedule.is_update_step(count),
            lambda: compute(params, state, grads, count),
            lambda: state.masks,
        )
        return state._replace(count=count, masks=masks)

    return Transform(init, apply, update)


def straight_through(transform: Transform) -> Transform:
    """Sparse forward, dense backward: the view of ``transform`` with the identity's gradient.

    ``apply(w) = w + stop_gradient(view(w) - w)``, so every latent weight, pruned or not, gets the
    gradient of the loss at the pruned view (STE pruning, e.g. Zhou et al. 2021 for N:M).

    Args:
      transform: any transform, e.g. ``pruning(0.9)`` or ``pruning(0.5, structure=NM(2, 4))``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with the same state.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> t = straight_through(pruning(0.5))
      >>> p = {'k': jnp.array([[1., -4.], [0.5, 3.]])}
      >>> s = t.init(p)
      >>> jax.grad(lambda p: jnp.sum(t.apply(p, s)['k'] * 2.0))(p)['k'].tolist()
      [[2.0, 2.0], [2.0, 2.0]]
    """
    if not isinstance(transform, Transform):
        raise TypeError(f"straight_through needs a jaxcompress Transform, got {type(transform).__name__}.")

    def apply(params, state):
        view = transform.apply(params, state)
        return jax.tree.map(lambda w, v: w + jax.lax.stop_gradient(v - w), params, view)

    return Transform(transform.init, apply, transform.update)
