"""A catalogue of bad and edge inputs across the public API, one test id per case.

Each case asserts either a ``ValueError``/``TypeError`` whose message names the argument and the
fix, or the documented safe result (exact values). The non-finite policy they check is written
down in :mod:`jaxcompress.core.finite`. The command line and checkpoints have their own
catalogues (``tests/test_parallel_cli.py``, ``tests/test_checkpoint.py``).

The module runs under ``jax_numpy_rank_promotion='raise'`` and ``jax_numpy_dtype_promotion='strict'``.
"""
import warnings

import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.core.transform import update_info
from jaxcompress.distill.losses import TEMPERATURE_RANGE
from jaxcompress.models import MLP
from jaxcompress.prune.masks import apply_masks, magnitude_mask
from jaxcompress.prune.structures import NM, Channels, structured_mask
from jaxcompress.quant.affine import fake_quant, fake_quant_affine, tensor_qparams
from jaxcompress.quant.lowbit import binarize, lsq_fake_quant, lsq_init_step, pact, ternarize
from jaxcompress.quant.observers import minmax, percentile
from jaxcompress.quant.sharing import kmeans_1d
from jaxcompress.train import init_train_state, linen_apply_fn, make_train_step

NAN, INF = float("nan"), float("inf")
CASES = []


@pytest.fixture(autouse=True)
def strict_promotion():
    with jax.numpy_rank_promotion("raise"), jax.numpy_dtype_promotion("strict"):
        yield


def case(name):
    def deco(fn):
        CASES.append(pytest.param(fn, id=name))
        return fn

    return deco


def raises(exc, *words):
    """A ``pytest.raises`` that also checks the message names each of ``words`` (the argument, the fix)."""

    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *a):
            out = self.ctx.__exit__(*a)
            msg = str(self.info.value)
            for w in words:
                assert w in msg, f"{w!r} not in {msg!r}"
            return out

    return Check()


def same(got, want):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want, np.float32))


def f32(*v):
    return jnp.array(v, jnp.float32)


def warns_unused(fn):
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        fn()
    assert any("match no float leaf" in str(x.message) and "'^nothing'" in str(x.message) for x in w), w


PARAMS = {"fc": {"kernel": jnp.linspace(-1.0, 1.0, 32, dtype=jnp.float32).reshape(8, 4), "bias": jnp.zeros(4)}}
NOTHING = [("^nothing", True), (".*", True)]

# ---------------------------------------------------------------- quantizers: non-finite values


@case("fake_quant-one-nan-stays-local-inf-clips")
def _():
    same(fake_quant(f32(1.0, NAN, -0.5, INF), 2), [1.0, NAN, 0.0, 1.0])


@case("fake_quant-per-channel-nan-stays-in-its-entry")
def _():
    x = jnp.array([[0.5, 2.0], [NAN, -2.0], [-1.0, 1.0]], jnp.float32)
    clean = x.at[1, 0].set(0.0)
    got, want = np.array(fake_quant(x, 4, channel_axis=-1)), np.array(fake_quant(clean, 4, channel_axis=-1))
    assert np.isnan(got[1, 0]) and np.isnan(got).sum() == 1
    got[1, 0] = want[1, 0]
    same(got, want)


@case("fake_quant-inf-goes-to-grid-ends")
def _():
    same(fake_quant(f32(-INF, 0.5, 1.0, INF), 2), [-1.0, 0.0, 1.0, 1.0])  # 0.5 rounds half to even


@case("fake_quant-all-nan-gives-nan-only")
def _():
    same(fake_quant(f32(NAN, NAN), 8), [NAN, NAN])


@case("fake_quant-gradient-zero-at-nan-and-inf")
def _():
    g = jax.grad(lambda x: jnp.sum(jnp.where(jnp.isfinite(x), fake_quant(x, 8), 0.0)))(f32(0.5, NAN, -1.0, INF))
    same(g, [1.0, 0.0, 1.0, 0.0])


@case("tensor_qparams-scale-ignores-nan")
def _():
    same(tensor_qparams(f32(1.0, NAN, -0.5), 2).scale, tensor_qparams(f32(1.0, -0.5), 2).scale)


@case("fake_quant_affine-one-nan-stays-local")
def _():
    same(fake_quant_affine(f32(-1.0, NAN, 3.0, INF), 0.5, 1, 0, 3), [-0.5, NAN, 1.0, 1.0])


@case("fake_quant_affine-nan-scale-valueerror")
def _():
    with raises(ValueError, "scale must be finite", "affine_qparams"):
        fake_quant_affine(f32(1.0), NAN, 0, -8, 7)


@case("fake_quant_affine-inf-zero-point-valueerror")
def _():
    with raises(ValueError, "zero_point must be finite"):
        fake_quant_affine(f32(1.0), 0.1, INF, -8, 7)


@case("fake_quant_affine-quant-min-not-below-max-valueerror")
def _():
    with raises(ValueError, "quant_min=7", "quant_max=7"):
        fake_quant_affine(f32(1.0), 0.1, 0, 7, 7)


@case("fake_quant-bits-9-valueerror")
def _():
    with raises(ValueError, "bits must be in 2..8"):
        fake_quant(f32(1.0), 9)


@case("fake_quant-bits-float-typeerror")
def _():
    with raises(TypeError, "bits must be an int"):
        fake_quant(f32(1.0), 4.0)


@case("fake_quant-channel-axis-5-valueerror")
def _():
    with raises(ValueError, "channel_axis=5", "use an axis in"):
        fake_quant(jnp.ones((2, 2)), 4, channel_axis=5)


@case("fake_quant-group-size-not-divisor-valueerror")
def _():
    with raises(ValueError, "group_size=3", "choose a divisor"):
        fake_quant(jnp.ones((8, 2)), 4, group_size=3, group_axis=0)


@case("fake_quant-unknown-ste-valueerror")
def _():
    with raises(ValueError, "ste must be one of"):
        fake_quant(f32(1.0), 8, ste="smooth")


@case("fake_quant-zeros-stay-zero-no-nan")
def _():
    same(fake_quant(jnp.zeros(3), 8, symmetric=False), [0.0, 0.0, 0.0])


@case("binarize-one-nan-stays-local")
def _():
    same(binarize(f32(0.5, NAN, -1.5, 0.0), channel_axis=None), [1.0, NAN, -1.0, 0.0])


@case("binarize-inf-takes-plus-alpha")
def _():
    same(binarize(f32(0.5, INF, -1.5), channel_axis=None), [1.0, 1.0, -1.0])


@case("binarize-channel-axis-3-valueerror")
def _():
    with raises(ValueError, "channel_axis=3"):
        binarize(jnp.ones((2, 2)), channel_axis=3)


@case("ternarize-one-nan-stays-local")
def _():
    same(ternarize(f32(0.1, NAN, -1.0, 2.0), channel_axis=None), [0.0, NAN, -1.5, 1.5])


@case("ternarize-threshold-zero-valueerror")
def _():
    with raises(ValueError, "threshold must be > 0"):
        ternarize(f32(1.0), threshold=0.0)


@case("lsq-nan-step-valueerror")
def _():
    with raises(ValueError, "step must be finite", "lsq_init_step"):
        lsq_fake_quant(f32(0.1, 0.5), jnp.float32(NAN), 4)


@case("lsq-inf-step-valueerror")
def _():
    with raises(ValueError, "step must be finite"):
        lsq_fake_quant(f32(0.1, 0.5), INF, 4)


@case("lsq-one-nan-stays-local")
def _():
    same(lsq_fake_quant(f32(0.26, NAN, 0.9, -INF), jnp.float32(0.5), 2), [0.5, NAN, 0.5, -1.0])


@case("lsq-zero-step-clamped-no-nan")
def _():
    assert np.isfinite(np.asarray(lsq_fake_quant(f32(0.0, 1.0), jnp.float32(0.0), 4))).all()


@case("lsq_init_step-ignores-nan")
def _():
    same(lsq_init_step(f32(1.0, NAN, -3.0), 2), lsq_init_step(f32(1.0, -3.0), 2))


@case("lsq-bits-1-valueerror")
def _():
    with raises(ValueError, "bits must be in 2..8"):
        lsq_fake_quant(f32(1.0), 0.5, 1)


@case("pact-alpha-zero-valueerror")
def _():
    with raises(ValueError, "alpha must be finite and > 0", "PACT"):
        pact(f32(0.1, 0.5), jnp.float32(0.0), 4)


@case("pact-alpha-nan-valueerror")
def _():
    with raises(ValueError, "alpha must be finite and > 0"):
        pact(f32(0.1), NAN, 4)


@case("pact-negative-alpha-valueerror")
def _():
    with raises(ValueError, "alpha must be finite and > 0"):
        pact(f32(0.1), -1.0, 4)


@case("pact-one-nan-stays-local-inf-clips")
def _():
    same(pact(f32(-1.0, NAN, 0.4, INF), jnp.float32(3.0), 2), [0.0, NAN, 0.0, 3.0])


@case("pact-traced-alpha-zero-clamped-not-nan")
def _():
    out = np.asarray(jax.jit(lambda x, a: pact(x, a, 2))(f32(-1.0, 0.5, 2.0), jnp.float32(0.0)))
    assert np.isfinite(out).all() and np.all((out >= 0) & (out <= 1e-8))


@case("kmeans-one-nan-weight-codebook-finite")
def _():
    c, _ = kmeans_1d(f32(0.1, 0.2, NAN, 0.9, 1.0), 2)
    same(c, kmeans_1d(f32(0.1, 0.2, 0.9, 1.0), 2)[0])


@case("kmeans-inf-assigned-extreme-centroids")
def _():
    c, a = kmeans_1d(f32(-INF, 0.1, 0.2, 0.9, 1.0, INF), 2)
    assert np.isfinite(np.asarray(c)).all() and a.tolist() == [0, 0, 0, 1, 1, 1]


@case("weight_sharing-one-nan-weight-stays-local")
def _():
    k = jnp.linspace(-1.0, 1.0, 16, dtype=jnp.float32).reshape(4, 4)
    t = jc.weight_sharing(4)
    bad, zero = {"k": k.at[1, 2].set(NAN)}, {"k": k.at[1, 2].set(0.0)}
    got, want = np.array(t.apply(bad, t.init(bad))["k"]), np.array(t.apply(zero, t.init(zero))["k"])
    assert np.isnan(got[1, 2]) and np.isnan(got).sum() == 1
    got[1, 2] = 0.0
    same(got, want)


@case("weight_sharing-clusters-1-valueerror")
def _():
    with raises(ValueError, "clusters must be >= 2"):
        jc.weight_sharing(1)


@case("weight_sharing-unused-rule-warns")
def _():
    warns_unused(lambda: jc.weight_sharing(4, rules=NOTHING).init(PARAMS))


@case("weight_quantization-unused-rule-warns")
def _():
    warns_unused(lambda: jc.weight_quantization(4, rules=NOTHING).init(PARAMS))


@case("lsq_quantization-unused-rule-warns")
def _():
    warns_unused(lambda: jc.lsq_quantization(4, rules=NOTHING).init(PARAMS))


@case("pruning-unused-rule-warns")
def _():
    warns_unused(lambda: jc.pruning(0.5, rules=NOTHING).init(PARAMS))


@case("rigl-unused-rule-warns")
def _():
    warns_unused(lambda: jc.rigl(0.5, end_step=10, rules=NOTHING).init(PARAMS))


@case("set_pruning-unused-rule-warns")
def _():
    warns_unused(lambda: jc.set_pruning(0.5, end_step=10, rules=NOTHING).init(PARAMS))


@case("weight_quantization-channel-axis-5-fails-at-init")
def _():
    t = jc.weight_quantization(4, channel_axis=5)
    with raises(ValueError, "channel_axis=5", "use an axis in"):
        t.init(PARAMS)


@case("weight_quantization-unknown-kind-valueerror")
def _():
    with raises(ValueError, "bits must be a bit width 1..8", "'ternary'"):
        jc.weight_quantization("quaternary")


@case("weight_quantization-activation-range-unknown-valueerror")
def _():
    with raises(ValueError, "activation_range must be one of"):
        jc.weight_quantization(8, activation_bits=8, activation_range="ema")


@case("weight_quantization-pact-symmetric-valueerror")
def _():
    with raises(ValueError, "activation_range='pact'", "Drop activation_symmetric=True"):
        jc.weight_quantization(8, activation_bits=8, activation_range="pact", activation_symmetric=True)


@case("weight_quantization-rule-int-leaf-no-quantization")
def _():
    p = {"fc": {"kernel": jnp.ones((2, 2), jnp.int32)}}
    same(jc.weight_quantization(4).apply(p, jc.weight_quantization(4).init(p))["fc"]["kernel"], np.ones((2, 2)))


def _dense_model():
    import flax.linen as nn

    model = nn.Dense(2)
    params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
    return model, params, (lambda p, s, b, *, train, rng=None: (model.apply({"params": p}, b), s))


@case("activation-quant-one-nan-pixel-stays-in-its-row")
def _():
    model, params, apply_fn = _dense_model()
    t = jc.weight_quantization(8, activation_bits=4)
    s = t.init(params)
    bad = f32(NAN, 0.5, 0.0, -1.0, 2.0, 0.3).reshape(2, 3)
    clean = bad.at[0, 0].set(0.4)  # inside the range of the finite values: the same grid
    with jc.intercepted(t, s, train=False):
        got, _ = apply_fn(params, {}, bad, train=False)
        want, _ = apply_fn(params, {}, clean, train=False)
    assert np.isnan(np.asarray(got[0])).all()
    same(got[1], want[1])


@case("calibrate_activations-range-ignores-nan")
def _():
    _, params, apply_fn = _dense_model()
    t = jc.weight_quantization(8, activation_bits=8, activation_range="calibrated")
    s = jc.calibrate_activations(t, t.init(params), apply_fn, params, {}, [f32(0.0, NAN, 2.0).reshape(1, 3)])
    assert (float(s.ranges[""]["min"]), float(s.ranges[""]["max"])) == (0.0, 2.0)


@case("observer-minmax-ignores-nan-and-inf")
def _():
    o = minmax()
    assert [float(v) for v in o.range(o.summarize(f32(-1.0, NAN, 2.0, INF)))] == [-1.0, 2.0]


@case("observer-percentile-q-50-valueerror")
def _():
    with raises(ValueError, "q must be in (50, 100]", "q=99.99"):
        percentile(50.0)


# ---------------------------------------------------------------- losses

LOGITS = f32(1.0, 2.0, 0.5, 2.0, 0.0, -1.0).reshape(2, 3)
TEACHER = f32(0.5, 1.0, 1.5, -1.0, 0.0, 1.0).reshape(2, 3)


@case("cross_entropy-label-minus-one-valueerror")
def _():
    with raises(ValueError, "labels must be class indices in [0, 3)", "remap"):
        jc.cross_entropy(LOGITS, jnp.array([0, -1]))


@case("cross_entropy-label-eq-classes-valueerror")
def _():
    with raises(ValueError, "labels must be class indices in [0, 3)"):
        jc.cross_entropy(LOGITS, jnp.array([3, 0]))


@case("cross_entropy-traced-bad-label-nan-for-its-example")
def _():
    out = np.asarray(jax.jit(jc.cross_entropy)(LOGITS, jnp.array([0, 7])))
    assert np.isfinite(out[0]) and np.isnan(out[1])
    same(out[0], jc.cross_entropy(LOGITS[:1], jnp.array([0]))[0])


@case("cross_entropy-soft-labels-not-summing-to-one-valueerror")
def _():
    with raises(ValueError, "soft labels must be class probabilities", "normalise"):
        jc.cross_entropy(LOGITS, f32(0.5, 0.5, 0.5, 1.0, 0.0, 0.0).reshape(2, 3))


@case("cross_entropy-negative-soft-labels-valueerror")
def _():
    with raises(ValueError, "soft labels must be class probabilities"):
        jc.cross_entropy(LOGITS, f32(1.5, -0.5, 0.0, 1.0, 0.0, 0.0).reshape(2, 3))


@case("cross_entropy-traced-bad-soft-labels-nan-for-its-example")
def _():
    out = np.asarray(jax.jit(jc.cross_entropy)(LOGITS, f32(3.0, -1.0, -1.0, 1.0, 0.0, 0.0).reshape(2, 3)))
    assert np.isnan(out[0]) and np.isfinite(out[1])


@case("cross_entropy-float-labels-wrong-shape-typeerror")
def _():
    with raises(TypeError, "labels must be integer class indices", "argmax"):
        jc.cross_entropy(LOGITS, f32(0.0, 1.0))


@case("cross_entropy-int-logits-typeerror")
def _():
    with raises(TypeError, "logits must be a float array"):
        jc.cross_entropy(jnp.ones((2, 3), jnp.int32), jnp.array([0, 1]))


@case("cross_entropy-nan-logits-valueerror")
def _():
    with raises(ValueError, "logits has 1 NaN or +inf", "skip_nonfinite"):
        jc.cross_entropy(LOGITS.at[0, 0].set(NAN), jnp.array([0, 1]))


@case("cross_entropy-minus-inf-logit-is-probability-zero")
def _():
    same(jc.cross_entropy(f32(0.0, -INF).reshape(1, 2), jnp.array([0])), [0.0])


@case("kd_loss-teacher-plus-inf-valueerror")
def _():
    with raises(ValueError, "teacher_logits has 1 NaN or +inf"):
        jc.kd_loss(LOGITS, TEACHER.at[0, 1].set(INF), temperature=2.0)


@case("kd_loss-teacher-minus-inf-class-finite")
def _():
    t = TEACHER.at[0, 1].set(-INF)
    out = np.asarray(jc.kd_loss(LOGITS, t, temperature=2.0))
    np.testing.assert_allclose(out, _kd_mp(np.asarray(LOGITS), np.asarray(t), 2.0), rtol=1e-5)


@case("kd_loss-label-ge-classes-valueerror")
def _():
    with raises(ValueError, "labels must be class indices in [0, 3)"):
        jc.kd_loss(LOGITS, TEACHER, temperature=2.0, labels=jnp.array([0, 3]), ce_weight=0.5)


@case("kd_loss-kd-weight-nan-valueerror")
def _():
    with raises(ValueError, "kd_weight must be >= 0 and finite", "e.g. use 0.9"):
        jc.kd_loss(LOGITS, TEACHER, temperature=2.0, kd_weight=NAN)


@case("kd_loss-ce-weight-negative-valueerror")
def _():
    with raises(ValueError, "ce_weight must be >= 0"):
        jc.kd_loss(LOGITS, TEACHER, temperature=2.0, ce_weight=-0.1, labels=jnp.array([0, 1]))


@case("kd_loss-ce-weight-without-labels-valueerror")
def _():
    with raises(ValueError, "labels are required when ce_weight != 0"):
        jc.kd_loss(LOGITS, TEACHER, temperature=2.0, ce_weight=0.5)


@case("kd_loss-temperature-1e7-valueerror")
def _():
    with raises(ValueError, "temperature must be in [0.001, 1e+06]", "typical values"):
        jc.kd_loss(LOGITS, TEACHER, temperature=1e7)


@case("kd_loss-temperature-zero-valueerror")
def _():
    with raises(ValueError, "temperature must be > 0"):
        jc.kd_loss(LOGITS, TEACHER, temperature=0.0)


@case("kd_loss-temperature-nan-valueerror")
def _():
    with raises(ValueError, "temperature must be > 0"):
        jc.kd_loss(LOGITS, TEACHER, temperature=NAN)


@case("kd_loss-shapes-differ-valueerror")
def _():
    with raises(ValueError, "student_logits shape (2, 3) and teacher_logits shape (2, 2) differ"):
        jc.kd_loss(LOGITS, TEACHER[:, :2], temperature=2.0)


def _kd_mp(s, t, temperature):
    mpmath.mp.dps = 50
    out = []
    for si, ti in zip(s, t):
        zs = [mpmath.mpf(float(v)) / temperature for v in si]
        zt = [mpmath.mpf(float(v)) / temperature if v > -np.inf else None for v in ti]
        lt = mpmath.log(sum(mpmath.exp(v) for v in zt if v is not None))
        ls = mpmath.log(sum(mpmath.exp(v) for v in zs))
        kl = sum(mpmath.exp(a - lt) * ((a - lt) - (b - ls)) for a, b in zip(zt, zs) if a is not None)
        out.append(float(kl * temperature**2))
    return np.array(out)


@case("kd_loss-at-max-temperature-matches-mpmath")
def _():
    t_max = TEMPERATURE_RANGE[1]
    np.testing.assert_allclose(np.asarray(jc.kd_loss(LOGITS, TEACHER, temperature=t_max)),
                               _kd_mp(np.asarray(LOGITS), np.asarray(TEACHER), t_max), rtol=1e-4)


def _dkd_mp(s, t, labels, temperature, nckd_weight=8.0):
    mpmath.mp.dps = 50
    out = []
    for si, ti, g in zip(s, t, labels):
        zs = [mpmath.mpf(float(v)) / temperature for v in si]
        zt = [mpmath.mpf(float(v)) / temperature for v in ti]

        def probs(z):
            tot = sum(mpmath.exp(v) for v in z)
            return [mpmath.exp(v) / tot for v in z]

        p, q = probs(zt), probs(zs)
        tckd = p[g] * mpmath.log(p[g] / q[g]) + (1 - p[g]) * mpmath.log((1 - p[g]) / (1 - q[g]))
        pn = probs([v for i, v in enumerate(zt) if i != g])
        qn = probs([v for i, v in enumerate(zs) if i != g])
        nckd = sum(a * mpmath.log(a / b) for a, b in zip(pn, qn))
        out.append(float(temperature**2 * (tckd + nckd_weight * nckd)))
    return np.array(out)


@case("dkd_loss-small-logits-T100-nonnegative-matches-mpmath")
def _():
    s = np.asarray(jax.random.normal(jax.random.key(0), (4, 10)), np.float32) * 0.01
    t = np.asarray(jax.random.normal(jax.random.key(1), (4, 10)), np.float32) * 0.01
    y = np.array([0, 1, 2, 3])
    out = np.asarray(jc.dkd_loss(s, t, labels=y, temperature=100.0, ce_weight=0.0))
    assert (out >= 0).all()
    np.testing.assert_allclose(out, _dkd_mp(s, t, y, 100.0), rtol=1e-3)


@case("dkd_loss-label-eq-classes-valueerror")
def _():
    with raises(ValueError, "labels must be class indices in [0, 3)"):
        jc.dkd_loss(LOGITS, TEACHER, labels=jnp.array([3, 0]))


@case("dkd_loss-traced-bad-label-nan-for-its-example")
def _():
    out = np.asarray(jax.jit(lambda s, t, y: jc.dkd_loss(s, t, labels=y))(LOGITS, TEACHER, jnp.array([1, 3])))
    assert np.isfinite(out[0]) and np.isnan(out[1])


@case("dkd_loss-one-class-valueerror")
def _():
    with raises(ValueError, "dkd_loss needs at least 2 classes"):
        jc.dkd_loss(LOGITS[:, :1], TEACHER[:, :1], labels=jnp.array([0, 0]))


@case("dkd_loss-nckd-weight-nan-valueerror")
def _():
    with raises(ValueError, "nckd_weight must be >= 0 and finite"):
        jc.dkd_loss(LOGITS, TEACHER, labels=jnp.array([0, 1]), nckd_weight=NAN)


@case("hard_label_kd-label-smoothing-one-valueerror")
def _():
    with raises(ValueError, "label_smoothing must be in [0, 1)", "label_smoothing=0.1"):
        jc.hard_label_kd_loss(LOGITS, TEACHER, label_smoothing=1.0)


@case("hard_label_kd-kd-weight-inf-valueerror")
def _():
    with raises(ValueError, "kd_weight must be >= 0 and finite"):
        jc.hard_label_kd_loss(LOGITS, TEACHER, kd_weight=INF)


@case("kd_loss-student-equals-teacher-is-zero")
def _():
    same(jc.kd_loss(LOGITS, LOGITS, temperature=4.0), [0.0, 0.0])


# ---------------------------------------------------------------- pruning structures and masks


@case("apply_masks-mask-of-two-valueerror-names-leaf")
def _():
    with raises(ValueError, "the mask at 'w'", "only 0 and 1", "astype(bool)"):
        apply_masks({"w": jnp.ones(2)}, {"w": f32(2.0, 0.0)})


@case("apply_masks-float-zero-one-mask-accepted")
def _():
    same(apply_masks({"w": f32(3.0, 4.0)}, {"w": f32(1.0, 0.0)})["w"], [3.0, 0.0])


@case("apply_masks-pruned-nan-weight-is-exactly-zero")
def _():
    same(apply_masks({"w": f32(NAN, 4.0, INF)}, {"w": jnp.array([False, True, False])})["w"], [0.0, 4.0, 0.0])


@case("apply_masks-structure-mismatch-valueerror")
def _():
    with raises(ValueError, "masks and params have different structures", "transform.init(params)"):
        apply_masks({"w": jnp.ones(2)}, {"v": jnp.ones(2, bool)})


@case("apply_masks-shape-mismatch-valueerror")
def _():
    with raises(ValueError, "masks at 'w' has shape (3,)"):
        apply_masks({"w": jnp.ones(2)}, {"w": jnp.ones(3, bool)})


@case("nm-zero-of-four-valueerror")
def _():
    with raises(ValueError, "NM.n must be >= 1", "NM(2, 4)"):
        structured_mask(jnp.ones((4, 2)), 0.0, NM(0, 4))


@case("nm-n-above-m-valueerror")
def _():
    with raises(ValueError, "NM needs n <= m", "NM(2, 4)"):
        structured_mask(jnp.ones((4, 2)), 0.0, NM(5, 4))


@case("nm-axis-not-divisible-valueerror")
def _():
    with raises(ValueError, "not divisible by m=4"):
        structured_mask(jnp.ones((6, 2)), 0.0, NM(2, 4, axis=0))


@case("channels-ord-3-valueerror")
def _():
    with raises(ValueError, "Channels.ord must be 1 or 2"):
        structured_mask(jnp.ones((4, 2)), 0.5, Channels(ord=3))


@case("magnitude_mask-nan-score-removed-first")
def _():
    assert magnitude_mask(f32(0.3, NAN, 2.0, 0.5), 0.25).tolist() == [True, False, True, True]


@case("pruning-sparsity-0.999999-refused-names-leaf")
def _():
    with raises(ValueError, "sparsity=0.999999 removes all 128", "'k'", "use at most 0.99"):
        jc.pruning(0.999999).init({"k": jnp.ones((16, 8))})


@case("pruning-global-sparsity-removing-all-refused")
def _():
    with raises(ValueError, "all pruned leaves together"):
        jc.pruning(0.99, scope="global").init({"a": jnp.ones((4, 4)), "b": jnp.ones((2, 4))})


@case("pruning-channels-sparsity-removing-every-channel-refused")
def _():
    with raises(ValueError, "removes all 4 weights (or groups)", "0.75"):
        jc.pruning(0.9, structure=Channels(axis=-1)).init({"k": jnp.ones((8, 4))})


@case("pruning-sparsity-one-valueerror")
def _():
    with raises(ValueError, "sparsity must be in [0, 1)", "e.g. 0.9"):
        jc.pruning(1.0)


@case("pruning-sparsity-nan-valueerror")
def _():
    with raises(ValueError, "sparsity must be in [0, 1)"):
        jc.pruning(NAN)


@case("pruning-unknown-criterion-valueerror")
def _():
    with raises(ValueError, "criterion must be one of"):
        jc.pruning(0.5, criterion="taylor")


@case("pruning-rule-selecting-int-leaf-typeerror")
def _():
    with raises(TypeError, "'fc/kernel'"):
        jc.pruning(0.5, rules=[("fc/kernel", True)]).init({"fc": {"kernel": jnp.ones((4, 4), jnp.int32)}})


@case("pruning-saliency-nan-gradients-fall-back-to-magnitude")
def _():
    p = {"k": jnp.array([[1.0, -4.0], [0.5, 3.0]], jnp.float32)}
    t = jc.pruning(0.5, criterion="saliency")
    s = t.update(p, t.init(p), update_info(1, grads={"k": jnp.full((2, 2), NAN)}))
    assert s.masks["k"].tolist() == [[False, True], [False, True]]


@case("fixed_masks-mask-of-two-valueerror-at-init")
def _():
    with raises(ValueError, "the mask at 'k'"):
        jc.fixed_masks({"k": f32(2.0, 1.0)}).init({"k": jnp.ones(2)})


# ---------------------------------------------------------------- train step


def _mlp():
    m = MLP(features=(8,))
    return m, m.init(jax.random.key(0), jnp.zeros((1, 4)))["params"]


BATCH = {"image": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "label": np.array([0, 1, 2, 3])}


def _nan_batch():
    return {"image": BATCH["image"].copy(), "label": BATCH["label"]} | {
        "image": np.where(np.arange(16).reshape(4, 4) == 0, np.float32(NAN), BATCH["image"])}


@case("train-step-nan-pixel-skipped-with-guard")
def _():
    m, params = _mlp()
    step = jax.jit(make_train_step(linen_apply_fn(m), optax.sgd(0.1), skip_nonfinite=True))
    state = init_train_state(params, optax.sgd(0.1))
    new, metrics = step(state, _nan_batch())
    assert float(metrics["skipped"]) == 1.0 and int(new.step) == 0
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(params)):
        same(a, b)


@case("train-step-nan-pixel-without-guard-writes-nan-documented")
def _():
    m, params = _mlp()
    step = jax.jit(make_train_step(linen_apply_fn(m), optax.sgd(0.1)))
    new, metrics = step(init_train_state(params, optax.sgd(0.1)), _nan_batch())
    assert "skipped" not in metrics and np.isnan(np.asarray(new.params["fc1"]["kernel"])).any()


@case("train-step-guard-one-trace-and-fit-counts-skipped")
def _():
    m, params = _mlp()
    traces = []

    def apply_fn(*a, **k):
        traces.append(1)
        return linen_apply_fn(m)(*a, **k)

    step = jax.jit(make_train_step(apply_fn, optax.sgd(0.1), skip_nonfinite=True))
    state, out = jc.fit(step, init_train_state(params, optax.sgd(0.1)), [BATCH, _nan_batch(), BATCH],
                        num_steps=3, progress=False)
    assert len(traces) == 1 and out["skipped_steps"] == 1 and int(state.step) == 2


@case("train-step-skip-nonfinite-not-bool-typeerror")
def _():
    m, _ = _mlp()
    with raises(TypeError, "skip_nonfinite must be a bool"):
        make_train_step(linen_apply_fn(m), optax.sgd(0.1), skip_nonfinite=1)


@case("init_train_state-int-leaf-typeerror-names-leaf")
def _():
    with raises(TypeError, "params leaf 'count' has dtype int32", "model_state"):
        init_train_state({"w": jnp.ones(2), "count": jnp.zeros((), jnp.int32)}, optax.sgd(0.1))


@case("train-step-int-leaf-typeerror-names-leaf")
def _():
    m, params = _mlp()
    state = init_train_state(params, optax.sgd(0.1))
    state = state._replace(params={**state.params, "fc1": {**state.params["fc1"], "bias": jnp.zeros(8, jnp.int32)}})
    with raises(TypeError, "'fc1/bias' has dtype int32"):
        make_train_step(linen_apply_fn(m), optax.sgd(0.1))(state, BATCH)


@case("train-step-empty-batch-valueerror")
def _():
    m, params = _mlp()
    step = jax.jit(make_train_step(linen_apply_fn(m), optax.sgd(0.1)))
    with raises(ValueError, "batch entry 'image' has 0 examples", "Drop empty batches"):
        step(init_train_state(params, optax.sgd(0.1)), {"image": np.zeros((0, 4), np.float32),
                                                       "label": np.zeros((0,), np.int32)})


@case("init_train_state-float-rng-typeerror")
def _():
    with raises(TypeError, "rng must be an int seed or a jax.random.key"):
        init_train_state(PARAMS, optax.sgd(0.1), rng=0.5)


@case("make_train_step-optimizer-not-optax-typeerror")
def _():
    m, _ = _mlp()
    with raises(TypeError, "optimizer must be an optax.GradientTransformation"):
        make_train_step(linen_apply_fn(m), "adam")


@case("evaluate-empty-data-valueerror")
def _():
    m, params = _mlp()
    step = jax.jit(jc.make_eval_step(linen_apply_fn(m)))
    with raises(ValueError, "empty data set"):
        jc.evaluate(step, init_train_state(params, optax.sgd(0.1)), {"image": np.zeros((0, 4)), "label": np.zeros(0)})


@case("evaluate-batch-size-zero-valueerror")
def _():
    m, params = _mlp()
    step = jax.jit(jc.make_eval_step(linen_apply_fn(m)))
    with raises(ValueError, "batch_size must be", ">= 1"):
        jc.evaluate(step, init_train_state(params, optax.sgd(0.1)), BATCH, batch_size=0)


@case("fit-num-steps-zero-valueerror")
def _():
    with raises(ValueError, "num_steps must be", ">= 1"):
        jc.fit(lambda s, b: (s, {}), None, [BATCH], num_steps=0)


# ---------------------------------------------------------------- rules and composition


@case("rules-not-a-sequence-typeerror")
def _():
    with raises(TypeError, "rules must be a sequence of (regex, value) pairs", "Example"):
        jc.explain(PARAMS, "fc")


@case("rules-bad-regex-valueerror")
def _():
    with raises(ValueError, "rules[0] has an invalid regex"):
        jc.explain(PARAMS, [("(", True)])


@case("chain-of-pruning-and-quantization-keeps-zeros")
def _():
    t = jc.chain(jc.pruning(0.5), jc.weight_quantization(4))
    v = np.asarray(t.apply(PARAMS, t.init(PARAMS))["fc"]["kernel"])
    assert int((v == 0).sum()) >= 16


@pytest.mark.parametrize("check", CASES)
def test_catalogue(check):
    check()


def test_catalogue_is_large_enough():
    assert len(CASES) >= 80, len(CASES)
    assert len({p.id for p in CASES}) == len(CASES)
