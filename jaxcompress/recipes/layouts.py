"""The parameter shapes of each recipe model kind, worked out without JAX.

A recipe's rules and factorize ranks are checked against its models' parameters when the recipe
is read. Building a Flax model needs JAX, whose import alone takes longer than the check may;
these functions give the same ``{path: shape}`` as ``jax.eval_shape(model.init)`` from the
model table alone (``tests/test_recipe_layouts.py`` compares them with Flax for every kind), in
the order JAX flattens the params (each level's keys sorted).
"""
from __future__ import annotations

import math
from typing import Any

#: Width of the byte-level text models' vocabulary.
BYTE_VOCAB = 256


def _dense(out: dict, name: str, fan_in: int, width: int, bias: bool = True) -> int:
    out[f"{name}/kernel"] = (fan_in, width)
    if bias:
        out[f"{name}/bias"] = (width,)
    return width


def _conv(out: dict, name: str, window: int, cin: int, cout: int, bias: bool = True) -> int:
    out[f"{name}/kernel"] = (window, window, cin, cout)
    if bias:
        out[f"{name}/bias"] = (cout,)
    return cout


def _norm(out: dict, name: str, width: int) -> None:
    out[f"{name}/bias"] = (width,)
    out[f"{name}/scale"] = (width,)


def _pool(size: int) -> int:
    """A 2x2 max pool with stride 2 and 'VALID' padding."""
    return size // 2


def _valid_then_pool(h: int, w: int, window: int, kind: str, shape: tuple) -> tuple[int, int]:
    """The size after a 'VALID' ``window`` x ``window`` convolution and a 2x2 max pool."""
    h, w = _pool(h - window + 1), _pool(w - window + 1)
    if h < 1 or w < 1:
        raise ValueError(f"a {kind} model needs larger images than {shape}: its feature maps shrink to nothing.")
    return h, w


def _mlp(out, model, num_classes, shape):
    width = math.prod(shape)
    for i, w in enumerate(model.get("features", (300, 100))):
        width = _dense(out, f"fc{i + 1}", width, w)
    _dense(out, "head", width, num_classes)


def _lenet5(out, model, num_classes, shape):
    (h, w, c), (c1, c2) = shape, model.get("channels", (6, 16))
    h, w = max(h, 32), max(w, 32)  # zero-padded up to 32 x 32
    _conv(out, "conv1", 5, c, c1)
    h, w = _valid_then_pool(h, w, 5, "lenet5", shape)
    _conv(out, "conv2", 5, c1, c2)
    h, w = _valid_then_pool(h, w, 5, "lenet5", shape)
    f1, f2 = model.get("features", (120, 84))
    _dense(out, "head", _dense(out, "fc2", _dense(out, "fc1", h * w * c2, f1), f2), num_classes)


def _caffe_lenet(out, model, num_classes, shape):
    (h, w, c), (c1, c2) = shape, model.get("channels", (20, 50))
    _conv(out, "conv1", 5, c, c1)
    h, w = _valid_then_pool(h, w, 5, "caffe_lenet", shape)
    _conv(out, "conv2", 5, c1, c2)
    h, w = _valid_then_pool(h, w, 5, "caffe_lenet", shape)
    _dense(out, "fc2", _dense(out, "fc1", h * w * c2, model.get("hidden", 500)), num_classes)


def _cnn(out, model, num_classes, shape, hidden=128):
    h, w, c = shape
    for i, width in enumerate(model.get("channels", (32, 64))):
        c = _conv(out, f"conv{i + 1}", 3, c, width)  # 'SAME'
        if model.get("batch_norm", False):
            _norm(out, f"bn{i + 1}", width)
        h, w = _pool(h), _pool(w)
        if h < 1 or w < 1:
            raise ValueError(f"a cnn model with {i + 1} convolutions needs larger images than {shape}: "
                             "its feature maps shrink to nothing.")
    _dense(out, "head", _dense(out, "fc1", h * w * c, model.get("hidden", hidden)), num_classes)


def resnet_stages(model: dict[str, Any]) -> tuple[list, list]:
    """``(blocks, widths)`` of a resnet model table, with :class:`~jaxcompress.models.ResNet`'s defaults.

    Example:
      >>> resnet_stages({"kind": "resnet", "blocks": [1, 1]})
      ([1, 1], [16, 32, 64])
    """
    return list(model.get("blocks", (3, 3, 3))), list(model.get("widths", (16, 32, 64)))


def _resnet(out, model, num_classes, shape):
    blocks, widths = resnet_stages(model)
    c = _conv(out, "stem", 3, shape[-1], widths[0], bias=False)
    _norm(out, "stem_bn", c)
    for s, (n, width) in enumerate(zip(blocks, widths)):
        for b in range(n):
            name = f"stage{s + 1}_block{b}"
            _conv(out, f"{name}/conv1", 3, c, width, bias=False)
            _norm(out, f"{name}/bn1", width)
            _conv(out, f"{name}/conv2", 3, width, width, bias=False)
            _norm(out, f"{name}/bn2", width)
            if b == 0 and s > 0:
                _conv(out, f"{name}/proj", 1, c, width, bias=False)
                _norm(out, f"{name}/proj_bn", width)
            c = width
    _dense(out, "head", c, num_classes)


def _transformer_lm(out, model, num_classes, shape):
    dim = model["dim"]
    out["embed/embedding"] = (BYTE_VOCAB, dim)
    out["pos_embed/embedding"] = (shape[0], dim)
    for i in range(model["depth"]):
        block = f"block_{i}"
        _norm(out, f"{block}/ln1", dim)
        for name in ("query", "key", "value", "out"):
            _dense(out, f"{block}/attn/{name}", dim, dim)
        _norm(out, f"{block}/ln2", dim)
        hidden = model.get("mlp_ratio", 4) * dim
        _dense(out, f"{block}/mlp/fc2", _dense(out, f"{block}/mlp/fc1", dim, hidden), dim)
    _norm(out, "ln_f", dim)
    _dense(out, "head", dim, BYTE_VOCAB)


_LAYOUTS = {
    "mlp": _mlp,
    "lenet5": _lenet5,
    "caffe_lenet": _caffe_lenet,
    "cnn": _cnn,
    "teacher_cnn": lambda out, model, k, shape: _cnn(out, {}, k, shape, hidden=128),
    "student_cnn": lambda out, model, k, shape: _cnn(out, {}, k, shape, hidden=64),
    "resnet": _resnet,
    "transformer_lm": _transformer_lm,
}


def param_shapes(model: dict[str, Any], num_classes: int, input_shape: tuple) -> dict[str, tuple]:
    """``{path: shape}`` of the params of a recipe's model table, in JAX's flattening order.

    Args:
      model: a model table checked by the recipe schema (``kind`` and its settings).
      num_classes: the output width of an image model.
      input_shape: one example's shape: ``(H, W, C)`` for images, ``(seq_len,)`` for text.

    Raises:
      ValueError: images too small for the model's convolutions and pools.

    Returns:
      Every parameter's ``'/'``-joined path and shape (all of them float32), as
      ``jax.eval_shape(build_model(model, ...).init, ...)`` gives them.

    Example:
      >>> param_shapes({"kind": "mlp", "features": [32]}, 10, (28, 28, 1))
      {'fc1/bias': (32,), 'fc1/kernel': (784, 32), 'head/bias': (10,), 'head/kernel': (32, 10)}
      >>> param_shapes({"kind": "caffe_lenet"}, 10, (28, 28, 1))["fc1/kernel"]
      (800, 500)
    """
    out: dict[str, tuple] = {}
    _LAYOUTS[model["kind"]](out, model, num_classes, tuple(input_shape))
    return {k: tuple(out[k]) for k in sorted(out, key=lambda path: path.split("/"))}
