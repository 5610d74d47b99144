"""Smoke tests of the end-to-end demo and the command line."""
import json

import pytest

import numpy as np

from jaxcompress import cli
from jaxcompress.data import DATA_DIR_ENV
from jaxcompress.data import mnist as mnist_module
from jaxcompress.prune import erk_sparsities
from jaxcompress.recipes.demo import DENSITY_RULES, DemoConfig, run_demo

KEYS = {"name", "test_accuracy", "params", "nonzero_params", "weight_bits", "bytes_float32", "bytes_compressed",
        "file_bytes", "artifact", "seconds"}


def test_demo_on_mnist_subset_writes_report(mnist_dir, tmp_path, capsys):
    rc = cli.main(["demo", "--data-dir", str(mnist_dir), "--out", str(tmp_path), "--train-subset", "1024",
                   "--test-subset", "500", "--epochs", "1", "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["dataset"] == "mnist"
    stages = report["stages"]
    assert [s["name"] for s in stages][:2] == ["teacher", "student (distilled)"]
    assert len(stages) == 4
    for s in stages:
        assert KEYS <= set(s)
        assert 0.0 <= s["test_accuracy"] <= 1.0
        assert s["bytes_float32"] == 4 * s["params"]
    # Even 8 steps of training beat chance on real digits.
    assert stages[0]["test_accuracy"] > 0.5
    pruned, final = stages[2], stages[3]
    assert pruned["sparsity"] >= 0.9 and final["sparsity"] >= 0.9
    assert final["weight_bits"] == 8
    assert final["nonzero_params"] < 0.12 * final["params"]
    assert final["bytes_compressed"] < pruned["bytes_compressed"] < pruned["bytes_float32"]
    # the file bytes are real: each stage's artifact is on disk with that size
    for s in stages:
        assert (tmp_path / s["artifact"]).stat().st_size == s["file_bytes"]
    assert final["file_bytes"] < pruned["file_bytes"] < pruned["bytes_float32"]
    assert final["file_bytes"] < 0.2 * final["bytes_float32"]
    # the model loaded back from its file scores what the trained model scored
    assert final["test_accuracy_from_file"] == pytest.approx(final["test_accuracy"], abs=1e-9)
    assert (tmp_path / "report.md").read_text().count("|") > 40
    assert (tmp_path / "report.png").stat().st_size > 1000
    assert "student pruned 90% + int8" in capsys.readouterr().out


@pytest.mark.slow  # the fallback itself: tests/test_data.py::test_fallback_to_digits
def test_demo_falls_back_to_digits_offline(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def offline(url, *, timeout):
        raise OSError("offline")

    monkeypatch.setattr(mnist_module, "download_bytes", offline)
    messages = []
    report = run_demo(DemoConfig(teacher_epochs=1, student_epochs=1, prune_epochs=1, qat_epochs=0.5, progress=False),
                      log=messages.append)
    assert report["dataset"] == "digits"
    assert any("digits" in m and "JAXCOMPRESS_DATA_DIR" in m for m in messages)
    assert len(report["stages"]) == 4
    # the given stage lengths hold, even one equal to MNIST's default (qat 0.5); the batch size left
    # unset takes the digits default
    config = report["config"]  # the recipe that ran
    assert [s["epochs"] for s in config["stages"][:4]] == [1, 1, 1, 0.5]
    assert config["data"]["batch_size"] == 64
    assert report["stages"][0]["test_accuracy"] > 0.5  # 22 steps on 1,437 real digits beat chance (0.1)


def test_demo_with_data_dir_missing_files_fails_clearly(tmp_path, capsys):
    rc = cli.main(["demo", "--data-dir", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path) in err


def test_shipped_demo_recipe_holds_the_density_rules():
    from jaxcompress.recipes.schema import load_recipe

    pruned = load_recipe("demo")["stages"][2]
    assert [tuple(r) for r in pruned["density_rules"]] == DENSITY_RULES and pruned["erk_power"] == 0.0


def test_demo_density_rules_meet_target_and_favour_sensitive_layers():
    import jax
    import jax.numpy as jnp

    from jaxcompress.models import student_cnn

    params = student_cnn().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))["params"]
    per_leaf = erk_sparsities(params, 0.9, rules=DENSITY_RULES, power=0.0)
    sizes = {"conv1": 288, "conv2": 18432, "fc1": 200704, "head": 640}
    zeros = sum(round(per_leaf[f"{k}/kernel"] * n) for k, n in sizes.items())
    assert abs(zeros / sum(sizes.values()) - 0.9) < 1e-4
    # density ratios are the multiplier ratios 5 : 2 : 1
    d = {k: 1 - per_leaf[f"{k}/kernel"] for k in sizes}
    np.testing.assert_allclose(d["conv1"] / d["fc1"], 5.0, rtol=0.02)
    np.testing.assert_allclose(d["conv2"] / d["fc1"], 2.0, rtol=0.01)
