"""Packages whose public names are imported on first use (PEP 562)."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_names(package: str, names: dict[str, str], namespace: dict) -> tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for ``package``: each of ``names`` (``{name: module}``) is imported
    from its module the first time it is looked up, then kept in the package's ``namespace``.

    Example:
      >>> ns = {}
      >>> getattr_, dir_ = lazy_names("pkg", {"sqrt": "math"}, ns)
      >>> getattr_("sqrt")(9.0), "sqrt" in ns, dir_()
      (3.0, True, ['sqrt'])
    """

    def __getattr__(name: str):
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value  # later lookups skip this function
        return value

    def __dir__():
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
