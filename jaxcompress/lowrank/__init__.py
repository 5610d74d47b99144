"""Low-rank factorization: truncated SVD of kernels, rank choice, and factored models."""
from jaxcompress._lazy import lazy_names

# Imported on first use: the SVD helpers need only NumPy (a recipe's ranks are checked without JAX).
_PUBLIC = {
    "LowRank": "jaxcompress.lowrank.factored",
    "factorize": "jaxcompress.lowrank.factored",
    "eckart_young_error": "jaxcompress.lowrank.svd",
    "factor_kernel": "jaxcompress.lowrank.svd",
    "factored_size": "jaxcompress.lowrank.svd",
    "kernel_matrix": "jaxcompress.lowrank.svd",
    "rank_for_energy": "jaxcompress.lowrank.svd",
    "ranks_for_budget": "jaxcompress.lowrank.svd",
    "singular_values": "jaxcompress.lowrank.svd",
}
__all__ = sorted(_PUBLIC)
__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
