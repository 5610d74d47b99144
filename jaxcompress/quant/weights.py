"""Weight fake quantization as a :class:`~jaxcompress.core.transform.Transform` (QAT and PTQ).

:func:`weight_quantization` is the one weight quantizer: symmetric or affine grids, per tensor /
channel / group, ``2..8`` bits, binary and ternary, and mixed precision through ``(regex, value)``
rules where the value is a bit width (``2..8``), ``1`` or ``'binary'``, or ``'ternary'``. The
same transform serves post-training quantization: apply it once to trained params
(``t.apply(params, t.init(params))``) and evaluate.

The same object quantizes the inputs of the selected layers at run time
(``activation_bits``, see :mod:`jaxcompress.quant.activations`), so one rule says "this layer:
int4 weights per channel, int8 activations": ``('fc', QuantSpec(weights=4, activations=8))``.

Zeros stay zero under every kind, so it composes after pruning with
:func:`~jaxcompress.core.transform.chain`: zero is on every integer grid (an affine zero point is
an integer, as in PyTorch), and binary and ternary codes keep 0 at 0 (see
:mod:`jaxcompress.quant.lowbit`).
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, explain, is_none, select, warn_unused_rules
from jaxcompress.core.transform import LeafSpec, Trainable, Transform, UpdateInfo
from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.quant import activations as act
from jaxcompress.quant.affine import check_ste, fake_quant, tensor_qparams
from jaxcompress.quant.lowbit import binarize, binary_scale, ternarize, ternary_scale

_NAMED = ("binary", "ternary")


class QuantState(NamedTuple):
    """State of :func:`weight_quantization`.

    Attributes:
      count: int32, number of ``update`` calls so far.
      ranges: ``{layer path: {'min', 'max'}}`` activation ranges (``activation_range=
        'calibrated'``; unset ranges have ``min > max``), else ``None``.
      alpha: ``Trainable({layer path: alpha})``, the PACT clipping levels
        (``activation_range='pact'``), else ``None``.
    """

    count: jax.Array
    ranges: Any = None
    alpha: Any = None


class QuantSpec(NamedTuple):
    """A rule value setting a layer's weight and input quantization together.

    Attributes:
      weights: the kernel's kind (as for ``bits``: ``2..8``, ``1``/``'binary'``, ``'ternary'``),
        ``True`` for the transform's ``bits``, ``None`` to keep it float.
      activations: the layer input's bits (``2..8``), ``True`` for ``activation_bits``, ``None``
        to keep it float.
    """

    weights: Any = True
    activations: Any = True


def _is_choice(x) -> bool:
    return x is None or isinstance(x, QuantSpec)


def _check_kind(name: str, value: Any):
    if isinstance(value, str):
        if value not in _NAMED:
            raise ValueError(f"{name} must be a bit width 1..8, 'binary' or 'ternary', got {value!r}.")
        return value
    bits = check_int(name, value, minimum=1, maximum=8)
    return "binary" if bits == 1 else bits


def weight_quantization(
    bits: Any = 8,
    *,
    symmetric: bool = True,
    narrow: bool = True,
    channel_axis: Optional[int] = -1,
    group_size: Optional[int] = None,
    group_axis: int = -2,
    ste: str = "clipped",
    rules: Optional[Rules] = None,
    activation_bits: Optional[int] = None,
    activation_symmetric: bool = False,
    activation_range: str = "dynamic",
    activation_alpha: float = 10.0,
    momentum: float = 0.99,
    activation_layers: tuple = act.LINEN_LAYERS,
) -> Transform:
    """Fake-quantizes the selected weights: the QAT/PTQ view of a params pytree.

    The view holds dequantized values on each leaf's grid; gradients pass straight through
    (:func:`~jaxcompress.quant.affine.fake_quant`, :func:`~jaxcompress.quant.lowbit.binarize`,
    :func:`~jaxcompress.quant.lowbit.ternarize`). ``describe`` gives, per quantized leaf, the bit
    width, scheme, axis or group, and the exact ``scale`` and ``zero_point`` of the view:
    ``view == scale * (q - zero_point)`` with integer ``q`` in range (``zero_point`` ``None`` for
    the symmetric kinds; ``q`` in ``{-1, 0, 1}`` for binary and ternary, 0 only where the weight
    was 0 for binary).

    Args:
      bits: default kind: a bit width ``2..8``, ``1`` or ``'binary'`` (XNOR-Net sign times
        mean magnitude), or ``'ternary'`` (TWN).
      symmetric: symmetric grid (zero point 0) or affine (min/max onto ``[0, 2^b - 1]``).
      narrow: narrow symmetric range (``[-127, 127]`` at 8 bits), a grid symmetric about 0.
      channel_axis: one range per slice along this axis (``-1``: output channel of Dense/Conv);
        ``None`` for per tensor.
      group_size: one range per group of this many weights along ``group_axis`` (the
        contraction dimension), overriding ``channel_axis`` for the ``2..8``-bit kinds.
      group_axis: see ``group_size``.
      ste: ``'clipped'`` or ``'identity'`` straight-through estimator (``2..8`` bits; binary and
        ternary always pass the gradient everywhere).
      rules: ``(regex, value)`` pairs; ``True`` takes ``bits`` (and ``activation_bits``), an int
        or ``'binary'``/``'ternary'`` overrides the weights' kind (mixed precision), a
        :class:`QuantSpec` sets the weights and the layer's input together, ``None``/``False``
        leaves the leaf (and the layer's input) in float. Default: every float leaf with
        ``ndim >= 2``. Rules that match no leaf are warned about at ``init``.
      activation_bits: quantize the input of each Linen layer (``Dense``, ``DenseGeneral``,
        ``Conv``, ``Einsum``) whose kernel ``'layer/kernel'`` the rules select, to this many bits
        (``2..8``); ``None`` (default) keeps inputs in float unless a :class:`QuantSpec` asks.
        The train and eval steps run the model under the transform's ``intercept``.
      activation_symmetric: signed symmetric input grid instead of affine ``[0, 2^b - 1]``.
      activation_range: ``'dynamic'`` (each batch's min/max), ``'token'`` (each position's own
        min/max over the input features, at run time), ``'calibrated'`` (ranges in the
        state, from :func:`~jaxcompress.quant.activations.calibrate_activations`, moved by an
        EMA in training), or ``'pact'`` (trained clipping levels ``alpha``, inputs on
        ``[0, alpha]``: for non-negative inputs such as those after a ReLU).
      activation_alpha: the PACT levels before calibration (the paper starts at 10).
      momentum: EMA factor of calibrated ranges in training.
      activation_layers: the Linen layer classes whose input is quantized.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`QuantState`; its
      ``describe`` reports ``act_bits`` on the kernels of layers whose input is quantized.

    Raises:
      TypeError / ValueError: bad ``bits``, ``ste``, activation settings (here) or rule values
      and axes (at ``init``).

    Example:
      8 bits on the first and last layer, 4 elsewhere:

      >>> import jax.numpy as jnp
      >>> p = {'conv1': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'fc': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)},
      ...      'head': {'kernel': jnp.linspace(-1, 1, 18).reshape(3, 6)}}
      >>> t = weight_quantization(4, channel_axis=None, rules=[('conv1|head', 8), ('.*', True)])
      >>> s = t.init(p)
      >>> v = t.apply(p, s)
      >>> [len(set(v[k]['kernel'].ravel().tolist())) for k in ('conv1', 'fc', 'head')]
      [18, 15, 18]
      >>> spec = t.describe(p, s)['fc/kernel']
      >>> spec.bits, spec.scheme, round(float(spec.scale.squeeze()), 4)
      (4, 'symmetric', 0.1429)

      int4 weights per channel and int8 inputs for ``fc``, the rest in float:

      >>> t = weight_quantization(8, rules=[('^fc/', QuantSpec(weights=4, activations=8)), ('.*', None)])
      >>> spec = t.describe(p, t.init(p))['fc/kernel']
      >>> spec.bits, spec.act_bits, spec.scale.shape
      (4, 8, (1, 6))
    """
    default = _check_kind("bits", bits)
    check_ste(ste)
    if not isinstance(symmetric, bool) or not isinstance(narrow, bool):
        raise TypeError(f"symmetric and narrow must be bools, got {symmetric!r} and {narrow!r}.")
    grid = dict(symmetric=symmetric, narrow=narrow, channel_axis=channel_axis,
                group_size=group_size, group_axis=group_axis)
    act_default = None if activation_bits is None else check_int("activation_bits", activation_bits, minimum=2, maximum=8)
    if activation_range not in act.RANGES:
        raise ValueError(f"activation_range must be one of {act.RANGES}, got {activation_range!r}.")
    if not isinstance(activation_symmetric, bool):
        raise TypeError(f"activation_symmetric must be a bool, got {activation_symmetric!r}.")
    if activation_range == "pact" and activation_symmetric:
        raise ValueError("activation_range='pact' quantizes to [0, alpha]; it has no symmetric grid. "
                         "Drop activation_symmetric=True or use 'dynamic', 'token' or 'calibrated'.")
    momentum = check_fraction("momentum", momentum)
    activation_alpha = check_positive("activation_alpha", activation_alpha)
    specs = [v for _, v in (rules or ()) if isinstance(v, QuantSpec)]
    quantizes_inputs = act_default is not None or any(v.activations not in (None, False, True) for v in specs)

    def choice(value):
        """A rule value as ``(weight kind, activation bits)``."""
        if value is None:
            return None, None
        w, a = (value.weights, value.activations) if isinstance(value, QuantSpec) else (value, True)
        w = None if w in (None, False) else default if w is True else _check_kind("per-rule bits", w)
        a = None if a in (None, False) else act_default if a is True else check_int(
            "per-rule activation bits", a, minimum=2, maximum=8)
        return w, a

    for v in specs:
        choice(v)  # validates them now

    def kinds(params):
        return jax.tree.map(lambda v: choice(v)[0], select(params, rules), is_leaf=_is_choice)

    def input_bits(name: str):
        """The bits of layer ``name``'s input, by the rules on its kernel."""
        leaf = {act.kernel_path(name): jax.ShapeDtypeStruct((1, 1), jnp.float32)}
        return choice(explain(leaf, rules)[0].value)[1]

    def input_layers(params):
        """The layers (by kernel path) whose input the rules quantize."""
        return sorted(
            act.layer_of(d.path) for d in explain(params, rules)
            if act.layer_of(d.path) is not None and choice(d.value)[1] is not None
        )

    def quantize(kind, w):
        if kind is None:
            return w
        if kind == "binary":
            return binarize(w, channel_axis=channel_axis)
        if kind == "ternary":
            return ternarize(w, channel_axis=channel_axis)
        return fake_quant(w, kind, ste=ste, **grid)

    def spec(kind, w):
        if kind == "binary":
            return LeafSpec(bits=1, scheme="binary", channel_axis=channel_axis, scale=binary_scale(w, channel_axis=channel_axis))
        if kind == "ternary":
            alpha, _ = ternary_scale(w, channel_axis=channel_axis)
            return LeafSpec(bits=2, scheme="ternary", channel_axis=channel_axis, scale=alpha)
        qp = tensor_qparams(w, kind, **grid)
        grouped = group_size is not None
        return LeafSpec(
            bits=kind,
            scheme="symmetric" if symmetric else "affine",
            channel_axis=None if grouped else channel_axis,
            group_size=group_size if grouped else None,
            group_axis=group_axis if grouped else None,
            scale=qp.scale,
            zero_point=None if symmetric else qp.zero_point.astype(jnp.int32),
        )

    def init(params):
        warn_unused_rules(params, rules, "weight_quantization")
        widths = kinds(params)  # validates rule values and axes now, not at the first step
        jax.eval_shape(lambda p: jax.tree.map(quantize, widths, p, is_leaf=is_none), params)
        count = jnp.zeros((), jnp.int32)
        if not quantizes_inputs or activation_range in ("dynamic", "token"):
            return QuantState(count=count)
        layers = input_layers(params)
        if activation_range == "pact":
            return QuantState(count=count, alpha=Trainable({k: jnp.float32(activation_alpha) for k in layers}))
        return QuantState(count=count, ranges={k: act.empty_range() for k in layers})

    def apply(params, state):
        del state
        return jax.tree.map(quantize, kinds(params), params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params
        ranges = state.ranges
        if ranges is not None:
            ranges = act.fold_observed(ranges, info.observed, momentum)
        return state._replace(count=state.count + 1, ranges=ranges)

    def describe(params, state):
        del state
        flat = jax.tree.leaves_with_path(kinds(params), is_leaf=is_none)
        leaves = jax.tree.leaves(params)
        specs = {path_name(p): spec(k, w) for (p, k), w in zip(flat, leaves) if k is not None}
        if quantizes_inputs:
            for layer in input_layers(params):
                path = act.kernel_path(layer)
                specs[path] = specs.get(path, LeafSpec())._replace(act_bits=input_bits(layer))
        return specs

    def intercept(state, *, train, axis_name, observed, observe=None):
        return act.input_interceptor(
            state, bits_of=input_bits, mode=activation_range, symmetric=activation_symmetric,
            momentum=momentum, layers=activation_layers, train=train, axis_name=axis_name,
            observed=observed, observe=observe,
        )

    return Transform(init, apply, update, describe, intercept if quantizes_inputs else None)
