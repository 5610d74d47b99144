"""Activation quantization without touching the model: the inputs of the selected layers.

The input of every selected Linen layer (``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``) is
fake-quantized before the layer runs, by a Flax method interceptor (``nn.intercept_methods``, as
Qwix does), not by a model rewrite. It is part of the weight quantizer: with
``weight_quantization(4, activation_bits=8)`` one transform (and one rule per layer, e.g.
``QuantSpec(weights=4, activations=8)``) says "int4 weights, int8 inputs"; its ``intercept`` is
what the train and eval steps run the model under, and ``describe`` reports ``act_bits`` on the
layer's kernel (``'layer/kernel'``). A layer is selected for its input when its kernel is.

Where the ranges live: in the transform's state (one home for masks, ranges and counters).

* ``'dynamic'``: each batch's min/max; no state.
* ``'token'``: dynamic per token: each position's own min/max over the layer's input features
  (the last axis: a Dense input's features, a Conv input's channels at one pixel); no state.
  SmoothQuant's per-token granularity (Xiao et al. 2023, O1) and LLM.int8's row-wise inputs;
  it needs no cross-device reduction, so a data-parallel run equals one device exactly.
* ``'calibrated'``: ``{layer path: {'min', 'max'}}`` in the state, filled by
  :func:`calibrate_activations` (static PTQ, or the start of QAT). In training the forward pass
  quantizes with the exponential moving average of the stored and the batch range (TF-MOT's QAT)
  and records the batch range in ``observed``; the transform's ``update`` folds it into the state
  the same way. Evaluation uses the stored ranges as they are. A layer not yet calibrated starts
  from its first batch's range.
* ``'pact'`` (Choi et al. 2018): ``clip(x, 0, alpha)`` on ``2^b`` levels with one trained
  ``alpha`` per layer, kept in the state as :class:`~jaxcompress.core.transform.Trainable`; the
  step differentiates the loss with respect to it through the forward pass and the user's
  optimizer updates it.

Under ``jax.pmap`` the step's ``axis_name`` is passed on to the interceptor, so batch ranges
are the min/max over all devices, as on one device.

The NNX path (:mod:`jaxcompress.quant.nnx`, op hooks with ranges in the model's own variables)
shares the range and fake-quant helpers below.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.core.finite import finite_min_max
from jaxcompress.core.rules import Rules, explain
from jaxcompress.core.transform import Trainable, Transform, intercepted
from jaxcompress.core.validation import check_int
from jaxcompress.quant.affine import affine_qparams, fake_quant_affine
from jaxcompress.quant.lowbit import pact

LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
RANGES = ("dynamic", "token", "calibrated", "pact")
#: PACT clipping levels start at least this high after calibration.
MIN_ALPHA = 1e-3


def layer_bits(name: str, rules: Optional[Rules], bits: int) -> Optional[int]:
    """Bits for a layer's input by the rules on its path (``True`` -> ``bits``, ``None`` -> float)."""
    if rules is None:
        return bits
    value = explain({name: jax.ShapeDtypeStruct((1, 1), jnp.float32)}, rules)[0].value
    if value is None:
        return None
    return bits if value is True else check_int("per-rule activation bits", value, minimum=2, maximum=8)


def kernel_path(layer: str) -> str:
    """The path of a layer's kernel in its params: ``'block/fc'`` -> ``'block/fc/kernel'``."""
    return f"{layer}/kernel" if layer else "kernel"


def layer_of(path: str) -> Optional[str]:
    """The layer whose kernel ``path`` is (``'block/fc/kernel'`` -> ``'block/fc'``), else ``None``."""
    if path == "kernel":
        return ""
    return path[: -len("/kernel")] if path.endswith("/kernel") else None


def _batch_range(x, axis_name=None):
    """The min/max of the finite entries of ``x`` (one NaN pixel must not poison the batch's
    grid); ``(inf, -inf)`` when there are none."""
    lo, hi = finite_min_max(jax.lax.stop_gradient(x).astype(jnp.float32))
    if axis_name is not None:
        # Under pmap each device sees a slice of the batch: the range of the global batch is the
        # min/max over devices, which makes the result equal to a single-device run.
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    return lo, hi


def layer_range(x, stored, train: bool, momentum: float, axis_name=None):
    """The range a layer input is quantized with: the batch's without ``stored`` ``(min, max)``;
    with it, fixed in evaluation and its EMA towards the batch's in training."""
    if stored is not None and not train:
        return stored
    lo, hi = _batch_range(x, axis_name)
    if stored is None:
        return lo, hi
    seen = lo <= hi  # a batch without finite values leaves the stored range as it is
    return (jnp.where(seen, momentum * stored[0] + (1 - momentum) * lo, stored[0]),
            jnp.where(seen, momentum * stored[1] + (1 - momentum) * hi, stored[1]))


def fold_range(stored: dict, batch, momentum: float, train: bool = True) -> dict:
    """A stored range ``{'min', 'max'}`` moved towards a batch's ``(min, max)``: its EMA in
    training, itself in evaluation; a range never set (``min > max``, as :func:`empty_range`
    starts) takes the batch's."""
    lo, hi = batch
    if train:
        new_lo = momentum * stored["min"] + (1 - momentum) * lo
        new_hi = momentum * stored["max"] + (1 - momentum) * hi
    else:
        new_lo, new_hi = stored["min"], stored["max"]
    unset = stored["min"] > stored["max"]
    unseen = ~(lo <= hi)  # a batch without finite values (or NaN bounds) moves nothing
    new_lo, new_hi = jnp.where(unseen, stored["min"], new_lo), jnp.where(unseen, stored["max"], new_hi)
    return {"min": jnp.where(unset & ~unseen, lo, new_lo), "max": jnp.where(unset & ~unseen, hi, new_hi)}


def empty_range() -> dict:
    """A range no batch has been seen for (``min = inf > max = -inf``)."""
    return {"min": jnp.float32(jnp.inf), "max": jnp.float32(-jnp.inf)}


def observed_ranges(observer, summarize: Callable, batches) -> dict:
    """Folds ``observer`` over ``summarize(x)`` (``{layer: summary}``) for ``x`` in ``batches``:
    ``{layer: {'min': f32, 'max': f32}}``."""
    acc = None
    for x in batches:
        s = jax.device_get(summarize(x))
        acc = s if acc is None else {k: observer.combine(acc[k], s[k]) for k in s}
    if not acc:
        raise ValueError("calibration saw no batches or no quantizable layers; pass >= 1 batch.")
    ranges = {}
    for k, a in acc.items():
        lo, hi = observer.range(a)
        ranges[k] = {"min": jnp.float32(lo), "max": jnp.float32(hi)}
    return ranges


def fake_quant_input(x, lo, hi, bits, symmetric):
    scale, zp, qmin, qmax = affine_qparams(lo, hi, bits, symmetric=symmetric)
    return fake_quant_affine(x, scale, zp, qmin, qmax)


def input_interceptor(
    state: Any,
    *,
    bits_of: Callable[[str], Optional[int]],
    mode: str,
    symmetric: bool,
    momentum: float,
    layers: tuple,
    train: bool,
    axis_name: Optional[str],
    observed: dict,
    observe: Optional[Callable] = None,
) -> Callable:
    """The Linen interceptor that fake-quantizes the input of each selected layer.

    Args:
      state: the quantizer's state; its ``ranges`` (``'calibrated'``) or ``alpha`` (a
        :class:`Trainable`, ``'pact'``) are read.
      bits_of: ``layer path -> bits`` or ``None`` (the layer's input stays float).
      mode: one of ``'dynamic'``, ``'token'``, ``'calibrated'``, ``'pact'``.
      symmetric, momentum: the grid and the EMA factor of calibrated ranges.
      layers: the Linen layer classes whose ``__call__`` input is quantized.
      train, axis_name, observed, observe: see :class:`~jaxcompress.core.transform.Transform`.
    """

    def stored(table, name, what):
        if name not in table:
            raise ValueError(
                f"the quantizer's state has no {what} for layer {name!r} (it has {sorted(table)}); "
                "build the state with init on this model's params and the same rules."
            )
        return table[name]

    def quantize(name, bits, x):
        if observe is not None:
            observed.setdefault(name, []).append(observe(jax.lax.stop_gradient(x).astype(jnp.float32)))
            return x
        if mode == "pact":
            return pact(x, stored(state.alpha.value, name, "PACT alpha"), bits)
        if mode == "token":  # one grid per position, over the input features (the last axis)
            lo, hi = finite_min_max(jax.lax.stop_gradient(x).astype(jnp.float32), axis=-1, keepdims=True)
            return fake_quant_input(x, lo, hi, bits, symmetric)
        batch = _batch_range(x, axis_name)
        if mode == "dynamic":
            return fake_quant_input(x, *batch, bits, symmetric)
        if train:  # a layer called twice records the range of both calls
            seen = observed.get(name)
            observed[name] = batch if seen is None else (jnp.minimum(seen[0], batch[0]), jnp.maximum(seen[1], batch[1]))
        r = fold_range(stored(state.ranges, name, "range"), batch, momentum, train)
        return fake_quant_input(x, r["min"], r["max"], bits, symmetric)

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, layers) or not args:
            return next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        bits = bits_of(name)
        if bits is None:
            return next_fun(*args, **kwargs)
        return next_fun(quantize(name, bits, args[0]), *args[1:], **kwargs)

    return interceptor


def fold_observed(ranges: dict, observed: Optional[dict], momentum: float) -> dict:
    """``ranges`` with each layer in ``observed`` (``{layer: (batch min, batch max)}``) moved by
    its EMA: what a quantizer's ``update`` does with the step's observations."""
    if not observed:
        return ranges
    return {k: fold_range(r, observed[k], momentum) if k in observed else r for k, r in ranges.items()}


def calibrate_activations(
    transform: Transform,
    state: Any,
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batches,
    *,
    observer=None,
) -> Any:
    """Fills a quantizer's activation ranges (or PACT clipping levels) from calibration batches.

    The model runs in evaluation mode (BatchNorm running statistics) on ``params`` as given, with
    the transform's interceptor in observe mode (no input is quantized); ``observer`` turns each
    selected layer's inputs over all batches into a range.
    Calibrated ranges replace the stored ones; PACT levels start at the range's max (at least
    ``1e-3``), so that nothing is clipped at first.

    Args:
      transform: a transform with activation quantization, e.g. ``weight_quantization(8,
        activation_bits=8, activation_range='calibrated')``, alone or in a :func:`chain`.
      state: its state (``transform.init(params)`` or ``TrainState.compression_state``).
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, model_state)``
        running Linen modules; under ``pmap`` BatchNorm, build it without ``axis_name``.
      params: the weights to calibrate with: the float params (as PyTorch calibrates a float
        model), or the compressed view ``transform.apply(params, state)`` (e.g. to calibrate a
        pruned model as it will run).
      model_state: the model's other variables (BatchNorm statistics).
      batches: an iterable of calibration batches, as ``apply_fn`` takes them.
      observer: an :class:`~jaxcompress.quant.observers.Observer`; default
        :func:`~jaxcompress.quant.observers.minmax`.

    Returns:
      The new state (same structure; for a train state use
      ``state._replace(compression_state=...)``).

    Raises:
      ValueError: when the transform has no activation quantization, ``batches`` is empty, or
        the model calls no selected layer.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> from jaxcompress.quant import weight_quantization
      >>> model = nn.Dense(1)
      >>> apply_fn = lambda p, s, b, *, train, rng=None: (model.apply({'params': p}, b), s)
      >>> params = model.init(jax.random.key(0), jnp.ones((1, 3)))['params']
      >>> t = weight_quantization(8, activation_bits=8, activation_range='calibrated')
      >>> s = calibrate_activations(t, t.init(params), apply_fn, params, {},
      ...                           [jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[-1.0, 0.5, 0.0]])])
      >>> float(s.ranges['']['min']), float(s.ranges['']['max'])
      (-1.0, 2.0)
    """
    from jaxcompress.quant.observers import minmax

    if not isinstance(transform, Transform) or transform.intercept is None:
        raise ValueError(
            "calibrate_activations needs a transform that quantizes activations, e.g. "
            "weight_quantization(8, activation_bits=8, activation_range='calibrated'); got one without."
        )
    observer = minmax() if observer is None else observer

    @jax.jit
    def summarize(state, params, model_state, batch):
        seen: dict = {}
        with intercepted(transform, state, train=False, observed=seen, observe=observer.summarize):
            apply_fn(params, model_state, batch, train=False, rng=None)
        return seen

    acc = None
    for batch in batches:
        seen = jax.device_get(summarize(state, params, model_state, batch))
        acc = _combine(observer, acc, seen)
    if acc is None:
        raise ValueError("calibrate_activations got no batches; pass at least one.")
    return _fill(state, acc, observer)


def _is_summaries(x) -> bool:
    return isinstance(x, list)


def _combine(observer, acc, seen):
    """Folds one batch's ``{..., layer: [summary per call]}`` into the running ``{..., layer: summary}``."""
    def fold(summaries, prior=None):
        for s in summaries:
            prior = s if prior is None else observer.combine(prior, s)
        return prior

    if acc is None:
        return jax.tree.map(fold, seen, is_leaf=_is_summaries)
    return jax.tree.map(lambda s, a: fold(s, a), seen, acc, is_leaf=_is_summaries)


def _fill(state, acc: dict, observer):
    """``state`` with the calibrated ranges: ``acc`` mirrors the state (``{member: ...}`` for a chain)."""
    if isinstance(state, tuple) and not hasattr(state, "_fields"):  # a chain's state
        return tuple(_fill(s, acc[i], observer) if i in acc else s for i, s in enumerate(state))
    ranges = {}
    for name, a in acc.items():
        lo, hi = observer.range(a)
        ranges[name] = (jnp.float32(lo), jnp.float32(hi))
    if not ranges:
        raise ValueError("calibration saw no selected layer called by the model; check the rules and apply_fn.")
    table = state.alpha.value if state.alpha is not None else state.ranges
    missing = sorted(set(table) - set(ranges))
    if missing:
        warnings.warn(f"calibration saw no input for layers {missing} (selected by the rules); they keep "
                      "their initial ranges.", UserWarning, stacklevel=3)
    if state.alpha is not None:
        alpha = {k: jnp.maximum(ranges[k][1], MIN_ALPHA) if k in ranges else v for k, v in table.items()}
        return state._replace(alpha=Trainable(alpha))
    new = {k: {"min": ranges[k][0], "max": ranges[k][1]} if k in ranges else r for k, r in table.items()}
    return state._replace(ranges=new)
