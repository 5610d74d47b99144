"""``load_dataset``: every data set by name, with an optional fallback to the bundled digits."""
from __future__ import annotations

import os
from typing import Callable

from .cifar import load_cifar10
from .dataset import DATA_DIR_ENV, DataNotFoundError, Dataset, default_cache_dir
from .digits import load_digits
from .mnist import load_mnist
from .tfds_source import TFDS_FOLDER, load_tfds

#: The prefix that names a prepared tfds data set, as in ``'tfds:mnist'`` or ``'tfds:my_set/config:1.0.0'``.
TFDS_PREFIX = "tfds:"
#: The data sets ``load_dataset`` knows by name; any prepared tfds data set is ``'tfds:<name>'``.
DATASETS = ("mnist", "fashion_mnist", "cifar10", "digits")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    download: bool = True,
    fallback_to_digits: bool = False,
    log: Callable[[str], object] = print,
) -> Dataset:
    """Loads a data set by name, optionally falling back to the bundled digits when it is absent.

    Args:
      name: ``'mnist'``, ``'fashion_mnist'``, ``'cifar10'``, ``'digits'``, or ``'tfds:<name>'`` for
        any tfds image classification data set prepared as array_record (see ``load_tfds``).
      data_dir: the data set's folder (for tfds, the tfds ``data_dir``); ``None`` follows the rule
        in :mod:`jaxcompress.data.dataset`. Ignored for ``'digits'``.
      download: fetch missing MNIST, Fashion-MNIST or CIFAR-10 files (tfds data sets are only read).
      fallback_to_digits: if the files are missing and cannot be downloaded, and no data directory
        was asked for (neither ``data_dir`` nor ``$JAXCOMPRESS_DATA_DIR``), log why and return
        ``load_digits()`` instead of raising.
      log: receives the one-line fallback notice.

    Returns:
      The ``Dataset``; check its ``name`` to see whether the fallback was used.

    Raises:
      ValueError: if ``name`` is unknown (or as the data set's loader).
      DataNotFoundError: if the files are missing and no fallback applies; an explicitly given
        directory that lacks the files always raises.

    Example:
      >>> load_dataset("digits").train_images.shape
      (1438, 8, 8, 1)
    """
    if not isinstance(name, str) or not (name in DATASETS or (name.startswith(TFDS_PREFIX) and name != TFDS_PREFIX)):
        raise ValueError(
            f"name must be one of {list(DATASETS)} or '{TFDS_PREFIX}<name>' for a prepared tfds data set "
            f"(e.g. '{TFDS_PREFIX}mnist'), got {name!r}."
        )
    if name == "digits":
        return load_digits()
    try:
        if name.startswith(TFDS_PREFIX):
            return load_tfds(name[len(TFDS_PREFIX):], data_dir)
        if name == "cifar10":
            return load_cifar10(data_dir, download=download)
        return load_mnist(data_dir, name=name, download=download)
    except DataNotFoundError:
        explicit = data_dir is not None or bool(os.environ.get(DATA_DIR_ENV))
        if explicit or not fallback_to_digits:
            raise
    folder = default_cache_dir(TFDS_FOLDER if name.startswith(TFDS_PREFIX) else name)
    log(
        f"{name} files were not found in {folder} and could not be downloaded, so the bundled "
        f"scikit-learn digits set (1,797 8x8 images) is used instead. To use the real {name}, put its "
        f"files in a folder and pass --data-dir DIR or set {DATA_DIR_ENV}=ROOT with the files in ROOT/{folder.name}."
    )
    return load_digits()

