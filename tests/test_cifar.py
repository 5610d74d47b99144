"""CIFAR-10 binary loader."""
import os
from pathlib import Path

import numpy as np
import pytest

from jaxcompress.data import CIFAR10_FILES, load_cifar10, parse_cifar_batch
from jaxcompress.data.mnist import DataNotFoundError


def test_parse_record_layout():
    img = np.arange(32 * 32 * 3, dtype=np.uint32).astype(np.uint8).reshape(32, 32, 3)
    record = bytes([7]) + img.transpose(2, 0, 1).tobytes()
    images, labels = parse_cifar_batch(record * 2)
    assert labels.tolist() == [7, 7]
    np.testing.assert_array_equal(images[1], img)


def test_truncated_and_bad_label_raise():
    with pytest.raises(ValueError, match="truncated"):
        parse_cifar_batch(b"\x00" * 100, "x.bin")
    with pytest.raises(ValueError, match="label 12"):
        parse_cifar_batch(bytes([12]) + b"\x00" * 3072)


def test_missing_files_say_how_to_get_them(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-binary.tar.gz"):
        load_cifar10(tmp_path, download=False)


def test_wrong_checksum_is_detected(tmp_path):
    for name in CIFAR10_FILES:
        (tmp_path / name).write_bytes(bytes([1]) + b"\x00" * 3072)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar10(tmp_path, download=False)


def test_real_cifar10_if_built():
    folder = Path(os.environ.get("JAXCOMPRESS_CIFAR10_DIR", Path.home() / ".cache" / "cifar10"))
    if not (folder / "cifar-10-batches-bin" / "test_batch.bin").exists() and not (folder / "test_batch.bin").exists():
        pytest.skip("CIFAR-10 binaries not built (python3 ../shared/data/get_cifar10.py)")
    ds = load_cifar10(folder, download=False)
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    np.testing.assert_allclose(ds.train_images.mean((0, 1, 2), dtype=np.float64), 0.0, atol=2e-3)
    np.testing.assert_allclose(ds.train_images.std((0, 1, 2), dtype=np.float64), 1.0, atol=2e-3)
