"""Compressed inference: integer kernels against NumPy, BatchNorm folding, plans, sparse paths."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress import infer
from jaxcompress.models import CNN, MLP
from jaxcompress.core.transform import intercepted
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.train import split_variables


def _np_conv_same(x, w):
    """int64 NumPy reference of a stride-1 'SAME' NHWC x HWIO convolution with zero padding."""
    kh, kw = w.shape[:2]
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (ph, kh - 1 - ph), (pw, kw - 1 - pw), (0, 0)))
    out = np.zeros(x.shape[:3] + (w.shape[-1],), np.result_type(x, w))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("nhwc,co->nhwo", xp[:, i:i + x.shape[1], j:j + x.shape[2]], w[i, j])
    return out


def test_int8_dot_and_conv_equal_numpy_int32():
    rng = np.random.default_rng(0)
    a = rng.integers(-128, 128, size=(5, 300), dtype=np.int8)
    b = rng.integers(-128, 128, size=(300, 7), dtype=np.int8)
    got = infer.int8_dot(jnp.asarray(a), jnp.asarray(b))
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), a.astype(np.int64) @ b.astype(np.int64))
    x = rng.integers(-128, 128, size=(2, 6, 5, 4), dtype=np.int8)
    w = rng.integers(-128, 128, size=(3, 3, 4, 8), dtype=np.int8)
    pads = jax.lax.padtype_to_pads((6, 5), (3, 3), (1, 1), "SAME")
    got = infer.int8_conv(jnp.asarray(x), jnp.asarray(w), (1, 1), pads)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(got), _np_conv_same(x.astype(np.int64), w.astype(np.int64)))


def test_requantize_matches_float64_derivation():
    rng = np.random.default_rng(1)
    acc = rng.integers(-2**20, 2**20, size=4096).astype(np.int32)
    m = np.float32(3.1e-4)
    want = np.clip(np.round(acc.astype(np.float64) * np.float64(m)) + 5, -128, 127)
    got = np.asarray(infer.requantize(jnp.asarray(acc), m, 5))
    assert got.dtype == np.int8
    # float32 products equal float64's except within rounding of a half-integer: none here.
    np.testing.assert_array_equal(got, want)


def test_int4_pack_roundtrip():
    q = jnp.arange(-8, 8).reshape(4, 4)[:, :3]
    assert infer.pack_int4(q).shape == (6,)
    np.testing.assert_array_equal(infer.unpack_int4(infer.pack_int4(q), q.shape), q)


def test_folded_batch_norm_equals_unfolded():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(10, 4)).astype(np.float32)
    s, b = rng.uniform(0.5, 2, 4), rng.normal(size=4)
    g, beta, mean, var = rng.normal(size=4), rng.normal(size=4), rng.normal(size=4), rng.uniform(0.1, 2, 4)
    ref = ((y * s + b) - mean) / np.sqrt(var + 1e-5) * g + beta
    fs, fb = infer.fold_batch_norm(jnp.asarray(s, jnp.float32), jnp.asarray(b, jnp.float32), g, beta, mean, var, 1e-5)
    np.testing.assert_allclose(y * np.asarray(fs) + np.asarray(fb), ref, rtol=1e-5, atol=1e-5)


def _fake_quant_model(model, x, bits=8, model_state=None):
    params, ms = split_variables(model.init(jax.random.key(1), x))
    if model_state is not None:
        ms = model_state(ms)
    t = jc.weight_quantization(bits, activation_bits=8, activation_range="calibrated")
    s = t.init(params)
    view = t.apply(params, s)
    apply_fn = jc.linen_apply_fn(model)
    s = calibrate_activations(t, s, apply_fn, view, ms, [{"image": x}])
    desc = t.describe(params, s)

    def run(v, m, b):
        with intercepted(t, s, train=False):
            return apply_fn(v, m, b, train=False)[0]

    ref = jax.jit(run)(view, ms, {"image": x})
    return infer.prepare(model, view, desc, x, model_state=ms, ranges=s.ranges), ref


def test_folded_model_and_every_path_equal_fake_quant():
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    stats = lambda ms: {"batch_stats": jax.tree.map(  # noqa: E731
        lambda a: a + jax.random.uniform(jax.random.key(3), a.shape), ms["batch_stats"])}
    prepared, ref = _fake_quant_model(CNN(channels=(4, 8), hidden=8, batch_norm=True), x, model_state=stats)
    assert prepared.layers["conv1"].norm == "bn1" and prepared.layers["fc1"].norm is None
    for path in ("float", "int8"):
        out = infer.inference_fn(prepared, infer.uniform_plan(prepared, path))(x)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))


@pytest.mark.parametrize("strides, dilation, padding, channels", [(1, 1, "SAME", 4), (2, 1, "SAME", 4), (1, 2, "VALID", 4),
                                                                 (2, 1, ((2, 0), (1, 3)), 4), (2, 2, "SAME", 1)])
def test_patch_paths_equal_convolution_paths(strides, dilation, padding, channels):
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            x = nn.Conv(6, (3, 2), strides=strides, kernel_dilation=dilation, padding=padding, name="conv")(x)
            return nn.Dense(3, name="head")(x.reshape(x.shape[0], -1))

    x = jax.random.uniform(jax.random.key(0), (3, 11, 9, channels))
    prepared, ref = _fake_quant_model(Net(), x)
    assert {"patches", "shifts", "widened", "int8_patches"} <= set(prepared.layers["conv"].candidates)
    assert ("padded_in" in prepared.layers["conv"].candidates) == (channels % 4 != 0)
    assert not {"patches", "widened", "padded_in"} & set(prepared.layers["head"].candidates)
    tol = dict(rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(ref))))
    conv_paths = ("patches", "shifts", "widened") + (("padded_in",) if channels % 4 else ())
    for path in ("float", "int8", "int8_patches") + conv_paths:
        out = infer.inference_fn(prepared, infer.uniform_plan(prepared, path))(x)
        np.testing.assert_allclose(out, ref, **tol)
    layer, xin = prepared.layers["conv"], prepared.inputs["conv"]
    a = prepared.arrays["conv"]
    # integer accumulation: the two int8 paths agree bit for bit, as do the two float paths to rounding
    np.testing.assert_array_equal(infer.layers.run_layer(layer, "int8", a["int8"], xin),
                                  infer.layers.run_layer(layer, "int8_patches", a["int8_patches"], xin))
    for path in conv_paths:
        np.testing.assert_allclose(infer.layers.run_layer(layer, path, a[path], xin),
                                   infer.layers.run_layer(layer, "float", a["float"], xin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 4])
def test_patches_and_shifted_sum_equal_numpy_convolution(channels):
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 6, 5, channels)).astype(np.float32)
    w = rng.normal(size=(3, 3, channels, 8)).astype(np.float32)
    layer = infer.layers.Layer("c", "conv", w.shape, strides=(1, 1), padding=((1, 1), (1, 1)), kernel_dilation=(1, 1))
    xp = jnp.pad(jnp.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
    want = _np_conv_same(x.astype(np.float64), w.astype(np.float64))
    got = np.asarray(infer.layers.patches(layer, xp)).astype(np.float64) @ w.reshape(-1, 8).astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(infer.layers.shifted_sum(layer, xp, jnp.asarray(w)), want, rtol=1e-4, atol=1e-4)


def test_widened_path_is_a_convolution_past_16_channels_cut_back():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(2, 6, 5, 1)).astype(np.float32)
    w = rng.normal(size=(3, 3, 1, 16)).astype(np.float32)
    layer = infer.layers.Layer("c", "conv", w.shape, strides=(1, 1), padding=((1, 1), (1, 1)), kernel_dilation=(1, 1),
                               candidates=("float", "widened"))
    a = infer.layers.layer_arrays(layer, w, np.zeros(16, np.float32), None)["widened"]
    assert a["kernel"].shape == (3, 3, 1, infer.layers.WIDENED_CHANNELS) and not np.any(a["kernel"][..., 16:])
    run = jax.jit(lambda x: infer.layers.run_layer(layer, "widened", a, x))
    np.testing.assert_allclose(run(x), _np_conv_same(x.astype(np.float64), w.astype(np.float64)), rtol=1e-4, atol=1e-4)
    assert "f32[2,6,5,17]" in run.lower(x).as_text(dialect="hlo")  # the product XLA runs has 17 channels
    # offered only to convolutions of at most 16 input and output channels
    prepared, _ = _fake_quant_model(CNN(channels=(16, 17), hidden=8), jnp.asarray(x[..., :1].repeat(2, 0)))
    assert "widened" in prepared.layers["conv1"].candidates and "widened" not in prepared.layers["conv2"].candidates


@pytest.mark.parametrize("channels", [1, 3, 6])
def test_padded_in_path_appends_zero_input_channels_to_a_multiple_of_4(channels):
    rng = np.random.default_rng(6)
    x = rng.normal(size=(2, 6, 5, channels)).astype(np.float32)
    w = rng.normal(size=(3, 3, channels, 5)).astype(np.float32)
    layer = infer.layers.Layer("c", "conv", w.shape, strides=(1, 1), padding=((1, 1), (1, 1)), kernel_dilation=(1, 1),
                               candidates=("float", "padded_in"))
    a = infer.layers.layer_arrays(layer, w, np.zeros(5, np.float32), None)["padded_in"]
    padded = 4 * -(-channels // 4)
    assert a["kernel"].shape == (3, 3, padded, 5) and not np.any(a["kernel"][:, :, channels:])
    run = jax.jit(lambda x: infer.layers.run_layer(layer, "padded_in", a, x))
    np.testing.assert_allclose(run(x), _np_conv_same(x.astype(np.float64), w.astype(np.float64)), rtol=1e-4, atol=1e-4)
    assert f"f32[2,6,5,{padded}]" in run.lower(x).as_text(dialect="hlo")  # the product XLA runs sees the padded input
    # offered only where the input channels are not already a multiple of 4
    prepared, _ = _fake_quant_model(CNN(channels=(4, 8), hidden=8), jnp.asarray(x))
    assert "padded_in" in prepared.layers["conv1"].candidates and "padded_in" not in prepared.layers["conv2"].candidates


def test_weight_int4_path_equals_view():
    x = jax.random.uniform(jax.random.key(0), (4, 10, 10, 1))
    prepared, ref = _fake_quant_model(CNN(channels=(4, 8), hidden=8), x, bits=4)
    assert all("weight_int4" in l.candidates for l in prepared.layers.values())
    out = infer.inference_fn(prepared, infer.uniform_plan(prepared, "weight_int4"))(x)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_chosen_plan_matches_fake_quant_argmax():
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 1))
    prepared, ref = _fake_quant_model(CNN(channels=(4, 8), hidden=8), x)
    plan = infer.choose_paths(prepared, blocks=2, calls=1, warmup=1)
    assert set(plan.paths) == set(prepared.layers)
    assert all(p in prepared.layers[n].candidates for n, p in plan.paths.items())
    assert "baseline_control" in plan.timings["conv1"]["ratios"]
    out = infer.inference_fn(prepared, plan)(x)
    np.testing.assert_array_equal(np.argmax(out, -1), np.argmax(ref, -1))


def _rigged_compare(per_layer, whole):
    """A stand-in for benchmark.compare: per-layer medians from ``per_layer[path]``, whole plans from ``whole``
    (a whole plan it does not name runs at 1.1, slower than all-float)."""
    def compare(programs, *, baseline, **kwargs):
        med = {k: whole.get(k, 1.1) for k in programs} if "per_layer" in programs else {k: per_layer[k] for k in programs}
        ratios = {k: {"ratio": med[k] / med[baseline], "low": 0.98 * med[k] / med[baseline],
                      "high": 1.02 * med[k] / med[baseline]} for k in programs if k != baseline}
        ratios["baseline_control"] = {"ratio": 1.0, "low": 0.98, "high": 1.02}
        return {"median_s": med, "ratios": ratios}
    return compare


@pytest.mark.parametrize("whole, chosen", [
    ({"float": 1.0, "per_layer": 1.5, "only_conv1": 1.2, "only_conv2": 1.1, "only_fc1": 1.3, "only_head": 1.4}, "float"),
    ({"float": 1.0, "per_layer": 0.9, "only_conv1": 0.7, "only_conv2": 1.1, "only_fc1": 1.0, "only_head": 1.0}, "only_conv1"),
    ({"float": 1.0, "per_layer": 0.6, "only_conv1": 0.8, "only_conv2": 0.9, "only_fc1": 0.9, "only_head": 0.9}, "per_layer"),
])
def test_whole_model_check_overrules_layer_timings(monkeypatch, whole, chosen):
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    prepared, _ = _fake_quant_model(CNN(channels=(4, 8), hidden=8), x)
    monkeypatch.setattr("jaxcompress.infer.plan.compare",
                        _rigged_compare({"float": 1.0, "patches": 1.0, "shifts": 1.0, "widened": 1.0,
                                         "padded_in": 1.0, "int8": 0.5,
                                         "int8_patches": 0.8, "weight_int8": 0.9, "weight_int4": 0.9}, whole))
    plan = infer.choose_paths(prepared)
    layers = list(prepared.layers)
    assert plan.whole["candidates"]["per_layer"] == {n: "int8" for n in layers}
    # each layer alone on each path faster than float32 there: int8 (its fastest), then the others
    assert plan.whole["candidates"]["only_conv1:int8_patches"] == {n: "int8_patches" if n == "conv1" else "float"
                                                                   for n in layers}
    assert sorted(k for k in plan.whole["candidates"] if k.startswith("only_conv1")) == [
        "only_conv1", "only_conv1:int8_patches", "only_conv1:weight_int8"]
    assert plan.whole["chosen"] == chosen
    want = {"float": {n: "float" for n in layers}, "per_layer": {n: "int8" for n in layers}}.get(
        chosen, {n: "int8" if chosen == f"only_{n}" else "float" for n in layers})
    assert plan.paths == want


def test_a_runner_up_path_wins_when_it_runs_faster_in_the_whole_model(monkeypatch):
    # conv1 alone: shifts is the fastest, widened second; in the whole program widened is faster
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    prepared, _ = _fake_quant_model(CNN(channels=(4, 8), hidden=8), x)
    per_layer = {"float": 1.0, "patches": 1.1, "shifts": 0.2, "widened": 0.5,
                 "padded_in": 0.6, "int8": 1.5, "int8_patches": 1.3,
                 "weight_int8": 1.2, "weight_int4": 1.2}
    monkeypatch.setattr("jaxcompress.infer.plan.compare", _rigged_compare(per_layer, {
        "float": 1.0, "per_layer": 1.3, "only_conv1:widened": 0.7}))
    plan = infer.choose_paths(prepared)
    assert plan.whole["chosen"] == "only_conv1:widened"
    assert plan.paths == {n: "widened" if n == "conv1" else "float" for n in prepared.layers}


def test_no_whole_model_check_when_every_layer_stays_float(monkeypatch):
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    prepared, _ = _fake_quant_model(CNN(channels=(4, 8), hidden=8), x)
    monkeypatch.setattr("jaxcompress.infer.plan.compare",
                        _rigged_compare({"float": 1.0, "patches": 1.1, "shifts": 1.1, "widened": 1.1,
                                         "padded_in": 1.1, "int8": 1.5, "int8_patches": 1.3,
                                         "weight_int8": 1.2, "weight_int4": 1.2}, {}))
    plan = infer.choose_paths(prepared)
    assert plan.whole is None and set(plan.paths.values()) == {"float"}


@pytest.mark.parametrize("symmetric", [False, True])
def test_input_grid_constants_give_the_fake_quantizers_values_bit_for_bit(symmetric):
    from jaxcompress.infer.layers import _input
    from jaxcompress.quant.affine import affine_qparams, fake_quant_affine

    x = jnp.concatenate([jax.random.normal(jax.random.key(0), (4096,)) * 3, jnp.array([-1e30, 1e30, 0.0, -0.0])])
    s, z, qmin, qmax = affine_qparams(jnp.float32(-1.7), jnp.float32(2.3), 8, symmetric=symmetric)
    layer = infer.Layer("l", "dense", (1, 1), act=(qmin, qmax), act_grid=(float(s), float(z)))
    want = fake_quant_affine(x, s, z, qmin, qmax)
    for got in (_input(layer, x), jax.jit(lambda v: _input(layer, v))(x)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("bits", [None, 4])
def test_all_float_plan_is_the_models_own_program(bits):
    """With float inputs and nothing folded, the all-float plan runs the unchanged model on the view."""
    model = CNN(channels=(4, 8), hidden=8)
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 1))
    params = model.init(jax.random.key(1), x)["params"]
    t = jc.pruning(0.5) if bits is None else jc.weight_quantization(bits)
    s = t.init(params)
    view = t.apply(params, s)
    prepared = infer.prepare(model, view, t.describe(params, s), x)
    apply, weights = infer.inference_program(prepared, infer.float_plan(prepared))
    own = jax.make_jaxpr(lambda p, v: model.apply({"params": p}, v))(view, x)
    assert str(jax.make_jaxpr(apply)(weights, x)) == str(own)
    np.testing.assert_array_equal(jax.jit(apply)(weights, x), model.apply({"params": view}, x))
    # a layer off float32 goes back to the intercepted program, with the same outputs up to rounding
    one = infer.Plan({**infer.float_plan(prepared).paths, "conv1": "patches"}, {})
    assert str(jax.make_jaxpr(infer.inference_program(prepared, one)[0])(*infer.inference_program(prepared, one)[1:],
                                                                          x)) != str(own)
    np.testing.assert_allclose(infer.inference_fn(prepared, one)(x), model.apply({"params": view}, x), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.parametrize("sparsity", [0.5, 0.95])
def test_sparse_paths_equal_dense(sparsity):
    model = MLP((64,))
    x = jax.random.normal(jax.random.key(0), (5, 40))
    params = model.init(jax.random.key(1), x)["params"]
    t = jc.pruning(sparsity, rules=[("head", None), ("kernel", True)])
    s = t.init(params)
    view = t.apply(params, s)
    prepared = infer.prepare(model, view, t.describe(params, s), x)
    assert prepared.layers["fc1"].candidates == ("float", "bcoo", "bcsr", "gather")
    ref = model.apply({"params": view}, x)
    for path in ("bcoo", "bcsr", "gather"):
        np.testing.assert_allclose(infer.inference_fn(prepared, infer.uniform_plan(prepared, path))(x), ref,
                                   rtol=1e-5, atol=1e-5)


def test_bad_inputs_name_the_argument():
    model = MLP((4,))
    x = jnp.ones((2, 3))
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(TypeError, match="description"):
        infer.prepare(model, params, {"fc1/kernel": 8}, x)
    prepared = infer.prepare(model, params, {}, x)
    with pytest.raises(ValueError, match="path must be"):
        infer.uniform_plan(prepared, "int3")
    with pytest.raises(ValueError, match="no path for layers"):
        infer.inference_fn(prepared, infer.Plan({}, {}))
