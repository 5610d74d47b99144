"""Logit distillation beyond Hinton KD: hard-label KD and decoupled KD (DKD), per example."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcompress.distill.losses import (
    check_labels,
    check_logits,
    check_temperature,
    check_weight,
    cross_entropy,
    kl_div_logits,
    valid_labels,
)


def check_rate(name: str, value) -> float:
    """Checks that a probability-like setting is a real number in ``[0, 1)``."""
    value = check_weight(name, value)
    if not value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}; e.g. {name}=0.1.")
    return value


def check_pair(student_logits, teacher_logits) -> tuple[jax.Array, jax.Array]:
    """Checks that student and teacher logits are float arrays of one shape (same classes)."""
    s = check_logits("student_logits", student_logits)
    t = check_logits("teacher_logits", teacher_logits)
    if s.shape != t.shape:
        raise ValueError(
            f"student_logits shape {s.shape} and teacher_logits shape {t.shape} differ; teacher and "
            f"student must predict the same classes (got {s.shape[-1]} and {t.shape[-1]})."
        )
    return s.astype(jnp.float32), jax.lax.stop_gradient(t.astype(jnp.float32))


def hard_label_kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    label_smoothing: float = 0.0,
    labels: Optional[jax.Array] = None,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
) -> jax.Array:
    """Hard-label distillation: cross-entropy against the teacher's argmax, one value per example.

    ``kd_weight * CE_eps(s, argmax t) + ce_weight * CE(s, labels)`` where ``CE_eps`` uses targets
    smoothed as ``(1 - eps) * onehot + eps / num_classes`` (the convention of PyTorch's
    ``cross_entropy(label_smoothing=eps)``); DeiT (Touvron et al. 2021) uses this with ``eps=0.1``.

    Args:
      student_logits: float ``(..., num_classes)``.
      teacher_logits: float, same shape; only its argmax matters (no gradient).
      label_smoothing: ``eps`` in ``[0, 1)``.
      labels: int ground-truth labels or class probabilities (see :func:`cross_entropy`), required
        when ``ce_weight > 0``.
      ce_weight: weight of the ground-truth cross-entropy, ``>= 0``.
      kd_weight: weight of the teacher-label term, ``>= 0``.

    Returns:
      float32 ``(...)``.

    Raises:
      ValueError: shapes differ, a weight is negative, ``label_smoothing`` not in ``[0, 1)``, or
        labels are missing while ``ce_weight > 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> s, t = jnp.array([[0.0, 0.0]]), jnp.array([[0.0, 5.0]])
      >>> round(float(hard_label_kd_loss(s, t)[0]), 4)  # -log(1/2)
      0.6931
    """
    eps = check_rate("label_smoothing", label_smoothing)
    kd_weight, ce_weight = check_weight("kd_weight", kd_weight), check_weight("ce_weight", ce_weight)
    s, t = check_pair(student_logits, teacher_logits)
    target = jax.nn.one_hot(jnp.argmax(t, axis=-1), s.shape[-1])
    loss = kd_weight * cross_entropy(s, (1.0 - eps) * target + eps / s.shape[-1])
    if ce_weight > 0:
        if labels is None:
            raise ValueError(f"labels are required when ce_weight > 0 (got ce_weight={ce_weight}).")
        loss = loss + ce_weight * cross_entropy(s, labels)
    return loss


def dkd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    labels: jax.Array,
    temperature: float = 4.0,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
    ce_weight: float = 1.0,
) -> jax.Array:
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022), one value per example.

    With ``p = softmax(t / T)``, ``q = softmax(s / T)`` and ``g`` the ground-truth class:

    - TCKD: ``KL([p_g, 1 - p_g] || [q_g, 1 - q_g])``, the binary target-vs-rest term;
    - NCKD: ``KL(p' || q')`` over the non-target classes, ``p'`` and ``q'`` renormalised softmaxes
      of the logits with class ``g`` removed;
    - loss ``= T^2 (tckd_weight * TCKD + nckd_weight * NCKD) + ce_weight * CE(s, labels)``.

    Hinton KD is ``TCKD + (1 - p_g) NCKD``; DKD frees NCKD from the ``(1 - p_g)`` factor. The paper's
    CIFAR-100 setting is ``tckd_weight=1, nckd_weight=8, T=4`` (the ``alpha, beta`` of the paper).
    All terms are computed from differences of the logits over ``T``
    (:func:`~jaxcompress.distill.losses.kl_div_logits`): never negative, and accurate against
    float64 at every temperature in :data:`~jaxcompress.distill.losses.TEMPERATURE_RANGE`.

    Args:
      student_logits: float ``(..., num_classes)``, ``num_classes >= 2``.
      teacher_logits: float, same shape (no gradient).
      labels: int ground-truth classes ``(...)`` in ``[0, num_classes)`` (inside ``jit`` an
        invalid one gives NaN for its example).
      temperature: ``T`` in :data:`~jaxcompress.distill.losses.TEMPERATURE_RANGE`.
      tckd_weight: ``alpha >= 0``.
      nckd_weight: ``beta >= 0``.
      ce_weight: ground-truth cross-entropy weight ``>= 0``.

    Returns:
      float32 ``(...)``.

    Raises:
      ValueError: shapes differ, ``T`` out of range, a weight negative or NaN, concrete labels
        out of range.

    Example:
      >>> import jax.numpy as jnp
      >>> z = jnp.array([[2.0, 0.5, -1.0]])
      >>> float(dkd_loss(z, z, labels=jnp.array([0]), ce_weight=0.0)[0])
      0.0
    """
    temperature = check_temperature(temperature)
    tckd_weight = check_weight("tckd_weight", tckd_weight)
    nckd_weight = check_weight("nckd_weight", nckd_weight)
    ce_weight = check_weight("ce_weight", ce_weight)
    s, t = check_pair(student_logits, teacher_logits)
    labels = check_labels(labels, s)
    if s.shape[-1] < 2:
        raise ValueError(f"dkd_loss needs at least 2 classes, got logits shape {s.shape}.")
    gt = jax.nn.one_hot(labels, s.shape[-1], dtype=bool)  # all False for an invalid traced label
    nt = ~gt
    # Every KL below is taken from differences of the raw logits over T (kl_div_logits), exact at
    # high T where differences of log-softmaxes cancel to noise.
    zt, zs = t / temperature, s / temperature
    diff = (t - s) / temperature

    def parts(z):
        lse_all = jax.nn.logsumexp(z, axis=-1)
        lse_nt = jax.nn.logsumexp(jnp.where(nt, z, -jnp.inf), axis=-1)
        log_nontarget = jnp.where(nt, z - lse_nt[..., None], -jnp.inf)  # the renormalised softmax
        log_binary = jnp.stack([jnp.sum(jnp.where(gt, z, 0.0), -1) - lse_all, lse_nt - lse_all], -1)
        return log_nontarget, log_binary

    (log_pn, log_pb), (log_qn, log_qb) = parts(zt), parts(zs)
    # NCKD: KL(p' || q') over the non-target classes.
    nckd, mean_nt = kl_div_logits(log_pn, log_qn, diff, where=nt)
    # TCKD: the binary [target, rest] distributions; the "logits" of rest are the non-target
    # log-sum-exps, whose teacher-minus-student difference is E_p'[diff] - NCKD.
    diff_target = jnp.sum(jnp.where(gt, diff, 0.0), -1)
    tckd, _ = kl_div_logits(log_pb, log_qb, jnp.stack([diff_target, mean_nt - nckd], -1))
    loss = temperature**2 * (tckd_weight * tckd + nckd_weight * nckd)
    if ce_weight > 0:
        loss = loss + ce_weight * cross_entropy(s, labels)
    return jnp.where(valid_labels(labels, s.shape[-1]), loss, jnp.nan)
