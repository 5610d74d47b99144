"""Argument checks shared by the transforms: each raises an error that names the argument."""
from __future__ import annotations

import numbers
from typing import Any, Optional

import jax


def check_fraction(name: str, value: Any, *, allow_one: bool = False) -> float:
    """Checks ``0 <= value < 1`` (or ``<= 1``) and returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number in [0, 1), got {type(value).__name__}: {value!r}.")
    value = float(value)
    upper_ok = value <= 1.0 if allow_one else value < 1.0
    if not (0.0 <= value and upper_ok):
        interval = "[0, 1]" if allow_one else "[0, 1)"
        raise ValueError(
            f"{name} must be in {interval}, got {value}. A sparsity is the fraction of weights set to "
            "zero, e.g. 0.9 for 90%."
        )
    return value


def check_int(name: str, value: Any, *, minimum: int = 0, maximum: Optional[int] = None) -> int:
    """Checks that ``value`` is an int in ``[minimum, maximum]`` (no upper bound when ``None``).

    The one integer check: counts, steps, bit widths (``check_int('bits', b, minimum=2, maximum=8)``).

    Example:
      >>> check_int('bits', 4, minimum=2, maximum=8)
      4
    """
    want = f">= {minimum}" if maximum is None else f"in {minimum}..{maximum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int {want}, got {type(value).__name__}: {value!r}.")
    if int(value) < minimum or (maximum is not None and int(value) > maximum):
        raise ValueError(f"{name} must be {want}, got {value}.")
    return int(value)


def check_axis(name: str, axis: Any, ndim: int) -> Optional[int]:
    """Normalises ``axis`` of an array with ``ndim`` dimensions to ``0..ndim-1`` (``None`` passes).

    Raises:
      TypeError: when ``axis`` is not an int or ``None``.
      ValueError: when the axis does not exist, naming the valid range.

    Example:
      >>> check_axis('channel_axis', -1, 2), check_axis('channel_axis', None, 2)
      (1, None)
    """
    if axis is None:
        return None
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{name} must be an int or None, got {type(axis).__name__}: {axis!r}.")
    if not -ndim <= int(axis) < ndim:
        raise ValueError(
            f"{name}={axis} does not exist for an array with {ndim} dimensions; use an axis in "
            f"[{-ndim}, {ndim - 1}] or None for one scale per tensor."
        )
    return int(axis) % ndim


def check_positive(name: str, value: Any) -> float:
    """Checks that ``value`` is a real number ``> 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}: {value!r}.")
    if not float(value) > 0.0:
        raise ValueError(f"{name} must be > 0, got {value}.")
    return float(value)


def check_same_structure(what: str, tree: Any, params: Any) -> None:
    """Checks that ``tree`` (with ``None`` at untouched leaves) has the structure of ``params``.

    Raises:
      ValueError: naming the leaf paths that differ, or the first leaf whose shape differs.
    """
    from jaxcompress.core.paths import path_name

    is_none = lambda x: x is None  # noqa: E731
    got = {path_name(p): x for p, x in jax.tree.leaves_with_path(tree, is_leaf=is_none)}
    want = {path_name(p): x for p, x in jax.tree.leaves_with_path(params)}
    missing = sorted(set(want) - set(got))
    extra = sorted(set(got) - set(want))
    if missing or extra or jax.tree.structure(tree, is_leaf=is_none).num_leaves != len(want):
        raise ValueError(
            f"{what} and params have different structures: missing in {what}: {missing[:5]}, "
            f"not in params: {extra[:5]}. Build the {what} from these params (transform.init(params))."
        )
    for name, x in got.items():
        if x is None:
            continue
        ws, xs = tuple(getattr(want[name], "shape", ())), tuple(getattr(x, "shape", ()))
        if ws != xs:
            raise ValueError(f"{what} at {name!r} has shape {xs} but the param has shape {ws}.")


def is_prng_key(x: Any) -> bool:
    """Whether ``x`` is a typed JAX PRNG key array (``jax.random.key``).

    Example:
      >>> import jax
      >>> is_prng_key(jax.random.key(0)), is_prng_key(0)
      (True, False)
    """
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
