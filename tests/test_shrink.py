"""Structural shrink: the smaller dense model computes what the channel-masked model computes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress import fixed_masks, pruning
from jaxcompress.export import ChannelGroup, channel_groups, shrink, tied_channel_masks
from jaxcompress.models import CNN, MLP, LeNet5, ResNet
from jaxcompress.prune.structures import Channels

CHANNELS = Channels(axis=-1)


def randomize(tree, seed, low=0.5, high=1.5, signed=True):
    """Random values for BatchNorm parameters and statistics, so the test is not trivial."""
    leaves, treedef = jax.tree.flatten(tree)
    rng = np.random.default_rng(seed)
    out = [rng.uniform(low, high, np.shape(x)) * (rng.choice([-1, 1], np.shape(x)) if signed else 1) for x in leaves]
    return jax.tree.unflatten(treedef, [jnp.asarray(x, jnp.float32) for x in out])


def init(model, shape, seed=0):
    v = model.init(jax.random.key(seed), jnp.zeros(shape))
    params = dict(v["params"])
    state = {k: v[k] for k in v if k != "params"}
    if "batch_stats" in state:
        stats = state["batch_stats"]
        state = {"batch_stats": jax.tree.map(lambda m: m, stats)}
        state["batch_stats"] = jax.tree_util.tree_map_with_path(
            lambda p, x: randomize(x, 1, signed="mean" in jax.tree_util.keystr(p)), stats
        )
        # BatchNorm scale and offset get random values too.
        params = jax.tree_util.tree_map_with_path(
            lambda p, x: randomize(x, 2) if "bn" in jax.tree_util.keystr(p) else x, params
        )
    return params, state


def outputs(model, params, state, x):
    return model.apply({"params": params, **state}, x, train=False)


def test_mlp_channel_pruning_folds_kept_biases_into_the_next_layer():
    model = MLP((32, 16))
    params, _ = init(model, (1, 20))
    t = pruning(0.5, structure=CHANNELS, rules=[("head", None), ("kernel", True)])
    s = t.init(params)
    small = shrink(model, params, t.describe(params, s))
    assert small.module.features == (16, 8)
    assert small.params["fc1"]["kernel"].shape == (20, 16) and small.params["fc2"]["kernel"].shape == (16, 8)
    assert small.params["head"]["kernel"].shape == (8, 10)
    x = jax.random.normal(jax.random.key(3), (7, 20))
    want = outputs(model, t.apply(params, s), {}, x)
    np.testing.assert_allclose(outputs(small.module, small.params, {}, x), want, rtol=1e-5, atol=1e-5)
    # The kept indices are the channels whose kernel columns the masks keep.
    m = np.asarray(t.describe(params, s)["fc1/kernel"].mask)
    np.testing.assert_array_equal(small.kept["fc1"], np.flatnonzero(m.any(0)))


def test_cnn_flatten_consumer_rows_follow_nhwc_order():
    model = CNN(channels=(8, 6), hidden=12)
    params, _ = init(model, (1, 8, 8, 1))
    masks = tied_channel_masks(params, channel_groups(model), {"conv2": 0.5})
    t = fixed_masks(masks, structure=CHANNELS)
    s = t.init(params)
    small = shrink(model, params, t.describe(params, s))
    assert small.module.channels == (8, 3) and small.module.hidden == 12
    assert small.params["fc1"]["kernel"].shape == (2 * 2 * 3, 12)
    kept = small.kept["conv2"]
    rows = np.asarray(params["fc1"]["kernel"]).reshape(4, 6, 12)[:, kept, :].reshape(-1, 12)
    np.testing.assert_array_equal(np.asarray(small.params["fc1"]["kernel"]), rows)
    x = jax.random.normal(jax.random.key(4), (5, 8, 8, 1))
    np.testing.assert_allclose(
        outputs(small.module, small.params, {}, x), outputs(model, t.apply(params, s), {}, x), rtol=1e-5, atol=1e-5
    )


def test_half_the_filters_of_a_batchnorm_cnn_removed_equals_the_masked_model():
    model = CNN(channels=(32, 64), hidden=128, batch_norm=True)
    params, state = init(model, (1, 12, 12, 1))
    masks = tied_channel_masks(params, channel_groups(model), {"conv1": 0.5, "conv2": 0.5})
    t = fixed_masks(masks, structure=CHANNELS)
    s = t.init(params)
    small = shrink(model, params, t.describe(params, s), model_state=state)
    assert small.module.channels == (16, 32) and small.module.hidden == 128
    assert small.model_state["batch_stats"]["bn2"]["mean"].shape == (32,)
    x = jax.random.normal(jax.random.key(5), (6, 12, 12, 1))
    want = outputs(model, t.apply(params, s), state, x)
    np.testing.assert_allclose(outputs(small.module, small.params, small.model_state, x), want, rtol=1e-4, atol=1e-4)


def test_lenet5_every_hidden_layer_shrinks():
    model = LeNet5()
    params, _ = init(model, (1, 28, 28, 1))
    masks = tied_channel_masks(params, channel_groups(model), 0.5)
    t = fixed_masks(masks, structure=CHANNELS)
    s = t.init(params)
    small = shrink(model, params, t.describe(params, s))
    assert small.module.channels == (3, 8) and small.module.features == (60, 42)
    x = jax.random.normal(jax.random.key(6), (4, 28, 28, 1))
    np.testing.assert_allclose(
        outputs(small.module, small.params, {}, x), outputs(model, t.apply(params, s), {}, x), rtol=1e-5, atol=1e-5
    )


def test_a_constant_into_a_convolution_is_refused_with_the_fix():
    model = LeNet5()
    params, _ = init(model, (1, 28, 28, 1))
    params["conv1"] = dict(params["conv1"], bias=jnp.full((6,), 0.1))  # a kept bias: removed filters emit 0.1
    t = pruning(0.5, structure=CHANNELS, rules=[("conv1", True), (".*", None)])
    s = t.init(params)
    with pytest.raises(ValueError, match="tied_channel_masks"):
        shrink(model, params, t.describe(params, s))


def test_resnet_residual_stream_channels_go_together():
    model = ResNet(blocks=(2, 1, 1), widths=(8, 16, 16))
    params, state = init(model, (1, 8, 8, 3))
    groups = channel_groups(model)
    stream = next(g for g in groups if g.name == "stage1")
    assert stream.producers == ("stem", "stage1_block0/conv2", "stage1_block1/conv2")
    assert stream.consumers == (
        "stage1_block0/conv1", "stage1_block1/conv1", "stage2_block0/conv1", "stage2_block0/proj"
    )
    masks = tied_channel_masks(params, groups, 0.5)
    t = fixed_masks(masks, structure=CHANNELS)
    s = t.init(params)
    small = shrink(model, params, t.describe(params, s), model_state=state)
    assert small.module.widths == (4, 8, 8) and small.module.inner == (4, 4, 8, 8)
    assert small.params["stage2_block0"]["proj"]["kernel"].shape == (1, 1, 4, 8)
    x = jax.random.normal(jax.random.key(7), (3, 8, 8, 3))
    want = outputs(model, t.apply(params, s), state, x)
    got = outputs(small.module, small.params, small.model_state, x)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    # Per-layer masks do not line up across the addition and keep BatchNorm offsets: refused.
    t2 = pruning(0.5, structure=CHANNELS, rules=[("head", None), ("kernel", True)])
    s2 = t2.init(params)
    with pytest.raises(ValueError, match="residual"):
        shrink(model, params, t2.describe(params, s2), model_state=state)


def test_bad_arguments_name_the_fix():
    model = MLP((4,))
    params, _ = init(model, (1, 3))
    with pytest.raises(TypeError, match="describe"):
        shrink(model, params, [1, 2])
    with pytest.raises(ValueError, match="not among"):
        tied_channel_masks(params, channel_groups(model), {"nope": 0.5})
    with pytest.raises(ValueError, match="producer"):
        tied_channel_masks(params, [ChannelGroup("g", ("missing",), ("head",))], 0.5)
    with pytest.raises(TypeError, match="groups="):
        channel_groups(object())
