"""Convolutional models: LeNet-5, Caffe's LeNet and the teacher/student CNN pair."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp


def _pad_to(x, size: int):
    """Zero-pads NHWC images symmetrically up to ``size`` x ``size`` (no-op when larger)."""
    h, w = x.shape[1], x.shape[2]
    ph, pw = max(size - h, 0), max(size - w, 0)
    if ph == 0 and pw == 0:
        return x
    return jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))


class LeNet5(nn.Module):
    """LeNet-5 (LeCun et al. 1998) with ReLU and max pooling.

    Inputs smaller than 32x32 are zero-padded to 32x32, as the original did for MNIST, so the
    flattened feature size is 5*5*16 = 400 for both 28x28x1 and 32x32x3 inputs.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> for shape in [(1, 28, 28, 1), (1, 32, 32, 3)]:
      ...     v = LeNet5().init(jax.random.key(0), jnp.zeros(shape))
      ...     print(v['params']['fc1']['kernel'].shape)
      (400, 120)
      (400, 120)

    Attributes:
      num_classes: output width.
      channels: the two convolutions' widths (6, 16 in the original).
      features: the two hidden dense layers' widths (120, 84 in the original).
    """

    num_classes: int = 10
    channels: tuple[int, int] = (6, 16)
    features: tuple[int, int] = (120, 84)

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = _pad_to(x, 32)
        x = nn.max_pool(nn.relu(nn.Conv(self.channels[0], (5, 5), padding="VALID", name="conv1")(x)), (2, 2), (2, 2))
        x = nn.max_pool(nn.relu(nn.Conv(self.channels[1], (5, 5), padding="VALID", name="conv2")(x)), (2, 2), (2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.features[0], name="fc1")(x))
        x = nn.relu(nn.Dense(self.features[1], name="fc2")(x))
        return nn.Dense(self.num_classes, name="head")(x)


class CaffeLeNet(nn.Module):
    """Caffe's MNIST ``lenet`` example, the LeNet-5 of Han et al. (2015, 2016).

    conv 5x5 ``channels[0]`` -> max pool -> conv 5x5 ``channels[1]`` -> max pool -> dense
    ``hidden`` -> ReLU -> classes, with 'VALID' convolutions and no ReLU after them; 431,080
    parameters with the defaults on 28x28x1 images (1,724,320 float32 bytes: the papers' 1720 KB),
    against the 61,706 of :class:`LeNet5` (LeCun et al. 1998).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = CaffeLeNet().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> sum(x.size for x in jax.tree.leaves(v))
      431080

    Attributes:
      num_classes: output width.
      channels: the two convolutions' widths (20, 50 in Caffe's example).
      hidden: the hidden dense layer's width (500).
    """

    num_classes: int = 10
    channels: tuple[int, int] = (20, 50)
    hidden: int = 500

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.max_pool(nn.Conv(self.channels[0], (5, 5), padding="VALID", name="conv1")(x), (2, 2), (2, 2))
        x = nn.max_pool(nn.Conv(self.channels[1], (5, 5), padding="VALID", name="conv2")(x), (2, 2), (2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, name="fc2")(x)


class CNN(nn.Module):
    """Two 3x3 conv layers with max pooling and a dense head.

    ``CNN(hidden=128)`` is the teacher and ``CNN(hidden=64)`` the student of the classic
    compression tutorial: conv 32 -> pool -> conv 64 -> pool -> dense ``hidden`` -> classes, with
    'SAME' convolutions, so a 28x28x1 input flattens to 7*7*64 and a 32x32x3 input to 8*8*64.

    Attributes:
      channels: the two convolutions' widths.
      hidden: width of the dense layer.
      num_classes: output width.
      batch_norm: BatchNorm after each convolution (running statistics in ``'batch_stats'``).
      axis_name: under ``jax.pmap``, the mapped axis over which BatchNorm averages its batch
        statistics, so every device normalises with the global batch's mean and variance (as one
        device or sharded ``jax.jit`` does); ``None`` (default) outside ``pmap``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = CNN().init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
      >>> v['params']['fc1']['kernel'].shape
      (4096, 128)
    """

    channels: tuple[int, int] = (32, 64)
    hidden: int = 128
    num_classes: int = 10
    batch_norm: bool = False
    axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        for i, c in enumerate(self.channels):
            x = nn.Conv(c, (3, 3), padding="SAME", name=f"conv{i + 1}")(x)
            if self.batch_norm:
                x = nn.BatchNorm(
                    use_running_average=not train, momentum=0.9, axis_name=self.axis_name, name=f"bn{i + 1}"
                )(x)
            x = nn.max_pool(nn.relu(x), (2, 2), (2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(self.hidden, name="fc1")(x))
        return nn.Dense(self.num_classes, name="head")(x)


def teacher_cnn(num_classes: int = 10) -> CNN:
    """The tutorial's teacher: conv 32, conv 64, dense 128."""
    return CNN(hidden=128, num_classes=num_classes)


def student_cnn(num_classes: int = 10) -> CNN:
    """The tutorial's student: conv 32, conv 64, dense 64."""
    return CNN(hidden=64, num_classes=num_classes)
