"""Feature distillation losses: FitNets hints, attention transfer and relational KD, per example."""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp


def _check_float(name: str, x, min_ndim: int = 2) -> jax.Array:
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a float array of features, got dtype {x.dtype}.")
    if x.ndim < min_ndim:
        raise ValueError(f"{name} must have shape (batch, ...) with ndim >= {min_ndim}, got {x.shape}.")
    return x.astype(jnp.float32)


def init_regressor(rng: jax.Array, student_shape, teacher_shape, *, scale: Optional[float] = None) -> dict:
    """Parameters of a FitNets regressor mapping student features to the teacher's width.

    The regressor is a linear map on the last (channel) axis: a dense layer for ``(N, D)``
    features and a 1x1 convolution for ``(N, H, W, C)`` ones (the same operation). Give it to
    :func:`~jaxcompress.distill.capture.feature_regressors`, whose state holds it as a trainable
    value the step's optimizer trains with the student.

    Args:
      rng: PRNG key.
      student_shape, teacher_shape: feature shapes; all but the last axis must agree.
      scale: init std of the kernel; default ``1 / sqrt(student_channels)`` (LeCun normal).

    Returns:
      ``{'kernel': (c_student, c_teacher), 'bias': (c_teacher,)}`` float32.

    Raises:
      ValueError: if the shapes differ in anything but the channel axis.

    Example:
      >>> import jax
      >>> r = init_regressor(jax.random.key(0), (8, 7, 7, 32), (8, 7, 7, 64))
      >>> r['kernel'].shape, r['bias'].shape
      ((32, 64), (64,))
    """
    student_shape, teacher_shape = tuple(student_shape), tuple(teacher_shape)
    if len(student_shape) != len(teacher_shape) or student_shape[1:-1] != teacher_shape[1:-1]:
        raise ValueError(
            f"a 1x1 regressor maps channels only: student features {student_shape} and teacher features "
            f"{teacher_shape} must agree on every axis but the last; pick layers of the same spatial size."
        )
    c_s, c_t = student_shape[-1], teacher_shape[-1]
    std = (1.0 / c_s) ** 0.5 if scale is None else float(scale)
    return {"kernel": std * jax.random.normal(rng, (c_s, c_t), jnp.float32), "bias": jnp.zeros((c_t,), jnp.float32)}


def apply_regressor(regressor: dict, features: jax.Array) -> jax.Array:
    """Applies :func:`init_regressor` params on the last axis: ``features @ kernel + bias``."""
    out = jnp.einsum("...c,cd->...d", features, regressor["kernel"])
    return out + jnp.expand_dims(regressor["bias"], tuple(range(out.ndim - 1)))  # explicit rank


def hint_loss(student_features: jax.Array, teacher_features: jax.Array, *, regressor: Optional[dict] = None) -> jax.Array:
    """FitNets hint loss (Romero et al., ICLR 2015): mean squared error per example.

    ``mean((r(s) - t)^2)`` over all non-batch axes, with ``r`` the learned regressor (or the
    identity when ``regressor`` is None, which needs equal shapes). The paper's ``1/2 ||.||^2``
    differs by a constant factor; the per-element mean keeps the scale independent of layer size.

    Args:
      student_features: float ``(N, ...)``.
      teacher_features: float ``(N, ...)`` (no gradient).
      regressor: optional :func:`init_regressor` params.

    Returns:
      float32 ``(N,)``.

    Raises:
      ValueError: if the (regressed) student features and the teacher features differ in shape.

    Example:
      >>> import jax.numpy as jnp
      >>> float(hint_loss(jnp.ones((1, 4)), jnp.zeros((1, 4)))[0])
      1.0
    """
    s = _check_float("student_features", student_features)
    t = jax.lax.stop_gradient(_check_float("teacher_features", teacher_features))
    if regressor is not None:
        s = apply_regressor(regressor, s)
    if s.shape != t.shape:
        raise ValueError(
            f"student features {s.shape} and teacher features {t.shape} differ"
            + ("" if regressor is not None else "; add a regressor (init_regressor) to map the student's "
               "channels to the teacher's, or pick layers of equal shape")
            + "."
        )
    return jnp.mean(jnp.square(s - t).reshape(s.shape[0], -1), axis=-1)


def attention_map(features: jax.Array, *, p: float = 2.0) -> jax.Array:
    """Spatial attention map of NHWC features: ``sum_c |A_c|^p``, flattened and L2-normalised.

    Returns:
      float32 ``(N, H*W)`` with unit L2 norm per example.
    """
    x = _check_float("features", features, min_ndim=3)
    q = jnp.sum(jnp.abs(x) ** p, axis=-1).reshape(x.shape[0], -1)
    return q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), 1e-12)


def attention_transfer_loss(student_features: jax.Array, teacher_features: jax.Array, *, p: float = 2.0) -> jax.Array:
    """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), one value per example.

    ``mean_j (Q_s[j] - Q_t[j])^2`` with ``Q`` the normalised :func:`attention_map` (the authors'
    code: ``(at(x) - at(y)).pow(2).mean()``, here before the batch mean). Channel counts may
    differ; spatial sizes must match. The paper weights this by ``beta / 2`` with ``beta = 1e3``.

    Args:
      student_features, teacher_features: float NHWC (or ``(N, L, C)``) features.
      p: exponent of the channel pooling, ``2`` in the paper.

    Returns:
      float32 ``(N,)``.

    Raises:
      ValueError: if batch or spatial sizes differ.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((2, 4, 4, 3))
      >>> attention_transfer_loss(x, 2 * jnp.ones((2, 4, 4, 8))).tolist()
      [0.0, 0.0]
    """
    s = _check_float("student_features", student_features, min_ndim=3)
    t = _check_float("teacher_features", teacher_features, min_ndim=3)
    if s.shape[:-1] != t.shape[:-1]:
        raise ValueError(
            f"attention transfer compares spatial maps: student features {s.shape} and teacher features "
            f"{t.shape} must agree on every axis but channels; pick layers of the same resolution."
        )
    qs, qt = attention_map(s, p=p), jax.lax.stop_gradient(attention_map(t, p=p))
    return jnp.mean(jnp.square(qs - qt), axis=-1)


def _safe_norm(x, axis=-1, keepdims=False):
    """Euclidean norm with a zero (not NaN) gradient at the origin."""
    sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
    pos = sq > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, sq, 1.0)), 0.0)


def _smooth_l1(x, y):
    d = jnp.abs(x - y)
    return jnp.where(d < 1.0, 0.5 * d * d, d - 0.5)


def _embeddings(name, x):
    x = _check_float(name, x)
    return x.reshape(x.shape[0], -1)


def _check_batch(s, t):
    if s.shape[0] != t.shape[0]:
        raise ValueError(f"student and teacher embeddings need the same batch size, got {s.shape[0]} and {t.shape[0]}.")
    if s.shape[0] < 2:
        raise ValueError(f"relational losses compare examples with each other; need a batch of >= 2, got {s.shape[0]}.")


def rkd_distance_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
    """RKD distance loss (Park et al., CVPR 2019), one value per anchor example.

    Pairwise Euclidean distances within the batch, each divided by the mean of the non-zero
    distances, compared with the smooth-L1 (Huber, delta 1) loss. Entry ``i`` is the mean over
    ``j`` of row ``i``; the batch mean equals the paper's loss. Widths may differ between teacher
    and student.

    Args:
      student_embeddings, teacher_embeddings: float ``(N, ...)``, flattened per example, ``N >= 2``.

    Returns:
      float32 ``(N,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
      >>> round(float(rkd_distance_loss(x, 3.0 * x).sum()), 6)  # distances are scale-normalised
      0.0
    """
    s, t = _embeddings("student_embeddings", student_embeddings), _embeddings("teacher_embeddings", teacher_embeddings)
    _check_batch(s, t)

    def dist(e):
        d = _safe_norm(e[:, None, :] - e[None, :, :])
        mean = jnp.sum(d) / jnp.maximum(jnp.sum(d > 0), 1).astype(d.dtype)
        return d / jnp.maximum(mean, 1e-12)

    return jnp.mean(_smooth_l1(dist(s), jax.lax.stop_gradient(dist(t))), axis=-1)


def rkd_angle_loss(student_embeddings: jax.Array, teacher_embeddings: jax.Array) -> jax.Array:
    """RKD angle loss (Park et al., CVPR 2019), one value per vertex example.

    For every triplet ``(i, j, k)``, the cosine of the angle at ``i`` between ``e_j - e_i`` and
    ``e_k - e_i`` (zero when a difference vanishes), compared with the smooth-L1 loss. Entry ``i``
    averages over ``(j, k)``; the batch mean equals the paper's loss. Costs ``O(N^2 D + N^3)``.

    Args:
      student_embeddings, teacher_embeddings: float ``(N, ...)``, flattened per example, ``N >= 2``.

    Returns:
      float32 ``(N,)``.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
      >>> round(float(rkd_angle_loss(x, -5.0 * x).sum()), 6)  # angles are scale- and sign-invariant
      0.0
    """
    s, t = _embeddings("student_embeddings", student_embeddings), _embeddings("teacher_embeddings", teacher_embeddings)
    _check_batch(s, t)

    def angles(e):
        diff = e[None, :, :] - e[:, None, :]  # diff[i, j] = e_j - e_i
        unit = diff / jnp.maximum(_safe_norm(diff, keepdims=True), 1e-12)
        return jnp.einsum("ijd,ikd->ijk", unit, unit)

    per = _smooth_l1(angles(s), jax.lax.stop_gradient(angles(t)))
    return jnp.mean(per.reshape(per.shape[0], -1), axis=-1)
