"""Recipes for Deep Compression: iterative pruning, weight decay, weight-sharing stages, Caffe's LeNet."""
import json

import numpy as np
import pytest

from jaxcompress.recipes.build import optimizer, prune_schedule
from jaxcompress.recipes.runner import run_recipe
from jaxcompress.recipes.schema import parse_recipe

TINY = """\
name = "share_tiny"
seeds = [0]

[data]
name = "mnist"
train_subset = 400
test_subset = 100
validation = 100
batch_size = 50

[model]
kind = "caffe_lenet"
channels = [4, 8]
hidden = 32

[[stages]]
name = "dense"
kind = "train"
epochs = 2
weight_decay = 5e-4

[[stages]]
name = "pruned"
kind = "prune"
sparsity = 0.9
schedule = "iterative"
rounds = 3
schedule_end = 0.75
rules = [["^conv2/kernel$", 0.5], ["^fc1/kernel$", 0.9], ["^fc2/kernel$", 0.7]]
epochs = 2

[[stages]]
name = "shared"
kind = "share"
bits = 3
rules = [["^conv1/kernel$", 2], ["kernel$", true]]
epochs = 1
learning_rate = 1e-4

[[stages]]
name = "file"
kind = "export"
float_dtype = "float16"

[[stages]]
name = "file_context"
kind = "export"
from = "shared"
float_dtype = "float16"
context_coding = true
"""


@pytest.mark.parametrize("old, new, key, match", [
    ('sparsity = 0.9\nschedule = "iterative"\nrounds = 3', "sparsity = 0.9\nrounds = 3", "stages[1].rounds",
     "only read with schedule"),
    ("weight_decay = 5e-4", "weight_decay = -1.0", "stages[0].weight_decay", r"must be a number in \[0, inf\)"),
    ("channels = [4, 8]", "channels = [4]", "model.channels", "list of two integers"),
    ("bits = 3\n", "", "stages[2]", "needs bits"),
    ('name = "file"\nkind = "export"\nfloat_dtype = "float16"', 'name = "file"\nkind = "prune"\nsparsity = 0.95',
     "stages[3].from", "only an export stage may follow weight sharing"),
    ('kind = "share"', 'kind = "share"\nfrom = "int8"', "stages[3].from", "quantizes the model"),
])
def test_bad_share_recipes_fail_fast_naming_the_key(old, new, key, match, recipe_fails):
    assert old in TINY
    text = TINY.replace(old, new, 1)
    if "int8" in new:  # a quantized model to share from
        text = text.replace('[[stages]]\nname = "shared"',
                            '[[stages]]\nname = "int8"\nkind = "quantize"\nbits = 8\n\n[[stages]]\nname = "shared"')
    err = recipe_fails(text, key, match)
    assert err.line is not None and "r.toml:" in str(err)


def test_share_rules_that_match_nothing_fail(recipe_fails):
    recipe_fails(TINY.replace('[["^conv1/kernel$", 2]', '[["^conv9/kernel$", 2]'), "stages[2].rules", "matches no parameter")


def test_iterative_schedule_reaches_each_layer_target_at_the_last_round():
    stage = parse_recipe(TINY)["stages"][1]
    s = prune_schedule(stage, 40, [tuple(r) for r in stage["rules"]])
    # 3 rounds over the first 75% of 40 steps: rounds at steps 0, 10, 20, each removing the same
    # fraction of the survivors so that the sparsest layer (0.9) is at its target after the last
    rate = 1 - 0.1 ** (1 / 3)
    assert (s.num_rounds, s.round_steps) == (3, 10) and s.rate == pytest.approx(rate)
    got = [float(s.sparsity(t, 0.9)) for t in (0, 9, 10, 20, 39)]
    np.testing.assert_allclose(got, [rate, rate, 1 - (1 - rate) ** 2, 0.9, 0.9], rtol=1e-6)
    # a layer with a lower target stops there: 0.7 after the second round (the first gives 0.536)
    assert [float(s.sparsity(t, 0.7)) for t in (0, 10, 20)] == pytest.approx([rate, 0.7, 0.7])
    assert [bool(s.is_update_step(t)) for t in (0, 5, 10, 20, 30)] == [True, False, True, True, False]


def test_weight_decay_is_added_to_kernel_gradients_only():
    import jax.numpy as jnp

    params = {"kernel": jnp.full((2, 3), 2.0), "bias": jnp.full((3,), 2.0)}
    zero = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros((3,))}
    stage = {"learning_rate": 0.1, "lr_schedule": "constant", "optimizer": "sgd", "weight_decay": 0.5}
    opt = optimizer(stage, 10)
    updates, _ = opt.update(zero, opt.init(params), params)
    np.testing.assert_allclose(updates["kernel"], -0.1 * 0.5 * 2.0)  # -lr * wd * w
    np.testing.assert_allclose(updates["bias"], 0.0)
    plain = optimizer({**stage, "weight_decay": 0.0}, 10)
    np.testing.assert_allclose(plain.update(zero, plain.init(params), params)[0]["kernel"], 0.0)


def test_caffe_lenet_has_the_papers_parameter_count():
    import jax
    import jax.numpy as jnp

    from jaxcompress.models import CaffeLeNet

    shapes = jax.eval_shape(CaffeLeNet().init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 431080  # 1,724,320 float32 bytes: the papers' 1720 KB
    p = shapes["params"]
    assert p["conv1"]["kernel"].shape == (5, 5, 1, 20) and p["fc1"]["kernel"].shape == (800, 500)


def test_share_stage_run_keeps_masks_and_codebooks_in_the_file(mnist_dir, tmp_path):
    from jaxcompress.export.reader import load

    recipe = parse_recipe(TINY.replace('name = "mnist"', f'name = "mnist"\ndir = "{mnist_dir}"'))
    report = run_recipe(recipe, tmp_path, progress=False, log=lambda m: None)
    rows = {r["stage"]: r for r in report["stages"]}
    pruned, shared = rows["pruned"], rows["shared"]
    assert pruned["layer_sparsity"]["fc1/kernel"] == pytest.approx(0.9, abs=1e-3)
    assert "conv1/kernel" not in pruned["layer_sparsity"]  # no rule names it: not pruned
    assert shared["layer_sparsity"] == pruned["layer_sparsity"]  # the masks are held while centroids train
    assert shared["validation_accuracy_from_file"] is not None and shared["exported_file_bytes"] < shared["file_bytes"]
    loaded, _ = load(tmp_path / shared["exported"])
    before, _ = load(tmp_path / pruned["artifact"])
    for layer, bits in (("conv1", 2), ("conv2", 3), ("fc1", 3), ("fc2", 3)):
        k, k0 = np.asarray(loaded[layer]["kernel"]), np.asarray(before[layer]["kernel"])
        assert len(np.unique(k[k != 0])) <= 2 ** bits  # one codebook entry per stored value
        np.testing.assert_array_equal(k == 0, k0 == 0)  # pruned stays pruned; nothing else becomes zero
        assert layer != "conv1" or not np.any(k0 == 0)
        b = np.asarray(loaded[layer]["bias"])
        np.testing.assert_array_equal(b, b.astype(np.float16).astype(b.dtype))  # saved as float16
    # the mean code width over the shared kernels, weighted by their sizes
    sizes = {"conv1": 100, "conv2": 800, "fc1": 4096, "fc2": 320}
    expected = (2 * sizes["conv1"] + 3 * (sizes["conv2"] + sizes["fc1"] + sizes["fc2"])) / sum(sizes.values())
    assert shared["weight_bits"] == pytest.approx(expected, abs=0.01)
    assert json.loads((tmp_path / "runs.jsonl").read_text().splitlines()[-1])["stage"] == "shared"
    # the same model exported with context_coding: the same weights, a file no larger (on masks this
    # small the context layout seldom wins; tests/test_export_context.py has the ones where it does)
    plain, context = tmp_path / "seed_0" / "stage_file" / "model.npz", tmp_path / shared["exported"]
    assert context.parent.name == "stage_file_context" and context.stat().st_size <= plain.stat().st_size
    (a, _), (b, info) = load(plain), load(context)
    assert info.version == (2 if "context" in {r["layout"] for r in info.tensors.values()} else 1)
    for layer in a:
        for name in a[layer]:
            assert a[layer][name].tobytes() == b[layer][name].tobytes()
