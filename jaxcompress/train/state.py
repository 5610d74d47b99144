"""The train state and the adapter from Flax Linen modules to the step's apply function."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import Transform, identity, trainable_part
from jaxcompress.core.validation import is_prng_key

#: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, new_model_state)``
ApplyFn = Callable[..., tuple[jax.Array, Any]]


class TrainState(NamedTuple):
    """Everything a train step reads and writes, as one pytree.

    Attributes:
      step: int32, optimizer steps done.
      params: the latent (uncompressed) float params.
      opt_state: the optax optimizer state.
      compression_state: the compression transform's state (masks, ranges, counters, and its
        :class:`~jaxcompress.core.transform.Trainable` values).
      compression_opt_state: the optimizer's state for those trainable values.
      model_state: non-trainable model collections, e.g. ``{'batch_stats': ...}``; ``{}`` if none.
      rng: PRNG key, split every step (dropout).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    compression_state: Any
    compression_opt_state: Any
    model_state: Any
    rng: jax.Array


def init_train_state(
    params: Any,
    optimizer: optax.GradientTransformation,
    *,
    transform: Optional[Transform] = None,
    model_state: Any = None,
    rng: Any = 0,
) -> TrainState:
    """Builds the initial :class:`TrainState`.

    Args:
      params: the model's params (for Linen: ``variables['params']``).
      optimizer: an optax optimizer.
      transform: the compression transform the step will use (its ``init`` runs here).
      model_state: other variable collections (e.g. ``{'batch_stats': ...}``).
      rng: an int seed or a PRNG key.

    Returns:
      A :class:`TrainState` at step 0. Its arrays are copies: a step that donates the state never
      deletes the caller's ``params`` or ``model_state``.

    Raises:
      TypeError: a wrong optimizer, transform or rng, or a params leaf that is not floating
        point (named; integer leaves cannot be trained: keep them in ``model_state``).
    """
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"optimizer must be an optax.GradientTransformation, got {type(optimizer).__name__}."
        )
    transform = identity() if transform is None else transform
    if not isinstance(transform, Transform):
        raise TypeError(f"transform must be a jaxcompress Transform, got {type(transform).__name__}.")
    raw_key = isinstance(rng, jax.Array) and rng.dtype == jnp.uint32 and rng.shape == (2,)
    if isinstance(rng, bool) or not (isinstance(rng, int) or is_prng_key(rng) or raw_key):
        raise TypeError(f"rng must be an int seed or a jax.random.key, got {type(rng).__name__}: {rng!r}.")
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    check_float_params(params)
    params = jax.tree.map(jnp.array, params)  # copies: donation must not delete the caller's arrays
    # copies too: a transform may hand back the caller's arrays (fixed_masks(masks)), and a
    # donating step must not delete them
    compression_state = jax.tree.map(jnp.array, transform.init(params))
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=optimizer.init(params),
        compression_state=compression_state,
        compression_opt_state=_init_trainable_opt(optimizer, compression_state),
        model_state={} if model_state is None else jax.tree.map(jnp.array, model_state),
        rng=key,
    )


def check_float_params(params: Any) -> None:
    """Raises ``TypeError`` naming the first params leaf that is not floating point."""
    for path, leaf in jax.tree.leaves_with_path(params):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"params leaf {path_name(path)!r} has dtype {dtype}; gradients train float leaves only. Keep "
                "integer values (counters, indices, tables) in model_state, or cast the leaf to float."
            )


def _init_trainable_opt(optimizer, compression_state):
    """The optimizer's state for the transform's trainable values (``None`` when it has none)."""
    trainable = trainable_part(compression_state)
    return optimizer.init(trainable) if jax.tree.leaves(trainable) else None


def split_variables(variables: Any) -> tuple[Any, dict]:
    """Splits Linen ``variables`` into ``(params, model_state)``."""
    variables = dict(variables)
    params = variables.pop("params")
    return params, variables


def linen_apply_fn(module: nn.Module, *, inputs: str = "image", rng_collection: str = "dropout") -> ApplyFn:
    """Adapts a Linen module whose ``__call__`` takes ``train: bool`` to the step's apply function.

    The module is called on ``batch[inputs]``. In training mode every non-param collection present
    in ``model_state`` (such as ``'batch_stats'``) is mutable and its new value returned; in eval
    mode nothing changes.

    Args:
      module: a Flax Linen module called as ``module(x, train=...)``.
      inputs: the batch entry the module takes (``'image'``; ``'tokens'`` for a language model).
      rng_collection: the rng name passed for stochastic layers.

    Returns:
      ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, new_model_state)``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> m = MLP(features=(4,))
      >>> params = m.init(jax.random.key(0), jnp.zeros((1, 3)))['params']
      >>> out, _ = linen_apply_fn(m)(params, {}, {'image': jnp.ones((2, 3))}, train=False)
      >>> out.shape
      (2, 10)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}.")
    if not isinstance(inputs, str):
        raise TypeError(f"inputs must be the name of a batch entry (str), got {inputs!r}.")

    def apply_fn(params, model_state, batch, *, train: bool, rng=None):
        if not isinstance(batch, dict) or inputs not in batch:
            raise ValueError(
                f"batch must be a dict with an {inputs!r} entry for this model, got "
                f"{sorted(batch) if isinstance(batch, dict) else type(batch).__name__}; build the apply "
                "function with linen_apply_fn(module, inputs=KEY) for another entry."
            )
        x = batch[inputs]
        variables = {"params": params, **model_state}
        rngs = {rng_collection: rng} if rng is not None else {}
        if train and model_state:
            outputs, new_state = module.apply(
                variables, x, train=True, rngs=rngs, mutable=list(model_state.keys())
            )
            return outputs, dict(new_state)
        return module.apply(variables, x, train=train, rngs=rngs), model_state

    return apply_fn
