"""Per-input-channel scales that make a layer easier to quantize: SmoothQuant and AWQ.

Both return ``s`` (one positive value per input channel of a group of layers reading the same
input); :func:`~jaxcompress.oneshot.folds.fold_scales` then multiplies the kernels' rows by
``s`` and divides the producer of the input by it, so the float model is unchanged.

* SmoothQuant (Xiao et al. 2023, Eq. 4): ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``,
  moving activation outliers into the weights for W8A8 (``alpha`` is the migration strength,
  0.5 in the paper; ``max|W_j|`` over every output of every layer of the group).
* AWQ (Lin et al. 2024, Sec. 3.2-3.3): ``s = mean|X|^r`` normalised by
  ``sqrt(max(s) min(s))``, with ``r`` searched on a grid of ``n_grid`` points in ``[0, 1)`` to
  minimise the output error ``sum_layers ||X W - (X / s) Q(diag(s) W)||^2`` of weight-only
  quantization ``Q``. The error is computed exactly from ``X^T X`` (``tr(D^T X^T X D)`` with
  ``D = W - Q(diag(s) W) / s``), so the search needs no second pass over the data. ``r = 0`` is
  plain round-to-nearest, so the chosen scales never do worse on the calibration data. The paper
  measures the error at the output of the whole block; this measures it at each layer's output
  (summed over the layers sharing the input), as its weight-only loss is defined.
* AWQ's weight clipping (the reference implementation's ``auto_clip``): after scaling, each
  group's range is shrunk to ``max|w| * (1 - i / n_grid)`` for ``i < max_shrink * n_grid``,
  choosing per group and output the shrink with the least error ``d^T X_g^T X_g d`` on the
  group's own inputs (:func:`awq_clip`); no shrink is one of the candidates.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_fraction, check_int

_TINY = 1e-5


def smoothquant_scales(max_abs_x: jax.Array, kernels: Sequence[jax.Array], alpha: float = 0.5) -> jax.Array:
    """SmoothQuant's ``s_j = max|X_j|^alpha / max_k |W_jk|^(1 - alpha)`` for one group of Dense kernels.

    Args:
      max_abs_x: ``(in,)`` per-channel max of ``|x|`` over the calibration tokens.
      kernels: the ``(in, out)`` kernels reading that input (query, key and value together).
      alpha: migration strength in ``[0, 1]``.

    Returns:
      ``(in,)`` float32, positive; ``1`` for a channel whose input or weights are all zero.

    Example:
      >>> import jax.numpy as jnp
      >>> smoothquant_scales(jnp.array([4.0, 1.0]), [jnp.array([[1.0, 0.5], [1.0, -4.0]])]).tolist()
      [2.0, 0.5]
    """
    alpha = check_fraction("alpha", alpha, allow_one=True)
    if not kernels:
        raise ValueError("kernels is empty; give the kernels of the layers that read this input.")
    x = jnp.asarray(max_abs_x, jnp.float32)
    w = jnp.max(jnp.stack([jnp.max(jnp.abs(jnp.asarray(k, jnp.float32)), axis=1) for k in kernels]), axis=0)
    if w.shape != x.shape:
        raise ValueError(f"max_abs_x has shape {x.shape} but the kernels have {w.shape[0]} inputs.")
    live = (x > 0) & (w > 0)
    s = jnp.where(live, jnp.maximum(x, _TINY) ** alpha / jnp.maximum(w, _TINY) ** (1.0 - alpha), 1.0)
    return jnp.maximum(s, _TINY)


class AWQSearch(NamedTuple):
    """What :func:`awq_scales` found.

    Attributes:
      scale: ``(in,)`` the chosen ``s``.
      ratio: the chosen exponent ``r``.
      losses: ``(n_grid,)`` the output error at each ``r`` of ``arange(n_grid) / n_grid``.
    """

    scale: jax.Array
    ratio: jax.Array
    losses: jax.Array


def awq_scales(
    kernels: Sequence[jax.Array],
    mean_abs_x: jax.Array,
    xtx: jax.Array,
    quantize: Callable[[jax.Array], jax.Array],
    *,
    n_grid: int = 20,
) -> AWQSearch:
    """AWQ's activation-aware scale search for one group of Dense kernels sharing an input.

    Args:
      kernels: the ``(in, out)`` kernels reading the input.
      mean_abs_x: ``(in,)`` mean ``|x|`` per channel over the calibration tokens.
      xtx: ``(in, in)`` ``X^T X`` over the same tokens.
      quantize: the weight quantizer, ``w -> fake-quantized w`` (e.g.
        ``functools.partial(fake_quant, bits=4, group_size=128, symmetric=False)``).
      n_grid: points of the ratio grid ``0, 1/n, ..., (n-1)/n`` (the paper's 20).

    Returns:
      :class:`AWQSearch`.

    Example:
      >>> import functools, numpy as np, jax.numpy as jnp
      >>> from jaxcompress.quant.affine import fake_quant
      >>> rng = np.random.default_rng(0)
      >>> x = rng.normal(size=(512, 8)) * np.array([8, 1, 1, 1, 1, 1, 1, 1])
      >>> w = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
      >>> q = functools.partial(fake_quant, bits=3, channel_axis=-1, symmetric=False)
      >>> r = awq_scales([w], jnp.mean(jnp.abs(x), 0), jnp.asarray(x.T @ x, jnp.float32), q)
      >>> bool(r.losses[int(r.ratio * 20)] <= r.losses[0])
      True
    """
    n_grid = check_int("n_grid", n_grid, minimum=1)
    if not kernels:
        raise ValueError("kernels is empty; give the kernels of the layers that read this input.")
    kernels = tuple(jnp.asarray(k, jnp.float32) for k in kernels)
    mean_abs_x = jnp.asarray(mean_abs_x, jnp.float32)
    xtx = jnp.asarray(xtx, jnp.float32)
    width = kernels[0].shape[0]
    if any(k.ndim != 2 or k.shape[0] != width for k in kernels) or mean_abs_x.shape != (width,) \
            or xtx.shape != (width, width):
        raise ValueError(
            f"awq_scales needs (in, out) kernels with one input width and mean_abs_x (in,), xtx (in, in); got "
            f"kernels {[k.shape for k in kernels]}, mean_abs_x {mean_abs_x.shape}, xtx {xtx.shape}."
        )
    return _search(kernels, mean_abs_x, xtx, quantize, n_grid)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _search(kernels, mean_abs_x, xtx, quantize, n_grid):
    ratios = jnp.arange(n_grid, dtype=jnp.float32) / n_grid

    def scale_at(r):
        s = jnp.maximum(mean_abs_x**r, 1e-4)
        return s / jnp.sqrt(jnp.max(s) * jnp.min(s))

    def loss(r):
        s = scale_at(r)[:, None]
        total = jnp.zeros((), jnp.float32)
        for w in kernels:
            d = w - quantize(w * s) / s
            total = total + jnp.sum(d * jnp.dot(xtx, d, precision=jax.lax.Precision.HIGHEST))
        return total

    losses = jax.lax.map(loss, ratios)
    best = jnp.argmin(losses)
    return AWQSearch(scale_at(ratios[best]), ratios[best], losses)


@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _clip(kernel, xtx, quantize, group_size, n_grid, max_shrink):
    n_in, n_out = kernel.shape
    gs = group_size or n_in
    groups = n_in // gs
    blocks = jnp.stack([jax.lax.dynamic_slice(xtx, (g * gs, g * gs), (gs, gs)) for g in range(groups)])
    amax = jnp.max(jnp.abs(kernel.reshape(groups, gs, n_out)), axis=1, keepdims=True)
    shrinks = 1.0 - jnp.arange(max(int(max_shrink * n_grid), 1), dtype=jnp.float32) / n_grid

    def error(r):
        lim = jnp.repeat(amax * r, gs, axis=1).reshape(n_in, n_out)
        d = (kernel - quantize(jnp.clip(kernel, -lim, lim))).reshape(groups, gs, n_out)
        return jnp.einsum("gso,gst,gto->go", d, blocks, d, precision=jax.lax.Precision.HIGHEST)

    errors = jax.lax.map(error, shrinks)  # (shrinks, groups, out)
    best = shrinks[jnp.argmin(errors, axis=0)]  # (groups, out)
    lim = jnp.repeat(amax[:, 0, :] * best, gs, axis=0)
    return jnp.clip(kernel, -lim, lim), best


def awq_clip(kernel, xtx, quantize: Callable[[jax.Array], jax.Array], *, group_size=None, n_grid: int = 20,
             max_shrink: float = 0.5):
    """AWQ's clipping search: the kernel with each group's range shrunk where that lowers its output error.

    Args:
      kernel: ``(in, out)`` float kernel (already scaled, if AWQ scaled it).
      xtx: ``(in, in)`` ``X^T X`` of the kernel's inputs (only the diagonal blocks of the groups
        are used: each group's error on its own inputs, as the reference implementation).
      quantize: the weight quantizer (as for :func:`awq_scales`).
      group_size: inputs per group of ``quantize``'s grid, or ``None`` for one per output channel.
      n_grid, max_shrink: candidates ``1 - i / n_grid`` for ``i < max_shrink * n_grid``.

    Returns:
      ``(clipped kernel, chosen shrink per (group, out))``.

    Example:
      >>> import functools, numpy as np, jax.numpy as jnp
      >>> from jaxcompress.quant.affine import fake_quant
      >>> w = jnp.asarray(np.r_[np.linspace(-1, 1, 15), [9.0]].reshape(16, 1), jnp.float32)
      >>> x = np.random.default_rng(0).normal(size=(256, 16))
      >>> q = functools.partial(fake_quant, bits=3, channel_axis=-1, symmetric=False)
      >>> clipped, shrink = awq_clip(w, jnp.asarray(x.T @ x, jnp.float32), q)
      >>> float(shrink[0, 0]) < 1.0, float(clipped.max()) < 9.0
      (True, True)
    """
    kernel = jnp.asarray(kernel, jnp.float32)
    if kernel.ndim != 2 or jnp.shape(xtx) != (kernel.shape[0],) * 2:
        raise ValueError(f"awq_clip needs an (in, out) kernel and xtx (in, in), got {kernel.shape} and {jnp.shape(xtx)}.")
    if group_size is not None and kernel.shape[0] % check_int("group_size", group_size, minimum=1):
        raise ValueError(f"group_size={group_size} must divide the kernel's {kernel.shape[0]} inputs.")
    max_shrink = check_fraction("max_shrink", max_shrink)
    return _clip(kernel, jnp.asarray(xtx, jnp.float32), quantize, group_size, check_int("n_grid", n_grid, minimum=1),
                 max_shrink)
