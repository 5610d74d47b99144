"""Stored-size accounting: size_report (read from a transform's description) and leaf_bits, counted by hand."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core import chain
from jaxcompress.core.transform import LeafSpec, Transform
from jaxcompress.export import SizeReport, leaf_bits, size_report
from jaxcompress.prune.structures import NM
from jaxcompress.quant import weight_quantization, weight_sharing


def _sparse(shape, nnz, values=None, seed=0):
    """An array of ``shape`` with exactly ``nnz`` non-zeros at random positions."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    flat = np.zeros(n, np.float32)
    pos = rng.choice(n, size=nnz, replace=False)
    flat[pos] = values if values is not None else rng.uniform(0.5, 2.0, size=nnz) * rng.choice([-1, 1], size=nnz)
    return flat.reshape(shape)


def _tree():
    dense = np.arange(1, 13, dtype=np.float32).reshape(3, 4)  # 12 non-zero float32
    pruned = _sparse((4, 8), 8, seed=1)  # 32 entries, 8 non-zero, float32
    # 4-bit levels (integers in [-7, 7] times a per-channel scale), 8 non-zero of 32
    qpruned = _sparse((8, 4), 8, values=np.array([1, -7, 3, 7, -2, 5, -1, 6], np.float32), seed=2)
    qpruned = qpruned * np.array([0.5, 0.25, 1.0, 2.0], np.float32)
    bias = np.array([0.1, -0.2, 0.3, 0.4], np.float32)
    view = {"a_dense": dense, "b_pruned": pruned, "c_qpruned": qpruned, "d_bias": bias}
    scale = np.array([[0.5, 0.25, 1.0, 2.0]], np.float32)
    desc = {"b_pruned": LeafSpec(mask=pruned != 0),
            "c_qpruned": LeafSpec(mask=qpruned != 0, bits=4, scheme="symmetric", channel_axis=-1, scale=scale)}
    return view, desc


def test_size_report_golden_hand_counted():
    view, desc = _tree()
    assert int(np.count_nonzero(view["c_qpruned"])) == 8
    # a_dense : 12 * 32                                   = 384
    # b_pruned: n=32, nnz=8, float32:
    #           dense 32*32 = 1024, bitmask 32 + 8*32 = 288, indices 8*(5 + 32) = 296  -> 288
    # c_qpruned: n=32, nnz=8, 4 bits:
    #           dense 32*4 = 128, bitmask 32 + 8*4 = 64, indices 8*(5 + 4) = 72      -> 64
    #           + 4 per-channel float32 scales = 128                                  -> 192
    # d_bias  : 4 * 32                                    = 128
    # total   : 384 + 288 + 192 + 128 = 992 bits = 124 bytes
    rep = size_report(view, desc)
    assert rep == SizeReport(params=80, nonzero_params=32, bytes_float32=320, bytes_compressed=124)
    # one scale per tensor: c_qpruned costs 64 + 32 = 96 -> 896 bits = 112 bytes
    per_tensor = {**desc, "c_qpruned": desc["c_qpruned"]._replace(scale=np.float32(1.0), channel_axis=None)}
    assert size_report(view, per_tensor).bytes_compressed == 112
    # without masks every leaf is dense: 384 + 1024 + (128 + 128) + 128 = 1792 bits = 224 bytes
    dense = {"c_qpruned": desc["c_qpruned"]._replace(mask=None)}
    assert size_report(view, dense).bytes_compressed == 224
    # nothing compressed: plain float32
    assert size_report(view) == SizeReport(80, 32, 320, 320) == size_report(view, {})


def test_size_report_rounds_bits_up_to_bytes():
    # 3 values at 3 bits = 9 bits + 3 per-channel scales (96) = 105 bits -> 14 bytes
    k = {"k": np.array([[1.0, -3.0, 2.0]], np.float32)}
    rep = size_report(k, {"k": LeafSpec(bits=3, scale=np.ones((1, 3), np.float32))})
    assert rep == SizeReport(3, 3, 12, 14)
    # per tensor: 9 + 32 = 41 bits -> 6 bytes
    assert size_report(k, {"k": LeafSpec(bits=3, scale=np.ones((1, 1)))}).bytes_compressed == 6


def _fixed_masks(masks):
    """Applies fixed masks and describes them."""
    return Transform(
        init=lambda p: masks,
        apply=lambda p, m: {k: {n: w if m[k].get(n) is None else w * m[k][n] for n, w in v.items()} for k, v in p.items()},
        update=lambda p, m, i: m,
        describe=lambda p, m: {f"{k}/{n}": LeafSpec(mask=x) for k, v in m.items() for n, x in v.items() if x is not None},
    )


def test_size_report_with_real_transforms():
    rng = np.random.default_rng(3)
    params = {"Dense_0": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32),
                          "bias": jnp.asarray(rng.normal(size=(8,)), jnp.float32)}}
    keep = np.ones((16, 8), bool)
    keep[:, :6] = False  # 96 of 128 pruned, 32 kept
    masks = {"Dense_0": {"kernel": jnp.asarray(keep), "bias": None}}
    t = chain(_fixed_masks(masks), weight_quantization(8))
    s = t.init(params)
    view = t.apply(params, s)
    rep = size_report(view, t.describe(params, s))
    nnz = int(np.count_nonzero(np.asarray(view["Dense_0"]["kernel"])))
    assert nnz == 32  # max-abs 8-bit keeps every kept weight non-zero here
    # kernel: dense 128*8 = 1024, bitmask 128 + 32*8 = 384, indices 32*(7 + 8) = 480 -> 384
    #         + 8 scales * 32 = 256 -> 640; bias: 8 * 32 = 256; total 896 bits = 112 bytes
    assert rep == SizeReport(params=136, nonzero_params=40, bytes_float32=544, bytes_compressed=112)
    # affine: 8 int8 zero points more (64 bits) -> 960 bits = 120 bytes
    t = chain(_fixed_masks(masks), weight_quantization(8, symmetric=False))
    s = t.init(params)
    assert size_report(t.apply(params, s), t.describe(params, s)).bytes_compressed == 120
    # a 4-entry codebook: 2-bit indices; kernel bitmask 128 + 32*2 = 192 + 4 * 32 codebook = 320;
    # bias 256 -> 576 bits = 72 bytes
    t = chain(_fixed_masks(masks), weight_sharing(4))
    s = t.init(params)
    assert size_report(t.apply(params, s), t.describe(params, s)).bytes_compressed == 72


def test_size_report_binary_zeros_are_not_a_sign():
    # a sign code has no zero: 2 bits a value, or positions plus 1-bit signs, whichever is smaller
    spec = LeafSpec(bits=1, scheme="binary", scale=np.ones((1, 1), np.float32))
    w = {"k": np.array([[1.0, 0.0, -1.0, 1.0]], np.float32)}
    # n=4, nnz=3: 2 bits * 4 = 8, bitmask 4 + 3 = 7, indices 3 * (2 + 1) = 9 -> 7, + 32 -> 39 bits
    assert size_report(w, {"k": spec}).bytes_compressed == 5
    assert size_report(w, {"k": spec._replace(mask=w["k"] != 0)}).bytes_compressed == 5
    # no zero: 1 bit a value, 64 values + 32 = 96 bits
    assert size_report({"k": np.ones((8, 8), np.float32)}, {"k": spec}).bytes_compressed == 12
    # n=64 with 8 non-zeros: 2 * 64 = 128, bitmask 64 + 8 = 72, indices 8 * 7 = 56 -> 56 + 32 = 88 bits
    z = np.zeros((8, 8), np.float32)
    z[0] = 1.0
    assert size_report({"k": z}, {"k": spec}).bytes_compressed == 11


def test_size_report_bad_description():
    view, desc = _tree()
    with pytest.raises(ValueError, match=r"description names leaves that view does not have: \['zz'\]"):
        size_report(view, {**desc, "zz": LeafSpec(bits=4)})
    with pytest.raises(TypeError, match="description must be the"):
        size_report(view, {"c_qpruned": 4})


def test_leaf_bits_picks_cheapest_encoding():
    # index list wins: n=1024 (10-bit indices), nnz=3, 8 bits:
    # dense 8192, bitmask 1024 + 24 = 1048, indices 3 * (10 + 8) = 54
    x = _sparse((32, 32), 3, seed=4)
    assert leaf_bits(x, bits=8, sparse=True, num_scales=0) == 54
    assert leaf_bits(x, bits=8, sparse=True, num_scales=32) == 54 + 32 * 32
    # bitmask wins: n=32, nnz=8, float32: dense 1024, bitmask 288, indices 296
    y = _sparse((4, 8), 8, seed=5)
    assert leaf_bits(y, bits=None, sparse=True, num_scales=0) == 288
    # dense wins: n=16 all non-zero at 8 bits: dense 128, bitmask 144, indices 16 * (4 + 8) = 192
    z = np.arange(1, 17, dtype=np.float32).reshape(4, 4)
    assert leaf_bits(z, bits=8, sparse=True, num_scales=4) == 128 + 128
    # sparse=False: always dense, however many zeros
    assert leaf_bits(x, bits=8, sparse=False, num_scales=0) == 8192
    assert leaf_bits(y, bits=None, sparse=False, num_scales=0) == 1024
    # n = 5 -> 3-bit indices: nnz=1 at 2 bits: dense 10, bitmask 5 + 2 = 7, indices 1*(3+2) = 5
    assert leaf_bits(np.array([0, 0, 0, 1.0, 0]), bits=2, sparse=True, num_scales=0) == 5
    # nnz=2: dense 10, bitmask 9, indices 10 -> 9
    assert leaf_bits(np.array([0, 2.0, 0, 1.0, 0]), bits=2, sparse=True, num_scales=0) == 9
    # n = 1: a 1-bit index at least; all-zero leaf costs nothing beyond its scales
    assert leaf_bits(np.array([2.0]), bits=None, sparse=True, num_scales=0) == 32
    assert leaf_bits(np.array([0.0]), bits=None, sparse=True, num_scales=1) == 32
    assert leaf_bits(np.zeros((0, 3)), bits=4, sparse=True, num_scales=3) == 96


def test_size_report_counts_the_nm_layout():
    # 1:4 down the inputs of a (64, 2) int4 kernel: 32 kept, each 4 bits + a 2-bit slot = 192 bits;
    # bitmask 128 + 32 * 4 = 256, indices 32 * (7 + 4) = 352, dense 512 -> N:M;
    # + 2 scales * 32 = 64 -> 256 bits = 32 bytes; one kept value is 0 and still costs its code
    mask = np.zeros((64, 2), bool)
    mask[0::4, 0] = True
    mask[3::4, 1] = True
    scale = np.array([[0.5, 0.25]], np.float32)
    k = np.where(mask, np.float32(3.0), 0) * scale
    k[0, 0] = 0.0
    spec = LeafSpec(mask=mask, structure=NM(1, 4), bits=4, scheme="symmetric", channel_axis=-1, scale=scale)
    assert size_report({"k": k}, {"k": spec}).bytes_compressed == 32
    # declared 1:2 along the outputs, which the mask is not: bitmask 128 + 31 * 4 = 252, + 64 -> 40 bytes
    assert size_report({"k": k}, {"k": spec._replace(structure=NM(1, 2, axis=-1))}).bytes_compressed == 40
    assert size_report({"k": k}, {"k": spec._replace(structure=None)}).bytes_compressed == 40
    # 2:4 float32: N:M 64 * (32 + 2) = 2176 equals the bitmask 128 + 64 * 32 -> 2176 bits = 272 bytes
    m24 = np.tile(np.array([1, 1, 0, 0], bool), 32).reshape(64, 2)
    w = np.where(m24, np.float32(1.5), 0)
    assert size_report({"k": w}, {"k": LeafSpec(mask=m24, structure=NM(2, 4))}).bytes_compressed == 272


def test_size_report_counts_sign_flags_of_negative_zeros():
    # 4 int4 codes (16 bits) + 1 scale (32) = 48 bits = 6 bytes; a kept -0.0 adds one flag per zero (2)
    spec = LeafSpec(bits=4, scheme="symmetric", scale=np.float32(0.5))
    k = np.array([[0.0, 1.0], [0.0, -3.5]], np.float32)
    assert size_report({"k": k}, {"k": spec}).bytes_compressed == 6
    k[0, 0] = -0.0
    assert size_report({"k": k}, {"k": spec}).bytes_compressed == 7
    # pruned -0.0 (a mask times a negative weight) is stored as +0.0 and costs nothing
    assert size_report({"k": k}, {"k": spec._replace(mask=k != 0)}).bytes_compressed == 6
    assert size_report({"k": k}).bytes_compressed == 16  # undescribed floats keep their sign as they are
