"""Smoke test of experiments/deep_compression_mnist.py: the whole pipeline on a tiny MNIST subset."""
import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "deep_compression_mnist.py"


@pytest.fixture(scope="module")
def dc():
    spec = importlib.util.spec_from_file_location("deep_compression_mnist", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(config, ratio, err):
    return {"config": config, "ratio": ratio, "val_error_pct": err}


def test_choose_prefers_lowest_validation_error_among_rows_meeting_both_bars(dc):
    bar = {"ratio": 40.0, "error_pct": 1.7}
    rows = [_row("a", 45.0, 1.6), _row("b", 41.0, 1.5), _row("c", 38.0, 1.2), _row("d", 50.0, 1.9)]
    assert dc.choose(rows, bar)["config"] == "b"
    assert dc.choose([_row("b2", 42.0, 1.5)] + rows, bar)["config"] == "b2"  # tie: the higher ratio
    # nothing meets both: the highest ratio within the error bar, else the lowest error
    assert dc.choose([_row("c", 38.0, 1.2), _row("e", 39.0, 1.6), _row("d", 50.0, 1.9)], bar)["config"] == "e"
    assert dc.choose([_row("d", 50.0, 1.9), _row("f", 30.0, 1.8)], bar)["config"] == "f"


def test_caffe_lenet5_has_the_papers_parameter_count(dc):
    import jax
    import jax.numpy as jnp

    shapes = jax.eval_shape(dc.CaffeLeNet5().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 431080  # 1,724,320 float32 bytes: the paper's 1720 KB


def test_quick_run_writes_results_scored_from_the_artifact(dc, mnist_dir, tmp_path):
    out = dc.main(["--quick", "--models", "lenet300", "--seeds", "1", "--data-dir", str(mnist_dir),
                   "--out", str(tmp_path / "dc")])
    saved = json.loads((tmp_path / "dc.json").read_text())
    assert saved["models"][0]["chosen"] == out["models"][0]["chosen"]
    m = saved["models"][0]
    assert saved["split"] == {"train": 1024, "val": 256, "test": 256}
    assert len(m["seeds"]) == 1 and m["configurations"]
    for row in m["configurations"]:
        assert row["float32_bytes"] == 4 * 266610
        assert row["ratio"] == pytest.approx(row["float32_bytes"] / row["file_bytes"])
        # 8% / 9% / 26% of the kernels kept (Han et al. 2015, Table 2)
        assert row["nonzero_weights"] == round(0.08 * 235200) + round(0.09 * 30000) + round(0.26 * 1000)
        assert {t["path"] for t in row["tensors"] if t["kind"] == "codebook"} == {"fc1/kernel", "fc2/kernel", "head/kernel"}
    for s in m["seeds"]:
        assert 0.0 <= s["test_error_pct"] <= 100.0 and s["file_bytes"] < s["dense"]["file_bytes"] / 10
    md = (tmp_path / "dc.md").read_text()
    assert "LeNet-300-100" in md and "bar met" in md and (tmp_path / "dc.png").stat().st_size > 0


@pytest.mark.slow
def test_quick_run_of_lenet5_with_further_seeds(dc, mnist_dir, tmp_path):
    out = dc.main(["--quick", "--models", "lenet5", "--seeds", "2", "--data-dir", str(mnist_dir),
                   "--out", str(tmp_path / "dc")])
    m = out["models"][0]
    assert [s["seed"] for s in m["seeds"]] == [0, 1]
    assert m["chosen_row"]["float32_bytes"] == 4 * 431080
    for s in m["seeds"]:
        assert s["ratio"] > 30 and 0.0 <= s["test_error_pct"] <= 100.0
