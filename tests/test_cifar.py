"""CIFAR-10 binary loader."""
import io
import tarfile

import numpy as np
import pytest

from jaxcompress.data import (
    CIFAR10_CLASSES,
    CIFAR10_FILES,
    DATA_DIR_ENV,
    DataNotFoundError,
    default_cache_dir,
    load_cifar10,
    load_dataset,
    parse_cifar_batch,
)
from jaxcompress.data import cifar as cifar_module
from jaxcompress.data.dataset import md5_hex


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
    with pytest.raises(DataNotFoundError, match="cifar-10-binary.tar.gz") as err:
        load_cifar10(tmp_path, download=False)
    msg = str(err.value)
    assert "--data-dir" in msg and f"{DATA_DIR_ENV}=ROOT" in msg and "ROOT/cifar10" in msg


def test_wrong_checksum_is_detected(tmp_path):
    for name in CIFAR10_FILES:
        (tmp_path / name).write_bytes(bytes([1]) + b"\x00" * 3072)
    with pytest.raises(ValueError, match="MD5"):
        load_cifar10(tmp_path, download=False)


def _fake_batches() -> dict:
    """Six small batches in the official layout: example j of file f has label (f + j) % 10, pixels f*10+j."""
    files = {}
    for f, name in enumerate(CIFAR10_FILES):
        records = [bytes([(f + j) % 10]) + bytes([f * 10 + j]) * 3072 for j in range(4)]
        files[name] = b"".join(records)
    return files


def _archive(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, content in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def test_download_checks_the_archive_and_writes_each_file(tmp_path, monkeypatch):
    files = _fake_batches()
    archive = _archive(files)
    monkeypatch.setattr(cifar_module, "download_bytes", lambda url, *, timeout: archive)
    # The real archive's MD5 does not match the fake one: nothing is written.
    with pytest.raises(DataNotFoundError, match=f"expected {cifar_module.CIFAR10_ARCHIVE_MD5}"):
        load_cifar10(tmp_path / "a")
    assert not (tmp_path / "a").exists()
    # With the fake's checksums published, the download is accepted and loads.
    monkeypatch.setattr(cifar_module, "CIFAR10_ARCHIVE_MD5", md5_hex(archive))
    for name, content in files.items():
        monkeypatch.setitem(CIFAR10_FILES, name, md5_hex(content))
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    ds = load_dataset("cifar10")
    assert sorted(p.name for p in default_cache_dir("cifar10").iterdir()) == sorted(files)  # no temp files left
    assert ds.name == "cifar10" and ds.class_names == CIFAR10_CLASSES and ds.num_classes == 10
    assert ds.train_images.shape == (20, 32, 32, 3) and ds.test_images.shape == (4, 32, 32, 3)
    assert ds.train_labels.tolist() == [(f + j) % 10 for f in range(5) for j in range(4)]
    mean, std = (np.asarray(s) for s in cifar_module.CIFAR10_STATS)
    expected = (np.array([50, 51, 52, 53], np.float64)[:, None, None, None] / 255.0 - mean) / std
    np.testing.assert_allclose(ds.test_images, np.broadcast_to(expected, (4, 32, 32, 3)), atol=1e-5)
    # The same files found through $JAXCOMPRESS_DATA_DIR pointing at the folder itself, and through data_dir.
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "cifar10"))
    np.testing.assert_array_equal(load_cifar10(download=False).train_labels, ds.train_labels)
    monkeypatch.delenv(DATA_DIR_ENV)
    assert load_dataset("cifar10", tmp_path / "cifar10", download=False).source == str(tmp_path / "cifar10")


def test_real_cifar10_if_built():
    folder = default_cache_dir("cifar10")
    if not (folder / "cifar-10-batches-bin" / "test_batch.bin").exists() and not (folder / "test_batch.bin").exists():
        pytest.skip(f"CIFAR-10 binaries not found in {folder}")
    ds = load_cifar10(folder, download=False)
    assert ds.train_images.shape == (50000, 32, 32, 3) and ds.test_images.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.test_labels).tolist() == [1000] * 10
    np.testing.assert_allclose(ds.train_images.mean((0, 1, 2), dtype=np.float64), 0.0, atol=2e-3)
    np.testing.assert_allclose(ds.train_images.std((0, 1, 2), dtype=np.float64), 1.0, atol=2e-3)
