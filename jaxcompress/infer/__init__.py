"""Compressed inference: integer, weight-only low-bit and sparse paths, measured per layer."""
from jaxcompress.infer.kernels import fold_batch_norm as fold_batch_norm
from jaxcompress.infer.kernels import int8_conv as int8_conv
from jaxcompress.infer.kernels import int8_dot as int8_dot
from jaxcompress.infer.kernels import pack_int4 as pack_int4
from jaxcompress.infer.kernels import quantize as quantize
from jaxcompress.infer.kernels import requantize as requantize
from jaxcompress.infer.kernels import unpack_int4 as unpack_int4
from jaxcompress.infer.layers import PATHS as PATHS
from jaxcompress.infer.layers import Layer as Layer
from jaxcompress.infer.plan import Plan as Plan
from jaxcompress.infer.plan import Prepared as Prepared
from jaxcompress.infer.plan import choose_paths as choose_paths
from jaxcompress.infer.plan import float_plan as float_plan
from jaxcompress.infer.plan import inference_fn as inference_fn
from jaxcompress.infer.plan import inference_program as inference_program
from jaxcompress.infer.plan import prepare as prepare
from jaxcompress.infer.plan import uniform_plan as uniform_plan
