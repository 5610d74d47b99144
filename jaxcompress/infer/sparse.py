"""Sparse products for pruned Dense kernels: BCOO, BCSR and a gather (ELLPACK) layout.

A pruned ``(in, out)`` kernel ``W`` can multiply an input in three ways besides the dense
product with its zeros:

* ``bcoo`` / ``bcsr``: ``W^T`` as a :mod:`jax.experimental.sparse` matrix, ``y = (W^T x^T)^T``.
* ``gather``: per output column the row indices and values of its non-zeros, padded to the
  column with the most (:func:`ell`), ``y[b, o] = sum_k x[b, idx[k, o]] * val[k, o]``. For an
  N:M kernel every column has the same count, so this is exactly the N:M layout (values plus
  positions) with no padding.

Which is fastest depends on the backend, the batch and the sparsity: measure
(:func:`~jaxcompress.infer.plan.choose_paths`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse


def ell(kernel) -> tuple[jax.Array, jax.Array]:
    """Row indices and values of each column's non-zeros, ``(K, out)`` each, padded with 0s.

    ``K`` is the largest non-zero count of a column (at least 1); padding entries point at row 0
    with value 0.

    Example:
      >>> import numpy as np
      >>> idx, val = ell(np.array([[0.0, 2.0], [3.0, 0.0], [4.0, 0.0]]))
      >>> idx.tolist(), val.tolist()
      ([[1, 0], [2, 0]], [[3.0, 2.0], [4.0, 0.0]])
    """
    w = np.asarray(kernel)
    if w.ndim != 2:
        raise ValueError(f"kernel must be a 2-D Dense kernel (in, out), got shape {w.shape}.")
    nz = w != 0
    k = max(int(nz.sum(0).max(initial=0)), 1)
    idx = np.zeros((k, w.shape[1]), np.int32)
    val = np.zeros((k, w.shape[1]), w.dtype)
    for o in range(w.shape[1]):
        rows = np.flatnonzero(nz[:, o])
        idx[: len(rows), o] = rows
        val[: len(rows), o] = w[rows, o]
    return jnp.asarray(idx), jnp.asarray(val)


def _flat(x):
    return x.reshape(-1, x.shape[-1])


def ell_matmul(x: jax.Array, idx: jax.Array, val: jax.Array) -> jax.Array:
    """``x @ W`` for ``W`` given as :func:`ell` ``(idx, val)``."""
    xf = _flat(x)
    y = jnp.einsum("bko,ko->bo", jnp.take(xf, idx, axis=1), val)
    return y.reshape(x.shape[:-1] + (val.shape[1],))


def bcoo(kernel) -> sparse.BCOO:
    """``kernel^T`` as a :class:`jax.experimental.sparse.BCOO` ``(out, in)`` matrix."""
    return sparse.BCOO.fromdense(jnp.asarray(kernel).T)


def bcsr(kernel) -> sparse.BCSR:
    """``kernel^T`` as a :class:`jax.experimental.sparse.BCSR` ``(out, in)`` matrix."""
    return sparse.BCSR.fromdense(jnp.asarray(kernel).T)


def sparse_matmul(x: jax.Array, wt) -> jax.Array:
    """``x @ W`` for ``W^T`` given as a BCOO or BCSR matrix ``wt`` (see :func:`bcoo`, :func:`bcsr`)."""
    xf = _flat(x)
    y = (wt @ xf.T).T
    return y.reshape(x.shape[:-1] + (y.shape[-1],))
