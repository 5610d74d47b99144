"""The context layout: masks arithmetic-coded with adaptive row and column contexts."""
import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcompress.core.transform import LeafSpec
from jaxcompress.export import load, save
from jaxcompress.export.arithmetic import encode_context_mask
from jaxcompress.export.pack import pack_leaf
from jaxcompress.export.reader import ArtifactError, decode_context_mask, decode_stream, decode_tensor


def _structured_mask(rng, rows, cols, density=0.1):
    """Rows and columns of very different densities, some dead: what pruning leaves."""
    p = np.outer(rng.gamma(0.5, 1.0, rows), rng.gamma(0.5, 1.0, cols))
    p = np.clip(p * density / max(p.mean(), 1e-12), 0, 1)
    return rng.random((rows, cols)) < p


def _ideal_bits(mask):
    """The code length the model promises, re-derived in float64: for each element, column after
    column, -log2 of the adaptive probability of its context (row and column density buckets)."""
    edges = [0.01, 0.016, 0.025, 0.039, 0.062, 0.098, 0.155, 0.244, 0.385, 0.6]
    unseen = len(edges) + 1

    def bucket(ones, seen):
        return unseen if seen == 0 else bisect.bisect_right(edges, (ones + 0.5) / (seen + 1))

    rows, cols = mask.shape
    counts = {}
    row_ones = [0] * rows
    bits = 0.0
    for j in range(cols):
        ones = 0
        for i in range(rows):
            key = (bucket(row_ones[i], j), bucket(ones, i))
            n0, n1 = counts.get(key, (1, 1))
            b = bool(mask[i, j])
            bits -= math.log2((n1 if b else n0) / (n0 + n1))
            n0, n1 = (n0, n1 + 1) if b else (n0 + 1, n1)
            if n0 + n1 > 1 << 16:
                n0, n1 = (n0 + 1) // 2, (n1 + 1) // 2
            counts[key] = (n0, n1)
            if b:
                ones += 1
                row_ones[i] += 1
    return bits


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 30), st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.95, 1.0]),
       st.integers(0, 2**16), st.booleans())
def test_masks_round_trip_exactly(rows, cols, density, seed, structured):
    rng = np.random.default_rng(seed)
    mask = _structured_mask(rng, rows, cols, density) if structured else rng.random((rows, cols)) < density
    data = encode_context_mask(mask)
    assert np.array_equal(decode_context_mask(data, rows, cols), mask)


@pytest.mark.parametrize("shape, density", [((300, 40), 0.08), ((64, 64), 0.5), ((500, 3), 0.02)])
def test_code_length_is_the_models_within_a_few_bits(shape, density):
    mask = _structured_mask(np.random.default_rng(1), *shape, density)
    ideal = _ideal_bits(mask)
    got = 8 * len(encode_context_mask(mask))
    assert ideal <= got <= ideal * 1.0005 + 16  # 32-bit arithmetic coding: two bits to close, byte padding


def test_structured_masks_cost_less_than_the_order_0_bound():
    mask = _structured_mask(np.random.default_rng(2), 400, 100, 0.08)
    p = mask.mean()
    order0_bytes = mask.size * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8
    assert len(encode_context_mask(mask)) < 0.9 * order0_bytes


def test_golden_bytes():
    # pins the format: the identity of 4 and a column pattern, bytes as the writer gives them
    assert encode_context_mask(np.eye(4, dtype=bool)).hex() == GOLDEN_EYE4
    m = np.zeros((6, 3), bool)
    m[::2, 1] = True
    assert encode_context_mask(m).hex() == GOLDEN_COLUMN


GOLDEN_EYE4 = "216800"
GOLDEN_COLUMN = "c0de06"


@pytest.mark.parametrize("seed", range(20))
def test_garbage_bits_end_in_the_documented_error_or_a_mask(seed):
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
    try:
        out = decode_context_mask(data, 50, 40)
    except ArtifactError:
        return
    assert out.shape == (50, 40) and out.dtype == bool


@pytest.mark.parametrize("kind", ["int8", "codebook", "float"])
def test_pack_leaf_picks_the_context_layout_and_loads_bit_for_bit(kind):
    rng = np.random.default_rng(3)
    mask = _structured_mask(rng, 6 * 5 * 4, 24, 0.08).reshape(6, 5, 4, 24)  # a conv kernel's mask
    w = rng.normal(size=mask.shape).astype(np.float32)
    if kind == "int8":
        scale = np.float32(0.02)
        view = np.where(mask, np.clip(np.rint(w / scale), -127, 127) * scale, 0).astype(np.float32)
        spec = LeafSpec(mask=mask, bits=8, scheme="symmetric", scale=scale)
    elif kind == "codebook":
        cb = np.sort(rng.normal(size=16)).astype(np.float32)
        view = np.where(mask, cb[rng.integers(0, 16, size=mask.shape)], 0).astype(np.float32)
        spec = LeafSpec(mask=mask, bits=4, scheme="codebook", codebook=cb)
    else:
        view, spec = np.where(mask, w, 0).astype(np.float32), LeafSpec(mask=mask)
    plain, plain_data, _ = pack_leaf("w", view, spec)
    record, data, report = pack_leaf("w", view, spec, context_coding=True)
    assert record["layout"] == "context" and len(data) < len(plain_data)
    assert record["streams"]["positions"][0] == "context" and record["streams"]["positions"][3:] == [view.size, 1]
    out, _ = decode_tensor(record, data)
    assert out.tobytes() == view.tobytes()
    assert report.count == int(np.count_nonzero(view))
    if kind == "int8":  # the values are stored output channel after output channel, as the positions
        moved = np.moveaxis(view, -1, 0).reshape(-1)
        codes = np.rint(moved[moved != 0] / scale).astype(np.int64) & 0xFF
        assert decode_stream(data, record["streams"]["values"]).tolist() == codes.tolist()


def test_context_coding_is_off_by_default_and_marks_the_file_version_2(tmp_path):
    rng = np.random.default_rng(4)
    mask = _structured_mask(rng, 200, 30, 0.05)
    view = {"fc": {"kernel": np.where(mask, rng.normal(size=mask.shape), 0).astype(np.float32)}}
    desc = {"fc/kernel": LeafSpec(mask=mask)}
    plain = save(tmp_path / "a.npz", view, desc)
    coded = save(tmp_path / "b.npz", view, desc, context_coding=True)
    assert plain.tensors[0].layout != "context" and coded.tensors[0].layout == "context"
    assert coded.file_bytes < plain.file_bytes
    (a, ia), (b, ib) = load(plain.path), load(coded.path)
    assert (ia.version, ib.version) == (1, 2)
    assert a["fc"]["kernel"].tobytes() == b["fc"]["kernel"].tobytes() == view["fc"]["kernel"].tobytes()
    with pytest.raises(TypeError, match="context_coding"):
        save(tmp_path / "c.npz", view, desc, context_coding="yes")


def test_a_context_record_is_refused_past_its_limits():
    record, data, _ = pack_leaf("w", np.eye(8, dtype=np.float32), LeafSpec(mask=np.eye(8, dtype=bool)), layout="context")
    with pytest.raises(ArtifactError, match="context tensor"):
        decode_tensor({**record, "shape": [64]}, data)  # one dimension: no rows and columns
    with pytest.raises(ArtifactError, match="context tensor"):
        decode_tensor({**record, "shape": [2**13, 2**12]}, data)  # more elements than a context mask holds
    with pytest.raises(ValueError, match="layout 'context'"):
        pack_leaf("w", np.ones(8, np.float32), LeafSpec(mask=np.ones(8, bool)), layout="context")
