"""Knowledge-distillation and classification losses, per example, computed in log space."""
from __future__ import annotations

import math
import numbers
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.finite import is_concrete
from jaxcompress.core.validation import check_positive


#: The temperatures the KD losses accept: outside it ``logits / T`` or ``T^2`` leave float32's
#: accurate range. Inside it, the losses agree with a float64 reference (see :func:`kl_div_logits`).
TEMPERATURE_RANGE = (1e-3, 1e6)
#: How far a row of soft labels may sum from 1 (float32 rounding of mixup or smoothing).
SOFT_LABEL_TOLERANCE = 1e-3


def check_temperature(temperature) -> float:
    """Checks ``temperature`` is a real number in :data:`TEMPERATURE_RANGE` and returns it."""
    temperature = check_positive("temperature", temperature)
    lo, hi = TEMPERATURE_RANGE
    if not lo <= temperature <= hi:
        raise ValueError(
            f"temperature must be in [{lo:g}, {hi:g}], got {temperature}; beyond it float32 loses the "
            "soft targets (typical values are 1 to 20)."
        )
    return temperature


def check_weight(name: str, value) -> float:
    """Checks that a loss weight is a real number ``>= 0`` (NaN refused) and returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number >= 0, got {type(value).__name__}: {value!r}.")
    if not (float(value) >= 0.0 and math.isfinite(float(value))):
        raise ValueError(f"{name} must be >= 0 and finite, got {value}; a negative weight would reward "
                         "the mismatch, e.g. use 0.9.")
    return float(value)


def check_logits(name: str, logits) -> jax.Array:
    """Checks ``logits`` is a float array with a class axis; a concrete one must hold no NaN or +inf
    (``-inf`` is allowed: a class with probability 0)."""
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array of logits, got dtype {logits.dtype}.")
    if logits.ndim < 1:
        raise ValueError(f"{name} must have a class axis (shape (..., num_classes)), got shape {logits.shape}.")
    if is_concrete(logits):
        arr = np.asarray(logits, np.float32)
        bad = np.isnan(arr) | (arr == np.inf)
        if bad.any():
            raise ValueError(
                f"{name} has {int(bad.sum())} NaN or +inf values; the softmax of such logits is undefined. "
                f"Check the model that produced them (use make_train_step(..., skip_nonfinite=True) in training)."
            )
    return logits


def check_labels(labels, logits, *, soft_ok: bool = False) -> jax.Array:
    """Checks labels against ``logits (..., C)``: int indices ``(...)`` in ``[0, C)``, or (with
    ``soft_ok``) float probabilities shaped like the logits, each row >= 0 and summing to 1.

    Concrete labels are checked by value (``ValueError``); traced ones cannot be, and
    :func:`cross_entropy` gives NaN for an example whose label is out of range or whose soft
    labels are not a distribution.
    """
    labels = jnp.asarray(labels)
    if soft_ok and jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == logits.shape:
        if is_concrete(labels):
            arr = np.asarray(labels, np.float64)
            sums = arr.sum(-1)
            if not (np.all(arr >= 0) and np.all(np.abs(sums - 1.0) <= SOFT_LABEL_TOLERANCE)):
                raise ValueError(
                    f"soft labels must be class probabilities (>= 0, each row summing to 1), got min "
                    f"{arr.min():.4g} and row sums in [{sums.min():.4g}, {sums.max():.4g}]; normalise them, e.g. "
                    "labels / labels.sum(-1, keepdims=True), or pass integer class indices."
                )
        return labels
    if not jnp.issubdtype(labels.dtype, jnp.integer):
        also = f" or float class probabilities of the logits' shape {logits.shape}" if soft_ok else ""
        raise TypeError(
            f"labels must be integer class indices{also}, got dtype {labels.dtype} and shape {labels.shape}; "
            "pass argmax of one-hot labels, e.g. labels.argmax(-1)."
        )
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels shape {labels.shape} does not match logits shape {logits.shape} "
            f"(expected {logits.shape[:-1]})."
        )
    if is_concrete(labels) and labels.size:
        arr = np.asarray(labels)
        classes = logits.shape[-1]
        if arr.min() < 0 or arr.max() >= classes:
            raise ValueError(
                f"labels must be class indices in [0, {classes}) for logits with {classes} classes, got values "
                f"in [{arr.min()}, {arr.max()}]; remap them (no negative index counts from the end)."
            )
    return labels


def valid_labels(labels, num_classes: int) -> jax.Array:
    """Per example, whether ``labels`` (int indices, or soft labels over the last axis) are valid."""
    if jnp.issubdtype(labels.dtype, jnp.floating):
        ok = jnp.all(labels >= 0, axis=-1) & (jnp.abs(jnp.sum(labels, -1) - 1.0) <= SOFT_LABEL_TOLERANCE)
        return ok
    return (labels >= 0) & (labels < num_classes)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, one value per example.

    Args:
      logits: float array ``(..., num_classes)``; a concrete one must hold no NaN or +inf.
      labels: int array ``(...)`` of class indices in ``[0, num_classes)``, or float class
        probabilities with the shape of ``logits`` (soft labels, e.g. from
        :func:`~jaxcompress.distill.mixup`), each row ``>= 0`` and summing to 1 (within
        :data:`SOFT_LABEL_TOLERANCE`).

    Returns:
      float array ``(...)``: ``-log softmax(logits)[label]``, or ``-sum(labels * log softmax(logits))``.
      Inside ``jit`` an invalid label gives NaN for its example (it cannot be read there).

    Raises:
      ValueError: concrete labels out of range or soft labels that are not probabilities.

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([1]))[0]), 4)
      0.6931
      >>> round(float(cross_entropy(jnp.array([[0.0, 0.0]]), jnp.array([[0.5, 0.5]]))[0]), 4)
      0.6931
    """
    logits = check_logits("logits", logits)
    labels = check_labels(labels, logits, soft_ok=True)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ok = valid_labels(labels, logits.shape[-1])
    if jnp.issubdtype(labels.dtype, jnp.floating):
        # a class with probability 0 and logit -inf contributes 0, not 0 * -inf
        terms = jnp.where(labels > 0, labels.astype(jnp.float32) * logp, 0.0)
        loss = -jnp.sum(terms, axis=-1)
    else:
        safe = jnp.clip(labels, 0, logits.shape[-1] - 1)
        loss = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(ok, loss, jnp.nan)


def _log_mean_exp_neg(log_p: jax.Array, e: jax.Array) -> jax.Array:
    """``log E_p[exp(-e)]`` over the last axis for ``e`` centred under ``p = exp(log_p)`` (0 where
    ``p`` is 0), clamped at 0 (its true value is ``>= 0`` by Jensen).

    Three forms, each kept finite so the others' gradients stay clean: for ``max|e| < 1e-2`` the
    cumulant series ``k2/2 - k3/6 + k4/24`` (a float32 sum of ``expm1`` would lose everything
    below ``1e-7`` of the mean); for ``max|e| < 20`` ``log1p(E_p[expm1(-e)])``; beyond, the
    log-sum-exp (logits of magnitude ``1e4``).
    """
    p = jnp.exp(log_p)
    amax = jnp.max(jnp.abs(e), axis=-1)
    e2 = e * e
    k2 = jnp.sum(p * e2, axis=-1)
    k3 = jnp.sum(p * e2 * e, axis=-1)
    m4 = jnp.sum(p * e2 * e2, axis=-1)
    series = k2 / 2.0 - k3 / 6.0 + (m4 - 3.0 * k2 * k2) / 24.0
    x = jnp.sum(p * jnp.expm1(-jnp.clip(e, -20.0, 20.0)), axis=-1)
    moderate = jnp.log1p(jnp.maximum(x, -1.0 + 1e-6))
    robust = jax.nn.logsumexp(log_p - e, axis=-1)
    out = jnp.where(amax < 1e-2, series, jnp.where(amax < 20.0, moderate, robust))
    return jnp.maximum(out, 0.0)


def kl_div_logits(
    log_p: jax.Array, log_q: jax.Array, diff: jax.Array, where: Optional[jax.Array] = None
) -> tuple[jax.Array, jax.Array]:
    """``KL(p || q)`` over the last axis (the classes in ``where``, each side renormalised there).

    ``diff = log p - log q`` up to a constant per row, best the difference of the raw logits
    divided by ``T`` (``(t - s) / T``): its precision is then independent of ``T``, where
    ``t / T - s / T`` loses it at high ``T``. ``KL = log E_p[exp(-(diff - E_p[diff]))]`` (the
    constant cancels), computed by :func:`_log_mean_exp_neg`. That identity needs every class
    of ``q`` in the support of ``p``; a row where the teacher rules a class out (``log p = -inf``)
    takes the direct sum ``sum p (log p - log q)`` instead.

    Returns:
      ``(kl, E_p[diff])``.
    """
    inside = jnp.ones(log_p.shape, bool) if where is None else where
    support = inside & (log_p > -jnp.inf)
    p = jnp.where(support, jnp.exp(log_p), 0.0)
    d = jnp.where(support, diff, 0.0)
    mean = jnp.sum(p * d, axis=-1, keepdims=True)
    e = jnp.where(support, d - mean, 0.0)
    stable = _log_mean_exp_neg(jnp.where(support, log_p, -jnp.inf), e)
    direct = jnp.sum(jnp.where(support, p * (jnp.where(support, log_p, 0.0) - jnp.where(support, log_q, 0.0)), 0.0), -1)
    ruled_out = jnp.any(inside & ~support, axis=-1)
    return jnp.where(ruled_out, jnp.maximum(direct, 0.0), stable), mean[..., 0]


def kd_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    labels: Optional[jax.Array] = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
) -> jax.Array:
    """Hinton et al. (2015) distillation loss, one value per example.

    ``kd_weight * T^2 * KL(softmax(t / T) || softmax(s / T)) + ce_weight * CE(s, labels)``.
    The KL term is computed from the difference of the logits (:func:`kl_div_logits`: accurate
    against float64 at every temperature in :data:`TEMPERATURE_RANGE`, and never negative), the
    teacher logits are under ``stop_gradient``, and the ``T^2`` factor (which keeps the soft
    term's gradient scale independent of ``T``) applies to the soft term only. Its gradient with
    respect to the student logits is ``T * (softmax(s/T) - softmax(t/T))``.

    Args:
      student_logits: float array ``(..., num_classes)``.
      teacher_logits: float array of the same shape (no NaN or +inf; ``-inf`` marks a class the
        teacher rules out).
      temperature: ``T`` in :data:`TEMPERATURE_RANGE`.
      labels: int class indices ``(...)`` or class probabilities shaped like the logits (see
        :func:`cross_entropy`); required when ``ce_weight != 0``.
      kd_weight: weight of the soft (distillation) term, finite ``>= 0``.
      ce_weight: weight of the hard-label cross-entropy, finite ``>= 0``.

    Returns:
      float32 array ``(...)``; reduce it yourself (e.g. ``.mean()``).

    Raises:
      ValueError: a temperature outside :data:`TEMPERATURE_RANGE`, a negative or NaN weight,
        shapes that differ, NaN/+inf in concrete logits, invalid concrete labels, or labels
        missing while ``ce_weight != 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 0.5]])
      >>> float(kd_loss(s, s, temperature=4.0)[0])
      0.0
    """
    temperature = check_temperature(temperature)
    kd_weight, ce_weight = check_weight("kd_weight", kd_weight), check_weight("ce_weight", ce_weight)
    student_logits = check_logits("student_logits", student_logits)
    teacher_logits = check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {student_logits.shape} and teacher_logits shape "
            f"{teacher_logits.shape} differ; both need (..., num_classes) with the same classes."
        )
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
    s = student_logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    kl, _ = kl_div_logits(log_p, log_q, (t - s) / temperature)
    loss = kd_weight * kl * temperature**2
    if ce_weight != 0:
        if labels is None:
            raise ValueError(f"labels are required when ce_weight != 0 (got ce_weight={ce_weight}).")
        loss = loss + ce_weight * cross_entropy(student_logits, labels)
    return loss


def perplexity(mean_nll) -> jax.Array:
    """Perplexity ``exp(mean_nll)`` from a mean per-token negative log-likelihood in nats.

    With byte tokens, ``mean_nll / log(2)`` is the bits per byte.

    Args:
      mean_nll: float scalar or array: the mean of :func:`cross_entropy` over the scored tokens
        (e.g. ``sum(nll * mask) / sum(mask)``).

    Returns:
      float32 array of the same shape.

    Example:
      >>> import jax.numpy as jnp
      >>> float(perplexity(jnp.log(256.0)))  # uniform over 256 bytes: 8 bits per byte
      256.0
    """
    mean_nll = jnp.asarray(mean_nll)
    if not jnp.issubdtype(mean_nll.dtype, jnp.floating):
        raise TypeError(f"mean_nll must be a float mean negative log-likelihood in nats, got dtype {mean_nll.dtype}.")
    return jnp.exp(mean_nll.astype(jnp.float32))
