"""Packs one compressed leaf into the artifact's byte streams, from its self-description.

For each leaf the transform describes (a :class:`~jaxcompress.core.transform.LeafSpec`), the
integer codes are recovered from the view (``q = view / scale + zero_point``, checked to be an
integer in range and to give back the view bit for bit), and every layout (dense, bitmask,
relative indices of 2..8 bits, N:M positions when the leaf's structure is ``NM`` and its
mask really keeps ``n`` of every ``m``, and on request the context-coded mask of
:mod:`~jaxcompress.export.arithmetic`) is tried with every stream raw or Huffman-coded; the
smallest wins. Leaves the description does not name are stored as raw float32 (or float16 on
request). The format is documented in :mod:`jaxcompress.export.reader`.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import numpy as np

from jaxcompress.core.transform import LeafSpec
from jaxcompress.export import huffman
from jaxcompress.export.arithmetic import encode_context_mask
from jaxcompress.export.reader import MAX_CONTEXT_ELEMENTS, column_positions, decode_tensor, record_digest
from jaxcompress.prune.structures import NM


class TensorReport(NamedTuple):
    """How one leaf was stored.

    Attributes:
      path: the leaf's ``'/'``-joined path.
      layout: ``'dense'``, ``'bitmask'``, ``'relative'`` or ``'nm'``.
      kind: ``'float'``, ``'int'``, ``'sign'`` or ``'codebook'``.
      bits: bits per stored value code (32/16 for floats).
      count: values stored.
      nbytes: bytes in the file (streams, tables, scales).
      raw_bytes: the same streams without entropy coding.
      entropy_bytes: the order-0 Shannon bound of the value and position streams plus the rest
        at its stored size (a context-coded mask, which models rows and columns, can go below it).
    """

    path: str
    layout: str
    kind: str
    bits: int
    count: int
    nbytes: int
    raw_bytes: int
    entropy_bytes: float


class _Stream(NamedTuple):
    symbols: np.ndarray
    bits: int
    coded: bool | str  # may be Huffman-coded; 'context': a 2-D mask, arithmetic-coded


def _float_symbols(a: np.ndarray, dtype) -> np.ndarray:
    return np.frombuffer(np.ascontiguousarray(a, np.dtype(dtype).newbyteorder("<")).tobytes(), np.uint8).astype(np.int64)


def _encode_stream(s: _Stream) -> tuple[str, bytes, int]:
    """``(coding, bytes, raw size)``: raw or Huffman, whichever is smaller (a mask: context-coded)."""
    if s.coded == "context":
        return "context", encode_context_mask(s.symbols), -(-s.symbols.size // 8)
    raw = huffman.pack_bits(s.symbols, s.bits)
    if s.coded and s.bits >= 2 and s.symbols.size:
        coded = huffman.encode(s.symbols, s.bits)
        if len(coded) < len(raw):
            return "huffman", coded, len(raw)
    return "raw", raw, len(raw)


def _full(a, spec: LeafSpec, shape) -> np.ndarray:
    a = np.asarray(a)
    if spec.group_size:
        a = np.repeat(a, spec.group_size, axis=spec.group_axis)
    return np.broadcast_to(a, shape)


def _grid_error(path, msg):
    return ValueError(
        f"leaf {path!r}: {msg}. save needs the compressed view the description was taken with: "
        "view = transform.apply(params, state), description = transform.describe(params, state)."
    )


def _int_codes(path: str, x: np.ndarray, spec: LeafSpec) -> tuple[np.ndarray, dict, dict]:
    """Integer codes of a quantized leaf, its side streams and record fields."""
    if spec.scale is None or spec.bits is None:
        raise _grid_error(path, f"scheme {spec.scheme!r} needs bits and scale in its description")
    bits = int(spec.bits)
    scheme = spec.scheme
    if scheme in ("binary", "ternary"):
        bits, signed = 2, True
    else:
        signed = scheme != "affine"
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    scale = np.asarray(spec.scale, np.float32)
    zp = None if spec.zero_point is None else np.asarray(spec.zero_point)
    try:
        s_full = _full(scale, spec, x.shape).astype(np.float64)
        z_full = 0.0 if zp is None else _full(zp, spec, x.shape).astype(np.float64)
    except ValueError:
        raise _grid_error(path, f"scale {list(scale.shape)} does not broadcast to {list(x.shape)}") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.rint(x.astype(np.float64) / s_full) + z_full
    if not np.all(np.isfinite(q)) or q.size and (q.min() < lo or q.max() > hi):
        raise _grid_error(path, f"its codes are not integers in [{lo}, {hi}] ({bits}-bit {scheme})")
    if zp is not None and (np.any(zp != np.rint(zp)) or zp.min() < lo or zp.max() > hi):
        raise _grid_error(path, f"zero points are not integers in [{lo}, {hi}]")
    q = q.astype(np.int64)
    side = {"scale": _Stream(_float_symbols(scale, "float32"), 8, False)}
    fields = {"signed": signed, "scale_shape": list(scale.shape)}
    if zp is not None:
        zsym = zp.astype(np.int64).reshape(-1)
        side["zero_point"] = _Stream(zsym & ((1 << bits) - 1), bits, False)
        fields["zero_point_shape"] = list(zp.shape)
    if spec.group_size:
        fields.update(group_size=int(spec.group_size), group_axis=int(spec.group_axis))
    return q, side, {**fields, "bits": bits}


def _values(q: Optional[np.ndarray], x: np.ndarray, kind: str, fields: dict, where, holds_zeros: bool):
    """The values stream of one layout (``where``: flat positions, or None for all; ``holds_zeros``:
    the layout stores zeros, as dense and N:M do)."""
    if kind == "float":
        v = x.reshape(-1) if where is None else x.reshape(-1)[where]
        return "float", _Stream(_float_symbols(v, fields["stored_dtype"]), 8, True), {}
    codes = q.reshape(-1) if where is None else q.reshape(-1)[where]
    if kind == "int":
        if codes.size and np.all(np.abs(codes) == 1) and fields["signed"]:
            return "sign", _Stream((codes > 0).astype(np.int64), 1, False), {}
        bits = fields["bits"]
        return "int", _Stream(codes & ((1 << bits) - 1), bits, True), {}
    # codebook: codes index the sorted codebook, -1 marks a zero
    k = fields["codebook_size"]
    zero = bool(holds_zeros and np.any(codes < 0))
    bits = max(1, (k + int(zero) - 1).bit_length())
    return "codebook", _Stream(codes + 1 if zero else codes, bits, True), {"zero_symbol": zero, "bits": bits}


def _codebook_codes(path, x, spec):
    cb = np.sort(np.asarray(spec.codebook, np.float32).reshape(-1))
    flat = x.reshape(-1)
    idx = np.clip(np.searchsorted(cb, flat), 0, max(cb.size - 1, 0))
    nonzero = flat != 0
    if cb.size == 0 and nonzero.any() or cb.size and np.any(nonzero & (cb[idx] != flat)):
        raise _grid_error(path, "it has values that are not in its codebook")
    zero_in_cb = cb.size and np.any(cb == 0)
    codes = np.where(nonzero | bool(zero_in_cb), idx, -1)
    # Only the entries some weight uses are stored (k-means may leave clusters empty, and a small
    # layer with a large codebook uses few): the same values, a shorter table, maybe fewer index bits.
    used = np.unique(codes[codes >= 0])
    cb, codes = cb[used], np.where(codes >= 0, np.searchsorted(used, codes), -1).reshape(x.shape)
    side = {"codebook": _Stream(_float_symbols(cb, "float32"), 8, False)}
    return codes, side, {"codebook_size": int(cb.size), "codebook_shape": [int(cb.size)]}


def nm_slots(mask: Any, structure: Any) -> Optional[tuple[np.ndarray, np.ndarray, list]]:
    """The N:M layout of a keep-mask: ``(flat positions, in-group slots, [n, m, axis])`` or ``None``.

    ``None`` unless ``structure`` is :class:`~jaxcompress.prune.structures.NM` and ``mask`` keeps
    exactly ``n`` of every ``m`` consecutive elements along its axis (with ``2 <= m <= 256``).
    Positions and slots are in the order :func:`~jaxcompress.export.reader.nm_positions` reads.

    Example:
      >>> where, slots, nm = nm_slots(np.array([[1, 0, 0, 1], [0, 1, 1, 0]], bool), NM(2, 4, axis=-1))
      >>> where.tolist(), slots.tolist(), nm
      ([0, 3, 5, 6], [0, 3, 1, 2], [2, 4, 1])
      >>> nm_slots(np.array([[1, 1, 1, 0]], bool), NM(2, 4, axis=-1)) is None
      True
    """
    if not isinstance(structure, NM) or mask is None:
        return None
    mask = np.asarray(mask, bool)
    n, m = structure.n, structure.m
    if mask.ndim == 0 or not -mask.ndim <= structure.axis < mask.ndim or not 2 <= m <= 256 or not 1 <= n <= m:
        return None
    axis = structure.axis % mask.ndim
    if mask.shape[axis] % m:
        return None
    groups = np.moveaxis(mask, axis, -1).reshape(-1, m)
    if np.any(groups.sum(axis=1) != n):
        return None
    group, slot = np.nonzero(groups)  # row-major: group after group, slots increasing
    order = np.moveaxis(np.arange(mask.size, dtype=np.int64).reshape(mask.shape), axis, -1).reshape(-1)
    return order[group * m + slot], slot.astype(np.int64), [n, m, axis]


def _layouts(shape: tuple, nonzero: np.ndarray, allow_sparse: bool, nm, context: bool):
    """Candidate ``(layout, positions stream, where, fields)`` of a leaf (``nm``: its :func:`nm_slots`;
    ``context``: also the context-coded mask)."""
    n = nonzero.size
    yield "dense", None, None, {}
    if not allow_sparse or n == 0:
        return
    if context and len(shape) >= 2 and n <= MAX_CONTEXT_ELEMENTS:
        mask = nonzero.reshape(-1, shape[-1])  # output channels as columns, coded column after column
        yield "context", _Stream(mask, 1, "context"), column_positions(mask), {}
    if nm is not None:
        where, slots, fields = nm
        yield "nm", _Stream(slots, (fields[1] - 1).bit_length(), True), where, {"nm": fields}
    where = np.flatnonzero(nonzero)
    mask_bytes = np.frombuffer(np.packbits(nonzero.astype(np.uint8), bitorder="little").tobytes(), np.uint8)
    yield "bitmask", _Stream(mask_bytes.astype(np.int64), 8, True), where, {}
    skipped = np.diff(np.concatenate([[-1], where])) - 1
    for k in range(2, 9):
        esc = (1 << k) - 1
        reps, rest = skipped // esc, skipped % esc
        gaps = np.repeat(np.stack([np.full_like(rest, esc), rest], 1).reshape(-1),
                         np.stack([reps, np.ones_like(rest)], 1).reshape(-1))
        yield "relative", _Stream(gaps, k, True), where, {"index_bits": k}


def _assemble(record: dict, streams: list) -> tuple[bytes, int, float, np.ndarray]:
    """Lays out ``[(name, (stream, encoded))]`` one after another into ``record['streams']``:
    ``(bytes, raw size, entropy bound, the tensor load will give)``."""
    chunks, entries, offset = [], {}, 0
    raw_total, bound = 0, 0.0
    for name, (stream, (coding, data, raw)) in streams:
        entries[name] = [coding, offset, len(data), int(stream.symbols.size), int(stream.bits)]
        chunks.append(data)
        offset += len(data)
        raw_total += raw
        bound += huffman.entropy_bits(stream.symbols) / 8 if stream.coded else len(data)
    record["streams"] = entries
    data = b"".join(chunks)
    decoded, _ = decode_tensor(record, data)  # what load will give, checked now
    return data, raw_total, bound, decoded


def pack_leaf(path: str, x: Any, spec: Optional[LeafSpec], *, float_dtype: str = "float32",
              layout: Optional[str] = None, context_coding: bool = False) -> tuple[dict, bytes, TensorReport]:
    """Packs one leaf: ``(record without offset, bytes, report)``, the smallest encoding found.

    Args:
      path: the leaf's path name.
      x: the leaf as the model runs it (the compressed view).
      spec: its :class:`~jaxcompress.core.transform.LeafSpec`, or ``None`` (stored as floats).
      float_dtype: ``'float32'`` or ``'float16'`` for leaves without a description.
      layout: ``None`` (the smallest), or ``'dense'``, ``'bitmask'``, ``'relative'``, ``'nm'`` or
        ``'context'`` to store the leaf in that layout only (e.g. ``'nm'`` for a reader that wants
        N:M positions even where a bitmask is smaller).
      context_coding: also try the ``'context'`` layout (the mask arithmetic-coded with adaptive
        row and column contexts, :mod:`~jaxcompress.export.arithmetic`) for sparse leaves of two
        or more dimensions; a Python loop per element, so off unless asked for.

    Raises:
      ValueError: the view is not on the grid, codebook or mask its description gives, its
        dtype is not a NumPy float or int type, or ``layout`` is unknown or does not apply to
        the leaf (a sparse layout for an undescribed leaf, ``'nm'`` for a mask that is not N:M).

    Example:
      >>> mask = np.array([[1, 0, 0, 0, 0, 0, 1, 0]], bool).T  # 1:4 down the input axis
      >>> record, data, report = pack_leaf('w', np.where(mask, 0.5, 0), LeafSpec(mask=mask, structure=NM(1, 4)))
      >>> record['layout'], record['nm'], report.count
      ('nm', [1, 4, 0], 2)
    """
    if layout not in (None, "dense", "bitmask", "relative", "nm", "context"):
        raise ValueError(f"layout must be None, 'dense', 'bitmask', 'relative', 'nm' or 'context', got {layout!r}.")
    x = np.asarray(x)
    if x.dtype.name not in ("float16", "float32", "float64") and not (spec is None and x.dtype.kind in "iub"):
        raise ValueError(f"leaf {path!r} has dtype {x.dtype}; save supports float16/32/64 (cast it, e.g. to float32).")
    record = {"path": path, "shape": list(x.shape), "dtype": x.dtype.name}
    if spec is not None and spec.mask is not None:  # latent leaves count as masked; pruned zeros are +0.0
        x = np.where(np.asarray(spec.mask, bool), x, np.zeros((), x.dtype))
    side: dict = {}
    q = None
    if spec is None:
        kind, fields = "float", {"stored_dtype": float_dtype if x.dtype.kind == "f" else x.dtype.name}
    elif spec.scheme == "codebook" or spec.codebook is not None:
        kind = "codebook"
        q, side, fields = _codebook_codes(path, x, spec)
    elif spec.bits is not None or spec.scheme is not None:
        kind = "int"
        q, side, fields = _int_codes(path, x, spec)
    else:  # pruned only: float values
        kind, fields = "float", {"stored_dtype": x.dtype.name}
    if spec is not None and spec.scheme is not None:
        record["scheme"] = spec.scheme
        if spec.channel_axis is not None:
            record["channel_axis"] = int(spec.channel_axis)
    side_enc = {name: _encode_stream(s) for name, s in side.items()}
    nonzero = (x != 0).reshape(-1)
    best = None
    nm = None if spec is None else nm_slots(spec.mask, spec.structure)
    context = context_coding or layout == "context"
    for name, pos, where, lfields in _layouts(x.shape, nonzero, spec is not None, nm, context):
        if layout is not None and name != layout:
            continue
        vkind, vstream, vfields = _values(q, x, kind, fields, where, name in ("dense", "nm"))
        streams = {"values": (vstream, _encode_stream(vstream))}
        if pos is not None:
            streams["positions"] = (pos, _encode_stream(pos))
        size = sum(len(e[1]) for _, e in streams.values())
        if best is None or size < best[0]:
            best = (size, name, vkind, lfields, vfields, streams, x.size if where is None else where.size)
    if best is None:
        raise ValueError(
            f"leaf {path!r} cannot be stored in layout {layout!r}: sparse layouts need a description, 'nm' "
            "a LeafSpec with structure NM(n, m, axis) whose mask keeps exactly n of every m along the axis, and "
            f"'context' a leaf of 2 or more dimensions and at most {MAX_CONTEXT_ELEMENTS} elements."
        )
    _, layout, vkind, lfields, vfields, streams, count = best
    record.update(layout=layout, kind=vkind, count=int(count), **lfields)
    record.update({k: v for k, v in fields.items() if k not in ("codebook_size",)})
    record.update(vfields)
    if vkind == "sign":
        record["bits"] = 1
    if kind != "float":
        record.pop("stored_dtype", None)
    expect = x if spec is not None or x.dtype.kind != "f" else x.astype(float_dtype).astype(x.dtype)
    data, raw_total, bound, decoded = _assemble(record, list(streams.items()) + [(n, (side[n], e)) for n, e in side_enc.items()])
    if decoded.shape != expect.shape or not np.array_equal(decoded, expect, equal_nan=expect.dtype.kind == "f"):
        raise _grid_error(path, "its values are not exactly reproduced by its described grid")
    if decoded.tobytes() != expect.tobytes():  # equal but for the sign of zeros: -0.0 of the view
        zeros = expect.reshape(-1) == 0
        flags = np.packbits(np.signbit(expect.reshape(-1)[zeros]), bitorder="little").astype(np.int64)
        signs = _Stream(flags, 8, True)
        side_enc["negative_zeros"] = _encode_stream(signs)
        side["negative_zeros"] = signs
        data, raw_total, bound, decoded = _assemble(record, list(streams.items()) + [(n, (side[n], e)) for n, e in side_enc.items()])
        if decoded.tobytes() != expect.tobytes():
            raise _grid_error(path, "its values are not exactly reproduced, bit for bit, by its described grid")
    report = TensorReport(path, layout, vkind, int(record.get("bits", 8 * np.dtype(fields.get("stored_dtype", "float32")).itemsize)),
                          int(count), len(data), raw_total, bound)
    return record, data, report


def finish_record(record: dict, offset: int, data: bytes) -> dict:
    """The record with its byte range and digest."""
    record = {**record, "offset": offset, "nbytes": len(data)}
    record["sha256"] = record_digest(record, data)
    return record
