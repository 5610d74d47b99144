"""Recipes on text: a byte-level Transformer LM trained, distilled, pruned and compressed in one shot."""
import json

import jax
import numpy as np
import optax
import pytest

from jaxcompress.data.text import eval_windows, load_python_corpus
from jaxcompress.distill.losses import perplexity
from jaxcompress.export.reader import load
from jaxcompress.recipes import tasks
from jaxcompress.recipes.models import build_model
from jaxcompress.recipes.runner import run_recipe
from jaxcompress.recipes.schema import parse_recipe
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.loop import fit
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.state import init_train_state, linen_apply_fn

TINY = """\
name = "lm_tiny"
seeds = [0]

[data]
name = "python_corpus"
seq_len = 16
max_bytes = 30000
validation_subset = 2000
test_subset = 3000
batch_size = 8
eval_batch_size = 32

[model]
kind = "transformer_lm"
dim = 16
depth = 1
heads = 2

[[stages]]
name = "dense"
kind = "train"
steps = 6
eval_every = 3
learning_rate = 3e-3
lr_schedule = "warmup_cosine"
grad_clip = 1.0

[[stages]]
name = "student"
kind = "distill"
teacher = "dense"
model = { kind = "transformer_lm", dim = 8, depth = 1, heads = 2 }
temperature = 2.0
steps = 4

[[stages]]
name = "magnitude"
kind = "prune"
from = "dense"
sparsity = 0.5
schedule = "one_shot"
steps = 0
rules = [["^block_\\\\d+/.*/kernel$", true], [".*", false]]

[[stages]]
name = "sparsegpt"
kind = "oneshot"
from = "dense"
calibration = 16
calibration_batch = 8
methods = [{ method = "sparsegpt", sparsity = 0.5, structure = "2:4" }]
rules = [["^block_\\\\d+/.*/kernel$", true], [".*", false]]

[[stages]]
name = "gptq"
kind = "oneshot"
from = "dense"
calibration = 16
methods = [{ method = "rotation" }, { method = "gptq", bits = 4, group_size = 8 }]
rules = [["^block_\\\\d+/.*/kernel$", true], [".*", false]]

[[stages]]
name = "file"
kind = "export"
from = "sparsegpt"
"""


@pytest.mark.parametrize("old, new, key, match", [
    ("seq_len = 16\n", "", "data", "needs seq_len"),
    ("seq_len = 16", "seq_len = 16\nvalidation = 0.1", "data.validation", "not read for the text corpus"),
    ('kind = "transformer_lm"\ndim = 16\ndepth = 1\nheads = 2\n', 'kind = "mlp"\n', "model.kind", "does not read text"),
    ("heads = 2\n", "heads = 3\n", "model.heads", "must divide dim = 16"),
    ("steps = 6", "epochs = 1", "stages[0].epochs", "length is in steps"),
    ("steps = 4", "kd_weight = 0.5", "stages[1]", "needs steps"),
    ('methods = [{ method = "sparsegpt", sparsity = 0.5, structure = "2:4" }]',
     'methods = [{ method = "sparsegpt", sparsity = 0.5, structure = "2x4" }]', "stages[3].methods",
     "structure must be 'unstructured' or 'N:M'"),
    ('{ method = "gptq", bits = 4, group_size = 8 }', '{ method = "gptq", bitz = 4 }', "stages[4].methods",
     "gptq has no setting 'bitz'"),
    ('[{ method = "rotation" }, { method = "gptq", bits = 4, group_size = 8 }]',
     '[{ method = "gptq", bits = 4 }, { method = "rotation" }]', "stages[4].methods", "followed by at most one solver"),
    ('name = "sparsegpt"\nkind = "oneshot"\nfrom = "dense"', 'name = "sparsegpt"\nkind = "oneshot"\nfrom = "magnitude"',
     "stages[3].from", "starts from a trained float model"),
    ('name = "file"\nkind = "export"', 'name = "file"\nkind = "finetune"\nsteps = 2', "stages[5].from",
     "only an export stage may follow one-shot compression"),
    ('[".*", false]]\n\n[[stages]]\nname = "gptq"', '["^nothing/", true]]\n\n[[stages]]\nname = "gptq"',
     "stages[3].rules", "matches no parameter"),
])
def test_bad_text_recipes_fail_fast_naming_the_key(old, new, key, match, recipe_fails):
    assert old in TINY
    recipe_fails(TINY.replace(old, new, 1), key, match)


def test_oneshot_methods_take_the_order_one_shot_runs():
    # AWQ last brings its own round-to-nearest solver, after other reparametrisations too
    awq = '[{ method = "rotation" }, { method = "awq", bits = 4, group_size = 8 }]'
    methods = '[{ method = "rotation" }, { method = "gptq", bits = 4, group_size = 8 }]'
    assert parse_recipe(TINY.replace(methods, awq))["stages"][4]["methods"][1]["method"] == "awq"


def test_oneshot_methods_without_a_solver_fail(recipe_fails):
    methods = '[{ method = "rotation" }, { method = "gptq", bits = 4, group_size = 8 }]'
    recipe_fails(TINY.replace(methods, '[{ method = "rotation" }]'), "stages[4].methods", "only reparametrises")


def test_text_keys_are_refused_on_images(recipe_fails):
    text = '[data]\nname = "mnist"\nseq_len = 16\n[model]\nkind = "mlp"\n[[stages]]\nname = "a"\nkind = "train"\n'
    recipe_fails(text, "data.seq_len", "only read for a text corpus")
    text = '[data]\nname = "mnist"\n[model]\nkind = "transformer_lm"\ndim = 8\ndepth = 1\nheads = 2\n'
    recipe_fails(text + '[[stages]]\nname = "a"\nkind = "train"\n', "model.kind", "does not read images")
    text = '[data]\nname = "mnist"\n[model]\nkind = "mlp"\n[[stages]]\nname = "a"\nkind = "train"\nepochs = 1\nsteps = 3\n'
    recipe_fails(text, "stages[0].steps", "either epochs or steps")


def test_train_batches_are_a_function_of_seed_and_step():
    split = tasks.Split("t", "", 256, np.arange(5000) % 256, np.arange(100), np.arange(100), seq_len=8)
    every = list(tasks.train_batches(split, 4, seed=3, num_steps=6))
    tail = list(tasks.train_batches(split, 4, seed=3, num_steps=6, start=4))
    assert len(every) == 6 and len(tail) == 2
    for a, b in zip(every[4:], tail):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(every[0]["tokens"], every[1]["tokens"])


def test_fit_takes_no_batch_past_its_last_step():
    # fit in chunks over one iterator sees every batch once (a step that counts the batches it gets)
    seen = []

    def step(state, batch):
        seen.append(int(batch["i"]))
        return state, {"loss": 0.0}

    batches = iter({"i": i} for i in range(10))
    fit(step, None, batches, num_steps=3, progress=False)
    fit(step, None, batches, num_steps=3, progress=False)
    assert seen == [0, 1, 2, 3, 4, 5] and next(batches)["i"] == 6


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    recipe = parse_recipe(TINY)
    return recipe, out, run_recipe(recipe, out, progress=False, log=lambda m: None)


def test_text_recipe_scores_perplexity_on_every_byte(tiny_run):
    recipe, out, report = tiny_run
    assert report["split"] == {"train": 30000, "validation": 2000, "test": 3000, "unit": "bytes", "seq_len": 16}
    rows = {r["stage"]: r for r in report["stages"]}
    dense = rows["dense"]
    # the test perplexity re-derived from the saved dense artifact: exp(mean NLL) over every next byte once
    corpus = load_python_corpus(max_bytes=30000)
    module = build_model(recipe["model"], 256, seq_len=16)
    apply = linen_apply_fn(module, inputs="tokens")
    like = module.init(jax.random.key(0), np.zeros((1, 16), np.int32))["params"]
    params, _ = load(out / dense["artifact"], like=like)
    step = jax.jit(make_eval_step(apply, loss_fn=token_loss, metrics_fn=token_metrics))
    scored = evaluate(step, init_train_state(params, optax.sgd(0.0)),
                      eval_windows(corpus.test[:3000], batch_size=7, seq_len=16))
    assert scored["count"] == 2999
    assert dense["test_perplexity"] == pytest.approx(float(perplexity(scored["loss"])), rel=1e-5)
    assert dense["test_accuracy"] == pytest.approx(scored["accuracy"], rel=1e-5)
    assert [c["step"] for c in dense["validation_curve"]] == [3, 6]
    assert dense["validation_curve"][-1]["validation_perplexity"] == pytest.approx(dense["validation_perplexity"],
                                                                                   rel=1e-5)
    assert rows["student"]["params"] < dense["params"] and rows["student"]["steps"] == 4


def test_oneshot_stages_compress_the_block_kernels(tiny_run):
    _, out, report = tiny_run
    rows = {r["stage"]: r for r in report["stages"]}
    for name in ("magnitude", "sparsegpt"):
        layers = rows[name]["layer_sparsity"] if name == "magnitude" else None
        if layers is not None:
            assert all(v == pytest.approx(0.5) for k, v in layers.items() if k.startswith("block_0/"))
    sgpt = rows["sparsegpt"]
    assert sgpt["kind"] == "oneshot" and sgpt["steps"] == 0 and sgpt["calibration_examples"] == 16
    assert sgpt["file_bytes"] < rows["dense"]["file_bytes"]
    assert rows["gptq"]["weight_bits"] == 4 and rows["gptq"]["rotation_seconds"] >= 0
    # the exported file holds the one-shot model: the same scores loaded back from it
    assert sgpt["test_perplexity_from_file"] == pytest.approx(sgpt["test_perplexity"], rel=1e-5)
    view, _ = load(out / sgpt["exported"])
    blocks = [np.asarray(v["kernel"]) for k, v in view["block_0"]["mlp"].items()]
    for w in blocks:  # 2:4: two zeros in every group of four inputs of each output
        groups = w.reshape(-1, 4, w.shape[-1]) if w.shape[0] % 4 == 0 else None
        assert groups is not None and ((groups == 0).sum(axis=1) >= 2).all()


def test_text_recipe_resumes_without_computing_again(tiny_run):
    recipe, out, report = tiny_run
    logged = []
    again = run_recipe(recipe, out, progress=False, log=logged.append)
    assert sum("restored from" in m for m in logged) == 5  # every trained and one-shot stage
    for a, b in zip(report["stages"], again["stages"]):
        assert a["test_perplexity"] == b["test_perplexity"] and a["seconds"] == b["seconds"]
    # an export whose one-shot stage was restored computes that stage again for its description
    (out / "seed_0" / "stage_file" / "result.json").unlink()
    third = run_recipe(recipe, out, progress=False, log=lambda m: None)
    a, b = report["stages"][3], third["stages"][3]
    assert a["exported_file_bytes"] == b["exported_file_bytes"]
    assert a["test_perplexity_from_file"] == pytest.approx(b["test_perplexity_from_file"], rel=1e-6)
    lines = [json.loads(line) for line in (out / "runs.jsonl").open()]
    assert len(lines) == 3 * 5
    # the first run computed every stage, the second and third restored all five (the third computed
    # the one-shot stage again for the export's description, which logs no row of its own)
    assert [sum(bool(r.get("restored")) for r in lines[i : i + 5]) for i in (0, 5, 10)] == [0, 5, 5]


def test_text_runs_report_and_compare_by_perplexity(tiny_run, tmp_path):
    from jaxcompress.recipes.compare import compare_markdown, compare_runs
    from jaxcompress.recipes.report import write_report

    _, out, report = tiny_run
    paths = write_report(report, tmp_path / "a")
    md = paths[1].read_text()
    assert "| stage | steps | validation perplexity | test perplexity | test next-byte accuracy |" in md
    assert f"{report['stages'][0]['test_perplexity']:.3f}" in md and paths[2].exists()
    assert "Training record (validation perplexity" in md and "\n| dense | 6 | " in md  # evaluated at steps 3 and 6
    table = compare_markdown({"a": report, "b": report})
    assert "validation perplexity | test perplexity" in table
    best = min(report["stages"], key=lambda s: s["test_perplexity"])  # lowest perplexity is on the front
    assert any(line.startswith(f"| a | lm_tiny | python_corpus | 1 | {best['name']} |") and line.endswith("| * |")
               for line in table.splitlines())
    image = {"dataset": "mnist", "split": {"unit": "images"}, "stages": []}
    with pytest.raises(ValueError, match="mix text"):
        compare_markdown({"a": report, "img": image})
    assert [p.name for p in compare_runs([tmp_path / "a"], tmp_path / "cmp")] == ["compare.md", "compare.png"]


def test_training_record_follows_the_stages_a_model_comes_from():
    from jaxcompress.recipes.report import training_record

    def curve(points):
        return [{"step": s, "validation_perplexity": p} for s, p in points]

    report = {"split": {"unit": "bytes"},
              "config": {"stages": [{"name": "a"}, {"name": "b", "from": "a"}, {"name": "p", "from": "b"}]},
              "stages": [{"stage": "a", "name": "a", "steps": 5, "validation_curve": curve([(2, 5.0), (4, 4.0)])},
                         {"stage": "b", "name": "b, more", "validation_curve": curve([(2, 3.5), (4, 3.2), (6, 3.0),
                                                                                       (8, 2.9)])},
                         {"stage": "p", "name": "pruned"}]}
    record = training_record(report)
    # a trained 5 steps (evaluated at 2 and 4), b 8 more: b's last quarter starts at the first
    # evaluation at or after step 9.75 of 13, b's step 6 (step 11 in all), where the perplexity was 3.0
    assert [(t["stage"], t["steps"], t["from_step"], t["first"]) for t in record] == [
        ("a", 5, 4, 5.0), ("b", 13, 11, 5.0)]
    assert record[1]["at_from_step"] == 3.0 and record[1]["change"] == pytest.approx(2.9 / 3.0 - 1)
    # b's own steps: from a's end (its last evaluation, 4.0: a has no final score) to b's end
    assert record[0]["stage_change"] is None and record[1]["stage_change"] == pytest.approx(2.9 / 4.0 - 1)
    # where a has its final validation score, that is a's end
    report["stages"][0]["validation_perplexity"] = 3.8
    assert training_record(report)[1]["stage_change"] == pytest.approx(2.9 / 3.8 - 1)
