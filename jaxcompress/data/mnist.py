"""MNIST and Fashion-MNIST from the standard IDX files, with checked downloads and a digits fallback."""
from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .idx import parse_idx, read_idx_content


class Dataset(NamedTuple):
    """An image classification data set split into train and test, ready for training.

    Images are float32 ``(N, H, W, 1)``, standardised with the data set's mean and std; labels are
    int32 ``(N,)``.
    """

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int
    source: str


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

DATA_DIR_ENV = "JAXCOMPRESS_DATA_DIR"

# Train-set pixel mean and std of x/255, the values the literature standardises with.
PIXEL_STATS: dict[str, tuple[float, float]] = {
    "mnist": (0.1307, 0.3081),
    "fashion_mnist": (0.2860, 0.3530),
}

_SPLIT_SIZES = {"train": 60000, "t10k": 10000}
_IMAGE_HW = (28, 28)


class DataNotFoundError(FileNotFoundError):
    """The data set's files are not on disk and could not be downloaded.

    The message lists the missing files, the directory searched, where to download them and how to
    point the loader at a directory that has them.
    """


def default_cache_dir(name: str) -> Path:
    """The directory a data set is cached in when no data directory is given.

    Args:
      name: the data set name, e.g. ``'mnist'``.

    Returns:
      ``$XDG_CACHE_HOME/jaxcompress/<name>``, or ``~/.cache/jaxcompress/<name>`` when
      ``XDG_CACHE_HOME`` is unset or not an absolute path (as the XDG spec asks).

    Raises:
      ValueError: if ``name`` is empty or contains a path separator.
    """
    if not isinstance(name, str) or not name or "/" in name or os.sep in name:
        raise ValueError(f"name must be a plain data set name such as 'mnist', got {name!r}.")
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "jaxcompress" / name


def download_bytes(url: str, *, timeout: float) -> bytes:
    """Fetches ``url`` and returns the body.

    Args:
      url: the address to fetch.
      timeout: seconds to wait for the connection and for each read.

    Returns:
      The response body.

    Raises:
      OSError: (including ``urllib.error.URLError``) if the download fails.
    """
    request = urllib.request.Request(url, headers={"User-Agent": "jaxcompress"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _md5(content: bytes) -> str:
    return hashlib.md5(content, usedforsecurity=False).hexdigest()


def _write_atomic(path: Path, content: bytes) -> None:
    # A temp file in the same directory + os.replace means a crash or a concurrent reader never
    # sees a half-written file under the final name.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _find(data_dir: Path, stem: str) -> Path | None:
    for candidate in (data_dir / stem, data_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _fetch_verified(name: str, stem: str, timeout: float) -> tuple[bytes | None, list[str]]:
    """Tries each mirror; returns the gzipped bytes whose content MD5 matches, and the errors seen."""
    errors = []
    for base in MIRRORS[name]:
        url = f"{base}{stem}.gz"
        try:
            blob = download_bytes(url, timeout=timeout)
            got = _md5(gzip.decompress(blob))
        except Exception as err:  # any failure of one mirror means: try the next one
            errors.append(f"{url}: {type(err).__name__}: {err}")
            continue
        expected = MNIST_FILES[name][stem]
        if got == expected:
            return blob, errors
        errors.append(f"{url}: content MD5 {got}, expected {expected}")
    return None, errors


def _not_found(name: str, data_dir: Path, missing: list[str], reason: str) -> DataNotFoundError:
    urls = "\n".join(f"  {base}{stem}.gz" for stem in missing for base in MIRRORS[name])
    return DataNotFoundError(
        f"{name} files not found in {data_dir}: missing {', '.join(missing)} (each may also be "
        f"gzipped as <file>.gz). {reason}\n"
        f"To fix, download them (keep the .gz or gunzip them) into {data_dir}:\n{urls}\n"
        f"or point the loader at a directory that already has them: --data-dir DIR on the command "
        f"line, {DATA_DIR_ENV}=DIR in the environment, or load_mnist(data_dir=DIR)."
    )


def _resolve_data_dir(data_dir: str | os.PathLike | None, name: str) -> Path:
    if data_dir is None:
        data_dir = os.environ.get(DATA_DIR_ENV) or default_cache_dir(name)
    elif not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(f"data_dir must be a path or None, got {type(data_dir).__name__}: {data_dir!r}.")
    path = Path(data_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(
            f"data_dir {os.fspath(data_dir)!r} exists but is not a directory; pass the folder that "
            "holds the IDX files."
        )
    return path


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
        means ``$JAXCOMPRESS_DATA_DIR`` if set, else ``default_cache_dir(name)``.
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
    directory = _resolve_data_dir(data_dir, name)
    files = MNIST_FILES[name]

    found = {stem: _find(directory, stem) for stem in files}
    missing = [stem for stem, path in found.items() if path is None]
    if missing and not download:
        raise _not_found(name, directory, missing, "download=False, so nothing was downloaded.")
    for stem in missing:
        blob, errors = _fetch_verified(name, stem, timeout)
        if blob is None:
            # Stop at the first failure: offline, every other file would fail the same way, slowly.
            raise _not_found(name, directory, missing, "Downloading failed:\n  " + "\n  ".join(errors))
        directory.mkdir(parents=True, exist_ok=True)
        found[stem] = directory / f"{stem}.gz"
        _write_atomic(found[stem], blob)

    arrays = {}
    for stem, path in found.items():
        content = read_idx_content(path)
        if verify and (got := _md5(content)) != files[stem]:
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
        # One fused scale-and-shift instead of (x/255 - mean)/std keeps the load under a second.
        standardised = images.astype(np.float32)
        standardised *= np.float32(1.0 / (255.0 * std))
        standardised -= np.float32(mean / std)
        splits[split] = (standardised[..., None], labels.astype(np.int32))

    return Dataset(
        name=name,
        train_images=splits["train"][0],
        train_labels=splits["train"][1],
        test_images=splits["t10k"][0],
        test_labels=splits["t10k"][1],
        num_classes=10,
        source=str(directory.absolute()),
    )


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    fallback_to_digits: bool = False,
    log: Callable[[str], object] = print,
) -> Dataset:
    """Loads a data set by name, optionally falling back to the bundled digits when MNIST is absent.

    Args:
      name: ``'mnist'``, ``'fashion_mnist'`` or ``'digits'``.
      data_dir: passed to ``load_mnist``; ignored for ``'digits'``.
      download: passed to ``load_mnist``.
      fallback_to_digits: if the MNIST files are missing and cannot be downloaded, and no data
        directory was asked for (neither ``data_dir`` nor ``$JAXCOMPRESS_DATA_DIR``), log why and
        return ``load_digits()`` instead of raising.
      log: receives the one-line fallback notice.

    Returns:
      The ``Dataset``; check its ``name`` to see whether the fallback was used.

    Raises:
      ValueError: if ``name`` is unknown (or as ``load_mnist``).
      DataNotFoundError: if the files are missing and no fallback applies; an explicitly given
        directory that lacks the files always raises.
    """
    from .digits import load_digits  # digits.py imports Dataset from here

    choices = ["digits", *MNIST_FILES]
    if name not in choices:
        raise ValueError(f"name must be one of {choices}, got {name!r}.")
    if name == "digits":
        return load_digits()
    try:
        return load_mnist(data_dir, name=name, download=download)
    except DataNotFoundError:
        explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
        if explicit or not fallback_to_digits:
            raise
    log(
        f"{name} files were not found in {default_cache_dir(name)} and could not be downloaded, so the "
        f"bundled scikit-learn digits set (1,797 8x8 images) is used instead. To use the real {name}, "
        f"put its four IDX files in a folder and pass --data-dir DIR or set {DATA_DIR_ENV}=DIR."
    )
    return load_digits()


def __getattr__(attr: str):
    # load_digits is documented alongside the MNIST loaders but lives in digits.py, which imports
    # Dataset from here; resolving it lazily avoids the import cycle.
    if attr == "load_digits":
        from .digits import load_digits

        return load_digits
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
