"""Packing and entropy coding: golden bytes, Huffman against the Shannon bound, exact round trips."""
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core.transform import LeafSpec
from jaxcompress.export import huffman
from jaxcompress.export.pack import pack_leaf
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
    assert np.array_equal(out, view)
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
