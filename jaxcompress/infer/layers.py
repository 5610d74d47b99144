"""One Dense or Conv layer and the ways to run it: float, weight-only int8/int4, int8 x int8, sparse.

Every path computes the same function, the layer of the fake-quantized model (input
fake-quantized with its calibrated range, weights on their grid, BatchNorm folded in), and
differs only in how: float32 on dequantized weights, int8 or packed int4 codes dequantized inside
the jitted program (XLA fuses the conversion into the product's operand), int8 x int8 -> int32
products with the zero point's contribution subtracted per output channel, or a sparse product.
A convolution can also run as one matrix product over its input patches (``'patches'`` in float32,
``'int8_patches'`` on int8 codes): the patches are the kernel-offset slices of the padded input
laid side by side; or as a sum over kernel offsets of each offset's slice times that offset's
kernel matrix (``'shifts'``; a broadcast product for one input channel), which XLA fuses into
one loop. For few channels either can beat XLA:CPU's convolution several times over. A
convolution with at most 16 input and output channels can also run with zero output channels
added up to :data:`WIDENED_CHANNELS` and cut off after the product (``'widened'``): XLA:CPU hands
only convolutions with more than 16 channels to its YNNPACK kernels (``ynn_support.cc`` in
XLA's CPU backend), and the wider product on them can be several times faster than the narrow
one without them. A convolution whose input channels are not a multiple of
:data:`CHANNEL_MULTIPLE` can run on its input with zero channels appended up to the next multiple
and zero kernel rows to match (``'padded_in'``): the same sums, and on XLA:CPU an RGB image's
three channels padded to four measured about twice as fast. A
quantized input's calibrated grid is a constant of the program (:attr:`Layer.act_grid`), not an
argument: XLA folds it into the neighbouring ops instead of broadcasting it over the input.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.transform import LeafSpec
from jaxcompress.infer import kernels, sparse

#: Every path name, in the order candidates are listed.
PATHS = ("float", "patches", "shifts", "widened", "padded_in", "weight_int8", "weight_int4", "int8", "int8_patches",
         "bcoo", "bcsr", "gather")

#: The output channels of the ``'widened'`` path: one more than the 16 up to which XLA:CPU keeps a
#: convolution off its YNNPACK kernels.
WIDENED_CHANNELS = 17

#: The ``'padded_in'`` path pads a convolution's input channels up to a multiple of this.
CHANNEL_MULTIPLE = 4


class Layer(NamedTuple):
    """What is static about one layer call (hashable: it is a jit static argument).

    Attributes:
      path: the module path (``'conv1'``, ``'stage1_block0/conv2'``).
      kind: ``'dense'`` or ``'conv'``.
      kernel_shape: the kernel's shape.
      strides, padding, kernel_dilation, feature_group_count: the convolution's (explicit
        ``((low, high), ...)`` padding); ``None``/1 for Dense.
      act: ``(quant_min, quant_max)`` of the input grid, or ``None`` (float input).
      act_grid: ``(scale, zero_point)`` of the input grid as Python floats (with ``act``): the
        calibrated grid is a constant of the compiled program, so XLA folds it into the ops around
        the product instead of broadcasting an argument over the whole input.
      norm: the path of the BatchNorm folded into this layer, or ``None``.
      candidates: the paths this layer can run.
      use_bias: whether the module has a bias parameter.
    """

    path: str
    kind: str
    kernel_shape: tuple
    strides: Optional[tuple] = None
    padding: Optional[tuple] = None
    kernel_dilation: Optional[tuple] = None
    feature_group_count: int = 1
    act: Optional[tuple] = None
    act_grid: Optional[tuple] = None
    norm: Optional[str] = None
    candidates: tuple = ("float",)
    use_bias: bool = True


def explicit_padding(conv: nn.Conv, in_shape) -> tuple:
    """``((low, high), ...)`` of a Flax ``Conv`` for an NHWC input of ``in_shape``."""
    n = len(in_shape) - 2
    k = tuple(conv.kernel_size)
    strides = _tuple(conv.strides, n)
    dil = _tuple(conv.kernel_dilation, n)
    pad = conv.padding
    if isinstance(pad, str):
        if pad not in ("SAME", "VALID", "SAME_LOWER"):
            raise ValueError(f"Conv {'/'.join(conv.path)!r}: padding {pad!r} is not supported for inference; "
                             "use 'SAME', 'VALID' or explicit pads.")
        eff = tuple((kk - 1) * d + 1 for kk, d in zip(k, dil))
        return tuple(tuple(p) for p in jax.lax.padtype_to_pads(in_shape[1:-1], eff, strides, pad))
    if isinstance(pad, int):
        return ((pad, pad),) * n
    return tuple((p, p) if isinstance(p, int) else tuple(p) for p in pad)


def _tuple(v, n):
    if v is None:
        return (1,) * n
    return (v,) * n if isinstance(v, int) else tuple(v)


def describe_layer(module, x, *, act, norm, spec: Optional[LeafSpec], act_grid: Optional[tuple] = None) -> Layer:
    """The :class:`Layer` of a Flax ``Dense``/``Conv`` called on ``x``, with its candidate paths."""
    path = "/".join(module.path)
    if isinstance(module, nn.Conv):
        if x.ndim != len(module.kernel_size) + 2:
            raise ValueError(f"Conv {path!r}: inference needs one batch axis; got an input of shape {x.shape}.")
        if module.mask is not None or _tuple(module.input_dilation, x.ndim - 2) != (1,) * (x.ndim - 2):
            raise ValueError(f"Conv {path!r}: masked or input-dilated convolutions are not supported for inference.")
        n = x.ndim - 2
        kshape = tuple(module.kernel_size) + (x.shape[-1] // module.feature_group_count, module.features)
        base = dict(kind="conv", strides=_tuple(module.strides, n), padding=explicit_padding(module, x.shape),
                    kernel_dilation=_tuple(module.kernel_dilation, n), feature_group_count=module.feature_group_count)
    else:
        kshape = (x.shape[-1], module.features)
        base = dict(kind="dense")
    patches = base["kind"] == "conv" and base["feature_group_count"] == 1
    cands = ["float"] + (["patches", "shifts"] if patches else [])
    if patches and max(kshape[-2:]) < WIDENED_CHANNELS:
        cands.append("widened")
    if patches and kshape[-2] % CHANNEL_MULTIPLE:
        cands.append("padded_in")
    if spec is not None and spec.bits is not None and spec.scheme == "symmetric" and spec.group_size is None \
            and spec.channel_axis in (None, -1, len(kshape) - 1):
        cands.append("weight_int8")
        if spec.bits <= 4:
            cands.append("weight_int4")
        if act is not None and act[0] >= -128 and act[1] - act[0] <= 255:
            cands += ["int8"] + (["int8_patches"] if patches else [])
    if spec is not None and spec.mask is not None and base["kind"] == "dense":
        cands += ["bcoo", "bcsr", "gather"]
    if (act is None) != (act_grid is None):
        raise ValueError(f"layer {path!r}: give the input grid's act=(quant_min, quant_max) and act_grid=(scale, "
                         "zero_point) together, or neither.")
    return Layer(path=path, kernel_shape=kshape, act=act, norm=norm, candidates=tuple(cands), act_grid=act_grid,
                 use_bias=bool(module.use_bias), **base)


def layer_arrays(layer: Layer, kernel, bias, spec: Optional[LeafSpec], norm_params=None, norm_stats=None,
                 epsilon: float = 1e-5) -> dict:
    """Every array any candidate path of ``layer`` needs: ``{path name: {array name: array}}``.

    ``kernel`` may be the latent weights or the compressed view: the description's mask is
    applied and the codes are ``round(kernel / scale)``, the fake quantizer's own rounding.
    """
    out_ch = layer.kernel_shape[-1]
    k = jnp.asarray(kernel, jnp.float32)
    if spec is not None and spec.mask is not None:
        k = jnp.where(jnp.asarray(spec.mask), k, 0.0)
    w_scale, q = jnp.ones((out_ch,), jnp.float32), None
    quantized = "weight_int8" in layer.candidates
    if quantized:
        lim = 2 ** (spec.bits - 1)
        s_full = jnp.broadcast_to(jnp.asarray(spec.scale, jnp.float32), k.shape)
        q = jnp.clip(jnp.round(k * (1.0 / s_full)), -lim, lim - 1).astype(jnp.int8)
        if np.size(spec.scale) not in (1, out_ch):
            raise ValueError(f"layer {layer.path!r}: scale of shape {np.shape(spec.scale)} is neither per tensor "
                             f"nor per output channel ({out_ch}).")
        w_scale = jnp.broadcast_to(jnp.asarray(spec.scale, jnp.float32).reshape(-1), (out_ch,))
    b = None if bias is None else jnp.asarray(bias, jnp.float32)
    if layer.norm is not None:
        p = norm_params or {}
        w_scale, b = kernels.fold_batch_norm(w_scale, b, p.get("scale"), p.get("bias"), norm_stats["mean"],
                                             norm_stats["var"], epsilon)
    if b is None:
        b = jnp.zeros((out_ch,), jnp.float32)
    wf = q.astype(jnp.float32) * w_scale if quantized else k * w_scale
    arrays: dict[str, Any] = {}
    if quantized:
        arrays["weight_int8"] = {"q": q, "scale": w_scale, "bias": b}
        if "weight_int4" in layer.candidates:
            arrays["weight_int4"] = {"q4": kernels.pack_int4(q), "scale": w_scale, "bias": b}
        if "int8" in layer.candidates:
            x_scale, x_zero = layer.act_grid
            shift = -128 if layer.act[0] >= 0 else 0  # an unsigned grid as a signed one
            ksum = jnp.sum(q.astype(jnp.int32), axis=tuple(range(q.ndim - 1)))
            arrays["int8"] = {"q": q, "out_scale": np.float32(x_scale) * w_scale, "bias": b,
                              "zero_correction": (int(x_zero) + shift) * ksum}
    arrays["float"] = {"kernel": wf, "bias": b}
    if "patches" in layer.candidates:
        arrays["patches"] = arrays["shifts"] = arrays["float"]
    if "widened" in layer.candidates:
        pad = [(0, 0)] * (wf.ndim - 1) + [(0, WIDENED_CHANNELS - out_ch)]
        arrays["widened"] = {"kernel": jnp.pad(wf, pad), "bias": b}
    if "padded_in" in layer.candidates:
        pad = [(0, 0)] * (wf.ndim - 2) + [(0, _padded_channels(layer) - wf.shape[-2]), (0, 0)]
        arrays["padded_in"] = {"kernel": jnp.pad(wf, pad), "bias": b}
    if "int8_patches" in layer.candidates:
        arrays["int8_patches"] = arrays["int8"]
    if "gather" in layer.candidates:
        idx, val = sparse.ell(np.asarray(wf))
        arrays["gather"] = {"idx": idx, "val": val, "bias": b}
        arrays["bcoo"] = {"wt": sparse.bcoo(wf), "bias": b}
        arrays["bcsr"] = {"wt": sparse.bcsr(wf), "bias": b}
    return arrays


def _input(layer: Layer, x):
    """The input on its grid: :func:`~jaxcompress.quant.affine.fake_quant_affine`'s values, bit for bit.

    ``(clip(round(x / s) + z, qmin, qmax) - z) s`` is ``clip(round(x / s), qmin - z, qmax - z) s``
    exactly (``z`` is an integer), which needs no zero point over the whole input.
    """
    if layer.act is None:
        return x.astype(jnp.float32)
    s, z = layer.act_grid
    inv = np.float32(1.0) / np.float32(s)
    return jnp.clip(jnp.round(x.astype(jnp.float32) * inv), layer.act[0] - z, layer.act[1] - z) * np.float32(s)


def _float_op(layer: Layer, x, w):
    if layer.kind == "dense":
        return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))
    return jax.lax.conv_general_dilated(x, w, layer.strides, layer.padding, rhs_dilation=layer.kernel_dilation,
                                        dimension_numbers=kernels.conv_dims(x.shape, w.shape),
                                        feature_group_count=layer.feature_group_count)


def patches(layer: Layer, x) -> jax.Array:
    """The input patches of a convolution on an already padded ``x``: ``(N, *out_spatial, prod(k) * C)``.

    Patch entry ``(offset, c)`` is ``x`` at that kernel offset (row-major over the kernel's
    spatial axes) and channel ``c``, so ``patches @ kernel.reshape(-1, O)`` is the convolution.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Layer('c', 'conv', (2, 1, 1, 1), strides=(1, 1), padding=((0, 0), (0, 0)), kernel_dilation=(1, 1))
      >>> patches(layer, jnp.arange(3.0).reshape(1, 3, 1, 1))[0, :, 0].tolist()
      [[0.0, 1.0], [1.0, 2.0]]
    """
    cols = [xs for _, xs in _offset_slices(layer, x)]
    return jnp.concatenate(cols, axis=-1)


def _offset_slices(layer: Layer, x):
    """``(offset, slice)`` per kernel offset of an already padded ``x``: the inputs that offset multiplies."""
    k, strides, dil = layer.kernel_shape[:-2], layer.strides, layer.kernel_dilation
    out = tuple((n - (kk - 1) * d - 1) // s + 1 for n, kk, d, s in zip(x.shape[1:-1], k, dil, strides))
    for offset in np.ndindex(*k):
        start = (0,) + tuple(o * d for o, d in zip(offset, dil)) + (0,)
        limit = (x.shape[0],) + tuple(st + (m - 1) * s + 1 for st, m, s in zip(start[1:-1], out, strides)) \
            + (x.shape[-1],)
        yield offset, jax.lax.slice(x, start, limit, (1,) + tuple(strides) + (1,))


def shifted_sum(layer: Layer, x, w) -> jax.Array:
    """The convolution of an already padded ``x`` with ``w`` as a sum over kernel offsets.

    Example:
      >>> import jax.numpy as jnp
      >>> layer = Layer('c', 'conv', (2, 1, 1, 1), strides=(1, 1), padding=((0, 0), (0, 0)), kernel_dilation=(1, 1))
      >>> shifted_sum(layer, jnp.arange(3.0).reshape(1, 3, 1, 1), jnp.ones((2, 1, 1, 1)))[0, :, 0, 0].tolist()
      [1.0, 3.0]
    """
    acc = None
    one = w.shape[-2] == 1
    for offset, xs in _offset_slices(layer, x):
        wk = w[offset]  # (C, O)
        if one:  # output channels leading: (O, N, *spatial)
            term = xs[None, ..., 0] * wk[0].reshape((-1,) + (1,) * (xs.ndim - 1))
        else:
            term = jax.lax.dot_general(xs, wk, (((xs.ndim - 1,), (0,)), ((), ())))
        acc = term if acc is None else acc + term
    # One input channel: the sum is formed with the output channels as the leading axis and moved
    # last at the end. Formed channels-last, XLA:CPU (jax 0.10) hands the broadcast products and
    # the pooling after them to one YNNPACK fusion that runs several times slower than the sum
    # alone; the transpose keeps the sum a loop of its own.
    return jnp.moveaxis(acc, 0, -1) if one else acc


def _padded_channels(layer: Layer) -> int:
    return -(-layer.kernel_shape[-2] // CHANNEL_MULTIPLE) * CHANNEL_MULTIPLE


def _pad(layer: Layer, x, value=0):
    return jnp.pad(x, ((0, 0),) + tuple(layer.padding) + ((0, 0),), constant_values=value)


def run_layer(layer: Layer, path: str, a: dict, x) -> jax.Array:
    """The output of ``layer`` on input ``x`` by ``path``, with ``a = layer_arrays(...)[path]``."""
    if path in ("int8", "int8_patches"):
        qmin, qmax = layer.act
        (scale, zero), shift = layer.act_grid, -128 if qmin >= 0 else 0
        xq = (kernels.quantize(x, scale, zero, qmin, qmax) + shift).astype(jnp.int8)
        if layer.kind == "dense":
            acc = kernels.int8_dot(xq, a["q"])
        else:
            xq = _pad(layer, xq, np.int8(int(zero) + shift))  # padding holds the real value 0
            if path == "int8_patches":
                acc = kernels.int8_dot(patches(layer, xq), a["q"].reshape(-1, layer.kernel_shape[-1]))
            else:
                acc = kernels.int8_conv(xq, a["q"], layer.strides, "VALID", kernel_dilation=layer.kernel_dilation,
                                        feature_group_count=layer.feature_group_count)
        return (acc - a["zero_correction"]).astype(jnp.float32) * a["out_scale"] + a["bias"]
    x = _input(layer, x)
    if path == "float":
        return _float_op(layer, x, a["kernel"]) + a["bias"]
    if path == "shifts":
        return shifted_sum(layer, _pad(layer, x), a["kernel"]) + a["bias"]
    if path == "widened":
        return _float_op(layer, x, a["kernel"])[..., :layer.kernel_shape[-1]] + a["bias"]
    if path == "padded_in":
        x = jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, _padded_channels(layer) - x.shape[-1]),))
        return _float_op(layer, x, a["kernel"]) + a["bias"]
    if path == "patches":
        w = a["kernel"].reshape(-1, layer.kernel_shape[-1])
        return jax.lax.dot_general(patches(layer, _pad(layer, x)), w, (((x.ndim - 1,), (0,)), ((), ()))) + a["bias"]
    if path in ("weight_int8", "weight_int4"):
        q = a["q"] if path == "weight_int8" else kernels.unpack_int4(a["q4"], layer.kernel_shape)
        return _float_op(layer, x, q.astype(jnp.float32) * a["scale"]) + a["bias"]
    if path == "gather":
        return sparse.ell_matmul(x, a["idx"], a["val"]) + a["bias"]
    if path in ("bcoo", "bcsr"):
        return sparse.sparse_matmul(x, a["wt"]) + a["bias"]
    raise ValueError(f"unknown path {path!r}; expected one of {PATHS}.")
