"""Seeded, reproducible minibatches of numpy arrays for training loops."""
from __future__ import annotations

import numbers
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from jaxcompress.core.validation import check_int


def _check_arrays(images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    images, labels = np.asarray(images), np.asarray(labels)
    if images.ndim == 0 or labels.ndim == 0:
        raise ValueError(
            f"images and labels must have a leading example dimension, got shapes {images.shape} and "
            f"{labels.shape}."
        )
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels must have the same number of examples, got {len(images)} images and "
            f"{len(labels)} labels."
        )
    return images, labels


def _as_generator(rng: Any) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if rng is None or (isinstance(rng, numbers.Integral) and not isinstance(rng, bool)):
        return np.random.default_rng(rng)
    raise TypeError(
        f"rng must be a numpy Generator, an int seed or None, got {type(rng).__name__}: {rng!r}; "
        "e.g. rng=0 or rng=np.random.default_rng(0)."
    )


def num_batches(n: int, batch_size: int, drop_remainder: bool = True) -> int:
    """The number of batches one epoch over ``n`` examples yields.

    Args:
      n: number of examples, ``>= 0``.
      batch_size: examples per batch, a positive int.
      drop_remainder: whether a last, smaller batch is dropped.

    Returns:
      ``n // batch_size`` if ``drop_remainder`` else ``ceil(n / batch_size)``.

    Raises:
      TypeError: if ``n`` or ``batch_size`` is not an int.
      ValueError: if ``n`` is negative or ``batch_size`` is not positive.

    Example:
      >>> num_batches(10, 4), num_batches(10, 4, drop_remainder=False)
      (2, 3)
    """
    n = check_int("n", n, minimum=0)
    batch_size = check_int("batch_size", batch_size, minimum=1)
    return n // batch_size if drop_remainder else -(-n // batch_size)


def _epoch_stop(n: int, batch_size: int, drop_remainder: bool) -> int:
    """How many of the ``n`` examples one epoch uses; raises if it would yield no batch."""
    if drop_remainder and batch_size > n:
        raise ValueError(
            f"batch_size={batch_size} is larger than the {n} examples, so with drop_remainder=True no "
            "batch would be yielded; use a smaller batch_size or drop_remainder=False."
        )
    return num_batches(n, batch_size, drop_remainder) * batch_size


def _generate(images, labels, batch_size, order, stop) -> Iterator[dict]:
    for start in range(0, stop, batch_size):
        if order is None:
            # Slices are views: no copy when the data is not shuffled.
            sel = slice(start, start + batch_size)
        else:
            sel = order[start : start + batch_size]
        yield {"image": images[sel], "label": labels[sel]}


def iterate_batches(
    images: Any,
    labels: Any,
    batch_size: int,
    *,
    rng: np.random.Generator | int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict]:
    """Yields one epoch of ``{'image', 'label'}`` numpy batches, shuffled reproducibly.

    Arguments are checked when this is called, not when the first batch is drawn.

    Args:
      images: array-like with the examples along the first axis.
      labels: array-like with as many entries as ``images``.
      batch_size: examples per batch, a positive int.
      rng: a ``np.random.Generator`` (advanced by the shuffle), an int seed (the same seed gives the
        same order), or ``None`` for a fresh random order.
      shuffle: whether to shuffle; if ``False`` the batches are in order and are views.
      drop_remainder: drop the last batch if it is smaller than ``batch_size``.

    Returns:
      An iterator over dicts with numpy arrays ``'image'`` and ``'label'``.

    Raises:
      TypeError: if ``batch_size`` is not an int or ``rng`` has an unsupported type.
      ValueError: if ``batch_size`` is not positive, the lengths of ``images`` and ``labels``
        differ, or ``drop_remainder`` is set and ``batch_size`` exceeds the number of examples.

    Example:
      >>> import numpy as np
      >>> x, y = np.arange(10).reshape(5, 2), np.arange(5)
      >>> [b['label'].tolist() for b in iterate_batches(x, y, 2, shuffle=False, drop_remainder=False)]
      [[0, 1], [2, 3], [4]]
      >>> sorted(np.concatenate([b['label'] for b in iterate_batches(x, y, 1, rng=0)]).tolist())
      [0, 1, 2, 3, 4]
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    images, labels = _check_arrays(images, labels)
    n = len(images)
    stop = _epoch_stop(n, batch_size, drop_remainder)
    order = _as_generator(rng).permutation(n) if shuffle else None
    return _generate(images, labels, batch_size, order, stop)


def epochs(
    images: Any,
    labels: Any,
    batch_size: int,
    *,
    seed: int,
    num_epochs: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict]:
    """Yields the batches of ``num_epochs`` epochs, one after another.

    Epoch ``e`` is shuffled with ``np.random.default_rng([seed, e])``, so any epoch can be
    reproduced on its own, e.g. when resuming training.

    Args:
      images: array-like with the examples along the first axis.
      labels: array-like with as many entries as ``images``.
      batch_size: examples per batch, a positive int.
      seed: a non-negative int seed.
      num_epochs: number of epochs, ``>= 0``.
      shuffle: whether to shuffle each epoch.
      drop_remainder: drop each epoch's last batch if it is smaller than ``batch_size``.

    Returns:
      An iterator over ``{'image', 'label'}`` dicts of numpy arrays.

    Raises:
      TypeError: if ``seed``, ``num_epochs`` or ``batch_size`` is not an int.
      ValueError: as ``iterate_batches``, or if ``seed`` or ``num_epochs`` is negative.

    Example:
      >>> import numpy as np
      >>> batches = list(epochs(np.zeros((6, 1)), np.arange(6), 3, seed=0, num_epochs=2))
      >>> len(batches), sorted(np.concatenate([b['label'] for b in batches[2:]]).tolist())
      (4, [0, 1, 2, 3, 4, 5])
    """
    seed = check_int("seed", seed, minimum=0)
    num_epochs = check_int("num_epochs", num_epochs, minimum=0)
    # Validate eagerly so a bad argument fails here, not epochs into a training run.
    iterate_batches(images, labels, batch_size, rng=0, shuffle=False, drop_remainder=drop_remainder)
    images, labels = np.asarray(images), np.asarray(labels)

    def generate() -> Iterator[dict]:
        for epoch in range(num_epochs):
            rng = np.random.default_rng([seed, epoch])
            yield from iterate_batches(
                images, labels, batch_size, rng=rng, shuffle=shuffle, drop_remainder=drop_remainder
            )

    return generate()


def _flatten(example: Mapping, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in example.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def stack_examples(examples: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """Stacks example dicts into one batch dict of numpy arrays; nested features become ``'outer/inner'``.

    Args:
      examples: a non-empty sequence of dicts with the same keys (values array-like, same shape per key).

    Returns:
      ``{key: array}`` with the examples along the first axis.

    Raises:
      ValueError: if ``examples`` is empty or the examples' keys differ.

    Example:
      >>> b = stack_examples([{"image": [1, 2], "meta": {"id": 7}}, {"image": [3, 4], "meta": {"id": 8}}])
      >>> {k: v.tolist() for k, v in b.items()}
      {'image': [[1, 2], [3, 4]], 'meta/id': [7, 8]}
    """
    flat = [_flatten(e) for e in examples]
    if not flat:
        raise ValueError("examples must hold at least one example dict, got none.")
    keys = list(flat[0])
    for i, e in enumerate(flat):
        if list(e) != keys:
            raise ValueError(f"examples[{i}] has keys {sorted(e)}, but examples[0] has {sorted(keys)}; all must match.")
    return {k: np.stack([np.asarray(e[k]) for e in flat]) for k in keys}


def iterate_source_batches(
    source: Sequence[Mapping],
    batch_size: int,
    *,
    rng: np.random.Generator | int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator[dict]:
    """Yields one epoch of batches from a random-access source of example dicts, such as a tfds data source.

    Only the examples of the current batch are read, so the source need not fit in memory. The
    order is the one ``iterate_batches`` gives for the same ``rng``.

    Args:
      source: a sequence of example dicts (``len`` and integer indexing; a ``__getitems__`` that
        reads many indices at once is used when present).
      batch_size: examples per batch, a positive int.
      rng: as in ``iterate_batches``.
      shuffle: whether to shuffle.
      drop_remainder: drop the last batch if it is smaller than ``batch_size``.

    Returns:
      An iterator over dicts of numpy arrays, one per feature (see ``stack_examples``).

    Raises:
      TypeError: if ``batch_size`` is not an int or ``rng`` has an unsupported type.
      ValueError: if ``batch_size`` is not positive, or ``drop_remainder`` is set and
        ``batch_size`` exceeds the number of examples.

    Example:
      >>> source = [{"x": i, "label": i % 2} for i in range(5)]
      >>> [b["x"].tolist() for b in iterate_source_batches(source, 2, shuffle=False, drop_remainder=False)]
      [[0, 1], [2, 3], [4]]
    """
    batch_size = check_int("batch_size", batch_size, minimum=1)
    n = len(source)
    stop = _epoch_stop(n, batch_size, drop_remainder)
    order = _as_generator(rng).permutation(n) if shuffle else np.arange(n)
    read_many = getattr(source, "__getitems__", None) or (lambda idx: [source[i] for i in idx])

    def generate() -> Iterator[dict]:
        for start in range(0, stop, batch_size):
            yield stack_examples(read_many([int(i) for i in order[start : start + batch_size]]))

    return generate()
