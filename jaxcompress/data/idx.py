"""Reading and writing IDX files, the array format of the MNIST-family data sets.

An IDX file is a 4-byte magic number ``0x0000TTNN`` (``TT`` a type code, ``NN`` the number of
dimensions), ``NN`` big-endian uint32 sizes, then the array in C order with big-endian items.
The files are usually distributed gzipped.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

_GZIP_MAGIC = b"\x1f\x8b"

# Type code -> big-endian dtype, as defined by the IDX format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype("u1"),
    0x09: np.dtype("i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_EXPECTED_MAGIC = (
    "expected 0x0000TTNN (IDX: two zero bytes, a type code TT among 08 uint8, 09 int8, 0B int16, "
    "0C int32, 0D float32, 0E float64, and NN >= 1 dimensions)"
)


def read_idx_content(path: str | os.PathLike) -> bytes:
    """Returns the uncompressed bytes of an IDX file, gunzipping it if it is gzipped.

    Gzip is recognised by its magic bytes, so a gzipped file without the ``.gz`` suffix (or a raw
    file with it) is read correctly.

    Args:
      path: the file to read.

    Returns:
      The file's content, uncompressed; this is what the published MD5s of the data sets cover.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: if the file is gzipped but the gzip stream is corrupt or truncated.
    """
    raw = Path(path).read_bytes()
    if not raw.startswith(_GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(
            f"corrupt gzip stream in {os.fspath(path)}: {type(err).__name__}: {err}. "
            "The file is damaged or was cut short; delete it and download or copy it again."
        ) from err


def parse_idx(content: bytes, source: str | os.PathLike = "<bytes>") -> np.ndarray:
    """Parses the uncompressed bytes of an IDX file into an array.

    Args:
      content: the whole uncompressed file.
      source: the file name used in error messages.

    Returns:
      A writable array in native byte order with the dtype and shape the header declares.

    Raises:
      ValueError: naming ``source`` if the magic number is wrong, the header is cut short, or the
        payload is shorter or longer than the declared shape needs.
    """
    name = os.fspath(source)
    if len(content) < 4:
        raise ValueError(f"{name} is too short to be an IDX file: {len(content)} bytes, {_EXPECTED_MAGIC}.")
    zero0, zero1, code, ndim = content[0], content[1], content[2], content[3]
    magic = int.from_bytes(content[:4], "big")
    if zero0 != 0 or zero1 != 0 or code not in IDX_DTYPES or ndim < 1:
        raise ValueError(f"wrong magic number 0x{magic:08X} in {name}: {_EXPECTED_MAGIC}.")
    header_len = 4 + 4 * ndim
    if len(content) < header_len:
        raise ValueError(
            f"truncated IDX header in {name}: magic 0x{magic:08X} declares {ndim} dimensions, which "
            f"needs a {header_len}-byte header, but the file has only {len(content)} bytes."
        )
    shape = struct.unpack(f">{ndim}I", content[4:header_len])
    dtype = IDX_DTYPES[code]
    expected = math.prod(shape) * dtype.itemsize
    found = len(content) - header_len
    if found != expected:
        problem = "truncated" if found < expected else "too long"
        raise ValueError(
            f"IDX payload {problem} in {name}: header declares shape {shape} of {dtype.name}, which "
            f"needs {expected} bytes, but {found} follow the header. The file is damaged; delete it "
            "and download or copy it again."
        )
    array = np.frombuffer(content, dtype=dtype, count=math.prod(shape), offset=header_len)
    # astype copies, which both converts to native byte order and makes the result writable.
    return array.astype(dtype.newbyteorder("="), copy=True).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file, gzipped or raw, into a numpy array.

    Args:
      path: the file; gzip is detected from the content, not only the ``.gz`` suffix.

    Returns:
      A writable array in native byte order with the dtype and shape from the file's header.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      ValueError: naming ``path`` if the gzip stream is corrupt, the magic number is wrong, or the
        payload length does not match the declared shape.
    """
    return parse_idx(read_idx_content(path), path)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Writes ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``.

    Args:
      path: the file to write.
      array: an array of one of the IDX dtypes (uint8, int8, int16, int32, float32, float64) with at
        least one dimension.

    Returns:
      ``path`` as a ``Path``.

    Raises:
      TypeError: if ``array``'s dtype has no IDX type code.
      ValueError: if ``array`` is a scalar (IDX needs at least one dimension).

    Example:
      >>> import tempfile, numpy as np
      >>> with tempfile.TemporaryDirectory() as d:
      ...     p = write_idx(Path(d) / "x.idx.gz", np.arange(6, dtype=np.int16).reshape(2, 3))
      ...     read_idx(p).tolist()
      [[0, 1, 2], [3, 4, 5]]
    """
    array = np.asarray(array)
    codes = {dt.newbyteorder("="): code for code, dt in IDX_DTYPES.items()}
    code = codes.get(array.dtype.newbyteorder("="))
    if code is None:
        raise TypeError(
            f"array has dtype {array.dtype}, which IDX cannot store; convert it to one of "
            "uint8, int8, int16, int32, float32, float64."
        )
    if array.ndim < 1:
        raise ValueError("array must have at least one dimension for IDX, got a scalar; reshape it to (1,).")
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    content = header + np.ascontiguousarray(array, dtype=IDX_DTYPES[code]).tobytes()
    path = Path(path)
    path.write_bytes(gzip.compress(content) if path.name.endswith(".gz") else content)
    return path
