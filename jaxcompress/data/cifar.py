"""CIFAR-10 from the official binary files (``cifar-10-batches-bin``), checked against their MD5s."""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
from pathlib import Path

import numpy as np

from .mnist import DataNotFoundError, Dataset, download_bytes

#: MD5 of each official binary file, as published with ``cifar-10-binary.tar.gz``.
CIFAR10_FILES: dict[str, str] = {
    "data_batch_1.bin": "5dd7e06a14cb22eb9f671a540d1b7c25",
    "data_batch_2.bin": "5ea93a67294ea407fff1d09f752e9692",
    "data_batch_3.bin": "942cd6a4bcdd0dd3c604fbe906cb4421",
    "data_batch_4.bin": "ae636b3ba5c66a11e91e8cb52e771fcb",
    "data_batch_5.bin": "53f37980c15c3d472c316c40844f3f0d",
    "test_batch.bin": "803d5f7f4d78ea53de84dbe85f74fb6d",
}
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
CIFAR10_DIR_ENV = "JAXCOMPRESS_CIFAR10_DIR"
#: Train-set per-channel mean and std of x/255.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
_RECORD = 1 + 32 * 32 * 3
_FOLDER = "cifar-10-batches-bin"


def _resolve(data_dir) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(CIFAR10_DIR_ENV) or Path.home() / ".cache" / "cifar10"
    d = Path(data_dir).expanduser()
    return d / _FOLDER if (d / _FOLDER).is_dir() else d


def parse_cifar_batch(content: bytes, source: str = "<bytes>") -> tuple[np.ndarray, np.ndarray]:
    """Parses one binary batch: records of a label byte and a 3x32x32 image (R, G, B planes).

    Returns:
      ``(images uint8 (N, 32, 32, 3), labels int32 (N,))``.

    Raises:
      ValueError: if the length is not a whole number of records or a label is not in 0..9.
    """
    if len(content) == 0 or len(content) % _RECORD:
        raise ValueError(
            f"{source}: {len(content)} bytes is not a whole number of {_RECORD}-byte CIFAR-10 records; "
            "the file is truncated or not a CIFAR-10 binary batch."
        )
    rec = np.frombuffer(content, np.uint8).reshape(-1, _RECORD)
    labels = rec[:, 0].astype(np.int32)
    if labels.max() > 9:
        raise ValueError(f"{source}: label {labels.max()} is outside 0..9; not a CIFAR-10 batch.")
    images = rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def _download(folder: Path, timeout: float) -> None:
    data = download_bytes(CIFAR10_URL, timeout=timeout)
    folder.mkdir(parents=True, exist_ok=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        for member in tar.getmembers():
            name = Path(member.name).name
            if name in CIFAR10_FILES and member.isfile():
                (folder / name).write_bytes(tar.extractfile(member).read())


def load_cifar10(data_dir=None, *, download: bool = True, verify: bool = True, timeout: float = 60.0) -> Dataset:
    """Loads CIFAR-10 from ``cifar-10-batches-bin``, standardised per channel.

    Args:
      data_dir: the ``cifar-10-batches-bin`` folder or its parent; default
        ``$JAXCOMPRESS_CIFAR10_DIR``, then ``~/.cache/cifar10``.
      download: fetch and unpack the official archive when files are missing.
      verify: check each file's MD5 against :data:`CIFAR10_FILES`.
      timeout: seconds for the download connection.

    Returns:
      A :class:`~jaxcompress.data.mnist.Dataset` with images float32 ``(N, 32, 32, 3)``.

    Raises:
      DataNotFoundError: files missing and not downloadable (the message says how to get them).
      ValueError: a file with the wrong checksum or a corrupt layout.
    """
    folder = _resolve(data_dir)
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    reason = "downloading was disabled" if not download else "the archive lacked them"
    if missing and download:
        try:
            _download(folder, timeout)
        except (OSError, tarfile.TarError) as e:
            reason = f"download from {CIFAR10_URL} failed: {e}"
        missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"CIFAR-10 files {missing} not found in {folder} ({reason}). Get cifar-10-binary.tar.gz from "
            f"{CIFAR10_URL}, unpack it, and pass its cifar-10-batches-bin folder as data_dir or set "
            f"{CIFAR10_DIR_ENV}=DIR."
        )
    parts = {}
    for name, md5 in CIFAR10_FILES.items():
        content = (folder / name).read_bytes()
        if verify and hashlib.md5(content, usedforsecurity=False).hexdigest() != md5:
            raise ValueError(
                f"{folder / name} has MD5 {hashlib.md5(content, usedforsecurity=False).hexdigest()}, expected "
                f"{md5}; the file is corrupt or not the official one. Delete it and download again."
            )
        parts[name] = parse_cifar_batch(content, str(folder / name))
    train = [parts[f"data_batch_{i}.bin"] for i in range(1, 6)]
    mean, std = (np.asarray(s, np.float32) for s in CIFAR10_STATS)

    def standardise(x):
        return (x.astype(np.float32) / 255.0 - mean) / std

    return Dataset(
        name="cifar10",
        train_images=standardise(np.concatenate([t[0] for t in train])),
        train_labels=np.concatenate([t[1] for t in train]),
        test_images=standardise(parts["test_batch.bin"][0]),
        test_labels=parts["test_batch.bin"][1],
        num_classes=10,
        source=str(folder),
    )
