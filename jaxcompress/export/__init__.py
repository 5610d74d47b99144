"""Export: stored-size accounting (packing and files come next)."""
from jaxcompress.export.size import SizeReport as SizeReport
from jaxcompress.export.size import leaf_bits as leaf_bits
from jaxcompress.export.size import size_report as size_report
