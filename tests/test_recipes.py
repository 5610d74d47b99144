"""Recipes: the schema's errors (key and line, in under a second), a smoke run, resume, compare."""
import json
import shutil
import time

import pytest

from jaxcompress import cli
from jaxcompress.recipes.schema import RecipeError, load_recipe, locate, parse_recipe, shipped_recipes
from jaxcompress.recipes.runner import run_recipe

GOOD = """\
name = "tiny"
seeds = [0]
checkpoint_every = 4

[data]
name = "mnist"
train_subset = 300
test_subset = 100
validation = 60
batch_size = 40

[model]
kind = "mlp"
features = [32]

[[stages]]
name = "teacher"
kind = "train"
model = { kind = "mlp", features = [64] }
epochs = 1

[[stages]]
name = "student"
kind = "distill"
teacher = "teacher"
epochs = 1

[[stages]]
name = "pruned"
kind = "prune"
sparsity = 0.8
rules = [["^head/", 0.5], [".*", true]]
epochs = 1

[[stages]]
name = "int8"
kind = "quantize"
bits = 8
epochs = 0.5

[[stages]]
name = "export"
kind = "export"
"""


def _line_of(text, needle, occurrence=0):
    return [i for i, line in enumerate(text.splitlines(), start=1) if needle in line][occurrence]


def test_good_recipe_parses_with_defaults():
    r = parse_recipe(GOOD)
    assert [s["kind"] for s in r["stages"]] == ["train", "distill", "prune", "quantize", "export"]
    assert r["stages"][2]["from"] == "student" and r["stages"][4]["from"] == "int8"
    assert r["stages"][2]["model"] == {"kind": "mlp", "features": [32]}
    assert r["stages"][0]["model"]["features"] == [64]
    assert r["data"]["split_seed"] == 0 and r["stages"][1]["temperature"] == 4.0


def test_distill_stage_runs_the_loss_it_names():
    import jax
    import numpy as np

    from jaxcompress.distill import dkd_loss, kd_loss
    from jaxcompress.recipes.build import distill_loss

    kd = parse_recipe(GOOD)["stages"][1]
    dkd = parse_recipe(GOOD.replace('teacher = "teacher"\n', 'teacher = "teacher"\nloss = "dkd"\nnckd_weight = 2.0\n'))
    dkd = dkd["stages"][1]
    assert kd["loss"] == "kd" and "tckd_weight" not in kd
    assert dkd["loss"] == "dkd" and (dkd["tckd_weight"], dkd["nckd_weight"]) == (1.0, 2.0) and "kd_weight" not in dkd
    s, t = jax.random.normal(jax.random.key(0), (2, 6, 10))
    y = np.arange(6) % 10
    np.testing.assert_allclose(distill_loss(kd)(s, t, labels=y),
                               kd_loss(s, t, labels=y, temperature=4.0, kd_weight=0.9, ce_weight=0.1), rtol=1e-6)
    np.testing.assert_allclose(distill_loss(dkd)(s, t, labels=y),
                               dkd_loss(s, t, labels=y, temperature=4.0, tckd_weight=1.0, nckd_weight=2.0,
                                        ce_weight=0.1), rtol=1e-6)
    assert not np.allclose(distill_loss(dkd)(s, t, labels=y), distill_loss(kd)(s, t, labels=y))


# (description, edit of GOOD, exception type, key in the message, line of the key: the text it is on)
BAD = [
    ("unknown stage", ('kind = "quantize"', 'kind = "quantise"'), "stages[3].kind", 'kind = "quantise"'),
    ("missing teacher", ('teacher = "teacher"\n', ''), "stages[1]", "[[stages]]", 1),
    ("teacher not a stage", ('teacher = "teacher"', 'teacher = "teachr"'), "stages[1].teacher", 'teacher = "teachr"'),
    ("sparsity 1.5", ("sparsity = 0.8", "sparsity = 1.5"), "stages[2].sparsity", "sparsity = 1.5"),
    ("rule matches nothing", ('[["^head/", 0.5]', '[["^Dense_0/", 0.5]'), "stages[2].rules", "rules = "),
    ("typo in a key", ("epochs = 0.5", "epoch = 0.5"), "stages[3].epoch", "epoch = 0.5"),
    ("typo in [data]", ("test_subset = 100", "tset_subset = 100"), "data.tset_subset", "tset_subset"),
    ("bad model kind", ('kind = "mlp"\nfeatures', 'kind = "mpl"\nfeatures'), "model.kind", 'kind = "mpl"'),
    ("bad bits", ("bits = 8", "bits = 9"), "stages[3].bits", "bits = 9"),
    ("bad seeds", ("seeds = [0]", "seeds = [0, 0]"), "seeds", "seeds = [0, 0]"),
    ("bad validation", ("validation = 60", "validation = 1.5"), "data.validation", "validation = 1.5"),
    ("unknown data set", ('name = "mnist"', 'name = "mnits"'), "data.name", 'name = "mnits"'),
    ("bad rule regex", ('"^head/"', '"^head/("'), "stages[2].rules", "rules = "),
    ("bad augment value", ("epochs = 0.5", "epochs = 0.5\naugment = { shift = -1 }"), "stages[3].augment", "augment = "),
    ("unknown augment", ("epochs = 0.5", "epochs = 0.5\naugment = { jitter = 2 }"), "stages[3].augment", "augment = "),
    ("bad lr schedule", ("epochs = 0.5", "epochs = 0.5\nlr_schedule = \"linear\""), "stages[3].lr_schedule",
     "lr_schedule"),
    ("unknown loss", ('teacher = "teacher"\n', 'teacher = "teacher"\nloss = "dk"\n'), "stages[1].loss", 'loss = "dk"'),
    ("kd weight with dkd", ('teacher = "teacher"\n', 'teacher = "teacher"\nloss = "dkd"\nkd_weight = 0.5\n'),
     "stages[1].kd_weight", "kd_weight = 0.5"),
    ("dkd weight with kd", ('teacher = "teacher"\n', 'teacher = "teacher"\nnckd_weight = 2.0\n'),
     "stages[1].nckd_weight", "nckd_weight = 2.0"),
    ("duplicate stage name", ('name = "int8"', 'name = "pruned"'), "stages[3].name", 'name = "pruned"', 1),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_recipe_fails_fast_naming_key_and_line(case, tmp_path):
    _, (old, new), key, needle, *occurrence = case
    assert old in GOOD
    text = GOOD.replace(old, new, 1)
    path = tmp_path / "bad.toml"
    path.write_text(text)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError) as e:
        load_recipe(path)
    assert time.perf_counter() - t0 < 1.0
    line = _line_of(text, needle, *occurrence) if needle != "[[stages]]" else _line_of(text, needle, 1)
    assert e.value.key == key and e.value.line == line
    assert f"bad.toml:{line}: {key}" in str(e.value)


def test_stage_augment_and_cosine_schedule():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jaxcompress.recipes.build import augmentation, optimizer

    r = parse_recipe(GOOD.replace("epochs = 0.5", "epochs = 0.5\nlr_schedule = \"cosine\"\n"
                                  "augment = { shift = 2, input_dropout = 0.5, mixup = 1.0 }"))
    stage = r["stages"][3]
    assert r["stages"][2]["lr_schedule"] == "constant" and augmentation(r["stages"][2], 10) is None
    batch = {"image": jnp.ones((8, 6, 6, 1)), "label": jnp.arange(8) % 10}
    out = augmentation(stage, 10)(jax.random.key(0), batch)
    assert out["label"].shape == (8, 10)  # mixup: soft labels
    np.testing.assert_allclose(out["label"].sum(-1), 1.0, rtol=1e-6)
    assert float(jnp.mean(out["image"] == 0)) > 0.3  # shifted-in zeros and dropped pixels
    shift_only = augmentation({"augment": {"shift": 1}}, 10)(jax.random.key(1), batch)
    assert shift_only["label"].dtype == batch["label"].dtype and bool(jnp.any(shift_only["image"] == 0))
    opt = optimizer(stage, 10)
    params = {"w": jnp.ones(3)}
    st = opt.init(params)
    sizes = []
    for _ in range(10):
        upd, st = opt.update({"w": jnp.ones(3)}, st, params)
        sizes.append(float(jnp.abs(upd["w"][0])))
    assert sizes[0] == pytest.approx(1e-3, rel=1e-3) and sizes[-1] < 0.03 * sizes[0]  # cosine to ~0


def test_typo_suggests_the_key():
    with pytest.raises(RecipeError, match="did you mean 'epochs'"):
        parse_recipe(GOOD.replace("epochs = 0.5", "epoch = 0.5"))


def test_invalid_toml_reports_its_line():
    with pytest.raises(RecipeError, match="line 2") as e:
        parse_recipe('name = "x"\nseeds = = [0]\n')
    assert e.value.line == 2


def test_locate_finds_keys_in_tables_and_array_tables():
    assert locate(GOOD, ("data", "validation")) == _line_of(GOOD, "validation = 60")
    assert locate(GOOD, ("stages", 2, "sparsity")) == _line_of(GOOD, "sparsity = 0.8")
    assert locate(GOOD, ("stages", 4, "file")) == _line_of(GOOD, "[[stages]]", 4)  # not written: its table
    assert locate(GOOD, ("seeds",)) == 2


def test_every_shipped_recipe_validates():
    assert "demo" in shipped_recipes()
    for name in shipped_recipes():
        load_recipe(name)


def test_a_shipped_name_is_read_even_beside_a_directory_of_that_name(tmp_path, monkeypatch):
    (tmp_path / "demo").mkdir()  # e.g. the output directory of an earlier `jaxcompress run demo --out demo`
    monkeypatch.chdir(tmp_path)
    assert load_recipe("demo")["name"] == "demo"
    with pytest.raises(FileNotFoundError, match="not a file nor a shipped recipe"):
        load_recipe("elsewhere/demo")


def _recipe(mnist_dir):
    r = parse_recipe(GOOD)
    r["data"]["dir"] = str(mnist_dir)
    return r


def test_smoke_run_resume_and_compare(mnist_dir, tmp_path, capsys):
    out = tmp_path / "run"
    report = run_recipe(_recipe(mnist_dir), out, progress=False, log=lambda m: None)
    rows = report["stages"]
    assert [r["stage"] for r in rows] == ["teacher", "student", "pruned", "int8"]
    assert report["split"] == {"train": 240, "validation": 60, "test": 100, "unit": "images", "split_seed": 0}
    for r in rows:
        assert r["test_evaluations"] == 1 and 0 <= r["validation_accuracy"] <= 1
        assert (out / r["artifact"]).stat().st_size == r["file_bytes"]
    assert rows[0]["test_accuracy"] > 0.3  # 6 steps on real digits beat chance
    assert rows[2]["sparsity"] > 0.75 and rows[3]["weight_bits"] == 8
    assert rows[3]["file_bytes"] < rows[2]["file_bytes"] < rows[1]["file_bytes"]
    assert rows[3]["test_accuracy_from_file"] == pytest.approx(rows[3]["test_accuracy"], abs=1e-9)
    journal = [json.loads(l) for l in (out / "runs.jsonl").read_text().splitlines()]
    assert [j["stage"] for j in journal] == ["teacher", "student", "pruned", "int8"]

    # resume: the last trained stage's outputs are gone; the others are restored, not retrained
    shutil.rmtree(out / "seed_0" / "stage_int8")
    messages = []
    again = run_recipe(_recipe(mnist_dir), out, progress=False, log=messages.append)
    assert sum("restored from" in m for m in messages) == 3
    for a, b in zip(rows, again["stages"]):
        assert a["test_accuracy"] == b["test_accuracy"] and a["file_bytes"] == b["file_bytes"]

    # the same directory with another recipe is refused, not silently mixed
    changed = _recipe(mnist_dir)
    changed["stages"][0]["epochs"] = 2.0
    with pytest.raises(RecipeError, match="different recipe"):
        run_recipe(changed, out, progress=False, log=lambda m: None)

    from jaxcompress.recipes.report import write_report

    write_report(report, out)
    second = tmp_path / "run2"
    write_report({**report, "recipe": "other"}, second)
    assert cli.main(["report", str(out), str(second), "--out", str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert table.count("| run | tiny |") == 4 and table.count("| run2 | other |") == 4
    assert "| * |" in table  # the Pareto rows are marked
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 1000


def test_cli_run_bad_recipe_exits_2_before_training(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text(GOOD.replace("sparsity = 0.8", "sparsity = 1.5"))
    assert cli.main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"bad.toml:{_line_of(GOOD, 'sparsity = 0.8')}: stages[2].sparsity" in err
    assert not (tmp_path / "out").exists()


def test_cli_report_refuses_a_directory_without_report(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path), "--out", str(tmp_path / "cmp")]) == 2
    assert "report.json" in capsys.readouterr().err


FACTOR = GOOD.split("[model]")[0] + """\
[model]
kind = "mlp"
features = [64, 32]

[[stages]]
name = "dense"
kind = "train"
epochs = 1

[[stages]]
name = "lowrank"
kind = "factorize"
reference = "dense"
ranks = { fc1 = 8, fc2 = 4 }
epochs = 0

[[stages]]
name = "int8"
kind = "quantize"
bits = 8
epochs = 0.5
"""

BAD_FACTOR = [
    ("neither ranks nor energy", ("ranks = { fc1 = 8, fc2 = 4 }\n", ""), "stages[1].kind"),
    ("both ranks and energy", ("ranks = { fc1 = 8, fc2 = 4 }", "ranks = { fc1 = 8 }\nenergy = { fc2 = 0.9 }"),
     "stages[1].kind"),
    ("not a layer", ("fc2 = 4", "fc3 = 4"), "stages[1].ranks"),
    ("rank too large", ("fc2 = 4", "fc2 = 33"), "stages[1].ranks"),
    ("bad energy", ("ranks = { fc1 = 8, fc2 = 4 }", "energy = { fc1 = 1.5 }"), "stages[1].energy"),
    ("after quantizing", ('name = "lowrank"\nkind = "factorize"', 'name = "q"\nkind = "quantize"\nbits = 8\n'
                          '[[stages]]\nname = "lowrank"\nkind = "factorize"'), "stages[2].from"),
    ("rules after factoring", ("bits = 8", 'bits = 8\nrules = [["fc1", 8]]'), "stages[2].rules"),
]


@pytest.mark.parametrize("case", BAD_FACTOR, ids=[c[0] for c in BAD_FACTOR])
def test_bad_factorize_stage_fails_naming_the_key(case):
    _, (old, new), key = case
    assert old in FACTOR
    with pytest.raises(RecipeError) as e:
        parse_recipe(FACTOR.replace(old, new, 1))
    assert e.value.key == key


def test_factorize_stage_saves_the_truncated_svd_factors(mnist_dir, tmp_path):
    import numpy as np

    from jaxcompress.export import load
    from jaxcompress.lowrank.svd import factor_kernel

    recipe = parse_recipe(FACTOR)
    recipe["data"]["dir"] = str(mnist_dir)
    out = tmp_path / "run"
    report = run_recipe(recipe, out, progress=False, log=lambda m: None)
    dense, low, q = report["stages"]
    assert low["ranks"] == {"fc1": 8, "fc2": 4} and low["mode"] == "reshape"
    # no fine-tuning: the saved factors are the SVD of the dense kernels, scored as before training
    assert low["validation_accuracy_factored"] == low["validation_accuracy"]
    dense_params, _ = load(out / dense["artifact"])
    low_params, _ = load(out / low["artifact"])
    for layer, r in low["ranks"].items():
        u, v = factor_kernel(dense_params[layer]["kernel"], r)
        np.testing.assert_allclose(low_params[layer]["u"], u, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(low_params[layer]["v"], v, rtol=1e-5, atol=1e-6)
        assert "kernel" not in low_params[layer]
    assert low["params"] == (784 * 8 + 8 * 64 + 64) + (64 * 4 + 4 * 32 + 32) + (32 * 10 + 10)
    assert low["file_bytes"] < dense["file_bytes"] and q["file_bytes"] < low["file_bytes"]
    assert q["weight_bits"] == 8 and q["test_evaluations"] == 1
    from jaxcompress.recipes.report import report_markdown

    acc = f"{low['validation_accuracy']:.2%}"
    assert f"| lowrank | fc1 8, fc2 4 | reshape | {acc} | {acc} |" in report_markdown(report)
