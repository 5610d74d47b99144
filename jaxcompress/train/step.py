"""The train and eval step factories: any model, any batch, any loss."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.finite import all_finite
from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import Transform, UpdateInfo, identity, intercepted, trainable_part, with_trainable
from jaxcompress.core.validation import check_int
from jaxcompress.distill.capture import logits_of
from jaxcompress.distill.losses import cross_entropy
from jaxcompress.train.state import ApplyFn, TrainState, check_float_params

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
    return cross_entropy(logits_of(outputs), _field(batch, "label"))


def classification_metrics(outputs: Any, batch: dict) -> dict:
    """``{'accuracy': ...}``: argmax of the logits against ``batch['label']`` (or its argmax).

    Example:
      >>> import jax.numpy as jnp
      >>> classification_metrics(jnp.array([[0., 1.], [1., 0.]]), {'label': jnp.array([1, 1])})
      {'accuracy': Array([1., 0.], dtype=float32)}
    """
    logits = logits_of(outputs)
    labels = _field(batch, "label")
    hard = labels if labels.ndim == logits.ndim - 1 else jnp.argmax(labels, -1)
    return {"accuracy": (jnp.argmax(logits, -1) == hard).astype(jnp.float32)}


def _masked_mean(values: jax.Array, batch: dict) -> jax.Array:
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
    return _masked_mean(cross_entropy(logits_of(outputs), _field(batch, "targets")), batch)


def token_metrics(outputs: Any, batch: dict) -> dict:
    """``{'accuracy': ...}``: per sequence, the fraction of (real) tokens whose argmax is the target.

    Example:
      >>> import jax.numpy as jnp
      >>> logits = jnp.array([[[0., 1.], [1., 0.], [0., 1.]]])
      >>> token_metrics(logits, {'targets': jnp.array([[1, 1, 0]]), 'mask': jnp.array([[1., 1., 0.]])})
      {'accuracy': Array([0.5], dtype=float32)}
    """
    logits = logits_of(outputs)
    hits = jnp.argmax(logits, -1) == _field(batch, "targets")
    return {"accuracy": _masked_mean(hits, batch)}


def _field(batch: Any, key: str) -> jax.Array:
    if not isinstance(batch, dict) or key not in batch:
        raise ValueError(
            f"batch must be a dict with a {key!r} entry, got {type(batch).__name__} with keys "
            f"{sorted(batch) if isinstance(batch, dict) else None}; pass loss_fn= / metrics_fn= "
            "(and Teacher(labels=...)) for batches of another shape."
        )
    return batch[key]


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


def _check_callable(name: str, value: Any) -> None:
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
    _check_callable("apply_fn", apply_fn)
    _check_callable("loss_fn", loss_fn)
    if metrics_fn is not None:
        _check_callable("metrics_fn", metrics_fn)
    if augment is not None:
        _check_callable("augment", augment)
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
                labels = {} if teacher.labels is None else {"labels": _field(batch, teacher.labels)}
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
    _check_callable("apply_fn", apply_fn)
    _check_callable("loss_fn", loss_fn)

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
      >>> from jaxcompress.train import init_train_state, linen_apply_fn, make_eval_step
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
    import numpy as np

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
