"""The pruning transforms whose masks only shrink: :func:`pruning`, :func:`fixed_masks`, :func:`straight_through`."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, check_float_targets, is_none, select_values, warn_unused_rules
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_fraction
from jaxcompress.core.paths import path_name
from jaxcompress.prune.masks import apply_masks, check_keeps_some, describe_masks, global_mask_from_count, num_pruned
from jaxcompress.prune.schedules import IterativeSchedule, PolynomialSchedule, one_shot_schedule
from jaxcompress.prune.structures import NM, Structure, Unstructured, group_count, mask_for_count, validate

#: Criteria: ``'magnitude'`` |w|; ``'random'``; ``'saliency'`` |w * g| (first-order Taylor, from the
#: step's gradients); ``'movement'`` scores accumulated from ``-w * g`` every step (Sanh et al. 2020).
CRITERIA = ("magnitude", "random", "saliency", "movement")
Schedule = Union[PolynomialSchedule, IterativeSchedule]


class PruneState(NamedTuple):
    """State of :func:`pruning` and :func:`fixed_masks`.

    Attributes:
      count: int32, ``update`` calls so far (the schedule's step).
      masks: bool keep-mask at each pruned leaf, ``None`` elsewhere.
      scores: movement scores (float, like the masks) for ``criterion='movement'``; ``None`` otherwise.
      rng: PRNG key for ``criterion='random'``; ``None`` otherwise.
    """

    count: jax.Array
    masks: Any
    scores: Any = None
    rng: Optional[jax.Array] = None


def _targets(params, rules, sparsity, structure):
    """Per-leaf final sparsity (``True`` takes ``sparsity``, a float overrides it), structure-checked."""
    targets = select_values(params, rules, sparsity, lambda v: check_fraction("per-rule sparsity", v))
    for t, w in zip(jax.tree.leaves(targets, is_leaf=is_none), jax.tree.leaves(params)):
        if t is not None:
            validate(structure, jnp.shape(w))
    return targets


def _check_keeps_some(params, targets, structure, scope, sparsity) -> None:
    """Refuses a sparsity that rounds to every weight (or group) of a leaf, or of all of them."""
    if isinstance(structure, NM):
        return
    flat = [(path_name(p), t, w) for (p, t), w in zip(
        jax.tree.leaves_with_path(targets, is_leaf=is_none), jax.tree.leaves(params)) if t is not None]
    if scope == "global":
        check_keeps_some("sparsity", sparsity, sum(int(jnp.size(w)) for _, _, w in flat), "all pruned leaves together")
        return
    for name, t, w in flat:
        check_keeps_some("sparsity", t, group_count(structure, jnp.shape(w)), f"leaf {name!r}")


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
    """Pruning with any criterion, structure, scope and schedule; masks only shrink.

    On each of the schedule's update steps (inside ``jit``, under ``lax.cond``; other steps only
    count) every selected leaf gets a new keep-mask removing ``round(s_t * groups)`` of its
    lowest-scoring groups; pruned groups score lowest, so masks only shrink. The count is Python's
    ``round`` in double precision at the final sparsity, so unstructured magnitude pruning removes
    exactly the weights ``torch.nn.utils.prune.l1_unstructured`` removes (and ``Channels`` those of
    ``ln_structured``). With :func:`~jaxcompress.prune.schedules.polynomial_schedule` this is the
    gradual pruning of Zhu & Gupta (2017). The latent params are never changed; ``apply``
    multiplies by the masks.

    Args:
      sparsity: final sparsity of each selected leaf (``scope='layer'``) or of all of them together
        (``scope='global'``), in ``[0, 1)``. Ignored by :class:`~jaxcompress.prune.structures.NM`
        (sparsity ``1 - n/m`` from the first update step).
      criterion: one of :data:`CRITERIA`. ``'saliency'`` and ``'movement'`` read ``UpdateInfo.grads``,
        the gradient at the pruned view, dense (inside the train step): ``|w * g|`` is the
        first-order estimate of the loss change when ``w`` is removed from the view, and ``-w * g``
        is Sanh et al.'s movement score (their straight-through gradient). At ``init`` (no
        gradients) both fall back to magnitude, and so does a leaf whose gradients hold NaN or
        inf at an update (movement scores are then not accumulated for that step).
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
      A :class:`~jaxcompress.core.transform.Transform` with :class:`PruneState`; its ``describe``
      gives ``LeafSpec(mask=..., structure=structure)`` per pruned leaf.

    Raises:
      ValueError / TypeError: bad sparsity, criterion, scope, structure (e.g. an axis the tensor
        does not have, ``n > m``, ``n = 0``), schedule, or a rule selecting a non-float leaf; at
        ``init``, a sparsity that rounds to every weight (group) of a leaf (e.g. 0.999999 of 128
        weights): the error names the leaf and the largest sparsity that keeps one. Rules
        matching nothing give a ``UserWarning`` at ``init``.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcompress.prune.structures import Channels
      >>> t = pruning(0.5)
      >>> p = {'kernel': jnp.array([[1., -4.], [0.5, 3.]]), 'bias': jnp.array([0.1, 0.2])}
      >>> s = t.init(p)
      >>> t.apply(p, s)['kernel'].tolist()
      [[0.0, -4.0], [0.0, 3.0]]
      >>> list(t.describe(p, s)), t.describe(p, s)['kernel'].structure
      (['kernel'], Unstructured())
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
            f"got {type(schedule).__name__}: {schedule!r}."
        )

    def leaf_scores(w, g, mv, key):
        if criterion == "random":
            return jax.random.uniform(key, jnp.shape(w))
        if criterion == "movement" and mv is not None:
            return mv
        if criterion == "saliency" and g is not None:
            # non-finite gradients say nothing: the leaf falls back to magnitude for this update
            return jnp.where(jnp.all(jnp.isfinite(g)), jnp.abs(w * g), jnp.abs(w))
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
        flat_mv = [None] * len(flat_w) if state.scores is None else treedef.flatten_up_to(state.scores)
        key = None if state.rng is None else jax.random.fold_in(state.rng, step)
        scores = []
        for i, (t, w, m, g, mv) in enumerate(zip(flat_t, flat_w, flat_m, flat_g, flat_mv)):
            if t is None:
                scores.append(None)
                continue
            s = leaf_scores(w, g, mv, None if key is None else jax.random.fold_in(key, i))
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
        live = global_mask_from_count(
            [s for s in scores if s is not None],
            count_for(sum(s.size for s in scores if s is not None), sparsity, step),
            normalize=normalize,
        )
        it = iter(live)
        return jax.tree.unflatten(treedef, [None if s is None else next(it) for s in scores])

    def init(params):
        warn_unused_rules(params, rules, "pruning")
        check_float_targets(params, rules, "pruned")
        targets = _targets(params, rules, sparsity, structure)
        if scope == "global" and any(
            t not in (None, sparsity) for t in jax.tree.leaves(targets, is_leaf=is_none)
        ):
            raise ValueError("scope='global' uses one sparsity for all leaves; rule values must be True or None.")
        _check_keeps_some(params, targets, structure, scope, sparsity)
        like = lambda dtype: jax.tree.map(  # noqa: E731
            lambda t, w: None if t is None else jnp.ones(jnp.shape(w), dtype), targets, params, is_leaf=is_none
        )
        scores = jax.tree.map(lambda m: None if m is None else m * 0, like(jnp.float32), is_leaf=is_none)
        state = PruneState(
            count=jnp.zeros((), jnp.int32),
            masks=like(bool),
            scores=scores if criterion == "movement" else None,
            rng=jax.random.key(seed) if criterion == "random" else None,
        )
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
                    # a leaf with non-finite gradients keeps its scores for this step
                    lambda s, w, g: None if s is None else jnp.where(jnp.all(jnp.isfinite(g)), s - w * g, s),
                    state.scores, params, grads, is_leaf=is_none
                )
            )
        masks = jax.lax.cond(
            schedule.is_update_step(count),
            lambda: compute(params, state, grads, count),
            lambda: state.masks,
        )
        return state._replace(count=count, masks=masks)

    def describe(params, state):
        return describe_masks(params, state.masks, structure)

    return Transform(init, apply, update, describe)


def fixed_masks(masks: Any, *, structure: Optional[Structure] = None) -> Transform:
    """A transform that applies given masks and never changes them.

    Use it to keep the masks of a finished pruning run (or of :func:`~jaxcompress.prune.saliency.snip_masks`)
    while training on, e.g. during quantization-aware training:
    ``chain(fixed_masks(masks), weight_quantization(8))``.

    Args:
      masks: a pytree shaped like the params with a bool mask at pruned leaves, ``None`` elsewhere.
      structure: the structure the masks have (e.g. ``NM(2, 4)``), reported by ``describe`` for
        export; default ``None`` (any pattern).

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`PruneState`.

    Raises:
      ValueError: at ``init``, if ``masks`` and the params differ in structure or shape.

    Example:
      >>> import jax.numpy as jnp
      >>> t = fixed_masks({'k': jnp.array([True, False]), 'b': None})
      >>> p = {'k': jnp.array([3., 4.]), 'b': jnp.array([1.])}
      >>> s = t.init(p)
      >>> t.apply(p, s)['k'].tolist(), t.describe(p, s)['k'].mask.tolist()
      ([3.0, 0.0], [True, False])
    """

    def init(params):
        apply_masks(params, masks)  # validates structure and shapes
        return PruneState(count=jnp.zeros((), jnp.int32), masks=masks)

    def apply(params, state):
        return apply_masks(params, state.masks)

    def update(params, state, info):
        del params, info
        return state._replace(count=state.count + 1)

    def describe(params, state):
        return describe_masks(params, state.masks, structure)

    return Transform(init, apply, update, describe)


def straight_through(transform: Transform) -> Transform:
    """Sparse forward, dense backward: the view of ``transform`` with the identity's gradient.

    ``apply(w) = w + stop_gradient(view(w) - w)``, so every latent weight, pruned or not, gets the
    gradient of the loss at the pruned view (STE pruning, e.g. Zhou et al. 2021 for N:M).

    Args:
      transform: any transform, e.g. ``pruning(0.9)`` or ``pruning(0.5, structure=NM(2, 4))``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with the same state and description.

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

    return transform._replace(apply=apply)
