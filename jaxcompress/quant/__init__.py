"""Quantization: fake quantization with straight-through gradients, and QAT transforms."""
from jaxcompress.quant.fake_quant import fake_quant_symmetric as fake_quant_symmetric
from jaxcompress.quant.fake_quant import qmax as qmax
from jaxcompress.quant.fake_quant import quantize_symmetric as quantize_symmetric
from jaxcompress.quant.fake_quant import symmetric_scale as symmetric_scale
from jaxcompress.quant.weights import QuantState as QuantState
from jaxcompress.quant.weights import bit_widths as bit_widths
from jaxcompress.quant.weights import weight_quantization as weight_quantization
