"""Distillation: kd_loss and cross_entropy against float64 NumPy and PyTorch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.distill import cross_entropy, kd_loss

TEMPERATURES = [0.5, 1.0, 4.0, 20.0, 100.0]


def _log_softmax(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _ref_kd(s, t, T, labels=None, kd_weight=1.0, ce_weight=0.0):
    """float64: kd_w * T^2 * sum p_t (log p_t - log p_s) + ce_w * CE, and its gradient wrt s."""
    s64, t64 = np.asarray(s, np.float64), np.asarray(t, np.float64)
    lp, lq = _log_softmax(t64 / T), _log_softmax(s64 / T)
    p, q = np.exp(lp), np.exp(lq)
    loss = kd_weight * T**2 * np.sum(p * (lp - lq), -1)
    grad = kd_weight * T * (q - p)
    if ce_weight:
        ls = _log_softmax(s64)
        onehot = np.eye(s64.shape[-1])[labels]
        loss = loss + ce_weight * -np.sum(onehot * ls, -1)
        grad = grad + ce_weight * (np.exp(ls) - onehot)
    return loss, grad


def _logits(seed, shape=(16, 10), scale=2.0):
    rng = np.random.default_rng(seed)
    return (rng.normal(size=shape) * scale).astype(np.float32), (rng.normal(size=shape) * scale).astype(np.float32)


# float32 log-softmax carries an absolute error of about eps32 * |log C| ~ 3e-7 per log-prob,
# which the T^2 factor amplifies; this is the bound used for the loss values below.
def _atol(T):
    return 4e-7 * T**2


def test_kd_loss_golden_by_hand():
    # two classes, T = 1: p_t = (0.5, 0.5), p_s = softmax(0, ln 3) = (1/4, 3/4)
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln(4/3)
    s = jnp.array([[0.0, np.log(3.0)]], jnp.float32)
    t = jnp.array([[1.0, 1.0]], jnp.float32)
    np.testing.assert_allclose(float(kd_loss(s, t, temperature=1.0)[0]), 0.5 * np.log(4 / 3), rtol=1e-6)
    # T = 2: logits scaled by 2 give the same softmaxes, and the value is multiplied by T^2 = 4
    np.testing.assert_allclose(
        float(kd_loss(2 * s, 2 * t, temperature=2.0)[0]), 4 * 0.5 * np.log(4 / 3), rtol=1e-6
    )
    # identical logits: exactly zero
    assert kd_loss(s, s, temperature=3.0).tolist() == [0.0]
    # gradient by hand: T * (p_s - p_t) = (-0.25, 0.25)
    g = jax.grad(lambda x: kd_loss(x, t, temperature=1.0).sum())(s)
    np.testing.assert_allclose(g, [[-0.25, 0.25]], atol=1e-7)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_loss_and_gradient_match_float64(T):
    s, t = _logits(int(T * 10))
    labels = np.random.default_rng(1).integers(0, 10, size=16)
    for kd_w, ce_w in ((1.0, 0.0), (0.7, 0.3), (0.0, 1.0)):
        ref, ref_g = _ref_kd(s, t, T, labels, kd_w, ce_w)
        f = lambda x: kd_loss(x, jnp.asarray(t), temperature=T, labels=jnp.asarray(labels),  # noqa: E731
                              kd_weight=kd_w, ce_weight=ce_w)
        out = f(jnp.asarray(s))
        assert out.shape == (16,) and out.dtype == jnp.float32
        got = np.asarray(out, np.float64)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=kd_w * _atol(T))
        g = np.asarray(jax.grad(lambda x: f(x).sum())(jnp.asarray(s)), np.float64)
        np.testing.assert_allclose(g, ref_g, rtol=1e-5, atol=1e-5 * np.abs(ref_g).max())


@pytest.mark.parametrize("T", TEMPERATURES)
def test_soft_term_gradient_is_T_times_softmax_difference(T):
    s, t = _logits(7, shape=(4, 3, 6))
    g = jax.grad(lambda x: kd_loss(x, jnp.asarray(t), temperature=T).sum())(jnp.asarray(s))
    expect = T * (np.exp(_log_softmax(np.float64(s) / T)) - np.exp(_log_softmax(np.float64(t) / T)))
    np.testing.assert_allclose(g, expect, rtol=1e-5, atol=1e-5 * np.abs(expect).max())
    assert g.shape == (4, 3, 6)


# Precision at high temperature: the soft term is a small difference of float32 log-softmaxes
# multiplied by T^2, so its relative error grows like T^2 (about 3e-4 at T = 20 and 7e-3 at
# T = 100 for unit-scale logits); a centred log1p/expm1 formulation stays near 1e-5.
@pytest.mark.parametrize("T", [20.0, 100.0])
def test_kd_loss_value_relative_precision_at_high_temperature(T):
    rng = np.random.default_rng(0)
    s = rng.normal(size=(64, 10)).astype(np.float32)
    t = rng.normal(size=(64, 10)).astype(np.float32)
    ref, _ = _ref_kd(s, t, T)
    got = np.asarray(kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=T), np.float64)
    np.testing.assert_allclose(got, ref, rtol=5e-5, atol=0)


@pytest.mark.parametrize("T", TEMPERATURES)
def test_kd_loss_mean_matches_torch_kldiv_batchmean(T):
    torch = pytest.importorskip("torch")
    s, t = _logits(3 + int(T))
    st_ = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    tt = torch.tensor(t, dtype=torch.float64)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    want = kl(torch.log_softmax(st_ / T, -1), torch.softmax(tt / T, -1)) * T**2
    want.backward()
    got = jnp.mean(kd_loss(jnp.asarray(s), jnp.asarray(t), temperature=T))
    np.testing.assert_allclose(float(got), want.item(), rtol=1e-5, atol=_atol(T))
    g = jax.grad(lambda x: jnp.mean(kd_loss(x, jnp.asarray(t), temperature=T)))(jnp.asarray(s))
    tg = st_.grad.numpy()
    np.testing.assert_allclose(g, tg, rtol=1e-5, atol=1e-5 * np.abs(tg).max())


def test_no_gradient_flows_to_teacher():
    s, t = _logits(9)
    labels = jnp.arange(16) % 10
    g = jax.grad(
        lambda tt: kd_loss(jnp.asarray(s), tt, temperature=4.0, labels=labels, ce_weight=0.5).sum()
    )(jnp.asarray(t))
    assert np.all(np.asarray(g) == 0.0)
    g_both = jax.grad(lambda a, b: kd_loss(a, b, temperature=2.0).sum(), argnums=(0, 1))(
        jnp.asarray(s), jnp.asarray(t)
    )
    assert np.any(np.asarray(g_both[0]) != 0.0) and np.all(np.asarray(g_both[1]) == 0.0)


@pytest.mark.parametrize("T", [0.5, 1.0, 4.0])
def test_finite_for_huge_logits(T):
    s, t = _logits(11, scale=1e4)
    labels = np.random.default_rng(2).integers(0, 10, size=16)
    f = lambda x: kd_loss(x, jnp.asarray(t), temperature=T, labels=jnp.asarray(labels), ce_weight=0.5)  # noqa: E731
    got = np.asarray(f(jnp.asarray(s)), np.float64)
    g = np.asarray(jax.grad(lambda x: f(x).sum())(jnp.asarray(s)))
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(g))
    ref, ref_g = _ref_kd(s, t, T, labels, 1.0, 0.5)
    assert ref.min() > 1e3  # these are large losses, not zeros
    np.testing.assert_allclose(got, ref, rtol=1e-5)
    np.testing.assert_allclose(g, ref_g, rtol=0, atol=1e-5 * np.abs(ref_g).max())


def test_cross_entropy_matches_torch_per_example():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(32, 7)) * 3).astype(np.float32)
    labels = rng.integers(0, 7, size=32)
    want = torch.nn.functional.cross_entropy(
        torch.tensor(logits, dtype=torch.float64), torch.tensor(labels), reduction="none"
    ).numpy()
    got = cross_entropy(jnp.asarray(logits), jnp.asarray(labels, jnp.int32))
    assert got.shape == (32,)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # extra leading axes: (batch, seq, classes) -> torch wants classes on axis 1
    logits3 = (rng.normal(size=(4, 5, 7))).astype(np.float32)
    labels3 = rng.integers(0, 7, size=(4, 5))
    want3 = torch.nn.functional.cross_entropy(
        torch.tensor(logits3, dtype=torch.float64).permute(0, 2, 1), torch.tensor(labels3), reduction="none"
    ).numpy()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits3), jnp.asarray(labels3)), want3, rtol=1e-6, atol=1e-6)


def test_cross_entropy_golden():
    got = cross_entropy(jnp.array([[0.0, 0.0], [0.0, np.log(3.0)]], jnp.float32), jnp.array([1, 1]))
    np.testing.assert_allclose(got, [np.log(2.0), np.log(4 / 3)], rtol=1e-6)


def test_cross_entropy_soft_labels_match_float64_and_torch():
    """Class-probability labels (mixup): value and gradient vs float64 NumPy and torch."""
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(16, 7)) * 3).astype(np.float32)
    probs = rng.dirichlet(np.ones(7), size=16).astype(np.float32)
    z = logits.astype(np.float64)
    logp = z - z.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    want = -(probs.astype(np.float64) * logp).sum(-1)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(probs)), want, rtol=1e-6, atol=1e-6)
    # d/dz sum_n CE = softmax(z) - y per row (rows of y sum to 1)
    grad = jax.grad(lambda l: cross_entropy(l, jnp.asarray(probs)).sum())(jnp.asarray(logits))
    want_grad = np.exp(logp) - probs.astype(np.float64)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-6)
    # one-hot rows give the integer-label value
    labels = rng.integers(0, 7, size=16)
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jax.nn.one_hot(labels, 7)),
                               cross_entropy(jnp.asarray(logits), jnp.asarray(labels)), rtol=1e-6)
    # the hard-label term of kd_loss takes them too
    t = jnp.asarray(rng.normal(size=(16, 7)), jnp.float32)
    np.testing.assert_allclose(
        kd_loss(jnp.asarray(logits), t, temperature=4.0, kd_weight=0.0, ce_weight=1.0, labels=jnp.asarray(probs)),
        want, rtol=1e-6, atol=1e-6)
    torch = pytest.importorskip("torch")
    want_t = torch.nn.functional.cross_entropy(torch.tensor(z), torch.tensor(probs, dtype=torch.float64),
                                               reduction="none").numpy()
    np.testing.assert_allclose(cross_entropy(jnp.asarray(logits), jnp.asarray(probs)), want_t, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


def test_errors_name_the_argument():
    s = jnp.zeros((4, 10))
    t = jnp.zeros((4, 10))
    for bad in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            kd_loss(s, t, temperature=bad)
    with pytest.raises(TypeError, match="temperature must be a positive number"):
        kd_loss(s, t, temperature="4")
    with pytest.raises(ValueError, match="kd_weight must be >= 0"):
        kd_loss(s, t, temperature=1.0, kd_weight=-0.1)
    with pytest.raises(ValueError, match="ce_weight must be >= 0"):
        kd_loss(s, t, temperature=1.0, ce_weight=-1, labels=jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match=r"student_logits shape \(4, 10\) and teacher_logits shape \(4, 9\) differ"):
        kd_loss(s, jnp.zeros((4, 9)), temperature=1.0)
    with pytest.raises(TypeError, match="labels must be integer class indices"):
        kd_loss(s, t, temperature=1.0, labels=jnp.zeros(4), ce_weight=0.5)
    with pytest.raises(ValueError, match=r"labels shape \(5,\) does not match logits shape \(4, 10\)"):
        kd_loss(s, t, temperature=1.0, labels=jnp.zeros(5, jnp.int32), ce_weight=0.5)
    with pytest.raises(ValueError, match="labels are required when ce_weight != 0"):
        kd_loss(s, t, temperature=1.0, ce_weight=0.5)
    with pytest.raises(TypeError, match="student_logits must be a float array"):
        kd_loss(jnp.zeros((4, 10), jnp.int32), t, temperature=1.0)
    with pytest.raises(TypeError, match="teacher_logits must be a float array"):
        kd_loss(s, jnp.zeros((4, 10), jnp.int32), temperature=1.0)
    with pytest.raises(ValueError, match="student_logits must have a class axis"):
        kd_loss(jnp.float32(1.0), jnp.float32(1.0), temperature=1.0)
    with pytest.raises(TypeError, match="labels must be integer class indices or float class probabilities"):
        cross_entropy(s, jnp.zeros(4))
    with pytest.raises(TypeError, match=r"of the logits' shape \(4, 10\), got dtype float32 and shape \(4, 9\)"):
        cross_entropy(s, jnp.zeros((4, 9)))
    with pytest.raises(TypeError, match="logits must be a float array"):
        cross_entropy(jnp.zeros((4, 10), jnp.int32), jnp.zeros(4, jnp.int32))
