"""The library's policy for non-finite values (NaN, +-inf), and the helpers that apply it.

One rule per kind of input, the same in every module:

* **Data the library transforms** (weights, activations, logits' neighbours): a NaN stays local.
  Quantizers compute their ranges, scales, means and codebooks over the finite values only,
  so one NaN weight or pixel gives NaN at its own position and nowhere else; ``+-inf`` clip to
  the ends of the grid (the largest and smallest representable level). Pruning ranks a NaN
  score lowest (it is removed first) and masks set pruned entries to exactly 0, NaN or not.
* **Settings passed as arrays** (a quantizer's step or clipping level, a scale, class labels,
  soft labels, logits given to a loss): checked when concrete, with a ``ValueError`` naming
  the argument; inside ``jit`` (traced) they cannot be read without a host round-trip, so the
  affected values come out NaN instead (a loss is NaN for the example with a bad label), which
  the train step's guard below catches.
* **Python numbers** (weights of losses, temperatures, sparsities): always checked; a NaN
  fails every check (``not (w >= 0)`` refuses it).
* **The train step**: ``make_train_step(..., skip_nonfinite=True)`` skips the whole update
  (params, optimizer, compression and model state) when the loss or any gradient is non-finite
  and reports ``metrics['skipped'] = 1``; without it a NaN batch writes NaN into the params.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x: Any) -> bool:
    """``True`` when ``x`` holds values readable now (not a tracer inside ``jit``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def finite_min_max(x: jax.Array, axis=None, keepdims: bool = False) -> tuple[jax.Array, jax.Array]:
    """Min and max over the finite entries of ``x`` (``(inf, -inf)`` where there are none).

    Example:
      >>> import jax.numpy as jnp
      >>> [float(v) for v in finite_min_max(jnp.array([1.0, jnp.nan, -2.0, jnp.inf]))]
      [-2.0, 1.0]
    """
    ok = jnp.isfinite(x)
    lo = jnp.min(jnp.where(ok, x, jnp.inf), axis=axis, keepdims=keepdims)
    hi = jnp.max(jnp.where(ok, x, -jnp.inf), axis=axis, keepdims=keepdims)
    return lo, hi


def check_finite_positive(name: str, value: Any, fix: str, *, positive: bool = True) -> None:
    """Raises ``ValueError`` when a concrete ``value`` has an entry that is not finite (and
    ``> 0`` when ``positive``). A traced ``value`` passes unchecked (see the module's policy).

    Example:
      >>> check_finite_positive('alpha', [float('nan')], 'start it at 10.')
      Traceback (most recent call last):
      ...
      ValueError: alpha must be finite and > 0, got [nan]; start it at 10.
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, np.float64)
    bad = ~(np.isfinite(arr) & (arr > 0)) if positive else ~np.isfinite(arr)
    if bad.any():
        want = "finite and > 0" if positive else "finite"
        raise ValueError(f"{name} must be {want}, got {arr[bad].ravel()[:3].tolist()}; {fix}")


def all_finite(tree: Any) -> jax.Array:
    """A bool scalar: every float entry of every leaf of ``tree`` is finite (``True`` for none).

    Example:
      >>> import jax.numpy as jnp
      >>> bool(all_finite({'a': jnp.ones(2), 'b': jnp.array([jnp.nan])}))
      False
    """
    ok = jnp.bool_(True)
    for leaf in jax.tree.leaves(tree):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(leaf))
    return ok


def straight_through(x: jax.Array, q: jax.Array) -> jax.Array:
    """Forward value ``q`` exactly, the identity's gradient to ``x``, also where ``x`` is ``+-inf``.

    ``q + (x - stop_gradient(x))`` would be ``inf - inf = NaN`` there; non-finite entries of
    ``x`` get no gradient instead.

    Example:
      >>> import jax.numpy as jnp
      >>> straight_through(jnp.array([0.4, jnp.inf]), jnp.array([0.5, 1.0])).tolist()
      [0.5, 1.0]
    """
    delta = x - jax.lax.stop_gradient(x)
    return jax.lax.stop_gradient(q) + jnp.where(jnp.isfinite(x), delta, jnp.zeros_like(delta))
