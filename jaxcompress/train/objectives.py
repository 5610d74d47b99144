"""Default losses and metrics of the train and eval steps: classification and next-token prediction."""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxcompress.distill.capture import logits_of
from jaxcompress.distill.losses import cross_entropy

#: ``loss_fn(outputs, batch) -> per-example loss`` (any shape; the step takes the mean).
LossFn = Callable[[Any, dict], jax.Array]
#: ``metrics_fn(outputs, batch) -> {name: per-example values}`` (the step takes each mean).
MetricsFn = Callable[[Any, dict], dict]


def classification_loss(outputs: Any, batch: dict) -> jax.Array:
    """Cross-entropy of the logits against ``batch['label']`` (indices or class probabilities).

    Example:
      >>> import jax.numpy as jnp
      >>> round(float(classification_loss(jnp.zeros((1, 2)), {'label': jnp.array([1])})[0]), 4)
      0.6931
    """
    return cross_entropy(logits_of(outputs), batch_field(batch, "label"))


def classification_metrics(outputs: Any, batch: dict) -> dict:
    """``{'accuracy': ...}``: argmax of the logits against ``batch['label']`` (or its argmax).

    Example:
      >>> import jax.numpy as jnp
      >>> classification_metrics(jnp.array([[0., 1.], [1., 0.]]), {'label': jnp.array([1, 1])})
      {'accuracy': Array([1., 0.], dtype=float32)}
    """
    logits = logits_of(outputs)
    labels = batch_field(batch, "label")
    hard = labels if labels.ndim == logits.ndim - 1 else jnp.argmax(labels, -1)
    return {"accuracy": (jnp.argmax(logits, -1) == hard).astype(jnp.float32)}


def masked_mean(values: jax.Array, batch: dict) -> jax.Array:
    """Per-example mean of per-position ``values`` ``(B, T, ...)`` over the positions where
    ``batch['mask']`` (``(B, T, ...)``, 1 real, 0 padding) is set. Without a mask, or with a
    per-example mask ``(B,)`` (which the eval step applies itself), a plain mean."""
    values = values.astype(jnp.float32)
    mask = batch.get("mask") if isinstance(batch, dict) else None
    if mask is None or jnp.ndim(mask) == 1:
        return values.reshape(values.shape[0], -1).mean(-1)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != values.shape:
        raise ValueError(
            f"batch['mask'] has shape {mask.shape} but the per-token values have shape {values.shape}; "
            "give one mask entry per target token (1 real, 0 padding), as eval_windows does, or one per "
            "sequence."
        )
    flat, mask = values.reshape(values.shape[0], -1), mask.reshape(mask.shape[0], -1)
    return jnp.sum(flat * mask, -1) / jnp.maximum(jnp.sum(mask, -1), 1.0)


def token_loss(outputs: Any, batch: dict) -> jax.Array:
    """Next-token cross-entropy of language-model logits, one value per sequence.

    The logits ``(B, T, V)`` are scored against ``batch['targets']`` ``(B, T)``; each sequence's
    value is the mean over its tokens, or over the tokens where ``batch['mask']`` ``(B, T)`` is 1
    when the batch has one (padded evaluation windows). The eval step weights each sequence by
    its number of real tokens, so its ``loss`` is the mean per-token negative log-likelihood in
    nats (see :func:`~jaxcompress.distill.losses.perplexity`).

    Example:
      >>> import jax.numpy as jnp
      >>> batch = {'targets': jnp.array([[1, 0]]), 'mask': jnp.array([[1.0, 0.0]])}
      >>> round(float(token_loss(jnp.zeros((1, 2, 4)), batch)[0]), 4)  # log 4
      1.3863
    """
    return masked_mean(cross_entropy(logits_of(outputs), batch_field(batch, "targets")), batch)


def token_metrics(outputs: Any, batch: dict) -> dict:
    """``{'accuracy': ...}``: per sequence, the fraction of (real) tokens whose argmax is the target.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[[0., 1.], [1., 0.], [0., 1.]]])
      >>> token_metrics(logits, {'targets': jnp.array([[1, 1, 0]]), 'mask': jnp.array([[1., 1., 0.]])})
      {'accuracy': Array([0.5], dtype=float32)}
    """
    logits = logits_of(outputs)
    hits = jnp.argmax(logits, -1) == batch_field(batch, "targets")
    return {"accuracy": masked_mean(hits, batch)}


def batch_field(batch: Any, key: str) -> jax.Array:
    """``batch[key]``, or a ``ValueError`` naming the missing entry and how to use other batches."""
    if not isinstance(batch, dict) or key not in batch:
        raise ValueError(
            f"batch must be a dict with a {key!r} entry, got {type(batch).__name__} with keys "
            f"{sorted(batch) if isinstance(batch, dict) else None}; pass loss_fn= / metrics_fn= "
            "(and Teacher(labels=...)) for batches of another shape."
        )
    return batch[key]
