"""Rotations folded into a pre-LayerNorm Transformer's weights before quantization (QuaRot-style).

Quantization error grows with outliers; multiplying a layer's input by a random orthogonal
matrix ``Q`` spreads every outlier over all channels (Ashkboos et al. 2024, QuaRot; Chee et al.
2023, QuIP). The rotation is folded into the weights so the model runs unchanged:

* **Residual stream.** Every array added to the stream is rotated, ``r -> r Q``: the embedding
  tables ``E Q`` and the layers writing into it (``W Q``, ``b Q``). Layers reading the stream
  through a LayerNorm absorb the norm's scale and bias and the inverse rotation,
  ``W -> Q^T diag(gamma) W``, ``b -> b + beta W``, and the norm's scale and bias become 1 and 0.
  QuaRot needs RMSNorm for this, because LayerNorm's centering does not commute with a general
  rotation; here ``Q`` is built to fix the all-ones vector (``Q 1 = 1``), so centering commutes
  with it, ``LN(r Q) = LN(r) Q`` with unit scale and zero bias, and the model keeps its LayerNorm.
  ``Q = H diag(d) H / D`` with ``H`` the Sylvester-Hadamard matrix and random signs ``d``
  (``d_0 = 1``) when ``D`` is a power of two; otherwise ``U diag(1, R) U^T`` with ``U`` any
  orthogonal matrix whose first column is ``1 / sqrt(D)`` and ``R`` random orthogonal.
* **Attention values.** The input of attention's output projection is rotated per head by a
  random Hadamard matrix folded into the value projection's output columns and the output
  projection's rows (attention mixes tokens, never channels within a head, so this is exact).

Layers behind a non-linearity (the MLP's second layer) are not rotated: that needs an online
rotation at run time. Which layers read the stream and through which norm is given by the same
``folds`` as the scale folds (:mod:`jaxcompress.oneshot.folds`): a fold into a norm marks a
reader, a fold into a Dense layer a value/output pair.
"""
from __future__ import annotations

import re
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import get_path, path_name
from jaxcompress.oneshot.folds import Folds, fold_groups


def hadamard(n: int) -> np.ndarray:
    """The Sylvester-Hadamard matrix of order ``n`` (a power of two), entries +-1, ``H H^T = n I``.

    Example:
      >>> hadamard(2).tolist()
      [[1.0, 1.0], [1.0, -1.0]]
    """
    if not (isinstance(n, int) and n >= 1 and n & (n - 1) == 0):
        raise ValueError(f"a Sylvester-Hadamard matrix needs a power-of-two order, got {n!r}.")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def ones_fixing_rotation(dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal ``(dim, dim)`` matrix ``Q`` with ``Q 1 = 1`` (so it commutes with centering).

    Example:
      >>> import numpy as np
      >>> q = ones_fixing_rotation(8, np.random.default_rng(0))
      >>> bool(np.allclose(q @ q.T, np.eye(8))), bool(np.allclose(q @ np.ones(8), np.ones(8)))
      (True, True)
    """
    if dim & (dim - 1) == 0:
        h = hadamard(dim)
        d = rng.choice([-1.0, 1.0], size=dim)
        d[0] = 1.0
        return (h * d[None, :]) @ h / dim
    # Householder reflection U mapping e_0 to 1/sqrt(dim): U's first column is the all-ones direction.
    v = np.ones(dim) / np.sqrt(dim)
    v[0] -= 1.0
    u = np.eye(dim) - 2.0 * np.outer(v, v) / (v @ v)
    r, _ = np.linalg.qr(rng.normal(size=(dim - 1, dim - 1)))
    return u @ np.block([[np.ones((1, 1)), np.zeros((1, dim - 1))], [np.zeros((dim - 1, 1)), r]]) @ u.T


def head_rotation(head_dim: int, rng: np.random.Generator) -> np.ndarray:
    """A random Hadamard rotation ``H diag(d) / sqrt(n)`` (a random orthogonal matrix when ``n`` is not a power of two)."""
    if head_dim & (head_dim - 1) == 0:
        return hadamard(head_dim) * rng.choice([-1.0, 1.0], size=head_dim)[None, :] / np.sqrt(head_dim)
    q, _ = np.linalg.qr(rng.normal(size=(head_dim, head_dim)))
    return q


def rotate_transformer(
    params: Any,
    folds: Folds,
    *,
    embeddings: str,
    writers: str,
    head_dim: Optional[int] = None,
    seed: int = 0,
) -> Any:
    """The params of a pre-LayerNorm Transformer with its residual stream (and attention values) rotated.

    Args:
      params: the model's params.
      folds: ``(regex, template)`` rules naming each layer's input producer: layers folding into
        a norm (``'.../ln1'``) read the stream; a layer folding into a Dense layer (attention's
        ``out`` into ``value``) gets the per-head rotation.
      embeddings: regex on leaf paths of the embedding tables ``(rows, dim)`` added to the stream.
      writers: regex on the Dense layer paths whose outputs are added to the stream.
      head_dim: attention head width for the per-head rotation; ``None`` skips it.
      seed: the random signs / rotations.

    Returns:
      Rotated params computing the same function (to float rounding).

    Raises:
      ValueError: the stream's width differs between the pieces, or a reader's norm feeds it
        through a layer without bias while the norm has a bias.
    """
    flat = {path_name(p): w for p, w in jax.tree.leaves_with_path(params)}
    layers = sorted({k[: -len("/kernel")] for k in flat if k.endswith("/kernel")})
    groups = fold_groups(layers, folds)
    emb = [k for k in flat if re.search(embeddings, k)]
    wri = [k for k in layers if re.search(writers, k)]
    if not emb or not wri:
        raise ValueError(f"embeddings={embeddings!r} matches {emb} and writers={writers!r} matches {wri}; "
                         "both must name the arrays added to the residual stream.")
    dim = flat[emb[0]].shape[-1]
    rng = np.random.default_rng(seed)
    q = jnp.asarray(ones_fixing_rotation(dim, rng), jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    new = dict(flat)
    for k in emb:
        new[k] = jnp.dot(flat[k], q, precision=hi)
    for k in wri:
        new[k + "/kernel"] = jnp.dot(flat[k + "/kernel"], q, precision=hi)
        if k + "/bias" in flat:
            new[k + "/bias"] = jnp.dot(flat[k + "/bias"], q, precision=hi)
    norms = {p: c for p, c in groups.items() if get_path(params, p + "/kernel") is None}
    for norm, readers in norms.items():
        gamma = flat.get(norm + "/scale", jnp.ones(dim))
        beta = flat.get(norm + "/bias", jnp.zeros(dim))
        for r in readers:
            w = flat[r + "/kernel"]
            if w.shape[0] != dim:
                raise ValueError(f"{r!r} reads {w.shape[0]} channels but the residual stream has {dim}.")
            if r + "/bias" not in flat and bool(jnp.any(beta != 0)):
                raise ValueError(f"{r!r} has no bias to absorb {norm!r}'s bias; it cannot be rotated.")
            if r + "/bias" in flat:
                new[r + "/bias"] = flat[r + "/bias"] + jnp.dot(beta, w, precision=hi)
            new[r + "/kernel"] = jnp.dot(q.T, gamma[:, None] * w, precision=hi)
        if norm + "/scale" in flat:
            new[norm + "/scale"] = jnp.ones_like(gamma)
        if norm + "/bias" in flat:
            new[norm + "/bias"] = jnp.zeros_like(beta)
    if head_dim is not None:
        qh = jnp.asarray(head_rotation(head_dim, rng), jnp.float32)
        for value, outs in groups.items():
            if value in norms:
                continue
            width = flat[value + "/kernel"].shape[1]
            if width % head_dim:
                raise ValueError(f"head_dim={head_dim} does not divide {value!r}'s {width} outputs.")
            block = jnp.kron(jnp.eye(width // head_dim), qh)
            new[value + "/kernel"] = jnp.dot(new[value + "/kernel"], block, precision=hi)
            if value + "/bias" in flat:
                new[value + "/bias"] = jnp.dot(new[value + "/bias"], block, precision=hi)
            for o in outs:
                new[o + "/kernel"] = jnp.dot(block.T, new[o + "/kernel"], precision=hi)
    return jax.tree.map_with_path(lambda p, w: new[path_name(p)].astype(w.dtype), params)
