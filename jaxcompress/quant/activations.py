"""Activation quantization without touching the model: Flax Linen interception, NNX op hooks.

The input of every selected layer (Linen ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``;
NNX ``Linear``, ``LinearGeneral``, ``Conv``, ``Einsum``) is fake-quantized before the layer runs.
Weights are quantized separately by a weight transform
(:func:`~jaxcompress.quant.qat.quantize_weights`), so W8A8 is that transform plus
:func:`quantize_activations` around the apply function.

Where the ranges live. Dynamic ranges (the default) are the min/max of each batch and need no
state. Calibrated ranges are kept in the **model state** as a Flax-style collection
``'quant_stats'`` (``{layer path: {'min': f32, 'max': f32}}``), not in the compression
transform's state: the ranges are read and written by the forward pass, exactly like BatchNorm
statistics, and the model state is the state the forward pass sees. The train step already
returns it from the training-mode forward pass, averages it over devices (``axis_name``) and
checkpoints it, while a transform's state is only visible to the weight view. In training mode
calibrated ranges follow an exponential moving average of the batch min/max (``momentum``), as
in TF-MOT's QAT; in eval mode they are fixed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, explain
from jaxcompress.core.validation import check_bits, check_fraction
from jaxcompress.quant.affine import affine_qparams, fake_quant_affine

#: The model-state collection holding calibrated activation ranges.
COLLECTION = "quant_stats"
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)


def _layer_bits(name: str, rules: Optional[Rules], bits: int) -> Optional[int]:
    """Bits for a layer's input by the rules on its path (``True`` -> ``bits``, ``None`` -> float)."""
    if rules is None:
        return bits
    value = explain({name: jax.ShapeDtypeStruct((1, 1), jnp.float32)}, rules)[0].value
    if value is None:
        return None
    return bits if value is True else check_bits("per-rule activation bits", value, low=2)


def _batch_range(x, axis_name=None):
    xs = jax.lax.stop_gradient(x).astype(jnp.float32)
    lo, hi = jnp.min(xs), jnp.max(xs)
    if axis_name is not None:
        # Under pmap each device sees a slice of the batch: the range of the global batch is the
        # min/max over devices, which makes the result equal to a single-device run.
        lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    return lo, hi


def _quant(x, lo, hi, bits, symmetric):
    scale, zp, qmin, qmax = affine_qparams(lo, hi, bits, symmetric=symmetric)
    return fake_quant_affine(x, scale, zp, qmin, qmax)


def quantize_activations(
    apply_fn: Callable,
    bits: int = 8,
    *,
    symmetric: bool = False,
    rules: Optional[Rules] = None,
    momentum: float = 0.99,
    layers: tuple = LINEN_LAYERS,
    axis_name: Optional[str] = None,
) -> Callable:
    """Wraps a Linen apply function so the inputs of its layers are fake-quantized.

    Args:
      apply_fn: ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, model_state)``
        running Linen modules (e.g. :func:`~jaxcompress.train.state.linen_apply_fn`).
      bits: activation bit width, ``2..8``.
      symmetric: signed symmetric grid instead of affine ``[0, 2^b - 1]`` with a zero point.
      rules: ``(regex, value)`` rules on the layer path (``'conv1'``, ``'block/fc'``); ``True`` ->
        ``bits``, an int overrides, ``None`` keeps that layer's input in float. Default: all.
      momentum: EMA factor for calibrated ranges in training mode.
      layers: the Linen layer classes whose ``__call__`` input is quantized.
      axis_name: under ``jax.pmap``, the mapped axis (the train step's ``axis_name``): batch
        ranges are then the min/max over all devices, as on one device. Leave ``None`` for one
        device and for sharded ``jit`` (whose arrays are already global).

    Returns:
      An apply function with the same signature. With ``'quant_stats'`` in ``model_state``
      (see :func:`calibrate_activations`) it uses and, in training, updates those ranges;
      without, ranges are per batch.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(1, use_bias=False)
      >>> apply_fn = lambda p, s, x, *, train, rng=None: (model.apply({'params': p}, x), s)
      >>> f = quantize_activations(apply_fn, 2)
      >>> params = {'kernel': jnp.ones((3, 1))}
      >>> x = jnp.array([[0.0, 0.4, 3.0]])
      >>> float(f(params, {}, x, train=False)[0][0, 0])  # inputs on the grid {0, 1, 2, 3}
      3.0
    """
    bits = check_bits("bits", bits, low=2)
    momentum = check_fraction("momentum", momentum)
    _layer_bits("_", rules, bits)  # validates the rules now

    def wrapped(params, model_state, inputs, *, train: bool, rng=None):
        model_state = dict(model_state)
        stats = model_state.pop(COLLECTION, None)
        new_stats = {} if stats is None else dict(stats)

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name != "__call__" or not isinstance(context.module, layers) or not args:
                return next_fun(*args, **kwargs)
            name = "/".join(context.module.path)
            b = _layer_bits(name, rules, bits)
            if b is None:
                return next_fun(*args, **kwargs)
            x = args[0]
            lo, hi = _batch_range(x, axis_name)
            if stats is not None:
                if name not in stats:
                    raise ValueError(
                        f"model_state['{COLLECTION}'] has no range for layer {name!r} (it has "
                        f"{sorted(stats)}); calibrate with the same model and rules."
                    )
                old = stats[name]
                if train:
                    lo = momentum * old["min"] + (1 - momentum) * lo
                    hi = momentum * old["max"] + (1 - momentum) * hi
                    new_stats[name] = {"min": lo, "max": hi}
                else:
                    lo, hi = old["min"], old["max"]
            return next_fun(_quant(x, lo, hi, b, symmetric), *args[1:], **kwargs)

        with nn.intercept_methods(interceptor):
            logits, new_state = apply_fn(params, model_state, inputs, train=train, rng=rng)
        if stats is not None:
            new_state = {**dict(new_state), COLLECTION: new_stats}
        return logits, new_state

    return wrapped


def calibrate_activations(
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batches,
    *,
    observer=None,
    layers: tuple = LINEN_LAYERS,
) -> dict:
    """Runs the float model over ``batches`` and records each layer's input range.

    Args:
      apply_fn: the (unwrapped) Linen apply function.
      params, model_state: the trained model (eval mode is used: BatchNorm running statistics).
      batches: an iterable of input arrays (N batches of calibration data).
      observer: an :class:`~jaxcompress.quant.observers.Observer`; default
        :func:`~jaxcompress.quant.observers.minmax`.
      layers: the Linen layer classes observed.

    Returns:
      ``model_state`` with ``'quant_stats'`` added: ``{layer path: {'min', 'max'}}``, ready for
      :func:`quantize_activations` (static PTQ, or the starting ranges of QAT).

    Raises:
      ValueError: when ``batches`` is empty or no layer was seen.
    """
    from jaxcompress.quant.observers import minmax

    observer = minmax() if observer is None else observer
    model_state = dict(model_state)
    model_state.pop(COLLECTION, None)

    @jax.jit
    def summarize(params, model_state, x):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, layers) and args:
                seen["/".join(context.module.path)] = observer.summarize(args[0].astype(jnp.float32))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, model_state, x, train=False, rng=None)
        return seen

    acc = None
    for x in batches:
        s = jax.device_get(summarize(params, model_state, x))
        acc = s if acc is None else {k: observer.combine(acc[k], s[k]) for k in s}
    if not acc:
        raise ValueError("calibration saw no batches or no quantizable layers; pass >= 1 batch.")
    ranges = {}
    for k, a in acc.items():
        lo, hi = observer.range(a)
        ranges[k] = {"min": jnp.float32(lo), "max": jnp.float32(hi)}
    return {**model_state, COLLECTION: ranges}
