"""Calibration (one device and sharded over 8), sequential one-shot compression, self-description."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.models import MLP, TransformerLM
from jaxcompress.oneshot import GPTQ, SparseGPT, Wanda, calibrate_layers, one_shot, sparsegpt
from jaxcompress.oneshot.calibration import call_order
from jaxcompress.prune.structures import NM
from jaxcompress.train import data_mesh, linen_apply_fn

BLOCKS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]


@pytest.fixture(scope="module")
def lm():
    model = TransformerLM(vocab_size=64, max_len=16, dim=32, depth=1, heads=2, mlp_ratio=1)
    rng = np.random.default_rng(0)
    batches = [{"tokens": rng.integers(0, 64, size=(16, 16)).astype(np.int32)} for _ in range(2)]
    params = model.init(jax.random.key(0), jnp.asarray(batches[0]["tokens"]))["params"]
    return linen_apply_fn(model, inputs="tokens"), params, batches


def test_sharded_calibration_equals_one_device(lm):
    apply_fn, params, batches = lm
    assert jax.device_count() == 8
    one = calibrate_layers(apply_fn, params, {}, batches, rules=BLOCKS)
    eight = calibrate_layers(apply_fn, params, {}, batches, rules=BLOCKS, mesh=data_mesh(8))
    assert sorted(one) == sorted(eight) == ["block_0/attn/key", "block_0/attn/out", "block_0/attn/query",
                                            "block_0/attn/value", "block_0/mlp/fc1", "block_0/mlp/fc2"]
    for name in one:
        a, b = one[name], eight[name]
        assert int(a.count) == int(b.count) == 2 * 16 * 16
        for f in ("sum_sq", "sum_abs", "max_abs", "xtx"):
            np.testing.assert_allclose(np.asarray(getattr(b, f)), np.asarray(getattr(a, f)), rtol=2e-5, atol=1e-4)
    # The statistics are those of the inputs: X^T X of the first block's query input, by hand.
    x = np.concatenate([np.asarray(_ln1_input(apply_fn, params, b)) for b in batches]).reshape(-1, 32)
    np.testing.assert_allclose(np.asarray(one["block_0/attn/query"].xtx), x.T @ x, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(np.asarray(one["block_0/attn/query"].max_abs), np.abs(x).max(0), rtol=1e-6)


def _ln1_input(apply_fn, params, batch):
    import flax.linen as nn

    seen = {}

    def grab(next_fun, args, kwargs, context):
        if "/".join(context.module.path) == "block_0/attn/query" and context.method_name == "__call__":
            seen["x"] = args[0]
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(grab):
        apply_fn(params, {}, batch, train=False)
    return seen["x"]


def test_call_order_groups_layers_that_share_an_input(lm):
    apply_fn, params, batches = lm
    names = ["head"] + [f"block_0/{n}" for n in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2")]
    assert call_order(apply_fn, params, {}, batches[0], names) == [
        ["block_0/attn/query", "block_0/attn/key", "block_0/attn/value"], ["block_0/attn/out"],
        ["block_0/mlp/fc1"], ["block_0/mlp/fc2"], ["head"]]


def test_sequential_calibrates_on_the_compressed_earlier_layers():
    model = MLP(features=(16,))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(128, 8)), jnp.float32)
    params = model.init(jax.random.key(1), x)["params"]
    apply_fn, batches = linen_apply_fn(model), [{"image": x[:64]}, {"image": x[64:]}]
    r = one_shot(SparseGPT(0.5), apply_fn, params, {}, batches)
    # By hand: fc1 from the float model, then head calibrated with fc1 already pruned.
    fc1 = sparsegpt(params["fc1"]["kernel"], calibrate_layers(apply_fn, params, {}, batches)["fc1"].xtx, 0.5)
    p1 = {**params, "fc1": {**params["fc1"], "kernel": fc1.kernel}}
    head = sparsegpt(params["head"]["kernel"], calibrate_layers(apply_fn, p1, {}, batches, layers=["head"])["head"].xtx, 0.5)
    np.testing.assert_allclose(np.asarray(r.params["fc1"]["kernel"]), np.asarray(fc1.kernel), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(r.params["head"]["kernel"]), np.asarray(head.kernel), rtol=1e-5, atol=1e-5)
    flat = one_shot(SparseGPT(0.5), apply_fn, params, {}, batches, sequential=False)
    assert not np.allclose(np.asarray(flat.params["head"]["kernel"]), np.asarray(head.kernel))
    assert r.report["_total"]["groups"] == 2 and flat.report["_total"]["groups"] == 1


def test_one_shot_results_describe_themselves(lm):
    apply_fn, params, batches = lm
    r = one_shot(SparseGPT(structure=NM(2, 4), bits=4, group_size=16, blocksize=16), apply_fn, params, {}, batches,
                 rules=BLOCKS, sequential=r"^block_\d+")
    spec = r.transform.describe(r.params, r.state)
    assert sorted(spec) == sorted(f"block_0/{n}/kernel" for n in ("attn/query", "attn/key", "attn/value", "attn/out",
                                                                    "mlp/fc1", "mlp/fc2"))
    s = spec["block_0/mlp/fc2/kernel"]
    assert (s.structure, s.bits, s.scheme, s.group_size, s.group_axis) == (NM(2, 4), 4, "affine", 16, -2)
    assert s.scale.shape == (32 // 16, 32) and s.zero_point.dtype == jnp.int32 and s.mask.shape == (32, 32)
    assert r.report["_total"]["groups"] == 1
    # The view is the result: applying the transform changes nothing; pruned weights are 0.
    view = r.transform.apply(r.params, r.state)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), view, r.params)
    k = np.asarray(r.params["block_0"]["mlp"]["fc2"]["kernel"])
    assert np.all(k[~np.asarray(s.mask)] == 0) and np.mean(k == 0) >= 0.5
    np.testing.assert_array_equal(np.asarray(r.params["head"]["kernel"]), np.asarray(params["head"]["kernel"]))

    q = one_shot(GPTQ(3, group_size=16, blocksize=16), apply_fn, params, {}, batches, rules=BLOCKS, sequential=False)
    spec = q.transform.describe(q.params, q.state)["block_0/attn/query/kernel"]
    assert (spec.bits, spec.mask, spec.group_size) == (3, None, 16)
    assert q.report["block_0/attn/query"]["tokens"] == 512 and q.report["block_0/attn/query"]["loss"] > 0


def test_sharded_one_shot_equals_one_device(lm):
    apply_fn, params, batches = lm
    method = GPTQ(3, group_size=16, blocksize=16)
    a = one_shot(method, apply_fn, params, {}, batches, rules=BLOCKS, sequential=False)
    b = one_shot(method, apply_fn, params, {}, batches, rules=BLOCKS, sequential=False, mesh=data_mesh(8))
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)


def test_one_shot_refuses_bad_input(lm):
    apply_fn, params, batches = lm
    with pytest.raises(TypeError, match="method must be"):
        one_shot("sparsegpt", apply_fn, params, {}, batches)
    with pytest.raises(ValueError, match="batches is empty"):
        one_shot(Wanda(), apply_fn, params, {}, [])
    with pytest.raises(ValueError, match="rules take True"):
        one_shot(Wanda(), apply_fn, params, {}, batches, rules=[("fc1", 0.3)])
    with pytest.raises(ValueError, match="sparsity"):
        Wanda(1.2)
