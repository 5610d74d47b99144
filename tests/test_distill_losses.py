"""Hard-label KD, DKD, FitNets hints, attention transfer and RKD against float64 NumPy and PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.distill import (
    attention_transfer_loss,
    dkd_loss,
    hard_label_kd_loss,
    hint_loss,
    init_regressor,
    kd_loss,
    rkd_angle_loss,
    rkd_distance_loss,
)

TEMPERATURES = [0.5, 1.0, 4.0, 20.0, 100.0]


def _lsm(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _fd_grad(f, x, h=1e-6):
    """Central finite differences of a float64 NumPy scalar function."""
    x = np.asarray(x, np.float64)
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        e = np.zeros_like(x)
        e[idx] = h
        g[idx] = (f(x + e) - f(x - e)) / (2 * h)
    return g


def _pair(seed, shape=(6, 5), scale=2.0):
    rng = np.random.default_rng(seed)
    return tuple((rng.normal(size=shape) * scale).astype(np.float32) for _ in range(2))


# ---------------------------------------------------------------- hard-label KD
def _ref_hard(s, t, eps):
    c = s.shape[-1]
    target = (1 - eps) * np.eye(c)[np.argmax(t, -1)] + eps / c
    ls = _lsm(s)
    return -(target * ls).sum(-1), np.exp(ls) - target


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_hard_label_kd_matches_float64_and_torch(eps):
    torch = pytest.importorskip("torch")
    s, t = _pair(0)
    loss, grad = _ref_hard(s, t, eps)
    got = hard_label_kd_loss(jnp.asarray(s), jnp.asarray(t), label_smoothing=eps)
    np.testing.assert_allclose(np.asarray(got), loss, rtol=1e-5, atol=1e-6)
    g = jax.grad(lambda x: hard_label_kd_loss(x, jnp.asarray(t), label_smoothing=eps).sum())(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g), grad, atol=1e-6)
    ref = torch.nn.functional.cross_entropy(
        torch.tensor(s, dtype=torch.float64), torch.tensor(t).argmax(-1), label_smoothing=eps, reduction="none")
    np.testing.assert_allclose(np.asarray(got), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_hard_label_kd_adds_ground_truth_cross_entropy():
    s, t = _pair(1)
    y = np.array([0, 1, 2, 3, 4, 0])
    got = hard_label_kd_loss(jnp.asarray(s), jnp.asarray(t), labels=jnp.asarray(y), ce_weight=0.5, kd_weight=2.0)
    want = 2.0 * _ref_hard(s, t, 0.0)[0] + 0.5 * -_lsm(s)[np.arange(6), y]
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# ---------------------------------------------------------------- DKD
def _ref_dkd(s, t, y, T, a, b, ce=0.0):
    """float64 DKD from its definition: binary target-vs-rest KL plus the renormalised non-target KL."""
    s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
    n, c = s.shape
    gt = np.eye(c, dtype=bool)[y]
    ps, pt = np.exp(_lsm(s / T)), np.exp(_lsm(t / T))
    bs = np.stack([ps[gt], 1 - ps[gt]], -1)
    bt = np.stack([pt[gt], 1 - pt[gt]], -1)
    tckd = (bt * (np.log(bt) - np.log(bs))).sum(-1)
    qs = ps[~gt].reshape(n, c - 1)
    qt = pt[~gt].reshape(n, c - 1)
    qs, qt = qs / qs.sum(-1, keepdims=True), qt / qt.sum(-1, keepdims=True)
    nckd = (qt * (np.log(qt) - np.log(qs))).sum(-1)
    return T**2 * (a * tckd + b * nckd) + ce * -_lsm(s)[np.arange(n), y]


def _torch_dkd(s, t, y, T, a, b):
    """The authors' masked formulation (logits minus 1000 at the target), written in PyTorch."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(t, dtype=torch.float64)
    gt = F.one_hot(torch.tensor(y), s.shape[-1]).bool()
    ps, pt = F.softmax(s / T, 1), F.softmax(t / T, 1)

    def cat(p):
        return torch.cat([(p * gt).sum(1, keepdim=True), (p * ~gt).sum(1, keepdim=True)], 1)

    bs, bt = cat(ps), cat(pt)
    tckd = (bt * (torch.log(bt) - torch.log(bs))).sum(1) * T**2
    lq = F.log_softmax(s / T - 1000.0 * gt, 1)
    pt2 = F.softmax(t / T - 1000.0 * gt, 1)
    nckd = (pt2 * (torch.log(pt2 + 1e-300) - lq)).sum(1) * T**2
    loss = a * tckd + b * nckd
    (g,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach().numpy(), g.numpy()


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_dkd_matches_float64_definition_torch_and_finite_difference_gradient(T):
    s, t = _pair(2, scale=1.5)
    y = np.array([0, 1, 2, 3, 4, 2])
    want = _ref_dkd(s, t, y, T, 1.0, 8.0)
    got = dkd_loss(jnp.asarray(s), jnp.asarray(t), labels=jnp.asarray(y), temperature=T, ce_weight=0.0)
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=1e-6)
    t_loss, t_grad = _torch_dkd(s, t, y, T, 1.0, 8.0)
    np.testing.assert_allclose(want, t_loss, rtol=1e-9, atol=1e-12)  # the two references agree
    g = jax.grad(lambda x: dkd_loss(x, jnp.asarray(t), labels=jnp.asarray(y), temperature=T, ce_weight=0.0).sum())(
        jnp.asarray(s))
    fd = _fd_grad(lambda x: _ref_dkd(x, t, y, T, 1.0, 8.0).sum(), s)
    np.testing.assert_allclose(np.asarray(g), fd, atol=2e-5)
    np.testing.assert_allclose(np.asarray(g), t_grad, atol=2e-5)


def test_dkd_with_unit_weights_reduces_to_kd_when_nckd_is_scaled_by_one_minus_pt():
    # Zhao et al. eq. (5): KD = TCKD + (1 - p_t) NCKD; with tckd_weight=1 and nckd_weight=(1 - p_t)
    # per example the two losses coincide (checked through the float64 reference of each term).
    s, t = _pair(3)
    y = np.array([1, 0, 4, 2, 3, 3])
    T = 2.0
    pt = np.exp(_lsm(t / T))[np.arange(6), y]
    tckd = _ref_dkd(s, t, y, T, 1.0, 0.0)
    nckd = _ref_dkd(s, t, y, T, 0.0, 1.0)
    kd = np.asarray(kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=T))
    np.testing.assert_allclose(tckd + (1 - pt) * nckd, kd, rtol=1e-4, atol=1e-5)
    got_t = dkd_loss(jnp.asarray(s), jnp.asarray(t), labels=jnp.asarray(y), temperature=T, nckd_weight=0.0, ce_weight=0)
    np.testing.assert_allclose(np.asarray(got_t), tckd, rtol=1e-4, atol=1e-6)


def test_dkd_ce_term():
    s, t = _pair(4)
    y = np.array([1, 0, 4, 2, 3, 3])
    got = dkd_loss(jnp.asarray(s), jnp.asarray(t), labels=jnp.asarray(y), temperature=4.0, tckd_weight=0.5,
                   nckd_weight=2.0, ce_weight=1.0)
    np.testing.assert_allclose(np.asarray(got), _ref_dkd(s, t, y, 4.0, 0.5, 2.0, ce=1.0), rtol=2e-5, atol=1e-5)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_logit_losses_finite_for_huge_logits(T):
    rng = np.random.default_rng(5)
    s = jnp.asarray(rng.normal(size=(8, 10)) * 1e4, jnp.float32)
    t = jnp.asarray(rng.normal(size=(8, 10)) * 1e4, jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, 8), jnp.int32)
    for f in (lambda x: dkd_loss(x, t, labels=y, temperature=T),
              lambda x: hard_label_kd_loss(x, t, label_smoothing=0.1, labels=y, ce_weight=1.0)):
        val, g = jax.value_and_grad(lambda x: f(x).sum())(s)
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g)))


def test_no_gradient_to_teacher_logits():
    s, t = map(jnp.asarray, _pair(6))
    y = jnp.array([0, 1, 2, 3, 4, 0])
    for f in (lambda tt: dkd_loss(s, tt, labels=y).sum(), lambda tt: hard_label_kd_loss(s, tt, label_smoothing=0.1).sum()):
        assert float(jnp.abs(jax.grad(f)(t)).max()) == 0.0


# ---------------------------------------------------------------- FitNets hints
def test_hint_loss_with_regressor_matches_float64_and_gradients():
    rng = np.random.default_rng(7)
    s = rng.normal(size=(3, 4, 4, 5)).astype(np.float32)
    t = rng.normal(size=(3, 4, 4, 8)).astype(np.float32)
    reg = init_regressor(jax.random.key(0), s.shape, t.shape)
    w, b = np.asarray(reg["kernel"], np.float64), np.asarray(reg["bias"], np.float64)
    r = s.astype(np.float64) @ w + b
    want = ((r - t) ** 2).reshape(3, -1).mean(-1)
    got = hint_loss(jnp.asarray(s), jnp.asarray(t), regressor=reg)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    d = 2 * (r - t) / (4 * 4 * 8)  # d loss_sum / d r
    g_reg, g_s = jax.grad(lambda rg, x: hint_loss(x, jnp.asarray(t), regressor=rg).sum(), argnums=(0, 1))(
        reg, jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g_reg["kernel"]), np.einsum("nhwc,nhwd->cd", s, d), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_reg["bias"]), d.sum((0, 1, 2)), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_s), d @ w.T, rtol=1e-4, atol=1e-6)


def test_hint_loss_matches_torch_1x1_conv_mse():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    s = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
    t = rng.normal(size=(2, 3, 3, 6)).astype(np.float32)
    reg = init_regressor(jax.random.key(1), s.shape, t.shape)
    conv = torch.nn.functional.conv2d(torch.tensor(s).permute(0, 3, 1, 2).double(),
                                      torch.tensor(np.asarray(reg["kernel"]).T[:, :, None, None]).double(),
                                      torch.tensor(np.asarray(reg["bias"])).double())
    ref = torch.nn.functional.mse_loss(conv, torch.tensor(t).permute(0, 3, 1, 2).double(), reduction="none")
    got = hint_loss(jnp.asarray(s), jnp.asarray(t), regressor=reg)
    np.testing.assert_allclose(np.asarray(got), ref.mean((1, 2, 3)).numpy(), rtol=1e-5)


# ---------------------------------------------------------------- attention transfer
def _torch_at(s, t):
    """The authors' code: at(x) = normalize(x.pow(2).mean(1).view(N, -1)); (at(x) - at(y)).pow(2)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(t, dtype=torch.float64)

    def at(x):  # NHWC -> NCHW as in the original
        return F.normalize(x.permute(0, 3, 1, 2).pow(2).mean(1).view(x.shape[0], -1))

    loss = (at(s) - at(t)).pow(2).mean(1)
    (g,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach().numpy(), g.numpy()


def test_attention_transfer_matches_float64_and_torch():
    rng = np.random.default_rng(9)
    s = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    t = rng.normal(size=(3, 4, 5, 16)).astype(np.float32)

    def ref(x):
        def q(a):
            a = (np.asarray(a, np.float64) ** 2).sum(-1).reshape(a.shape[0], -1)
            return a / np.linalg.norm(a, axis=-1, keepdims=True)

        return ((q(x) - q(t)) ** 2).mean(-1)

    got = attention_transfer_loss(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got), ref(s), rtol=1e-5, atol=1e-9)
    t_loss, t_grad = _torch_at(s, t)
    np.testing.assert_allclose(ref(s), t_loss, rtol=1e-9)
    g = jax.grad(lambda x: attention_transfer_loss(x, jnp.asarray(t)).sum())(jnp.asarray(s))
    np.testing.assert_allclose(np.asarray(g), t_grad, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(np.asarray(g), _fd_grad(lambda x: ref(x).sum(), s), rtol=1e-3, atol=1e-7)


# ---------------------------------------------------------------- RKD
def _torch_rkd(s, t):
    """Park et al.'s formulation in PyTorch (distance normalised by the mean non-zero distance)."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    s = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(t, dtype=torch.float64)

    def dist(e):
        d = (e[:, None, :] - e[None, :, :]).pow(2).sum(-1).clamp(min=1e-24).sqrt()
        d = d * (1 - torch.eye(e.shape[0], dtype=e.dtype))
        return d / d[d > 0].mean()

    def angle(e):
        diff = e.unsqueeze(0) - e.unsqueeze(1)
        u = F.normalize(diff, p=2, dim=2)
        return torch.bmm(u, u.transpose(1, 2))

    out = []
    for f in (dist, angle):
        loss = F.smooth_l1_loss(f(s), f(t), reduction="none").reshape(s.shape[0], -1).mean(1)
        (g,) = torch.autograd.grad(loss.sum(), s)
        out.append((loss.detach().numpy(), g.numpy()))
    return out


def _ref_rkd(s, t):
    """float64 NumPy: per-anchor means of smooth-L1 over normalised distances and over angles."""
    def sl1(d):
        d = np.abs(d)
        return np.where(d < 1, 0.5 * d * d, d - 0.5)

    def dist(e):
        e = np.asarray(e, np.float64)
        d = np.linalg.norm(e[:, None] - e[None], axis=-1)
        return d / d[d > 0].mean()

    def angle(e):
        e = np.asarray(e, np.float64)
        diff = e[None] - e[:, None]
        n = np.linalg.norm(diff, axis=-1, keepdims=True)
        u = np.divide(diff, n, out=np.zeros_like(diff), where=n > 0)
        return np.einsum("ijd,ikd->ijk", u, u)

    return sl1(dist(s) - dist(t)).mean(-1), sl1(angle(s) - angle(t)).reshape(len(s), -1).mean(-1)


def test_rkd_distance_and_angle_match_float64_and_torch():
    rng = np.random.default_rng(10)
    s = rng.normal(size=(6, 5)).astype(np.float32)
    t = (rng.normal(size=(6, 9)) * 3).astype(np.float32)
    ref_d, ref_a = _ref_rkd(s, t)
    (td, tgd), (ta, tga) = _torch_rkd(s, t)
    np.testing.assert_allclose(ref_d, td, rtol=1e-9)
    np.testing.assert_allclose(ref_a, ta, rtol=1e-9)
    got_d = rkd_distance_loss(jnp.asarray(s), jnp.asarray(t))
    got_a = rkd_angle_loss(jnp.asarray(s), jnp.asarray(t))
    np.testing.assert_allclose(np.asarray(got_d), ref_d, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(got_a), ref_a, rtol=1e-5, atol=1e-7)
    gd = jax.grad(lambda x: rkd_distance_loss(x, jnp.asarray(t)).sum())(jnp.asarray(s))
    ga = jax.grad(lambda x: rkd_angle_loss(x, jnp.asarray(t)).sum())(jnp.asarray(s))
    assert np.all(np.isfinite(np.asarray(gd))) and np.all(np.isfinite(np.asarray(ga)))
    np.testing.assert_allclose(np.asarray(gd), tgd, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ga), tga, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gd), _fd_grad(lambda x: _ref_rkd(x, t)[0].sum(), s), rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(np.asarray(ga), _fd_grad(lambda x: _ref_rkd(x, t)[1].sum(), s), rtol=1e-3, atol=1e-6)


def test_rkd_gradient_finite_with_duplicate_embeddings():
    s = jnp.array([[1.0, 2.0], [1.0, 2.0], [0.0, 1.0]])
    t = jnp.array([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]])
    for f in (rkd_distance_loss, rkd_angle_loss):
        g = jax.grad(lambda x: f(x, t).sum())(s)
        assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------- bad input
def test_errors_name_the_problem():
    s, t = jnp.zeros((4, 10)), jnp.zeros((4, 5))
    y = jnp.zeros(4, jnp.int32)
    with pytest.raises(ValueError, match="same classes"):
        dkd_loss(s, t, labels=y)
    with pytest.raises(ValueError, match="same classes"):
        hard_label_kd_loss(s, t)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dkd_loss(s, s, labels=y, temperature=0.0)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        dkd_loss(s, s, labels=y, temperature=-1.0)
    with pytest.raises(ValueError, match="nckd_weight must be >= 0"):
        dkd_loss(s, s, labels=y, nckd_weight=-8.0)
    with pytest.raises(ValueError, match="tckd_weight must be >= 0"):
        dkd_loss(s, s, labels=y, tckd_weight=-1.0)
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        hard_label_kd_loss(s, s, ce_weight=-0.1)
    with pytest.raises(ValueError, match="labels are required"):
        hard_label_kd_loss(s, s, ce_weight=1.0)
    with pytest.raises(ValueError, match="label_smoothing"):
        hard_label_kd_loss(s, s, label_smoothing=1.5)
    with pytest.raises(ValueError, match="add a regressor"):
        hint_loss(jnp.zeros((2, 8)), jnp.zeros((2, 16)))
    with pytest.raises(ValueError, match="every axis but the last"):
        init_regressor(jax.random.key(0), (2, 4, 4, 8), (2, 8, 8, 16))
    with pytest.raises(ValueError, match="same resolution"):
        attention_transfer_loss(jnp.zeros((2, 4, 4, 8)), jnp.zeros((2, 8, 8, 8)))
    with pytest.raises(ValueError, match="batch of >= 2"):
        rkd_angle_loss(jnp.zeros((1, 3)), jnp.zeros((1, 3)))
    with pytest.raises(TypeError, match="float"):
        hint_loss(jnp.zeros((2, 8), jnp.int32), jnp.zeros((2, 8)))


def test_feature_losses_finite_for_huge_activations():
    rng = np.random.default_rng(11)
    s = jnp.asarray(rng.normal(size=(4, 3, 3, 5)) * 1e4, jnp.float32)
    t = jnp.asarray(rng.normal(size=(4, 3, 3, 5)) * 1e4, jnp.float32)
    for f in (hint_loss, attention_transfer_loss, rkd_distance_loss, rkd_angle_loss):
        val, g = jax.jit(jax.value_and_grad(lambda x: f(x, t).sum()))(s)  # jitted: one compile per loss
        assert np.isfinite(float(val)) and np.all(np.isfinite(np.asarray(g))), f.__name__
