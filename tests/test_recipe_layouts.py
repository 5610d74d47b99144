"""The recipes' parameter layouts equal Flax's params, and a recipe is checked without loading JAX."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import decide, explain
from jaxcompress.recipes.layouts import param_shapes
from jaxcompress.recipes.models import build_model

MNIST, CIFAR, DIGITS, WIDE = (28, 28, 1), (32, 32, 3), (8, 8, 1), (40, 36, 3)

# (model table, input shape, classes): every kind, default and non-default settings.
CASES = [
    ({"kind": "mlp"}, MNIST, 10),
    ({"kind": "mlp", "features": [64, 32, 16], "dropout_rate": 0.2}, CIFAR, 7),
    ({"kind": "mlp", "features": []}, DIGITS, 10),
    ({"kind": "lenet5"}, MNIST, 10),
    ({"kind": "lenet5", "channels": [4, 8], "features": [30, 20]}, CIFAR, 5),
    ({"kind": "lenet5"}, WIDE, 10),
    ({"kind": "lenet5"}, DIGITS, 10),
    ({"kind": "caffe_lenet"}, MNIST, 10),
    ({"kind": "caffe_lenet", "channels": [3, 5], "hidden": 17}, WIDE, 4),
    ({"kind": "cnn"}, MNIST, 10),
    ({"kind": "cnn", "channels": [8, 16, 8], "hidden": 20, "batch_norm": True}, CIFAR, 10),
    ({"kind": "cnn", "channels": [4]}, WIDE, 3),
    ({"kind": "teacher_cnn"}, CIFAR, 10),
    ({"kind": "student_cnn"}, MNIST, 10),
    ({"kind": "resnet", "blocks": [1, 1, 1]}, CIFAR, 10),
    ({"kind": "resnet", "blocks": [2, 1], "widths": [8, 12]}, MNIST, 6),
    ({"kind": "transformer_lm", "dim": 32, "depth": 2, "heads": 4}, (48,), 256),
    ({"kind": "transformer_lm", "dim": 24, "depth": 11, "heads": 3, "mlp_ratio": 2, "dropout": 0.1}, (16,), 256),
]


def _flax_shapes(model, shape, num_classes):
    text = model["kind"] == "transformer_lm"
    module = build_model(model, num_classes, seq_len=shape[0] if text else None)
    example = jnp.zeros((1, *shape), jnp.int32 if text else jnp.float32)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), example))["params"]
    leaves = jax.tree.leaves_with_path(params)
    assert all(leaf.dtype == jnp.float32 for _, leaf in leaves)
    return {path_name(p): tuple(leaf.shape) for p, leaf in leaves}


@pytest.mark.parametrize("model,shape,num_classes", CASES, ids=[f"{c[0]['kind']}-{i}" for i, c in enumerate(CASES)])
def test_param_shapes_equal_flax_params_in_flattening_order(model, shape, num_classes):
    ours = param_shapes(model, num_classes, shape)
    flax = _flax_shapes(model, shape, num_classes)
    assert list(ours.items()) == list(flax.items())


def test_decide_equals_explain_on_the_same_leaves():
    params = {"a": {"kernel": jnp.ones((3, 4)), "bias": jnp.ones(4)}, "b": {"kernel": jnp.ones((4, 2), jnp.bfloat16)},
              "ids": jnp.ones((2, 2), jnp.int32), "c": [jnp.ones((2, 2, 2))]}
    rules = [("^b/", None), ("c/", 3), ("kernel", True)]
    leaves = [(d.path, d.shape, d.dtype, d.reason != "not floating") for d in explain(params, None, min_ndim=0)]
    assert decide(leaves, rules) == explain(params, rules)
    assert [d.reason for d in explain(params, rules)] == ["ndim 1 < 2", "rule 2", "rule 0", "rule 1", "not floating"]


def test_images_too_small_for_the_model_fail_naming_the_model(recipe_fails):
    recipe = ('[data]\nname = "digits"\n\n[model]\nkind = "caffe_lenet"\n\n'
              '[[stages]]\nname = "a"\nkind = "train"\nepochs = 1\n')
    err = recipe_fails(recipe, "model", "caffe_lenet model needs larger images than")
    assert err.line == 4  # the [model] header


def test_resnet_needs_one_width_per_stage(recipe_fails):
    recipe = ('[data]\nname = "cifar10"\n\n[model]\nkind = "resnet"\nblocks = [1, 1]\n\n'
              '[[stages]]\nname = "a"\nkind = "train"\nepochs = 1\n')
    recipe_fails(recipe, "model.widths", "one width per stage")


BAD_RULE = """\
name = "bad"
[data]
name = "mnist"
[model]
kind = "cnn"
[[stages]]
name = "dense"
kind = "train"
epochs = 1
[[stages]]
name = "pruned"
kind = "prune"
sparsity = 0.5
rules = [["^conv3/", 0.5]]
epochs = 1
"""


def test_the_command_refuses_a_rule_that_matches_nothing_without_loading_jax(tmp_path):
    """What keeps `jaxcompress run bad.toml` under a second: the check never imports JAX."""
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RULE)
    code = ("import sys\nfrom jaxcompress import cli\n"
            f"rc = cli.main(['run', {str(path)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
            "import json; print(json.dumps([rc, sorted(m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'optax'))]))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    rc, loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert rc == 2 and loaded == []
    assert "bad.toml:14: stages[1].rules: rule 0 '^conv3/'" in done.stderr
    assert "the kernels are ['conv1/kernel', 'conv2/kernel', 'fc1/kernel', 'head/kernel']" in done.stderr
