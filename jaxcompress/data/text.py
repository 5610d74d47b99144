"""A byte-level text corpus available offline: the Python standard library's own source code.

Every Python installation ships its standard library as ``.py`` files, so this corpus needs no
download. Files are split into train/validation/test by a hash of their relative path (whole
files go to one split, so no function is half in train and half in test), their bytes are the
tokens (vocabulary 256, no tokenizer), and SHA-256 checksums of the file list and of the bytes let
an experiment state exactly which corpus it used (it changes with the Python version).
"""
from __future__ import annotations

import hashlib
import platform
import sysconfig
from pathlib import Path
from typing import Iterator, Mapping, NamedTuple, Optional

import numpy as np

from jaxcompress.core.validation import check_int

SPLITS = ("train", "validation", "test")
# Fractions of the files per split, assigned by hash of the relative path.
SPLIT_FRACTIONS = {"train": 0.90, "validation": 0.05, "test": 0.05}
# ASCII "file separator"; it occurs in no standard-library source file, so it marks file ends.
SEPARATOR = 0x1C
# Directory names whose contents are left out: test suites (including idlelib/idle_test and
# lib2to3/tests) and third-party packages.
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# Generated at build time with the build machine's paths and flags; not source code.
EXCLUDED_FILE_PREFIX = "_sysconfigdata"


class TextCorpus(NamedTuple):
    """Byte tokens of the standard library's sources, split by file.

    Attributes:
      train, validation, test: uint8 token arrays: each split's files in sorted order, each file
        followed by the ``SEPARATOR`` byte (cut at ``max_bytes`` when one was given).
      files: split name -> tuple of the relative paths (``'/'``-separated) in that split, sorted;
        with ``max_bytes`` only the files whose bytes (some of them) were kept.
      files_sha256: SHA-256 hex digest of all the split's relative paths, one per line, as
        ``'split<TAB>path'`` lines in split order; it identifies the file list and its split.
      sha256: split name -> SHA-256 hex digest of that split's token bytes.
      python_version: the version whose standard library was read, e.g. ``'3.11.7'``.
    """

    train: np.ndarray
    validation: np.ndarray
    test: np.ndarray
    files: Mapping[str, tuple]
    files_sha256: str
    sha256: Mapping[str, str]
    python_version: str


def split_of(relative_path: str) -> str:
    """The split a file goes to: fixed by the SHA-256 of its ``'/'``-separated relative path.

    A file's split does not depend on which other files exist, so adding or removing files (as
    Python versions do) moves no other file between splits.

    Example:
      >>> split_of('json/decoder.py') in SPLITS
      True
    """
    digest = hashlib.sha256(relative_path.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    if u < SPLIT_FRACTIONS["train"]:
        return "train"
    return "validation" if u < SPLIT_FRACTIONS["train"] + SPLIT_FRACTIONS["validation"] else "test"


def source_files(root: Optional[str | Path] = None) -> list[str]:
    """Sorted relative paths of the ``.py`` source files under ``root``.

    Files in ``EXCLUDED_DIRS`` and the build-generated ``_sysconfigdata*.py`` are left out.

    Args:
      root: directory to read; ``None`` means this interpreter's standard library
        (``sysconfig.get_paths()['stdlib']``).

    Raises:
      ValueError: if ``root`` is not a directory or holds no ``.py`` file.
    """
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    if not root.is_dir():
        raise ValueError(f"root must be a directory of .py files, got {str(root)!r}, which is not a directory.")
    paths = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.is_file()
        and not p.name.startswith(EXCLUDED_FILE_PREFIX)
        and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
    )
    if not paths:
        raise ValueError(f"root {str(root)!r} holds no .py files outside {sorted(EXCLUDED_DIRS)}.")
    return paths


def load_python_corpus(*, max_bytes: Optional[int] = None, root: Optional[str | Path] = None) -> TextCorpus:
    """Loads the standard library's Python sources as a byte-level corpus split by file.

    Args:
      max_bytes: if given, each split keeps at most this many bytes (the first files of its
        sorted list; the last one may be cut), which makes small corpora for quick tests.
      root: directory to read instead of the standard library (for tests).

    Returns:
      A :class:`TextCorpus`. The same Python installation gives the same corpus and checksums.

    Raises:
      TypeError, ValueError: if ``max_bytes`` is not an int ``>= 1``; ValueError if ``root`` has
        no ``.py`` files.

    Example:
      >>> corpus = load_python_corpus(max_bytes=1000)
      >>> [len(corpus.train), len(corpus.validation), len(corpus.test)]
      [1000, 1000, 1000]
      >>> corpus.train.dtype, len(corpus.sha256['train'])
      (dtype('uint8'), 64)
    """
    if max_bytes is not None:
        max_bytes = check_int("max_bytes", max_bytes, minimum=1)
    root = Path(sysconfig.get_paths()["stdlib"] if root is None else root)
    by_split: dict[str, list[str]] = {s: [] for s in SPLITS}
    for rel in source_files(root):
        by_split[split_of(rel)].append(rel)

    tokens, files, sha = {}, {}, {}
    for split in SPLITS:
        chunks, used, size = [], [], 0
        for rel in by_split[split]:
            if max_bytes is not None and size >= max_bytes:
                break
            data = (root / rel).read_bytes() + bytes([SEPARATOR])
            chunks.append(data)
            used.append(rel)
            size += len(data)
        data = b"".join(chunks)[:max_bytes]
        tokens[split] = np.frombuffer(data, dtype=np.uint8).copy()
        files[split] = tuple(used)
        sha[split] = hashlib.sha256(data).hexdigest()
    listing = "".join(f"{s}\t{rel}\n" for s in SPLITS for rel in by_split[s])
    return TextCorpus(
        train=tokens["train"],
        validation=tokens["validation"],
        test=tokens["test"],
        files=files,
        files_sha256=hashlib.sha256(listing.encode("utf-8")).hexdigest(),
        sha256=sha,
        python_version=platform.python_version(),
    )


def _check_tokens(tokens, seq_len: int) -> np.ndarray:
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise TypeError(f"tokens must be a 1-D int array (a corpus split), got {tokens.dtype} {tokens.shape}.")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"seq_len={seq_len} needs at least {seq_len + 1} tokens, the split has {len(tokens)}; "
            "use a shorter seq_len or a larger max_bytes."
        )
    return tokens


def sample_windows(tokens, *, batch_size: int, seq_len: int, rng: np.random.Generator) -> dict:
    """Draws ``batch_size`` windows of ``seq_len + 1`` tokens at uniformly random positions.

    Args:
      tokens: a 1-D int split, e.g. ``corpus.train``.
      batch_size: windows per batch.
      seq_len: the model's input length ``T``.
      rng: ``np.random.Generator``; the same generator state gives the same batch.

    Returns:
      ``{'tokens': (B, T) int32, 'targets': (B, T) int32}`` with ``targets[:, t] == tokens[:, t + 1]``
      (the next byte).

    Example:
      >>> import numpy as np
      >>> b = sample_windows(np.arange(100), batch_size=2, seq_len=8, rng=np.random.default_rng(0))
      >>> b['tokens'].shape, bool((b['targets'][:, :-1] == b['tokens'][:, 1:]).all())
      ((2, 8), True)
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy Generator, e.g. np.random.default_rng(0), got {type(rng).__name__}.")
    tokens = _check_tokens(tokens, seq_len)
    starts = rng.integers(0, len(tokens) - seq_len, size=batch_size)
    windows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
    return {"tokens": windows[:, :-1], "targets": windows[:, 1:]}


def eval_windows(tokens, *, batch_size: int, seq_len: int) -> Iterator[dict]:
    """Yields every next-token prediction of a split once, in order, in fixed-shape batches.

    Window ``i`` reads ``tokens[i*T : i*T + T + 1]``; windows do not overlap, so each of the
    ``len(tokens) - 1`` targets is scored exactly once (with at most ``T - 1`` tokens of context).
    The last window is padded when it is partial, and the last batch with empty windows; the
    ``'mask'`` marks real targets, so every batch has the same shape (one compilation) and
    ``sum(nll * mask) / sum(mask)`` is the split's mean per-token loss.

    Args:
      tokens: a 1-D int split.
      batch_size: windows per batch.
      seq_len: window length ``T``.

    Yields:
      ``{'tokens': (B, T) int32, 'targets': (B, T) int32, 'mask': (B, T) float32}``; padded
      positions hold token 0 and mask 0.

    Example:
      >>> import numpy as np
      >>> batches = list(eval_windows(np.arange(11), batch_size=2, seq_len=4))
      >>> len(batches), int(sum(b['mask'].sum() for b in batches))
      (2, 10)
      >>> batches[1]['targets'][0].tolist(), batches[1]['mask'][0].tolist()
      ([9, 10, 0, 0], [1.0, 1.0, 0.0, 0.0])
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    seq_len = check_int("seq_len", seq_len, minimum=1)
    tokens = _check_tokens(tokens, 1)
    n_targets = len(tokens) - 1
    n_windows = -(-n_targets // seq_len)
    n_batches = -(-n_windows // batch_size)
    padded = np.zeros(n_batches * batch_size * seq_len + 1, np.int32)
    padded[: len(tokens)] = tokens
    mask = np.zeros(n_batches * batch_size * seq_len, np.float32)
    mask[:n_targets] = 1.0
    shape = (n_batches, batch_size, seq_len)
    inputs, targets, mask = padded[:-1].reshape(shape), padded[1:].reshape(shape), mask.reshape(shape)
    for i in range(n_batches):
        yield {"tokens": inputs[i], "targets": targets[i], "mask": mask[i]}
