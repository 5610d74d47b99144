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


def test_kmeans_ignores_zeros():
    w = np.random.default_rng(2).normal(size=(30, 20)).astype(np.float32)
    w[:, ::2] = 0.0
    c, _ = kmeans_1d(w, 8, iters=15)
    c_ref, _ = _numpy_kmeans(w[w != 0], 8, 15)
    np.testing.assert_allclose(np.asarray(c), c_ref, rtol=1e-5, atol=1e-6)


def test_view_uses_codebook_and_centroids_train_by_summed_gradients():
    rng = np.random.default_rng(1)
    p = {"fc": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                "bias": jnp.asarray(rng.normal(size=8), jnp.float32)}}
    p["fc"]["kernel"] = p["fc"]["kernel"].at[:4].set(0.0)  # pruned rows
    t = weight_sharing(4, rules=[(".*", True)])
    s = t.init(p)
    v = t.apply(p, s)
    k = np.asarray(v["fc"]["kernel"])
    assert len(np.unique(k)) <= 5 and np.all(k[:4] == 0.0) and np.all(k[4:] != 0.0)
    np.testing.assert_array_equal(np.asarray(v["fc"]["bias"]), np.asarray(p["fc"]["bias"]))  # not selected
    spec = t.describe(p, s)["fc/kernel"]
    assert (spec.bits, spec.scheme) == (2, "codebook")
    assert set(np.unique(k[4:]).tolist()) <= set(np.asarray(spec.codebook).tolist())
    # gradients of a loss through the view reach the latent weights one to one
    target = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    loss = lambda q, st: jnp.sum((t.apply(q, st)["fc"]["kernel"] - target) ** 2)  # noqa: E731
    g = jax.grad(loss)(p, s)
    np.testing.assert_allclose(np.asarray(g["fc"]["kernel"]), 2 * (k - np.asarray(target)), rtol=1e-6)
    # and to each centroid the summed gradient of its non-zero members (the paper's update)
    gc = jax.grad(lambda c: loss(p, s._replace(centroids=c)))(s.centroids).value["fc"]["kernel"]
    a = np.asarray(s.assignments["fc"]["kernel"])
    gk = np.asarray(g["fc"]["kernel"], np.float64)
    want = np.array([gk[(a == j) & (k != 0)].sum() for j in range(4)])
    np.testing.assert_allclose(np.asarray(gc), want, rtol=1e-5, atol=1e-5)
    # through the train step's optimizer: SGD moves each centroid by -lr * that sum
    import optax

    from jaxcompress.core.transform import trainable_part, with_trainable

    opt = optax.sgd(0.01)
    tr = trainable_part(s)
    updates, _ = opt.update(jax.grad(lambda tr: loss(p, with_trainable(s, tr)))(tr), opt.init(tr))
    s2 = with_trainable(s, optax.apply_updates(tr, updates))
    np.testing.assert_allclose(np.asarray(s2.centroids.value["fc"]["kernel"]),
                               np.asarray(s.centroids.value["fc"]["kernel"]) - 0.01 * want, rtol=1e-5)
    assert int(t.update(p, s2, UpdateInfo(step=1)).count) == 1
    assert float(loss(p, s2)) < float(loss(p, s))  # centroid descent on the shared weights
