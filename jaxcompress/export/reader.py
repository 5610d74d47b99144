"""Reads a compressed-model artifact: the file format, its checks and its decoders.

This module needs only NumPy and the standard library (JAX only for :func:`load_program`), so it
can be copied alone to a machine that serves the model. :mod:`jaxcompress.export.artifact` writes
the files.

File format (version 2; version 1 is the same without the ``context`` layout)
-----------------------------------------------------------------------------
An ``.npz`` archive (``numpy.savez_compressed``: zip members deflated, each with its CRC-32;
read with ``allow_pickle=False``) of three 1-D ``uint8`` arrays:

* ``metadata``: UTF-8 JSON (below);
* ``payload``: every tensor's byte streams, one after another;
* ``sha256``: the SHA-256 digest of ``metadata`` followed by ``payload`` (the whole content).

The JSON holds ``format`` (``"jaxcompress-artifact"``), ``version`` (1, or 2 when a tensor uses
the ``context`` layout), ``payload_bytes``,
``payload_sha256``, ``metadata`` (the user's), ``program`` (``null`` or a byte range of the
payload with its SHA-256) and ``tensors``, one record per leaf with: ``path`` (``'/'``-joined),
``shape``, ``dtype``, ``offset``/``nbytes`` (its byte range of the payload), ``sha256`` (of the
record's canonical JSON without this field, followed by its bytes), ``layout``, ``kind``,
``count`` (values stored) and ``streams``.

* ``layout``: ``dense`` (every element stored), ``bitmask`` (one bit per element, 1 = stored),
  ``relative`` (Deep Compression's relative indices: each stored element's distance to the one
  before as ``index_bits``-bit gaps, counting the zeros skipped; the largest gap value
  ``2^index_bits - 1`` is a padding entry that skips that many zeros and stores no value) or
  ``nm`` (an N:M tensor, ``nm`` = ``[n, m, axis]``: exactly ``n`` of every ``m`` consecutive
  elements along ``axis`` are stored, zero or not. The groups are taken in the C order of the
  tensor with ``axis`` moved last (``numpy.moveaxis(x, axis, -1)``); the positions stream holds,
  group after group, the position inside its group of each stored element, ``ceil(log2(m))``
  bits each, strictly increasing within a group; the values are in the same order. For 2:4 these
  are the 2-bit indices sparse tensor cores read) or ``context`` (version 2; a tensor of two or
  more dimensions and at most ``MAX_CONTEXT_ELEMENTS`` elements, read as a matrix whose columns
  are its last axis: the ``positions`` stream, coding ``context``, count the element count,
  bits 1, is its keep-mask arithmetic-coded column after column, each column top to bottom, as
  :func:`decode_context_mask` specifies; the values are in that order).
* ``kind`` of the stored values: ``float`` (the raw little-endian bytes of ``stored_dtype``); ``int``
  (``bits``-bit integer codes ``q``, two's complement when ``signed``, value
  ``(q - zero_point) * scale``); ``sign`` (1 bit: 1 is ``q = +1``, 0 is ``q = -1``, value as
  ``int``: binary and ternary weights, and any ``int`` tensor whose stored codes are all ``+-1``);
  ``codebook`` (``bits``-bit indices into the float32 ``codebook``; with ``zero_symbol``, index 0
  is the value 0 and index ``i + 1`` is ``codebook[i]``).
* ``scale`` broadcasts against the tensor (``group_size`` > 0: repeated ``group_size`` times
  along ``group_axis`` first); ``zero_point`` likewise (absent: 0).
* ``negative_zeros`` (a stream, present only when the tensor holds a ``-0.0`` that its values
  would not give, e.g. a quantized weight that rounded to ``-0``): the bytes of a little-endian
  bitmask with one bit per element of the decoded tensor that is zero, in C order; 1 makes it
  ``-0.0``, 0 makes it ``+0.0``.
* ``streams``: ``{name: [coding, offset, nbytes, count, bits]}`` for ``values``, ``positions``,
  ``scale``, ``zero_point``, ``codebook`` and ``negative_zeros``; ``offset`` is relative to the
  tensor's range.
  ``coding`` ``raw``: ``count`` symbols of ``bits`` bits in one little-endian bit stream (bit
  ``i`` of the stream is bit ``i % 8`` of byte ``i // 8``; symbol ``j`` is bits
  ``j * bits .. (j + 1) * bits - 1``, least significant first: int4 codes ``[-8, -1, 0, 7]`` are
  the bytes ``f8 70``). ``huffman``: the code length (4 bits, 0 = unused) of each of the
  ``2^bits`` symbols as a raw stream, then the canonical Huffman codes of the ``count`` symbols,
  each code most significant bit first, in the same bit order. Float arrays are streams of their
  little-endian bytes (``bits`` 8).

Every check failing (a damaged zip, a wrong digest, a record that does not add up) raises
:class:`ArtifactError`; a file that loads gives exactly the arrays that were saved. The digests
detect corruption, not forgery: anyone may write a consistent file.
"""
from __future__ import annotations

import bisect
import hashlib
import io
import json
import math
from typing import Any, NamedTuple, Optional

import numpy as np

FORMAT = "jaxcompress-artifact"
#: The newest format version this reader reads (it reads every older one too). Version 2 added
#: the ``context`` layout; a writer marks a file with the oldest version that holds its layouts.
VERSION = 2
MAX_CODE_LENGTH = 15
_MEMBERS = ("metadata", "payload", "sha256")
_LAYOUTS = ("dense", "bitmask", "relative", "nm", "context")
_KINDS = ("float", "int", "sign", "codebook")
_FLOATS = ("float16", "float32", "float64")
_DTYPES = _FLOATS + ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "bool")
_MAX_ELEMENTS = 2**31
#: The largest tensor whose mask may be context-coded (its decoder is a Python loop per element).
MAX_CONTEXT_ELEMENTS = 2**24
#: Density thresholds of the context model's buckets (see :func:`mask_bucket`).
CONTEXT_EDGES = (0.01, 0.016, 0.025, 0.039, 0.062, 0.098, 0.155, 0.244, 0.385, 0.6)
#: Bucket of a row or column with nothing seen yet; contexts are ``row bucket * CONTEXT_WIDTH + column bucket``.
CONTEXT_UNSEEN = len(CONTEXT_EDGES) + 1
CONTEXT_WIDTH = CONTEXT_UNSEEN + 1
#: Adaptive counts of a context are halved when their sum passes this.
CONTEXT_COUNT_LIMIT = 1 << 16
_HALF, _QUARTER, _TOP = 1 << 31, 1 << 30, (1 << 32) - 1


class ArtifactError(ValueError):
    """A compressed-model file is damaged, truncated, tampered with or not one at all."""


class ArtifactInfo(NamedTuple):
    """What :func:`load` read besides the weights.

    Attributes:
      tensors: ``{path: record}``, the JSON record of each tensor (layout, kind, bits, scheme,
        axes, streams), with ``scale``, ``zero_point`` and ``codebook`` decoded to arrays.
      metadata: the user's metadata dict given at save time.
      program: the serialized exported program (``bytes``), or ``None``.
      version: the file format version.
      file_bytes: the file's size in bytes.
    """

    tensors: dict
    metadata: dict
    program: Optional[bytes]
    version: int
    file_bytes: int


def canonical_json(obj: Any) -> bytes:
    """The one JSON encoding digests are taken over: sorted keys, no spaces, ASCII."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def record_digest(record: dict, data: bytes) -> str:
    """SHA-256 (hex) of a tensor or program record without its ``sha256`` field, then its bytes."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(canonical_json(body) + bytes(data)).hexdigest()


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """``count`` unsigned ``bits``-bit symbols from a little-endian bit stream (int64).

    Example:
      >>> unpack_bits(bytes([0xF8, 0x70]), 4, 4).tolist()
      [8, 15, 0, 7]
    """
    if count == 0:
        return np.zeros(0, np.int64)
    raw = np.frombuffer(bytes(data), np.uint8)
    if raw.size * 8 < bits * count:
        raise ArtifactError(f"a stream of {raw.size} bytes cannot hold {count} symbols of {bits} bits.")
    if bits == 8:
        return raw[:count].astype(np.int64)
    flat = np.unpackbits(raw, count=bits * count, bitorder="little").reshape(count, bits)
    return flat.astype(np.int64) @ (np.int64(1) << np.arange(bits, dtype=np.int64))


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical Huffman code of each symbol from the code lengths (0 = unused symbol).

    Symbols are ordered by (length, symbol); each code is the previous one plus one, shifted left
    by the increase in length (as DEFLATE, RFC 1951 section 3.2.2).

    Example:
      >>> canonical_codes(np.array([2, 1, 3, 3])).tolist()  # 10, 0, 110, 111
      [2, 0, 6, 7]
    """
    lengths = np.asarray(lengths, np.int64)
    codes = np.zeros(lengths.size, np.int64)
    code, prev = 0, 0
    for s in sorted((int(l), s) for s, l in enumerate(lengths) if l > 0):
        length, sym = s
        code <<= length - prev
        codes[sym] = code
        code += 1
        prev = length
    return codes


def huffman_decode(lengths: np.ndarray, data: bytes, count: int) -> np.ndarray:
    """Decodes ``count`` symbols from canonical Huffman ``lengths`` and the code bits ``data``.

    Raises:
      ArtifactError: the lengths are not a prefix code, a code is invalid, or ``data`` ends early.
    """
    lengths = np.asarray(lengths, np.int64)
    if count == 0:
        return np.zeros(0, np.int64)
    used = lengths[lengths > 0]
    if used.size == 0 or int(used.max()) > MAX_CODE_LENGTH:
        raise ArtifactError("a Huffman table has no symbols or a code longer than 15 bits.")
    if sum(2.0 ** -int(l) for l in used) > 1.0:
        raise ArtifactError("a Huffman table's code lengths are not a prefix code (Kraft sum > 1).")
    top = int(used.max())
    table_sym = np.zeros(1 << top, np.int64)
    table_len = np.zeros(1 << top, np.int64)  # 0: no code starts with these bits
    codes = canonical_codes(lengths)
    for sym in np.flatnonzero(lengths):
        l = int(lengths[sym])
        lo = int(codes[sym]) << (top - l)
        table_sym[lo : lo + (1 << (top - l))] = sym
        table_len[lo : lo + (1 << (top - l))] = l
    raw = np.frombuffer(bytes(data), np.uint8)
    nbits = raw.size * 8
    if count > nbits:
        raise ArtifactError(f"a Huffman stream of {nbits} bits cannot hold {count} symbols.")
    bits = np.concatenate([np.unpackbits(raw, bitorder="little"), np.zeros(top, np.uint8)]).astype(np.int64)
    window = np.zeros(nbits, np.int64)  # the next `top` bits at every bit position
    for k in range(top):
        window |= bits[k : k + nbits] << (top - 1 - k)
    syms, lens = table_sym[window].tolist(), table_len[window].tolist()
    out = [0] * count
    pos = 0
    try:
        for i in range(count):
            l = lens[pos]
            if l == 0:
                raise ArtifactError("a Huffman stream holds an invalid code.")
            out[i] = syms[pos]
            pos += l
    except IndexError:
        raise ArtifactError("a Huffman stream ends before its last symbol.") from None
    if pos > nbits:
        raise ArtifactError("a Huffman stream ends before its last symbol.")
    return np.asarray(out, np.int64)


def relative_positions(gaps: np.ndarray, index_bits: int, size: int) -> np.ndarray:
    """Flat positions from relative-index gaps (see the module docstring); checks they fit ``size``.

    Example:
      >>> relative_positions(np.array([1, 3, 0, 2]), 2, 12).tolist()  # 3: skip 3, no value
      [1, 5, 8]
    """
    escape = (1 << index_bits) - 1
    gaps = np.asarray(gaps, np.int64)
    advance = np.where(gaps == escape, escape, gaps + 1)
    ends = np.cumsum(advance)
    positions = ends[gaps != escape] - 1
    if positions.size and int(positions[-1]) >= size:
        raise ArtifactError(f"relative indices run past the tensor's {size} elements.")
    return positions


def nm_positions(slots: np.ndarray, nm: Any, shape: tuple) -> np.ndarray:
    """Flat positions of an N:M tensor's stored elements from their in-group ``slots``.

    Args:
      slots: the positions stream (see the module docstring), ``n`` per group of ``m``.
      nm: the record's ``[n, m, axis]``.
      shape: the tensor's shape.

    Returns:
      The flat (C order) index of each stored element, in the order of the values stream.

    Raises:
      ArtifactError: ``nm`` does not fit ``shape``, or the slots are not ``n`` strictly increasing
        positions in ``[0, m)`` per group.

    Example:
      >>> nm_positions(np.array([0, 3, 1, 2]), [2, 4, 0], (8,)).tolist()  # 2:4 over 8 elements
      [0, 3, 5, 6]
      >>> nm_positions(np.array([1, 0]), [1, 2, 0], (2, 2)).tolist()  # 1:2 down each column
      [2, 1]
    """
    if not (isinstance(nm, list) and len(nm) == 3 and all(_is_int(v) for v in nm)):
        raise ArtifactError(f"an nm tensor needs nm = [n, m, axis] (ints), got {nm!r}.")
    n, m, axis = nm
    if not (1 <= n <= m and 2 <= m <= 256 and 0 <= axis < len(shape) and shape[axis] % m == 0):
        raise ArtifactError(f"nm = {nm!r} does not fit a tensor of shape {list(shape)} (1 <= n <= m, m divides the axis).")
    slots = np.asarray(slots, np.int64)
    groups = math.prod(shape) // m
    if slots.size != n * groups:
        raise ArtifactError(f"an {n}:{m} tensor of shape {list(shape)} needs {n * groups} positions, got {slots.size}.")
    per_group = slots.reshape(groups, n)
    if slots.size and (int(slots.max()) >= m or np.any(np.diff(per_group, axis=1) <= 0)):
        raise ArtifactError(f"N:M positions must be strictly increasing within each group and below m = {m}.")
    moved = (np.arange(groups, dtype=np.int64)[:, None] * m + per_group).reshape(-1)
    order = np.moveaxis(np.arange(math.prod(shape), dtype=np.int64).reshape(shape), axis, -1).reshape(-1)
    return order[moved]


def mask_bucket(ones: int, seen: int) -> int:
    """The context model's bucket of a row or column with ``ones`` of its first ``seen`` elements set.

    The bucket counts the :data:`CONTEXT_EDGES` at or below the estimate ``(ones + 1/2) / (seen +
    1)`` (IEEE double arithmetic, the same on every platform); :data:`CONTEXT_UNSEEN` when
    ``seen`` is 0.

    Example:
      >>> mask_bucket(0, 0) == CONTEXT_UNSEEN, mask_bucket(0, 99), mask_bucket(5, 99), mask_bucket(99, 99)
      (True, 0, 4, 10)
    """
    return CONTEXT_UNSEEN if seen == 0 else bisect.bisect_right(CONTEXT_EDGES, (2 * ones + 1) / (2 * (seen + 1)))


def row_buckets(row_ones: np.ndarray, column: int) -> list:
    """:func:`mask_bucket` of every row before coding column ``column`` (``row_ones``: set so far)."""
    if column == 0:
        return [CONTEXT_UNSEEN] * row_ones.size
    est = (2 * row_ones.astype(np.float64) + 1) / (2 * (column + 1))
    return np.searchsorted(np.asarray(CONTEXT_EDGES), est, side="right").tolist()


def context_split(counts: list, k: int, low: int, high: int) -> int:
    """Where the coder's interval ``[low, high]`` splits for context ``k``: a 0 takes ``[low, split)``,
    a 1 ``[split, high]``, in proportion to the context's counts of each."""
    n0, n1 = counts[k]
    return low + (high - low + 1) * n0 // (n0 + n1)


def context_adapt(counts: list, k: int, bit: bool) -> None:
    """Counts one more ``bit`` in context ``k``, halving both counts past :data:`CONTEXT_COUNT_LIMIT`."""
    c = counts[k]
    c[bit] += 1
    if c[0] + c[1] > CONTEXT_COUNT_LIMIT:
        c[0], c[1] = (c[0] + 1) >> 1, (c[1] + 1) >> 1


def column_positions(mask) -> np.ndarray:
    """The flat C-order positions of a ``(rows, cols)`` mask's set elements, column after column:
    the order of a ``context`` tensor's values.

    Example:
      >>> column_positions(np.array([[1, 1], [0, 1]], bool)).tolist()
      [0, 1, 3]
    """
    rows, cols = np.shape(mask)
    f = np.flatnonzero(np.asarray(mask).T)
    return (f % max(rows, 1)) * cols + f // max(rows, 1)


def decode_context_mask(data: bytes, rows: int, cols: int) -> np.ndarray:
    """The ``(rows, cols)`` mask of a ``context`` layout from its arithmetic-coded bits.

    The format of :mod:`jaxcompress.export.reader` (``context`` layout): the mask is coded column
    after column, each column top to bottom, one binary decision per element with an adaptive
    probability per context (:func:`mask_bucket` of the element's row over the earlier columns
    and of its column over the earlier rows), by a 32-bit binary arithmetic coder. Bits past the
    end of ``data`` read as 0, so any input decodes in ``rows * cols`` steps.

    Example:
      >>> from jaxcompress.export.arithmetic import encode_context_mask
      >>> m = np.eye(4, dtype=bool)
      >>> bool((decode_context_mask(encode_context_mask(m), 4, 4) == m).all())
      True
    """
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8), bitorder="little").tolist()
    nbits, pos = len(bits), 32
    value = 0
    for b in bits[:32] + [0] * max(0, 32 - nbits):
        value = (value << 1) | b
    low, high = 0, _TOP
    counts = [[1, 1] for _ in range(CONTEXT_WIDTH * CONTEXT_WIDTH)]
    out = np.zeros((cols, rows), bool)
    row_ones = np.zeros(rows, np.int64)
    for j in range(cols):
        rb = row_buckets(row_ones, j)
        col = out[j]
        ones = 0
        for i in range(rows):
            k = rb[i] * CONTEXT_WIDTH + mask_bucket(ones, i)
            split = context_split(counts, k, low, high)
            bit = value >= split
            low, high = (split, high) if bit else (low, split - 1)
            col[i] = bit
            ones += bit
            context_adapt(counts, k, bit)
            while True:
                if high < _HALF:
                    pass
                elif low >= _HALF:
                    low, high, value = low - _HALF, high - _HALF, value - _HALF
                elif low >= _QUARTER and high < _HALF + _QUARTER:
                    low, high, value = low - _QUARTER, high - _QUARTER, value - _QUARTER
                else:
                    break
                low, high = low << 1, (high << 1) | 1
                value = (value << 1) | (bits[pos] if pos < nbits else 0)
                pos += 1
            if not low <= value <= high:  # never in a stream the coder wrote
                raise ArtifactError("a context-coded mask does not decode: its bits are not an arithmetic code.")
        row_ones += col
    return out.T


def decode_stream(segment: bytes, entry: Any) -> np.ndarray:
    """The symbols of one stream ``[coding, offset, nbytes, count, bits]`` of a tensor's bytes."""
    if not (isinstance(entry, list) and len(entry) == 5 and entry[0] in ("raw", "huffman")
            and all(_is_int(v) and v >= 0 for v in entry[1:])):
        raise ArtifactError(f"a stream entry must be [coding, offset, nbytes, count, bits], got {entry!r}.")
    coding, offset, nbytes, count, bits = entry
    if not 1 <= bits <= 8 or offset + nbytes > len(segment):
        raise ArtifactError(f"stream entry {entry!r} does not fit its tensor's {len(segment)} bytes.")
    data = segment[offset : offset + nbytes]
    if coding == "raw":
        if nbytes != math.ceil(count * bits / 8):
            raise ArtifactError(f"raw stream {entry!r}: {count} symbols of {bits} bits are not {nbytes} bytes.")
        return unpack_bits(data, bits, count)
    head = (1 << bits) * 4 // 8 if bits > 1 else 1
    if nbytes < head:
        raise ArtifactError(f"Huffman stream {entry!r} is shorter than its table.")
    lengths = unpack_bits(data[:head], 4, 1 << bits)
    return huffman_decode(lengths, data[head:], count)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shape(value, what) -> tuple:
    if not (isinstance(value, list) and all(_is_int(d) and d >= 0 for d in value)):
        raise ArtifactError(f"{what} must be a list of non-negative ints, got {value!r}.")
    if math.prod(value) > _MAX_ELEMENTS:
        raise ArtifactError(f"{what} {value!r} is larger than any tensor this format holds.")
    return tuple(value)


def _floats(segment: bytes, streams: dict, name: str, shape) -> np.ndarray:
    sym = decode_stream(segment, streams[name])
    if sym.size != 4 * math.prod(shape):
        raise ArtifactError(f"stream {name!r} holds {sym.size} bytes, not float32 of shape {list(shape)}.")
    return np.frombuffer(sym.astype(np.uint8).tobytes(), "<f4").reshape(shape)


def _signed(sym: np.ndarray, bits: int) -> np.ndarray:
    return np.where(sym >= 1 << (bits - 1), sym - (1 << bits), sym)


def _broadcast(a: np.ndarray, record: dict, shape: tuple, name: str) -> np.ndarray:
    """``a`` (a scale or zero point) repeated over its groups and broadcast to ``shape``."""
    size = record.get("group_size")
    if size:
        axis = record.get("group_axis")
        if not (_is_int(size) and _is_int(axis) and -len(shape) <= axis < len(shape)):
            raise ArtifactError(f"group_size {size!r} / group_axis {axis!r} do not fit shape {list(shape)}.")
        a = np.repeat(a, size, axis=axis)
    try:
        return np.broadcast_to(a, shape)
    except ValueError:
        raise ArtifactError(f"{name} of shape {list(a.shape)} does not broadcast to {list(shape)}.") from None


def decode_tensor(record: dict, segment: bytes) -> tuple[np.ndarray, dict]:
    """One tensor from its record and bytes: ``(array, decoded side arrays)``.

    Raises:
      ArtifactError: anything in the record or bytes that does not add up.
    """
    shape = _shape(record.get("shape"), "shape")
    dtype = record.get("dtype")
    layout, kind, count = record.get("layout"), record.get("kind"), record.get("count")
    streams = record.get("streams")
    if dtype not in _DTYPES or layout not in _LAYOUTS or kind not in _KINDS or not _is_int(count):
        raise ArtifactError(f"tensor {record.get('path')!r}: bad dtype/layout/kind/count in {record!r}.")
    if not isinstance(streams, dict) or "values" not in streams:
        raise ArtifactError(f"tensor {record.get('path')!r} has no values stream.")
    n = math.prod(shape)
    if layout == "dense":
        positions = None
        if count != n:
            raise ArtifactError(f"dense tensor {record['path']!r} stores {count} values for {n} elements.")
    elif layout == "bitmask":
        mask_bytes = decode_stream(segment, streams.get("positions"))
        if mask_bytes.size != math.ceil(n / 8):
            raise ArtifactError(f"bitmask of {record['path']!r} has {mask_bytes.size} bytes for {n} elements.")
        mask = np.unpackbits(mask_bytes.astype(np.uint8), count=n, bitorder="little").astype(bool)
        positions = np.flatnonzero(mask)
    elif layout == "nm":
        nm = record.get("nm")
        entry = streams.get("positions")
        width = (nm[1] - 1).bit_length() if isinstance(nm, list) and len(nm) == 3 and _is_int(nm[1]) else None
        if not (isinstance(entry, list) and len(entry) == 5 and entry[4] == width):
            raise ArtifactError(f"nm tensor {record['path']!r}: the positions of nm = {nm!r} must be {width}-bit, got {entry!r}.")
        positions = nm_positions(decode_stream(segment, entry), nm, shape)
    elif layout == "context":
        entry = streams.get("positions")
        if not (len(shape) >= 2 and n <= MAX_CONTEXT_ELEMENTS and isinstance(entry, list) and len(entry) == 5
                and entry[0] == "context" and entry[3:] == [n, 1] and all(_is_int(v) and v >= 0 for v in entry[1:3])
                and entry[1] + entry[2] <= len(segment)):
            raise ArtifactError(f"context tensor {record['path']!r} of shape {list(shape)}: bad positions entry "
                                f"{entry!r} (a 2+-D tensor of at most {MAX_CONTEXT_ELEMENTS} elements, one bit each).")
        rows = n // shape[-1] if shape[-1] else 0
        positions = column_positions(decode_context_mask(segment[entry[1] : entry[1] + entry[2]], rows,
                                                         shape[-1]))
    else:
        k = record.get("index_bits")
        if not (_is_int(k) and 1 <= k <= 8):
            raise ArtifactError(f"relative tensor {record['path']!r} has index_bits {k!r}.")
        positions = relative_positions(decode_stream(segment, streams.get("positions")), k, n)
    if positions is not None and positions.size != count:
        raise ArtifactError(f"tensor {record['path']!r}: {positions.size} positions for {count} values.")
    sym = decode_stream(segment, streams["values"])
    side: dict = {}
    if kind == "float":
        fdt = record.get("stored_dtype")
        if fdt not in _DTYPES or (fdt in _FLOATS) != (dtype in _FLOATS):
            raise ArtifactError(f"tensor {record['path']!r}: stored_dtype {fdt!r} for a {dtype} tensor.")
        width = np.dtype(fdt).itemsize
        if sym.size != width * count or streams["values"][4] != 8:
            raise ArtifactError(f"tensor {record['path']!r}: {sym.size} value bytes for {count} {fdt}.")
        values = np.frombuffer(sym.astype(np.uint8).tobytes(), np.dtype(fdt).newbyteorder("<"))
    else:
        if dtype not in _FLOATS:
            raise ArtifactError(f"tensor {record['path']!r}: a {kind} code needs a float dtype, not {dtype}.")
        if sym.size != count:
            raise ArtifactError(f"tensor {record['path']!r}: {sym.size} codes for {count} values.")
        take = (lambda a: a.reshape(-1)) if positions is None else (lambda a: a.reshape(-1)[positions])
        if kind in ("int", "sign"):
            bits = streams["values"][4]
            if kind == "int":
                q = _signed(sym, bits) if record.get("signed") else sym
            else:
                if bits != 1:
                    raise ArtifactError(f"tensor {record['path']!r}: sign codes are 1 bit, not {bits}.")
                q = 2 * sym - 1
            scale = _floats(segment, streams, "scale", _shape(record.get("scale_shape"), "scale_shape"))
            side["scale"] = scale
            s = take(_broadcast(scale, record, shape, "scale"))
            values = q.astype(np.float32)
            if "zero_point" in streams:
                zshape = _shape(record.get("zero_point_shape"), "zero_point_shape")
                zsym = decode_stream(segment, streams["zero_point"])
                if zsym.size != math.prod(zshape):
                    raise ArtifactError(f"tensor {record['path']!r}: zero points do not fill {list(zshape)}.")
                zbits = streams["zero_point"][4]
                zp = (_signed(zsym, zbits) if record.get("signed") else zsym).reshape(zshape)
                side["zero_point"] = zp
                values = values - take(_broadcast(zp.astype(np.float32), record, shape, "zero_point"))
            with np.errstate(over="ignore", invalid="ignore"):
                values = values * s
            if not np.all(np.isfinite(values)):  # save refuses such views: a forged scale
                raise ArtifactError(f"tensor {record['path']!r}: its scales give non-finite values.")
        else:
            cb = _floats(segment, streams, "codebook", _shape(record.get("codebook_shape"), "codebook_shape"))
            side["codebook"] = cb
            zero = bool(record.get("zero_symbol"))
            idx = sym - 1 if zero else sym
            if idx.size and int(idx.max()) >= cb.size:
                raise ArtifactError(f"tensor {record['path']!r}: codebook index past its {cb.size} entries.")
            values = np.where(idx < 0, np.float32(0), cb.reshape(-1)[np.maximum(idx, 0)]) if cb.size else np.zeros(idx.size, np.float32)
    out_dtype = np.dtype(dtype)
    if positions is None:
        out = np.array(values.astype(out_dtype, copy=False).reshape(-1), copy=True)
    else:
        out = np.zeros(n, out_dtype)
        out[positions] = values
    if "negative_zeros" in streams:
        zeros = np.flatnonzero(out == 0)
        flags = decode_stream(segment, streams["negative_zeros"])
        if dtype not in _FLOATS or streams["negative_zeros"][4] != 8 or flags.size != math.ceil(zeros.size / 8):
            raise ArtifactError(f"tensor {record['path']!r}: negative_zeros of {flags.size} bytes for {zeros.size} zeros of a {dtype} tensor.")
        bits = np.unpackbits(flags.astype(np.uint8), bitorder="little")
        if np.any(bits[zeros.size:]):
            raise ArtifactError(f"tensor {record['path']!r}: negative_zeros flags past its {zeros.size} zeros.")
        out[zeros] = np.where(bits[: zeros.size].astype(bool), -0.0, 0.0)
    return out.reshape(shape), side


def read(path) -> tuple[dict, bytes, int]:
    """Reads and checks a file: ``(metadata JSON, payload bytes, file size)``.

    Raises:
      ArtifactError: the file is not a well-formed artifact or its digests do not match.
      OSError: the file cannot be read (missing, no permission).
    """
    with open(path, "rb") as f:
        blob = f.read()
    try:
        with np.load(io.BytesIO(blob), allow_pickle=False) as z:
            names = sorted(z.files)
            if names != sorted(_MEMBERS):
                raise ArtifactError(f"{path} holds {names}, expected {sorted(_MEMBERS)}: not a jaxcompress artifact.")
            arrays = {name: z[name] for name in _MEMBERS}
    except ArtifactError:
        raise
    except Exception as e:  # zip, npy header, CRC, truncation: all mean a damaged file
        raise ArtifactError(f"{path} is not a readable artifact ({type(e).__name__}: {e}).") from None
    for name, a in arrays.items():
        if a.dtype != np.uint8 or a.ndim != 1:
            raise ArtifactError(f"{path}: member {name!r} is {a.dtype}{list(a.shape)}, expected 1-D uint8.")
    meta_bytes, payload = arrays["metadata"].tobytes(), arrays["payload"].tobytes()
    if hashlib.sha256(meta_bytes + payload).digest() != arrays["sha256"].tobytes():
        raise ArtifactError(f"{path}: the SHA-256 of its content does not match; the file is damaged.")
    try:
        meta = json.loads(meta_bytes.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path}: metadata is not JSON ({e}).") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a {FORMAT} file.")
    if meta.get("version") not in range(1, VERSION + 1) or isinstance(meta.get("version"), bool):
        raise ArtifactError(f"{path}: format version {meta.get('version')!r}; this reader reads versions 1 to {VERSION}.")
    if meta.get("payload_bytes") != len(payload) or meta.get("payload_sha256") != hashlib.sha256(payload).hexdigest():
        raise ArtifactError(f"{path}: the payload's size or SHA-256 does not match its metadata.")
    if not isinstance(meta.get("tensors"), list) or not isinstance(meta.get("metadata", {}), dict):
        raise ArtifactError(f"{path}: metadata has no tensor list.")
    return meta, payload, len(blob)


def _segment(record: Any, payload: bytes, what: str) -> bytes:
    if not isinstance(record, dict):
        raise ArtifactError(f"{what} record is {type(record).__name__}, expected an object.")
    off, nbytes = record.get("offset"), record.get("nbytes")
    if not (_is_int(off) and _is_int(nbytes) and 0 <= off and 0 <= nbytes and off + nbytes <= len(payload)):
        raise ArtifactError(f"{what}: byte range {off!r}+{nbytes!r} is outside the {len(payload)}-byte payload.")
    data = payload[off : off + nbytes]
    if record.get("sha256") != record_digest(record, data):
        raise ArtifactError(f"{what}: SHA-256 of its record and bytes does not match; the file is damaged.")
    return data


def _nest(flat: dict) -> dict:
    out: dict = {}
    for name, value in flat.items():
        *heads, last = name.split("/")
        node = out
        for h in heads:
            node = node.setdefault(h, {})
            if not isinstance(node, dict):
                raise ArtifactError(f"path {name!r} runs through a leaf.")
        if last in node:
            raise ArtifactError(f"path {name!r} appears twice.")
        node[last] = value
    return out


def load(path, *, like: Any = None) -> tuple[Any, ArtifactInfo]:
    """Loads the weights of an artifact, checking every digest and record.

    Args:
      path: the ``.npz`` file written by :func:`jaxcompress.export.save`.
      like: optional pytree with the saved structure (e.g. the params that were saved): the
        result then has its structure (and needs JAX); otherwise nested dicts keyed by the
        ``'/'``-separated paths.

    Returns:
      ``(params, info)``: the arrays exactly as the compressed view was saved (pruned zeros as
      ``+0.0``), and an :class:`ArtifactInfo`.

    Raises:
      ArtifactError: a damaged, truncated or tampered file, or ``like`` of another structure.
    """
    meta, payload, size = read(path)
    flat, records = {}, {}
    for i, record in enumerate(meta["tensors"]):
        segment = _segment(record, payload, f"tensor {i}")
        name = record.get("path")
        if not isinstance(name, str) or not name or name in flat:
            raise ArtifactError(f"tensor {i} has a missing or repeated path {name!r}.")
        if record.get("layout") == "context" and meta["version"] < 2:
            raise ArtifactError(f"tensor {name!r}: the context layout is not part of format version {meta['version']}.")
        try:
            flat[name], side = decode_tensor(record, segment)
        except ArtifactError:
            raise
        except Exception as e:  # a consistent record that still does not decode
            raise ArtifactError(f"tensor {name!r} does not decode ({type(e).__name__}: {e}).") from None
        records[name] = {**record, **side}
    program = None
    if meta.get("program") is not None:
        program = _segment(meta["program"], payload, "program")
    info = ArtifactInfo(records, meta.get("metadata", {}), program, meta["version"], size)
    if like is None:
        return _nest(flat), info
    import jax  # only when the caller asks for its own structure

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [jax.tree_util.keystr(p, simple=True, separator="/") for p, _ in leaves_with_path]
    if sorted(names) != sorted(flat):
        raise ArtifactError(f"like has leaves {sorted(names)[:5]}..., the file {sorted(flat)[:5]}...")
    return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names]), info


def load_program(path):
    """The exported program stored in an artifact, as a ``jax.export.Exported``.

    Call it as ``exported.call(params, batch)`` with the params of :func:`load`.

    Raises:
      ArtifactError: a damaged file, or one saved without a program.
    """
    from jax import export  # the program needs JAX; the weights do not

    _, info = load(path)
    if info.program is None:
        raise ArtifactError(f"{path} holds no program; save one with save(..., program=export_program(...)).")
    return export.deserialize(bytearray(info.program))
