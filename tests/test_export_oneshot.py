"""One-shot results (SparseGPT, GPTQ) through export: saved, loaded bit for bit, at the size they imply."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core.paths import path_name
from jaxcompress.export import load, save, size_report
from jaxcompress.models import MLP
from jaxcompress.oneshot import GPTQ, SparseGPT, one_shot
from jaxcompress.prune.structures import NM
from jaxcompress.train import linen_apply_fn

# Bits a kernel weight may take in the file, against its 32 float bits (the kernels shrink by at
# least 32 / BITS_PER_WEIGHT, e.g. 5.12x for 4-bit g16; every stream is a whole number of bytes
# here): values, positions, then per group of 16 inputs one float32 scale and one 4-bit zero
# point (asymmetric grids, the methods' default).
BITS_PER_WEIGHT = {
    "sparsegpt50": 0.5 * 32 + 1,  # half the floats, a 1-bit mask (the bitmask layout)
    "sparsegpt24": 0.5 * 32 + 0.5 * 2,  # half the floats, a 2-bit slot each (or a 1-bit mask)
    "gptq4g16": 4 + 32 / 16 + 4 / 16,
    "sparsegpt24_4bit_g16": 0.5 * 4 + 0.5 * 2 + 32 / 16 + 4 / 16,
    "gptq4_symmetric": 4 + 32 / 64,  # one float32 scale per output channel of 64 inputs, no zero points
}
METHODS = {
    "sparsegpt50": SparseGPT(0.5),
    "sparsegpt24": SparseGPT(0.5, structure=NM(2, 4)),
    "gptq4g16": GPTQ(4, group_size=16),
    "sparsegpt24_4bit_g16": SparseGPT(0.5, structure=NM(2, 4), bits=4, group_size=16),
    # a symmetric grid: under jit XLA folds its zero point 0 away, so weights that round to -0 stay
    # -0.0 in the view; the file keeps them (one flag bit per zero weight)
    "gptq4_symmetric": GPTQ(4, symmetric=True),
}


@pytest.fixture(scope="module")
def mlp():
    model = MLP(features=(64,), num_classes=64)  # two (64, 64) kernels: one-shot compiles once
    rng = np.random.default_rng(0)
    batches = [{"image": rng.normal(size=(64, 64)).astype(np.float32)} for _ in range(2)]
    params = model.init(jax.random.key(0), jnp.asarray(batches[0]["image"]))["params"]
    return model, params, batches


@pytest.mark.parametrize("case", sorted(METHODS))
def test_one_shot_result_saves_and_loads_bit_identically(case, mlp, tmp_path):
    model, params, batches = mlp
    r = one_shot(METHODS[case], linen_apply_fn(model), params, {}, batches)
    desc = r.transform.describe(r.params, r.state)
    assert sorted(desc) == ["fc1/kernel", "head/kernel"]
    report = save(tmp_path / "m.npz", r.params, desc)
    loaded, info = load(tmp_path / "m.npz", like=r.params)
    for (path, a), b in zip(jax.tree.leaves_with_path(r.params), jax.tree.leaves(loaded)):
        a = np.asarray(a)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), path
    x = jnp.asarray(batches[0]["image"])
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    np.testing.assert_array_equal(np.asarray(apply(loaded, x)), np.asarray(apply(r.params, x)))

    tensors = {t.path: t for t in report.tensors}
    views = {path_name(p): np.asarray(w) for p, w in jax.tree.leaves_with_path(r.params)}
    bound = kernels = 0
    for name, spec in desc.items():
        t, record = tensors[name], info.tensors[name]
        size = int(np.prod(record["shape"]))
        limit = BITS_PER_WEIGHT[case] * size / 8
        view = views[name]
        negative = np.sum(np.signbit(view) & (view == 0))
        assert ("negative_zeros" in record["streams"]) == (negative > 0) == (case == "gptq4_symmetric")
        if negative:
            limit += math.ceil(np.sum(view == 0) / 8)
        assert t.nbytes <= limit, (name, t.layout, t.nbytes, limit)
        if spec.mask is not None:  # half of every kernel pruned: at most half its values stored
            assert t.layout in ("nm", "bitmask", "relative") and t.count <= size // 2 == int(np.sum(spec.mask))
        if spec.bits is not None:
            inputs, outputs = record["shape"]
            group = METHODS[case].group_size or inputs
            assert (t.kind, t.bits, record.get("group_size"), record["scale_shape"]) == (
                "int", 4, METHODS[case].group_size, [inputs // group, outputs])
        if t.layout == "nm":
            assert record["nm"] == [2, 4, 0] and t.count == size // 2
        bound += limit
        kernels += size
    others = 4 * sum(v.size for v in views.values()) - 4 * kernels  # the biases, as float32
    assert report.bytes_float32 == 4 * kernels + others
    assert report.payload_bytes <= bound + others
    estimate = size_report(r.params, desc, artifact=report)
    assert estimate.bytes_compressed <= bound + others and estimate.file_bytes == report.file_bytes
    # the file: the payload (deflated by the zip), its JSON records and the zip and npy headers
    meta = int(np.load(tmp_path / "m.npz")["metadata"].size)
    assert report.file_bytes <= bound + others + meta + 1024 < report.bytes_float32
