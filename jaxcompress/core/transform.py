"""The core abstraction: a compression transform over a parameter pytree.

A :class:`Transform` is a NamedTuple of pure functions, modelled on optax's
``GradientTransformation``:

* ``init(params) -> state``: builds the transform's state (masks, scales, counters).
* ``apply(params, state) -> params``: the compressed *view* the model runs with. It is
  differentiable; quantizers pass gradients with a straight-through estimator.
* ``update(params, state, info) -> state``: called once after every optimizer step with the new
  latent params; advances schedules and recomputes masks or statistics.
* ``describe(params, state) -> {path: LeafSpec}``: what the transform did to each leaf it touches
  (mask, bit width, scheme, axis or group, scales, zero points, codebook). Size reports and export
  read it, so a user never enters masks or bit widths twice.
* ``intercept(state, *, train, axis_name, observed, observe=None) -> interceptor`` (optional,
  ``None`` for weight-only methods): a Flax Linen method interceptor (for
  :func:`flax.linen.intercept_methods`) that changes what the model computes at run time, such
  as the inputs of its layers (activation quantization). The train step runs the model under it
  and hands what it wrote into ``observed`` (batch statistics) to ``update``.

Stored params always stay the latent float weights; ``apply`` gives the compressed view.

One home per kind of state. Masks, ranges and counters live in the transform's state. Values a
method *trains* (LSQ step sizes, PACT clipping levels, codebook centroids, FitNets regressors)
live in the same state, wrapped in :class:`Trainable`: the train step differentiates the view
with respect to them and updates them with the user's optimizer, while ``update`` never sees a
gradient for them. :func:`trainable_part` and :func:`with_trainable` split and join them for
users who write their own loop.
"""
from __future__ import annotations

import contextlib
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
      observed: what the transform's ``intercept`` recorded in the training forward pass of the
        step (e.g. ``{layer path: (batch min, batch max)}`` of activation inputs), or ``None``.
    """

    step: jax.Array
    grads: Optional[Params] = None
    observed: Optional[dict] = None


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
    """A compression transform: ``init``, ``apply``, ``update``, ``describe``, ``intercept``; all pure.

    Attributes:
      init: ``params -> state``.
      apply: ``(params, state) -> params``; the compressed view, differentiable.
      update: ``(params, state, UpdateInfo) -> state``; called after each optimizer step.
      describe: ``(params, state) -> {path: LeafSpec}`` for the leaves it changes (``path`` as
        :func:`~jaxcompress.core.paths.path_name` writes it). Defaults to describing nothing.
      intercept: ``None`` (the default: the transform changes only the weights), or
        ``intercept(state, *, train, axis_name, observed, observe=None) -> interceptor``: a Flax
        Linen method interceptor the model runs under (:func:`flax.linen.intercept_methods`).
        ``train`` is the model's mode, ``axis_name`` the mapped axis of the step (batch
        statistics are reduced over it), ``observed`` a dict the interceptor fills while the
        model is traced (the step passes it to ``update`` as ``UpdateInfo.observed``). With
        ``observe`` (a function of one array) the interceptor changes nothing and records
        ``observe(x)`` of the inputs it would change, in a list per layer (calibration).
        :class:`Trainable` values of the state it reads get their gradient through the model.
    """

    init: Callable[[Params], State]
    apply: Callable[[Params, State], Params]
    update: Callable[[Params, State, UpdateInfo], State]
    describe: Callable[[Params, State], dict] = no_description
    intercept: Optional[Callable[..., Callable]] = None


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


def update_info(step, grads=None, observed=None) -> UpdateInfo:
    """Builds an :class:`UpdateInfo` with ``step`` as an int32 array."""
    return UpdateInfo(step=jnp.asarray(step, jnp.int32), grads=grads, observed=observed)


@contextlib.contextmanager
def intercepted(transform: "Transform", state: State, *, train: bool, axis_name: Optional[str] = None,
                observed: Optional[dict] = None, observe: Optional[Callable] = None):
    """A context in which Flax Linen models run under ``transform``'s interceptor, if it has one.

    What the train and eval steps do around the model; use it to run a model with the
    transform's activation quantization in a loop of your own.

    Args:
      transform: a :class:`Transform` (one without ``intercept`` changes nothing).
      state: its state.
      train: the model's mode (training updates and records batch statistics).
      axis_name: the mapped axis under ``pmap`` (batch statistics are reduced over it).
      observed: a dict the interceptor fills (pass it to ``update`` as ``UpdateInfo.observed``).
      observe: record ``observe(x)`` of the inputs instead of changing them (calibration).

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxcompress.quant import weight_quantization
      >>> t = weight_quantization(8, activation_bits=2)
      >>> p = {'kernel': jnp.ones((3, 1))}
      >>> with intercepted(t, t.init(p), train=False):  # inputs on the grid {0, 1, 2, 3}
      ...     float(nn.Dense(1, use_bias=False).apply({'params': p}, jnp.array([[0.0, 0.4, 3.0]]))[0, 0])
      3.0
    """
    if transform.intercept is None:
        yield
        return
    import flax.linen as nn

    observed = {} if observed is None else observed
    with nn.intercept_methods(transform.intercept(state, train=train, axis_name=axis_name, observed=observed,
                                                  observe=observe)):
        yield


def compose_interceptors(interceptors) -> Callable:
    """One Flax Linen method interceptor running ``interceptors`` nested, the first outermost.

    Example:
      >>> calls = []
      >>> def tag(t):
      ...     def interceptor(next_fun, args, kwargs, context):
      ...         calls.append(t)
      ...         return next_fun(*args, **kwargs)
      ...     return interceptor
      >>> compose_interceptors([tag('a'), tag('b')])(lambda x: x + 1, (1,), {}, None), calls
      (2, ['a', 'b'])
    """
    interceptors = list(interceptors)

    def composed(next_fun, args, kwargs, context):
        def run(i, args, kwargs):
            if i == len(interceptors):
                return next_fun(*args, **kwargs)
            return interceptors[i](lambda *a, **k: run(i + 1, a, k), args, kwargs, context)

        return run(0, args, kwargs)

    return composed


def chain(*transforms: Transform) -> Transform:
    """Composes transforms: the view of one is the input of the next.

    ``apply`` runs ``t1``, then ``t2`` on ``t1``'s view, and so on; ``init`` and ``update`` give
    each transform the view of the transforms before it, so a quantizer placed after a pruner
    sees (and keeps) the zeros. With symmetric quantization zeros stay exactly zero. The
    ``intercept`` of the chain nests its members' (each with its own state; ``None`` when no
    member has one), and each member's ``update`` sees only what its own interceptor observed
    (the chain's ``observed`` holds ``{member index: observed}``).

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
        for i, (t, s) in enumerate(zip(transforms, state)):
            own = None if info.observed is None else info.observed.get(i)
            s = t.update(params, s, info._replace(observed=own))
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

    def intercept(state, *, train, axis_name, observed, observe=None):
        check(state)
        parts = []
        for i, (t, s) in enumerate(zip(transforms, state)):
            if t.intercept is not None:
                own = observed.setdefault(i, {})
                parts.append(t.intercept(s, train=train, axis_name=axis_name, observed=own, observe=observe))
        return compose_interceptors(parts)

    has_intercept = any(t.intercept is not None for t in transforms)
    return Transform(init, apply, update, describe, intercept if has_intercept else None)
