"""CIFAR-style ResNets with basic blocks (He et al. 2016, section 4.2): ResNet-8, -14, -20, ...

A 3x3 stem convolution, three stages of basic blocks (two 3x3 convolutions with BatchNorm, the
input added back), global average pooling and a dense head. The first block of stages 2 and 3
halves the resolution with stride 2 and adds a 1x1 projection (with BatchNorm) to the shortcut.
Whether a block has a projection depends only on its position, never on widths, so a ResNet
with channels removed (:func:`~jaxcompress.export.shrink.shrink`) keeps the same topology.

Parameter names: ``stem``, ``stem_bn``, then ``stage{s}_block{b}/{conv1,bn1,conv2,bn2}`` and,
for the first block of stages 2 and 3, ``stage{s}_block0/{proj,proj_bn}``; finally ``head``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from jaxcompress.core.validation import check_int


class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``.

    Attributes:
      features: output channels (the width of the residual stream).
      inner: channels of ``conv1`` (``None``: ``features``); shrinking changes it alone.
      strides: stride of ``conv1`` and of the projection.
      projection: a 1x1 convolution + BatchNorm on the shortcut.
    """

    features: int
    inner: Optional[int] = None
    strides: int = 1
    projection: bool = False

    @nn.compact
    def __call__(self, x, train: bool = False):
        bn = lambda name: nn.BatchNorm(use_running_average=not train, momentum=0.9, name=name)  # noqa: E731
        inner = self.features if self.inner is None else self.inner
        s = (self.strides, self.strides)
        y = nn.Conv(inner, (3, 3), s, padding="SAME", use_bias=False, name="conv1")(x)
        y = nn.relu(bn("bn1")(y))
        y = nn.Conv(self.features, (3, 3), padding="SAME", use_bias=False, name="conv2")(y)
        y = bn("bn2")(y)
        if self.projection:
            x = nn.Conv(self.features, (1, 1), s, padding="VALID", use_bias=False, name="proj")(x)
            x = bn("proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """A CIFAR ResNet of basic blocks; ``ResNet(blocks=(3, 3, 3))`` is ResNet-20.

    Depth is ``6 * n + 2`` for ``blocks=(n, n, n)``: ``(1, 1, 1)`` is ResNet-8.

    Attributes:
      blocks: basic blocks per stage.
      widths: channels of each stage's residual stream (the stem has ``widths[0]``).
      inner: channels of every block's first convolution, in block order (``None``: the stage
        width); :func:`~jaxcompress.export.shrink.shrink` sets it.
      num_classes: output width.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = ResNet(blocks=(1, 1, 1))
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> model.apply(v, jnp.zeros((2, 32, 32, 3))).shape
      (2, 10)
      >>> sorted(v['params']['stage2_block0'])
      ['bn1', 'bn2', 'conv1', 'conv2', 'proj', 'proj_bn']
    """

    blocks: Sequence[int] = (3, 3, 3)
    widths: Sequence[int] = (16, 32, 64)
    inner: Optional[Sequence[int]] = None
    num_classes: int = 10

    def setup_check(self):
        if len(self.blocks) != len(self.widths):
            raise ValueError(
                f"ResNet: blocks={tuple(self.blocks)} and widths={tuple(self.widths)} need one entry per stage."
            )
        for b in self.blocks:
            check_int("ResNet.blocks entry", b, minimum=1)
        total = sum(self.blocks)
        if self.inner is not None and len(self.inner) != total:
            raise ValueError(f"ResNet.inner needs one width per block ({total}), got {tuple(self.inner)}.")

    @nn.compact
    def __call__(self, x, train: bool = False):
        self.setup_check()
        x = nn.Conv(self.widths[0], (3, 3), padding="SAME", use_bias=False, name="stem")(x)
        x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, name="stem_bn")(x))
        i = 0
        for s, (n, w) in enumerate(zip(self.blocks, self.widths)):
            for b in range(n):
                first = b == 0 and s > 0
                x = BasicBlock(
                    w,
                    inner=None if self.inner is None else self.inner[i],
                    strides=2 if first else 1,
                    projection=first,
                    name=f"stage{s + 1}_block{b}",
                )(x, train)
                i += 1
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes, name="head")(x)
