"""Low-rank factorization against a NumPy SVD oracle, and factored models through the train step."""
import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
import optax
import pytest

import jaxcompress as jc
from jaxcompress.lowrank import LowRank, eckart_young_error, factor_kernel, factorize, rank_for_energy, ranks_for_budget
from jaxcompress.models import CNN, MLP


def oracle_error(matrix, rank):
    s = np.linalg.svd(np.asarray(matrix, np.float64), compute_uv=False)
    return np.sqrt(np.sum(s[rank:] ** 2))


def rebuild(u, v, shape, mode):
    """The dense kernel the two factors compute, re-derived in NumPy."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    if len(shape) == 2:
        return u @ v
    kh, kw, cin, cout = shape
    if mode == "reshape":
        return (u.reshape(-1, u.shape[-1]) @ v).reshape(shape)
    # W[h, w, c, o] = sum_k u[h, 0, c, k] v[0, w, k, o]
    return np.einsum("hck,wko->hwco", u[:, 0], v[0])


@pytest.mark.parametrize("shape,mode,rank", [
    ((40, 30), "reshape", 7), ((3, 3, 8, 16), "reshape", 5), ((3, 3, 8, 16), "spatial", 6), ((5, 3, 4, 6), "spatial", 3),
])
def test_truncated_svd_error_is_eckart_young(shape, mode, rank):
    w = np.random.default_rng(0).normal(size=shape)
    u, v = factor_kernel(w, rank, mode)
    err = np.linalg.norm(rebuild(u, v, shape, mode) - w)
    if len(shape) == 2 or mode == "reshape":
        matrix = w.reshape(-1, shape[-1])
    else:  # rows (h, c), columns (w, o)
        matrix = np.stack([w[h, :, c, :].reshape(-1) for h in range(shape[0]) for c in range(shape[2])])
    want = oracle_error(matrix, rank)
    np.testing.assert_allclose(err, want, rtol=1e-4)
    np.testing.assert_allclose(eckart_young_error(w, rank, mode), want, rtol=1e-9)
    # Full rank reproduces the kernel.
    top = min(matrix.shape)
    u, v = factor_kernel(w, top, mode)
    np.testing.assert_allclose(rebuild(u, v, shape, mode), w, atol=1e-4)


class OneConv(nn.Module):
    strides: int
    padding: str

    @nn.compact
    def __call__(self, x):
        return nn.Conv(6, (3, 3), strides=self.strides, padding=self.padding, name="c")(x)


@pytest.mark.parametrize("mode", ["reshape", "spatial"])
@pytest.mark.parametrize("padding,strides", [("SAME", 1), ("VALID", 2)])
def test_factored_conv_runs_the_product_kernel(mode, padding, strides):
    model = OneConv(strides, padding)
    x = jax.random.normal(jax.random.key(0), (2, 9, 9, 4))
    p = model.init(jax.random.key(1), x)["params"]
    lr, q = factorize(model, p, ranks={"c": 4}, mode=mode)
    u, v = q["c"]["u"], q["c"]["v"]
    dense = {"c": {"kernel": rebuild(u, v, (3, 3, 4, 6), mode).astype(np.float32), "bias": p["c"]["bias"]}}
    np.testing.assert_allclose(lr.apply({"params": q}, x), model.apply({"params": dense}, x), rtol=1e-4, atol=1e-4)


def test_factorize_a_cnn_keeps_paths_and_approximates_each_kernel():
    model = CNN(channels=(8, 16), hidden=32)
    x = jax.random.normal(jax.random.key(2), (3, 8, 8, 1))
    p = model.init(jax.random.key(0), x)["params"]
    lr, q = factorize(model, p, ranks={"conv2": 4, "fc1": 5})
    assert set(q["conv2"]) == {"u", "v", "bias"} and q["conv2"]["u"].shape == (3, 3, 8, 4)
    assert q["fc1"]["u"].shape == (4 * 16, 5) and "kernel" in p["fc1"]  # caller's params untouched
    dense = dict(p, conv2=dict(p["conv2"], kernel=rebuild(q["conv2"]["u"], q["conv2"]["v"], (3, 3, 8, 16), "reshape")),
                 fc1=dict(p["fc1"], kernel=np.asarray(q["fc1"]["u"]) @ np.asarray(q["fc1"]["v"])))
    np.testing.assert_allclose(lr.apply({"params": q}, x), model.apply({"params": dense}, x), rtol=1e-4, atol=1e-4)
    lr2, q2 = factorize(model, p, energy={"fc1": 0.5})
    s = np.linalg.svd(np.asarray(p["fc1"]["kernel"]), compute_uv=False)
    assert lr2.ranks["fc1"] == rank_for_energy(s, 0.5) == int(np.argmax(np.cumsum(s**2) / np.sum(s**2) >= 0.5)) + 1


def test_budget_is_respected_and_buys_the_most_energy_per_weight():
    rng = np.random.default_rng(0)
    low = rng.normal(size=(60, 3)) @ rng.normal(size=(3, 50))  # rank 3: little to gain after 3
    kernels = {"low": low + 1e-3 * rng.normal(size=(60, 50)), "full": rng.normal(size=(60, 50))}
    ranks = ranks_for_budget(kernels, 110 * 20)
    assert ranks["low"] == 3 and ranks["full"] == 17
    assert sum(r * 110 for r in ranks.values()) <= 110 * 20


def test_factored_mlp_trains_through_the_ordinary_step():
    model = MLP((32,))
    x = jax.random.normal(jax.random.key(0), (64, 20))
    y = (x[:, 0] > 0).astype(jnp.int32)
    p = model.init(jax.random.key(1), x[:1])["params"]
    lr, q = factorize(model, p, ranks={"fc1": 4})
    opt = optax.adam(1e-2)
    state = jc.init_train_state(q, opt)
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(lr), opt))
    batch = {"image": x, "label": y}
    state, first = step(state, batch)
    for _ in range(30):
        state, m = step(state, batch)
    assert m["loss"] < 0.5 * first["loss"]
    assert state.params["fc1"]["u"].shape == (20, 4) and "kernel" not in state.params["fc1"]
    assert not np.allclose(state.params["fc1"]["v"], q["fc1"]["v"])


def test_bad_arguments_name_the_fix():
    model = MLP((8,))
    p = model.init(jax.random.key(0), jnp.zeros((1, 5)))["params"]
    with pytest.raises(ValueError, match="exactly one"):
        factorize(model, p, ranks={"fc1": 2}, energy={"fc1": 0.5})
    with pytest.raises(ValueError, match="not a layer"):
        factorize(model, p, ranks={"fc9": 2})
    with pytest.raises(ValueError, match="rank must be"):
        factorize(model, p, ranks={"fc1": 6})
    with pytest.raises(ValueError, match="not Dense or Conv"):
        LowRank(model, {"fc9": 2}).init(jax.random.key(0), jnp.zeros((1, 5)))
    with pytest.raises(ValueError, match="mode"):
        factor_kernel(np.ones((3, 3, 2, 2)), 1, "tucker")
