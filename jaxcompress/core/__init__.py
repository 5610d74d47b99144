"""Core: the Transform abstraction, composition and parameter selection rules."""
from jaxcompress._lazy import lazy_names

# Imported on first use: the rules' decision (jaxcompress.core.rules.decide) runs without JAX.
_PUBLIC = {
    "leaf_names": "jaxcompress.core.paths",
    "path_name": "jaxcompress.core.paths",
    "DEFAULT_RULES": "jaxcompress.core.rules",
    "LeafDecision": "jaxcompress.core.rules",
    "decide": "jaxcompress.core.rules",
    "explain": "jaxcompress.core.rules",
    "format_decisions": "jaxcompress.core.rules",
    "select": "jaxcompress.core.rules",
    "Transform": "jaxcompress.core.transform",
    "UpdateInfo": "jaxcompress.core.transform",
    "chain": "jaxcompress.core.transform",
    "identity": "jaxcompress.core.transform",
    "intercepted": "jaxcompress.core.transform",
    "update_info": "jaxcompress.core.transform",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
