"""Weight sharing (Han et al. 2016, Deep Compression): a per-layer k-means codebook.

Each selected layer's weights are clustered into ``clusters`` centroids (k-means with linear
initialisation between min and max, the paper's best choice); the view replaces every weight by
its centroid, so a layer is stored as ``log2(clusters)``-bit indices plus a small codebook. During
fine-tuning the assignments stay fixed and each centroid moves by the summed gradient of its
members: ``c_k <- c_k - learning_rate * sum_{i in k} dL/dw_i`` (the paper's section 3.3). That
update happens in the transform's ``update`` from the step's gradients, so it is independent of
the optimizer that moves the (then unused) latent weights.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.rules import Rules, is_none, select
from jaxcompress.core.transform import Transform, UpdateInfo
from jaxcompress.core.validation import check_int, check_positive


class SharingState(NamedTuple):
    """State of :func:`weight_sharing`.

    Attributes:
      count: int32, number of ``update`` calls.
      centroids: per selected leaf a ``(clusters,)`` float32 codebook (``None`` elsewhere).
      assignments: per selected leaf an int32 array like the leaf: its centroid index.
    """

    count: jax.Array
    centroids: Any
    assignments: Any


def kmeans_1d(w: jax.Array, clusters: int, *, iters: int = 30) -> tuple[jax.Array, jax.Array]:
    """Lloyd's k-means on the values of ``w`` from centroids spaced linearly over ``[min, max]``.

    Empty clusters keep their previous centroid.

    Returns:
      ``(centroids (clusters,), assignments like w)``.

    Example:
      >>> import jax.numpy as jnp
      >>> c, a = kmeans_1d(jnp.array([0.0, 0.1, 0.9, 1.0]), 2)
      >>> [round(float(v), 3) for v in c], a.tolist()
      ([0.05, 0.95], [0, 0, 1, 1])
    """
    clusters = check_int("clusters", clusters, minimum=2)
    iters = check_int("iters", iters, minimum=0)
    flat = jnp.asarray(w, jnp.float32).ravel()
    c0 = jnp.linspace(jnp.min(flat), jnp.max(flat), clusters)

    def assign(c):
        return jnp.argmin(jnp.abs(flat[:, None] - c[None, :]), axis=1)

    def body(_, c):
        a = assign(c)
        sums = jax.ops.segment_sum(flat, a, clusters)
        counts = jax.ops.segment_sum(jnp.ones_like(flat), a, clusters)
        return jnp.where(counts > 0, sums / jnp.maximum(counts, 1), c)

    c = jax.lax.fori_loop(0, iters, body, c0)
    return c, assign(c).astype(jnp.int32).reshape(jnp.shape(w))


def weight_sharing(
    clusters: int = 16,
    *,
    learning_rate: float = 1e-3,
    iters: int = 30,
    rules: Optional[Rules] = None,
) -> Transform:
    """Per-layer k-means weight sharing with centroid fine-tuning.

    Args:
      clusters: default codebook size (16 = 4-bit indices); an int rule value overrides it.
      learning_rate: SGD rate of the centroid update by summed member gradients.
      iters: k-means iterations at ``init``.
      rules: ``(regex, value)`` rules; default every float kernel with ``ndim >= 2``.

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`SharingState`.

    Example:
      >>> import jax.numpy as jnp
      >>> t = weight_sharing(2)
      >>> p = {'k': jnp.array([[0.0, 0.1], [0.9, 1.0]])}
      >>> s = t.init(p)
      >>> [[round(v, 3) for v in row] for row in t.apply(p, s)['k'].tolist()]
      [[0.05, 0.05], [0.95, 0.95]]
      >>> s = t.update(p, s, UpdateInfo(step=1, grads={'k': jnp.ones((2, 2))}))
      >>> [round(float(v), 4) for v in s.centroids['k']]  # each moved by 1e-3 * 2 members
      [0.048, 0.948]
    """
    clusters = check_int("clusters", clusters, minimum=2)
    learning_rate = check_positive("learning_rate", learning_rate)

    def sizes(params):
        return jax.tree.map(
            lambda v: None if v is None else (clusters if v is True else check_int("per-rule clusters", v, minimum=2)),
            select(params, rules),
            is_leaf=is_none,
        )

    def init(params):
        pairs = jax.tree.map(
            lambda k, w: None if k is None else kmeans_1d(w, k, iters=iters), sizes(params), params, is_leaf=is_none
        )
        is_pair = lambda x: x is None or isinstance(x, tuple)  # noqa: E731
        centroids = jax.tree.map(lambda p: None if p is None else p[0], pairs, is_leaf=is_pair)
        assignments = jax.tree.map(lambda p: None if p is None else p[1], pairs, is_leaf=is_pair)
        return SharingState(jnp.zeros((), jnp.int32), centroids, assignments)

    def apply(params, state):
        def view(c, a, w):
            if c is None:
                return w
            shared = c[a].astype(w.dtype)
            return jax.lax.stop_gradient(shared) + (w - jax.lax.stop_gradient(w))

        return jax.tree.map(view, state.centroids, state.assignments, params, is_leaf=is_none)

    def update(params, state, info: UpdateInfo):
        del params
        if info.grads is None:  # nothing to learn from (e.g. a calibration pass)
            return state._replace(count=state.count + 1)

        def step(c, a, g):
            if c is None:
                return None
            total = jax.ops.segment_sum(g.astype(jnp.float32).ravel(), a.ravel(), c.shape[0])
            return c - learning_rate * total

        centroids = jax.tree.map(step, state.centroids, state.assignments, info.grads, is_leaf=is_none)
        return SharingState(state.count + 1, centroids, state.assignments)

    return Transform(init, apply, update)
