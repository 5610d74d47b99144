"""Distillation inside make_train_step: feature capture, regressors, frozen/bf16 and multiple teachers,
function matching (shared augmentation) and the teacher-logit cache."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxcompress as jc
from jaxcompress.distill import (
    FeatureTerm,
    Outputs,
    attention_transfer_loss,
    batches_with_teacher_logits,
    cache_teacher_logits,
    capture_apply_fn,
    compose,
    distill_loss,
    feature_regressors,
    frozen_apply_fn,
    hint_loss,
    init_regressor,
    kd_loss,
    mixup,
    multi_teacher_apply_fn,
    random_shift,
    stack_teacher_variables,
    sum_over_teachers,
)
from jaxcompress.models import CNN, MLP
from jaxcompress.train import split_variables


def _data(n=8, shape=(6, 6, 1), classes=10, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(n,) + shape), jnp.float32),
            jnp.asarray(rng.integers(0, classes, n), jnp.int32))


def _init(module, x, seed):
    return split_variables(module.init(jax.random.key(seed), x))


def test_capture_apply_fn_returns_layer_outputs_and_sown_values():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            h = nn.Dense(5, name="fc1")(x)
            self.sow("intermediates", "act", nn.relu(h))
            return nn.Dense(3, name="head")(nn.relu(h))

    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2)), jnp.float32)
    params = Net().init(jax.random.key(0), x)["params"]
    out, state = capture_apply_fn(Net(), ["^fc1$", "act"], inputs="x")(params, {}, {"x": x}, train=False)
    w, b = np.asarray(params["fc1"]["kernel"], np.float64), np.asarray(params["fc1"]["bias"], np.float64)
    h = np.asarray(x, np.float64) @ w + b
    np.testing.assert_allclose(np.asarray(out.features["fc1"]), h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.features["act"]), np.maximum(h, 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.logits), np.asarray(Net().apply({"params": params}, x)), rtol=1e-6)
    assert state == {}
    with pytest.raises(ValueError, match="matched no module output"):
        capture_apply_fn(Net(), ["conv9"], inputs="x")(params, {}, {"x": x}, train=False)


def test_feature_kd_step_trains_regressor_with_student_and_matches_manual_loss():
    x, y = _data()
    teacher, student = CNN(channels=(4, 8), hidden=16), CNN(channels=(2, 4), hidden=8)
    t_params, _ = _init(teacher, x, 0)
    s_params, _ = _init(student, x, 1)
    t_apply = capture_apply_fn(teacher, ["conv2"])
    s_apply = capture_apply_fn(student, ["conv2/regressed"])
    t_out, _ = t_apply(t_params, {}, {"image": x}, train=False)
    s_raw, _ = capture_apply_fn(student, ["conv2"])(s_params, {}, {"image": x}, train=False)
    reg = init_regressor(jax.random.key(2), s_raw.features["conv2"].shape, t_out.features["conv2"].shape)
    regressors = feature_regressors({"conv2": reg})
    loss = distill_loss(functools.partial(kd_loss, temperature=2.0),
                        [FeatureTerm("conv2/regressed", "conv2", hint_loss, 0.5),
                         FeatureTerm("conv2/regressed", "conv2", attention_transfer_loss, 100.0)])
    opt = optax.sgd(0.1)
    state = jc.init_train_state(s_params, opt, transform=regressors)
    step = jax.jit(jc.make_train_step(s_apply, opt, transform=regressors, teacher=jc.Teacher(t_apply, loss)))
    new, metrics = step(state, {"image": x, "label": y}, (t_params, {}))

    s_feat = np.asarray(s_raw.features["conv2"], np.float64)
    regressed = s_feat @ np.asarray(reg["kernel"], np.float64) + np.asarray(reg["bias"], np.float64)
    t_feat = np.asarray(t_out.features["conv2"], np.float64)
    hint = ((regressed - t_feat) ** 2).reshape(8, -1).mean(-1)

    def at(a):
        q = (a ** 2).sum(-1).reshape(8, -1)
        return q / np.linalg.norm(q, axis=-1, keepdims=True)

    at_loss = ((at(regressed) - at(t_feat)) ** 2).mean(-1)
    kd = np.asarray(kd_loss(s_raw.logits, t_out.logits, temperature=2.0))
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(kd + 0.5 * hint + 100.0 * at_loss), rtol=1e-4)
    # the regressor lives in the transform state (trained), the student's params keep their own structure
    assert jax.tree.structure(new.params) == jax.tree.structure(s_params)
    for leaf_old, leaf_new in zip(jax.tree.leaves(reg), jax.tree.leaves(new.compression_state.regressors.value)):
        assert float(jnp.abs(leaf_new - leaf_old).max()) > 0  # the regressor is trained with the student
    assert not np.allclose(np.asarray(new.params["conv2"]["kernel"]), np.asarray(s_params["conv2"]["kernel"]))
    # the teacher's params are untouched and the eval step reads .logits
    ev = jc.make_eval_step(s_apply, transform=regressors)(new, {"image": x, "label": y})
    assert float(ev["count"]) == 8


def test_bfloat16_frozen_teacher_uses_running_stats_and_is_close_to_float32():
    x, y = _data(n=16)
    teacher = CNN(channels=(4, 8), hidden=16, batch_norm=True)
    t_params, t_state = _init(teacher, x, 0)
    # non-trivial running statistics, so eval mode (running averages) differs from batch statistics
    t_state = jax.tree.map(lambda v: v + 0.5, t_state)
    apply = jc.linen_apply_fn(teacher)
    want = teacher.apply({"params": t_params, **t_state}, x, train=False)
    f32, _ = frozen_apply_fn(apply)(t_params, t_state, {"image": x}, train=True)
    np.testing.assert_allclose(np.asarray(f32), np.asarray(want), rtol=1e-6, atol=1e-6)
    bf16, _ = frozen_apply_fn(apply, dtype=jnp.bfloat16)(t_params, t_state, {"image": x}, train=True)
    assert bf16.dtype == jnp.float32
    scale = float(jnp.abs(want).max())
    assert float(jnp.abs(bf16 - want).max()) < 0.05 * scale
    assert float(jnp.abs(bf16 - want).max()) > 0  # it did run in bfloat16

    # inside the step, the teacher's logits are those of eval mode: the KD loss equals a manual one
    student = MLP(features=(8,))
    s_params, _ = _init(student, x, 1)
    opt = optax.sgd(0.0)
    state = jc.init_train_state(s_params, opt)
    kd = jc.Teacher(frozen_apply_fn(apply), functools.partial(kd_loss, temperature=3.0))
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(student), opt, teacher=kd))
    _, metrics = step(state, {"image": x, "label": y}, (t_params, t_state))
    s_logits = student.apply({"params": s_params}, x)
    np.testing.assert_allclose(float(metrics["loss"]), float(kd_loss(s_logits, want, temperature=3.0).mean()), rtol=1e-5)


def test_multi_teacher_mean_logits_and_sum_of_losses():
    x, y = _data()
    teachers = [MLP(features=(12,)), MLP(features=(6, 6))]
    variables = [_init(m, x, i) for i, m in enumerate(teachers)]
    applies = [jc.linen_apply_fn(m) for m in teachers]
    logits = [m.apply({"params": v[0]}, x) for m, v in zip(teachers, variables)]
    tv = stack_teacher_variables(variables)
    mean, _ = multi_teacher_apply_fn(applies)(*tv, {"image": x}, train=False)
    np.testing.assert_allclose(np.asarray(mean), (np.asarray(logits[0]) + np.asarray(logits[1])) / 2, rtol=1e-6)

    student = MLP(features=(4,))
    s_params, _ = _init(student, x, 5)
    s_logits = student.apply({"params": s_params}, x)
    opt = optax.sgd(0.0)
    state = jc.init_train_state(s_params, opt)
    base = functools.partial(kd_loss, temperature=2.0)
    teacher = jc.Teacher(multi_teacher_apply_fn(applies, combine="sum_losses"), sum_over_teachers(base))
    _, metrics = jc.make_train_step(jc.linen_apply_fn(student), opt, teacher=teacher)(state, {"image": x, "label": y}, tv)
    want = sum(float(base(s_logits, l).mean()) for l in logits)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)

    other = MLP(features=(4,), num_classes=7)
    bad = stack_teacher_variables([variables[0], _init(other, x, 9)])
    with pytest.raises(ValueError, match="same classes"):
        multi_teacher_apply_fn([applies[0], jc.linen_apply_fn(other)])(*bad, {"image": x}, train=False)
    with pytest.raises(ValueError, match="combine"):
        multi_teacher_apply_fn(applies, combine="max")


def test_teacher_and_student_with_different_class_counts_raise():
    x, y = _data()
    t_params, _ = _init(MLP(features=(4,), num_classes=5), x, 0)
    s_params, _ = _init(MLP(features=(4,)), x, 1)
    opt = optax.sgd(0.1)
    state = jc.init_train_state(s_params, opt)
    kd = jc.Teacher(jc.linen_apply_fn(MLP(features=(4,), num_classes=5)), functools.partial(kd_loss, temperature=2.0))
    step = jc.make_train_step(jc.linen_apply_fn(MLP(features=(4,))), opt, teacher=kd)
    with pytest.raises(ValueError, match="same classes"):
        step(state, {"image": x, "label": y}, (t_params, {}))


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(4, name="head")(x.reshape(x.shape[0], -1))


def _linear_pair(rng):
    """Data, a linear teacher and student, a zero-step optimizer and the student's state."""
    x, y = _data(shape=(4, 4, 1), classes=4)
    t_params, _ = _init(_Linear(), x, 0)
    s_params, _ = _init(_Linear(), x, 1)
    opt = optax.sgd(0.0)
    state = jc.init_train_state(s_params, opt, rng=rng)
    return x, y, jc.linen_apply_fn(_Linear()), opt, t_params, s_params, state


def _augmented_as_in_step(state, aug, x, y):
    """The batch the step's augmentation produces: its key schedule replayed from ``state.rng``."""
    _, step_rng = jax.random.split(state.rng)
    aug_rng, _ = jax.random.split(step_rng)
    return aug(aug_rng, {"image": x, "label": y})


def test_function_matching_teacher_sees_the_augmented_batch():
    x, y, apply, opt, t_params, s_params, state = _linear_pair(rng=3)
    loss = functools.partial(kd_loss, temperature=2.0)
    aug = compose(random_shift(1), mixup(0.4, num_classes=4))
    _, metrics = jax.jit(jc.make_train_step(apply, opt, teacher=jc.Teacher(apply, loss), augment=aug))(
        state, {"image": x, "label": y}, (t_params, {}))
    batch = _augmented_as_in_step(state, aug, x, y)
    assert not np.allclose(np.asarray(batch["image"]), np.asarray(x))
    xa = batch["image"]
    t = _Linear().apply({"params": t_params}, xa)
    s = _Linear().apply({"params": s_params}, xa)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss(s, t).mean()), rtol=1e-5)
    # the same loss computed with the teacher on the clean batch is different (no cached teacher)
    t_clean = _Linear().apply({"params": t_params}, x)
    assert abs(float(loss(s, t_clean).mean()) - float(metrics["loss"])) > 1e-3


def test_mixup_soft_labels_train_with_the_default_loss_and_the_kd_hard_term():
    """The no-KD twin of a mixup run uses the default loss on mixed labels; kd_loss(ce_weight) too."""
    x, y, apply, opt, t_params, s_params, state = _linear_pair(rng=5)
    aug = mixup(1.0, num_classes=4)
    batch = _augmented_as_in_step(state, aug, x, y)
    assert batch["label"].shape == (len(y), 4) and not np.allclose(batch["label"].max(-1), 1.0)
    s = _Linear().apply({"params": s_params}, batch["image"])
    t = _Linear().apply({"params": t_params}, batch["image"])
    logp = np.asarray(jax.nn.log_softmax(s), np.float64)
    want = float(-(np.asarray(batch["label"]) * logp).sum(-1).mean())
    _, metrics = jax.jit(jc.make_train_step(apply, opt, augment=aug))(state, {"image": x, "label": y})
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    loss = functools.partial(kd_loss, temperature=2.0, ce_weight=0.5)
    _, metrics = jax.jit(jc.make_train_step(apply, opt, teacher=jc.Teacher(apply, loss), augment=aug))(
        state, {"image": x, "label": y}, (t_params, {}))
    np.testing.assert_allclose(float(metrics["loss"]), float(loss(s, t, labels=batch["label"]).mean()), rtol=1e-5)
    np.testing.assert_allclose(float(loss(s, t, labels=batch["label"]).mean()),
                               float(kd_loss(s, t, temperature=2.0).mean()) + 0.5 * want, rtol=1e-5)


def test_random_shift_matches_numpy_roll_with_zero_fill():
    x = jnp.asarray(np.arange(2 * 5 * 5, dtype=np.float32).reshape(2, 5, 5, 1))
    out = random_shift(2)(jax.random.key(4), {"image": x, "label": jnp.zeros(2, jnp.int32)})["image"]
    offsets = np.asarray(jax.random.randint(jax.random.key(4), (2, 2), 0, 5))
    for i in range(2):
        padded = np.pad(np.asarray(x[i]), ((2, 2), (2, 2), (0, 0)))
        want = padded[offsets[i, 0] : offsets[i, 0] + 5, offsets[i, 1] : offsets[i, 1] + 5]
        np.testing.assert_array_equal(np.asarray(out[i]), want)


def test_cached_teacher_logits_equal_live_teacher_and_refuse_augmentation():
    x, y = _data(n=16)
    teacher, student = MLP(features=(8,)), MLP(features=(4,))
    t_params, _ = _init(teacher, x, 0)
    s_params, _ = _init(student, x, 1)
    t_apply = jc.linen_apply_fn(teacher)
    cache = cache_teacher_logits(t_apply, (t_params, {}), np.asarray(x), batch_size=5)
    np.testing.assert_allclose(cache.logits, np.asarray(teacher.apply({"params": t_params}, x)), rtol=1e-5, atol=1e-6)
    opt = optax.sgd(0.1)
    kd = jc.Teacher(t_apply, functools.partial(kd_loss, temperature=2.0))
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(student), opt, teacher=kd))
    batch = next(batches_with_teacher_logits(cache, np.asarray(x), np.asarray(y), batch_size=8, seed=0))
    live = jc.init_train_state(s_params, opt)
    cached = jc.init_train_state(s_params, opt)  # no teacher variables needed with cached logits
    s_live, m_live = step(live, {"image": batch["image"], "label": batch["label"]}, (t_params, {}))
    s_cached, m_cached = step(cached, batch)
    np.testing.assert_allclose(float(m_cached["loss"]), float(m_live["loss"]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(s_cached.params["head"]["kernel"]),
                               np.asarray(s_live.params["head"]["kernel"]), rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="random augmentation"):
        next(batches_with_teacher_logits(cache, np.asarray(x), np.asarray(y), batch_size=8, augment=random_shift(2)))
    aug_step = jc.make_train_step(jc.linen_apply_fn(student), opt, teacher=kd, augment=random_shift(2))
    with pytest.raises(ValueError, match="cannot be used with augment"):
        aug_step(cached, batch)
    with pytest.raises(ValueError, match="build it from these images"):
        next(batches_with_teacher_logits(cache, np.asarray(x)[:8], np.asarray(y)[:8], batch_size=4))


def test_distill_loss_errors():
    with pytest.raises(ValueError, match=r"features\[0\].weight must be >= 0"):
        distill_loss(None, [FeatureTerm("a", "a", hint_loss, -1.0)])
    loss = distill_loss(None, [FeatureTerm("fc1", "fc9", hint_loss)])
    s = Outputs(jnp.zeros((2, 3)), {"fc1": jnp.zeros((2, 4))})
    with pytest.raises(ValueError, match="teacher feature 'fc9' was not captured"):
        loss(s, s)
    loss = distill_loss(None, [FeatureTerm("fc1", "fc1", hint_loss)])
    t = Outputs(jnp.zeros((2, 3)), {"fc1": jnp.zeros((2, 8))})
    with pytest.raises(ValueError, match="add a regressor"):
        loss(s, t)
