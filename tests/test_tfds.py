"""Reading prepared tfds data sets by name and data_dir, on a small set a local builder writes here."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")
from PIL import Image  # noqa: E402

from jaxcompress.data import (  # noqa: E402
    DATA_DIR_ENV,
    DataNotFoundError,
    iterate_batches,
    iterate_source_batches,
    load_dataset,
    load_tfds,
    open_tfds,
    read_tfds,
)

NAME = "tiny_shapes"
CLASSES = ["cat", "dog", "bird"]
TRAIN_IDS, TEST_IDS = range(10), range(10, 15)


def expected_image(i: int) -> np.ndarray:
    """Example ``i``'s image: each channel constant, different per example and channel."""
    return np.broadcast_to((i * 20 + np.arange(3) * 7) % 256, (5, 4, 3)).astype(np.uint8)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tfds data_dir holding ``tiny_shapes`` prepared as array_record, written by a local builder."""
    root = tmp_path_factory.mktemp("data") / "tfds"

    # Not registered, so reading it back finds it by its files, as any prepared data set is found.
    with tfds.core.registered.skip_registration():

        class TinyShapes(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")
            # A one-part module name: tfds then looks for no checksums file beside this code (finding
            # one for a class inside a package needs importlib_resources, which tfds does not install).
            __module__ = NAME

            def _info(self):
                return tfds.core.DatasetInfo(
                    builder=self,
                    features=tfds.features.FeaturesDict(
                        {
                            "image": tfds.features.Image(shape=(5, 4, 3)),
                            "label": tfds.features.ClassLabel(names=CLASSES),
                            "id": np.int64,
                        }
                    ),
                    supervised_keys=("image", "label"),
                )

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(TRAIN_IDS), "test": self._generate_examples(TEST_IDS)}

            def _generate_examples(self, ids):
                for i in ids:
                    # A PIL image is PNG-encoded by PIL; a NumPy one would need TensorFlow to encode.
                    image = Image.fromarray(expected_image(i))
                    yield i, {"image": image, "label": CLASSES[i % 3], "id": i}

    TinyShapes(data_dir=str(root), file_format="array_record").download_and_prepare()
    return root


def test_read_tfds_values(data_dir):
    train = read_tfds(NAME, data_dir, split="train")
    assert sorted(train) == ["id", "image", "label"]
    assert train["image"].shape == (10, 5, 4, 3) and train["image"].dtype == np.uint8
    assert sorted(train["id"].tolist()) == list(TRAIN_IDS)
    for i, image, label in zip(train["id"], train["image"], train["label"]):
        np.testing.assert_array_equal(image, expected_image(int(i)))
        assert CLASSES[label] == CLASSES[i % 3]
    test = read_tfds(NAME, str(data_dir), split="test", keys=["id"])
    assert list(test) == ["id"] and sorted(test["id"].tolist()) == list(TEST_IDS)
    assert len(read_tfds(NAME, data_dir, split="train[:40%]")["id"]) == 4


def test_load_dataset_tfds_standardises_and_maps_labels(data_dir):
    ds = load_dataset(f"tfds:{NAME}", data_dir)
    assert ds.name == f"tfds:{NAME}" and ds.num_classes == 3 and ds.class_names == tuple(CLASSES)
    assert ds.train_images.shape == (10, 5, 4, 3) and ds.train_images.dtype == np.float32
    assert ds.test_images.shape == (5, 5, 4, 3) and ds.train_labels.dtype == np.int32
    raw = {s: read_tfds(NAME, data_dir, split=s) for s in ("train", "test")}
    # Per-channel mean and std of the train pixels, re-derived in float64.
    pixels = raw["train"]["image"].astype(np.float64) / 255.0
    mean, std = pixels.mean((0, 1, 2)), pixels.std((0, 1, 2))
    for split, images, labels in (("train", ds.train_images, ds.train_labels), ("test", ds.test_images, ds.test_labels)):
        ids = raw[split]["id"]  # the data source's order is the Dataset's order
        expected = np.stack([expected_image(int(i)) for i in ids]) / 255.0
        np.testing.assert_allclose(images, (expected - mean) / std, atol=1e-5)
        assert [ds.class_names[c] for c in labels] == [CLASSES[i % 3] for i in ids]
    np.testing.assert_allclose(ds.train_images.mean((0, 1, 2)), 0.0, atol=1e-5)
    assert load_tfds(NAME, data_dir, train_split="train[:50%]", test_split="test").train_images.shape[0] == 5


def test_iterate_source_batches_reads_batches_in_iterate_batches_order(data_dir):
    source = open_tfds(NAME, "train", data_dir)
    assert len(source) == 10
    batches = list(iterate_source_batches(source, 3, rng=4, drop_remainder=False))
    assert [len(b["id"]) for b in batches] == [3, 3, 3, 1]
    ids = np.concatenate([b["id"] for b in batches])
    assert sorted(ids.tolist()) == list(TRAIN_IDS)
    for b in batches:
        assert b["image"].dtype == np.uint8 and b["image"].shape[1:] == (5, 4, 3)
        for i, image in zip(b["id"], b["image"]):
            np.testing.assert_array_equal(image, expected_image(int(i)))
    positions = np.arange(10)
    order = np.concatenate([b["label"] for b in iterate_batches(positions, positions, 3, rng=4, drop_remainder=False)])
    np.testing.assert_array_equal(ids, [int(source[int(p)]["id"]) for p in order])


def test_data_root_env_var_finds_tfds_folder(data_dir, monkeypatch):
    # The rule of every data set: $JAXCOMPRESS_DATA_DIR/tfds, or the variable's folder itself.
    for root in (data_dir.parent, data_dir):
        monkeypatch.setenv(DATA_DIR_ENV, str(root))
        assert len(read_tfds(NAME, split="test")["id"]) == 5


def test_reading_does_not_import_tensorflow(data_dir, child_env):
    # Without TensorFlow installed this shows that reading needs none; with it, that reading leaves it
    # unimported. (etils only probes whether it is installed, with importlib.util.find_spec.)
    code = (
        "import sys\n"
        "from jaxcompress.data import load_dataset\n"
        f"ds = load_dataset('tfds:{NAME}', {str(data_dir)!r})\n"
        "assert ds.train_images.shape == (10, 5, 4, 3), ds.train_images.shape\n"
        "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
        "print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_errors_name_the_argument_and_the_fix(data_dir, tmp_path):
    with pytest.raises(DataNotFoundError, match="array_record") as err:
        open_tfds("no_such_set", "train", data_dir)
    assert "no_such_set" in str(err.value) and str(data_dir) in str(err.value) and DATA_DIR_ENV in str(err.value)
    # A data set tfds knows, but not prepared in this data_dir.
    with pytest.raises(DataNotFoundError, match="not prepared"):
        load_dataset("tfds:mnist", tmp_path)
    with pytest.raises(ValueError, match=r"split='validation'.*\['test', 'train'\]"):
        open_tfds(NAME, "validation", data_dir)
    with pytest.raises(TypeError, match="split"):
        open_tfds(NAME, ["train"], data_dir)
    with pytest.raises(ValueError, match="image_key='picture'"):
        load_tfds(NAME, data_dir, image_key="picture")
    with pytest.raises(ValueError, match="image_key='id'.*not uint8"):
        load_tfds(NAME, data_dir, image_key="id")
    with pytest.raises(ValueError, match=r"keys \['nope'\]"):
        read_tfds(NAME, data_dir, keys=["nope"])
    for bad in ("tfds:", "imagenet", "tfds"):
        with pytest.raises(ValueError, match="tfds:<name>"):
            load_dataset(bad)
