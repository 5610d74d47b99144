"""The core abstraction: a compression transform over a parameter pytree.

A :class:`Transform` is a NamedTuple of three pure functions, modelled on optax's
``GradientTransformation``:

* ``init(params) -> state``: builds the transform's state (masks, scales, counters).
* ``apply(params, state) -> params``: the compressed *view* the model runs with. It is
  differentiable; quantizers pass gradients with a straight-through estimator.
* ``update(params, state, info) -> state``: called once after every optimizer step with the new
  latent params; advances schedules and recomputes masks or statistics.

Stored params always stay the latent float weights; ``apply`` gives the compressed view.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

Params = Any
State = Any


class UpdateInfo(NamedTuple):
    """What a transform's ``update`` may look at besides the params.

    Attributes:
      step: int32 scalar, number of optimizer steps completed (after this update).
      grads: the gradients of the step that was just applied (same structure as the params),
        or ``None`` when the caller has none (e.g. a calibration pass).
    """

    step: jax.Array
    grads: Optional[Params] = None


class Transform(NamedTuple):
    """A compression transform: ``init``, ``apply`` and ``update``, all pure.

    Attributes:
      init: ``params -> state``.
      apply: ``(params, state) -> params``; the compressed view, differentiable.
      update: ``(params, state, UpdateInfo) -> state``; called after each optimizer step.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, State], Params]
    update: Callable[[Params, State, UpdateInfo], State]


class IdentityState(NamedTuple):
    """State of :func:`identity`: nothing."""


def identity() -> Transform:
    """A transform that leaves the params unchanged.

    Returns:
      A :class:`Transform` whose ``apply`` returns its input.

    Example:
      >>> import jax.numpy as jnp
      >>> t = identity()
      >>> p = {'w': jnp.ones((2, 2))}
      >>> t.apply(p, t.init(p))['w'].sum().item()
      4.0
    """

    def init(params):
        del params
        return IdentityState()

    def apply(params, state):
        del state
        return params

    def update(params, state, info):
        del params, info
        return state

    return Transform(init, apply, update)


def update_info(step, grads=None) -> UpdateInfo:
    """Builds an :class:`UpdateInfo` with ``step`` as an int32 array."""
    return UpdateInfo(step=jnp.asarray(step, jnp.int32), grads=grads)


def chain(*transforms: Transform) -> Transform:
    """Composes transforms: the view of one is the input of the next.

    ``apply`` runs ``t1``, then ``t2`` on ``t1``'s view, and so on; ``init`` and ``update`` give
    each transform the view of the transforms before it, so a quantizer placed after a pruner
    sees (and keeps) the zeros. With symmetric quantization zeros stay exactly zero.

    Args:
      *transforms: :class:`Transform` objects, applied in order.

    Returns:
      A :class:`Transform` whose state is a tuple with one state per transform.

    Raises:
      TypeError: if an argument is not a :class:`Transform`.
      ValueError: (at ``apply``/``update``) if the state is not a tuple of the expected length.

    Example:
      >>> import jax.numpy as jnp
      >>> t = chain(identity(), identity())
      >>> p = {'w': jnp.arange(3.0)}
      >>> s = t.init(p)
      >>> len(s)
      2
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, Transform):
            raise TypeError(
                f"chain: argument {i} is a {type(t).__name__}, expected a jaxcompress Transform "
                "(build one with e.g. magnitude_pruning(...) or weight_quantization(...))."
            )

    def check(state):
        if not isinstance(state, tuple) or len(state) != len(transforms):
            got = f"a tuple of length {len(state)}" if isinstance(state, tuple) else type(state).__name__
            raise ValueError(
                f"chain of {len(transforms)} transforms expected a state tuple of length "
                f"{len(transforms)}, got {got}. Use the state returned by this chain's init."
            )

    def init(params):
        states = []
        for t in transforms:
            s = t.init(params)
            states.append(s)
            params = t.apply(params, s)
        return tuple(states)

    def apply(params, state):
        check(state)
        for t, s in zip(transforms, state):
            params = t.apply(params, s)
        return params

    def update(params, state, info):
        check(state)
        new_states = []
        for t, s in zip(transforms, state):
            s = t.update(params, s, info)
            new_states.append(s)
            params = t.apply(params, s)
        return tuple(new_states)

    return Transform(init, apply, update)
