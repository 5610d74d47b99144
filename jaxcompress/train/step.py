"""The train and eval step factories."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.transform import Transform, UpdateInfo, identity
from jaxcompress.distill.losses import cross_entropy
from jaxcompress.train.state import ApplyFn, TrainState

#: ``loss(student_logits, teacher_logits, labels) -> per-example loss``
TeacherLoss = Callable[..., jax.Array]


class Teacher(NamedTuple):
    """A frozen teacher for distillation.

    Its variables live in ``TrainState.teacher_variables`` (so they are sharded, replicated and
    checkpointed like everything else and are not baked into the compiled step as constants).
    A step jitted with ``donate_argnums=0`` donates them with the rest of the state: to reuse one
    teacher's arrays in several states, give each state a copy (``jax.tree.map(jnp.copy, v)``).

    Attributes:
      apply_fn: ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, model_state)``;
        always called with ``train=False`` (eval mode: BatchNorm running statistics, no dropout).
      loss: ``loss(student_logits, teacher_logits, labels=labels) -> per-example loss``, e.g.
        ``functools.partial(kd_loss, temperature=4.0, kd_weight=0.9, ce_weight=0.1)``.
    """

    apply_fn: ApplyFn
    loss: TeacherLoss


def _unpack(batch):
    if not isinstance(batch, dict) or "image" not in batch or "label" not in batch:
        raise ValueError(
            f"batch must be a dict with 'image' and 'label' arrays, got "
            f"{type(batch).__name__} with keys {list(batch) if isinstance(batch, dict) else None}."
        )
    return batch["image"], batch["label"]


def _logits_of(output):
    """Logits from an apply function's output: plain logits, or a structure with ``.logits``."""
    return getattr(output, "logits", output)


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def make_train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    transform: Optional[Transform] = None,
    teacher: Optional[Teacher] = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    axis_name: Optional[str] = None,
    augment: Optional[Callable[[jax.Array, dict], dict]] = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Builds a pure train step ``(TrainState, batch) -> (TrainState, metrics)``.

    One step: the compressed view ``transform.apply(params, state)`` runs forward in training
    mode; the loss is ``loss_fn(logits, labels)`` or, with a teacher, ``teacher.loss(logits,
    teacher_logits, labels=labels)`` with the teacher in eval mode under ``stop_gradient``;
    gradients flow to the latent params (straight-through where quantized); with ``axis_name``
    gradients, model state (BatchNorm statistics) and metrics are averaged over that axis; the
    optimizer updates the latent params; then ``transform.update`` advances the compression state.

    Args:
      apply_fn: ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, model_state)``;
        for Flax Linen use :func:`~jaxcompress.train.state.linen_apply_fn`.
      optimizer: an optax optimizer.
      transform: a compression transform (default: none).
      teacher: a :class:`Teacher` for distillation; its variables come from the state.
      loss_fn: per-example task loss when there is no teacher.
      axis_name: the mapped axis to average over under ``jax.pmap``/``shard_map``.
      augment: optional ``augment(rng, batch) -> batch`` run inside the step (jitted, per device)
        before the forward passes, so teacher and student see the same augmented batch (function
        matching, Beyer et al. 2022). ``batch['label']`` may become soft (float, ``(..., classes)``)
        when ``loss_fn``/``teacher.loss`` accept that.

    Returns:
      The step function; wrap it with ``jax.jit(step, donate_argnums=0)`` (or ``jax.pmap``).
      Metrics: ``loss`` and ``accuracy`` (training mode, on the compressed view).
    """
    transform = identity() if transform is None else transform
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a jaxcompress Transform, got {type(transform).__name__}.")
    if teacher is not None and not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be a jaxcompress Teacher(apply_fn, loss), got {type(teacher).__name__}.")

    def step(state: TrainState, batch: dict):
        _unpack(batch)
        rng, step_rng = jax.random.split(state.rng)
        if axis_name is not None:
            step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        if augment is not None:
            aug_rng, step_rng = jax.random.split(step_rng)
            batch = augment(aug_rng, batch)
        inputs, labels = _unpack(batch)
        if teacher is not None and "teacher_logits" in batch:
            if augment is not None:
                raise ValueError("batch['teacher_logits'] (cached teacher outputs) cannot be used with augment: "
                                 "the teacher must see each randomly augmented batch. Drop one of the two.")
            t_logits = jax.lax.stop_gradient(batch["teacher_logits"])
        elif teacher is not None:
            if state.teacher_variables is None:
                raise ValueError("a teacher was given but state.teacher_variables is None; pass "
                                 "teacher_variables=(params, model_state) to init_train_state.")
            t_params, t_state = state.teacher_variables
            t_logits, _ = teacher.apply_fn(t_params, t_state, inputs, train=False, rng=None)
            t_logits = jax.lax.stop_gradient(t_logits)

        def objective(params):
            view = transform.apply(params, state.compression_state)
            logits, model_state = apply_fn(view, state.model_state, inputs, train=True, rng=step_rng)
            if teacher is None:
                per_example = loss_fn(logits, labels)
            else:
                if _logits_of(t_logits).shape != _logits_of(logits).shape:
                    raise ValueError(
                        f"teacher logits {_logits_of(t_logits).shape} and student logits "
                        f"{_logits_of(logits).shape} differ; "
                        "teacher and student must predict the same classes."
                    )
                per_example = teacher.loss(logits, t_logits, labels=labels)
            return jnp.mean(per_example), (logits, model_state)

        (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        grads = _pmean(grads, axis_name)
        model_state = _pmean(model_state, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        step_count = state.step + 1
        compression_state = transform.update(
            params, state.compression_state, UpdateInfo(step=step_count, grads=grads)
        )
        hard = labels if labels.ndim == _logits_of(logits).ndim - 1 else jnp.argmax(labels, -1)
        metrics = {"loss": loss, "accuracy": jnp.mean(jnp.argmax(_logits_of(logits), -1) == hard)}
        metrics = _pmean(metrics, axis_name)
        new_state = state._replace(
            step=step_count,
            params=params,
            opt_state=opt_state,
            compression_state=compression_state,
            model_state=model_state,
            rng=rng,
        )
        return new_state, metrics

    return step


def make_eval_step(
    apply_fn: ApplyFn,
    *,
    transform: Optional[Transform] = None,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] = cross_entropy,
    axis_name: Optional[str] = None,
) -> Callable[[TrainState, dict], dict]:
    """Builds an eval step ``(TrainState, batch) -> sums`` on the compressed view in eval mode.

    The batch may carry a ``'mask'`` (1 for real examples, 0 for padding) so a last, padded batch
    has the same shape and does not retrace. Returns sums (``loss_sum``, ``correct``, ``count``)
    that add across batches (and are summed over ``axis_name``); see :func:`evaluate`.
    """
    transform = identity() if transform is None else transform

    def step(state: TrainState, batch: dict):
        inputs, labels = _unpack(batch)
        mask = batch.get("mask", jnp.ones(labels.shape, jnp.float32)).astype(jnp.float32)
        view = transform.apply(state.params, state.compression_state)
        logits, _ = apply_fn(view, state.model_state, inputs, train=False, rng=None)
        logits = _logits_of(logits)
        sums = {
            "loss_sum": jnp.sum(loss_fn(logits, labels) * mask),
            "correct": jnp.sum((jnp.argmax(logits, -1) == labels) * mask),
            "count": jnp.sum(mask),
        }
        return sums if axis_name is None else jax.lax.psum(sums, axis_name)

    return step


def evaluate(eval_step: Callable, state: TrainState, images, labels, *, batch_size: int = 1000) -> dict:
    """Runs a (jitted) eval step over a whole data set, padding the last batch.

    Returns:
      ``{'accuracy': float, 'loss': float, 'count': int}``.
    """
    import numpy as np

    n = len(labels)
    totals = {"loss_sum": 0.0, "correct": 0.0, "count": 0.0}
    for start in range(0, n, batch_size):
        x, y = images[start : start + batch_size], labels[start : start + batch_size]
        pad = batch_size - len(y)
        mask = np.concatenate([np.ones(len(y), np.float32), np.zeros(pad, np.float32)])
        if pad:
            x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
            y = np.concatenate([y, np.zeros((pad,), y.dtype)])
        sums = eval_step(state, {"image": x, "label": y, "mask": mask})
        for k in totals:
            totals[k] += float(sums[k])
    count = totals["count"]
    return {"accuracy": totals["correct"] / count, "loss": totals["loss_sum"] / count, "count": int(count)}
