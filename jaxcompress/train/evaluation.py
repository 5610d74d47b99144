"""The eval step factory and the evaluation of a whole data set."""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.transform import Transform, identity, intercepted
from jaxcompress.core.validation import check_int
from jaxcompress.train.objectives import LossFn, MetricsFn, classification_loss, classification_metrics
from jaxcompress.train.state import ApplyFn, TrainState
from jaxcompress.train.step import check_callable

def make_eval_step(
    apply_fn: ApplyFn,
    *,
    transform: Optional[Transform] = None,
    loss_fn: LossFn = classification_loss,
    metrics_fn: Optional[MetricsFn] = classification_metrics,
    axis_name: Optional[str] = None,
) -> Callable[[TrainState, dict], dict]:
    """Builds an eval step ``(TrainState, batch) -> sums`` on the compressed view in eval mode.

    The batch may carry a ``'mask'`` so a last, padded batch has the same shape and does not
    retrace: either per-example weights ``(B,)`` (1 for real examples, 0 for padding), or
    per-position weights such as ``(B, T)`` for token batches
    (:func:`~jaxcompress.data.text.eval_windows`). With per-position weights the sums count
    positions: an example weighs its number of real positions, so its per-example values must be
    means over those positions (as :func:`token_loss` and :func:`token_metrics` compute them),
    and values of the mask's own shape are summed where the mask is set; ``loss / count`` is
    then the mean per-token loss.

    Returns sums that add across batches (and are summed over ``axis_name``): ``count``,
    ``loss_sum`` and one ``NAME_sum`` per metric; see :func:`evaluate`.
    """
    transform = identity() if transform is None else transform
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a jaxcompress Transform, got {type(transform).__name__}.")
    check_callable("apply_fn", apply_fn)
    check_callable("loss_fn", loss_fn)

    def step(state: TrainState, batch: dict):
        view = transform.apply(state.params, state.compression_state)
        with intercepted(transform, state.compression_state, train=False, axis_name=axis_name):
            outputs, _ = apply_fn(view, state.model_state, batch, train=False, rng=None)
        per_example = {"loss": loss_fn(outputs, batch)}
        if metrics_fn is not None:
            per_example.update(metrics_fn(outputs, batch))
        n = jnp.shape(per_example["loss"])[0]
        mask = jnp.asarray(batch.get("mask", jnp.ones((n,), jnp.float32)), jnp.float32)
        if mask.ndim == 0 or mask.shape[0] != n:
            raise ValueError(
                f"batch['mask'] must have the batch's {n} examples on its first axis, got shape {mask.shape}; "
                "give (B,) per-example or (B, T, ...) per-position weights."
            )
        # Per-example weights: the example's mask itself, or its number of real positions.
        weights = mask if mask.ndim == 1 else mask.reshape(n, -1).sum(-1)

        def weighted_sum(v):
            v = jnp.asarray(v, jnp.float32)
            if mask.ndim > 1 and v.shape == mask.shape:
                return jnp.sum(v * mask)
            return jnp.sum(v.reshape(v.shape[0], -1).mean(-1) * weights)

        sums = {f"{k}_sum": weighted_sum(v) for k, v in per_example.items()}
        sums["count"] = jnp.sum(weights)
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return step


def evaluate(eval_step: Callable, state: TrainState, data: Any, *, batch_size: int = 1000) -> dict:
    """Runs a (jitted) eval step over a whole data set.

    Args:
      eval_step: from :func:`make_eval_step` (jitted).
      state: the train state.
      data: a dict of arrays with one leading example axis, e.g. ``{'image': x, 'label': y}``,
        cut here into batches of ``batch_size`` with the last one padded (a ``'mask'`` entry of
        the data, e.g. per-token weights, is kept and padded with 0; without one a per-example
        ``'mask'`` is added); or an iterable of ready batch dicts of one shape, padded by their
        own ``'mask'``, such as :func:`~jaxcompress.data.text.eval_windows` for token batches.
      batch_size: examples per call for a dict; unused for an iterable of batches.

    Returns:
      ``{'loss': float, METRIC: float, ..., 'count': int}``: means over the real examples (over
      the real positions with a per-position mask) and their number.

    Raises:
      ValueError: an empty data set, arrays of different lengths, or ``batch_size < 1``.

    Example:
      >>> import jax, numpy as np
      >>> from jaxcompress.models import TransformerLM
      >>> from jaxcompress.train import init_train_state, linen_apply_fn, make_eval_step, token_loss, token_metrics
      >>> from jaxcompress.data.text import eval_windows
      >>> import optax
      >>> model = TransformerLM(vocab_size=16, max_len=4, dim=8, depth=1, heads=2)
      >>> params = model.init(jax.random.key(0), np.zeros((1, 4), np.int32))['params']
      >>> step = jax.jit(make_eval_step(linen_apply_fn(model, inputs='tokens'), loss_fn=token_loss,
      ...                               metrics_fn=token_metrics))
      >>> out = evaluate(step, init_train_state(params, optax.sgd(0.1)),
      ...                eval_windows(np.arange(11) % 16, batch_size=2, seq_len=4))
      >>> out['count']  # every one of the 10 next-token targets, once
      10
    """
    totals: dict = {}
    for batch in _batches_of(data, batch_size):
        for k, v in eval_step(state, batch).items():
            totals[k] = totals.get(k, 0.0) + float(v)
    if not totals:
        raise ValueError("evaluate got an empty iterable of batches; pass at least one batch.")
    count = totals.pop("count")
    out = {k[: -len("_sum")]: v / count for k, v in totals.items()}
    out["count"] = int(count)
    return out


def _batches_of(data: Any, batch_size: int):
    """The batches :func:`evaluate` runs: ``data`` itself when it is an iterable of batches, else
    fixed-size slices of a dict of arrays with the last one padded and masked."""


    if not isinstance(data, dict):
        if isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise ValueError(
                f"data must be a dict of arrays or an iterable of batch dicts, got {type(data).__name__}."
            )
        yield from data
        return
    batch_size = check_int("batch_size", batch_size, minimum=1)
    if not data:
        raise ValueError("data must be a non-empty dict of arrays, got an empty dict.")
    sizes = {k: len(v) for k, v in data.items()}
    n = next(iter(sizes.values()))
    if len(set(sizes.values())) != 1:
        raise ValueError(f"data's arrays must have the same length, got {sizes}.")
    if n == 0:
        raise ValueError("evaluate got an empty data set (0 examples).")
    batch_size = min(int(batch_size), n)
    for start in range(0, n, batch_size):
        batch = {k: np.asarray(v[start : start + batch_size]) for k, v in data.items()}
        real = len(next(iter(batch.values())))
        pad = batch_size - real
        if pad:
            batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
        if "mask" not in data:
            batch["mask"] = np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])
        yield batch
