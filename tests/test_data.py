"""Tests for jaxcompress.data: IDX parsing, MNIST/Fashion-MNIST/digits loading, batching."""
from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from jaxcompress.data import (
    DATA_DIR_ENV,
    MNIST_FILES,
    DataNotFoundError,
    default_cache_dir,
    epochs,
    iterate_source_batches,
    iterate_batches,
    load_dataset,
    load_digits,
    load_mnist,
    num_batches,
    read_idx,
    write_atomic,
    write_idx,
)
from jaxcompress.data import mnist as mnist_module

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(name: str) -> Path:
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"real {name} files not available: {folder} does not exist")
    return folder


@pytest.fixture(scope="module")
def mnist():
    return load_mnist(_need("mnist"), name="mnist", download=False)


@pytest.fixture(scope="module")
def fashion():
    return load_mnist(_need("fashion_mnist"), name="fashion_mnist", download=False)


@pytest.fixture
def no_env(monkeypatch, tmp_path):
    """No data dir configured, and a cache dir that is empty."""
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


# --- real MNIST / Fashion-MNIST ---------------------------------------------------------------


@pytest.mark.parametrize("which", ["mnist", "fashion"])
def test_real_data_shapes_and_standardisation(which, request):
    ds = request.getfixturevalue(which)
    assert ds.name == {"mnist": "mnist", "fashion": "fashion_mnist"}[which]
    assert ds.train_images.shape == (60000, 28, 28, 1) and ds.test_images.shape == (10000, 28, 28, 1)
    assert ds.train_images.dtype == np.float32 and ds.test_images.dtype == np.float32
    assert ds.train_labels.shape == (60000,) and ds.test_labels.shape == (10000,)
    assert ds.train_labels.dtype == np.int32 and ds.test_labels.dtype == np.int32
    assert ds.num_classes == 10
    for labels in (ds.train_labels, ds.test_labels):
        assert labels.min() == 0 and labels.max() == 9
    assert abs(float(ds.train_images.mean(dtype=np.float64))) < 1e-3
    assert abs(float(ds.train_images.std(dtype=np.float64)) - 1.0) < 1e-3
    assert Path(ds.source).resolve() == (SHARED_DATA / ds.name).resolve()


def test_mnist_label_histograms(mnist, fashion):
    assert np.bincount(mnist.test_labels, minlength=10).tolist() == MNIST_TEST_COUNTS
    assert np.bincount(mnist.train_labels).sum() == 60000
    # Fashion-MNIST is balanced by construction.
    assert np.bincount(fashion.test_labels).tolist() == [1000] * 10
    assert np.bincount(fashion.train_labels).tolist() == [6000] * 10


def test_mnist_raw_pixels_match_standardisation(mnist):
    raw = read_idx(SHARED_DATA / "mnist" / "t10k-images-idx3-ubyte.gz")
    assert raw.shape == (10000, 28, 28) and raw.dtype == np.uint8
    expected = (raw / 255.0 - 0.1307) / 0.3081
    np.testing.assert_allclose(mnist.test_images[..., 0], expected, atol=1e-5)


def test_mnist_env_var_is_used(monkeypatch):
    folder = _need("mnist")
    monkeypatch.setattr(mnist_module, "download_bytes", _no_network)
    # The data root holding a folder per data set, or the data set's folder itself.
    for root in (folder.parent, folder):
        monkeypatch.setenv(DATA_DIR_ENV, str(root))
        ds = load_dataset("mnist", download=False)
        assert ds.name == "mnist" and len(ds.test_labels) == 10000 and Path(ds.source) == folder
    assert ds.class_names == tuple("0123456789")
    monkeypatch.setenv(DATA_DIR_ENV, str(folder.parent))
    if (folder.parent / "fashion_mnist").is_dir():
        assert load_dataset("fashion_mnist", download=False).class_names[0] == "T-shirt/top"


# --- read_idx / write_idx ---------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32, np.int16, np.int32, np.float64, np.int8])
def test_idx_round_trip(tmp_path, suffix, dtype):
    base = np.arange(24).reshape(2, 3, 4) * 5
    array = (base if dtype == np.uint8 else base - 50).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        array += dtype(0.25)
    path = write_idx(tmp_path / f"a.idx{suffix}", array)
    out = read_idx(path)
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative
    np.testing.assert_array_equal(out, array)
    out[0, 0, 0] = 1  # writable, not a view of the file's bytes


def test_idx_layout_is_big_endian_standard(tmp_path):
    path = write_idx(tmp_path / "x", np.array([1.5, -2.0], dtype=np.float32))
    raw = path.read_bytes()
    assert raw[:4] == b"\x00\x00\x0d\x01" and raw[4:8] == struct.pack(">I", 2)
    assert raw[8:] == struct.pack(">2f", 1.5, -2.0)


def test_idx_gzip_detected_by_content_not_suffix(tmp_path):
    content = b"\x00\x00\x08\x01" + struct.pack(">I", 3) + bytes([7, 8, 9])
    (tmp_path / "gz_without_suffix").write_bytes(gzip.compress(content))
    (tmp_path / "raw_with_suffix.gz").write_bytes(content)
    assert read_idx(tmp_path / "gz_without_suffix").tolist() == [7, 8, 9]
    assert read_idx(str(tmp_path / "raw_with_suffix.gz")).tolist() == [7, 8, 9]


def test_idx_wrong_magic(tmp_path):
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="magic") as err:
        read_idx(path)
    assert "0x01000801" in str(err.value) and str(path) in str(err.value)
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")  # unknown type code
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00\x08\x00")  # zero dimensions
    with pytest.raises(ValueError, match="magic"):
        read_idx(path)
    path.write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="too short"):
        read_idx(path)


def test_idx_truncated_and_too_long(tmp_path):
    path = write_idx(tmp_path / "t.idx", np.zeros((4, 5), dtype=np.int32))
    full = path.read_bytes()
    path.write_bytes(full[:-3])
    with pytest.raises(ValueError, match="truncated") as err:
        read_idx(path)
    assert str(path) in str(err.value) and "80 bytes" in str(err.value) and "77" in str(err.value)
    path.write_bytes(full + b"\x00")
    with pytest.raises(ValueError, match="too long"):
        read_idx(path)
    path.write_bytes(full[:10])  # header declares 2 dims but is cut inside them
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(path)


def test_idx_corrupt_gzip(tmp_path):
    blob = gzip.compress(b"\x00\x00\x08\x01" + struct.pack(">I", 1000) + bytes(range(250)) * 4)
    cut = tmp_path / "cut.gz"
    cut.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="gzip") as err:
        read_idx(cut)
    assert str(cut) in str(err.value)
    garbled = tmp_path / "garbled.gz"
    garbled.write_bytes(blob[:12] + bytes(b ^ 0xFF for b in blob[12:]))
    with pytest.raises(ValueError, match="gzip"):
        read_idx(garbled)


def test_write_idx_rejects_unsupported_dtype(tmp_path):
    with pytest.raises(TypeError, match="dtype"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))


# --- missing / corrupt files, downloads, fallback ---------------------------------------------


def _no_network(url, *, timeout):
    raise OSError(f"network disabled in tests (asked for {url})")


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_mnist(tmp_path, download=False)
    msg = str(err.value)
    for stem in MNIST_FILES["mnist"]:
        assert stem in msg
    assert DATA_DIR_ENV in msg and "--data-dir" in msg and str(tmp_path) in msg
    assert "https://ossci-datasets.s3.amazonaws.com/mnist/train-images-idx3-ubyte.gz" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_failed_download_raises_quickly_and_leaves_nothing(tmp_path, monkeypatch):
    # A closed local port fails at once, exercising the real urllib path without the internet.
    monkeypatch.setitem(mnist_module.MIRRORS, "fashion_mnist", ["http://127.0.0.1:9/"])
    target = tmp_path / "new" / "fashion"
    with pytest.raises(DataNotFoundError) as err:
        load_mnist(target, name="fashion_mnist", download=True, timeout=2.0)
    msg = str(err.value)
    assert "Downloading failed" in msg and "http://127.0.0.1:9/train-images-idx3-ubyte.gz" in msg
    assert "t10k-labels-idx1-ubyte" in msg and DATA_DIR_ENV in msg
    assert not target.exists()


def test_download_writes_verified_file(tmp_path, monkeypatch):
    folder = _need("mnist")
    calls = []

    def fake_download(url, *, timeout):
        calls.append(url)
        if "ossci" in url:
            return gzip.compress(b"not the real file")  # wrong MD5: the next mirror must be tried
        return (folder / Path(url).name).read_bytes()

    for stem in MNIST_FILES["mnist"]:
        if stem != "t10k-labels-idx1-ubyte":
            (tmp_path / f"{stem}.gz").symlink_to(folder / f"{stem}.gz")
    monkeypatch.setattr(mnist_module, "download_bytes", fake_download)
    ds = load_mnist(tmp_path)
    assert len(calls) == 2 and calls[1].startswith("https://storage.googleapis.com/cvdf-datasets/mnist/")
    assert (tmp_path / "t10k-labels-idx1-ubyte.gz").is_file()
    assert not list(tmp_path.glob(".*part"))
    assert np.bincount(ds.test_labels).tolist() == MNIST_TEST_COUNTS


def test_altered_file_fails_md5(tmp_path):
    folder = _need("mnist")
    for stem in MNIST_FILES["mnist"]:
        shutil.copy(folder / f"{stem}.gz", tmp_path / f"{stem}.gz")
    labels = read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz")
    labels[0] = (labels[0] + 1) % 10
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels)  # raw this time: both forms are accepted
    with pytest.raises(ValueError, match="MD5") as err:
        load_mnist(tmp_path, download=False)
    msg = str(err.value)
    assert "t10k-labels-idx1-ubyte" in msg and MNIST_FILES["mnist"]["t10k-labels-idx1-ubyte"] in msg
    assert "re-download" in msg
    # Without verification the altered (but well-formed) file loads.
    ds = load_mnist(tmp_path, download=False, verify=False)
    assert ds.test_labels[0] == labels[0]


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name") as err:
        load_mnist(tmp_path, name="cifar10")
    assert "cifar10" in str(err.value) and "fashion_mnist" in str(err.value)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ValueError, match="not a directory") as err:
        load_mnist(a_file)
    assert str(a_file) in str(err.value)
    with pytest.raises(ValueError, match="digits"):
        load_dataset("svhn")


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "root"))
    assert default_cache_dir("cifar10") == tmp_path / "root" / "cifar10"
    monkeypatch.delenv(DATA_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_dir("mnist") == tmp_path / "jaxcompress" / "mnist"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir("fashion_mnist") == tmp_path / "home" / ".cache" / "jaxcompress" / "fashion_mnist"
    for bad in ("", "a/b", "..", None):
        with pytest.raises(ValueError, match="name must be a plain data set name"):
            default_cache_dir(bad)


def test_write_atomic_leaves_old_file_on_error(tmp_path):
    path = write_atomic(tmp_path / "f.bin", b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # fails after the temporary file was created
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]
    write_atomic(path, b"new")
    assert path.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_fallback_to_digits(no_env, monkeypatch):
    monkeypatch.setattr(mnist_module, "download_bytes", _no_network)
    messages = []
    ds = load_dataset("mnist", fallback_to_digits=True, log=messages.append)
    assert ds.name == "digits" and ds.train_images.shape[1:] == (8, 8, 1)
    assert len(messages) == 1 and "digits" in messages[0] and DATA_DIR_ENV in messages[0]
    assert not no_env.exists()  # a failed download must not leave an empty cache folder
    with pytest.raises(DataNotFoundError):
        load_dataset("mnist", fallback_to_digits=False, log=messages.append)


def test_no_fallback_for_explicit_dir(no_env, monkeypatch, tmp_path):
    monkeypatch.setattr(mnist_module, "download_bytes", _no_network)
    empty = tmp_path / "empty"
    empty.mkdir()
    messages = []
    with pytest.raises(DataNotFoundError, match="empty"):
        load_dataset("mnist", empty, fallback_to_digits=True, log=messages.append)
    monkeypatch.setenv(DATA_DIR_ENV, str(empty))
    with pytest.raises(DataNotFoundError, match="empty"):
        load_dataset("fashion_mnist", fallback_to_digits=True, log=messages.append)
    assert messages == []


# --- digits -----------------------------------------------------------------------------------


def test_load_digits():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert len(a.train_labels) + len(a.test_labels) == 1797
    assert a.train_images.shape == (len(a.train_labels), 8, 8, 1) and a.test_images.shape[1:] == (8, 8, 1)
    assert a.train_images.dtype == np.float32 and a.train_labels.dtype == np.int32
    assert len(a.test_labels) == 359  # 20% of each class, rounded
    assert a.name == "digits" and a.num_classes == 10 and "scikit-learn" in a.source
    np.testing.assert_array_equal(a.train_images, b.train_images)
    np.testing.assert_array_equal(a.test_labels, b.test_labels)
    assert not np.array_equal(a.test_labels, c.test_labels)
    assert abs(float(a.train_images.mean())) < 1e-5 and abs(float(a.train_images.std()) - 1) < 1e-5
    # Stratified: every class is in the test split at ~20%.
    assert np.bincount(a.test_labels).min() >= 34
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits(test_fraction=1.0)
    with pytest.raises(TypeError, match="seed"):
        load_digits(seed=1.5)


# --- batching ---------------------------------------------------------------------------------


def test_iterate_batches_covers_each_example_once():
    x = np.arange(23 * 2).reshape(23, 2)
    y = np.arange(23)
    batches = list(iterate_batches(x, y, 5, rng=3, drop_remainder=False))
    assert [len(b["label"]) for b in batches] == [5, 5, 5, 5, 3]
    seen = np.concatenate([b["label"] for b in batches])
    assert sorted(seen.tolist()) == list(range(23)) and seen.tolist() != list(range(23))
    for b in batches:
        assert isinstance(b["image"], np.ndarray) and isinstance(b["label"], np.ndarray)
        np.testing.assert_array_equal(b["image"][:, 0], 2 * b["label"])  # pairs stay together
    dropped = list(iterate_batches(x, y, 5, rng=3))
    assert len(dropped) == num_batches(23, 5) == 4
    assert len(np.unique(np.concatenate([b["label"] for b in dropped]))) == 20


def test_iterate_batches_seeding():
    y = np.arange(100)
    order = lambda rng: np.concatenate([b["label"] for b in iterate_batches(y, y, 10, rng=rng)])  # noqa: E731
    np.testing.assert_array_equal(order(7), order(7))
    np.testing.assert_array_equal(order(np.random.default_rng(7)), order(7))
    assert not np.array_equal(order(7), order(8))
    np.testing.assert_array_equal(
        np.concatenate([b["label"] for b in iterate_batches(y, y, 10, shuffle=False)]), y
    )


def test_iterate_batches_bad_arguments():
    x, y = np.zeros((10, 3)), np.zeros(10)
    with pytest.raises(TypeError, match="batch_size"):
        iterate_batches(x, y, 2.0)
    with pytest.raises(TypeError, match="batch_size"):
        iterate_batches(x, y, True)
    with pytest.raises(ValueError, match="batch_size"):
        iterate_batches(x, y, 0)
    with pytest.raises(ValueError, match="batch_size=11"):
        iterate_batches(x, y, 11)
    assert len(list(iterate_batches(x, y, 11, drop_remainder=False))) == 1
    with pytest.raises(ValueError, match="10 images and 9 labels"):
        iterate_batches(x, y[:9], 2)
    with pytest.raises(TypeError, match="rng"):
        iterate_batches(x, y, 2, rng="seed")


def test_iterate_source_batches_matches_iterate_batches():
    source = [{"image": np.full((2, 2), i), "label": i % 3, "meta": {"id": i}} for i in range(11)]
    batches = list(iterate_source_batches(source, 4, rng=9))
    assert [sorted(b) for b in batches] == [["image", "label", "meta/id"]] * 2
    ids = np.arange(11)
    reference = list(iterate_batches(ids, ids, 4, rng=9))
    for b, r in zip(batches, reference):
        np.testing.assert_array_equal(b["meta/id"], r["label"])
        np.testing.assert_array_equal(b["image"][:, 0, 0], r["label"])
        np.testing.assert_array_equal(b["label"], r["label"] % 3)
    with pytest.raises(ValueError, match="batch_size=12"):
        iterate_source_batches(source, 12)
    with pytest.raises(ValueError, match=r"examples\[1\] has keys"):
        list(iterate_source_batches([{"a": 1}, {"b": 2}], 2, shuffle=False))


def test_num_batches_and_epochs():
    assert num_batches(10, 3) == 3 and num_batches(10, 3, drop_remainder=False) == 4
    assert num_batches(0, 3, drop_remainder=False) == 0
    with pytest.raises(ValueError, match="batch_size"):
        num_batches(10, -1)
    with pytest.raises(ValueError, match="n must"):
        num_batches(-1, 2)
    y = np.arange(12)
    batches = list(epochs(y, y, 4, seed=5, num_epochs=3))
    assert len(batches) == 9
    for e in range(3):
        epoch = np.concatenate([b["label"] for b in batches[3 * e : 3 * e + 3]])
        expected = np.concatenate(
            [b["label"] for b in iterate_batches(y, y, 4, rng=np.random.default_rng([5, e]))]
        )
        np.testing.assert_array_equal(epoch, expected)
    assert not np.array_equal(batches[0]["label"], batches[3]["label"])
    with pytest.raises(ValueError, match="num_epochs"):
        epochs(y, y, 4, seed=0, num_epochs=-1)
    with pytest.raises(ValueError, match="batch_size"):
        epochs(y, y, 0, seed=0, num_epochs=1)
