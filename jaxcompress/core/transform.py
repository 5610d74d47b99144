"""The core abstraction: a compression transform over a parameter pytree.

A :class:`Transform` is a NamedTuple of three pure functions, modelled on optax's
``GradientTransformation``:

* ``init(params) -> state``: builds the transform's state (masks, scales, counters).
* ``apply(params, state) -> params``: the compressed *view* the model runs with. It is
  differentiable; quantizers pass gradients with a straight-through estimator.
* ``update(params, state, info) -> state``: called once after every optimizer step with the new
  latent params; advances schedules and recomputes masks or statistics.
* ``describe(params, state) -> {path: LeafSpec}``: what the transform did to each leaf it touches
  (mask, bit width, scheme, axis or group, scales, zero points, codebook). Size reports and export
  read it, so a user never enters masks or bit widths twice.

Stored params always stay the latent float weights; ``apply`` gives the compressed view.

One home per kind of state. Masks, ranges and counters live in the transform's state. Values a
method *trains* (LSQ step sizes, PACT clipping levels, codebook centroids, FitNets regressors)
live in the same state, wrapped in :class:`Trainable`: the train step differentiates the view
with respect to them and updates them with the user's optimizer, while ``update`` never sees a
gradient for them. :func:`trainable_part` and :func:`with_trainable` split and join them for
users who write their own loop.
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
      grads: the gradient of the loss at the compressed *view* of the step that was just applied
        (same structure as the params): dense, so a pruned weight has the gradient it would get
        if it were present (what RigL grows by). ``None`` when the caller has none (calibration).
    """

    step: jax.Array
    grads: Optional[Params] = None


class LeafSpec(NamedTuple):
    """What a transform did to one leaf: the self-description that size reports and export read.

    Every field is ``None`` where the transform says nothing about it; :func:`chain` merges the
    specs of its transforms, later ones filling in or overriding fields.

    Attributes:
      mask: bool keep-mask of the leaf's shape (pruning), or ``None`` (dense).
      structure: the pruning structure (e.g. ``Unstructured()``, ``NM(2, 4)``), or ``None``.
      bits: bit width of the stored values, or ``None`` (float32).
      scheme: ``'symmetric'``, ``'affine'``, ``'binary'``, ``'ternary'``, ``'lsq'`` or
        ``'codebook'``.
      channel_axis: the axis that has its own scales, or ``None`` (per tensor or per group).
      group_size: weights per quantization group along ``group_axis``, or ``None``.
      group_axis: the axis groups run along.
      scale: the quantization step, broadcastable against the leaf (view = scale * (q - zero_point)).
      zero_point: integer zero point broadcastable against the leaf, ``None`` for symmetric.
      codebook: the shared values of a weight-shared leaf (sorted), or ``None``.
      act_bits: bit width the layer's *input* is quantized to at run time, or ``None``.
    """

    mask: Any = None
    structure: Any = None
    bits: Optional[int] = None
    scheme: Optional[str] = None
    channel_axis: Optional[int] = None
    group_size: Optional[int] = None
    group_axis: Optional[int] = None
    scale: Any = None
    zero_point: Any = None
    codebook: Any = None
    act_bits: Optional[int] = None

    def merge(self, later: "LeafSpec") -> "LeafSpec":
        """This spec with every field that ``later`` sets (not ``None``) taken from ``later``."""
        return self._replace(**{k: v for k, v in later._asdict().items() if v is not None})


def no_description(params: Params, state: State) -> dict:
    """The ``describe`` of a transform that changes no leaf: ``{}``."""
    del params, state
    return {}


class Transform(NamedTuple):
    """A compression transform: ``init``, ``apply``, ``update`` and ``describe``, all pure.

    Attributes:
      init: ``params -> state``.
      apply: ``(params, state) -> params``; the compressed view, differentiable.
      update: ``(params, state, UpdateInfo) -> state``; called after each optimizer step.
      describe: ``(params, state) -> {path: LeafSpec}`` for the leaves it changes (``path`` as
        :func:`~jaxcompress.core.paths.path_name` writes it). Defaults to describing nothing.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, State], Params]
    update: Callable[[Params, State, UpdateInfo], State]
    describe: Callable[[Params, State], dict] = no_description


class Trainable(NamedTuple):
    """Marks a part of a transform's state that the optimizer trains (e.g. LSQ step sizes).

    Attributes:
      value: a pytree of float arrays.
    """

    value: Any


def is_trainable(x) -> bool:
    """``is_leaf`` predicate for :class:`Trainable` nodes."""
    return isinstance(x, Trainable)


def trainable_part(state: State) -> State:
    """The :class:`Trainable` nodes of ``state``, with ``None`` everywhere else.

    The result is what a train step differentiates and what the optimizer updates; join it back
    with :func:`with_trainable`.

    Example:
      >>> import jax.numpy as jnp
      >>> s = (jnp.int32(3), Trainable({'a': jnp.float32(0.5)}))
      >>> trainable_part(s)[0] is None, float(trainable_part(s)[1].value['a'])
      (True, 0.5)
    """
    return jax.tree.map(lambda x: x if is_trainable(x) else None, state, is_leaf=is_trainable)


def with_trainable(state: State, trainable: State) -> State:
    """``state`` with its :class:`Trainable` nodes replaced by those of ``trainable``."""
    return jax.tree.map(lambda s, t: t if is_trainable(s) else s, state, trainable, is_leaf=is_trainable)


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

    return Transform(init, apply, update, no_description)


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
                "(build one with e.g. pruning(...) or weight_quantization(...))."
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

    def describe(params, state):
        check(state)
        specs: dict = {}
        for t, s in zip(transforms, state):
            for path, spec in t.describe(params, s).items():
                specs[path] = specs[path].merge(spec) if path in specs else spec
            params = t.apply(params, s)
        return specs

    return Transform(init, apply, update, describe)
