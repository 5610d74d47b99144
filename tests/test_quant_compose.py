"""Quantizers after pruning: zeros stay zero, the description matches the view, unused rules warn."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core import chain
from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import is_none, select
from jaxcompress.core.transform import LeafSpec, Transform
from jaxcompress.export import size_report
from jaxcompress.prune.masks import magnitude_mask
from jaxcompress.quant import lsq_quantization, weight_quantization, weight_sharing


def masking(sparsity=0.5):
    """Magnitude pruning of every kernel, with masks fixed at init, describing its masks."""

    def init(params):
        return jax.tree.map(
            lambda sel, w: None if sel is None else magnitude_mask(jnp.abs(w), sparsity), select(params), params,
            is_leaf=is_none,
        )

    def apply(params, masks):
        return jax.tree.map(lambda m, w: w if m is None else w * m, masks, params, is_leaf=is_none)

    def describe(params, masks):
        return {path_name(p): LeafSpec(mask=m) for p, m in jax.tree.leaves_with_path(masks)}

    return Transform(init, apply, lambda p, s, i: s, describe)


KINDS = {
    **{f"sym{b}": lambda b=b: weight_quantization(b) for b in (2, 3, 8)},
    **{f"affine{b}": lambda b=b: weight_quantization(b, symmetric=False) for b in (2, 5, 8)},
    "affine4_tensor": lambda: weight_quantization(4, symmetric=False, channel_axis=None),
    "sym4_group": lambda: weight_quantization(4, group_size=2),
    "affine4_group": lambda: weight_quantization(4, symmetric=False, group_size=2),
    "binary": lambda: weight_quantization("binary"),
    "ternary": lambda: weight_quantization("ternary"),
    "lsq3": lambda: lsq_quantization(3),
    "codebook": lambda: weight_sharing(4),
}


def _view_fn(kind):
    t = chain(masking(0.5), KINDS[kind]())
    # one compile per shape and kind; init runs inside too (k-means is a loop)
    return t, jax.jit(lambda p: (t.apply(p, t.init(p)), t.init(p)[0]))


_VIEWS = {k: _view_fn(k) for k in KINDS}


@settings(max_examples=8, deadline=None, derandomize=True, database=None)
@given(
    shape=st.sampled_from([(6, 4), (2, 3, 2, 4)]),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
def test_every_quantizer_keeps_pruned_zeros(shape, seed, scale):
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=shape) * scale).astype(np.float32)
    w[np.abs(w) < 1e-6 * scale] = 1e-6 * scale  # no exact zero before pruning
    p = {"layer": {"kernel": jnp.asarray(w)}}
    for kind, (_, view_fn) in _VIEWS.items():
        view, masks = view_fn(p)
        v, m = np.asarray(view["layer"]["kernel"]), np.asarray(masks["layer"]["kernel"])
        assert m.sum() == w.size // 2, kind
        assert np.all(v[~m] == 0.0), f"{kind}: pruned weights became {np.unique(v[~m])}"
        if kind in ("binary", "codebook"):
            # a sign code and a codebook of non-zero weights give zeros exactly where pruned
            np.testing.assert_array_equal(v != 0, m, err_msg=kind)


def test_int4_per_channel_after_pruning_is_described_exactly():
    rng = np.random.default_rng(0)
    p = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=8), jnp.float32)},
         "Dense_1": {"kernel": jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
    t = chain(masking(0.5), weight_quantization(4, channel_axis=-1))
    s = t.init(p)
    view = t.apply(p, s)
    desc = t.describe(p, s)
    assert sorted(desc) == ["Dense_0/kernel", "Dense_1/kernel"]
    for name in desc:
        spec = desc[name]
        assert (spec.bits, spec.scheme, spec.channel_axis, spec.zero_point) == (4, "symmetric", -1, None)
        v = np.asarray(view[name.split("/")[0]]["kernel"])
        mask = np.asarray(spec.mask)
        assert mask.shape == v.shape and mask.sum() == v.size // 2
        assert np.all(v[~mask] == 0.0)
        for c in range(v.shape[-1]):
            assert np.unique(v[:, c]).size <= 2**4
        q = v / np.asarray(spec.scale)
        np.testing.assert_allclose(q, np.round(q), atol=1e-5)
        assert np.abs(np.round(q)).max() <= 7
    rep = size_report(view, desc)
    # Dense_0/kernel: 256 weights, 128 kept: bitmask 256 + 128 * 4 = 768, + 8 scales -> 1024 bits;
    # Dense_1/kernel: 32 weights, 16 kept: bitmask 32 + 16 * 4 = 96, + 4 scales -> 224 bits;
    # bias 8 * 32 = 256 bits. Total 1504 bits = 188 bytes.
    assert rep.bytes_compressed == 188 and rep.params == 296 and rep.bytes_float32 == 4 * 296
    # the same from the latent params: pruned leaves count by their mask
    assert size_report(p, desc).bytes_compressed == 188


@pytest.mark.parametrize("bits,symmetric,group", [(4, False, None), (3, True, 4), (5, False, 2)])
def test_describe_scale_and_zero_point_reproduce_the_view(bits, symmetric, group):
    w = jnp.asarray(np.random.default_rng(bits).normal(size=(8, 6)) + 0.3, jnp.float32)
    p = {"k": w}
    t = weight_quantization(bits, symmetric=symmetric, group_size=group, group_axis=0)
    s = t.init(p)
    v = np.asarray(t.apply(p, s)["k"])
    spec = t.describe(p, s)["k"]
    scale = np.asarray(spec.scale)
    zp = np.zeros_like(scale) if spec.zero_point is None else np.asarray(spec.zero_point)
    if group is not None:
        assert (spec.group_size, spec.group_axis, spec.channel_axis) == (group, 0, None)
        assert scale.shape == (8 // group, 6)
        scale, zp = np.repeat(scale, group, 0), np.repeat(zp, group, 0)
    q = v / scale + zp
    np.testing.assert_allclose(q, np.round(q), atol=1e-4)
    lo, hi = (-(2 ** (bits - 1)) + 1, 2 ** (bits - 1) - 1) if symmetric else (0, 2**bits - 1)
    assert np.round(q).min() >= lo and np.round(q).max() <= hi
    np.testing.assert_array_equal(v, (np.round(q) - zp).astype(np.float32) * scale.astype(np.float32))


def test_binary_and_ternary_describe_their_scale():
    w = jnp.asarray(np.random.default_rng(0).normal(size=(10, 3)), jnp.float32)
    for kind, levels in (("binary", {-1.0, 1.0}), ("ternary", {-1.0, 0.0, 1.0})):
        t = weight_quantization(kind)
        v = np.asarray(t.apply({"k": w}, None)["k"])
        spec = t.describe({"k": w}, t.init({"k": w}))["k"]
        assert spec.scheme == kind and spec.bits == (1 if kind == "binary" else 2)
        q = v / np.asarray(spec.scale)
        np.testing.assert_allclose(q, np.round(q), atol=1e-6)
        assert set(np.round(q).ravel().tolist()) <= levels


@pytest.mark.parametrize("make", [
    lambda rules: weight_quantization(4, rules=rules),
    lambda rules: lsq_quantization(4, rules=rules),
    lambda rules: weight_sharing(4, rules=rules),
])
def test_unused_rules_warn(make):
    p = {"dense": {"kernel": jnp.ones((4, 2))}}
    with pytest.warns(UserWarning, match=r"0: '\^dnse/'"):
        make([("^dnse/", True)]).init(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        make([("^dense/", True)]).init(p)
