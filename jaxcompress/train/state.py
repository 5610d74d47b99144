"""The train state and the adapter from Flax Linen modules to the step's apply function."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.transform import Transform, identity

#: ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, new_model_state)``
ApplyFn = Callable[..., tuple[jax.Array, Any]]


class TrainState(NamedTuple):
    """Everything a train step reads and writes, as one pytree.

    Attributes:
      step: int32, optimizer steps done.
      params: the latent (uncompressed) float params.
      opt_state: the optax optimizer state.
      compression_state: the compression transform's state (masks, counters...).
      model_state: non-trainable model collections, e.g. ``{'batch_stats': ...}``; ``{}`` if none.
      rng: PRNG key, split every step (dropout).
      teacher_variables: ``(params, model_state)`` of a frozen teacher, or ``None``.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    compression_state: Any
    model_state: Any
    rng: jax.Array
    teacher_variables: Any = None


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    transform: Optional[Transform] = None,
    model_state: Any = None,
    rng: Any = 0,
    teacher_variables: Any = None,
) -> TrainState:
    """Builds the initial :class:`TrainState`.

    Args:
      params: the model's params (for Linen: ``variables['params']``).
      optimizer: an optax optimizer.
      transform: the compression transform the step will use (its ``init`` runs here).
      model_state: other variable collections (e.g. ``{'batch_stats': ...}``).
      rng: an int seed or a PRNG key.
      teacher_variables: ``(teacher_params, teacher_model_state)`` for distillation.

    Returns:
      A :class:`TrainState` at step 0.
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    transform = identity() if transform is None else transform
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        compression_state=transform.init(params),
        model_state={} if model_state is None else model_state,
        rng=key,
        teacher_variables=teacher_variables,
    )


def split_variables(variables: Any) -> tuple[Any, dict]:
    """Splits Linen ``variables`` into ``(params, model_state)``."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def linen_apply_fn(module: nn.Module, *, rng_collection: str = "dropout") -> ApplyFn:
    """Adapts a Linen module whose ``__call__`` takes ``train: bool`` to the step's apply function.

    In training mode every non-param collection present in ``model_state`` (such as
    ``'batch_stats'``) is mutable and its new value returned; in eval mode nothing changes.

    Args:
      module: a Flax Linen module called as ``module(x, train=...)``.
      rng_collection: the rng name passed for stochastic layers.

    Returns:
      ``apply_fn(params, model_state, inputs, *, train, rng) -> (logits, new_model_state)``.
    """

    def apply_fn(params, model_state, inputs, *, train: bool, rng=None):
        variables = {"params": params, **model_state}
        rngs = {rng_collection: rng} if rng is not None else {}
        if train and model_state:
            logits, new_state = module.apply(
                variables, inputs, train=True, rngs=rngs, mutable=list(model_state.keys())
            )
            return logits, dict(new_state)
        return module.apply(variables, inputs, train=train, rngs=rngs), model_state

    return apply_fn
