"""One-shot, data-aware compression from calibration data: Wanda, SparseGPT, GPTQ, AWQ, SmoothQuant, rotations.

:func:`one_shot` is the one call; :func:`calibrate_layers` collects the layer input statistics
(data-parallel over a ``'data'`` mesh); the array-level functions (:func:`sparsegpt`,
:func:`gptq`, :func:`wanda_mask`) work on one kernel and its statistics inside the user's own code.
"""
from jaxcompress.oneshot.api import AWQ as AWQ
from jaxcompress.oneshot.api import GPTQ as GPTQ
from jaxcompress.oneshot.api import RTN as RTN
from jaxcompress.oneshot.api import Rotation as Rotation
from jaxcompress.oneshot.api import SmoothQuant as SmoothQuant
from jaxcompress.oneshot.api import OneShotResult as OneShotResult
from jaxcompress.oneshot.api import SparseGPT as SparseGPT
from jaxcompress.oneshot.api import Wanda as Wanda
from jaxcompress.oneshot.api import one_shot as one_shot
from jaxcompress.oneshot.api import split_pipeline as split_pipeline
from jaxcompress.oneshot.calibration import LayerStats as LayerStats
from jaxcompress.oneshot.calibration import calibrate_layers as calibrate_layers
from jaxcompress.oneshot.calibration import input_stats as input_stats
from jaxcompress.oneshot.folds import check_folds as check_folds
from jaxcompress.oneshot.folds import fold_groups as fold_groups
from jaxcompress.oneshot.folds import fold_scales as fold_scales
from jaxcompress.oneshot.grid import Grid as Grid
from jaxcompress.oneshot.grid import GridState as GridState
from jaxcompress.oneshot.grid import grid_quantization as grid_quantization
from jaxcompress.oneshot.obs import LayerResult as LayerResult
from jaxcompress.oneshot.obs import gptq as gptq
from jaxcompress.oneshot.obs import sparsegpt as sparsegpt
from jaxcompress.oneshot.rotate import rotate_transformer as rotate_transformer
from jaxcompress.oneshot.smooth import AWQSearch as AWQSearch
from jaxcompress.oneshot.smooth import awq_clip as awq_clip
from jaxcompress.oneshot.smooth import awq_scales as awq_scales
from jaxcompress.oneshot.smooth import smoothquant_scales as smoothquant_scales
from jaxcompress.oneshot.wanda import wanda_mask as wanda_mask
from jaxcompress.oneshot.wanda import wanda_scores as wanda_scores
