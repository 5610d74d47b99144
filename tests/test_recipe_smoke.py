"""Every shipped recipe runs end to end on a smoke-sized subset (the first seed, a few hundred images)."""
import json

import pytest

from jaxcompress import cli
from jaxcompress.recipes.report import write_report
from jaxcompress.recipes.runner import run_recipe, smoke_recipe
from jaxcompress.recipes.schema import load_recipe, shipped_recipes


# the demo recipe's smoke run is tests/test_demo.py (through `jaxcompress demo`, with more checks)
# In the slow set: recipes whose every stage kind and option also runs in a default test: quantize with
# calibrated inputs (cifar10_tutorials' smoke, tests/test_recipe_seeds.py), the budget allocation
# (tests/test_recipe_seeds.py), augmentations and factorize stages, and the distillation losses
# (tests/test_recipes.py; a distill stage also runs in cifar10_tutorials' smoke).
# deep_compression_mnist: iterative pruning and share stages run in tests/test_recipe_share.py;
# transformer_lm, oneshot_lm: text stages and one-shot stages run in tests/test_recipe_text.py;
# lenet300_prune: sensitivity allocation runs in tests/test_recipe_seeds.py (its global scope is
# the library's, tested in tests/test_prune*.py); cifar10_tutorials: distill, prune with the mask
# held and QAT stages run in tests/test_recipes.py's smoke run. So every stage kind and option of
# the shipped recipes runs in a tiny recipe of the default tests, and their own smoke runs here
# are in the slow set (python -m pytest -m slow tests/test_recipe_smoke.py: all of them).
_SLOW = {"mnist_quant", "cifar10_quant", "cifar10_budget", "hinton_mnist", "mnist_lowrank", "cifar10_lowrank",
         "cifar10_distill", "deep_compression_mnist", "transformer_lm", "oneshot_lm", "lenet300_prune",
         "cifar10_tutorials"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n
                                  for n in shipped_recipes() if n != "demo"])
def test_shipped_recipe_smoke(name, mnist_dir, tmp_path):
    out = tmp_path / name
    if load_recipe(name)["data"]["name"] == "cifar10":
        # CIFAR-10 is not on every machine: the same stages, smoke-sized, on MNIST (the CNNs take any size)
        recipe = smoke_recipe(load_recipe(name))
        recipe["data"].update(name="mnist", dir=str(mnist_dir))
        write_report(run_recipe(recipe, out, progress=False, log=lambda m: None), out)
    else:
        text = load_recipe(name)["data"]["name"] == "python_corpus"  # the standard library's sources, no data dir
        rc = cli.main(["run", name, "--smoke", *(() if text else ("--data-dir", str(mnist_dir))), "--out", str(out),
                       "--no-progress"])
        assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["split"]["train"] == (128_000 if report["split"]["unit"] == "bytes" else 256)
    assert len(report["stages"]) >= 1
    for row in report["stages"]:
        for layer, s in (row.get("allocated_sparsity") or {}).items():  # the masks hold the allocation
            if row.get("budget_allocation"):  # the grid of a quantized layer may round kept weights to 0 too
                assert row["layer_sparsity"][layer] >= s - 1e-3
            else:
                assert abs(row["layer_sparsity"][layer] - s) < 1e-3
        if row.get("budget_allocation"):
            alloc = row["budget_allocation"]
            assert alloc["tries"][-1]["one_shot_file_bytes"] <= alloc["budget_bytes"]
    ref = report["config"].get("reference")
    own = {s["name"]: s["reference"] for s in report["config"]["stages"] if s.get("reference")}
    expected = [(r["stage"], own.get(r["stage"], ref)) for r in report["stages"]
                if own.get(r["stage"], ref) not in (None, r["stage"])]
    assert [(p["stage"], p["reference"]) for p in report.get("paired", [])] == expected
