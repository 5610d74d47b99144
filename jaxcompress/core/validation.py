"""Argument checks shared by the transforms: each raises an error that names the argument."""
from __future__ import annotations

import numbers
from typing import Any

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


def check_bits(name: str, value: Any, *, low: int = 1, high: int = 8) -> int:
    """Checks that ``value`` is an int bit width in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in {low}..{high}, got {type(value).__name__}: {value!r}.")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}. Use e.g. {name}=8 for int8.")
    return int(value)


def check_int(name: str, value: Any, *, minimum: int = 0) -> int:
    """Checks that ``value`` is an int ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {type(value).__name__}: {value!r}.")
    if int(value) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}.")
    return int(value)


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
