"""MNIST and Fashion-MNIST from the standard IDX files, with downloads checked against the published MD5s."""
from __future__ import annotations

import gzip
import os
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
from .idx import parse_idx, read_idx_content


# MD5 of each file's uncompressed content, as published with the official files.
MNIST_FILES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS: dict[str, list[str]] = {
    "mnist": [
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ],
    "fashion_mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
}

# Train-set pixel mean and std of x/255, the values the literature standardises with.
PIXEL_STATS: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion_mnist": (0.2860, 0.3530),
}

#: The name of each label, as published with each data set.
CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "mnist": tuple("0123456789"),
    "fashion_mnist": (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
}

_SPLIT_SIZES = {"train": 60000, "t10k": 10000}
_IMAGE_HW = (28, 28)


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _holds_files(name: str, folder: Path) -> bool:
    return all(_find(folder, stem) for stem in MNIST_FILES[name])


def _gunzipped_md5(blob: bytes) -> str:
    return md5_hex(gzip.decompress(blob))


def _not_found(name: str, data_dir: Path, missing: list[str], reason: str) -> DataNotFoundError:
    urls = "\n".join(f"  {base}{stem}.gz" for stem in missing for base in MIRRORS[name])
    return DataNotFoundError(
        f"{name} files not found in {data_dir}: missing {', '.join(missing)} (each may also be "
        f"gzipped as <file>.gz). {reason}\n"
        f"To fix, download them (keep the .gz or gunzip them) into {data_dir}:\n{urls}\n"
        + how_to_point(name)
    )


def _check_array(path: Path, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.dtype != np.uint8 or array.shape != shape:
        raise ValueError(
            f"{path}: expected uint8 array of shape {shape}, got {array.dtype} array of shape "
            f"{array.shape}. This is not the official file; delete it and re-download it."
        )


def load_mnist(
    data_dir: str | os.PathLike | None = None,
    *,
    name: str = "mnist",
    download: bool = True,
    verify: bool = True,
    timeout: float = 20.0,
) -> Dataset:
    """Loads MNIST or Fashion-MNIST from the four standard IDX files, downloading them if missing.

    Args:
      data_dir: folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
        ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each raw or ``.gz``). ``None``
        means ``default_cache_dir(name)``, or ``$JAXCOMPRESS_DATA_DIR`` itself if it holds the
        files (see :mod:`jaxcompress.data.dataset`).
      name: ``'mnist'`` or ``'fashion_mnist'``.
      download: fetch missing files from ``MIRRORS[name]`` into ``data_dir``. Downloads are
        always checked against the published MD5 before they are written.
      verify: check the MD5 of each file's uncompressed content against ``MNIST_FILES``.
      timeout: seconds to wait on each mirror.

    Returns:
      A ``Dataset`` with images standardised by ``PIXEL_STATS[name]``, shape ``(N, 28, 28, 1)``.

    Raises:
      ValueError: if ``name`` is unknown, ``data_dir`` is not a directory, a file's MD5 or shape
        is wrong, or a file is not a valid IDX file.
      DataNotFoundError: if files are missing and could not be downloaded.
    """
    if name not in MNIST_FILES:
        raise ValueError(f"name must be one of {sorted(MNIST_FILES)}, got {name!r}.")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}.")
    directory = resolve_data_dir(data_dir, name, holds_files=lambda d: _holds_files(name, d))
    files = MNIST_FILES[name]

    found = {stem: _find(directory, stem) for stem in files}
    missing = [stem for stem, path in found.items() if path is None]
    if missing and not download:
        raise _not_found(name, directory, missing, "download=False, so nothing was downloaded.")
    for stem in missing:
        urls = [f"{base}{stem}.gz" for base in MIRRORS[name]]
        # download_bytes is looked up here, at call time, so it can be replaced in tests.
        blob, errors = download_verified(
            urls, files[stem], timeout=timeout, digest=_gunzipped_md5, download=download_bytes
        )
        if blob is None:
            # Stop at the first failure: offline, every other file would fail the same way, slowly.
            raise _not_found(name, directory, missing, "Downloading failed:\n  " + "\n  ".join(errors))
        directory.mkdir(parents=True, exist_ok=True)
        found[stem] = directory / f"{stem}.gz"
        write_atomic(found[stem], blob)

    arrays = {}
    for stem, path in found.items():
        content = read_idx_content(path)
        if verify and (got := md5_hex(content)) != files[stem]:
            raise ValueError(
                f"MD5 mismatch for {path}: got {got}, expected {files[stem]} (MD5 of the uncompressed "
                f"content of the official {name} file). The file is corrupt or not the official one; "
                "delete it and re-download it (load_mnist downloads missing files), or pass verify=False "
                "to skip the check."
            )
        arrays[stem] = parse_idx(content, path)

    mean, std = PIXEL_STATS[name]
    splits = {}
    for split, n in _SPLIT_SIZES.items():
        images = arrays[f"{split}-images-idx3-ubyte"]
        labels = arrays[f"{split}-labels-idx1-ubyte"]
        if len(images) != len(labels):
            raise ValueError(
                f"{name} {split} split in {directory}: {len(images)} images but {len(labels)} labels; "
                "the files come from different releases; re-download both."
            )
        _check_array(found[f"{split}-images-idx3-ubyte"], images, (n, *_IMAGE_HW))
        _check_array(found[f"{split}-labels-idx1-ubyte"], labels, (n,))
        if labels.max() >= 10:
            path = found[f"{split}-labels-idx1-ubyte"]
            raise ValueError(f"{path}: labels must be 0..9, found {labels.max()}; re-download the file.")
        splits[split] = (standardise_uint8(images[..., None], mean, std), labels.astype(np.int32))

    return Dataset(
        name=name,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["t10k"][0],
        test_labels=splits["t10k"][1],
        num_classes=10,
        source=str(directory.absolute()),
        class_names=CLASS_NAMES[name],
    )
