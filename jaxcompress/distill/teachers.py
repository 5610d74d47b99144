"""Teachers: frozen low-precision forward passes, several teachers at once, cached logits."""
from __future__ import annotations

from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.distill.capture import Outputs, logits_of


def _cast(tree, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if jnp.issubdtype(jnp.result_type(x), jnp.floating) else x, tree)


def frozen_apply_fn(apply_fn: Callable, *, dtype: Optional[Any] = None) -> Callable:
    """A teacher apply function that always runs in eval mode, optionally in low precision.

    The train step already calls teachers with ``train=False``; this wrapper also enforces it for
    use elsewhere, casts float params, model state (BatchNorm running statistics) and inputs to
    ``dtype`` (e.g. ``jnp.bfloat16``: Flax layers then compute in that dtype, halving the
    teacher's memory traffic), and returns float32 logits and features under ``stop_gradient``.

    Args:
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (out, model_state)``.
      dtype: compute dtype, or None to keep the params' own.

    Returns:
      An apply function of the same signature that ignores ``train`` and ``rng``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> from jaxcompress.train import linen_apply_fn
      >>> m = MLP(features=(8,))
      >>> p = m.init(jax.random.key(0), jnp.zeros((1, 4)))['params']
      >>> out, _ = frozen_apply_fn(linen_apply_fn(m), dtype=jnp.bfloat16)(p, {}, {'image': jnp.ones((1, 4))}, train=True)
      >>> out.dtype
      dtype('float32')
    """

    def frozen(params, model_state, batch, *, train: bool = False, rng=None):
        del train, rng
        if dtype is not None:
            params, model_state, batch = _cast(params, dtype), _cast(model_state, dtype), _cast(batch, dtype)
        out, _ = apply_fn(params, model_state, batch, train=False, rng=None)
        return jax.lax.stop_gradient(_cast(out, jnp.float32)), model_state

    return frozen


def stack_teacher_variables(variables: Sequence[tuple[Any, Any]]) -> tuple[tuple, tuple]:
    """``[(params_k, state_k), ...]`` -> ``((params_1, ...), (state_1, ...))`` for ``TrainState``."""
    variables = list(variables)
    if not variables or any(not isinstance(v, tuple) or len(v) != 2 for v in variables):
        raise ValueError("variables must be a non-empty list of (params, model_state) pairs, one per teacher.")
    return tuple(v[0] for v in variables), tuple(v[1] for v in variables)


def multi_teacher_apply_fn(apply_fns: Sequence[Callable], *, combine: str = "mean_logits") -> Callable:
    """One apply function for several frozen teachers (variables from :func:`stack_teacher_variables`).

    Two ways to combine, both documented choices from the multi-teacher literature:

    - ``'mean_logits'``: the teachers' logits are averaged (an ensemble teacher, Hinton et al. 2015
      section 4); any logit loss then applies unchanged.
    - ``'sum_losses'``: the output is :class:`Outputs` with the mean logits and
      ``features['teacher_logits']`` stacked ``(K, N, C)``; wrap the loss with
      :func:`sum_over_teachers` so the per-teacher losses are summed (You et al. 2017 average
      them; divide the weights by ``K`` for that).

    Raises:
      ValueError: an unknown ``combine``, no teachers, or (at trace time) teachers whose logits
        differ in shape (different class counts).
    """
    apply_fns = list(apply_fns)
    if not apply_fns:
        raise ValueError("apply_fns must list at least one teacher apply function.")
    if combine not in ("mean_logits", "sum_losses"):
        raise ValueError(f"combine must be 'mean_logits' or 'sum_losses', got {combine!r}.")

    def apply_fn(params, model_state, batch, *, train: bool = False, rng=None):
        if len(params) != len(apply_fns) or len(model_state) != len(apply_fns):
            raise ValueError(
                f"{len(apply_fns)} teachers but {len(params)} params and {len(model_state)} model states; "
                "build teacher_variables with stack_teacher_variables([(params, state), ...])."
            )
        logits = [logits_of(f(p, s, batch, train=False, rng=None)[0]) for f, p, s in zip(apply_fns, params, model_state)]
        shapes = {tuple(l.shape) for l in logits}
        if len(shapes) != 1:
            raise ValueError(f"teachers predict different shapes {[tuple(l.shape) for l in logits]}; all teachers "
                             "must predict the same classes.")
        stacked = jnp.stack([l.astype(jnp.float32) for l in logits])
        mean = jnp.mean(stacked, axis=0)
        out = mean if combine == "mean_logits" else Outputs(mean, {"teacher_logits": stacked})
        return out, model_state

    return apply_fn


def sum_over_teachers(loss: Callable) -> Callable:
    """Turns a logit loss into ``sum_k loss(student_logits, teacher_k_logits, labels=labels)``.

    For use with ``multi_teacher_apply_fn(..., combine='sum_losses')``.
    """

    def summed(student_out, teacher_out, *, labels=None):
        if not isinstance(teacher_out, Outputs) or "teacher_logits" not in teacher_out.features:
            raise ValueError("sum_over_teachers needs multi_teacher_apply_fn(..., combine='sum_losses') outputs.")
        s = logits_of(student_out)
        stacked = teacher_out.features["teacher_logits"]
        return sum(loss(s, stacked[k], labels=labels) for k in range(stacked.shape[0]))

    return summed


class TeacherLogitCache(NamedTuple):
    """Teacher logits for a fixed, un-augmented input set.

    Attributes:
      logits: float32 ``(N, num_classes)``, row ``i`` for input ``i``.
      num_inputs: ``N``, checked against the data it is used with.
    """

    logits: np.ndarray
    num_inputs: int


def cache_teacher_logits(
    apply_fn: Callable, variables: tuple, images: np.ndarray, *, batch_size: int = 1000, inputs: str = "image"
) -> TeacherLogitCache:
    """Runs the frozen teacher once over ``images`` (given to it as ``batch[inputs]``) and keeps its logits.

    Only valid while the student sees exactly these inputs: with random augmentation the teacher
    must see each augmented view (function matching), so :func:`batches_with_teacher_logits` and
    the train step refuse a cache when ``augment`` is set.

    Returns:
      A :class:`TeacherLogitCache`.
    """
    params, model_state = variables
    fn = jax.jit(lambda x: logits_of(apply_fn(params, model_state, {inputs: x}, train=False, rng=None)[0]))
    out = [np.asarray(fn(images[i : i + batch_size]), np.float32) for i in range(0, len(images), batch_size)]
    return TeacherLogitCache(np.concatenate(out), len(images))


def batches_with_teacher_logits(
    cache: TeacherLogitCache,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_epochs: int = 1,
    seed: int = 0,
    augment: Optional[Callable] = None,
) -> Iterator[dict]:
    """Shuffled batches ``{'image', 'label', 'teacher_logits'}``; the step then skips the teacher.

    Raises:
      ValueError: if ``augment`` is given (cached logits would not match augmented inputs) or the
        cache was built for a different number of inputs.
    """
    if augment is not None:
        raise ValueError("cached teacher logits are for fixed inputs; with random augmentation the teacher must "
                         "run on every augmented batch (function matching). Drop the cache or the augmentation.")
    if cache.num_inputs != len(images) or len(labels) != len(images):
        raise ValueError(f"the cache holds {cache.num_inputs} teacher outputs but got {len(images)} images and "
                         f"{len(labels)} labels; build it from these images.")
    from jaxcompress.data.batching import epochs

    for batch in epochs(np.arange(len(images)), labels, batch_size, seed=seed, num_epochs=num_epochs):
        idx = np.asarray(batch["image"])
        yield {"image": images[idx], "label": batch["label"], "teacher_logits": cache.logits[idx]}
