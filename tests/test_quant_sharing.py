"""Weight sharing: k-means against a NumPy Lloyd's loop, centroid updates by summed gradients."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.transform import UpdateInfo
from jaxcompress.quant import kmeans_1d, weight_sharing


def _numpy_kmeans(w, k, iters):
    flat = w.astype(np.float64).ravel()
    c = np.linspace(flat.min(), flat.max(), k)
    for _ in range(iters):
        a = np.argmin(np.abs(flat[:, None] - c[None, :]), axis=1)
        for j in range(k):
            if np.any(a == j):
                c[j] = flat[a == j].mean()
    return c, np.argmin(np.abs(flat[:, None] - c[None, :]), axis=1).reshape(w.shape)


def test_kmeans_matches_numpy_lloyd():
    w = np.random.default_rng(0).normal(size=(30, 20)).astype(np.float32)
    c, a = kmeans_1d(w, 8, iters=15)
    c_ref, a_ref = _numpy_kmeans(w, 8, 15)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=1e-6)
    assert np.mean(np.asarray(a) == a_ref) > 0.999  # ties at float32 vs float64 midpoints aside


def test_view_uses_codebook_and_centroids_follow_summed_gradients():
    rng = np.random.default_rng(1)
    p = {"fc": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}}
    t = weight_sharing(4, learning_rate=0.01, rules=[(".*", True)])
    s = t.init(p)
    v = t.apply(p, s)
    assert len(np.unique(np.asarray(v["fc"]["kernel"]))) <= 4
    np.testing.assert_array_equal(np.asarray(v["fc"]["bias"]), np.asarray(p["fc"]["bias"]))  # not selected
    # gradients of a loss through the view reach the latent weights one to one
    target = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    loss = lambda q: jnp.sum((t.apply(q, s)["fc"]["kernel"] - target) ** 2)  # noqa: E731
    g = jax.grad(loss)(p)
    np.testing.assert_allclose(np.asarray(g["fc"]["kernel"]), 2 * (np.asarray(v["fc"]["kernel"]) - np.asarray(target)), rtol=1e-6)
    s2 = t.update(p, s, UpdateInfo(step=1, grads=g))
    a = np.asarray(s.assignments["fc"]["kernel"])
    gk = np.asarray(g["fc"]["kernel"], np.float64)
    want = np.asarray(s.centroids["fc"]["kernel"], np.float64) - 0.01 * np.array([gk[a == j].sum() for j in range(4)])
    np.testing.assert_allclose(np.asarray(s2.centroids["fc"]["kernel"]), want, rtol=1e-5)
    assert int(s2.count) == 1
    # the step lowered the loss (centroid descent on the shared weights)
    assert float(loss_after(t, p, s2, target)) < float(loss(p))


def loss_after(t, p, s, target):
    return jnp.sum((t.apply(p, s)["fc"]["kernel"] - target) ** 2)
