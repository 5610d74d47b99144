"""Flax NNX support: an apply-function adapter and activation quantization through op hooks.

NNX has no method interception like Linen's ``intercept_methods``; instead its layers call their
matmul through an attribute (``Linear.dot_general``, ``LinearGeneral.dot_general``,
``Conv.conv_general_dilated``, ``Einsum.einsum_op``) that defaults to the ``jax.lax`` op. The same
hook Qwix uses: :func:`quantize_nnx_activations` returns a copy of the model whose layers' hooks
fake-quantize the layer input, without a line of the user's module changed. Weights are
quantized by a weight transform over the ``nnx.Param`` state, as for Linen.

Ranges are dynamic (min/max per batch) until :func:`calibrate_nnx_activations` records them;
calibrated ranges are :class:`QuantStat` variables of the hooks, so ``nnx.split(model,
nnx.Param, ...)`` puts them in the model state next to BatchNorm statistics, the train step
returns them updated, and checkpoints keep them. As for Linen (see
:mod:`jaxcompress.quant.activations`), training mode follows an exponential moving average of
the batch ranges and evaluation mode (``model.eval()``) uses them fixed.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Optional

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules
from jaxcompress.core.validation import check_fraction, check_int
from jaxcompress.quant.activations import layer_bits, layer_range, observed_ranges, fake_quant_input
from jaxcompress.quant.observers import Observer, minmax


def nnx_apply_fn(graphdef: Any, *, inputs: str = "image") -> Callable:
    """Adapts an NNX model to the step's ``apply_fn(params, model_state, batch, *, train, rng)``.

    Split the model first: ``graphdef, params, model_state = nnx.split(model, nnx.Param, ...)``;
    ``params`` (the ``nnx.Param`` state) is what the optimizer and the weight transforms see,
    ``model_state`` holds everything else (BatchNorm statistics, rng counters) and is returned
    updated in training mode.

    Args:
      graphdef: the model's graph definition from ``nnx.split``.
      inputs: the batch entry the model takes.

    Returns:
      ``apply_fn(params, model_state, batch, *, train, rng) -> (logits, model_state)``; ``rng``
      is unused (NNX models carry their own ``nnx.Rngs`` in the model state).

    Example:
      >>> import flax.nnx as nnx, jax.numpy as jnp
      >>> g, p, s = nnx.split(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), nnx.Param, ...)
      >>> nnx_apply_fn(g)(p, s, {'image': jnp.ones((3, 2))}, train=True)[0].shape
      (3, 1)
    """

    def apply_fn(params, model_state, batch, *, train: bool, rng=None):
        del rng
        # copy=True: the states may hold Variables made in an outer trace (model_state is closed
        # over by the step's value_and_grad); fresh ones let BatchNorm update them in this trace.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        model.train() if train else model.eval()
        out = model(batch[inputs])
        if not train:
            return out, model_state
        _, _, new_state = nnx.split(model, nnx.Param, ...)
        return out, new_state

    return apply_fn


class QuantStat(nnx.Variable):
    """A calibrated activation range bound (the ``min`` or ``max`` of a layer's input)."""


#: While calibrating: (observer, {layer name: summary}) that the hooks fill instead of quantizing.
_RECORDING: contextvars.ContextVar = contextvars.ContextVar("jaxcompress_nnx_recording", default=None)


@contextlib.contextmanager
def _recording(observer: Observer, seen: dict):
    token = _RECORDING.set((observer, seen))
    try:
        yield
    finally:
        _RECORDING.reset(token)


class InputQuant(nnx.Module):
    """The hook put in place of a layer's matmul/conv op: fake-quantizes the op's input, then calls it.

    Attributes:
      name: the layer's path (``'block/fc'``), as used by the rules.
      bits, symmetric, momentum, axis_name: as given to :func:`quantize_nnx_activations`.
      use_running_average: set by ``model.eval()`` / ``model.train()``: with calibrated ranges,
        evaluation uses them fixed and training updates them by EMA.
      min, max: :class:`QuantStat` ranges once calibrated, ``None`` before (dynamic ranges).
    """

    def __init__(self, op: Callable, name: str, bits: int, symmetric: bool, input_pos: int,
                 momentum: float, axis_name: Optional[str]):
        self.op = op
        self.name = name
        self.bits = bits
        self.symmetric = symmetric
        self.input_pos = input_pos
        self.momentum = momentum
        self.axis_name = axis_name
        self.use_running_average = False
        self.min = nnx.data(None)
        self.max = nnx.data(None)

    def __call__(self, *args, **kwargs):
        args = list(args)
        x = args[self.input_pos]
        recording = _RECORDING.get()
        if recording is not None:  # calibration sees the float model
            observer, seen = recording
            seen[self.name] = observer.summarize(x.astype(jnp.float32))
            return self.op(*args, **kwargs)
        stored = None if self.min is None else (self.min[...], self.max[...])
        train = not self.use_running_average
        lo, hi = layer_range(x, stored, train, self.momentum, self.axis_name)
        if stored is not None and train:
            self.min[...], self.max[...] = lo, hi
        args[self.input_pos] = fake_quant_input(x, lo, hi, self.bits, self.symmetric)
        return self.op(*args, **kwargs)


def _hooks(model: nnx.Module) -> dict:
    return {h.name: h for _, h in nnx.iter_graph(model) if isinstance(h, InputQuant)}


def quantize_nnx_activations(
    model: nnx.Module,
    bits: int = 8,
    *,
    symmetric: bool = False,
    rules: Optional[Rules] = None,
    momentum: float = 0.99,
    axis_name: Optional[str] = None,
) -> nnx.Module:
    """A copy of ``model`` whose ``Linear``/``LinearGeneral``/``Conv``/``Einsum`` inputs are
    fake-quantized (clipped straight-through gradient).

    Args:
      model: an NNX module (left unchanged).
      bits: activation bit width ``2..8``.
      symmetric: signed symmetric grid instead of affine with a zero point.
      rules: ``(regex, value)`` rules on the layer path (``'l1'``, ``'block/fc'``); ``True`` ->
        ``bits``, an int overrides, ``None`` keeps that layer in float.
      momentum: EMA factor of calibrated ranges in training mode.
      axis_name: under ``jax.pmap``, the mapped axis: batch ranges are the min/max over devices.

    Returns:
      A new module sharing no state with ``model``, with dynamic per-batch ranges (calibrate it
      with :func:`calibrate_nnx_activations` for fixed ranges); ``nnx.split`` it and use
      :func:`nnx_apply_fn` with the train step.

    Example:
      >>> import flax.nnx as nnx, jax.numpy as jnp
      >>> lin = nnx.Linear(3, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> lin.kernel[...] = jnp.ones((3, 1))
      >>> q = quantize_nnx_activations(lin, 2)
      >>> float(q(jnp.array([[0.0, 0.4, 3.0]]))[0, 0]), float(lin(jnp.array([[0.0, 0.4, 3.0]]))[0, 0])
      (3.0, 3.4000000953674316)
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    momentum = check_fraction("momentum", momentum)
    model = nnx.clone(model)
    if _hooks(model):
        raise ValueError("model already has activation quantization hooks; pass the original model.")
    count = 0
    for path, module in list(nnx.iter_graph(model)):
        name = "/".join(str(p) for p in path)
        b = layer_bits(name, rules, bits)
        if b is None:
            continue
        hook = functools.partial(InputQuant, name=name, bits=b, symmetric=symmetric, momentum=momentum,
                                 axis_name=axis_name)
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
            if isinstance(module, nnx.LinearGeneral) and module.dot_general_cls is not None:
                raise ValueError(f"layer {name!r} uses dot_general_cls; activation hooks need dot_general.")
            op = module.dot_general if module.dot_general is not None else jax.lax.dot_general
            module.dot_general = nnx.data(hook(op, input_pos=0))
        elif isinstance(module, nnx.Conv):
            module.conv_general_dilated = nnx.data(hook(module.conv_general_dilated, input_pos=0))
        elif isinstance(module, nnx.Einsum):
            module.einsum_op = nnx.data(hook(module.einsum_op, input_pos=1))
        else:
            continue
        count += 1
    if count == 0:
        raise ValueError("no Linear/LinearGeneral/Conv/Einsum layer was selected in the model; check rules.")
    return model


def calibrate_nnx_activations(model: nnx.Module, batches, *, observer: Optional[Observer] = None) -> nnx.Module:
    """Records each hooked layer's input range over ``batches`` (static PTQ, or QAT's start).

    The float model runs in evaluation mode (BatchNorm running statistics); ``observer``
    (default :func:`~jaxcompress.quant.observers.minmax`) turns each layer's inputs into a range.

    Args:
      model: a model from :func:`quantize_nnx_activations` (left unchanged).
      batches: an iterable of input arrays.
      observer: an :class:`~jaxcompress.quant.observers.Observer`.

    Returns:
      A copy of ``model`` whose hooks hold :class:`QuantStat` ``min``/``max``. Call
      ``.train()`` on it before training (its mode is evaluation after calibration).

    Raises:
      ValueError: when ``model`` has no hooks or ``batches`` is empty.

    Example:
      >>> import flax.nnx as nnx, jax.numpy as jnp
      >>> q = quantize_nnx_activations(nnx.Linear(3, 1, rngs=nnx.Rngs(0)), 8)
      >>> c = calibrate_nnx_activations(q, [jnp.array([[0.0, 1.0, 2.0]]), jnp.array([[-1.0, 0.5, 0.0]])])
      >>> float(c.dot_general.min[...]), float(c.dot_general.max[...])
      (-1.0, 2.0)
    """
    observer = minmax() if observer is None else observer
    model = nnx.clone(model)
    hooks = _hooks(model)
    if not hooks:
        raise ValueError("model has no activation quantization hooks; pass quantize_nnx_activations(model).")
    model.eval()
    graphdef, state = nnx.split(model)

    @jax.jit
    def summarize(state, x):
        seen = {}
        with _recording(observer, seen):
            nnx.merge(graphdef, state, copy=True)(x)
        return seen

    ranges = observed_ranges(observer, lambda x: summarize(state, x), batches)
    for name, hook in hooks.items():
        if name not in ranges:
            raise ValueError(f"layer {name!r} was not called by the model on the calibration batches.")
        hook.min = QuantStat(ranges[name]["min"])
        hook.max = QuantStat(ranges[name]["max"])
    return model
