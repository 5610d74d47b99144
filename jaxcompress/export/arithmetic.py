"""Context-adaptive binary arithmetic coding of sparse masks (the ``context`` layout).

Where a pruned kernel keeps its weights is not random: some inputs and some output channels keep
many more than others (dead neurons, channels that matter). Coding the mask one element at a
time with a probability learned on the fly per context, the context being how dense the
element's row and its column have been so far, spends fewer bits on such masks than the order-0
Huffman codes of bitmask bytes or index gaps, in the spirit of the context-adaptive coding of
DeepCABAC (Wiedemann et al. 2019, the MPEG-7 NNR standard) and of JBIG's binary images.
:func:`encode_context_mask` is the exact inverse of
:func:`~jaxcompress.export.reader.decode_context_mask`, where the model and the coder are
specified; it is a Python loop per element (about a second per million weights here), which is why
:func:`~jaxcompress.export.save` tries it only when asked (``context_coding=True``).
"""
from __future__ import annotations

import numpy as np

from jaxcompress.export.reader import (_HALF, _QUARTER, _TOP, CONTEXT_WIDTH, MAX_CONTEXT_ELEMENTS, context_adapt,
                                       context_split, mask_bucket, row_buckets)


def encode_context_mask(mask) -> bytes:
    """The arithmetic-coded bits of a 2-D boolean ``mask`` (rows x columns), column after column.

    Args:
      mask: ``(rows, cols)``; a kernel's mask reshaped with its output channels as columns.

    Returns:
      The coded bytes (a little-endian bit stream, as every stream of the file format).

    Raises:
      ValueError: ``mask`` is not 2-D or has more than ``MAX_CONTEXT_ELEMENTS`` elements.

    Example:
      >>> m = np.zeros((64, 8), bool); m[::7, 2] = True
      >>> len(encode_context_mask(m)) < m.size // 8   # fewer bytes than a plain bitmask
      True
    """
    mask = np.asarray(mask, bool)
    if mask.ndim != 2 or mask.size > MAX_CONTEXT_ELEMENTS:
        raise ValueError(f"mask must be 2-D with at most {MAX_CONTEXT_ELEMENTS} elements, got shape {mask.shape}.")
    rows, cols = mask.shape
    low, high, pending = 0, _TOP, 0
    out: list[int] = []
    counts = [[1, 1] for _ in range(CONTEXT_WIDTH * CONTEXT_WIDTH)]
    row_ones = np.zeros(rows, np.int64)
    for j in range(cols):
        rb = row_buckets(row_ones, j)
        col = mask[:, j]
        ones = 0
        for i, bit in enumerate(col.tolist()):
            k = rb[i] * CONTEXT_WIDTH + mask_bucket(ones, i)
            split = context_split(counts, k, low, high)
            low, high = (split, high) if bit else (low, split - 1)
            ones += bit
            context_adapt(counts, k, bit)
            while True:
                if high < _HALF:
                    out.append(0)
                    out.extend([1] * pending)
                    pending = 0
                elif low >= _HALF:
                    out.append(1)
                    out.extend([0] * pending)
                    pending = 0
                    low, high = low - _HALF, high - _HALF
                elif low >= _QUARTER and high < _HALF + _QUARTER:
                    pending += 1
                    low, high = low - _QUARTER, high - _QUARTER
                else:
                    break
                low, high = low << 1, (high << 1) | 1
        row_ones += col
    pending += 1  # two more bits pin a value inside [low, high]
    first = 0 if low < _QUARTER else 1
    out.append(first)
    out.extend([1 - first] * pending)
    return np.packbits(np.asarray(out, np.uint8), bitorder="little").tobytes()
