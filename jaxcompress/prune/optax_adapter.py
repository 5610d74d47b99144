"""An optax adapter: a pruner wrapped around any optimizer, masks kept inside ``opt_state``."""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.rules import is_none
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_int
from jaxcompress.prune.masks import apply_masks


class SparseOptState(NamedTuple):
    """State of :func:`sparse_optimizer`.

    Attributes:
      count: int32, updates so far.
      inner: the wrapped optimizer's state.
      pruner: the pruning transform's state (its ``masks`` are the current masks).
      rewind: the params saved at ``rewind_step`` (lottery-ticket rewinding), or ``None``.
    """

    count: jax.Array
    inner: Any
    pruner: Any
    rewind: Any


def _masks(pruner_state):
    masks = getattr(pruner_state, "masks", None)
    if masks is None:
        raise TypeError(
            f"sparse_optimizer needs a pruning transform whose state has .masks, got {type(pruner_state).__name__}."
        )
    return masks


def sparse_optimizer(
    optimizer: optax.GradientTransformation,
    pruner: Transform,
    *,
    rewind_step: Optional[int] = None,
) -> optax.GradientTransformation:
    """Wraps ``optimizer`` so that the params it produces are always pruned by ``pruner``.

    One ``update(grads, state, params)``: the gradients of pruned weights are zeroed, the inner
    optimizer steps, the pruner's ``update`` sees the new params and the *dense* gradients (so
    RigL can grow by gradient: the params are sparse, the gradient at a zero weight is not), and
    the returned updates land the params exactly on the new masks. Weights that (re)appear start
    at zero and every params-shaped leaf of the inner state (moments, traces; found with
    :func:`optax.tree_utils.tree_map_params`, so any optax optimizer works) is reset to zero
    wherever a weight was not active both before and after the update.

    With ``rewind_step=k`` (lottery tickets, Frankle et al. 2019/2020) the params after update
    ``k`` are kept; whenever the masks change after step ``k``, the surviving weights are rewound
    to them and the inner optimizer state is re-initialised.

    Args:
      optimizer: any optax optimizer.
      pruner: a pruning transform whose state has ``masks`` (``pruning``,
        ``rigl``, ``set_pruning``, ``fixed_masks``).
      rewind_step: optional step ``k >= 0`` to rewind to (0: the initial params, pruned).

    Returns:
      An ``optax.GradientTransformation`` with :class:`SparseOptState`; ``update`` needs ``params``.
      The first update already lands on the masks; call ``pruner.apply`` yourself if the very
      first forward pass must be sparse too.

    Raises:
      TypeError: if ``pruner`` is not a Transform; ValueError: if ``update`` gets no params.

    Example:
      >>> import jax.numpy as jnp, optax
      >>> from jaxcompress.prune.pruner import pruning
      >>> opt = sparse_optimizer(optax.sgd(0.1), pruning(0.5))
      >>> p = {'k': jnp.array([[1., -4.], [0.5, 3.]])}
      >>> s = opt.init(p)
      >>> u, s = opt.update({'k': jnp.ones((2, 2))}, s, p)
      >>> optax.apply_updates(p, u)['k'].tolist()
      [[0.0, -4.099999904632568], [0.0, 2.9000000953674316]]
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}.")
    if not isinstance(pruner, Transform):
        raise TypeError(f"pruner must be a jaxcompress Transform, got {type(pruner).__name__}.")
    if rewind_step is not None:
        rewind_step = check_int("rewind_step", rewind_step)

    def init(params):
        ps = pruner.init(params)
        _masks(ps)
        rewind = None if rewind_step is None else apply_masks(params, jax.tree.map(lambda m: None, _masks(ps), is_leaf=is_none))
        return SparseOptState(jnp.zeros((), jnp.int32), optimizer.init(params), ps, rewind)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("sparse_optimizer.update needs params: call opt.update(grads, state, params).")
        old = _masks(state.pruner)
        count = state.count + 1
        inner_updates, inner = optimizer.update(apply_masks(grads, old), state.inner, params)
        stepped = optax.apply_updates(params, inner_updates)
        ps = pruner.update(stepped, state.pruner, UpdateInfo(step=count, grads=grads))
        new = _masks(ps)
        steady = jax.tree.map(lambda a, b: None if a is None else a & b, old, new, is_leaf=is_none)
        final = jax.tree.map(
            lambda s, p: p if s is None else jnp.where(s, p, jnp.zeros_like(p)), steady, stepped, is_leaf=is_none
        )
        keep = jax.tree.map(lambda s: jnp.asarray(True) if s is None else s, steady, is_leaf=is_none)
        inner = optax.tree_utils.tree_map_params(
            optimizer,
            lambda v, k: jnp.where(k, v, jnp.zeros_like(v)) if hasattr(v, "shape") and jnp.shape(k) in ((), jnp.shape(v)) else v,
            inner,
            keep,
        )
        rewind = state.rewind
        if rewind_step is not None:
            rewind = jax.lax.cond(count == rewind_step, lambda: final, lambda: rewind)
            changed = jnp.any(jnp.stack([jnp.any(a != b) for a, b in zip(jax.tree.leaves(old), jax.tree.leaves(new))]))
            do = changed & (count > rewind_step)
            rewound = apply_masks(rewind, new)
            final, inner = jax.lax.cond(do, lambda: (rewound, optimizer.init(rewound)), lambda: (final, inner))
        updates = jax.tree.map(lambda f, p: f - p, final, params)
        return updates, SparseOptState(count, inner, ps, rewind)

    return optax.GradientTransformation(init, update)
