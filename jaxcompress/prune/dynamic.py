"""Dynamic sparse training: SET (Mocanu et al. 2018) and RigL (Evci et al. 2020).

The overall sparsity stays constant; every ``update_every`` steps until ``end_step`` each layer
drops the ``k`` active weights of smallest magnitude and grows ``k`` inactive ones (RigL: largest
dense-gradient magnitude; SET: at random), with ``k = floor(f_t * active)`` and the cosine-annealed
drop fraction ``f_t = drop_fraction / 2 * (1 + cos(pi * t / end_step))``.

Both work two ways, with the same masks:

* as the step's transform, ``make_train_step(..., transform=rigl(...))``: the params stay the
  latent dense weights and ``UpdateInfo.grads`` is the dense gradient at the view, which RigL
  grows by. A grown weight must start at zero, but its latent value is whatever it was when it
  was dropped (or initialised), and a transform never changes the params. So the state keeps,
  per sparse leaf, ``offsets``: the latent value of each weight at the update that grew it; the
  view is ``mask * (w - offsets)``, which is 0 for a weight just grown and then moves exactly as
  a weight started at zero (its gradient is the view's). Drops rank ``|w - offsets|``, the
  weight the model sees. Optimizer moments of grown weights are not reset and the optimizer's
  weight decay acts on the latent ``w``; with a plain gradient optimizer (SGD, Adam without
  weight decay on fresh moments) the two ways give the same masks and views, otherwise prefer
  the adapter or put weight decay in the loss on the view.
* through :func:`~jaxcompress.prune.optax_adapter.sparse_optimizer`: the params themselves are
  kept sparse, grown weights land at zero with their optimizer moments reset (every optimizer is
  exact); the offsets stay zero there because the params at inactive positions are zero.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, check_float_targets, is_none, select_values, warn_unused_rules
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_fraction, check_int
from jaxcompress.prune.distribution import erk_sparsities
from jaxcompress.prune.masks import describe_masks, mask_from_count, num_pruned
from jaxcompress.prune.structures import Unstructured


class DynamicState(NamedTuple):
    """State of :func:`rigl` / :func:`set_pruning`.

    Attributes:
      count: int32, ``update`` calls so far.
      masks: bool keep-mask per sparse leaf, ``None`` elsewhere.
      offsets: per sparse leaf, the latent value each weight had at the update that grew it
        (zero for weights active from the start); the view is ``mask * (w - offsets)``.
      rng: PRNG key (random initial masks, SET's growth).
    """

    count: jax.Array
    masks: Any
    offsets: Any
    rng: jax.Array


def drop_fraction_at(step, drop_fraction: float, end_step: int) -> jax.Array:
    """Cosine-annealed drop fraction ``drop_fraction / 2 * (1 + cos(pi * step / end_step))``."""
    t = jnp.asarray(step, jnp.float32)
    return 0.5 * drop_fraction * (1.0 + jnp.cos(jnp.pi * jnp.minimum(t, end_step) / end_step))


def drop_and_grow(mask, weights, grow_scores, num_swap):
    """Drops the ``num_swap`` active weights of least ``|w|`` and grows the ``num_swap`` best inactive ones.

    Args:
      mask: bool keep-mask.
      weights: the weights (drop criterion ``|w|`` among active ones).
      grow_scores: scores of the candidates (higher grows first), e.g. ``|grad|`` or random.
        Every weight not kept is a candidate, the ones just dropped included.
      num_swap: how many to swap (may be traced); at most the number of active weights.

    Returns:
      The new mask, with the same number of active weights.
    """
    n = mask.size
    kept = mask_from_count(jnp.where(mask, jnp.abs(weights), jnp.inf), num_swap) & mask
    candidates = jnp.where(kept, -jnp.inf, grow_scores.astype(jnp.float32))
    grown = mask_from_count(candidates, n - num_swap) & ~kept
    return kept | grown


def _dynamic(kind, sparsity, update_every, end_step, drop_fraction, distribution, rules, seed) -> Transform:
    sparsity = check_fraction("sparsity", sparsity)
    update_every = check_int("update_every", update_every, minimum=1)
    end_step = check_int("end_step", end_step, minimum=1)
    drop_fraction = check_fraction("drop_fraction", drop_fraction, allow_one=True)
    if distribution not in ("uniform", "erk"):
        raise ValueError(f"distribution must be 'uniform' or 'erk', got {distribution!r}.")

    def per_leaf(params):
        if distribution == "uniform":
            return select_values(params, rules, sparsity, lambda v: check_fraction("per-rule sparsity", v))
        by_name = erk_sparsities(params, sparsity, rules=rules)
        flat = [by_name.get(path_name(p)) for p, _ in jax.tree.leaves_with_path(params)]
        return jax.tree.unflatten(jax.tree.structure(params), flat)

    def init(params):
        warn_unused_rules(params, rules, "pruning")
        check_float_targets(params, rules, "pruned")
        key = jax.random.split(jax.random.key(seed))[0]
        targets = per_leaf(params)
        flat_t, treedef = jax.tree.flatten(targets, is_leaf=is_none)
        flat_w = treedef.flatten_up_to(params)
        masks, offsets = [], []
        for i, (t, w) in enumerate(zip(flat_t, flat_w)):
            if t is None:
                masks.append(None)
                offsets.append(None)
                continue
            scores = jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(w))
            masks.append(mask_from_count(scores, num_pruned(w.size, t)))
            offsets.append(jnp.zeros_like(w))
        return DynamicState(
            jnp.zeros((), jnp.int32),
            jax.tree.unflatten(treedef, masks),
            jax.tree.unflatten(treedef, offsets),
            jax.random.split(key)[1],
        )

    def effective(params, state):
        return jax.tree.map(lambda o, w: w if o is None else w - o, state.offsets, params, is_leaf=is_none)

    def apply(params, state):
        return jax.tree.map(
            lambda m, w: w if m is None else w * m.astype(w.dtype), state.masks, effective(params, state),
            is_leaf=is_none,
        )

    def update(params, state, info: UpdateInfo):
        count = state.count + 1
        grads = None if info is None else info.grads
        if kind == "rigl" and grads is None:
            raise ValueError(
                "rigl needs UpdateInfo.grads (the dense gradient at the view): use it as "
                "make_train_step(..., transform=rigl(...)) or through sparse_optimizer(...)."
            )
        weights = effective(params, state)

        def swap():
            f = drop_fraction_at(count, drop_fraction, end_step)
            key = jax.random.fold_in(state.rng, count)
            flat_m, treedef = jax.tree.flatten(state.masks, is_leaf=is_none)
            flat_w = treedef.flatten_up_to(weights)
            flat_g = treedef.flatten_up_to(grads) if grads is not None else [None] * len(flat_w)
            out = []
            for i, (m, w, g) in enumerate(zip(flat_m, flat_w, flat_g)):
                if m is None:
                    out.append(None)
                    continue
                active = jnp.sum(m, dtype=jnp.int32)
                k = jnp.floor(f * active.astype(jnp.float32)).astype(jnp.int32)
                if kind == "rigl":
                    score = jnp.abs(g)
                else:
                    score = jax.random.uniform(jax.random.fold_in(key, i), jnp.shape(w))
                out.append(drop_and_grow(m, w, score, k))
            return jax.tree.unflatten(treedef, out)

        due = (count % update_every == 0) & (count < end_step)
        masks = jax.lax.cond(due, swap, lambda: state.masks)
        # A weight that becomes active starts at zero in the view: remember its latent value.
        offsets = jax.tree.map(
            lambda new, old, o, w: None if new is None else jnp.where(new & ~old, w, o),
            masks, state.masks, state.offsets, params, is_leaf=is_none,
        )
        return state._replace(count=count, masks=masks, offsets=offsets)

    def describe(params, state):
        return describe_masks(params, state.masks, Unstructured())

    return Transform(init, apply, update, describe)


def rigl(
    sparsity: float,
    *,
    end_step: int,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    distribution: str = "erk",
    rules: Optional[Rules] = None,
    seed: int = 0,
) -> Transform:
    """RigL (Evci et al. 2020): drop by magnitude, grow by dense-gradient magnitude.

    Starts from random masks at the per-layer sparsities of ``distribution`` (ERK by default);
    the number of active weights of every layer never changes. Grown weights start at zero (see
    the module docstring for how, in the train step and through ``sparse_optimizer``).

    Args:
      sparsity: overall sparsity of the selected leaves, in ``[0, 1)``.
      end_step: last step with mask updates (75% of training in the paper).
      update_every: ``dT``, steps between mask updates (100 in the paper).
      drop_fraction: initial fraction of active weights swapped (0.3 in the paper), cosine-annealed.
      distribution: ``'erk'`` or ``'uniform'``.
      rules: ``(regex, value)`` rules choosing the sparse leaves (values other than None are
        sparse); a number value is the leaf's ERK density multiplier (``'erk'``, see
        :func:`~jaxcompress.prune.distribution.erk_sparsities`) or its own sparsity (``'uniform'``).
      seed: seed of the initial masks (and of SET's growth).

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`DynamicState`; its ``update``
      needs ``UpdateInfo.grads``, as the train step and ``sparse_optimizer`` give it.

    Raises:
      ValueError / TypeError: naming a bad argument.

    Example:
      >>> import jax.numpy as jnp
      >>> from jaxcompress.core import update_info
      >>> t = rigl(0.5, end_step=10, update_every=1, drop_fraction=1.0, distribution='uniform')
      >>> p = {'k': jnp.array([[4., 3.], [2., 1.]])}
      >>> s = t.init(p)
      >>> s.masks['k'].tolist()
      [[False, True], [False, True]]
      >>> s = t.update(p, s, update_info(1, {'k': jnp.array([[9., 0.], [0., 0.]])}))
      >>> s.masks['k'].tolist()  # dropped the smallest active weight (1), grew the largest gradient
      [[True, True], [False, False]]
      >>> t.apply(p, s)['k'].tolist()  # the grown weight starts at zero, its latent value is 4
      [[0.0, 3.0], [0.0, 0.0]]
    """
    return _dynamic("rigl", sparsity, update_every, end_step, drop_fraction, distribution, rules, seed)


def set_pruning(
    sparsity: float,
    *,
    end_step: int,
    update_every: int = 100,
    drop_fraction: float = 0.3,
    distribution: str = "erk",
    rules: Optional[Rules] = None,
    seed: int = 0,
) -> Transform:
    """SET (Mocanu et al. 2018): drop by magnitude, grow at random; arguments as :func:`rigl`."""
    return _dynamic("set", sparsity, update_every, end_step, drop_fraction, distribution, rules, seed)
