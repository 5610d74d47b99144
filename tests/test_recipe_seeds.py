"""Recipes over seeds: the paired comparison against a reference stage, sensitivity allocation on
validation, tuning runs that never score the test set, and the keys that configure them."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from jaxcompress.prune import Sensitivity, allocate_sparsity
from jaxcompress.recipes.report import paired_comparison, report_markdown, write_report
from jaxcompress.recipes.runner import _summary, run_recipe, smoke_recipe
from jaxcompress.recipes.schema import RecipeError, load_recipe, parse_recipe

T_975 = {2: 4.302652729911275, 1: 12.706204736174707}  # Student's t 0.975 quantiles (tables)

BASE = """\
name = "seeds"
seeds = [0, 1]
reference = "dense"

[data]
name = "mnist"

[model]
kind = "mlp"
features = [32]

[[stages]]
name = "dense"
kind = "train"

[[stages]]
name = "pruned"
kind = "prune"
sparsity = 0.8
"""


def _rows(**accuracies):
    """Per seed, stage rows with the given test accuracies: ``_rows(a=[...], b=[...])``."""
    names = list(accuracies)
    return [[{"stage": n, "name": n.upper(), "test_accuracy": accuracies[n][i]} for n in names]
            for i in range(len(accuracies[names[0]]))]


def test_paired_comparison_matches_a_float64_derivation():
    ref, pruned, other = [0.9840, 0.9850, 0.9830], [0.9835, 0.9860, 0.9820], [0.9700, 0.9710, 0.9690]
    out = paired_comparison(_rows(dense=ref, pruned=pruned, other=other), "dense")
    assert [p["stage"] for p in out] == ["pruned", "other"]
    d = np.array(pruned, np.float64) - np.array(ref, np.float64)
    mean, std = d.mean(), d.std(ddof=1)
    p = out[0]
    np.testing.assert_allclose(p["differences"], d, rtol=0, atol=1e-15)
    assert p["mean"] == pytest.approx(mean, abs=1e-15) and p["std"] == pytest.approx(std, rel=1e-12)
    assert p["t"] == pytest.approx(mean / (std / math.sqrt(3)), rel=1e-12)
    half = T_975[2] * std / math.sqrt(3)
    np.testing.assert_allclose(p["interval"], [mean - half, mean + half], rtol=1e-9)
    assert p["within_spread"] is True and p["reference"] == "dense" and p["key"] == "test_accuracy"
    # -1.4 points on every seed but one: the interval lies below 0
    q = out[1]
    assert q["mean"] == pytest.approx(-0.014, abs=1e-12) and q["std"] == pytest.approx(0.0, abs=1e-12)
    assert q["t"] is None or abs(q["t"]) > 1e6
    assert q["within_spread"] is False


def test_paired_comparison_two_seeds_uses_one_degree_of_freedom():
    p = paired_comparison(_rows(dense=[0.5, 0.6], pruned=[0.52, 0.6]), "dense")[0]
    np.testing.assert_allclose(p["differences"], [0.02, 0.0], atol=1e-15)
    half = T_975[1] * math.sqrt(0.0002) / math.sqrt(2)
    np.testing.assert_allclose(p["interval"], [0.01 - half, 0.01 + half], rtol=1e-9)


def test_paired_comparison_one_seed_and_bad_arguments():
    p = paired_comparison(_rows(dense=[0.9], pruned=[0.8]), "dense")[0]
    assert p["differences"] == [pytest.approx(-0.1)] and p["std"] is p["t"] is p["interval"] is p["within_spread"] is None
    with pytest.raises(ValueError, match="reference 'dens' is not a stage"):
        paired_comparison(_rows(dense=[0.9], pruned=[0.8]), "dens")
    with pytest.raises(ValueError, match="level must be in"):
        paired_comparison(_rows(dense=[0.9], pruned=[0.8]), "dense", level=95)


def test_stage_references_override_the_recipe_reference():
    runs = _rows(labels=[0.70, 0.72, 0.71], kd=[0.73, 0.74, 0.72], teacher=[0.80, 0.81, 0.79], pruned=[0.79, 0.80, 0.79])
    out = paired_comparison(runs, "labels", references={"pruned": "teacher"})
    by = {p["stage"]: p for p in out}
    assert set(by) == {"kd", "teacher", "pruned"} and by["pruned"]["reference"] == "teacher"
    np.testing.assert_allclose(by["pruned"]["differences"], [-0.01, -0.01, 0.0], atol=1e-12)
    np.testing.assert_allclose(by["kd"]["differences"], [0.03, 0.02, 0.01], atol=1e-12)
    only = paired_comparison(runs, None, references={"kd": "labels", "pruned": "teacher"})
    assert [(p["stage"], p["reference"]) for p in only] == [("kd", "labels"), ("pruned", "teacher")]
    with pytest.raises(ValueError, match="reference 'teachr' is not a stage"):
        paired_comparison(runs, None, references={"pruned": "teachr"})
    stages = [{**r, "bytes_float32": 4000, "file_bytes": 400, "params": 1000, "nonzero_params": 100,
               "weight_bits": 32, "seconds": 1.0, "epochs": 1.0, "total_epochs": 1.0, "validation_accuracy": 0.5}
              for r in _summary(runs)]
    md = report_markdown({"recipe": "r", "dataset": "mnist", "source": "here", "seeds": [0, 1, 2], "stages": stages,
                          "paired": only, "config": {}})
    assert "against each stage's reference" in md and "| PRUNED | TEACHER | -1.00 | -1.00 | +0.00 |" in md
    r = parse_recipe(BASE.replace('reference = "dense"', "") + 'reference = "dense"\n')
    assert r["stages"][1]["reference"] == "dense" and "reference" not in r


def test_summary_averages_tables_of_numbers_over_seeds():
    runs = [[{"stage": "p", "test_accuracy": 0.9, "layer_sparsity": {"a": 0.5, "b": 0.7}, "artifact": "seed_0"}],
            [{"stage": "p", "test_accuracy": 0.8, "layer_sparsity": {"a": 0.7, "b": 0.9}, "artifact": "seed_1"}]]
    row = _summary(runs)[0]
    assert row["layer_sparsity"] == pytest.approx({"a": 0.6, "b": 0.8}) and row["artifact"] == "seed_0"
    assert row["test_accuracy"] == pytest.approx(0.85) and row["test_accuracy_std"] == pytest.approx(math.sqrt(0.005))


def test_markdown_reports_the_paired_table_and_the_published_numbers():
    runs = _rows(dense=[0.984, 0.985, 0.983], pruned=[0.9835, 0.986, 0.982])
    stages = [{**r, "bytes_float32": 4000, "file_bytes": 400, "params": 1000, "nonzero_params": 100,
               "weight_bits": 32, "seconds": 1.0, "epochs": 2.0, "total_epochs": 4.0 if r["stage"] == "pruned" else 2.0,
               "validation_accuracy": 0.5} for r in _summary(runs)]
    report = {"recipe": "r", "dataset": "mnist", "source": "here", "seeds": [0, 1, 2], "stages": stages,
              "paired": paired_comparison(runs, "dense"),
              "config": {"description": "What this run shows.",
                         "published": {"source": "Someone 2015, Table 1", "test_error": {"pruned": 1.59}}}}
    md = report_markdown(report)
    assert "What this run shows." in md and "| PRUNED | 2 (4) |" in md
    assert "| PRUNED | -0.05 | +0.10 | -0.10 | -0.02 | 0.10 | -0.28 | [-0.28, +0.24] | yes: the interval holds 0 |" in md
    assert ("- PRUNED matches 'DENSE' within the seeds' spread: 0.02 points lower on average, a difference these "
            "seeds cannot tell from 0.") in md
    assert "Published: Someone 2015, Table 1." in md and "| PRUNED | 1.62% ± 0.20% | 1.59% |" in md


BAD = [
    ('reference = "dense"', 'reference = "dens"', "reference"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nallocation = "sensitivity"\nrules = [["^fc1/", 0.5], [".*", true]]\n',
     "stages[1].rules"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nallocation = "sensitivity"\nscope = "global"\n', "stages[1].scope"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nallocation = "sensitivity"\nsensitivity_grid = [0.0, 0.5]\n',
     "stages[1].sensitivity_grid"),
    ("sparsity = 0.8\n", "sparsity = 0.8\nsensitivity_grid = [0.0, 0.9]\n", "stages[1].sensitivity_grid"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nallocation = "hessian"\n', "stages[1].allocation"),
    ('reference = "dense"', 'reference = "dense"\npublished = { source = "x", test_error = { dence = 1.6 } }',
     "published"),
    ('reference = "dense"', 'reference = "dense"\nscore_test = "no"', "score_test"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nreference = "pruned"\n', "stages[1].reference"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nreference = "dence"\n', "stages[1].reference"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nbits = 9\n', "stages[1].bits"),
    ("sparsity = 0.8\n", 'allocation = "budget"\n', "stages[1].allocation"),  # neither budget nor max_drop
    ("sparsity = 0.8\n", 'allocation = "budget"\nbudget = 5000\nmax_drop = 0.01\n', "stages[1].allocation"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nallocation = "budget"\nbudget = 5000\n', "stages[1].sparsity"),
    ("sparsity = 0.8\n", 'allocation = "budget"\nbudget = "dence"\n', "stages[1].budget"),
    ("sparsity = 0.8\n", 'allocation = "budget"\nbudget = -3\n', "stages[1].budget"),
    ("sparsity = 0.8\n", 'allocation = "budget"\nmax_drop = 1.5\n', "stages[1].max_drop"),
    ("sparsity = 0.8\n", 'allocation = "budget"\nbudget = 5000\nbits_grid = [1, 4]\n', "stages[1].bits_grid"),
    ("sparsity = 0.8\n", 'allocation = "budget"\nbudget = 5000\nscope = "global"\n', "stages[1].allocation"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nbits_grid = [2, 4]\n', "stages[1].bits_grid"),
    ("sparsity = 0.8\n", 'sparsity = 0.8\nbudget = "dense"\n', "stages[1].budget"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[2] + str(i) for i, c in enumerate(BAD)])
def test_bad_seed_and_allocation_keys_name_the_key(case):
    old, new, key = case
    assert old in BASE
    with pytest.raises(RecipeError) as e:
        parse_recipe(BASE.replace(old, new, 1))
    assert e.value.key == key


def test_sweep_of_the_experiment_validates_and_scores_no_test():
    sweep = load_recipe(Path(__file__).resolve().parents[1] / "experiments" / "prune_lenet300_sweep.toml")
    assert sweep["score_test"] is False and len(sweep["stages"]) > 4
    shipped = load_recipe("lenet300_prune")
    assert shipped["reference"] == "dense" and shipped["seeds"] == [0, 1, 2]
    budgets = {s["name"]: s["epochs"] + shipped["stages"][0]["epochs"] for s in shipped["stages"][1:]}
    assert len(set(budgets.values())) == 1  # every row gets the same total epochs
    assert smoke_recipe(shipped)["stages"][3]["sensitivity_grid"] == [0.0, 0.99]


@pytest.mark.slow
def test_sensitivity_allocation_uses_validation_and_a_tuning_run_scores_no_test(mnist_dir, tmp_path):
    recipe = parse_recipe(BASE.replace('reference = "dense"', "score_test = false").replace("seeds = [0, 1]", "seeds = [0]")
                          + 'allocation = "sensitivity"\nsensitivity_grid = [0.0, 0.5, 0.9]\nepochs = 0.5\n')
    recipe["data"].update(dir=str(mnist_dir), train_subset=400, validation=100, test_subset=100, batch_size=50)
    report = run_recipe(recipe, tmp_path, progress=False, log=lambda m: None)
    dense, pruned = report["stages"]
    assert "paired" not in report
    for row in (dense, pruned):
        assert row["test_accuracy"] is None and row["test_evaluations"] == 0
    sens = pruned["sensitivity"]
    # the unpruned baseline is the dense stage's validation accuracy, measured by the ordinary eval path
    assert sens["baseline"] == pytest.approx(dense["validation_accuracy"], abs=1e-12)
    again = allocate_sparsity(Sensitivity(sens["baseline"], tuple(sens["sparsities"]), sens["curves"],
                                          {"fc1/kernel": 784 * 32, "head/kernel": 32 * 10}), 0.8)
    assert again == pytest.approx(pruned["allocated_sparsity"], abs=1e-12)
    for name, s in pruned["allocated_sparsity"].items():  # the masks hold the allocation, to one weight
        size = {"fc1/kernel": 784 * 32, "head/kernel": 320}[name]
        assert abs(pruned["layer_sparsity"][name] - s) <= 1 / size + 1e-12
    assert pruned["sparsity"] == pytest.approx(0.8, abs=1e-4)
    paths = write_report(report, tmp_path)
    assert [p.name for p in paths] == ["report.json", "report.md"]
    assert "| pruned | 0.5 (1.5) |" in paths[1].read_text()
    journal = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    assert [j["test_evaluations"] for j in journal] == [0, 0]


def test_hinton_recipe_and_its_sweep():
    root = Path(__file__).resolve().parents[1]
    sweep = load_recipe(root / "experiments" / "hinton_mnist_sweep.toml")
    assert sweep["score_test"] is False
    shipped = load_recipe("hinton_mnist")
    stages = {s["name"]: s for s in shipped["stages"]}
    assert shipped["reference"] == "labels_jitter" and shipped["seeds"] == [0, 1, 2]
    # the teacher is the sweep's, and the students share one budget, optimizer and schedule
    assert {k: v for k, v in stages["teacher"].items() if k != "label"} == \
        {k: v for k, v in sweep["stages"][0].items() if k != "label"}
    students = [s for n, s in stages.items() if n != "teacher"]
    assert len({(s["epochs"], s["learning_rate"], s["lr_schedule"], s["optimizer"]) for s in students}) == 1
    # the shipped temperature is the one of the sweep's rows with the best validation accuracy
    report = root / "experiments" / "results" / "hinton_mnist_sweep" / "report.json"
    if report.exists():
        rows = json.loads(report.read_text())["stages"]
        best = max((r for r in rows if r["stage"] != "teacher"), key=lambda r: r["validation_accuracy"])
        temps = {s["name"]: s["temperature"] for s in sweep["stages"][1:]}
        assert stages["kd"]["temperature"] == stages["kd_jitter"]["temperature"] == temps[best["stage"]]
        assert all(r["test_accuracy"] is None for r in rows)


def test_cifar10_distill_runs_the_settings_its_sweep_chose_on_validation():
    root = Path(__file__).resolve().parents[1]
    sweep = load_recipe(root / "experiments" / "cifar10_distill_sweep.toml")
    shipped = load_recipe("cifar10_distill")
    assert sweep["score_test"] is False and shipped["seeds"] == [0, 1, 2]
    stages = {s["name"]: s for s in shipped["stages"]}
    assert stages["teacher"] == sweep["stages"][0]
    students = [s for n, s in stages.items() if n != "teacher"]
    assert len({(s["epochs"], s["learning_rate"], s["lr_schedule"], s["optimizer"], repr(s["model"]))
                for s in students}) == 1  # one budget, one student
    assert stages["student_kd"]["reference"] == stages["student_dkd"]["reference"] == "student_labels"
    keys = ("loss", "temperature", "kd_weight", "tckd_weight", "nckd_weight", "ce_weight")
    setting = lambda s: tuple(s.get(k) for k in keys)
    rows = json.loads((root / "experiments" / "results" / "cifar10_distill_sweep" / "report.json").read_text())["stages"]
    assert all(r["test_accuracy"] is None for r in rows)
    by_name = {s["name"]: s for s in sweep["stages"]}
    for loss, name in (("kd", "student_kd"), ("dkd", "student_dkd")):
        tried = [r for r in rows if by_name[r["stage"]].get("loss") == loss]
        best = max(tried, key=lambda r: r["validation_accuracy"])
        assert len(tried) == 2 and setting(by_name[best["stage"]]) == setting(stages[name])


def test_report_shows_data_directories_without_absolute_paths(tmp_path, monkeypatch):
    from jaxcompress.recipes.runner import _portable_path

    home, start = tmp_path / "home", tmp_path / "work" / "project"
    (home / ".cache" / "data").mkdir(parents=True)
    (tmp_path / "work" / "shared").mkdir(parents=True)
    start.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(start)
    assert _portable_path(str(home / ".cache" / "data")) == "~/.cache/data"
    assert _portable_path(str(tmp_path / "work" / "shared")) == "../shared"
    (start / "data").mkdir()
    assert _portable_path(str(start / "data")) == "data"
    assert _portable_path("mnist") == "mnist"  # a data set name is shown as given
    assert _portable_path(str(tmp_path / "missing")) == str(tmp_path / "missing")  # not a directory: as given


def test_budget_allocation_fits_the_file_of_the_uniform_stage(mnist_dir, tmp_path):
    """Per-layer sparsity and bits chosen on validation so the file fits another stage's file bytes."""
    text = (BASE.replace("seeds = [0, 1]", "seeds = [0]").replace("features = [32]", "features = [24]")
            .replace("sparsity = 0.8\n", "sparsity = 0.8\nbits = 4\nepochs = 0.5\n")
            + '[[stages]]\nname = "auto"\nkind = "prune"\nfrom = "dense"\nreference = "pruned"\n'
              'allocation = "budget"\nbudget = "pruned"\nsensitivity_grid = [0.0, 0.8, 0.95]\nbits_grid = [2, 4, 8]\n'
              'epochs = 0.5\n')
    recipe = parse_recipe(text)
    recipe["data"].update(dir=str(mnist_dir), train_subset=400, validation=100, test_subset=100, batch_size=50)
    report = run_recipe(recipe, tmp_path, progress=False, log=lambda m: None)
    dense, uniform, auto = report["stages"]
    assert uniform["weight_bits"] == 4 and uniform["sparsity"] == pytest.approx(0.8, abs=1e-3)
    alloc = auto["budget_allocation"]
    assert alloc["budget_bytes"] == uniform["file_bytes"]
    assert alloc["tries"][-1]["one_shot_file_bytes"] <= uniform["file_bytes"]
    # the baseline of the measurements is the dense stage's validation accuracy
    assert alloc["baseline"] == pytest.approx(dense["validation_accuracy"], abs=1e-12)
    assert set(alloc["layers"]) == {"fc1/kernel", "head/kernel"}
    for name, layer in alloc["layers"].items():
        assert auto["allocated_sparsity"][name] == layer["sparsity"]
        size = {"fc1/kernel": 784 * 24, "head/kernel": 240}[name]
        # the masks hold it; a coarse grid rounds some kept weights to 0 as well
        assert auto["layer_sparsity"][name] >= layer["sparsity"] - 1 / size - 1e-12
        assert [layer["sparsity"], layer["bits"], layer["bytes"]] in [o[:3] for o in alloc["options"][name]]
    sizes = {"fc1/kernel": 784 * 24, "head/kernel": 240}
    mean_bits = sum(sizes[k] * v["bits"] for k, v in alloc["layers"].items()) / sum(sizes.values())
    assert auto["weight_bits"] == pytest.approx(mean_bits, abs=0.01)
    from jaxcompress.export import load

    _, info = load(tmp_path / auto["artifact"])  # the file stores each layer at most at its chosen bits
    for name, layer in alloc["layers"].items():  # (the kept values of a sparse 2-bit layer are signs: 1 bit)
        assert info.tensors[name]["kind"] in ("int", "sign") and info.tensors[name]["bits"] <= layer["bits"]
    assert report["paired"][-1]["stage"] == "auto" and report["paired"][-1]["reference"] == "pruned"
    md = report_markdown(report)
    assert "Budget allocations" in md and f"| {uniform['file_bytes']:,} |" in md


def test_quantize_stage_calibrates_activation_ranges_before_it_scores(mnist_dir, tmp_path):
    """Post-training W8A8 scores as W8 does (ranges calibrated on training batches); 2-bit inputs do not."""
    text = (BASE.replace("seeds = [0, 1]", "seeds = [0]").replace('reference = "dense"', "")
            .replace('kind = "train"\n', 'kind = "train"\nepochs = 2\n')
            .replace('name = "pruned"\nkind = "prune"\nsparsity = 0.8\n',
                     'name = "w8"\nkind = "quantize"\nbits = 8\nepochs = 0\n'
                     '[[stages]]\nname = "w8a8"\nkind = "quantize"\nfrom = "dense"\nbits = 8\nactivation_bits = 8\n'
                     'epochs = 0\n'
                     '[[stages]]\nname = "w8a2"\nkind = "quantize"\nfrom = "dense"\nbits = 8\nactivation_bits = 2\n'
                     'calibration_batches = 2\nepochs = 0\n'))
    recipe = parse_recipe(text)
    recipe["data"].update(dir=str(mnist_dir), train_subset=2000, validation=500, test_subset=500, batch_size=50)
    rows = {r["stage"]: r for r in run_recipe(recipe, tmp_path, progress=False, log=lambda m: None)["stages"]}
    assert rows["dense"]["validation_accuracy"] > 0.8
    assert abs(rows["w8a8"]["validation_accuracy"] - rows["w8"]["validation_accuracy"]) <= 0.01
    assert rows["w8a2"]["validation_accuracy"] < rows["w8a8"]["validation_accuracy"] - 0.02
    assert "activation_ranges" not in rows["w8"]
    many, few = rows["w8a8"]["activation_ranges"], rows["w8a2"]["activation_ranges"]
    assert set(many) == set(few) == {"fc1", "head"}
    lo, hi = many["fc1"]  # the normalized pixels: black and white occur in every batch
    assert few["fc1"] == many["fc1"] and lo < 0 < hi
    lo, hi = few["head"]  # the hidden activations after the ReLU: 2 batches' range inside 8 batches'
    assert 0.0 == lo == many["head"][0] and 0.0 < hi <= many["head"][1]
    with pytest.raises(RecipeError) as e:
        parse_recipe(text.replace("activation_bits = 2", "activation_bits = 1"))
    assert e.value.key == "stages[3].activation_bits"
