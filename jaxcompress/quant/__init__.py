"""Quantization: fake quantization with straight-through gradients, QAT and PTQ for weights and activations.

Activation quantization is part of :func:`weight_quantization` (``activation_bits=``,
``QuantSpec`` rule values); :func:`calibrate_activations` fills its ranges.

Transforms are nouns (:func:`weight_quantization`, :func:`lsq_quantization`,
:func:`weight_sharing`); functions over arrays are verbs (:func:`fake_quant`,
:func:`fake_quant_affine`, :func:`binarize`, :func:`ternarize`, :func:`lsq_fake_quant`).
"""
from jaxcompress.quant.activations import calibrate_activations as calibrate_activations
from jaxcompress.quant.affine import EPS as EPS
from jaxcompress.quant.affine import QuantParams as QuantParams
from jaxcompress.quant.affine import affine_qparams as affine_qparams
from jaxcompress.quant.affine import check_finite as check_finite
from jaxcompress.quant.affine import fake_quant as fake_quant
from jaxcompress.quant.affine import fake_quant_affine as fake_quant_affine
from jaxcompress.quant.affine import quant_range as quant_range
from jaxcompress.quant.affine import tensor_qparams as tensor_qparams
from jaxcompress.quant.lowbit import binarize as binarize
from jaxcompress.quant.lowbit import binary_scale as binary_scale
from jaxcompress.quant.lowbit import lsq_fake_quant as lsq_fake_quant
from jaxcompress.quant.lowbit import lsq_init_step as lsq_init_step
from jaxcompress.quant.lowbit import pact as pact
from jaxcompress.quant.lowbit import ternarize as ternarize
from jaxcompress.quant.lowbit import ternary_scale as ternary_scale
from jaxcompress.quant.lsq import LSQState as LSQState
from jaxcompress.quant.lsq import lsq_quantization as lsq_quantization
from jaxcompress.quant.nnx import QuantStat as QuantStat
from jaxcompress.quant.nnx import calibrate_nnx_activations as calibrate_nnx_activations
from jaxcompress.quant.nnx import nnx_apply_fn as nnx_apply_fn
from jaxcompress.quant.nnx import quantize_nnx_activations as quantize_nnx_activations
from jaxcompress.quant.observers import Observer as Observer
from jaxcompress.quant.observers import minmax as minmax
from jaxcompress.quant.observers import moving_average_minmax as moving_average_minmax
from jaxcompress.quant.observers import mse as mse
from jaxcompress.quant.observers import percentile as percentile
from jaxcompress.quant.sharing import SharingState as SharingState
from jaxcompress.quant.sharing import kmeans_1d as kmeans_1d
from jaxcompress.quant.sharing import weight_sharing as weight_sharing
from jaxcompress.quant.weights import QuantSpec as QuantSpec
from jaxcompress.quant.weights import QuantState as QuantState
from jaxcompress.quant.weights import weight_quantization as weight_quantization
