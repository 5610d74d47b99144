"""Invariants as property tests (hypothesis, derandomized, jitted), the no-``assert`` rule, and
determinism of the demo."""
import functools
import os
import re
from pathlib import Path

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import jaxcompress as jc
from jaxcompress.distill.losses import TEMPERATURE_RANGE
from jaxcompress.export import load, save
from jaxcompress.prune.structures import Channels, Unstructured
from jaxcompress.quant.affine import fake_quant, tensor_qparams

SETTINGS = settings(max_examples=6, deadline=None, derandomize=True, database=None)
TEMPERATURES = (0.1, 1.0, 4.0, 100.0, 1e4, TEMPERATURE_RANGE[1])
shapes = st.tuples(st.integers(2, 6), st.integers(2, 6)).map(lambda s: (s[0] * 2, s[1] * 2))


def _weights(shape, seed):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@functools.lru_cache(maxsize=None)
def _pruned_init(sparsity, structure):
    return jax.jit(jc.pruning(sparsity, structure=structure).init)


@SETTINGS
@given(shape=shapes, sparsity=st.sampled_from([0.0, 0.3, 0.5, 0.75]), seed=st.integers(0, 2**16),
       channels=st.booleans())
def test_requested_sparsity_is_exact(shape, sparsity, seed, channels):
    structure = Channels(axis=-1) if channels else Unstructured()
    mask = np.asarray(_pruned_init(sparsity, structure)({"k": _weights(shape, seed)}).masks["k"])
    groups = shape[-1] if channels else mask.size
    removed = (~mask).sum() // (shape[0] if channels else 1)
    assert removed == round(sparsity * groups)


@functools.lru_cache(maxsize=None)
def _quant(bits, symmetric, channel_axis):
    return jax.jit(lambda x: fake_quant(x, bits, symmetric=symmetric, channel_axis=channel_axis))


@SETTINGS
@given(shape=shapes, bits=st.sampled_from([2, 4, 8]), symmetric=st.booleans(), seed=st.integers(0, 2**16))
def test_quantized_values_on_the_grid(shape, bits, symmetric, seed):
    x = _weights(shape, seed)
    out = np.asarray(_quant(bits, symmetric, -1)(x))
    qp = tensor_qparams(x, bits, symmetric=symmetric, channel_axis=-1)
    q = out / np.asarray(qp.scale) + np.asarray(qp.zero_point)
    np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    assert q.min() >= qp.quant_min - 1e-3 and q.max() <= qp.quant_max + 1e-3
    for c in range(shape[-1]):
        assert len(np.unique(out[:, c])) <= 2**bits


@pytest.mark.parametrize("kind", [4, "binary", "ternary", "affine", "lsq", "sharing"])
def test_pruned_zeros_stay_zero_through_every_quantizer(kind):
    p = {"k": _weights((8, 4), 0)}
    masks = {"k": jnp.asarray(np.random.default_rng(1).random((8, 4)) > 0.5)}
    quantizer = {"affine": jc.weight_quantization(4, symmetric=False), "lsq": jc.lsq_quantization(4),
                 "sharing": jc.weight_sharing(4)}.get(kind) or jc.weight_quantization(kind)
    t = jc.chain(jc.fixed_masks(masks), quantizer)
    view = np.asarray(t.apply(p, t.init(p))["k"])
    assert np.all(view[~np.asarray(masks["k"])] == 0)


@functools.lru_cache(maxsize=None)
def _losses(temperature):
    def both(s, t, y):
        kd = lambda a, b: jc.kd_loss(a, b, temperature=temperature)  # noqa: E731
        dkd = lambda a, b: jc.dkd_loss(a, b, labels=y, temperature=temperature, ce_weight=0.0)  # noqa: E731
        return kd(s, t), dkd(s, t), kd(s, s), dkd(s, s)

    return jax.jit(both)


@SETTINGS
@given(scale=st.sampled_from([1e-3, 1.0, 30.0]), seed=st.integers(0, 2**16))
def test_kd_losses_nonnegative_and_zero_for_equal_logits(scale, seed):
    rng = np.random.default_rng(seed)
    s = jnp.asarray(rng.normal(size=(4, 10)).astype(np.float32) * scale)
    t = jnp.asarray(rng.normal(size=(4, 10)).astype(np.float32) * scale)
    y = jnp.asarray(rng.integers(0, 10, size=4).astype(np.int32))
    for temperature in TEMPERATURES:
        kd, dkd, kd_same, dkd_same = (np.asarray(v) for v in _losses(temperature)(s, t, y))
        assert np.all(kd >= 0) and np.all(dkd >= 0), temperature
        np.testing.assert_allclose(kd_same, 0.0, atol=1e-6)
        np.testing.assert_allclose(dkd_same, 0.0, atol=1e-6)


@SETTINGS
@given(bits=st.sampled_from([2, 4, 8]), sparsity=st.sampled_from([0.0, 0.5]), seed=st.integers(0, 2**16))
def test_export_round_trip_is_exact(tmp_path_factory, bits, sparsity, seed):
    p = {"fc": {"kernel": _weights((8, 4), seed), "bias": _weights((4,), seed + 1)}}
    t = jc.chain(jc.pruning(sparsity), jc.weight_quantization(bits))
    s = t.init(p)
    view = t.apply(p, s)
    path = tmp_path_factory.mktemp("export") / "m.npz"
    save(path, view, t.describe(p, s))
    loaded, _ = load(path, like=view)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(view)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_no_assert_for_user_input_in_the_library():
    root = Path(__file__).resolve().parents[1] / "jaxcompress"
    found = [f"{f.relative_to(root)}:{i}" for f in sorted(root.rglob("*.py"))
             for i, line in enumerate(f.read_text().splitlines(), 1) if re.match(r"^\s*assert ", line)]
    assert not found, f"assert used in the library (vanishes under -O; raise ValueError/TypeError): {found}"


def _numbers(x, path=""):
    """Every number of a report with its path, except wall-clock times."""
    if isinstance(x, dict):
        return {k: v for key, val in x.items() if "seconds" not in key and key != "artifact"
                for k, v in _numbers(val, f"{path}/{key}").items()}
    if isinstance(x, (list, tuple)):
        return {k: v for i, val in enumerate(x) for k, v in _numbers(val, f"{path}/{i}").items()}
    return {path: x} if isinstance(x, (int, float)) and not isinstance(x, bool) else {}


@pytest.mark.slow  # about 35 s: two runs of four stages
@pytest.mark.skipif(os.environ.get("JAX_PLATFORMS", "cpu") not in ("", "cpu"), reason="bitwise determinism on CPU")
def test_demo_twice_with_the_same_seed_gives_identical_numbers(monkeypatch):
    from jaxcompress.recipes.demo import DemoConfig, run_demo

    config = DemoConfig(dataset="digits", teacher_epochs=0.2, student_epochs=0.2, prune_epochs=0.2, qat_epochs=0.1,
                        train_subset=256, test_subset=128, progress=False, seed=3)
    first, second = run_demo(config, log=lambda m: None), run_demo(config, log=lambda m: None)
    a, b = _numbers(first), _numbers(second)
    assert a and a.keys() == b.keys()
    assert {k: v for k, v in a.items() if v != b[k]} == {}
