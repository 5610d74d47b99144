"""SmoothQuant, AWQ and rotations: float64 NumPy references, exactness of the folds, pipelines."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.models import TransformerLM
from jaxcompress.models.transformer import TRANSFORMER_FOLDS
from jaxcompress.oneshot import (AWQ, GPTQ, RTN, Rotation, SmoothQuant, SparseGPT, awq_scales, check_folds,
                                 fold_groups, fold_scales, one_shot, rotate_transformer, smoothquant_scales)
from jaxcompress.oneshot.rotate import hadamard, ones_fixing_rotation
from jaxcompress.prune.structures import NM
from jaxcompress.core.transform import intercepted
from jaxcompress.quant.affine import fake_quant
from jaxcompress.quant.weights import weight_quantization
from jaxcompress.train import linen_apply_fn

BLOCKS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]
ROT = dict(embeddings=r"^(embed|pos_embed)/embedding$", writers=r"^block_\d+/(attn/out|mlp/fc2)$")


@pytest.fixture(scope="module")
def lm():
    """A 2-block TransformerLM with non-trivial LayerNorm scales/biases and an outlier channel."""
    model = TransformerLM(vocab_size=64, max_len=16, dim=32, depth=2, heads=2, mlp_ratio=2)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 64, size=(8, 16)).astype(np.int32)} for _ in range(2)]
    params = model.init(jax.random.key(0), jnp.asarray(batches[0]["tokens"]))["params"]
    noise = jax.random.split(jax.random.key(1), len(jax.tree.leaves(params)))
    leaves, treedef = jax.tree.flatten(params)
    leaves = [w + 0.2 * jax.random.normal(k, w.shape) for w, k in zip(leaves, noise)]
    params = jax.tree.unflatten(treedef, leaves)
    params["block_0"]["ln1"]["scale"] = params["block_0"]["ln1"]["scale"].at[3].set(12.0)  # an outlier channel
    return linen_apply_fn(model, inputs="tokens"), params, batches


def _out(apply_fn, params, batch):
    return np.asarray(apply_fn(params, {}, batch, train=False, rng=None)[0], np.float64)


def _inputs(apply_fn, params, batch, layer):
    seen = {}

    def grab(next_fun, args, kwargs, context):
        if "/".join(context.module.path) == layer and context.method_name == "__call__":
            seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        apply_fn(params, {}, batch, train=False, rng=None)
    return np.asarray(seen["x"], np.float64).reshape(-1, seen["x"].shape[-1])


# --- float64 NumPy references -----------------------------------------------------------------
def np_smoothquant(max_x, kernels, alpha):
    w = np.max([np.abs(k).max(axis=1) for k in kernels], axis=0)
    return np.maximum(max_x, 1e-5) ** alpha / np.maximum(w, 1e-5) ** (1 - alpha)


def np_group_rtn(w, bits, group):
    """Asymmetric min/max per (group of inputs, output), float32 PyTorch arithmetic."""
    out = np.empty_like(w, dtype=np.float64)
    qmax = 2**bits - 1
    for g in range(0, w.shape[0], group):
        blk = w[g : g + group].astype(np.float32)
        lo, hi = np.minimum(blk.min(0), 0), np.maximum(blk.max(0), 0)
        scale = np.maximum((hi - lo) * np.float32(1.0 / qmax), np.float32(1e-8))
        zero = np.clip(-np.round(lo / scale), 0, qmax)
        q = np.clip(np.round(blk * (np.float32(1) / scale)) + zero, 0, qmax)
        out[g : g + group] = (q - zero) * scale
    return out


def np_awq(kernels, x, bits, group, n_grid=20):
    """AWQ's search (Lin et al. 2024, Sec. 3.3): s = mean|x|^r normalised; error on the real outputs."""
    mean = np.abs(x).mean(0)
    losses = []
    for r in np.arange(n_grid) / n_grid:
        s = np.maximum(mean**r, 1e-4)
        s = s / np.sqrt(s.max() * s.min())
        losses.append(sum(np.sum((x @ k - (x / s) @ np_group_rtn(k * s[:, None], bits, group)) ** 2) for k in kernels))
    best = int(np.argmin(losses))
    s = np.maximum(mean ** (best / n_grid), 1e-4)
    return s / np.sqrt(s.max() * s.min()), best, np.array(losses)


# --- scale searches ---------------------------------------------------------------------------
def test_smoothquant_scales_equal_the_formula():
    rng = np.random.default_rng(0)
    max_x = np.abs(rng.normal(size=16)) * np.r_[20.0, np.ones(15)]
    kernels = [rng.normal(size=(16, 8)), rng.normal(size=(16, 4)) * 3]
    for alpha in (0.0, 0.5, 0.85, 1.0):
        got = smoothquant_scales(jnp.asarray(max_x, jnp.float32), [jnp.asarray(k, jnp.float32) for k in kernels], alpha)
        np.testing.assert_allclose(np.asarray(got), np_smoothquant(max_x, kernels, alpha), rtol=2e-5)
    # A dead channel keeps s = 1; the outlier channel gets the largest scale.
    got = np.asarray(smoothquant_scales(jnp.asarray(np.r_[0.0, max_x[1:]], jnp.float32), [jnp.ones((16, 2))], 0.5))
    assert got[0] == 1.0
    with pytest.raises(ValueError, match="alpha"):
        smoothquant_scales(jnp.ones(16), [jnp.ones((16, 2))], 1.5)


def test_awq_search_equals_numpy_reference():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1024, 32)) * np.where(np.arange(32) % 8 == 0, 10.0, 1.0)
    kernels = [rng.normal(size=(32, 16)), rng.normal(size=(32, 8))]
    quantize = functools.partial(fake_quant, bits=3, symmetric=False, narrow=False, channel_axis=-1, group_size=8)
    got = awq_scales([jnp.asarray(k, jnp.float32) for k in kernels], jnp.asarray(np.abs(x).mean(0), jnp.float32),
                     jnp.asarray(x.T @ x, jnp.float32), quantize)
    s, best, losses = np_awq(kernels, x, 3, 8)
    np.testing.assert_allclose(np.asarray(got.losses), losses, rtol=2e-3)
    assert round(float(got.ratio) * 20) == best and best > 0  # the outliers make a non-zero exponent win
    np.testing.assert_allclose(np.asarray(got.scale), s, rtol=1e-4)
    assert losses[best] < 0.9 * losses[0]  # and it beats round-to-nearest (r = 0) clearly


def np_awq_clip(w, x, bits, group, n_grid=20, max_shrink=0.5):
    """The reference implementation's auto_clip: per (group, output) the shrink with the least error."""
    out = w.copy()
    best = np.ones((w.shape[0] // group, w.shape[1]))
    for g in range(0, w.shape[0], group):
        xg, wg = x[:, g : g + group], w[g : g + group]
        amax = np.abs(wg).max(0)
        errs = []
        for i in range(int(max_shrink * n_grid)):
            lim = amax * (1 - i / n_grid)
            q = np_group_rtn(np.clip(wg, -lim, lim), bits, group)
            errs.append(np.sum((xg @ (wg - q)) ** 2, axis=0))
        k = np.argmin(np.array(errs), axis=0)
        best[g // group] = 1 - k / n_grid
        lim = amax * best[g // group]
        out[g : g + group] = np.clip(wg, -lim, lim)
    return out, best


def test_awq_clip_equals_numpy_reference():
    from jaxcompress.oneshot import awq_clip

    rng = np.random.default_rng(3)
    x = rng.normal(size=(512, 32))
    w = rng.standard_t(2, size=(32, 12))  # heavy tails: clipping pays off for some groups
    quantize = functools.partial(fake_quant, bits=3, symmetric=False, narrow=False, channel_axis=-1, group_size=8)
    got, shrink = awq_clip(jnp.asarray(w, jnp.float32), jnp.asarray(x.T @ x, jnp.float32), quantize, group_size=8)
    want, best = np_awq_clip(w.astype(np.float32).astype(np.float64), x, 3, 8)
    np.testing.assert_allclose(np.asarray(shrink), best, atol=1e-6)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)
    assert 0 < np.mean(best < 1) < 1  # some groups clip, some do not


# --- folds ------------------------------------------------------------------------------------
def test_folds_keep_the_function_and_a_wrong_fold_is_refused(lm):
    apply_fn, params, batches = lm
    layers = [f"block_{i}/{n}" for i in range(2) for n in ("attn/query", "attn/key", "attn/value", "attn/out",
                                                           "mlp/fc1", "mlp/fc2")]
    groups = check_folds(apply_fn, params, {}, batches[0], TRANSFORMER_FOLDS, layers)
    assert groups["block_0/ln1"] == ["block_0/attn/query", "block_0/attn/key", "block_0/attn/value"]
    assert groups["block_1/attn/value"] == ["block_1/attn/out"] and "block_0/mlp/fc2" not in str(groups)
    rng = np.random.default_rng(2)
    scales = {p: jnp.asarray(np.exp(rng.normal(size=32)), jnp.float32) for p in groups if p.endswith(("ln1", "value"))}
    scales.update({p: jnp.asarray(np.exp(rng.normal(size=32)), jnp.float32) for p in groups if p.endswith("ln2")})
    folded = fold_scales(params, scales, TRANSFORMER_FOLDS)
    ref = _out(apply_fn, params, batches[1])
    np.testing.assert_allclose(_out(apply_fn, folded, batches[1]), ref, atol=2e-4 * np.abs(ref).max())
    # value is both a consumer (of ln1) and a producer (for out): both folds are in its kernel.
    s1, s2 = np.asarray(scales["block_0/ln1"]), np.asarray(scales["block_0/attn/value"])
    np.testing.assert_allclose(np.asarray(folded["block_0"]["attn"]["value"]["kernel"]),
                               np.asarray(params["block_0"]["attn"]["value"]["kernel"]) * s1[:, None] / s2[None, :],
                               rtol=1e-5)
    # Through the GELU a scale changes the function: refused, naming the fold.
    with pytest.raises(ValueError, match=r"block_0/mlp/fc2.*block_0/mlp/fc1"):
        check_folds(apply_fn, params, {}, batches[0], [(r"^(block_\d+)/mlp/fc2$", r"\1/mlp/fc1")], layers)
    assert fold_groups(["a/fc"], [("^x$", "y")]) == {}
    with pytest.raises(TypeError, match="regex, template"):
        fold_groups(["a"], [("^a$",)])
    with pytest.raises(ValueError, match="not a normalisation"):
        fold_scales(params, {"nowhere": jnp.ones(32)}, [(r"^(block_0)/mlp/fc1$", "nowhere")])


# --- rotations --------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [8, 12])
def test_ones_fixing_rotation_is_orthogonal_and_commutes_with_centering(dim):
    q = ones_fixing_rotation(dim, np.random.default_rng(0))
    np.testing.assert_allclose(q @ q.T, np.eye(dim), atol=1e-12)
    np.testing.assert_allclose(q @ np.ones(dim), np.ones(dim), atol=1e-12)
    x = np.random.default_rng(1).normal(size=(5, dim)) + 3.0
    centred = lambda a: (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)  # noqa: E731
    np.testing.assert_allclose(centred(x @ q), centred(x) @ q, atol=1e-10)
    assert not np.allclose(np.abs(q), np.eye(dim))  # a real mixing, not a permutation
    h = hadamard(8)
    np.testing.assert_array_equal(h @ h.T, 8 * np.eye(8))


def test_rotation_keeps_the_function_and_spreads_the_outlier(lm):
    apply_fn, params, batches = lm
    rot = rotate_transformer(params, TRANSFORMER_FOLDS, head_dim=16, seed=3, **ROT)
    ref = _out(apply_fn, params, batches[1])
    np.testing.assert_allclose(_out(apply_fn, rot, batches[1]), ref, atol=2e-4 * np.abs(ref).max())
    # The query's input: the outlier channel (LayerNorm scale 12) is spread by the rotation.
    peak = lambda x: np.abs(x).max() / np.sqrt(np.mean(x**2))  # noqa: E731
    before, after = _inputs(apply_fn, params, batches[0], "block_0/attn/query"), _inputs(
        apply_fn, rot, batches[0], "block_0/attn/query")
    assert peak(after) < 0.5 * peak(before)
    np.testing.assert_allclose(np.asarray(rot["block_0"]["ln1"]["scale"]), 1.0)
    np.testing.assert_allclose(np.asarray(rot["block_0"]["ln1"]["bias"]), 0.0)
    # Leaving out a writer breaks the stream: one_shot checks and refuses.
    with pytest.raises(ValueError, match="residual stream"):
        one_shot([Rotation(writers=r"^block_\d+/attn/out$"), RTN(8)], apply_fn, params, {}, batches,
                 rules=BLOCKS, folds=TRANSFORMER_FOLDS)


# --- pipelines through one_shot ---------------------------------------------------------------
@pytest.mark.slow  # AWQ's search and clip equal NumPy references in the fast tests above
def test_awq_one_shot_beats_round_to_nearest_and_composes_with_gptq(lm):
    apply_fn, params, batches = lm
    ref = np.concatenate([_out(apply_fn, params, b) for b in batches])
    err = {}
    for name, method in (("rtn", RTN(3, group_size=16)), ("awq", AWQ(3, group_size=16)),
                         ("awq+gptq", [AWQ(3, group_size=16), GPTQ(3, group_size=16)])):
        r = one_shot(method, apply_fn, params, {}, batches, rules=BLOCKS, folds=() if name == "rtn" else TRANSFORMER_FOLDS)
        view = r.transform.apply(r.params, r.state)
        spec = r.transform.describe(r.params, r.state)["block_0/attn/query/kernel"]
        assert spec.bits == 3 and spec.group_size == 16
        q = np.asarray(view["block_0"]["attn"]["query"]["kernel"])
        assert all(len(np.unique(q[g : g + 16, j])) <= 8 for g in range(0, 32, 16) for j in range(q.shape[1]))
        err[name] = float(np.mean((np.concatenate([_out(apply_fn, view, b) for b in batches]) - ref) ** 2))
    assert set(r.report) >= {"AWQ", "_total"} and r.report["AWQ"]["unscaled"] == ["block_0/mlp/fc2", "block_1/mlp/fc2"]
    assert err["awq"] < err["rtn"] and err["awq+gptq"] < err["rtn"], err


def test_w8a8_pipelines_describe_weights_and_inputs(lm):
    apply_fn, params, batches = lm
    ref = np.concatenate([_out(apply_fn, params, b) for b in batches])
    w8a8 = RTN(8, symmetric=True, narrow=True, activation_bits=8)
    results, errors = {}, {}
    for name, method in (("rtn", w8a8), ("smooth", [SmoothQuant(0.5), w8a8]), ("rot", [Rotation(head_dim=16), w8a8])):
        r = one_shot(method, apply_fn, params, {}, batches, rules=BLOCKS, folds=TRANSFORMER_FOLDS)
        spec = r.transform.describe(r.params, r.state)["block_1/mlp/fc1/kernel"]
        assert (spec.bits, spec.act_bits, spec.scheme) == (8, 8, "symmetric")
        assert sorted(r.state.ranges) == sorted(f"block_{i}/{n}" for i in range(2) for n in (
            "attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"))
        view = r.transform.apply(r.params, r.state)
        with intercepted(r.transform, r.state, train=False):
            out = np.concatenate([_out(apply_fn, view, b) for b in batches])
        errors[name] = float(np.sqrt(np.mean((out - ref) ** 2)) / np.sqrt(np.mean(ref**2)))
        results[name] = r
    # With the outlier channel, plain W8A8 loses most; smoothing and rotation recover most of it.
    assert 0.02 < errors["rtn"] < 0.2, errors
    assert errors["smooth"] < 0.6 * errors["rtn"] and errors["rot"] < 0.6 * errors["rtn"], errors
    # The outlier channel of block_0's ln1 is what smoothing and rotation remove: its query's
    # calibrated input range shrinks.
    width = {k: float(v.state.ranges["block_0/attn/query"]["max"] - v.state.ranges["block_0/attn/query"]["min"])
             for k, v in results.items()}
    assert width["smooth"] < width["rtn"] and width["rot"] < width["rtn"], width


def test_w8a8_with_per_token_inputs_calibrates_nothing(lm):
    apply_fn, params, batches = lm
    method = [SmoothQuant(0.5), RTN(8, symmetric=True, activation_bits=8, activation_symmetric=True,
                                    activation_range="token")]
    r = one_shot(method, apply_fn, params, {}, batches, rules=BLOCKS, folds=TRANSFORMER_FOLDS)
    assert r.state.ranges is None  # each token's range is taken at run time
    spec = r.transform.describe(r.params, r.state)["block_0/mlp/fc2/kernel"]
    assert (spec.bits, spec.act_bits, spec.scheme) == (8, 8, "symmetric")
    view = r.transform.apply(r.params, r.state)
    # the same as the library's weight quantizer with per-token inputs on the smoothed params
    same = weight_quantization(8, symmetric=True, narrow=False, rules=BLOCKS,
                               activation_bits=8, activation_symmetric=True, activation_range="token")
    with intercepted(r.transform, r.state, train=False):
        out = _out(apply_fn, view, batches[0])
    with intercepted(same, same.init(r.params), train=False):
        want = _out(apply_fn, same.apply(r.params, same.init(r.params)), batches[0])
    np.testing.assert_array_equal(out, want)
    assert not np.allclose(out, _out(apply_fn, view, batches[0]), atol=1e-5)  # the inputs were quantized
    with pytest.raises(ValueError, match="activation_range must be 'calibrated'.*or 'token'.*got 'dynamic'"):
        RTN(8, activation_bits=8, activation_range="dynamic")


def test_rotation_composes_with_joint_sparsegpt(lm):
    apply_fn, params, batches = lm
    r = one_shot([Rotation(head_dim=16), SparseGPT(0.5, structure=NM(2, 4), bits=4, group_size=16)], apply_fn,
                 params, {}, batches, rules=BLOCKS, folds=TRANSFORMER_FOLDS)
    k = np.asarray(r.params["block_1"]["mlp"]["fc1"]["kernel"])
    assert np.all((k.reshape(8, 4, -1) != 0).sum(1) <= 2)
    spec = r.transform.describe(r.params, r.state)["block_1/mlp/fc1/kernel"]
    assert spec.bits == 4 and spec.mask is not None
    assert r.report["Rotation"]["relative_output_change"] < 1e-4


def test_pipelines_are_validated(lm):
    apply_fn, params, batches = lm
    call = functools.partial(one_shot, apply_fn=apply_fn, params=params, model_state={}, batches=batches, rules=BLOCKS,
                             folds=TRANSFORMER_FOLDS)
    with pytest.raises(ValueError, match="at most one"):
        call([GPTQ(4), RTN(4)])
    with pytest.raises(ValueError, match="at most one"):
        call([GPTQ(4), SmoothQuant()])
    with pytest.raises(ValueError, match="end the list with a solver"):
        call([SmoothQuant()])
    with pytest.raises(TypeError, match="Wanda, SparseGPT"):
        call(["gptq"])
    with pytest.raises(ValueError, match="folds"):
        one_shot(AWQ(4), apply_fn, params, {}, batches, rules=BLOCKS)
    with pytest.raises(ValueError, match="alpha"):
        SmoothQuant(alpha=2.0)
