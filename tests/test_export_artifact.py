"""Artifact files: bit-identical models after save/load, the program in a fresh process, loader fuzz."""
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxcompress as jc
from jaxcompress.export import ArtifactError, export_program, load, load_program, save, size_report
from jaxcompress.models import MLP, LeNet5
from jaxcompress.prune.structures import NM

READER = Path(jc.export.reader.__file__).resolve()


def _compressed(model, x, transform, seed=0):
    params = model.init(jax.random.key(seed), x)["params"]
    state = transform.init(params)
    return transform.apply(params, state), transform.describe(params, state)


@pytest.fixture(scope="module")
def lenet():
    model = LeNet5()
    view, desc = _compressed(model, jnp.zeros((1, 28, 28, 1)), jc.chain(jc.pruning(0.9), jc.weight_quantization(8)))
    return model, view, desc


CASES = {
    "lenet5_prune90_int8": None,
    "mlp_prune_int4_group": (lambda: MLP(features=(32, 16)), (3, 8, 8, 1),  # one shape: compiled once
                             lambda: jc.chain(jc.pruning(0.7), jc.weight_quantization(4, group_size=8))),
    "mlp_ternary": (lambda: MLP(features=(32, 16)), (3, 8, 8, 1), lambda: jc.weight_quantization("ternary")),
    "mlp_codebook5": (lambda: MLP(features=(32, 16)), (3, 8, 8, 1),
                      lambda: jc.chain(jc.pruning(0.8), jc.weight_sharing(32))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_loaded_model_gives_bit_identical_outputs(case, tmp_path, request):
    if CASES[case] is None:
        model, view, desc = request.getfixturevalue("lenet")
        x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 28, 28, 1)), jnp.float32)
    else:
        make, shape, transform = CASES[case]
        model = make()
        x = jnp.asarray(np.random.default_rng(0).normal(size=shape), jnp.float32)
        view, desc = _compressed(model, x, transform())
    report = save(tmp_path / "m.npz", view, desc, metadata={"case": case})
    params, info = load(tmp_path / "m.npz")
    assert info.metadata == {"case": case} and info.file_bytes == os.path.getsize(tmp_path / "m.npz")
    for (p, a), b in zip(jax.tree.leaves_with_path(view), jax.tree.leaves(params)):
        assert np.asarray(a).dtype == b.dtype and np.array_equal(np.asarray(a), b), p
    apply = jax.jit(lambda p, x: model.apply({"params": p}, x))
    np.testing.assert_array_equal(np.asarray(apply(view, x)), np.asarray(apply(params, x)))
    assert report.file_bytes < report.bytes_float32 / 3
    assert size_report(view, desc, artifact=report).file_bytes == report.file_bytes
    same, _ = load(tmp_path / "m.npz", like=view)
    assert jax.tree.structure(same) == jax.tree.structure(view)


def _pruned_int8(shape, rng, keep=0.1):
    """``(view, LeafSpec, latent)``: the largest 10% of a kernel kept, on a per-channel int8 grid."""
    w = (rng.normal(size=shape) / np.sqrt(shape[0])).astype(np.float32)
    mask = np.abs(w) >= np.quantile(np.abs(w), 1 - keep)
    scale = (np.abs(w).max(axis=0, keepdims=True) / 127).astype(np.float32)
    view = np.where(mask, np.rint(w / scale), 0).astype(np.float32) * scale
    return view, jc.LeafSpec(mask=mask, bits=8, scheme="symmetric", channel_axis=-1, scale=scale), w


def test_pruned_int8_lenet_300_100_is_over_20x_smaller_than_float32(tmp_path):
    rng = np.random.default_rng(0)
    view, desc, latent = {}, {}, {}
    for name, shape in [("fc1", (784, 300)), ("fc2", (300, 100)), ("head", (100, 10))]:
        bias = rng.normal(size=shape[1]).astype(np.float32)
        kernel, desc[f"{name}/kernel"], w = _pruned_int8(shape, rng)
        view[name], latent[name] = {"bias": bias, "kernel": kernel}, {"bias": bias, "kernel": w}
    dense = save(tmp_path / "dense.npz", latent).file_bytes
    packed = save(tmp_path / "packed.npz", view, desc)
    assert packed.bytes_float32 == 4 * 266610 and dense > 0.9 * packed.bytes_float32
    assert packed.bytes_float32 / packed.file_bytes > 20
    kernel = {t.path: t for t in packed.tensors}["fc1/kernel"]
    assert kernel.layout in ("relative", "bitmask") and kernel.count == 23520
    assert kernel.entropy_bytes <= kernel.nbytes < kernel.raw_bytes
    params, _ = load(tmp_path / "packed.npz")
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(view), jax.tree.leaves(params)))


def test_save_refuses_latent_weights_of_a_quantizer(tmp_path):
    p = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4) + 0.01}
    t = jc.weight_quantization(4)
    with pytest.raises(ValueError, match="transform.apply"):
        save(tmp_path / "m.npz", p, t.describe(p, t.init(p)))
    assert not (tmp_path / "m.npz").exists()
    with pytest.raises(TypeError, match="description"):
        save(tmp_path / "m.npz", p, {"w": 4})
    with pytest.raises(TypeError, match="JSON"):
        save(tmp_path / "m.npz", p, metadata={"x": object()})


def test_float16_leaves_on_request(tmp_path):
    p = {"b": jnp.linspace(-1.0, 1.0, 64)}
    r16 = save(tmp_path / "a.npz", p, float_dtype="float16")
    r32 = save(tmp_path / "b.npz", p)
    assert r16.payload_bytes == 128 and r32.payload_bytes <= 256
    out, _ = load(tmp_path / "a.npz")
    assert out["b"].dtype == np.float32 and np.array_equal(out["b"], np.asarray(p["b"]).astype(np.float16).astype(np.float32))


def test_no_pickle_anywhere(tmp_path):
    view, spec, _ = _pruned_int8((16, 8), np.random.default_rng(0))
    save(tmp_path / "m.npz", {"w": view}, {"w": spec})
    with zipfile.ZipFile(tmp_path / "m.npz") as z:
        assert sorted(z.namelist()) == ["metadata.npy", "payload.npy", "sha256.npy"]
        for name in z.namelist():
            header = z.read(name)[:128]
            assert b"'descr': '|u1'" in header  # plain uint8 arrays, never object arrays
    for module in ("reader.py", "artifact.py", "pack.py", "huffman.py"):
        text = (READER.parent / module).read_text()
        assert "pickle" not in text.replace("allow_pickle=False", "")


def test_program_runs_in_a_fresh_process_without_the_model_code(tmp_path, lenet):
    model, view, desc = lenet
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, 28, 28, 1)), jnp.float32)
    fn = lambda p, batch: model.apply({"params": p}, batch)  # noqa: E731
    program = export_program(fn, view, x[:2])  # exported at batch 2, run at batch 5
    save(tmp_path / "m.npz", view, desc, program=program)
    np.save(tmp_path / "x.npy", np.asarray(x))
    expected = np.asarray(jax.jit(fn)(view, x))
    script = textwrap.dedent(f"""
        import importlib.util, sys
        import numpy as np
        spec = importlib.util.spec_from_file_location("artifact_reader", {str(READER)!r})
        reader = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(reader)
        params, info = reader.load({str(tmp_path / 'm.npz')!r})
        out = reader.load_program({str(tmp_path / 'm.npz')!r}).call(params, np.load({str(tmp_path / 'x.npy')!r}))
        np.save({str(tmp_path / 'out.npy')!r}, np.asarray(out))
        leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('jaxcompress', 'flax', 'optax'))
        print('LEAKED', leaked)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "LEAKED []" in run.stdout
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), expected)
    exported = load_program(tmp_path / "m.npz")
    np.testing.assert_array_equal(np.asarray(exported.call(load(tmp_path / "m.npz")[0], x)), expected)


def test_load_program_without_one_is_an_artifact_error(tmp_path):
    save(tmp_path / "m.npz", {"w": jnp.ones(3)})
    with pytest.raises(ArtifactError, match="no program"):
        load_program(tmp_path / "m.npz")


# ----- loader fuzz: every damaged file raises ArtifactError or loads bit-identically -----

def _fuzz_artifact(path):
    view, desc = _compressed(MLP(features=(32, 16)), jnp.zeros((3, 8, 8, 1)),
                             jc.chain(jc.pruning(0.7), jc.weight_quantization(4, group_size=8)))
    nm = jc.chain(jc.pruning(0.75, structure=NM(1, 4)), jc.weight_quantization(4))  # an N:M tensor too
    p = {"kernel": jnp.asarray(np.random.default_rng(0).normal(size=(32, 8)), jnp.float32)}
    s = nm.init(p)
    view = dict(view, extra={"cb": np.asarray(view["fc2"]["kernel"])}, nm=nm.apply(p, s))
    desc = {**desc, "nm/kernel": nm.describe(p, s)["kernel"]}
    report = save(path, view, desc, metadata={"note": "fuzz", "acc": 0.5}, context_coding=True)
    layouts = {t.path: t.layout for t in report.tensors}
    assert layouts["nm/kernel"] == "nm" and "context" in layouts.values(), layouts  # a version-2 file
    params, _ = load(path)
    return path.read_bytes(), jax.tree.leaves_with_path(params)


def _members(blob):
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def _write(members, rehash):
    if rehash:
        members = dict(members)
        whole = members["metadata"].tobytes() + members["payload"].tobytes()
        members["sha256"] = np.frombuffer(hashlib.sha256(whole).digest(), np.uint8)
    buf = io.BytesIO()
    np.savez_compressed(buf, **members)
    return buf.getvalue()


def _edit_json(meta, rng):
    """A random scalar of the metadata JSON replaced by another value."""
    spots = []

    def walk(node, parent, key):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, node, k)
        elif isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, node, i)
        else:
            spots.append((parent, key, node))

    walk(meta, None, None)
    parent, key, old = spots[rng.integers(len(spots))]
    choices = [None, 0, 1, -1, 2**40, "x", True, [], {}, 3.5]
    if isinstance(old, int) and not isinstance(old, bool):
        choices += [old + 1, old - 1, old * 2]
    if isinstance(old, str):
        choices += [old[:-1], old + "0", old[::-1]]
    parent[key] = choices[rng.integers(len(choices))]
    return meta


def _mutate(blob, members, rng):
    what = rng.integers(4)
    if what == 0:  # flip bytes of the file
        b = bytearray(blob)
        for _ in range(rng.integers(1, 4)):
            b[rng.integers(len(b))] ^= int(rng.integers(1, 256))
        return bytes(b)
    if what == 1:  # truncate
        return blob[: rng.integers(len(blob))]
    if what == 2:  # flip bytes inside a member, zip rewritten (CRCs valid), digest kept or redone
        m = dict(members)
        name = ("metadata", "payload", "sha256")[rng.integers(3)]
        a = m[name].copy()
        a[rng.integers(a.size)] ^= np.uint8(rng.integers(1, 256))
        m[name] = a
        return _write(m, rehash=bool(rng.integers(2)) and name != "sha256")
    m = dict(members)  # edit a metadata value, digest of the whole redone or not
    meta = _edit_json(json.loads(m["metadata"].tobytes()), rng)
    m["metadata"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    return _write(m, rehash=bool(rng.integers(2)))


def _fuzz(tmp_path, cases, seed):
    blob, expected = _fuzz_artifact(tmp_path / "ok.npz")
    members = _members(blob)
    rng = np.random.default_rng(seed)
    outcomes = {"error": 0, "loaded": 0}
    for i in range(cases):
        bad = tmp_path / "bad.npz"
        bad.write_bytes(_mutate(blob, members, rng))
        try:
            params, _ = load(bad)
        except ArtifactError:
            outcomes["error"] += 1
            continue
        got = jax.tree.leaves_with_path(params)
        assert [p for p, _ in got] == [p for p, _ in expected], f"case {i}: other leaves"
        for (p, a), (_, b) in zip(got, expected):
            assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), f"case {i}: {p}"
        outcomes["loaded"] += 1
    assert outcomes["error"] > cases // 2
    return outcomes


def test_loader_fuzz_fast_subset(tmp_path):
    _fuzz(tmp_path, 200, seed=0)


@pytest.mark.slow
def test_loader_fuzz_5000(tmp_path):
    _fuzz(tmp_path, 5000, seed=1)
