"""End-to-end recipes built from the library's public pieces."""
from jaxcompress._lazy import lazy_names

# Imported on first use, so that checking a recipe does not load JAX.
_PUBLIC = {
    "DemoConfig": "jaxcompress.recipes.demo",
    "run_demo": "jaxcompress.recipes.demo",
    "report_markdown": "jaxcompress.recipes.report",
    "write_report": "jaxcompress.recipes.report",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
