"""Any prepared TensorFlow Datasets (tfds) data set, read by index through a tfds data source.

The data set must have been prepared in a random-access format (``file_format='array_record'``
or ``'parquet'``). It is read through the data source ``tfds.data_source`` returns (opened here as
``tfds.builder(...).as_data_source(...)``, so that a set that is not prepared is reported, never
downloaded). Data sources decode examples with NumPy and PIL: TensorFlow is not needed, and not
imported, to read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .dataset import DataNotFoundError, Dataset, how_to_point, resolve_data_dir, standardise_uint8

#: The folder under the data root (see :func:`~jaxcompress.data.default_cache_dir`) that is the
#: tfds ``data_dir`` when none is given: it holds ``<name>/<version>/`` folders as tfds writes them.
TFDS_FOLDER = "tfds"
_READ_CHUNK = 1024


def _base_name(name: str) -> str:
    # 'name/config:version' -> 'name', the folder tfds writes the data set into.
    return name.split("/")[0].split(":")[0]


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or not name.strip() or not _base_name(name):
        raise ValueError(
            f"name must be the name of a tfds data set, such as 'mnist' or 'cifar10/1.0.0' or "
            f"'my_set/config:1.0.0', got {name!r}."
        )
    return name


def tfds_data_dir(data_dir: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """The tfds ``data_dir`` a data set is read from: ``data_dir`` if given, else the library's rule.

    With no ``data_dir``, this is ``default_cache_dir('tfds')``, or ``$JAXCOMPRESS_DATA_DIR`` itself
    when it already holds the ``name`` folder tfds writes (so a tfds ``data_dir`` such as
    ``~/tensorflow_datasets`` can be the data root).

    Example:
      >>> tfds_data_dir("/data/tfds").as_posix()
      '/data/tfds'
    """
    holds = (lambda d: (d / _base_name(name)).is_dir()) if name else (lambda d: False)
    return resolve_data_dir(data_dir, TFDS_FOLDER, holds_files=holds)


def _builder(name: str, data_dir: Path):
    import tensorflow_datasets as tfds

    hint = (
        f"To fix, prepare it in a random-access format, e.g. "
        f"tfds.builder({_base_name(name)!r}, data_dir={os.fspath(data_dir)!r}, "
        f"file_format='array_record').download_and_prepare(), or pass the data_dir it was prepared in. "
        + how_to_point(TFDS_FOLDER)
    )
    try:
        builder = tfds.builder(name, data_dir=os.fspath(data_dir))
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataNotFoundError(
            f"tfds data set name={name!r} is neither prepared in data_dir={os.fspath(data_dir)!r} nor a data "
            f"set tfds knows. {hint}"
        ) from err
    if not builder.is_prepared():
        raise DataNotFoundError(
            f"tfds data set name={name!r} is not prepared in data_dir={os.fspath(data_dir)!r} (no "
            f"{builder.data_path}/dataset_info.json). {hint}"
        )
    return builder


def open_tfds(name: str, split: str, data_dir: str | os.PathLike | None = None) -> Sequence[dict]:
    """Opens one split of a prepared tfds data set for random access, without TensorFlow.

    Args:
      name: the tfds name, ``'name'``, ``'name/config'`` or ``'name/config:version'``.
      split: a split, or a slice of one such as ``'train[:90%]'``.
      data_dir: the tfds ``data_dir`` the data set was prepared in; ``None`` as in
        :func:`tfds_data_dir`.

    Returns:
      A sequence of example dicts (NumPy values, decoded); ``len`` and indexing work, and
      ``source.dataset_info`` describes the features.

    Raises:
      DataNotFoundError: if the data set is not prepared in ``data_dir``.
      ValueError: if ``name`` is malformed, ``split`` is not a split of the data set, or the data
        set was prepared as TFRecord, which cannot be read by index.
    """
    name = _check_name(name)
    if not isinstance(split, str):
        raise TypeError(f"split must be a str such as 'train' or 'train[:90%]', got {type(split).__name__}: {split!r}.")
    builder = _builder(name, tfds_data_dir(data_dir, name))
    splits = sorted(builder.info.splits)
    try:
        return builder.as_data_source(split=split)
    except NotImplementedError as err:
        raise ValueError(
            f"tfds data set name={name!r} in {builder.data_path} was prepared as "
            f"{builder.info.file_format.value}, which cannot be read by index; prepare it again with "
            "file_format='array_record'."
        ) from err
    except ValueError as err:
        raise ValueError(
            f"split={split!r} does not name a split of tfds data set {name!r} in {builder.data_path} "
            f"({err}); use one of {splits}, or a slice of one such as "
            f"'{splits[0] if splits else 'train'}[:90%]'."
        ) from err


def read_tfds(
    name: str, data_dir: str | os.PathLike | None = None, *, split: str = "train", keys: Sequence[str] | None = None
) -> dict[str, np.ndarray]:
    """Reads a whole split of a prepared tfds data set into memory, one array per feature.

    Args:
      name: the tfds name (see :func:`open_tfds`).
      data_dir: the tfds ``data_dir``; ``None`` as in :func:`tfds_data_dir`.
      split: the split or slice to read.
      keys: the features to keep; ``None`` keeps all. Nested features are named ``'outer/inner'``.

    Returns:
      ``{feature: array}`` with the examples along the first axis, in the data source's order.

    Raises:
      As :func:`open_tfds`; ``ValueError`` if a key is not a feature.
    """
    return _columns(open_tfds(name, split, data_dir), name, split, keys)


def _columns(source: Sequence[dict], name: str, split: str, keys: Sequence[str] | None) -> dict[str, np.ndarray]:
    from .batching import stack_examples  # loads JAX: only when a tfds set is read

    n = len(source)
    if n == 0:
        raise ValueError(f"split={split!r} of tfds data set {name!r} is empty; choose a split with examples.")
    chunks = []
    for start in range(0, n, _READ_CHUNK):
        chunk = stack_examples(source.__getitems__(list(range(start, min(start + _READ_CHUNK, n)))))
        if keys is not None:
            if unknown := [k for k in keys if k not in chunk]:
                raise ValueError(
                    f"keys {unknown} are not features of tfds data set {name!r}; choose among {sorted(chunk)}."
                )
            chunk = {k: chunk[k] for k in keys}
        chunks.append(chunk)
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def _channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of ``images / 255`` in float64, a chunk at a time to bound memory."""
    channels = images.shape[-1]
    total, squares, count = np.zeros(channels), np.zeros(channels), 0
    for start in range(0, len(images), _READ_CHUNK):
        x = images[start : start + _READ_CHUNK].reshape(-1, channels) / 255.0
        total += x.sum(0)
        squares += np.square(x).sum(0)
        count += len(x)
    mean = total / count
    # A constant channel has std 0; 1 then leaves it centred instead of dividing by zero.
    std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
    return mean, np.where(std > 1e-12, std, 1.0)


def load_tfds(
    name: str,
    data_dir: str | os.PathLike | None = None,
    *,
    train_split: str = "train",
    test_split: str = "test",
    image_key: str | None = None,
    label_key: str | None = None,
) -> Dataset:
    """Loads a prepared tfds image classification data set as a :class:`~jaxcompress.data.Dataset`.

    Images (uint8) are standardised per channel with the train split's pixel mean and std; labels
    become int32 and the names of a ``ClassLabel`` feature become ``class_names``.

    Args:
      name: the tfds name (see :func:`open_tfds`).
      data_dir: the tfds ``data_dir``; ``None`` as in :func:`tfds_data_dir`.
      train_split: the split (or slice) to train on.
      test_split: the split (or slice) to test on.
      image_key: the image feature; default the data set's supervised input, else ``'image'``.
      label_key: the label feature; default the data set's supervised target, else ``'label'``.

    Returns:
      A ``Dataset`` named ``'tfds:<name>'`` with float32 images ``(N, H, W, C)``.

    Raises:
      As :func:`open_tfds`; ``ValueError`` if the image feature is not uint8 ``(H, W, C)`` or a
      key is not a feature.
    """
    source = open_tfds(name, train_split, data_dir)
    test_source = open_tfds(name, test_split, data_dir)
    info = source.dataset_info
    supervised = info.supervised_keys if isinstance(info.supervised_keys, tuple) else None
    image_key = image_key or (supervised[0] if supervised and isinstance(supervised[0], str) else "image")
    label_key = label_key or (supervised[1] if supervised and isinstance(supervised[1], str) else "label")
    features = info.features
    for arg, key in (("image_key", image_key), ("label_key", label_key)):
        if key not in features:
            raise ValueError(
                f"{arg}={key!r} is not a feature of tfds data set {name!r}; choose among {sorted(features)}."
            )
    image_feature = features[image_key]
    shape = tuple(image_feature.shape)
    if np.dtype(image_feature.np_dtype) != np.uint8 or len(shape) != 3 or None in shape:
        raise ValueError(
            f"image_key={image_key!r} of tfds data set {name!r} is {image_feature.np_dtype} of shape {shape}, "
            "not uint8 (H, W, C) images of one size; pass the image feature as image_key, or read examples "
            "with open_tfds and iterate_source_batches and resize them yourself."
        )
    keys = [image_key, label_key]
    train = _columns(source, name, train_split, keys)
    test = _columns(test_source, name, test_split, keys)
    mean, std = _channel_stats(train[image_key])
    names = tuple(getattr(features[label_key], "names", None) or ())
    num_classes = len(names) or int(max(train[label_key].max(), test[label_key].max())) + 1
    return Dataset(
        name=f"tfds:{name}",
        train_images=standardise_uint8(train[image_key], mean, std),
        train_labels=train[label_key].astype(np.int32),
        test_images=standardise_uint8(test[image_key], mean, std),
        test_labels=test[label_key].astype(np.int32),
        num_classes=num_classes,
        source=str(tfds_data_dir(data_dir, name).absolute()),
        class_names=names,
    )
