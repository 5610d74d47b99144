"""Knowledge-distillation and classification losses, per example, computed in log space."""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_positive


def check_logits(name: str, logits) -> jax.Array:
    logits = jnp.asarray(logits)
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array of logits, got dtype {logits.dtype}.")
    if logits.ndim < 1:
        raise ValueError(f"{name} must have a class axis (shape (..., num_classes)), got shape {logits.shape}.")
    return logits


def check_labels(labels, logits, *, soft_ok: bool = False) -> jax.Array:
    labels = jnp.asarray(labels)
    if soft_ok and jnp.issubdtype(labels.dtype, jnp.floating) and labels.shape == logits.shape:
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
    return labels


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy, one value per example.

    Args:
      logits: float array ``(..., num_classes)``.
      labels: int array ``(...)`` of class indices, or float class probabilities with the shape
        of ``logits`` (soft labels, e.g. from :func:`~jaxcompress.distill.mixup`); each row should
        sum to 1 (not checked, to stay traceable).

    Returns:
      float array ``(...)``: ``-log softmax(logits)[label]``, or ``-sum(labels * log softmax(logits))``.

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
    if jnp.issubdtype(labels.dtype, jnp.floating):
        return -jnp.sum(labels.astype(jnp.float32) * logp, axis=-1)
    return -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]


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
    The KL term is computed from log-softmaxes (no ``log(0)``), the teacher logits are under
    ``stop_gradient``, and the ``T^2`` factor (which keeps the soft term's gradient scale
    independent of ``T``) applies to the soft term only. Its gradient with respect to the
    student logits is ``T * (softmax(s/T) - softmax(t/T))``.

    Args:
      student_logits: float array ``(..., num_classes)``.
      teacher_logits: float array of the same shape.
      temperature: ``T > 0``.
      labels: int class indices ``(...)`` or class probabilities shaped like the logits (see
        :func:`cross_entropy`); required when ``ce_weight != 0``.
      kd_weight: weight of the soft (distillation) term, ``>= 0``.
      ce_weight: weight of the hard-label cross-entropy, ``>= 0``.

    Returns:
      float32 array ``(...)``; reduce it yourself (e.g. ``.mean()``).

    Raises:
      ValueError: if ``temperature <= 0``, a weight is negative, shapes differ, or labels are
        missing while ``ce_weight != 0``.

    Example:
      >>> import jax.numpy as jnp
      >>> s = jnp.array([[1.0, 2.0, 0.5]])
      >>> float(kd_loss(s, s, temperature=4.0)[0])
      0.0
    """
    temperature = check_positive("temperature", temperature)
    for name, w in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f"{name} must be a number >= 0, got {w!r}.")
    student_logits = check_logits("student_logits", student_logits)
    teacher_logits = check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits shape {student_logits.shape} and teacher_logits shape "
            f"{teacher_logits.shape} differ; both need (..., num_classes) with the same classes."
        )
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    # KL(p || q) = log sum_i p_i exp(-e_i), with d = t - s and e = d - E_p[d] centred, written with
    # log1p/expm1: the difference of two log-softmaxes loses precision at high T, this does not.
    # When some e_i is large (logits of magnitude 1e4), the plain log-sum-exp form is used instead;
    # both branches are kept finite so the unused one cannot poison the gradient with NaN.
    log_p = jax.nn.log_softmax(t, axis=-1)
    p = jnp.exp(log_p)
    d = t - s
    e = d - jnp.sum(p * d, axis=-1, keepdims=True)
    moderate = jnp.all(jnp.abs(e) < 20.0, axis=-1)
    x = jnp.sum(p * jnp.expm1(-jnp.clip(e, -20.0, 20.0)), axis=-1)
    precise = jnp.log1p(jnp.maximum(x, -1.0 + 1e-6))
    robust = jax.nn.logsumexp(log_p - e, axis=-1)
    soft = jnp.where(moderate, precise, robust) * temperature**2
    loss = kd_weight * soft
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
