"""Multi-layer perceptrons (LeNet-300-100 by default)."""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
    """A ReLU MLP on flattened inputs; ``MLP()`` is LeNet-300-100.

    Attributes:
      features: hidden widths, e.g. ``(300, 100)`` (LeNet-300-100) or ``(1200, 1200)``.
      num_classes: output width.
      dropout_rate: dropout after each hidden layer (active when ``train=True``; needs a
        ``'dropout'`` rng).

    Layers are named ``fc1, fc2, ...`` and ``head``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = MLP().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> [v['params'][k]['kernel'].shape for k in ('fc1', 'fc2', 'head')]
      [(784, 300), (300, 100), (100, 10)]
    """

    features: Sequence[int] = (300, 100)
    num_classes: int = 10
    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = jnp.reshape(x, (x.shape[0], -1))
        for i, width in enumerate(self.features):
            x = nn.relu(nn.Dense(width, name=f"fc{i + 1}")(x))
            if self.dropout_rate > 0:
                x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
        return nn.Dense(self.num_classes, name="head")(x)
