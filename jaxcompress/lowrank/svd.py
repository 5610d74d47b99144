"""Truncated SVD of Dense and convolution kernels, and the choice of rank per layer.

A kernel ``W`` is read as a matrix ``M`` and replaced by two factors whose product is the best
rank-``r`` approximation of ``M`` (Eckart-Young: the error in Frobenius norm is the root sum
of squares of the dropped singular values). How a kernel becomes a matrix (``mode``):

* a Dense kernel ``(in, out)`` is the matrix itself;
* ``'reshape'``: a convolution kernel ``(kh, kw, cin, cout)`` is read as ``(kh * kw * cin, cout)``;
  the factors are a ``kh x kw`` convolution to ``r`` channels and a 1x1 convolution to ``cout``;
* ``'spatial'``: read as ``(kh * cin, kw * cout)`` (Tai et al. 2016); the factors are a
  ``kh x 1`` convolution to ``r`` channels and a ``1 x kw`` convolution to ``cout``.

The singular values are split evenly between the factors (``U sqrt(S)`` and ``sqrt(S) V^T``),
which keeps both at the same scale for fine-tuning.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

MODES = ("reshape", "spatial")


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    return mode


def kernel_matrix(kernel, mode: str = "reshape") -> np.ndarray:
    """The matrix whose truncated SVD factors ``kernel`` (float64).

    Example:
      >>> kernel_matrix(np.zeros((3, 3, 4, 8))).shape, kernel_matrix(np.zeros((3, 3, 4, 8)), 'spatial').shape
      ((36, 8), (12, 24))
    """
    check_mode(mode)
    w = np.asarray(kernel, np.float64)
    if w.ndim == 2:
        return w
    if w.ndim != 4:
        raise ValueError(f"kernel must be a Dense (in, out) or a 2-D convolution (kh, kw, cin, cout) kernel, got shape {w.shape}.")
    kh, kw, cin, cout = w.shape
    if mode == "reshape":
        return w.reshape(kh * kw * cin, cout)
    return w.transpose(0, 2, 1, 3).reshape(kh * cin, kw * cout)


def singular_values(kernel, mode: str = "reshape") -> np.ndarray:
    """The singular values of :func:`kernel_matrix` ``(kernel, mode)``, largest first."""
    return np.linalg.svd(kernel_matrix(kernel, mode), compute_uv=False)


def max_rank(shape, mode: str = "reshape") -> int:
    """The largest rank of a kernel of ``shape`` read in ``mode``."""
    return min(kernel_matrix(np.zeros(shape), mode).shape)


def factor_kernel(kernel, rank: int, mode: str = "reshape") -> tuple[np.ndarray, np.ndarray]:
    """The two factor kernels of the best rank-``rank`` approximation of ``kernel``.

    Args:
      kernel: a Dense ``(in, out)`` or convolution ``(kh, kw, cin, cout)`` kernel.
      rank: ``1 <= rank <= max_rank(kernel.shape, mode)``.
      mode: ``'reshape'`` or ``'spatial'`` (convolutions only).

    Returns:
      ``(u, v)`` as float32: Dense ``(in, r)``, ``(r, out)``; ``'reshape'`` ``(kh, kw, cin, r)``,
      ``(r, cout)``; ``'spatial'`` ``(kh, 1, cin, r)``, ``(1, kw, r, cout)``.

    Raises:
      ValueError: bad rank, mode or kernel shape.

    Example:
      >>> w = np.arange(12.0).reshape(3, 4)            # rank 2
      >>> u, v = factor_kernel(w, 2)
      >>> u.shape, v.shape, bool(np.allclose(u @ v, w, atol=1e-4))
      ((3, 2), (2, 4), True)
    """
    m = kernel_matrix(kernel, mode)
    top = min(m.shape)
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or not 1 <= rank <= top:
        raise ValueError(f"rank must be an int in 1..{top} for a kernel of shape {np.shape(kernel)} ({mode}), got {rank!r}.")
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    root = np.sqrt(s[:rank])
    a, b = u[:, :rank] * root, root[:, None] * vt[:rank]
    w = np.asarray(kernel)
    if w.ndim == 2:
        return a.astype(np.float32), b.astype(np.float32)
    kh, kw, cin, cout = w.shape
    if mode == "reshape":
        return a.reshape(kh, kw, cin, rank).astype(np.float32), b.astype(np.float32)
    first = a.reshape(kh, cin, rank)[:, None]  # (kh, 1, cin, r)
    second = b.reshape(rank, kw, cout).transpose(1, 0, 2)[None]  # (1, kw, r, cout)
    return first.astype(np.float32), second.astype(np.float32)


def rank_for_energy(values, energy: float) -> int:
    """The smallest rank whose singular values keep ``energy`` of the sum of squares.

    Example:
      >>> rank_for_energy([3.0, 2.0, 1.0], 0.9)   # 9 + 4 = 13 of 14
      2
    """
    if not 0.0 < float(energy) <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}: the fraction of the squared singular values kept.")
    s2 = np.asarray(values, np.float64) ** 2
    kept = np.cumsum(s2) / max(s2.sum(), 1e-300)
    return int(min(np.searchsorted(kept, float(energy) - 1e-12) + 1, len(s2)))


def factored_size(shape, rank: int, mode: str = "reshape") -> int:
    """Weights of the two factors (no bias) of a kernel of ``shape`` at ``rank``."""
    rows, cols = kernel_matrix(np.zeros(shape), mode).shape
    return rank * (rows + cols)


def ranks_for_budget(kernels: dict, budget: int, mode: str = "reshape") -> dict:
    """Ranks under a budget of factor weights, greedily by kept energy per weight.

    Each singular value ``k`` of layer ``l`` costs ``rows_l + cols_l`` weights and keeps
    ``s_k^2 / sum(s^2)`` of its layer's energy; the cheapest energy is bought first, each layer
    keeping at least rank 1. A layer whose rank would store as many weights as the dense kernel
    gets ``None`` (left dense).

    Args:
      kernels: ``{name: kernel}``.
      budget: total weights of all factors (multiply by 4 for float32 bytes).
      mode: how convolution kernels are read.

    Returns:
      ``{name: rank or None}``.

    Example:
      >>> rng = np.random.default_rng(0)
      >>> ranks_for_budget({'a': rng.normal(size=(50, 40)), 'b': rng.normal(size=(40, 10))}, 1000)['a'] > 1
      True
    """
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise ValueError(f"budget must be a positive int (weights of all factors), got {budget!r}.")
    costs, gains, ranks = {}, [], {}
    for name, w in kernels.items():
        rows, cols = kernel_matrix(w, mode).shape
        s2 = singular_values(w, mode) ** 2
        rel = s2 / max(s2.sum(), 1e-300)
        costs[name] = rows + cols
        ranks[name] = 1
        gains += [(-rel[k] / costs[name], name, k) for k in range(1, len(rel))]
    spent = sum(costs.values())
    for _, name, k in sorted(gains):
        if k != ranks[name]:  # singular values are bought in order within a layer
            continue
        if spent + costs[name] > budget:
            continue
        ranks[name] = k + 1
        spent += costs[name]
    return {n: (None if r * costs[n] >= np.size(kernels[n]) else r) for n, r in ranks.items()}


def eckart_young_error(kernel, rank: int, mode: str = "reshape") -> float:
    """``sqrt(sum of the dropped singular values squared)``: the Frobenius error at ``rank``."""
    s = singular_values(kernel, mode)
    return float(np.sqrt(np.sum(s[rank:] ** 2)))


def pick_rank(kernel, *, rank: Optional[int] = None, energy: Optional[float] = None, mode: str = "reshape") -> int:
    """``rank`` as given, or the smallest rank keeping ``energy`` (exactly one of them)."""
    if (rank is None) == (energy is None):
        raise ValueError("give exactly one of rank= or energy=.")
    return int(rank) if rank is not None else rank_for_energy(singular_values(kernel, mode), energy)
