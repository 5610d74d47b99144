"""Activation quantization without touching the model: Flax Linen interception, NNX op hooks.

The input of every selected layer (Linen ``Dense``, ``DenseGeneral``, ``Conv``, ``Einsum``;
NNX ``Linear``, ``LinearGeneral``, ``Conv``, ``Einsum``) is fake-quantized before the layer runs.
Weights are quantized separately by a weight transform
(:func:`~jaxcompress.quant.weights.weight_quantization`), so W8A8 is that transform plus
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

Learned clipping (PACT, Choi et al. 2018). :func:`pact_activations` quantizes each selected
layer's input to ``2^b`` levels on ``[0, alpha]`` with a trained ``alpha`` per layer. A trained
value needs a gradient, so the clipping levels live in the **params**, under the top-level key
``'pact_alpha'`` (``{layer path: alpha}``) that :func:`pact_params` adds: the optimizer trains
them with the weights (weight decay on them is the paper's L2 on ``alpha``), and weight
transforms leave them alone (scalars are never selected by rules).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, explain
from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.quant.affine import affine_qparams, fake_quant_affine
from jaxcompress.quant.lowbit import pact

#: The model-state collection holding calibrated activation ranges.
COLLECTION = "quant_stats"
LINEN_LAYERS = (nn.Dense, nn.DenseGeneral, nn.Conv, nn.Einsum)
#: The params key holding PACT clipping levels.
PACT_KEY = "pact_alpha"


def layer_bits(name: str, rules: Optional[Rules], bits: int) -> Optional[int]:
    """Bits for a layer's input by the rules on its path (``True`` -> ``bits``, ``None`` -> float)."""
    if rules is None:
        return bits
    value = explain({name: jax.ShapeDtypeStruct((1, 1), jnp.float32)}, rules)[0].value
    if value is None:
        return None
    return bits if value is True else check_int("per-rule activation bits", value, minimum=2, maximum=8)


def _batch_range(x, axis_name=None):
    xs = jax.lax.stop_gradient(x).astype(jnp.float32)
    lo, hi = jnp.min(xs), jnp.max(xs)
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
    return momentum * stored[0] + (1 - momentum) * lo, momentum * stored[1] + (1 - momentum) * hi


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


def _input_interceptor(layers: tuple, rules: Optional[Rules], bits: int, quantize: Callable) -> Callable:
    """A Linen interceptor replacing the input ``x`` of each selected layer by ``quantize(path, bits, x)``."""

    def interceptor(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or not isinstance(context.module, layers) or not args:
            return next_fun(*args, **kwargs)
        name = "/".join(context.module.path)
        b = layer_bits(name, rules, bits)
        if b is None:
            return next_fun(*args, **kwargs)
        return next_fun(quantize(name, b, args[0]), *args[1:], **kwargs)

    return interceptor


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
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (logits, model_state)``
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
    bits = check_int("bits", bits, minimum=2, maximum=8)
    momentum = check_fraction("momentum", momentum)
    layer_bits("_", rules, bits)  # validates the rules now

    def wrapped(params, model_state, batch, *, train: bool, rng=None):
        model_state = dict(model_state)
        stats = model_state.pop(COLLECTION, None)
        new_stats = {} if stats is None else dict(stats)

        def quantize(name, b, x):
            stored = None
            if stats is not None:
                if name not in stats:
                    raise ValueError(
                        f"model_state['{COLLECTION}'] has no range for layer {name!r} (it has "
                        f"{sorted(stats)}); calibrate with the same model and rules."
                    )
                stored = (stats[name]["min"], stats[name]["max"])
            lo, hi = layer_range(x, stored, train, momentum, axis_name)
            if stored is not None and train:
                new_stats[name] = {"min": lo, "max": hi}
            return fake_quant_input(x, lo, hi, b, symmetric)

        with nn.intercept_methods(_input_interceptor(layers, rules, bits, quantize)):
            logits, new_state = apply_fn(params, model_state, batch, train=train, rng=rng)
        if stats is not None:
            new_state = {**dict(new_state), COLLECTION: new_stats}
        return logits, new_state

    return wrapped


def _observe_inputs(apply_fn: Callable, layers: tuple, summarize: Callable) -> Callable:
    """A jitted ``(params, model_state, batch) -> {layer path: summarize(layer input)}`` (eval mode, float)."""

    @jax.jit
    def run(params, model_state, x):
        seen = {}

        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and isinstance(context.module, layers) and args:
                seen["/".join(context.module.path)] = summarize(args[0].astype(jnp.float32))
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            apply_fn(params, model_state, x, train=False, rng=None)
        return seen

    return run


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
      batches: an iterable of N calibration batches, as ``apply_fn`` takes them (e.g.
        ``{'image': x}``).
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

    summarize = _observe_inputs(apply_fn, layers, observer.summarize)
    ranges = observed_ranges(observer, lambda x: summarize(params, model_state, x), batches)
    return {**model_state, COLLECTION: ranges}


def pact_params(
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    inputs: Any,
    *,
    bits: int = 4,
    alpha: Optional[float] = None,
    rules: Optional[Rules] = None,
    layers: tuple = LINEN_LAYERS,
) -> dict:
    """``params`` with one trainable PACT clipping level per selected layer, under ``'pact_alpha'``.

    Args:
      apply_fn: the (unwrapped) Linen apply function.
      params, model_state: the model's variables (``params`` must be a dict).
      inputs: a sample batch, as ``apply_fn`` takes it; one eval-mode pass finds the layers and
        their input ranges.
      bits: the default bit width, only to validate ``rules`` (the same rules as
        :func:`pact_activations`).
      alpha: the initial level for every layer (the paper starts at 10); default ``None``
        starts each layer at the max of its input on ``inputs`` (at least 1e-3), so that nothing
        is clipped at first.
      rules: ``(regex, value)`` rules on layer paths; layers mapped to ``None`` get no ``alpha``.
      layers: the Linen layer classes whose input is clipped.

    Returns:
      ``{**params, 'pact_alpha': {layer path: float32 alpha}}``: pass it to ``init_train_state``
      and train with :func:`pact_activations`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(1)
      >>> apply_fn = lambda p, s, x, *, train, rng=None: (model.apply({'params': p}, x), s)
      >>> x = jnp.array([[0.0, 0.5, 2.0]])
      >>> p = pact_params(apply_fn, model.init(jax.random.key(0), x)['params'], {}, x)
      >>> {k: float(v) for k, v in p['pact_alpha'].items()}
      {'': 2.0}
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict of the model's params to add {PACT_KEY!r}, got {type(params).__name__}.")
    if PACT_KEY in params:
        raise ValueError(f"params already hold {PACT_KEY!r}; pass the model's own params.")
    if alpha is not None:
        alpha = check_positive("alpha", alpha)
    seen = jax.device_get(_observe_inputs(apply_fn, layers, jnp.max)(params, model_state, inputs))
    alphas = {}
    for name, hi in seen.items():
        if layer_bits(name, rules, bits) is None:
            continue
        alphas[name] = jnp.float32(max(float(hi), 1e-3) if alpha is None else alpha)
    if not alphas:
        raise ValueError(f"no layer of the model was selected for PACT (layers seen: {sorted(seen)}); check rules.")
    return {**params, PACT_KEY: alphas}


def pact_activations(
    apply_fn: Callable,
    bits: int = 4,
    *,
    rules: Optional[Rules] = None,
    layers: tuple = LINEN_LAYERS,
) -> Callable:
    """Wraps a Linen apply function so its layer inputs go through PACT with learned clipping.

    Each selected layer's input ``x`` becomes ``pact(x, alpha, b)``: ``clip(x, 0, alpha)`` on
    ``2^b`` levels (:func:`~jaxcompress.quant.lowbit.pact`); ``alpha`` gets gradient 1 where
    ``x >= alpha``. PACT is for non-negative inputs (after ReLU): negative inputs become 0, so
    keep layers with signed inputs in float or on :func:`quantize_activations` by ``rules``.

    Args:
      apply_fn: the Linen apply function.
      bits: activation bit width ``2..8``.
      rules: ``(regex, value)`` rules on layer paths, the same as given to :func:`pact_params`.
      layers: the Linen layer classes whose input is clipped.

    Returns:
      An apply function taking the params from :func:`pact_params`.

    Example:
      >>> import jax, jax.numpy as jnp, flax.linen as nn
      >>> model = nn.Dense(1, use_bias=False)
      >>> apply_fn = lambda p, s, x, *, train, rng=None: (model.apply({'params': p}, x), s)
      >>> params = {'kernel': jnp.ones((3, 1)), 'pact_alpha': {'': jnp.float32(3.0)}}
      >>> f = pact_activations(apply_fn, 2)
      >>> float(f(params, {}, jnp.array([[-1.0, 0.4, 5.0]]), train=False)[0][0, 0])  # 0 + 0 + 3
      3.0
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    layer_bits("_", rules, bits)

    def wrapped(params, model_state, batch, *, train: bool, rng=None):
        if not isinstance(params, dict) or PACT_KEY not in params:
            raise ValueError(f"params have no {PACT_KEY!r}; build them with pact_params(...).")
        alphas = params[PACT_KEY]
        model_params = {k: v for k, v in params.items() if k != PACT_KEY}

        def quantize(name, b, x):
            if name not in alphas:
                raise ValueError(
                    f"params[{PACT_KEY!r}] has no alpha for layer {name!r} (it has {sorted(alphas)}); "
                    "build them with pact_params(...) using the same model and rules."
                )
            return pact(x, alphas[name], b)

        with nn.intercept_methods(_input_interceptor(layers, rules, bits, quantize)):
            return apply_fn(model_params, model_state, batch, train=train, rng=rng)

    return wrapped
