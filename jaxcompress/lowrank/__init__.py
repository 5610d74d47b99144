"""Low-rank factorization: truncated SVD of kernels, rank choice, and factored models."""
from jaxcompress.lowrank.factored import LowRank as LowRank
from jaxcompress.lowrank.factored import factorize as factorize
from jaxcompress.lowrank.svd import eckart_young_error as eckart_young_error
from jaxcompress.lowrank.svd import factor_kernel as factor_kernel
from jaxcompress.lowrank.svd import factored_size as factored_size
from jaxcompress.lowrank.svd import kernel_matrix as kernel_matrix
from jaxcompress.lowrank.svd import rank_for_energy as rank_for_energy
from jaxcompress.lowrank.svd import ranks_for_budget as ranks_for_budget
from jaxcompress.lowrank.svd import singular_values as singular_values
