"""Weight sharing (Han et al. 2016, Deep Compression): a per-layer k-means codebook.

Each selected layer's non-zero weights are clustered into ``clusters`` centroids (k-means with
linear initialisation between min and max, the paper's best choice); the view replaces every
non-zero weight by its centroid and keeps zeros (pruned weights) at exactly zero, so a layer is
stored as ``log2(clusters)``-bit indices plus a small codebook (plus the pruning mask).

During fine-tuning the assignments stay fixed and the centroids are trained: they live in the
transform's state as a :class:`~jaxcompress.core.transform.Trainable`, the train step
differentiates the view with respect to them (each centroid's gradient is the sum of its
members' gradients, the paper's section 3.3) and the user's optimizer updates them.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules, is_none, select
from jaxcompress.core.transform import LeafSpec, Trainable, Transform, UpdateInfo
from jaxcompress.core.validation import check_int
from jaxcompress.core.rules import warn_unused_rules


class SharingState(NamedTuple):
    """State of :func:`weight_sharing`.

    Attributes:
      count: int32, number of ``update`` calls.
      centroids: ``Trainable`` of a pytree like the params: per selected leaf a ``(clusters,)``
        float32 codebook (``None`` elsewhere), trained by the optimizer through the train step.
      assignments: per selected leaf an int32 array like the leaf: its centroid index.
    """

    count: jax.Array
    centroids: Trainable
    assignments: Any


def kmeans_1d(w: jax.Array, clusters: int, *, iters: int = 30) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means on the non-zero values of ``w`` from centroids spaced linearly over their
    ``[min, max]``; zeros, NaN and ``+-inf`` take no part (each is assigned its nearest centroid;
    ``+-inf`` the extreme ones).

    Empty clusters keep their previous centroid.

    Returns:
      ``(centroids (clusters,), assignments like w)``.

    Example:
      >>> import jax.numpy as jnp
      >>> c, a = kmeans_1d(jnp.array([0.05, 0.1, 0.9, 1.0]), 2)
      >>> [round(float(v), 3) for v in c], a.tolist()
      ([0.075, 0.95], [0, 0, 1, 1])
    """
    clusters = check_int("clusters", clusters, minimum=2)
    iters = check_int("iters", iters, minimum=0)
    raw = jnp.asarray(w, jnp.float32).ravel()
    valid = (raw != 0) & jnp.isfinite(raw)  # NaN and inf take no part in the clustering
    lo = jnp.min(jnp.where(valid, raw, jnp.inf))
    hi = jnp.max(jnp.where(valid, raw, -jnp.inf))
    any_valid = jnp.any(valid)
    lo, hi = jnp.where(any_valid, lo, 0.0), jnp.where(any_valid, hi, 0.0)
    # assigned as their nearest finite value: +-inf the extreme centroids (NaN: any, masked by the view)
    flat = jnp.clip(jnp.nan_to_num(raw, nan=0.0), lo, hi)
    c0 = jnp.linspace(lo, hi, clusters)

    def assign(c):
        return jnp.argmin(jnp.abs(flat[:, None] - c[None, :]), axis=1)

    def body(_, c):
        a = assign(c)
        sums = jax.ops.segment_sum(jnp.where(valid, flat, 0.0), a, clusters)
        counts = jax.ops.segment_sum(valid.astype(jnp.float32), a, clusters)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), c)

    c = jax.lax.fori_loop(0, iters, body, c0)
    return c, assign(c).astype(jnp.int32).reshape(jnp.shape(w))


def weight_sharing(clusters: int = 16, *, iters: int = 30, rules: Optional[Rules] = None) -> Transform:
    """Per-layer k-means weight sharing with trained centroids; zeros stay zero.

    Args:
      clusters: default codebook size (16 = 4-bit indices); an int rule value overrides it.
      iters: k-means iterations at ``init``.
      rules: ``(regex, value)`` rules; default every float kernel with ``ndim >= 2``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`SharingState`. ``describe``
      gives each shared leaf's index bits (``ceil(log2(clusters))``), ``scheme='codebook'`` and
      its sorted codebook.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> t = weight_sharing(2)
      >>> p = {'k': jnp.array([[0.0, 0.1], [0.9, 1.0]])}
      >>> s = t.init(p)
      >>> [[round(v, 3) for v in row] for row in t.apply(p, s)['k'].tolist()]  # 0 stays 0
      [[0.0, 0.1], [0.95, 0.95]]
      >>> g = jax.grad(lambda c: t.apply(p, s._replace(centroids=c))['k'].sum())(s.centroids)
      >>> g.value['k'].tolist()  # each centroid: the summed gradient of its non-zero members
      [1.0, 2.0]
    """
    clusters = check_int("clusters", clusters, minimum=2)

    def sizes(params):
        return jax.tree.map(
            lambda v: None if v is None else (clusters if v is True else check_int("per-rule clusters", v, minimum=2)),
            select(params, rules),
            is_leaf=is_none,
        )

    def init(params):
        warn_unused_rules(params, rules, "weight_sharing")
        pairs = jax.tree.map(
            lambda k, w: None if k is None else kmeans_1d(w, k, iters=iters), sizes(params), params, is_leaf=is_none
        )
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        centroids = jax.tree.map(lambda p: None if p is None else p[0], pairs, is_leaf=is_pair)
        assignments = jax.tree.map(lambda p: None if p is None else p[1], pairs, is_leaf=is_pair)
        return SharingState(jnp.zeros((), jnp.int32), Trainable(centroids), assignments)

    def apply(params, state):
        def view(c, a, w):
            if c is None:
                return w
            ws = jax.lax.stop_gradient(w)
            # zeros stay zero, a NaN stays NaN at its own position only
            shared = jnp.where(ws == 0, 0.0, jnp.where(jnp.isnan(ws), ws, c[a])).astype(w.dtype)
            # the value is the codebook's; gradients reach the centroids (gathered) and, straight
            # through, the latent weights
            delta = w - ws  # 0 in value; no gradient (and no inf - inf) at non-finite weights
            return shared + jnp.where(jnp.isfinite(ws), delta, jnp.zeros_like(delta))

        return jax.tree.map(view, state.centroids.value, state.assignments, params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params, info
        return state._replace(count=state.count + 1)

    def describe(params, state):
        del params
        flat = jax.tree.leaves_with_path(state.centroids.value, is_leaf=is_none)
        return {
            path_name(p): LeafSpec(bits=max(1, (int(c.shape[0]) - 1).bit_length()), scheme="codebook", codebook=jnp.sort(c))
            for p, c in flat
            if c is not None
        }

    return Transform(init, apply, update, describe)
