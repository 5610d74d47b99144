"""Packing and entropy coding: golden bytes, Huffman against the Shannon bound, exact round trips."""
import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core.transform import LeafSpec
from jaxcompress.export import huffman
from jaxcompress.export.pack import pack_leaf
from jaxcompress.prune.structures import NM
from jaxcompress.export.reader import (ArtifactError, canonical_codes, decode_tensor, relative_positions,
                                       unpack_bits)

SETTINGS = settings(derandomize=True, max_examples=20, deadline=None)


def test_int4_golden_bytes_low_nibble_first():
    # two's complement nibbles 8, f, 0, 7; the first value in the low nibble of the first byte
    q = np.array([-8, -1, 0, 7])
    assert huffman.pack_bits(q & 0xF, 4) == bytes([0xF8, 0x70])
    assert unpack_bits(bytes([0xF8, 0x70]), 4, 4).tolist() == [8, 15, 0, 7]


def test_3bit_and_1bit_golden_bytes():
    # 3-bit symbols 1, 2, 7: bits (lsb first) 100 010 111 -> 0b11010001 = 0xd1, then 0b1
    assert huffman.pack_bits(np.array([1, 2, 7]), 3) == bytes([0xD1, 0x01])
    assert huffman.pack_bits(np.array([1, 0, 0, 0, 0, 0, 0, 0, 1]), 1) == bytes([0x01, 0x01])


def test_int4_leaf_golden_payload():
    x = np.array([[-8.0, -1.0, 0.0, 7.0]], np.float32) * 0.5
    spec = LeafSpec(bits=4, scheme="symmetric", scale=np.float32(0.5))
    record, data, _ = pack_leaf("w", x, spec)
    assert record["layout"] == "dense" and record["kind"] == "int" and record["streams"]["values"][0] == "raw"
    assert data[:2] == bytes([0xF8, 0x70])  # the codes, then the float32 scale
    assert data[2:] == np.float32(0.5).tobytes()


def test_canonical_huffman_golden():
    lengths = huffman.code_lengths(np.array([5, 2, 1, 1]))
    assert lengths.tolist() == [1, 2, 3, 3]
    assert canonical_codes(lengths).tolist() == [0b0, 0b10, 0b110, 0b111]
    # 0 0 0 0 0 1 1 2 3 -> 0 0 0 0 0 10 10 110 111, each code msb first into the lsb-first stream:
    # bits 000001010110111 -> bytes 0b10100000, 0b01110110; before them the 4-bit lengths 1 2 3 3
    data = huffman.encode(np.array([0, 0, 0, 0, 0, 1, 1, 2, 3]), 2)
    assert data == bytes([0x21, 0x33, 0b10100000, 0b01110110])


@SETTINGS
@given(st.lists(st.integers(0, 255), min_size=0, max_size=400), st.sampled_from([2, 5, 8]))
def test_huffman_round_trip_and_shannon_bound(values, bits):
    x = np.array(values, np.int64) % (1 << bits)
    data = huffman.encode(x, bits)
    head = (1 << bits) // 2
    lengths = unpack_bits(data[:head], 4, 1 << bits)
    assert huffman.decode(lengths, data[head:], x.size).tolist() == x.tolist()
    if x.size and np.unique(x).size > 1:
        avg = float(lengths[x].sum()) / x.size
        assert huffman.entropy_bits(x) / x.size <= avg + 1e-9 < huffman.entropy_bits(x) / x.size + 1


def test_huffman_skewed_stream_near_entropy_and_length_limit():
    rng = np.random.default_rng(0)
    x = rng.geometric(0.3, size=20000).clip(max=255) - 1
    lengths = huffman.code_lengths(np.bincount(x, minlength=256))
    avg = float(lengths[x].sum()) / x.size
    h = huffman.entropy_bits(x) / x.size
    assert h <= avg < h + 1 and avg < h + 0.05
    fib = np.array([1, 1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 377, 610, 987, 1597, 2584, 4181, 6765])
    limited = huffman.code_lengths(fib)  # unlimited Huffman would need 19 bits here
    assert limited.max() <= 15 and sum(2.0 ** -int(l) for l in limited) <= 1


def test_huffman_decode_rejects_bad_streams():
    x = np.array([0, 1, 2, 3, 3, 3])
    data = huffman.encode(x, 2)
    lengths = unpack_bits(data[:2], 4, 4)
    with pytest.raises(ArtifactError):
        huffman.decode(lengths, data[2:3], 60)  # runs out of bits
    with pytest.raises(ArtifactError):
        huffman.decode(np.array([1, 1, 1, 0]), data[2:], 6)  # not a prefix code


def test_relative_index_padding_entries():
    # a gap of 2^k - 1 skips that many zeros and stores no value (k=2: escape 3)
    assert relative_positions(np.array([3, 3, 1]), 2, 10).tolist() == [7]
    x = np.zeros(40, np.float32)
    x[[0, 1, 30]] = [1.0, 2.0, 3.0]
    record, data, _ = pack_leaf("w", x, LeafSpec(mask=x != 0))
    out, _ = decode_tensor(record, data)
    assert record["layout"] in ("relative", "bitmask") and np.array_equal(out, x)
    with pytest.raises(ArtifactError):
        relative_positions(np.array([3, 3, 3, 1]), 2, 10)


def _spec_and_view(kind, rng, shape, density):
    w = rng.normal(size=shape).astype(np.float32)
    mask = rng.random(shape) < density
    if kind == "float":
        return np.where(mask, w, 0), LeafSpec(mask=mask)
    if kind in ("int8", "int4", "int3", "int2"):
        bits = int(kind[3:])
        scale = (np.abs(w).max(axis=0, keepdims=True) / (2 ** (bits - 1) - 1) + 1e-3).astype(np.float32)
        q = np.clip(np.rint(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        view = (np.where(mask, q, 0).astype(np.float32) - np.float32(0)) * scale
        return view, LeafSpec(mask=mask, bits=bits, scheme="symmetric", channel_axis=-1, scale=scale)
    if kind == "affine4":
        scale = np.float32(0.37)
        zp = np.int32(5)
        q = np.clip(np.rint(w / scale) + zp, 0, 15)
        q = np.where(mask, q, zp)
        return (q.astype(np.float32) - np.float32(zp)) * scale, LeafSpec(bits=4, scheme="affine", scale=scale, zero_point=zp)
    if kind == "ternary":
        alpha = np.float32(0.8)
        q = np.where(mask, np.sign(w), 0)
        return (q * alpha).astype(np.float32), LeafSpec(bits=2, scheme="ternary", scale=alpha)
    if kind == "binary":
        alpha = np.full((1,) * (len(shape) - 1) + (shape[-1],), 0.6, np.float32)
        q = np.where(mask, np.where(w >= 0, 1.0, -1.0), 0).astype(np.float32)
        return q * alpha, LeafSpec(bits=1, scheme="binary", channel_axis=-1, scale=alpha)
    cb = np.sort(rng.normal(size=32).astype(np.float32))
    view = np.where(mask, cb[rng.integers(0, 32, size=shape)], 0).astype(np.float32)
    return view, LeafSpec(mask=mask, bits=5, scheme="codebook", codebook=cb)


KINDS = ["float", "int8", "int4", "int3", "int2", "affine4", "ternary", "binary", "codebook"]


@SETTINGS
@given(st.sampled_from(KINDS), st.lists(st.integers(1, 17), min_size=1, max_size=3),
       st.sampled_from([0.0, 0.02, 0.1, 0.5, 0.9, 1.0]), st.integers(0, 2**16))
def test_round_trip_is_exact_for_every_encoding(kind, shape, density, seed):
    view, spec = _spec_and_view(kind, np.random.default_rng(seed), tuple(shape), density)
    record, data, report = pack_leaf("w", view, spec)
    out, _ = decode_tensor(record, data)
    assert out.dtype == view.dtype and out.shape == view.shape
    assert out.tobytes() == view.tobytes()  # bit for bit: -0.0 too
    assert report.nbytes == len(data) and report.nbytes <= report.raw_bytes


def test_group_scales_round_trip():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(8, 3)).astype(np.float32)
    scale = (np.abs(w.reshape(2, 4, 3)).max(axis=1) / 7).astype(np.float32)  # (2, 3): groups of 4 along axis 0
    view = np.clip(np.rint(w / np.repeat(scale, 4, 0)), -7, 7).astype(np.float32) * np.repeat(scale, 4, 0)
    spec = LeafSpec(bits=4, scheme="symmetric", group_size=4, group_axis=-2, scale=scale)
    record, data, _ = pack_leaf("w", view, spec)
    assert np.array_equal(decode_tensor(record, data)[0], view)
    assert record["group_size"] == 4 and record["scale_shape"] == [2, 3]


def test_only_the_codebook_entries_in_use_are_stored():
    # an 8-bit codebook of 256 values of which a 40-weight layer uses at most 40 (k-means leaves
    # clusters empty): the file stores the used entries, indexed by 6-bit codes, and loads exactly
    rng = np.random.default_rng(3)
    cb = np.sort(rng.normal(size=256)).astype(np.float32)
    picks = rng.choice(256, size=40)
    view = cb[picks].reshape(8, 5)
    record, data, _ = pack_leaf("w", view, LeafSpec(bits=8, scheme="codebook", codebook=cb))
    out, side = decode_tensor(record, data)
    assert out.tobytes() == view.tobytes()
    assert side["codebook"].tolist() == np.unique(cb[picks]).tolist()
    assert record["bits"] == (np.unique(picks).size - 1).bit_length() == 6
    assert record["streams"]["codebook"][2] == 4 * np.unique(picks).size


@pytest.mark.parametrize("bad", ["off_grid", "out_of_range", "not_in_codebook"])
def test_off_grid_views_are_refused(bad):
    x = np.array([0.5, 1.0, -1.5], np.float32)
    if bad == "off_grid":
        spec, x = LeafSpec(bits=8, scheme="symmetric", scale=np.float32(0.5)), x + 0.1
    elif bad == "out_of_range":
        spec = LeafSpec(bits=2, scheme="symmetric", scale=np.float32(0.25))  # needs codes -6..4
    else:
        spec = LeafSpec(bits=1, scheme="codebook", codebook=np.array([0.5, 1.0], np.float32))
    with pytest.raises(ValueError, match="transform.apply"):
        pack_leaf("w", x, spec)


def test_sparse_layout_is_chosen_when_smaller():
    rng = np.random.default_rng(1)
    view, spec = _spec_and_view("int8", rng, (256, 64), 0.05)
    record, data, report = pack_leaf("w", view, spec)
    dense_bytes = view.size  # int8 codes alone
    assert record["layout"] in ("relative", "bitmask") and len(data) < dense_bytes / 4
    assert report.entropy_bytes <= report.nbytes and math.isfinite(report.entropy_bytes)


# ----- N:M layout: kept values plus each one's ceil(log2 m)-bit slot in its group -----

def _nm_mask(rng, shape, n, m, axis):
    """A keep-mask with exactly ``n`` random kept of every ``m`` consecutive along ``axis`` (NumPy)."""
    moved = np.moveaxis(np.zeros(shape, bool), axis, -1)
    groups = moved.reshape(-1, m).copy()
    for g in groups:
        g[rng.choice(m, size=n, replace=False)] = True
    return np.moveaxis(groups.reshape(moved.shape), -1, axis)


def _nm_view(kind, rng, shape, nm):
    mask = _nm_mask(rng, shape, nm.n, nm.m, nm.axis)
    w = rng.normal(size=shape).astype(np.float32)
    if kind == "float":
        return np.where(mask, w, 0), LeafSpec(mask=mask, structure=nm)
    if kind == "codebook":  # 8 shared values, none of them 0
        cb = np.sort(rng.uniform(0.5, 2.0, size=8) * rng.choice([-1, 1], size=8)).astype(np.float32)
        return np.where(mask, cb[rng.integers(0, 8, size=shape)], 0), LeafSpec(mask=mask, structure=nm, bits=3,
                                                                                scheme="codebook", codebook=cb)
    bits = int(kind[3:])
    scale = (np.abs(w).max(axis=0, keepdims=True) / (2 ** (bits - 1) - 1)).astype(np.float32)
    q = np.clip(np.rint(w / scale), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)  # -0.0 for small negatives
    view = np.where(mask, q, 0).astype(np.float32) * scale
    return view, LeafSpec(mask=mask, structure=nm, bits=bits, scheme="symmetric", channel_axis=-1, scale=scale)


@pytest.mark.parametrize("kind", ["float", "int8", "int4", "codebook"])
@pytest.mark.parametrize("nm,shape", [(NM(2, 4), (16, 6)), (NM(1, 4), (16, 6)), (NM(4, 8), (16, 6)),
                                      (NM(2, 4, axis=-1), (3, 5, 8)), (NM(1, 4, axis=0), (8, 3, 2))])
def test_nm_round_trip_is_bit_identical(kind, nm, shape):
    rng = np.random.default_rng(7)
    view, spec = _nm_view(kind, rng, shape, nm)
    view.reshape(-1)[np.flatnonzero(spec.mask)[:3]] = 0  # kept zeros are stored values too
    record, data, report = pack_leaf("w", view, spec, layout="nm")
    out, _ = decode_tensor(record, data)
    assert record["layout"] == "nm" and record["nm"] == [nm.n, nm.m, nm.axis % len(shape)]
    assert report.count == int(spec.mask.sum()) == view.size * nm.n // nm.m
    assert out.dtype == view.dtype and out.tobytes() == view.tobytes()
    assert record.get("zero_symbol", False) == (kind == "codebook")  # a kept 0 outside the codebook
    # the positions stream is the slot of each kept weight in its group, groups in moved-axis C order
    slots = np.nonzero(np.moveaxis(spec.mask, nm.axis, -1).reshape(-1, nm.m))[1]
    coding, off, nbytes, count, bits = record["streams"]["positions"]
    assert bits == math.ceil(math.log2(nm.m)) and count == slots.size
    if coding == "raw":
        assert unpack_bits(data[off:off + nbytes], bits, count).tolist() == slots.tolist()
    chosen, best, _ = pack_leaf("w", view, spec)  # the smallest layout, whichever it is
    assert np.array_equal(decode_tensor(chosen, best)[0], view) and len(best) <= len(data)


def test_nm_golden_bytes_and_smaller_than_bitmask():
    # 1:4 down the inputs of an (8, 2) int4 kernel. Groups in the order of x.T: column 0 rows 0-3,
    # rows 4-7, column 1 rows 0-3, rows 4-7; kept rows 1, 6, 3, 4: slots 1, 2, 3, 0.
    scale = np.array([[0.5, 0.25]], np.float32)
    q = np.zeros((8, 2), np.float32)
    q[1, 0], q[6, 0], q[3, 1], q[4, 1] = -8, 7, 3, -1
    spec = LeafSpec(mask=q != 0, structure=NM(1, 4), bits=4, scheme="symmetric", channel_axis=-1, scale=scale)
    record, data, report = pack_leaf("w", q * scale, spec)
    values = bytes([0x78, 0xF3])  # int4 codes -8, 7, 3, -1 (nibbles 8 7 3 f), low nibble first
    positions = bytes([1 | 2 << 2 | 3 << 4 | 0 << 6])  # 2-bit slots 1 2 3 0 = 0x39
    assert data == values + positions + scale.tobytes()  # 2 + 1 + 8 bytes
    assert record["layout"] == "nm" and record["count"] == 4 and report.nbytes == 11
    assert record["streams"] == {"values": ["raw", 0, 2, 4, 4], "positions": ["raw", 2, 1, 4, 2],
                                 "scale": ["raw", 3, 8, 8, 8]}
    _, bitmask, _ = pack_leaf("w", q * scale, spec, layout="bitmask")
    assert len(bitmask) == 2 + 2 + 8 > len(data)  # a 16-bit mask instead of 8 bits of slots
    assert np.array_equal(decode_tensor(record, data)[0], q * scale)


def test_mask_declared_nm_but_not_nm_falls_back():
    rng = np.random.default_rng(3)
    view, spec = _nm_view("int8", rng, (16, 4), NM(1, 4))
    mask = spec.mask.copy()
    mask[0:4, 0] = [True, True, False, False]  # one group keeps 2 of 4: not 1:4
    bad = spec._replace(mask=mask)
    view = np.where(mask, np.asarray(rng.integers(1, 100, size=mask.shape), np.float32), 0) * spec.scale
    record, data, _ = pack_leaf("w", view, bad)
    assert record["layout"] in ("bitmask", "relative", "dense") and "nm" not in record
    assert np.array_equal(decode_tensor(record, data)[0], view)
    with pytest.raises(ValueError, match="'nm'"):
        pack_leaf("w", view, bad, layout="nm")
    transposed = spec._replace(structure=NM(1, 4, axis=-1))  # 1:4 down axis 0, not along axis -1
    assert pack_leaf("w", view * 0, transposed)[0]["layout"] != "nm"
    with pytest.raises(ValueError, match="layout"):
        pack_leaf("w", view, spec, layout="csr")


def _tampered(record, data, **edit):
    r = json.loads(json.dumps(record))
    r.update(edit)
    return r, data


def test_nm_reader_refuses_records_that_do_not_add_up():
    # 1:3 over 6 elements: 2-bit slots, so slot 3 can be written though it does not exist
    x = np.array([0.0, 2.0, 0.0, 0.0, 0.0, 5.0], np.float32)
    record, data, _ = pack_leaf("w", x, LeafSpec(mask=x != 0, structure=NM(1, 3, axis=0)), layout="nm")
    assert np.array_equal(decode_tensor(record, data)[0], x)
    pos = record["streams"]["positions"]
    assert pos[0] == "raw" and data[pos[1]] == 1 | 2 << 2
    for slots in ([3, 2], [1, 1, 1]):  # a slot past m; three slots for two groups
        s = huffman.pack_bits(np.array(slots), 2)
        d = data[:pos[1]] + s + data[pos[1] + 1:]
        r = json.loads(json.dumps(record))
        r["streams"]["positions"] = ["raw", pos[1], 1, len(slots), 2]
        with pytest.raises(ArtifactError):
            decode_tensor(r, d)
    for edit in ({"nm": [1, 4, 0]}, {"nm": [2, 3, 0]}, {"nm": [1, 3, 1]}, {"nm": [0, 3, 0]}, {"nm": [1, 3]},
                 {"nm": None}, {"nm": [1.0, 3, 0]}, {"count": 3}, {"shape": [2, 3]}):
        with pytest.raises(ArtifactError):
            decode_tensor(*_tampered(record, data, **edit))
    r = json.loads(json.dumps(record))
    r["streams"]["positions"] = ["raw", pos[1], 1, 2, 3]  # slots of 1:3 are 2-bit
    with pytest.raises(ArtifactError, match="2-bit"):
        decode_tensor(r, data)
    # two kept in one group of 2:4, written out of order
    y = np.array([1.0, 0.0, 3.0, 0.0], np.float32)
    record, data, _ = pack_leaf("w", y, LeafSpec(mask=y != 0, structure=NM(2, 4, axis=0)), layout="nm")
    p = record["streams"]["positions"]
    assert data[p[1]] == 0 | 2 << 2
    with pytest.raises(ArtifactError, match="increasing"):
        decode_tensor(record, data[:p[1]] + bytes([2 | 0 << 2]) + data[p[1] + 1:])


def test_nm_forged_records_raise_or_decode_an_nm_tensor():
    # consistent forgeries (digests redone) are not detected, but the decoder never crashes and
    # never gives a tensor outside its N:M structure: at most n non-zeros in every group
    rng = np.random.default_rng(11)
    view, spec = _nm_view("int4", rng, (16, 4), NM(1, 4))
    record, data, _ = pack_leaf("w", view, spec, layout="nm")
    outcomes = {"error": 0, "decoded": 0}
    for _ in range(300):
        r, d = json.loads(json.dumps(record)), bytearray(data)
        what = rng.integers(3)
        if what == 0:
            d[rng.integers(len(d))] ^= int(rng.integers(1, 256))
        elif what == 1:
            r["nm"][rng.integers(3)] += int(rng.choice([-2, -1, 1, 2]))
        else:
            entry = r["streams"][("values", "positions")[rng.integers(2)]]
            entry[rng.integers(1, 5)] += int(rng.choice([-1, 1, 4]))
        try:
            out, _ = decode_tensor(r, bytes(d))
        except ArtifactError:
            outcomes["error"] += 1
            continue
        n, m, axis = r["nm"]
        assert out.shape == view.shape and out.dtype == view.dtype
        assert np.all(np.count_nonzero(np.moveaxis(out, axis, -1).reshape(-1, m), axis=1) <= n)
        outcomes["decoded"] += 1
    assert outcomes["error"] > 100 and outcomes["decoded"] > 20


def test_negative_zeros_are_kept_bit_for_bit():
    # a symmetric int4 grid on which two weights rounded to -0 (as jit-compiled quantizers give)
    scale = np.float32(0.5)
    x = np.array([[-0.0, 1.0, 0.0, -0.0], [0.0, -3.5, 2.0, 0.0]], np.float32)
    spec = LeafSpec(bits=4, scheme="symmetric", scale=scale)
    record, data, _ = pack_leaf("w", x, spec)
    out, _ = decode_tensor(record, data)
    assert out.tobytes() == x.tobytes() and np.signbit(out).tolist() == np.signbit(x).tolist()
    # 3 non-zeros: the bitmask layout. Codes 2 -7 4 (nibbles 2 9 4), the mask of positions 1 5 6,
    # the scale, then the zeros in C order -0 +0 -0 +0 +0: flags 1 0 1 0 0 in one byte
    assert record["layout"] == "bitmask" and data[:3] == bytes([0x92, 0x04, 0b01100010])
    assert data[3:7] == scale.tobytes() and data[7:] == bytes([0b00101])
    assert record["streams"]["negative_zeros"] == ["raw", 7, 1, 1, 8]
    plain = np.abs(x)  # no -0.0: no stream, no cost
    assert "negative_zeros" not in pack_leaf("w", plain, spec)[0]["streams"]
    dense, dense_data, _ = pack_leaf("w", x, spec, layout="dense")  # the view's zeros are stored codes here
    assert dense["streams"]["negative_zeros"] == ["raw", 8, 1, 1, 8]
    assert decode_tensor(dense, dense_data)[0].tobytes() == x.tobytes()
    masked = spec._replace(mask=np.array([[0, 1, 1, 1], [1, 1, 1, 1]], bool))  # x[0, 0] pruned
    pruned, pruned_data, _ = pack_leaf("w", x, masked)  # pruned zeros load as +0.0, flags for the rest
    expect = x.copy()
    expect[0, 0] = 0.0
    assert decode_tensor(pruned, pruned_data)[0].tobytes() == expect.tobytes()
    only_pruned = np.abs(x)
    only_pruned[0, 0] = -0.0  # the one -0.0 is pruned (a mask times a negative weight): no flags
    assert "negative_zeros" not in pack_leaf("w", only_pruned, masked)[0]["streams"]
    for bad in (bytes([0b100101]), b""):  # a flag past the five zeros; no flags
        r = json.loads(json.dumps(record))
        r["streams"]["negative_zeros"] = ["raw", 7, len(bad), len(bad), 8]
        with pytest.raises(ArtifactError, match="negative_zeros"):
            decode_tensor(r, data[:7] + bad)


def test_undescribed_float_leaves_keep_nan_inf_and_negative_zero():
    x = np.array([1.0, np.nan, -0.0, np.inf, -np.inf, 0.0], np.float32)
    for dtype in ("float32", "float16"):
        record, data, _ = pack_leaf("b", x, None, float_dtype=dtype)
        out, _ = decode_tensor(record, data)
        assert out.tobytes() == x.astype(dtype).astype(np.float32).tobytes() and "negative_zeros" not in record["streams"]
