"""Range observers for post-training calibration: min/max, moving average, percentile, MSE.

Ranges are taken over the finite values (a NaN or inf input does not move them).
An :class:`Observer` is three pure functions: ``summarize(x)`` runs inside jit on one batch of a
layer's input and returns a small tuple of arrays; ``combine(acc, summary)`` folds batches on the
host; ``range(acc)`` gives the final ``(min, max)``. :func:`~jaxcompress.quant.activations.
calibrate_activations` drives them over N batches.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.finite import finite_min_max
from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.quant.affine import affine_qparams, fake_quant_affine


class Observer(NamedTuple):
    """A calibration statistic.

    Attributes:
      summarize: ``x -> tuple of arrays`` for one batch (jit-compatible).
      combine: ``(acc, summary) -> acc`` over batches (host, NumPy).
      range: ``acc -> (min, max)``.
    """

    summarize: Callable
    combine: Callable
    range: Callable


def minmax() -> Observer:
    """The min and max over all batches (PyTorch's ``MinMaxObserver``).

    Example:
      >>> import numpy as np
      >>> o = minmax()
      >>> acc = o.combine(o.summarize(np.array([0.0, 2.0])), o.summarize(np.array([-1.0, 1.0])))
      >>> [float(v) for v in o.range(acc)]
      [-1.0, 2.0]
    """
    return Observer(
        summarize=lambda x: finite_min_max(jnp.asarray(x)),
        combine=lambda a, b: (np.minimum(a[0], b[0]), np.maximum(a[1], b[1])),
        range=lambda a: (a[0], a[1]),
    )


def moving_average_minmax(momentum: float = 0.9) -> Observer:
    """Exponential moving average of per-batch min and max (``MovingAverageMinMaxObserver``,
    whose ``averaging_constant`` is ``1 - momentum``); the first batch initialises it.

    Example:
      >>> import numpy as np
      >>> o = moving_average_minmax(0.5)
      >>> acc = o.combine(o.summarize(np.array([0.0, 2.0])), o.summarize(np.array([-2.0, 4.0])))
      >>> [float(v) for v in o.range(acc)]
      [-1.0, 3.0]
    """
    m = check_fraction("momentum", momentum)
    return Observer(
        summarize=lambda x: finite_min_max(jnp.asarray(x)),
        combine=lambda a, b: (m * a[0] + (1 - m) * b[0], m * a[1] + (1 - m) * b[1]),
        range=lambda a: (a[0], a[1]),
    )


def percentile(q: float = 99.99) -> Observer:
    """The ``(100 - q)``-th and ``q``-th percentiles of each batch, averaged over batches.

    Example:
      >>> import numpy as np
      >>> o = percentile(90.0)
      >>> [round(float(v), 3) for v in o.range(o.summarize(np.arange(11.0)))]
      [1.0, 9.0]
    """
    q = check_positive("q", q)
    if not 50.0 < q <= 100.0:
        raise ValueError(f"q must be in (50, 100], got {q}; e.g. q=99.99 clips the top 0.01%.")
    return Observer(
        summarize=lambda x: (jnp.percentile(x, 100.0 - q), jnp.percentile(x, q), jnp.float32(1.0)),
        combine=lambda a, b: tuple(np.add(u, v) for u, v in zip(a, b)),
        range=lambda a: (a[0] / a[2], a[1] / a[2]),
    )


def mse(bits: int = 8, *, symmetric: bool = False, grid: int = 64) -> Observer:
    """The clipping range ``alpha * [min, max]`` (``alpha`` on a grid in ``(0, 1]``) that minimises
    the mean squared quantization error of each batch, averaged over batches.

    Example:
      >>> import numpy as np
      >>> x = np.concatenate([np.linspace(-1, 1, 1000), [40.0]]).astype(np.float32)
      >>> lo, hi = mse(4).range(mse(4).summarize(x))
      >>> bool(float(hi) < 40.0)  # the outlier is clipped
      True
    """
    bits = check_int("bits", bits, minimum=2, maximum=8)
    grid = check_int("grid", grid, minimum=1)
    alphas = jnp.linspace(1.0 / grid, 1.0, grid)

    def summarize(x):
        x = jnp.asarray(x, jnp.float32).ravel()
        lo, hi = jnp.min(x), jnp.max(x)

        def err(a):
            scale, zp, qmin, qmax = affine_qparams(a * lo, a * hi, bits, symmetric=symmetric)
            return jnp.mean((fake_quant_affine(x, scale, zp, qmin, qmax) - x) ** 2)

        errs = jax.vmap(err)(alphas)
        best = alphas[jnp.argmin(errs)]
        return best * lo, best * hi, jnp.float32(1.0)

    return Observer(
        summarize=summarize,
        combine=lambda a, b: tuple(np.add(u, v) for u, v in zip(a, b)),
        range=lambda a: (a[0] / a[2], a[1] / a[2]),
    )
