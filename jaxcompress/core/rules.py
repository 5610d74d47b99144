"""Choosing which leaves a transform touches: ``(regex, value)`` rules on parameter paths.

Rules are a sequence of ``(pattern, value)`` pairs. For each leaf, the leaf's name
(``'/'.join(path)``, see :func:`~jaxcompress.core.paths.path_name`) is searched with each
pattern in order (:func:`re.search`; anchor with ``^``/``$`` when needed) and the first match
wins. A value of ``None`` or ``False`` leaves the leaf alone; ``True`` applies the transform with
its defaults; other values are per-leaf settings that the transform documents (a sparsity, a bit
width). Only floating-point leaves with ``ndim >= min_ndim`` are candidates: by default that
picks the kernels of dense and convolutional layers and leaves biases and norm scales alone.

:func:`explain` shows, for any params pytree, which rule took which leaf; :func:`decide` is the
same decision over leaf names and shapes alone (it needs no JAX, so a recipe's rules are checked
before JAX is loaded).
"""
from __future__ import annotations

import re
import warnings
from typing import Any, Iterable, NamedTuple, Optional, Sequence

Rules = Sequence[tuple[str, Any]]

#: Every candidate leaf (float, ndim >= 2): all kernels, no biases or norm parameters.
DEFAULT_RULES: Rules = ((r".*", True),)


class LeafDecision(NamedTuple):
    """How the rules decided one leaf.

    Attributes:
      path: the leaf's ``'/'``-joined name.
      shape: its shape.
      dtype: its dtype name.
      rule: index of the rule that matched, or ``None``.
      pattern: that rule's pattern, or ``None``.
      value: the value chosen (``None`` when the leaf is left alone).
      reason: a short explanation (``'rule 0'``, ``'ndim 1 < 2'``, ``'not floating'``, ``'no rule matched'``).
    """

    path: str
    shape: tuple
    dtype: str
    rule: Optional[int]
    pattern: Optional[str]
    value: Any
    reason: str


def _compile(rules: Rules) -> list[tuple[re.Pattern, Any]]:
    if isinstance(rules, (str, bytes)) or not isinstance(rules, Sequence):
        raise TypeError(
            f"rules must be a sequence of (regex, value) pairs, got {type(rules).__name__}: {rules!r}. "
            "Example: rules=[('Dense_0/.*', None), ('.*kernel', True)]."
        )
    compiled = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple) and len(rule) == 2 and isinstance(rule[0], str)):
            raise TypeError(
                f"rules[{i}] must be a (regex: str, value) pair, got {rule!r}."
            )
        try:
            compiled.append((re.compile(rule[0]), rule[1]))
        except re.error as e:
            raise ValueError(f"rules[{i}] has an invalid regex {rule[0]!r}: {e}.") from None
    return compiled


def decide(leaves: Iterable[tuple[str, tuple, str, bool]], rules: Optional[Rules] = None, *,
           min_ndim: int = 2) -> list[LeafDecision]:
    """:func:`explain` over leaves given by name: ``(path, shape, dtype name, is floating)`` each.

    Example:
      >>> [d.reason for d in decide([('fc/kernel', (3, 4), 'float32', True), ('fc/bias', (4,), 'float32', True)],
      ...                           [('^conv', True)])]
      ['no rule matched', 'ndim 1 < 2']
    """
    compiled = _compile(DEFAULT_RULES if rules is None else rules)
    out = []
    for name, shape, dtype, floating in leaves:
        shape = tuple(shape)
        if not floating:
            out.append(LeafDecision(name, shape, dtype, None, None, None, "not floating"))
            continue
        if len(shape) < min_ndim:
            out.append(LeafDecision(name, shape, dtype, None, None, None, f"ndim {len(shape)} < {min_ndim}"))
            continue
        for i, (pattern, value) in enumerate(compiled):
            if pattern.search(name):
                chosen = None if value is False else value
                out.append(LeafDecision(name, shape, dtype, i, pattern.pattern, chosen, f"rule {i}"))
                break
        else:
            out.append(LeafDecision(name, shape, dtype, None, None, None, "no rule matched"))
    return out


def explain(params: Any, rules: Optional[Rules] = None, *, min_ndim: int = 2) -> list[LeafDecision]:
    """Shows which rule took which leaf.

    Args:
      params: any pytree of arrays.
      rules: ``(regex, value)`` pairs, first match wins; defaults to :data:`DEFAULT_RULES`.
      min_ndim: leaves with fewer dimensions are never selected.

    Returns:
      One :class:`LeafDecision` per leaf, in flattening order.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'Dense_0': {'kernel': jnp.ones((3, 4)), 'bias': jnp.ones(4)},
      ...      'Dense_1': {'kernel': jnp.ones((4, 2)), 'bias': jnp.ones(2)}}
      >>> for d in explain(p, [('Dense_1/', None), ('.*', True)]):
      ...     print(d.path, d.value, d.reason)
      Dense_0/bias None ndim 1 < 2
      Dense_0/kernel True rule 1
      Dense_1/bias None ndim 1 < 2
      Dense_1/kernel None rule 0
    """
    import jax
    import jax.numpy as jnp

    from jaxcompress.core.paths import path_name

    def floating(leaf) -> bool:
        dtype = getattr(leaf, "dtype", None)
        return dtype is not None and bool(jnp.issubdtype(dtype, jnp.floating))

    leaves = [(path_name(path), tuple(getattr(leaf, "shape", ())), str(getattr(leaf, "dtype", type(leaf).__name__)),
               floating(leaf)) for path, leaf in jax.tree.leaves_with_path(params)]
    return decide(leaves, rules, min_ndim=min_ndim)


def select(params: Any, rules: Optional[Rules] = None, *, min_ndim: int = 2) -> Any:
    """The value each leaf gets under ``rules``, as a pytree shaped like ``params``.

    Leaves left alone hold ``None``; use ``is_leaf=lambda x: x is None`` when mapping over the
    result together with ``params``.

    Args:
      params: any pytree of arrays.
      rules: ``(regex, value)`` pairs, first match wins; defaults to :data:`DEFAULT_RULES`.
      min_ndim: leaves with fewer dimensions are never selected.

    Returns:
      A pytree with the structure of ``params`` and the chosen value (or ``None``) at each leaf.
    """
    import jax

    decisions = explain(params, rules, min_ndim=min_ndim)
    treedef = jax.tree.structure(params)
    return jax.tree.unflatten(treedef, [d.value for d in decisions])


def format_decisions(decisions: Sequence[LeafDecision]) -> str:
    """Renders :func:`explain`'s output as a Markdown table."""
    lines = ["| path | shape | dtype | value | why |", "| --- | --- | --- | --- | --- |"]
    for d in decisions:
        lines.append(f"| {d.path} | {d.shape} | {d.dtype} | {d.value} | {d.reason} |")
    return "\n".join(lines)


def is_none(x) -> bool:
    """``is_leaf`` predicate that makes ``None`` a leaf when mapping over selections."""
    return x is None


def select_values(params: Any, rules: Optional[Rules], default: Any, check) -> Any:
    """Per-leaf settings under ``rules``: ``True`` -> ``default``, ``None`` -> ``None``, else ``check(value)``.

    Transforms use it to turn rule values into per-leaf settings (a sparsity, a bit width),
    validating explicit values with ``check``.
    """

    def setting(value):
        if value is None:
            return None
        return default if value is True else check(value)

    import jax

    return jax.tree.map(setting, select(params, rules), is_leaf=is_none)


def warn_unused_rules(params: Any, rules: Optional[Rules], what: str, *, min_ndim: int = 2) -> None:
    """Warns (``UserWarning``) listing the rules that select no candidate leaf of ``params``.

    A rule that matches nothing is usually a misspelt layer name. A trailing catch-all (``'.*'``
    or ``''``) is a default, not a guess at a name, and is never reported.

    Args:
      params: the params pytree the rules are meant for.
      rules: ``(regex, value)`` pairs, or ``None`` (nothing to check).
      what: what the rules choose leaves for, used in the message (``'pruning'``, ``'quantization'``).
      min_ndim: as in :func:`explain`.

    Example:
      >>> import warnings, jax.numpy as jnp
      >>> with warnings.catch_warnings(record=True) as w:
      ...     warnings.simplefilter('always')
      ...     warn_unused_rules({'fc': {'kernel': jnp.ones((2, 2))}}, [('^conv', True)], 'pruning')
      >>> print(w[0].message)
      these pruning rules match no float leaf with ndim >= 2: ["0: '^conv'"]. Check the names with jaxcompress.explain(params, rules).
    """
    if rules is None:
        return
    used = {d.rule for d in explain(params, rules, min_ndim=min_ndim) if d.rule is not None}
    unused = [f"{i}: {r[0]!r}" for i, r in enumerate(rules) if i not in used and r[0] not in (".*", "")]
    if unused:
        warnings.warn(
            f"these {what} rules match no float leaf with ndim >= {min_ndim}: {unused}. "
            "Check the names with jaxcompress.explain(params, rules).",
            UserWarning,
            stacklevel=3,
        )


def check_float_targets(params: Any, rules: Optional[Rules], what: str) -> None:
    """Raises ``TypeError`` when a rule explicitly selects a leaf that is not floating point.

    First match wins, so an earlier rule giving the leaf ``None`` (or ``False``) is fine; a
    catch-all (``'.*'`` or ``''``) skips such leaves silently.

    Args:
      params: the params pytree.
      rules: ``(regex, value)`` pairs, or ``None``.
      what: the transform's action for the message (``'pruned'``, ``'quantized'``).

    Example:
      >>> import jax.numpy as jnp
      >>> check_float_targets({'ids': jnp.ones((2, 2), jnp.int32)}, [('ids', True)], 'pruned')
      Traceback (most recent call last):
        ...
      TypeError: rule 'ids' selects 'ids' of dtype int32, which is not floating and cannot be pruned; exclude it or give it the value None.
    """
    if rules is None:
        return
    compiled = _compile(rules)
    for d in explain(params, DEFAULT_RULES, min_ndim=0):
        if d.reason != "not floating":
            continue
        for pattern, value in compiled:
            if not pattern.search(d.path):
                continue
            if pattern.pattern not in (".*", "") and value not in (None, False):
                raise TypeError(
                    f"rule {pattern.pattern!r} selects {d.path!r} of dtype {d.dtype}, which is not floating and "
                    f"cannot be {what}; exclude it or give it the value None."
                )
            break
