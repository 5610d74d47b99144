"""A small Transformer language model (token batches, causal attention, Dense projections,
LayerNorm) trains through the same step with pruning, W8A8 and token-level KD from a larger
Transformer; the token loss, metrics and per-token evaluation agree with float64 NumPy."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcompress.core.transform import chain
from jaxcompress.data.text import eval_windows, load_python_corpus, sample_windows
from jaxcompress.distill.losses import kd_loss, perplexity
from jaxcompress.models.transformer import TransformerLM
from jaxcompress.core.transform import intercepted
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.train.loop import fit
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.step import Teacher, make_train_step

T, B, VOCAB = 16, 8, 256
STUDENT = TransformerLM(vocab_size=VOCAB, max_len=T, dim=32, depth=1, heads=2, mlp_ratio=2)
TEACHER = TransformerLM(vocab_size=VOCAB, max_len=T, dim=64, depth=1, heads=4, mlp_ratio=2)
BLOCK_KERNELS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]
KERNELS = [(r"kernel$", True), (".*", None)]
KD = functools.partial(kd_loss, temperature=2.0, kd_weight=0.5, ce_weight=0.5)


def compression():
    """Pruning 50% of the block kernels, then 8-bit per-channel weights and calibrated 8-bit
    inputs on every Dense layer.

    The one place that names the pruning and weight-quantization transforms.
    """
    from jaxcompress import pruning, weight_quantization

    return chain(pruning(0.5, rules=BLOCK_KERNELS),
                 weight_quantization(8, rules=KERNELS, activation_bits=8, activation_range="calibrated"))


@pytest.fixture(scope="module")
def corpus():
    return load_python_corpus(max_bytes=20_000)


def batches(tokens, seed):
    rng = np.random.default_rng(seed)
    while True:
        yield sample_windows(tokens, batch_size=B, seq_len=T, rng=rng)


def init(model, seed):
    return split_variables(model.init(jax.random.key(seed), jnp.zeros((1, T), jnp.int32)))


@pytest.fixture(scope="module")
def teacher(corpus):
    """The larger Transformer, trained on labels for a few steps (so its logits carry information)."""
    params, model_state = init(TEACHER, 1)
    opt = optax.adam(3e-3)
    step = jax.jit(make_train_step(linen_apply_fn(TEACHER, inputs="tokens"), opt, loss_fn=token_loss,
                                   metrics_fn=token_metrics), donate_argnums=0)
    state, metrics = fit(step, init_train_state(params, opt, model_state=model_state), batches(corpus.train, 1),
                         num_steps=20, progress=False)
    assert metrics["loss"] < math.log(VOCAB) - 1.0
    return state.params, state.model_state


def test_token_loss_and_metrics_against_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 5, 7)).astype(np.float32)
    targets = rng.integers(0, 7, size=(3, 5))
    mask = (rng.random((3, 5)) < 0.7).astype(np.float32)
    mask[2] = 0.0  # a sequence of padding only
    x = logits.astype(np.float64)
    nll = np.log(np.exp(x).sum(-1)) - np.take_along_axis(x, targets[..., None], -1)[..., 0]
    hits = (x.argmax(-1) == targets).astype(np.float64)
    real = np.maximum(mask.sum(-1), 1.0)
    batch = {"targets": jnp.asarray(targets), "mask": jnp.asarray(mask)}
    np.testing.assert_allclose(token_loss(logits, batch), (nll * mask).sum(-1) / real, rtol=1e-6)
    np.testing.assert_allclose(token_metrics(logits, batch)["accuracy"], (hits * mask).sum(-1) / real, rtol=1e-6)
    # Without a mask (training batches) and with a per-sequence mask: a plain mean over the tokens.
    np.testing.assert_allclose(token_loss(logits, {"targets": targets}), nll.mean(-1), rtol=1e-6)
    np.testing.assert_allclose(token_loss(logits, {"targets": targets, "mask": np.ones(3)}), nll.mean(-1), rtol=1e-6)
    with pytest.raises(ValueError, match="mask"):
        token_loss(logits, {"targets": targets, "mask": np.ones((3, 4))})
    with pytest.raises(ValueError, match="targets"):
        token_loss(logits, {"label": targets})


def test_per_token_evaluation_over_eval_windows(corpus, teacher):
    """evaluate over eval_windows scores every next byte once: its loss is the split's mean per-token
    NLL (padding excluded), and perplexity / bits per byte follow from it."""
    params, model_state = teacher
    tokens = corpus.validation[:1000]
    eval_step = jax.jit(make_eval_step(linen_apply_fn(TEACHER, inputs="tokens"), loss_fn=token_loss,
                                       metrics_fn=token_metrics))
    state = init_train_state(params, optax.sgd(0.1), model_state=model_state)
    out = evaluate(eval_step, state, eval_windows(tokens, batch_size=B, seq_len=T))
    nll, hits = [], []
    for b in eval_windows(tokens, batch_size=B, seq_len=T):
        x = np.asarray(TEACHER.apply({"params": params}, b["tokens"]), np.float64)
        lse = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
        m = b["mask"] > 0
        nll.append((lse - np.take_along_axis(x, b["targets"][..., None], -1)[..., 0])[m])
        hits.append((x.argmax(-1) == b["targets"])[m])
    nll, hits = np.concatenate(nll), np.concatenate(hits)
    assert out["count"] == len(tokens) - 1 == len(nll)
    np.testing.assert_allclose(out["loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(out["accuracy"], hits.mean(), rtol=1e-6)
    np.testing.assert_allclose(float(perplexity(out["loss"])), np.exp(nll.mean()), rtol=1e-5)
    # The same windows as one dict of arrays (cut into batches of another size by evaluate) agree.
    windows = list(eval_windows(tokens, batch_size=B, seq_len=T))
    data = {k: np.concatenate([w[k] for w in windows]) for k in windows[0]}
    again = evaluate(eval_step, state, data, batch_size=5)
    assert again["count"] == out["count"]
    np.testing.assert_allclose(again["loss"], out["loss"], rtol=1e-5)


def test_compressed_student_trains_with_token_kd(corpus, teacher):
    params, model_state = init(STUDENT, 0)
    student_fn = linen_apply_fn(STUDENT, inputs="tokens")
    calibration = [sample_windows(corpus.train, batch_size=B, seq_len=T, rng=np.random.default_rng(i))
                   for i in range(3)]
    transform = compression()
    opt = optax.adam(3e-3)
    state = init_train_state(params, opt, transform=transform, model_state=model_state)
    calibrated = calibrate_activations(transform, state.compression_state, student_fn, params, model_state,
                                       calibration)
    state = state._replace(compression_state=calibrated)
    calibrated = jax.device_get(calibrated)  # the step donates the state
    layers = {f"block_0/attn/{n}" for n in ("query", "key", "value", "out")} | {"block_0/mlp/fc1",
                                                                                 "block_0/mlp/fc2", "head"}
    assert set(calibrated[1].ranges) == layers
    assert all(transform.describe(params, calibrated)[f"{k}/kernel"].act_bits == 8 for k in layers)
    kd = Teacher(linen_apply_fn(TEACHER, inputs="tokens"), KD, labels="targets")
    step = jax.jit(make_train_step(student_fn, opt, loss_fn=token_loss, metrics_fn=token_metrics,
                                   transform=transform, teacher=kd), donate_argnums=0)
    data = batches(corpus.train, 0)

    # One step's loss against kd_loss on the student's (W8A8 view, training mode) and the teacher's logits.
    batch = next(data)

    @jax.jit
    def manual(state, batch):
        view = transform.apply(state.params, state.compression_state)
        with intercepted(transform, state.compression_state, train=True):
            s_logits, _ = student_fn(view, state.model_state, batch, train=True, rng=jax.random.key(0))
        t_logits = TEACHER.apply({"params": teacher[0]}, batch["tokens"])
        per_token = KD(s_logits, t_logits, labels=batch["targets"])
        soft = kd_loss(s_logits, t_logits, temperature=2.0)
        return jnp.mean(per_token), jnp.mean(soft), per_token.shape

    expected, soft, shape = manual(state, batch)
    assert shape == (B, T) and float(soft) > 1e-3  # the KD term is really there
    state, metrics = step(state, batch, teacher)
    np.testing.assert_allclose(metrics["loss"], expected, rtol=1e-5)
    assert set(metrics) == {"loss", "accuracy"}

    losses = [float(metrics["loss"])]
    for _ in range(29):
        state, metrics = step(state, next(data), teacher)
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

    view = jax.jit(transform.apply)(state.params, state.compression_state)
    for name in ("attn/query", "attn/key", "attn/value", "attn/out", "mlp/fc1", "mlp/fc2"):
        layer, sub = name.split("/")
        k = np.asarray(view["block_0"][layer][sub]["kernel"])
        assert np.mean(k == 0) == 0.5, name
    for k in (view["block_0"]["mlp"]["fc1"]["kernel"], view["head"]["kernel"]):
        k = np.asarray(k, np.float64)
        assert max(len(np.unique(k[:, j])) for j in range(k.shape[1])) <= 255
        q = k / (np.abs(k).max(0) / 127.0)  # each column's max magnitude is the grid's level 127
        np.testing.assert_allclose(q, np.round(q), atol=1e-3)
    assert np.all(np.asarray(view["embed"]["embedding"]) == np.asarray(state.params["embed"]["embedding"]))
    # Calibrated ranges moved with training (EMA in the transform state) and stay finite.
    ranges = state.compression_state[1].ranges
    assert all(np.isfinite(float(r["min"])) and float(r["max"]) > float(r["min"]) for r in ranges.values())
    assert any(float(ranges[k]["max"]) != float(calibrated[1].ranges[k]["max"]) for k in layers)

    eval_step = jax.jit(make_eval_step(student_fn, transform=transform, loss_fn=token_loss, metrics_fn=token_metrics))
    out = evaluate(eval_step, state, eval_windows(corpus.validation[:2000], batch_size=B, seq_len=T))
    assert out["count"] == 1999 and float(perplexity(out["loss"])) < VOCAB / 4
