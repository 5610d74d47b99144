"""Calibration: each selected Dense layer's input statistics over calibration batches.

The model is run unchanged; Flax's :func:`flax.linen.intercept_methods` sees the input ``x`` of
every ``nn.Dense`` / ``nn.DenseGeneral`` call and adds, for the selected layers, per layer:
``X^T X`` (the Hessian of the layer's squared reconstruction error is ``2 X^T X``), the sums of
``x_j^2`` and ``|x_j|`` and the max of ``|x_j|`` per input channel ``j``, and the token count,
``X`` being every token's input row ``(tokens, in)``.

Data parallel. With ``mesh``, each batch is split over the mesh's ``'data'`` axis; every device
computes the statistics of its shard and they are combined with ``psum`` (``pmax`` for the
maxima) inside one jitted, ``shard_map``-ped accumulation, so the sums equal the one-device sums
up to float summation order while the Hessians' cost is spread over the devices.

Layers are selected by the library's ``(regex, value)`` rules on the *kernel's* path
(``'block_0/attn/query/kernel'``), the same rules a pruning or quantization transform takes.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxcompress.core.rules import Rules, explain, warn_unused_rules
from jaxcompress.train.parallel import DATA_AXIS, check_mesh, replicate, shard_batch

#: The Linen layers whose inputs are observed (2-D kernels ``(in, out)``).
LAYERS = (nn.Dense, nn.DenseGeneral)


class LayerStats(NamedTuple):
    """Input statistics of one Dense layer, summed over calibration tokens.

    Attributes:
      count: int32, number of tokens (input rows) seen.
      sum_sq: ``(in,)`` float32, ``sum x_j^2`` (Wanda's squared norms; ``diag(X^T X)``).
      sum_abs: ``(in,)`` float32, ``sum |x_j|`` (mean ``|x_j|`` is ``sum_abs / count``).
      max_abs: ``(in,)`` float32, ``max |x_j|``.
      xtx: ``(in, in)`` float32 ``X^T X``, or ``None`` when not collected.
    """

    count: jax.Array
    sum_sq: jax.Array
    sum_abs: jax.Array
    max_abs: jax.Array
    xtx: Optional[jax.Array] = None


def input_stats(x, hessian: bool = True) -> LayerStats:
    """The :class:`LayerStats` of one input array ``x`` (``(..., in)``: every leading index a token)."""
    x = jnp.asarray(x, jnp.float32)
    x = x.reshape(-1, x.shape[-1])
    return LayerStats(
        count=jnp.asarray(x.shape[0], jnp.int32),
        sum_sq=jnp.sum(x * x, axis=0),
        sum_abs=jnp.sum(jnp.abs(x), axis=0),
        max_abs=jnp.max(jnp.abs(x), axis=0),
        xtx=jax.lax.dot_general(x, x, (((0,), (0,)), ((), ())), precision=jax.lax.Precision.HIGHEST) if hessian else None,
    )


def combine(a: LayerStats, b: LayerStats) -> LayerStats:
    """The statistics of the union of two sets of tokens."""
    return LayerStats(
        a.count + b.count, a.sum_sq + b.sum_sq, a.sum_abs + b.sum_abs, jnp.maximum(a.max_abs, b.max_abs),
        None if a.xtx is None else a.xtx + b.xtx,
    )


def _reduce(s: LayerStats, axis_name: str) -> LayerStats:
    psum = lambda v: None if v is None else jax.lax.psum(v, axis_name)  # noqa: E731
    return LayerStats(psum(s.count), psum(s.sum_sq), psum(s.sum_abs), jax.lax.pmax(s.max_abs, axis_name), psum(s.xtx))


def selected_layers(params: Any, rules: Optional[Rules] = None) -> list[str]:
    """Paths of the layers whose ``kernel`` the rules select (``'block_0/mlp/fc1'``), in params order.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'fc': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones(3)}, 'head': {'kernel': jnp.ones((3, 1))}}
      >>> selected_layers(p, [('head', None), ('.*', True)])
      ['fc']
    """
    if rules is not None:
        warn_unused_rules(params, rules, "one-shot")
    names = []
    for d in explain(params, rules):
        if d.value is None or not d.path.endswith("/kernel"):
            continue
        if d.value is not True:
            raise ValueError(
                f"one-shot rules take True (compress the layer) or None, got {d.value!r} for {d.path!r}; "
                "call one_shot once per setting with rules selecting its layers."
            )
        if len(d.shape) != 2:
            raise ValueError(f"{d.path!r} has shape {d.shape}; one-shot methods handle 2-D Dense kernels (in, out).")
        names.append(d.path[: -len("/kernel")])
    return names


def _observer(targets: frozenset, hessian: bool, seen: dict, order: Optional[list] = None) -> Callable:
    def interceptor(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and isinstance(context.module, LAYERS) and args:
            name = "/".join(context.module.path)
            if name in targets:
                s = input_stats(args[0], hessian)
                seen[name] = combine(seen[name], s) if name in seen else s
                if order is not None:
                    order.append((name, args[0]))
        return next_fun(*args, **kwargs)

    return interceptor


def _local_stats(apply_fn, targets, hessian):
    def run(params, model_state, batch):
        seen: dict = {}
        with nn.intercept_methods(_observer(targets, hessian, seen)):
            apply_fn(params, model_state, batch, train=False, rng=None)
        missing = sorted(targets - set(seen))
        if missing:
            raise ValueError(
                f"layers {missing} were selected but never called as nn.Dense/nn.DenseGeneral on a batch; "
                "check the rules with jaxcompress.explain(params, rules)."
            )
        return seen

    return run


def call_order(apply_fn: Callable, params: Any, model_state: Any, batch: Any, layers: Sequence[str]) -> list[list[str]]:
    """The selected layers in the order the model calls them, grouped by shared input.

    Layers called one after the other on the very same array (attention's query, key and value)
    form one group; the rest are groups of one. Found by one abstract trace (no computation).
    """
    order: list = []
    seen: dict = {}

    def run(p, s, b):
        with nn.intercept_methods(_observer(frozenset(layers), False, seen, order)):
            apply_fn(p, s, b, train=False, rng=None)
        return 0

    jax.eval_shape(run, params, model_state, batch)
    groups: list[list[str]] = []
    last = None
    done = set()
    for name, x in order:
        if name in done:
            continue
        done.add(name)
        if last is not None and x is last:
            groups[-1].append(name)
        else:
            groups.append([name])
        last = x
    return groups


def calibrate_layers(
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batches,
    *,
    rules: Optional[Rules] = None,
    layers: Optional[Sequence[str]] = None,
    hessian: bool = True,
    mesh=None,
) -> dict:
    """Runs the model (eval mode) over ``batches`` and returns each selected layer's :class:`LayerStats`.

    Args:
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, model_state)``
        running Linen modules (e.g. :func:`~jaxcompress.train.state.linen_apply_fn`).
      params, model_state: the model's variables (the weights the statistics are taken under).
      batches: an iterable of batches as ``apply_fn`` takes them.
      rules: ``(regex, value)`` rules on kernel paths choosing the layers (default: every 2-D
        kernel). Ignored when ``layers`` is given.
      layers: layer paths to observe (``'block_0/mlp/fc1'``), overriding ``rules``.
      hessian: also collect ``X^T X`` (``in^2`` work per token; Wanda and AWQ need only the
        per-channel sums).
      mesh: a :class:`jax.sharding.Mesh` with a ``'data'`` axis to split every batch over (its
        leading dimension must divide by the axis size), or ``None`` for one device.

    Returns:
      ``{layer path: LayerStats}``.

    Raises:
      ValueError: no batch, or a selected layer the model never calls.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> from jaxcompress.train import linen_apply_fn
      >>> m = MLP(features=(4,))
      >>> params = m.init(jax.random.key(0), jnp.zeros((1, 3)))['params']
      >>> stats = calibrate_layers(linen_apply_fn(m), params, {}, [{'image': jnp.ones((5, 3))}] * 2)
      >>> sorted(stats), int(stats['fc1'].count), stats['fc1'].xtx.tolist()[0]
      (['fc1', 'head'], 10, [10.0, 10.0, 10.0])
    """
    targets = frozenset(selected_layers(params, rules) if layers is None else layers)
    if not targets:
        raise ValueError("no layer to calibrate: the rules (or layers) select no 2-D Dense kernel.")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; calibration needs at least one batch.")
    accumulate, stats = _accumulator(apply_fn, targets, bool(hessian), mesh)
    put = lambda b: b  # noqa: E731
    if mesh is not None:
        params, model_state = replicate(params, mesh), replicate(model_state, mesh)
        put = lambda b: shard_batch(b, mesh)  # noqa: E731
    # |x| >= 0, so zeros are the identity of every field, max included.
    acc = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(stats, params, model_state, put(batches[0])))
    if mesh is not None:
        acc = replicate(acc, mesh)
    for batch in batches:
        acc = accumulate(acc, params, model_state, put(batch))
    return acc


@functools.lru_cache(maxsize=64)
def _accumulator(apply_fn, targets: frozenset, hessian: bool, mesh):
    """The jitted ``(acc, params, model_state, batch) -> acc + stats`` (cached: calling again with
    the same model and layers compiles nothing new) and the unjitted stats function."""
    stats = _local_stats(apply_fn, targets, hessian)
    if mesh is not None:
        check_mesh(mesh, DATA_AXIS)
        local = stats
        stats = jax.shard_map(
            lambda p, s, b: {k: _reduce(v, DATA_AXIS) for k, v in local(p, s, b).items()},
            mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(), PartitionSpec(DATA_AXIS)), out_specs=PartitionSpec(),
        )
    accumulate = jax.jit(lambda acc, p, s, b: jax.tree.map(combine, acc, stats(p, s, b), is_leaf=_is_stats),
                         donate_argnums=0)
    return accumulate, stats


def _is_stats(x) -> bool:
    return isinstance(x, LayerStats)
