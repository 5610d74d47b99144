"""Names for pytree leaves: the ``'/'``-joined path that selection rules match against."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax


def path_name(path: tuple) -> str:
    """Turns a JAX key path into a ``'/'``-joined name such as ``'Dense_0/kernel'``.

    Example:
      >>> import jax
      >>> [path_name(p) for p, _ in jax.tree.leaves_with_path({'a': {'b': 1}, 'c': [2]})]
      ['a/b', 'c/0']
    """
    return jax.tree_util.keystr(path, simple=True, separator="/")


def leaf_names(tree: Any) -> list[str]:
    """The names of every leaf of ``tree``, in flattening order."""
    return [path_name(p) for p, _ in jax.tree.leaves_with_path(tree)]


def get_path(tree: Any, path: str) -> Any:
    """The node of nested mappings at a ``'/'``-joined ``path`` (``'conv1/kernel'``), or ``None``.

    Example:
      >>> get_path({'a': {'b': 1}}, 'a/b'), get_path({'a': {'b': 1}}, 'a/c')
      (1, None)
    """
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node
