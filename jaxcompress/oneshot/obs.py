"""SparseGPT and GPTQ on one linear layer: column-by-column OBS updates through the inverse Hessian.

Both methods minimise the layer's reconstruction error ``||W X - W' X||^2`` over calibration
inputs ``X`` one input column at a time (Optimal Brain Surgeon): when column ``j`` is pruned or
quantized, its error ``(w - q) / [U]_jj`` is spread over the columns not yet processed through
row ``j`` of ``U``, the upper Cholesky factor of ``H^-1`` with ``H = 2 X^T X + damp * I``
(``damp = percdamp * mean(diag H)``). Updates are applied lazily: inside a block of ``blocksize``
columns immediately, to the columns after the block in one matrix product when the block ends.

* SparseGPT (Frantar & Alistarh 2023, Algorithm 1): at the start of each block the ``sparsity``
  fraction of its weights with the lowest ``w^2 / [U]_jj^2`` is pruned (adaptive mask selection,
  across all rows of the block); for N:M, every ``m`` columns the ``m - n`` lowest of each row's
  group. With ``bits`` each kept weight is also quantized as its column is processed.
* GPTQ (Frantar et al. 2022, Algorithm 1): every column is quantized; per-group grids are chosen
  from the current (already updated) weights when a group starts. With ``act_order`` columns are
  processed by descending ``diag(H)``; groups then keep their original contiguous columns and
  their grids come from the weights before any update (GPTQ's "static groups"), so the result
  is described by ordinary per-group scales.

The functions take the Flax kernel layout ``(in, out)`` and ``xtx = X^T X`` summed over tokens
(what :func:`~jaxcompress.oneshot.calibration.calibrate_layers` collects); internally they work on
``W = kernel.T`` as the papers do. They run in the kernel's float dtype (float32, or float64
when JAX's x64 mode is on) and are jitted.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.oneshot.grid import Grid
from jaxcompress.prune.structures import NM, Unstructured
from jaxcompress.quant.affine import fake_quant_affine, quant_range, tensor_qparams


class LayerResult(NamedTuple):
    """What a one-shot method made of one kernel.

    Attributes:
      kernel: the new kernel ``(in, out)``: pruned entries 0, quantized entries on ``grid``.
      mask: bool keep-mask like the kernel, or ``None`` (nothing pruned).
      grid: the :class:`~jaxcompress.oneshot.grid.Grid` the kernel is on, or ``None`` (float).
      loss: the OBS estimate of the added reconstruction error, ``sum (w - q)^2 / (2 [U]_jj^2)``
        (for ``H = 2 X^T X`` without damping it is ``||W X - W' X||^2 / 2`` column by column), or
        ``None`` for methods without one.
    """

    kernel: jax.Array
    mask: Optional[jax.Array]
    grid: Optional[Grid]
    loss: Optional[jax.Array]


def _inverse_cholesky(h):
    """Upper Cholesky factor ``U`` of ``h^-1`` (``h^-1 = U^T U``), as ``torch.linalg.cholesky(.., upper=True)``."""
    lower = jnp.linalg.cholesky(h)
    inv = jax.scipy.linalg.cho_solve((lower, True), jnp.eye(h.shape[0], dtype=h.dtype))
    return jnp.linalg.cholesky(inv).T


def _prune_lowest(scores, count):
    """Bool mask of the ``count`` lowest scores (flat order; ties: earlier first)."""
    order = jnp.argsort(scores.ravel(), stable=True)
    return jnp.zeros(scores.size, bool).at[order[:count]].set(True).reshape(scores.shape)


@functools.partial(
    jax.jit,
    static_argnames=("sparsity", "nm", "bits", "symmetric", "narrow", "group_size", "act_order", "blocksize", "percdamp"),
)
def _obs(kernel, xtx, *, sparsity, nm, bits, symmetric, narrow, group_size, act_order, blocksize, percdamp):
    dtype = jnp.result_type(kernel.dtype, jnp.float32)
    w = kernel.T.astype(dtype)
    rows, cols = w.shape
    h = 2.0 * xtx.astype(dtype)
    diag = jnp.diagonal(h)
    dead = diag == 0
    h = h + jnp.diag(dead.astype(dtype))  # an input that is always 0: H_jj = 1, its weights 0
    w = jnp.where(dead[None, :], 0.0, w)
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diagonal(h), stable=True)
        w0 = w
        w, h = w[:, perm], h[perm][:, perm]
    h = h + percdamp * jnp.mean(jnp.diagonal(h)) * jnp.eye(cols, dtype=dtype)
    u = _inverse_cholesky(h)

    quant = bits is not None
    qmin, qmax = quant_range(bits, signed=symmetric, narrow=narrow and symmetric) if quant else (0, 0)
    grid_kw = dict(symmetric=symmetric, narrow=narrow)
    n_groups = cols // group_size if group_size else 1
    scales = jnp.ones((n_groups, rows), jnp.float32)
    zeros = jnp.zeros((n_groups, rows), jnp.float32)
    if quant and act_order and group_size:
        # Static groups: grids of the original contiguous groups, from the unchanged weights.
        qp = tensor_qparams(w0, bits, group_size=group_size, group_axis=1, **grid_kw)
        scales, zeros = qp.scale.T, qp.zero_point.T
        col_group = perm // group_size
    elif quant and not group_size:
        qp = tensor_qparams(w, bits, channel_axis=0, **grid_kw)
        scales, zeros = qp.scale.T, qp.zero_point.T
        col_group = jnp.zeros(cols, jnp.int32)
    else:
        col_group = jnp.arange(cols) // (group_size or cols)

    def block(i1, count, state):
        """Columns ``i1 .. i1 + count`` (``i1`` may be traced), then the lazy update of the rest."""
        w, keep, loss, scales, zeros = state
        w1 = jax.lax.dynamic_slice(w, (0, i1), (rows, count))
        u1 = jax.lax.dynamic_slice(u, (i1, i1), (count, count))
        d = jnp.diagonal(u1)
        if sparsity and nm is None:
            prune1 = _prune_lowest(w1**2 / d[None, :] ** 2, round(sparsity * rows * count))
        else:
            prune1 = jnp.zeros((rows, count), bool)

        def column(i, carry):
            w1, prune1, q1, err1, loss, scales, zeros = carry
            col = i1 + i
            if nm is not None:
                n, m = nm
                cand = jax.lax.dynamic_slice(w1, (0, i), (rows, m)) ** 2 / jax.lax.dynamic_slice(d, (i,), (m,)) ** 2
                order = jnp.argsort(cand, axis=1, stable=True)  # the m - n lowest of each row are pruned
                group = jnp.zeros((rows, m), bool).at[jnp.arange(rows)[:, None], order[:, : m - n]].set(True)
                prune1 = jnp.where(i % m == 0, jax.lax.dynamic_update_slice(prune1, group, (0, i)), prune1)
            if quant and group_size and not act_order:

                def new_grid(s_z):
                    qp = tensor_qparams(jax.lax.dynamic_slice(w1, (0, i), (rows, group_size)), bits, channel_axis=0, **grid_kw)
                    return s_z[0].at[col // group_size].set(qp.scale[:, 0]), s_z[1].at[col // group_size].set(qp.zero_point[:, 0])

                scales, zeros = jax.lax.cond(col % group_size == 0, new_grid, lambda s_z: s_z, (scales, zeros))
            wc = w1[:, i]
            q = jnp.where(prune1[:, i], 0.0, wc)
            if quant:
                g = col_group[col]
                q = fake_quant_affine(q, scales[g], zeros[g], qmin, qmax)
            err = (wc - q) / d[i]
            loss = loss + jnp.sum((wc - q) ** 2) / d[i] ** 2 / 2
            w1 = w1 - err[:, None] * u1[i][None, :]  # u1 is upper triangular: columns < i are unchanged
            return w1, prune1, q1.at[:, i].set(q), err1.at[:, i].set(err), loss, scales, zeros

        init = (w1, prune1, jnp.zeros_like(w1), jnp.zeros_like(w1), loss, scales, zeros)
        _, prune1, q1, err1, loss, scales, zeros = jax.lax.fori_loop(0, count, column, init)
        w = jax.lax.dynamic_update_slice(w, q1, (0, i1))
        later = jnp.arange(cols) >= i1 + count
        w = jnp.where(later[None, :], w - err1 @ jax.lax.dynamic_slice(u, (i1, 0), (count, cols)), w)
        keep = jax.lax.dynamic_update_slice(keep, ~prune1, (0, i1))
        return w, keep, loss, scales, zeros

    # Whole blocks in one loop (compiled once), the remainder after it.
    state = (w, jnp.ones((rows, cols), bool), jnp.zeros((), dtype), scales, zeros)
    full, rest = divmod(cols, blocksize)
    if full:
        state = jax.lax.fori_loop(0, full, lambda b, st: block(b * blocksize, blocksize, st), state)
    if rest:
        state = block(full * blocksize, rest, state)
    w, keep, loss, scales, zeros = state
    if act_order:
        inv = jnp.argsort(perm)
        w, keep = w[:, inv], keep[:, inv]
    return w.T.astype(kernel.dtype), keep.T, scales, zeros, loss


def _check_common(kernel, xtx, blocksize, percdamp):
    kernel, xtx = jnp.asarray(kernel), jnp.asarray(xtx)
    if kernel.ndim != 2 or not jnp.issubdtype(kernel.dtype, jnp.floating):
        raise ValueError(f"kernel must be a 2-D float Dense kernel (in, out), got {kernel.dtype} {kernel.shape}.")
    if xtx.shape != (kernel.shape[0],) * 2:
        raise ValueError(
            f"xtx must be X^T X of the layer's inputs, shape {(kernel.shape[0],) * 2} for a kernel of shape "
            f"{kernel.shape}, got {xtx.shape}."
        )
    return kernel, xtx, check_int("blocksize", blocksize, minimum=1), check_positive("percdamp", percdamp)


def _check_grid(bits, group_size, columns, blocksize, symmetric, narrow):
    if bits is None:
        return None, None
    bits = check_int("bits", bits, minimum=2, maximum=8)
    if not isinstance(symmetric, bool) or not isinstance(narrow, bool):
        raise TypeError(f"symmetric and narrow must be bools, got {symmetric!r} and {narrow!r}.")
    if group_size is not None:
        group_size = check_int("group_size", group_size, minimum=1)
        if columns % group_size or blocksize % group_size:
            raise ValueError(
                f"group_size={group_size} must divide the kernel's {columns} inputs and blocksize={blocksize}; "
                f"choose a common divisor (e.g. 128 or 32) or set blocksize to a multiple of group_size."
            )
    return bits, group_size


def _result(kernel, keep, scales, zeros, loss, *, pruned, bits, symmetric, narrow, group_size):
    grid = None
    if bits is not None:
        grid = Grid(scale=scales if group_size else scales.reshape(1, -1),
                    zero_point=zeros if group_size else zeros.reshape(1, -1),
                    bits=bits, symmetric=symmetric, narrow=narrow, group_size=group_size)
    return LayerResult(kernel, keep if pruned else None, grid, loss)


def sparsegpt(
    kernel,
    xtx,
    sparsity: float = 0.5,
    *,
    structure=Unstructured(),
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    symmetric: bool = False,
    narrow: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> LayerResult:
    """SparseGPT on one Dense kernel: prune (and optionally quantize) with OBS error compensation.

    Args:
      kernel: float ``(in, out)`` kernel.
      xtx: ``X^T X`` of the layer's inputs ``X`` (tokens, in), summed over calibration tokens.
      sparsity: fraction pruned in each block of ``blocksize`` inputs (all output rows together),
        ``round(sparsity * out * block)`` weights; ignored for N:M.
      structure: ``Unstructured()`` or ``NM(n, m)`` (``n`` of every ``m`` consecutive inputs kept
        per output; ``axis`` must be ``-2``, the input axis).
      bits: quantize kept weights jointly to this many bits (``2..8``), or ``None``.
      group_size: inputs per quantization group (must divide ``in`` and ``blocksize``), or ``None``
        for one grid per output channel, chosen from the weights before any update.
      symmetric, narrow: the grid (default asymmetric min/max, as the papers).
      blocksize: columns per lazy batch and per adaptive mask selection (the paper's 128).
      percdamp: damping, a fraction of the mean diagonal of ``H``.

    Returns:
      :class:`LayerResult` with the updated kernel (pruned entries exactly 0), its keep-mask, the
      grid when ``bits`` is set, and the OBS loss.

    Raises:
      ValueError / TypeError: bad shapes, fractions, structures or grids.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> rng = np.random.default_rng(0)
      >>> x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
      >>> w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
      >>> r = sparsegpt(w, x.T @ x, 0.5)
      >>> float(jnp.mean(r.kernel == 0)), r.mask.shape
      (0.5, (16, 8))
    """
    kernel, xtx, blocksize, percdamp = _check_common(kernel, xtx, blocksize, percdamp)
    nm = None
    if isinstance(structure, NM):
        if structure.axis not in (0, -2):
            raise ValueError(f"structure={structure!r}: N:M groups must run along the input axis, axis=-2.")
        if kernel.shape[0] % structure.m or blocksize % structure.m or not 0 < structure.n <= structure.m:
            raise ValueError(
                f"structure={structure!r} needs 0 < n <= m and m dividing the {kernel.shape[0]} inputs and "
                f"blocksize={blocksize}."
            )
        nm, sparsity = (structure.n, structure.m), 0.0
    elif isinstance(structure, Unstructured):
        sparsity = check_fraction("sparsity", sparsity)
    else:
        raise ValueError(f"structure must be Unstructured() or NM(n, m), got {structure!r}.")
    bits, group_size = _check_grid(bits, group_size, kernel.shape[0], blocksize, symmetric, narrow)
    out = _obs(kernel, xtx, sparsity=sparsity, nm=nm, bits=bits, symmetric=symmetric, narrow=narrow,
               group_size=group_size, act_order=False, blocksize=blocksize, percdamp=percdamp)
    return _result(*out, pruned=True, bits=bits, symmetric=symmetric, narrow=narrow, group_size=group_size)


def gptq(
    kernel,
    xtx,
    bits: int = 4,
    *,
    group_size: Optional[int] = None,
    symmetric: bool = False,
    narrow: bool = False,
    act_order: bool = False,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> LayerResult:
    """GPTQ on one Dense kernel: quantize input by input with OBS error feedback.

    Args:
      kernel: float ``(in, out)`` kernel.
      xtx: ``X^T X`` of the layer's inputs, summed over calibration tokens.
      bits: ``2..8``.
      group_size: inputs per group (``128`` for "g128"; must divide ``in`` and ``blocksize``), or
        ``None`` for one grid per output channel (from the weights before any update).
      symmetric, narrow: the grid; default asymmetric min/max as the paper.
      act_order: process inputs by descending ``diag(H)`` (grids of groups then static).
      blocksize: columns per lazy batch update.
      percdamp: damping, a fraction of the mean diagonal of ``H`` (the paper's 0.01).

    Returns:
      :class:`LayerResult` with the kernel on its grid (``mask`` ``None``) and the OBS loss.

    Example:
      >>> import numpy as np, jax.numpy as jnp
      >>> rng = np.random.default_rng(0)
      >>> x = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
      >>> w = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
      >>> r = gptq(w, x.T @ x, 3, group_size=8)
      >>> r.grid.scale.shape, bool(jnp.all(r.grid.quantize(r.kernel) == r.kernel))
      ((2, 8), True)
    """
    kernel, xtx, blocksize, percdamp = _check_common(kernel, xtx, blocksize, percdamp)
    if not isinstance(act_order, bool):
        raise TypeError(f"act_order must be a bool, got {act_order!r}.")
    bits, group_size = _check_grid(check_int("bits", bits, minimum=2, maximum=8), group_size, kernel.shape[0],
                                   blocksize, symmetric, narrow)
    out = _obs(kernel, xtx, sparsity=0.0, nm=None, bits=bits, symmetric=symmetric, narrow=narrow,
               group_size=group_size, act_order=act_order, blocksize=blocksize, percdamp=percdamp)
    return _result(*out, pruned=False, bits=bits, symmetric=symmetric, narrow=narrow, group_size=group_size)
