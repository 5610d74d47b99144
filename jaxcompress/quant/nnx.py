"""Flax NNX support: an apply-function adapter and activation quantization through op hooks.

NNX has no method interception like Linen's ``intercept_methods``; instead its layers call their
matmul through an attribute (``Linear.dot_general``, ``LinearGeneral.dot_general``,
``Conv.conv_general_dilated``, ``Einsum.einsum_op``) that defaults to the ``jax.lax`` op. The same
hook Qwix uses: :func:`quantize_nnx_activations` returns a copy of the model whose layers' hooks
fake-quantize the layer input, without a line of the user's module changed. Weights are
quantized by a weight transform over the ``nnx.Param`` state, as for Linen. Ranges are dynamic
(min/max per batch).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.nnx as nnx
import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules
from jaxcompress.core.validation import check_bits
from jaxcompress.quant.activations import _batch_range, _layer_bits, _quant


def nnx_apply_fn(graphdef: Any) -> Callable:
    """Adapts an NNX model to the step's ``apply_fn(params, model_state, inputs, *, train, rng)``.

    Split the model first: ``graphdef, params, model_state = nnx.split(model, nnx.Param, ...)``;
    ``params`` (the ``nnx.Param`` state) is what the optimizer and the weight transforms see,
    ``model_state`` holds everything else (BatchNorm statistics, rng counters) and is returned
    updated in training mode.

    Args:
      graphdef: the model's graph definition from ``nnx.split``.

    Returns:
      ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, model_state)``; ``rng``
      is unused (NNX models carry their own ``nnx.Rngs`` in the model state).

    Example:
      >>> import flax.nnx as nnx, jax.numpy as jnp
      >>> g, p, s = nnx.split(nnx.Linear(2, 1, rngs=nnx.Rngs(0)), nnx.Param, ...)
      >>> nnx_apply_fn(g)(p, s, jnp.ones((3, 2)), train=True)[0].shape
      (3, 1)
    """

    def apply_fn(params, model_state, inputs, *, train: bool, rng=None):
        del rng
        # copy=True: the states may hold Variables made in an outer trace (model_state is closed
        # over by the step's value_and_grad); fresh ones let BatchNorm update them in this trace.
        model = nnx.merge(graphdef, params, model_state, copy=True)
        model.train() if train else model.eval()
        out = model(inputs)
        if not train:
            return out, model_state
        _, _, new_state = nnx.split(model, nnx.Param, ...)
        return out, new_state

    return apply_fn


def _hook(op, bits: int, symmetric: bool, input_pos: int):
    def hooked(*args, **kwargs):
        args = list(args)
        x = args[input_pos]
        lo, hi = _batch_range(x)
        args[input_pos] = _quant(x, lo, hi, bits, symmetric)
        return op(*args, **kwargs)

    return hooked


def quantize_nnx_activations(
    model: nnx.Module, bits: int = 8, *, symmetric: bool = False, rules: Optional[Rules] = None
) -> nnx.Module:
    """A copy of ``model`` whose ``Linear``/``LinearGeneral``/``Conv``/``Einsum`` inputs are
    fake-quantized (dynamic per-batch range, clipped straight-through gradient).

    Args:
      model: an NNX module (left unchanged).
      bits: activation bit width ``2..8``.
      symmetric: signed symmetric grid instead of affine with a zero point.
      rules: ``(regex, value)`` rules on the layer path (``'l1'``, ``'block/fc'``); ``True`` ->
        ``bits``, an int overrides, ``None`` keeps that layer in float.

    Returns:
      A new module sharing no state with ``model``; ``nnx.split`` it and use
      :func:`nnx_apply_fn` with the train step.

    Example:
      >>> import flax.nnx as nnx, jax.numpy as jnp
      >>> lin = nnx.Linear(3, 1, use_bias=False, rngs=nnx.Rngs(0))
      >>> lin.kernel[...] = jnp.ones((3, 1))
      >>> q = quantize_nnx_activations(lin, 2)
      >>> float(q(jnp.array([[0.0, 0.4, 3.0]]))[0, 0]), float(lin(jnp.array([[0.0, 0.4, 3.0]]))[0, 0])
      (3.0, 3.4000000953674316)
    """
    bits = check_bits("bits", bits, low=2)
    model = nnx.clone(model)
    count = 0
    for path, module in nnx.iter_graph(model):
        name = "/".join(str(p) for p in path)
        b = _layer_bits(name, rules, bits)
        if b is None:
            continue
        if isinstance(module, (nnx.Linear, nnx.LinearGeneral)):
            if isinstance(module, nnx.LinearGeneral) and module.dot_general_cls is not None:
                raise ValueError(f"layer {name!r} uses dot_general_cls; activation hooks need dot_general.")
            op = module.dot_general if module.dot_general is not None else jax.lax.dot_general
            module.dot_general = _hook(op, b, symmetric, 0)
        elif isinstance(module, nnx.Conv):
            module.conv_general_dilated = _hook(module.conv_general_dilated, b, symmetric, 0)
        elif isinstance(module, nnx.Einsum):
            module.einsum_op = _hook(module.einsum_op, b, symmetric, 1)
        else:
            continue
        count += 1
    if count == 0:
        raise ValueError("no Linear/LinearGeneral/Conv/Einsum layer was selected in the model; check rules.")
    return model
