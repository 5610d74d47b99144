"""SparseGPT, GPTQ and Wanda on one layer against float64 NumPy re-derivations of the papers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.oneshot import gptq, sparsegpt, wanda_mask
from jaxcompress.prune.structures import NM, Unstructured
from jaxcompress.quant.weights import weight_quantization


# ---------------------------------------------------------------------------------------------
# The reference: Algorithm 1 of each paper in float64 NumPy, written from the pseudo-code.
# Layout as in the papers: W is (rows = outputs, columns = inputs); H = 2 X^T X.
# The quantizer is min/max asymmetric per row (GPTQ's), with PyTorch's fake-quant arithmetic in
# float32 (the library's grid): q = round(x * (1 / s)) + z, clipped, then (q - z) * s.
# ---------------------------------------------------------------------------------------------
def np_grid(w, bits):
    lo = np.minimum(w.min(axis=1), 0).astype(np.float32)
    hi = np.maximum(w.max(axis=1), 0).astype(np.float32)
    qmax = 2**bits - 1
    # XLA compiles the division by the constant level count as a product with its float32 reciprocal.
    scale = np.maximum((hi - lo) * np.float32(1.0 / qmax), np.float32(1e-8))
    zero = np.clip(-np.round(lo / scale), 0, qmax).astype(np.float32)
    return scale, zero, qmax


def np_quant(x, grid):
    scale, zero, qmax = grid
    inv = np.float32(1.0) / scale
    q = np.round(x.astype(np.float32) * inv) + zero
    return ((np.clip(q, 0, qmax) - zero) * scale).astype(np.float64)


def np_prepare(kernel, xtx, percdamp):
    w = np.array(kernel, np.float64).T.copy()
    h = 2.0 * np.array(xtx, np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def np_upper_inverse_cholesky(h, percdamp):
    h = h + percdamp * np.mean(np.diag(h)) * np.eye(len(h))
    return np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U


def np_gptq(kernel, xtx, bits, group_size=None, act_order=False, blocksize=128, percdamp=0.01):
    """GPTQ, Frantar et al. 2022, Algorithm 1 with lazy batches, groups and act-order."""
    w, h = np_prepare(kernel, xtx, percdamp)
    rows, cols = w.shape
    grid = np_grid(w, bits)
    if act_order:
        perm = np.argsort(-np.diag(h), kind="stable")
        static = [np_grid(w[:, g : g + group_size], bits) for g in range(0, cols, group_size)] if group_size else None
        w, h = w[:, perm], h[perm][:, perm]
    u = np_upper_inverse_cholesky(h, percdamp)
    q_all = np.zeros_like(w)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        err1 = np.zeros_like(w1)
        for i in range(i2 - i1):
            j = i1 + i
            if group_size and act_order:
                grid = static[perm[j] // group_size]
            elif group_size and j % group_size == 0:
                grid = np_grid(w1[:, i : i + group_size], bits)  # the group's current weights
            d = u[j, j]
            q = np_quant(w1[:, i], grid)
            q_all[:, j] = q
            loss += np.sum((w1[:, i] - q) ** 2) / d**2 / 2
            err = (w1[:, i] - q) / d
            w1[:, i:] -= np.outer(err, u[j, j:i2])
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    if act_order:
        q_all = q_all[:, np.argsort(perm)]
    return q_all.T, loss


def np_sparsegpt(kernel, xtx, sparsity, nm=None, bits=None, blocksize=128, percdamp=0.01):
    """SparseGPT, Frantar & Alistarh 2023, Algorithm 1 (mask block = lazy block = ``blocksize``)."""
    w, h = np_prepare(kernel, xtx, percdamp)
    rows, cols = w.shape
    grid = np_grid(w, bits) if bits else None
    u = np_upper_inverse_cholesky(h, percdamp)
    keep = np.ones_like(w, bool)
    loss = 0.0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        w1 = w[:, i1:i2].copy()
        d = np.diag(u)[i1:i2]
        err1 = np.zeros_like(w1)
        prune = np.zeros_like(w1, bool)
        if nm is None:  # adaptive mask: the lowest w^2 / [H^-1]_cc^2 of the whole block
            score = (w1**2 / d[None, :] ** 2).ravel()
            prune.flat[np.argsort(score, kind="stable")[: round(sparsity * score.size)]] = True
        for i in range(i2 - i1):
            if nm is not None and i % nm[1] == 0:
                n, m = nm
                score = w1[:, i : i + m] ** 2 / d[i : i + m] ** 2
                for r in range(rows):
                    prune[r, i + np.argsort(score[r], kind="stable")[: m - n]] = True
            q = np.where(prune[:, i], 0.0, w1[:, i])
            if bits:
                q = np_quant(q, grid)
            loss += np.sum((w1[:, i] - q) ** 2) / d[i] ** 2 / 2
            err = (w1[:, i] - q) / d[i]
            w1[:, i:] -= np.outer(err, u[i1 + i, i1 + i : i2])
            err1[:, i] = err
            w1[:, i] = q
        w[:, i1:i2] = w1
        keep[:, i1:i2] = ~prune
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return w.T, keep.T, loss


def correlated(n_in, n_out, tokens=512, seed=0):
    """Inputs with correlated channels and a few large ones (as in Transformers), and a kernel."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(n_in, n_in)) * (0.8 ** np.arange(n_in) / 2)[:, None] + np.eye(n_in)
    x = rng.normal(size=(tokens, n_in)) @ mix
    x[:, :: max(n_in // 4, 1)] *= 6.0
    return x, rng.normal(size=(n_in, n_out))


def recon(kernel, new, x):
    return float(np.sum((x @ (np.asarray(kernel, np.float64) - np.asarray(new, np.float64))) ** 2))


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nm, bits", [(None, None), ((2, 4), None), ((4, 8), None), (None, 4)])
def test_sparsegpt_equals_numpy_reference(nm, bits):
    x, k = correlated(96, 24)
    xtx = x.T @ x
    want_w, want_keep, want_loss = np_sparsegpt(k, xtx, 0.5, nm=nm, bits=bits, blocksize=32)
    with jax.enable_x64(True):
        r = sparsegpt(jnp.asarray(k), jnp.asarray(xtx), 0.5, structure=NM(*nm) if nm else Unstructured(),
                      bits=bits, blocksize=32)
        got_w, got_keep, got_loss = np.asarray(r.kernel), np.asarray(r.mask), float(r.loss)
    assert got_w.dtype == np.float64
    np.testing.assert_array_equal(got_keep, want_keep)
    np.testing.assert_allclose(got_w, want_w, rtol=1e-9, atol=1e-9)
    assert got_loss == pytest.approx(want_loss, rel=1e-9)
    assert recon(k, got_w, x) == pytest.approx(recon(k, want_w, x), rel=1e-8)
    assert np.all(got_w[~got_keep] == 0) and np.mean(~got_keep) == 0.5
    if nm:
        n, m = nm
        assert np.all(got_keep.reshape(-1, m, got_keep.shape[1]).sum(axis=1) == n)


@pytest.mark.parametrize("group_size, act_order", [(None, False), (32, False), (16, False), (None, True), (16, True)])
def test_gptq_equals_numpy_reference(group_size, act_order):
    x, k = correlated(64, 24, seed=1)
    xtx = x.T @ x
    want_w, want_loss = np_gptq(k, xtx, 3, group_size=group_size, act_order=act_order, blocksize=32)
    with jax.enable_x64(True):
        r = gptq(jnp.asarray(k), jnp.asarray(xtx), 3, group_size=group_size, act_order=act_order, blocksize=32)
        got_w, got_loss = np.asarray(r.kernel), float(r.loss)
        on_grid = np.asarray(r.grid.quantize(r.kernel))
    np.testing.assert_allclose(got_w, want_w, rtol=1e-9, atol=1e-9)
    assert got_loss == pytest.approx(want_loss, rel=1e-9)
    assert recon(k, got_w, x) == pytest.approx(recon(k, want_w, x), rel=1e-8)
    np.testing.assert_array_equal(on_grid, got_w)  # the described grid reproduces the result exactly
    assert r.grid.scale.shape == ((64 // group_size, 24) if group_size else (1, 24))


def test_dead_inputs_get_zero_weight_and_no_nan():
    x, k = correlated(32, 8, seed=2)
    x[:, 3] = 0.0
    r = gptq(jnp.asarray(k, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), 4)
    assert np.all(np.isfinite(np.asarray(r.kernel))) and np.all(np.asarray(r.kernel)[3] == 0)


def test_sparsegpt_and_gptq_reconstruct_better_than_magnitude_and_rtn():
    x, k = correlated(64, 32, tokens=512, seed=3)
    xtx = jnp.asarray(x.T @ x, jnp.float32)
    kj = jnp.asarray(k, jnp.float32)
    sp = sparsegpt(kj, xtx, 0.5)
    mag = np.where(np.abs(k) >= np.median(np.abs(k), axis=0, keepdims=True), k, 0.0)  # 50% per output
    assert recon(k, sp.kernel, x) < 0.5 * recon(k, mag, x)
    sp24 = sparsegpt(kj, xtx, structure=NM(2, 4))
    mag24 = np.asarray(wanda_mask(kj, jnp.ones(64), structure=NM(2, 4))) * k  # |w| ranking per group
    assert recon(k, sp24.kernel, x) < 0.5 * recon(k, mag24, x)
    for group in (None, 32):
        q = gptq(kj, xtx, 4, group_size=group)
        rtn = weight_quantization(4, symmetric=False, group_size=group)
        p = {"k": kj}
        assert recon(k, q.kernel, x) < 0.5 * recon(k, rtn.apply(p, rtn.init(p))["k"], x)


def test_joint_sparsegpt_quantization_keeps_zeros_on_grid():
    x, k = correlated(64, 16, seed=4)
    r = sparsegpt(jnp.asarray(k, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), 0.5, bits=4, group_size=32)
    kern = np.asarray(r.kernel)
    assert np.all(kern[~np.asarray(r.mask)] == 0)
    np.testing.assert_array_equal(np.asarray(r.grid.quantize(r.kernel)), kern)


@pytest.mark.parametrize("structure", [None, NM(2, 4), NM(4, 8)])
def test_wanda_mask_equals_its_formula(structure):
    x, k = correlated(64, 12, seed=5)
    sum_sq = np.sum(x**2, axis=0)
    score = np.abs(k) * np.sqrt(sum_sq)[:, None]  # |W_ij| * ||X_j||_2, compared per output column
    want = np.ones_like(k, bool)
    if structure is None:
        for j in range(k.shape[1]):
            want[np.argsort(score[:, j], kind="stable")[:32], j] = False
        got = wanda_mask(jnp.asarray(k, jnp.float32), jnp.asarray(sum_sq, jnp.float32), 0.5)
    else:
        n, m = structure.n, structure.m
        for j in range(k.shape[1]):
            for g in range(0, 64, m):
                want[g + np.argsort(score[g : g + m, j], kind="stable")[: m - n], j] = False
        got = wanda_mask(jnp.asarray(k, jnp.float32), jnp.asarray(sum_sq, jnp.float32), structure=structure)
    np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("outlier", [1.0, 20.0])
def test_wanda_beats_magnitude_by_the_spread_of_its_input_norms(outlier):
    """Wanda's gain over magnitude comes from inputs whose norms differ: with a few channels 20x
    the others (the emergent features of LLMs) its layer error is a small fraction of magnitude's;
    with equal norms it ranks as magnitude does (compared per output instead of per layer)."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(2048, 64))
    x[:, :4] *= outlier
    k = rng.normal(size=(64, 32))
    sum_sq = np.sum(x**2, axis=0)
    wanda = np.asarray(wanda_mask(jnp.asarray(k, jnp.float32), jnp.asarray(sum_sq, jnp.float32), 0.5))
    magnitude = np.abs(k) > np.median(np.abs(k))  # layer-wise, as the papers' baseline
    ratio = recon(k, k * wanda, x) / recon(k, k * magnitude, x)
    if outlier > 1:  # measured 0.06; nearly all the outlier channels' weights are kept (magnitude: half)
        assert ratio < 0.2 and wanda[:4].mean() > 0.9 and magnitude[:4].mean() < 0.6
    else:  # measured 1.03: per output, with no norm to weigh by, is no better than per layer
        assert 0.9 < ratio < 1.15


def test_bad_arguments_are_refused_with_the_fix():
    k, xtx = jnp.ones((64, 8)), jnp.eye(64)
    with pytest.raises(ValueError, match="group_size=48 must divide"):
        gptq(k, xtx, 4, group_size=48)
    with pytest.raises(ValueError, match="xtx must be X\\^T X"):
        sparsegpt(k, jnp.eye(8))
    with pytest.raises(ValueError, match="bits"):
        gptq(k, xtx, 9)
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt(k, xtx, 1.5)
    for axis in (2, -4, 1, -1):  # N:M groups run along the input axis of a 2-D kernel only
        with pytest.raises(ValueError, match="axis"):
            sparsegpt(k, xtx, structure=NM(2, 4, axis=axis))
        with pytest.raises(ValueError, match="axis"):
            wanda_mask(k, jnp.ones(64), structure=NM(2, 4, axis=axis))
    assert float(jnp.mean(sparsegpt(k, xtx, structure=NM(2, 4, axis=0)).mask)) == 0.5
