"""The Transformer language model, the standard-library text corpus and token-level losses."""
import hashlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcompress.core.paths import leaf_names
from jaxcompress.core.rules import select
from jaxcompress.data.text import (
    SEPARATOR,
    SPLITS,
    eval_windows,
    load_python_corpus,
    sample_windows,
    source_files,
    split_of,
)
from jaxcompress.distill.losses import cross_entropy, kd_loss, perplexity
from jaxcompress.models.transformer import TransformerLM

MODEL = TransformerLM(vocab_size=32, max_len=16, dim=16, depth=2, heads=2, mlp_ratio=2)


@pytest.fixture(scope="module")
def variables():
    return MODEL.init(jax.random.key(0), jnp.zeros((1, 16), jnp.int32))


@pytest.fixture(scope="module")
def apply():
    return jax.jit(MODEL.apply)


def test_logits_shape_and_parameter_names(variables, apply):
    tokens = jax.random.randint(jax.random.key(1), (3, 11), 0, 32)
    assert apply(variables, tokens).shape == (3, 11, 32)
    block = ["attn/key/bias", "attn/key/kernel", "attn/out/bias", "attn/out/kernel", "attn/query/bias",
             "attn/query/kernel", "attn/value/bias", "attn/value/kernel", "ln1/bias", "ln1/scale",
             "ln2/bias", "ln2/scale", "mlp/fc1/bias", "mlp/fc1/kernel", "mlp/fc2/bias", "mlp/fc2/kernel"]
    expected = [f"block_{i}/{n}" for i in range(2) for n in block] + [
        "embed/embedding", "head/bias", "head/kernel", "ln_f/bias", "ln_f/scale", "pos_embed/embedding"]
    assert leaf_names(variables["params"]) == expected
    p = variables["params"]
    assert p["block_0"]["mlp"]["fc1"]["kernel"].shape == (16, 32)
    assert p["head"]["kernel"].shape == (16, 32) and p["pos_embed"]["embedding"].shape == (16, 16)
    chosen = select(p, [(r"attn/(query|key|value|out)/kernel", True), (".*", None)])
    picked = [n for n, v in zip(leaf_names(p), jax.tree.leaves(chosen, is_leaf=lambda x: x is None)) if v]
    assert picked == [f"block_{i}/attn/{n}/kernel" for i in range(2) for n in ("key", "out", "query", "value")]


def test_dense_layers_are_interceptable_by_path(variables):
    seen = []

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
            seen.append("/".join(context.module.path))
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        MODEL.apply(variables, jnp.zeros((1, 4), jnp.int32))
    per_block = ["attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"]
    assert seen == [f"block_{i}/{n}" for i in range(2) for n in per_block] + ["head"]


@pytest.mark.parametrize("t", [0, 5, 14])
def test_causal_logits_at_t_ignore_later_tokens(variables, apply, t):
    a = jax.random.randint(jax.random.key(2), (2, 16), 0, 32)
    b = a.at[:, t + 1:].set((a[:, t + 1:] + 7) % 32)
    la, lb = np.asarray(apply(variables, a)), np.asarray(apply(variables, b))
    np.testing.assert_array_equal(la[:, : t + 1], lb[:, : t + 1])
    assert not np.allclose(la[:, t + 1:], lb[:, t + 1:])
    # and position t does see token t
    c = a.at[:, t].set((a[:, t] + 1) % 32)
    assert not np.allclose(la[:, t], np.asarray(apply(variables, c))[:, t])


def test_attention_weights_are_causal_distributions(variables):
    tokens = jax.random.randint(jax.random.key(3), (2, 8), 0, 32)
    _, state = MODEL.apply(variables, tokens, mutable=["intermediates"])
    w = np.asarray(state["intermediates"]["block_1"]["attn"]["attention"][0])
    assert w.shape == (2, 2, 8, 8)
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    assert np.all(np.triu(w, k=1) == 0.0)


def test_jit_matches_eager_and_dropout_uses_the_rng(variables, apply):
    tokens = jax.random.randint(jax.random.key(4), (2, 16), 0, 32)
    np.testing.assert_allclose(apply(variables, tokens), MODEL.apply(variables, tokens), rtol=1e-5, atol=1e-5)
    dropped = MODEL.clone(dropout=0.5)
    run = jax.jit(lambda v, x, key: dropped.apply(v, x, train=True, rngs={"dropout": key}))
    one, same, other = (run(variables, tokens, jax.random.key(k)) for k in (5, 5, 6))
    np.testing.assert_array_equal(one, same)
    assert not np.allclose(one, other)
    np.testing.assert_array_equal(dropped.apply(variables, tokens), MODEL.apply(variables, tokens))


def test_model_errors_name_the_argument(variables):
    with pytest.raises(ValueError, match="max_len"):
        MODEL.apply(variables, jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(TypeError, match="tokens"):
        MODEL.apply(variables, jnp.zeros((1, 4)))
    with pytest.raises(ValueError, match="multiple of heads"):
        TransformerLM(dim=10, heads=4)
    with pytest.raises(ValueError, match="dropout"):
        TransformerLM(dropout=1.0)
    with pytest.raises(TypeError, match="depth"):
        TransformerLM(depth=2.0)


def _fake_stdlib(root):
    files = {
        "os.py": b"import sys\n",
        "json/__init__.py": b"from .decoder import x\n",
        "json/decoder.py": b"x = 1\n",
        "test/test_os.py": b"excluded\n",
        "unittest/test/test_case.py": b"excluded\n",
        "idlelib/idle_test/test_x.py": b"excluded\n",
        "lib2to3/tests/data/f.py": b"excluded\n",
        "site-packages/numpy/core.py": b"excluded\n",
        "_sysconfigdata__linux.py": b"excluded\n",
        "README.txt": b"not python\n",
    } | {f"pkg/mod{i}.py": f"value = {i}\n".encode() for i in range(40)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def test_corpus_split_by_file_is_disjoint_complete_and_reproducible(tmp_path):
    files = _fake_stdlib(tmp_path)
    kept = sorted(r for r, d in files.items() if r.endswith(".py") and d != b"excluded\n")
    assert source_files(tmp_path) == kept
    corpus = load_python_corpus(root=tmp_path)
    assert sorted(f for s in SPLITS for f in corpus.files[s]) == kept
    for s in SPLITS:
        assert list(corpus.files[s]) == sorted(r for r in kept if split_of(r) == s)
        expected = b"".join(files[r] + bytes([SEPARATOR]) for r in corpus.files[s])
        assert getattr(corpus, s).dtype == np.uint8 and getattr(corpus, s).tobytes() == expected
        assert corpus.sha256[s] == hashlib.sha256(expected).hexdigest()
    listing = "".join(f"{s}\t{r}\n" for s in SPLITS for r in corpus.files[s])
    assert corpus.files_sha256 == hashlib.sha256(listing.encode()).hexdigest()
    assert all(corpus.files[s] for s in SPLITS)  # 43 files: every split gets some
    # A file's split depends on its path alone: removing others moves nothing.
    (tmp_path / "pkg/mod0.py").unlink()
    smaller = load_python_corpus(root=tmp_path)
    assert all(set(smaller.files[s]) <= set(corpus.files[s]) for s in SPLITS)


def test_stdlib_corpus_is_deterministic_and_capped():
    a, b = load_python_corpus(max_bytes=5000), load_python_corpus(max_bytes=5000)
    assert a.files_sha256 == b.files_sha256 and a.sha256 == b.sha256 and a.files == b.files
    assert [len(getattr(a, s)) for s in SPLITS] == [5000, 5000, 5000]
    sets = [set(a.files[s]) for s in SPLITS]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert all(split_of(f) == s for s in SPLITS for f in a.files[s])
    assert not any(part in ("test", "tests") for s in SPLITS for f in a.files[s] for part in f.split("/")[:-1])
    with pytest.raises(ValueError, match="max_bytes"):
        load_python_corpus(max_bytes=0)


def test_sample_windows_targets_are_next_tokens():
    split = np.random.default_rng(0).integers(0, 256, 300).astype(np.uint8)
    batch = sample_windows(split, batch_size=8, seq_len=20, rng=np.random.default_rng(1))
    again = sample_windows(split, batch_size=8, seq_len=20, rng=np.random.default_rng(1))
    assert batch["tokens"].dtype == np.int32 and batch["targets"].shape == (8, 20)
    np.testing.assert_array_equal(batch["tokens"], again["tokens"])
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["tokens"][:, 1:])
    windows = np.lib.stride_tricks.sliding_window_view(split, 21)
    for x, y in zip(batch["tokens"], batch["targets"]):
        assert any((w == np.append(x, y[-1])).all() for w in windows)
    # Every start position, including the last, is drawn.
    starts = sample_windows(np.arange(25), batch_size=2000, seq_len=20, rng=np.random.default_rng(2))["tokens"][:, 0]
    assert sorted(set(starts.tolist())) == list(range(5))
    with pytest.raises(ValueError, match="seq_len"):
        sample_windows(split, batch_size=1, seq_len=300, rng=np.random.default_rng(0))


def test_eval_windows_score_every_target_once():
    split = np.arange(1, 104) % 256
    batches = list(eval_windows(split, batch_size=4, seq_len=10))
    assert len(batches) == 3 and all(b["tokens"].shape == (4, 10) for b in batches)
    mask = np.concatenate([b["mask"].ravel() for b in batches]).astype(bool)
    targets = np.concatenate([b["targets"].ravel() for b in batches])
    inputs = np.concatenate([b["tokens"].ravel() for b in batches])
    np.testing.assert_array_equal(targets[mask], split[1:])
    np.testing.assert_array_equal(inputs[mask], split[:-1])


def test_token_level_kd_and_cross_entropy_reduce_only_the_vocab_axis():
    ks = jax.random.split(jax.random.key(7), 3)
    s, t = jax.random.normal(ks[0], (3, 5, 11)) * 3, jax.random.normal(ks[1], (3, 5, 11)) * 3
    y = jax.random.randint(ks[2], (3, 5), 0, 11)
    kw = dict(temperature=2.0, kd_weight=0.7, ce_weight=0.3)
    per_token = kd_loss(s, t, labels=y, **kw)
    flat = kd_loss(s.reshape(15, 11), t.reshape(15, 11), labels=y.reshape(15), **kw).reshape(3, 5)
    assert per_token.shape == (3, 5)
    np.testing.assert_allclose(per_token, flat, rtol=1e-6)
    s64, t64 = np.asarray(s, np.float64) / 2, np.asarray(t, np.float64) / 2
    logp = lambda z: z - np.log(np.exp(z).sum(-1, keepdims=True))  # noqa: E731
    kl = (np.exp(logp(t64)) * (logp(t64) - logp(s64))).sum(-1) * 4
    ce = -np.take_along_axis(logp(np.asarray(s, np.float64)), np.asarray(y)[..., None], -1)[..., 0]
    np.testing.assert_allclose(per_token, 0.7 * kl + 0.3 * ce, rtol=1e-5)
    np.testing.assert_allclose(cross_entropy(s, y), ce, rtol=1e-5)


def test_perplexity():
    nll = cross_entropy(jnp.zeros((2, 3, 256)), jnp.zeros((2, 3), jnp.int32)).mean()
    np.testing.assert_allclose(perplexity(nll), 256.0, rtol=1e-5)
    assert math.isclose(float(nll) / math.log(2), 8.0, rel_tol=1e-6)  # bits per byte
    with pytest.raises(TypeError, match="mean_nll"):
        perplexity(jnp.array(1))
