"""The train step factory: any model, any batch, any loss, with compression and a teacher."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.finite import all_finite
from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import Transform, UpdateInfo, identity, intercepted, trainable_part, with_trainable
from jaxcompress.distill.capture import logits_of
from jaxcompress.train.objectives import LossFn, MetricsFn, batch_field, classification_loss, classification_metrics
from jaxcompress.train.state import ApplyFn, TrainState, check_float_params

class Teacher(NamedTuple):
    """A frozen teacher for distillation.

    Its variables are an argument of the step (``step(state, batch, teacher_variables)``), not a
    part of the :class:`~jaxcompress.train.state.TrainState`: they are never donated, never
    written into a checkpoint, and may be laid out (bfloat16, replicated, sharded) on their own.

    Attributes:
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, model_state)``;
        always called with ``train=False`` (eval mode: BatchNorm running statistics, no dropout).
      loss: ``loss(student_outputs, teacher_outputs, labels=...) -> per-example loss``, e.g.
        ``functools.partial(kd_loss, temperature=4.0, kd_weight=0.9, ce_weight=0.1)``.
      labels: the batch entry passed as ``labels=`` (``None``: the loss gets no labels).
    """

    apply_fn: ApplyFn
    loss: Callable[..., jax.Array]
    labels: Optional[str] = "label"


def _pmean(tree, axis_name):
    return tree if axis_name is None else jax.lax.pmean(tree, axis_name)


def _average_varying(tree, axis_name):
    """The mean over ``axis_name`` of each leaf that differs between devices; leaves that are
    already identical everywhere (synchronised BatchNorm statistics, NNX calibrated ranges, counters)
    are kept as they are, since averaging identical float32 copies can change their value."""
    if axis_name is None:
        return tree

    def average(x):
        same = jnp.all(jax.lax.pmax(x, axis_name) == jax.lax.pmin(x, axis_name))
        mean = jax.lax.pmean(x.astype(jnp.float32) if not jnp.issubdtype(x.dtype, jnp.floating) else x, axis_name)
        return jnp.where(same, x, mean.astype(x.dtype))

    return jax.tree.map(average, tree)


def _mean_metrics(metrics: dict) -> dict:
    return {k: jnp.mean(jnp.asarray(v, jnp.float32)) for k, v in metrics.items()}


def check_batch(batch: Any) -> None:
    """Raises ``ValueError`` when a batch entry has no examples (a leading axis of length 0)."""
    for path, leaf in jax.tree.leaves_with_path(batch):
        shape = jnp.shape(leaf)
        if shape and shape[0] == 0:
            raise ValueError(
                f"batch entry {path_name(path)!r} has 0 examples (shape {shape}); the mean loss of an empty "
                "batch is undefined. Drop empty batches before the step (e.g. a data subset smaller than a batch)."
            )


def check_callable(name: str, value: Any) -> None:
    """Raises ``TypeError`` naming ``name`` when ``value`` is not callable."""
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}: {value!r}.")


def make_train_step(
    apply_fn: ApplyFn,
    optimizer: optax.GradientTransformation,
    *,
    loss_fn: LossFn = classification_loss,
    metrics_fn: Optional[MetricsFn] = classification_metrics,
    transform: Optional[Transform] = None,
    teacher: Optional[Teacher] = None,
    axis_name: Optional[str] = None,
    augment: Optional[Callable[[jax.Array, dict], dict]] = None,
    skip_nonfinite: bool = False,
) -> Callable[..., tuple[TrainState, dict]]:
    """Builds a pure train step ``(TrainState, batch[, teacher_variables]) -> (TrainState, metrics)``.

    One step: the compressed view ``transform.apply(params, state)`` is taken once with
    :func:`jax.vjp`; the model runs on it in training mode; the loss is ``loss_fn(outputs,
    batch)`` or, with a teacher, ``teacher.loss(outputs, teacher_outputs, labels=...)`` with the
    teacher in eval mode under ``stop_gradient``; the gradient at the view (dense: pruned weights
    get one too) is pulled back to the latent params (straight-through where quantized) and to
    the transform's :class:`~jaxcompress.core.transform.Trainable` values; with ``axis_name``
    gradients, model state and metrics are averaged over that axis; the optimizer updates the
    latent params and the trainable values; then ``transform.update`` advances the compression
    state, seeing the dense view gradient in ``UpdateInfo.grads`` (RigL grows by it). A transform
    with an ``intercept`` (activation quantization) runs the model under its interceptor, given
    the step's ``axis_name``; its trainable values (PACT levels) get the gradient of the loss
    through the forward pass too, and what it observed (batch ranges) reaches ``update`` as
    ``UpdateInfo.observed``.

    Args:
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, model_state)``;
        for Flax Linen use :func:`~jaxcompress.train.state.linen_apply_fn`.
      optimizer: an optax optimizer; it trains the params and, with its own state, the
        transform's trainable values.
      loss_fn: ``loss_fn(outputs, batch) -> per-example loss`` (any shape, averaged); the default
        is :func:`classification_loss` on ``batch['label']``.
      metrics_fn: ``metrics_fn(outputs, batch) -> {name: per-example values}`` (each averaged), or
        ``None``; default :func:`classification_metrics`.
      transform: a compression transform (default: none).
      teacher: a :class:`Teacher`; the step then takes ``teacher_variables`` as third argument
        (or uses cached ``batch['teacher_logits']``).
      axis_name: the mapped axis to average over under ``jax.pmap``/``shard_map``; said once:
        the transform's interceptor reduces batch statistics over it too.
      augment: optional ``augment(rng, batch) -> batch`` run inside the step before the forward
        passes, so teacher and student see the same augmented batch (function matching).
      skip_nonfinite: when the loss or any gradient is NaN or inf (one bad pixel, a label out of
        range inside ``jit``), skip the update as ``optax.apply_if_finite`` does: params,
        optimizer states, compression and model state stay as they were and ``step`` does not
        advance (only the rng moves on); the metrics get ``skipped`` (1.0 for a skipped step,
        else 0.0; :func:`~jaxcompress.train.loop.fit` sums them). One compiled program, no
        retracing. Off by default: a non-finite loss then writes NaN into the params.

    Returns:
      The step; wrap it with ``jax.jit(step, donate_argnums=0)`` (the teacher's variables, the
      third argument, are not donated) or use :func:`~jaxcompress.train.parallel.data_parallel`.
      Metrics: ``loss`` and the means of ``metrics_fn``'s values (training mode, on the view),
      and ``skipped`` with ``skip_nonfinite``.

    Raises:
      TypeError: an argument of the wrong kind (at build time), a params leaf that is not
        floating point (at trace time, naming the leaf: integer leaves cannot be trained; keep
        them in ``model_state``). ValueError (at trace time): an empty batch, a teacher without
        teacher variables, a batch without the entries the losses read.
    """
    transform = identity() if transform is None else transform
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a jaxcompress Transform, got {type(transform).__name__}.")
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}.")
    if teacher is not None and not isinstance(teacher, Teacher):
        raise TypeError(f"teacher must be a jaxcompress Teacher(apply_fn, loss), got {type(teacher).__name__}.")
    check_callable("apply_fn", apply_fn)
    check_callable("loss_fn", loss_fn)
    if metrics_fn is not None:
        check_callable("metrics_fn", metrics_fn)
    if augment is not None:
        check_callable("augment", augment)
    if not isinstance(skip_nonfinite, bool):
        raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}: {skip_nonfinite!r}.")

    def teacher_outputs(batch, teacher_variables):
        if "teacher_logits" in batch:
            if augment is not None:
                raise ValueError("batch['teacher_logits'] (cached teacher outputs) cannot be used with augment: "
                                 "the teacher must see each randomly augmented batch. Drop one of the two.")
            return jax.lax.stop_gradient(batch["teacher_logits"])
        if teacher_variables is None:
            raise ValueError("a teacher was given but no teacher_variables: call "
                             "step(state, batch, (teacher_params, teacher_model_state)).")
        t_params, t_state = teacher_variables
        out, _ = teacher.apply_fn(t_params, t_state, batch, train=False, rng=None)
        return jax.lax.stop_gradient(out)

    def step(state: TrainState, batch: dict, teacher_variables: Any = None):
        if not isinstance(state, TrainState):
            raise TypeError(f"state must be a jaxcompress TrainState (init_train_state(...)), got {type(state).__name__}.")
        if teacher is None and teacher_variables is not None:
            raise ValueError("teacher_variables were given to a step built without teacher=; pass "
                             "make_train_step(..., teacher=Teacher(apply_fn, loss)).")
        check_float_params(state.params)
        check_batch(batch)
        rng, step_rng = jax.random.split(state.rng)
        if axis_name is not None:
            step_rng = jax.random.fold_in(step_rng, jax.lax.axis_index(axis_name))
        if augment is not None:
            aug_rng, step_rng = jax.random.split(step_rng)
            batch = augment(aug_rng, batch)
        t_out = None if teacher is None else teacher_outputs(batch, teacher_variables)
        trainable = trainable_part(state.compression_state)

        def view_of(params, trainable):
            return transform.apply(params, with_trainable(state.compression_state, trainable))

        view, pullback = jax.vjp(view_of, state.params, trainable)

        def objective(view, trainable):
            # The transform's interceptor (activation quantization) reads its trainable values
            # (PACT levels) in the forward pass: they get a gradient here as well as through the view.
            observed: dict = {}
            with intercepted(transform, with_trainable(state.compression_state, trainable), train=True,
                             axis_name=axis_name, observed=observed):
                outputs, model_state = apply_fn(view, state.model_state, batch, train=True, rng=step_rng)
            if teacher is None:
                per_example = loss_fn(outputs, batch)
            else:
                if jnp.shape(logits_of(t_out)) != jnp.shape(logits_of(outputs)):
                    raise ValueError(
                        f"teacher outputs {jnp.shape(logits_of(t_out))} and student outputs "
                        f"{jnp.shape(logits_of(outputs))} differ; they must predict the same classes."
                    )
                labels = {} if teacher.labels is None else {"labels": batch_field(batch, teacher.labels)}
                per_example = teacher.loss(outputs, t_out, **labels)
            return jnp.mean(per_example), (outputs, model_state, observed)

        (loss, (outputs, model_state, observed)), (view_grads, direct_grads) = jax.value_and_grad(
            objective, argnums=(0, 1), has_aux=True)(view, trainable)
        view_grads = _pmean(view_grads, axis_name)
        grads, trainable_grads = pullback(view_grads)
        trainable_grads = jax.tree.map(jnp.add, trainable_grads, _pmean(direct_grads, axis_name))
        model_state = _average_varying(model_state, axis_name)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        compression_state, compression_opt_state = state.compression_state, state.compression_opt_state
        if jax.tree.leaves(trainable):
            t_updates, compression_opt_state = optimizer.update(trainable_grads, compression_opt_state, trainable)
            compression_state = with_trainable(compression_state, optax.apply_updates(trainable, t_updates))
        step_count = state.step + 1
        compression_state = transform.update(
            params, compression_state, UpdateInfo(step=step_count, grads=view_grads, observed=observed or None))
        metrics = {"loss": loss}
        if metrics_fn is not None:
            metrics.update(_mean_metrics(metrics_fn(outputs, batch)))
        metrics = _pmean(metrics, axis_name)
        new_state = state._replace(
            step=step_count,
            params=params,
            opt_state=opt_state,
            compression_state=compression_state,
            compression_opt_state=compression_opt_state,
            model_state=model_state,
            rng=rng,
        )
        if skip_nonfinite:
            # the same on every device: the loss and gradients are already averaged over axis_name
            ok = jnp.isfinite(metrics["loss"]) & all_finite((view_grads, trainable_grads))
            new_state = jax.lax.cond(ok, lambda: new_state, lambda: state._replace(rng=rng))
            metrics["skipped"] = jnp.where(ok, 0.0, 1.0).astype(jnp.float32)
        return new_state, metrics

    step.axis_name = axis_name  # read by data_parallel to refuse a step built for another mode
    return step


