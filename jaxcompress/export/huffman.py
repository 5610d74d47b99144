"""Canonical Huffman coding of symbol streams (Deep Compression's last stage), and bit packing.

:func:`code_lengths` builds an optimal prefix code from symbol counts (limited to 15 bits by
halving the counts until it fits, which costs almost nothing in practice); the code itself is
canonical (:func:`~jaxcompress.export.reader.canonical_codes`), so a file stores only the
lengths. :func:`encode` / :func:`~jaxcompress.export.reader.huffman_decode` are exact inverses.
:func:`entropy_bits` is the order-0 Shannon bound the code is measured against.
"""
from __future__ import annotations

import heapq

import numpy as np

from jaxcompress.export.reader import MAX_CODE_LENGTH, canonical_codes
from jaxcompress.export.reader import huffman_decode as decode  # noqa: F401  (the inverse, re-exported)


def pack_bits(symbols: np.ndarray, bits: int) -> bytes:
    """Packs unsigned ``bits``-bit symbols into a little-endian bit stream (see the file format).

    Example:
      >>> pack_bits(np.array([8, 15, 0, 7]), 4).hex()  # int4 [-8, -1, 0, 7], low nibble first
      'f870'
    """
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    if symbols.size and (symbols.min() < 0 or symbols.max() >= 1 << bits):
        raise ValueError(f"symbols must lie in [0, {2 ** bits - 1}] for bits={bits}.")
    if bits == 8:
        return symbols.astype(np.uint8).tobytes()
    flat = ((symbols[:, None] >> np.arange(bits)) & 1).astype(np.uint8).reshape(-1)
    return np.packbits(flat, bitorder="little").tobytes()


def code_lengths(counts: np.ndarray, max_length: int = MAX_CODE_LENGTH) -> np.ndarray:
    """Huffman code lengths (0 for symbols that never occur), at most ``max_length`` bits.

    Example:
      >>> code_lengths(np.array([5, 2, 1, 1])).tolist()
      [1, 2, 3, 3]
    """
    counts = np.asarray(counts, np.int64)
    used = [int(s) for s in np.flatnonzero(counts)]
    lengths = np.zeros(counts.size, np.int64)
    if len(used) == 1:
        lengths[used[0]] = 1
    if len(used) <= 1:
        return lengths
    weights = {s: int(counts[s]) for s in used}
    while True:
        heap = [(weights[s], s) for s in used]
        heapq.heapify(heap)
        parent: dict = {}
        node = counts.size  # internal nodes get ids after the symbols', in creation order
        while len(heap) > 1:
            (wa, a), (wb, b) = heapq.heappop(heap), heapq.heappop(heap)
            parent[a] = parent[b] = node
            heapq.heappush(heap, (wa + wb, node))
            node += 1
        depth = {node - 1: 0}
        for n in range(node - 2, counts.size - 1, -1):  # parents are created after children
            depth[n] = depth[parent[n]] + 1
        for s in used:
            lengths[s] = depth[parent[s]] + 1
        if lengths.max() <= max_length:
            return lengths
        weights = {s: (w + 1) // 2 for s, w in weights.items()}  # flatten and retry


def encode(symbols: np.ndarray, bits: int) -> bytes:
    """Canonical Huffman coding of ``bits``-bit symbols: the 4-bit length table, then the codes.

    Example:
      >>> x = np.array([0, 0, 0, 1, 2, 0, 3, 0])
      >>> data = encode(x, 2)
      >>> decode(code_lengths(np.bincount(x, minlength=4)), data[2:], x.size).tolist() == x.tolist()
      True
    """
    symbols = np.asarray(symbols, np.int64).reshape(-1)
    lengths = code_lengths(np.bincount(symbols, minlength=1 << bits)) if symbols.size else np.zeros(1 << bits, np.int64)
    table = pack_bits(lengths, 4)
    if not symbols.size:
        return table
    codes = canonical_codes(lengths)
    lens, vals = lengths[symbols], codes[symbols]
    which = np.repeat(np.arange(symbols.size), lens)
    within = np.arange(which.size) - np.repeat(np.cumsum(lens) - lens, lens)
    stream = ((vals[which] >> (lens[which] - 1 - within)) & 1).astype(np.uint8)
    return table + np.packbits(stream, bitorder="little").tobytes()


def entropy_bits(symbols: np.ndarray) -> float:
    """The order-0 Shannon bound of a stream: ``n * H(p)`` bits with ``p`` its symbol frequencies.

    Example:
      >>> entropy_bits(np.array([0, 1, 2, 3]))
      8.0
    """
    symbols = np.asarray(symbols).reshape(-1)
    if not symbols.size:
        return 0.0
    p = np.unique(symbols, return_counts=True)[1] / symbols.size
    return float(-(p * np.log2(p)).sum() * symbols.size)
