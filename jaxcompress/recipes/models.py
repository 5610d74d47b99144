"""The models and one-shot methods a recipe names, built from its tables."""
from __future__ import annotations

import re
from typing import Any

import flax.linen as nn

from jaxcompress.models import CNN, MLP, CaffeLeNet, LeNet5, ResNet, TransformerLM, student_cnn, teacher_cnn
from jaxcompress.recipes.layouts import BYTE_VOCAB


def build_model(model: dict[str, Any], num_classes: int, seq_len: int | None = None) -> nn.Module:
    """The Flax module of a recipe's model table (already validated by the recipe schema).

    ``seq_len``: the longest sequence of a text model (the data table's ``seq_len``).

    Example:
      >>> build_model({"kind": "mlp", "features": [32]}, 10).features
      (32,)
      >>> build_model({"kind": "transformer_lm", "dim": 32, "depth": 1, "heads": 2}, 256, seq_len=64).max_len
      64
    """
    kind = model["kind"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "kind"}
    if kind == "teacher_cnn":
        return teacher_cnn(num_classes)
    if kind == "student_cnn":
        return student_cnn(num_classes)
    if kind == "transformer_lm":
        return TransformerLM(vocab_size=BYTE_VOCAB, max_len=seq_len, **kwargs)
    cls = {"mlp": MLP, "lenet5": LeNet5, "caffe_lenet": CaffeLeNet, "cnn": CNN, "resnet": ResNet}[kind]
    return cls(num_classes=num_classes, **kwargs)


def _structure(value: Any):
    from jaxcompress.prune.structures import NM, Unstructured

    if value == "unstructured":
        return Unstructured()
    m = re.fullmatch(r"(\d+):(\d+)", value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"structure must be 'unstructured' or 'N:M' such as '2:4', got {value!r}.")
    return NM(int(m.group(1)), int(m.group(2)))


def build_methods(specs: list[dict], model: dict[str, Any]) -> list:
    """The one-shot pipeline of an ``oneshot`` stage: one method object per ``{ method = NAME, ... }`` table.

    The other keys of a table are the method's settings (``structure`` as ``'unstructured'`` or
    ``'N:M'``); ``rotation``'s ``head_dim`` defaults to the Transformer's ``dim / heads``.

    Raises:
      ValueError / TypeError: from the method, naming the bad setting, or from
        :func:`~jaxcompress.oneshot.split_pipeline` for methods in an order it does not run.

    Example:
      >>> [m] = build_methods([{"method": "sparsegpt", "sparsity": 0.5, "structure": "2:4"}], {"kind": "mlp"})
      >>> type(m).__name__, m.sparsity, (m.structure.n, m.structure.m)
      ('SparseGPT', 0.5, (2, 4))
    """
    import dataclasses

    from jaxcompress.oneshot import AWQ, GPTQ, RTN, Rotation, SmoothQuant, SparseGPT, Wanda, split_pipeline

    classes = {"wanda": Wanda, "sparsegpt": SparseGPT, "gptq": GPTQ, "rtn": RTN, "smoothquant": SmoothQuant,
               "awq": AWQ, "rotation": Rotation}
    out = []
    for spec in specs:
        cls = classes[spec["method"]]
        settings = {k: v for k, v in spec.items() if k != "method"}
        fields = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in settings if k not in fields]
        if unknown:
            raise ValueError(f"{spec['method']} has no setting {unknown[0]!r}; its settings are {fields}.")
        if "structure" in settings:
            settings["structure"] = _structure(settings["structure"])
        if cls is Rotation and "head_dim" not in settings and model.get("kind") == "transformer_lm":
            settings["head_dim"] = model["dim"] // model["heads"]
        out.append(cls(**settings))
    split_pipeline(out)
    return out
