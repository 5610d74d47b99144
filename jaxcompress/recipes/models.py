"""The models a recipe names, built from its ``[model]`` table."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from jaxcompress.models import CNN, MLP, CaffeLeNet, LeNet5, ResNet, student_cnn, teacher_cnn


def build_model(model: dict[str, Any], num_classes: int) -> nn.Module:
    """The Flax module of a recipe's model table (already validated by the recipe schema).

    Example:
      >>> build_model({"kind": "mlp", "features": [32]}, 10).features
      (32,)
    """
    kind = model["kind"]
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "kind"}
    if kind == "teacher_cnn":
        return teacher_cnn(num_classes)
    if kind == "student_cnn":
        return student_cnn(num_classes)
    cls = {"mlp": MLP, "lenet5": LeNet5, "caffe_lenet": CaffeLeNet, "cnn": CNN, "resnet": ResNet}[kind]
    return cls(num_classes=num_classes, **kwargs)
