"""scikit-learn's bundled 8x8 handwritten digits: a small real data set that needs no download."""
from __future__ import annotations

import numbers

import numpy as np

from .dataset import Dataset

DIGITS_SOURCE = "scikit-learn bundled digits (1,797 8x8 images)"


def _stratified_split(labels: np.ndarray, test_fraction: float, rng: np.random.Generator):
    # Per-class splitting keeps every class in both splits at the same proportion, which matters
    # with only ~180 examples per class.
    train, test = [], []
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    # Shuffle across classes so the splits are not ordered by label.
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def load_digits(*, seed: int = 0, test_fraction: float = 0.2) -> Dataset:
    """Loads scikit-learn's bundled handwritten digits as a train/test ``Dataset``.

    The 1,797 8x8 images (pixel values 0..16) are scaled by 1/16, then standardised with the
    train split's pixel mean and std. The split is stratified by class and determined by ``seed``.

    Args:
      seed: seed of the split; the same seed gives the same split.
      test_fraction: fraction of each class held out for testing, in (0, 1).

    Returns:
      A ``Dataset`` named ``'digits'`` with float32 images ``(N, 8, 8, 1)``, int32 labels and
      ``num_classes=10``.

    Raises:
      TypeError: if ``seed`` is not an int or ``test_fraction`` not a real number.
      ValueError: if ``seed`` is negative or ``test_fraction`` is not in (0, 1).
    """
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}: {seed!r}.")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}.")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, numbers.Real):
        raise TypeError(
            f"test_fraction must be a number in (0, 1), got {type(test_fraction).__name__}: {test_fraction!r}."
        )
    if not 0.0 < float(test_fraction) < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}; e.g. 0.2 holds out 20%.")

    # Imported here because importing scikit-learn takes about a second and only this loader needs it.
    from sklearn.datasets import load_digits as sklearn_load_digits

    bunch = sklearn_load_digits()
    images = np.asarray(bunch.images, dtype=np.float32) / np.float32(16.0)
    labels = np.asarray(bunch.target, dtype=np.int32)
    train_idx, test_idx = _stratified_split(labels, float(test_fraction), np.random.default_rng(seed))
    if len(train_idx) == 0 or len(test_idx) == 0:
        raise ValueError(
            f"test_fraction={test_fraction} leaves {len(train_idx)} train and {len(test_idx)} test "
            "examples; use a value such as 0.2 so both splits are non-empty."
        )

    train = images[train_idx]
    mean, std = train.mean(), train.std()

    def standardise(x: np.ndarray) -> np.ndarray:
        return ((x - mean) / std).astype(np.float32)[..., None]

    return Dataset(
        name="digits",
        train_images=standardise(train),
        train_labels=labels[train_idx],
        test_images=standardise(images[test_idx]),
        test_labels=labels[test_idx],
        num_classes=10,
        source=DIGITS_SOURCE,
    )
