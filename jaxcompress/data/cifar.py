"""CIFAR-10 from the official binary files (``cifar-10-batches-bin``), checked against their MD5s."""
from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np

from .dataset import (
    DataNotFoundError,
    Dataset,
    download_bytes,
    download_verified,
    how_to_point,
    md5_hex,
    resolve_data_dir,
    standardise_uint8,
    write_atomic,
)

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
#: MD5 of ``cifar-10-binary.tar.gz``, as published on the data set's page.
CIFAR10_ARCHIVE_MD5 = "c32a1d4ab5d03f1284b67883e8d87530"
#: Train-set per-channel mean and std of x/255.
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
#: The name of each label, in the order of ``batches.meta.txt``.
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_RECORD = 1 + 32 * 32 * 3
_FOLDER = "cifar-10-batches-bin"


def _holds_files(folder: Path) -> bool:
    return all((folder / f).is_file() or (folder / _FOLDER / f).is_file() for f in CIFAR10_FILES)


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


def _download(folder: Path, timeout: float) -> str:
    """Fetches the archive, checks it, and writes the binary files that are missing; returns why not."""
    archive, errors = download_verified(
        [CIFAR10_URL], CIFAR10_ARCHIVE_MD5, timeout=timeout, download=download_bytes
    )
    if archive is None:
        return "downloading failed: " + "; ".join(errors)
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        folder.mkdir(parents=True, exist_ok=True)
        for name, md5 in CIFAR10_FILES.items():
            if name in members and not (folder / name).is_file():
                content = tar.extractfile(members[name]).read()
                if md5_hex(content) == md5:
                    write_atomic(folder / name, content)
    return "the archive lacked them"


def load_cifar10(
    data_dir: str | os.PathLike | None = None, *, download: bool = True, verify: bool = True, timeout: float = 60.0
) -> Dataset:
    """Loads CIFAR-10 from ``cifar-10-batches-bin``, standardised per channel.

    Args:
      data_dir: the ``cifar-10-batches-bin`` folder or its parent. ``None`` means
        ``default_cache_dir('cifar10')``, or ``$JAXCOMPRESS_DATA_DIR`` itself if it holds the files
        (see :mod:`jaxcompress.data.dataset`).
      download: fetch the official archive when files are missing, check its MD5, and unpack the
        missing files into the folder.
      verify: check each file's MD5 against :data:`CIFAR10_FILES`.
      timeout: seconds for the download connection.

    Returns:
      A :class:`~jaxcompress.data.Dataset` with images float32 ``(N, 32, 32, 3)`` standardised by
      :data:`CIFAR10_STATS`.

    Raises:
      DataNotFoundError: files missing and not downloadable (the message says how to get them).
      ValueError: a file with the wrong checksum or a corrupt layout.
    """
    folder = resolve_data_dir(data_dir, "cifar10", holds_files=_holds_files)
    if (folder / _FOLDER).is_dir():
        folder = folder / _FOLDER
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    reason = "download=False, so nothing was downloaded"
    if missing and download:
        reason = _download(folder, timeout)
        missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"cifar10 files {missing} not found in {folder} ({reason}). To fix, download "
            f"cifar-10-binary.tar.gz from {CIFAR10_URL} and unpack it; its cifar-10-batches-bin folder "
            "holds the files. " + how_to_point("cifar10")
        )
    parts = {}
    for name, md5 in CIFAR10_FILES.items():
        content = (folder / name).read_bytes()
        if verify and (got := md5_hex(content)) != md5:
            raise ValueError(
                f"{folder / name} has MD5 {got}, expected {md5}; the file is corrupt or not the official one. "
                "Delete it and download it again (load_cifar10 downloads missing files), or pass verify=False "
                "to skip the check."
            )
        parts[name] = parse_cifar_batch(content, str(folder / name))
    train = [parts[f"data_batch_{i}.bin"] for i in range(1, 6)]
    mean, std = CIFAR10_STATS
    return Dataset(
        name="cifar10",
        train_images=standardise_uint8(np.concatenate([t[0] for t in train]), mean, std),
        train_labels=np.concatenate([t[1] for t in train]),
        test_images=standardise_uint8(parts["test_batch.bin"][0], mean, std),
        test_labels=parts["test_batch.bin"][1],
        num_classes=10,
        source=str(folder.absolute()),
        class_names=CIFAR10_CLASSES,
    )
