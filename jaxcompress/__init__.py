"""jaxcompress: pruning, quantization and knowledge distillation as pure transforms over JAX pytrees."""
from jaxcompress.core.rules import explain as explain
from jaxcompress.core.rules import select as select
from jaxcompress.core.transform import Transform as Transform
from jaxcompress.core.transform import UpdateInfo as UpdateInfo
from jaxcompress.core.transform import chain as chain
from jaxcompress.core.transform import identity as identity
from jaxcompress.distill.losses import cross_entropy as cross_entropy
from jaxcompress.distill.losses import kd_loss as kd_loss
from jaxcompress.export.size import size_report as size_report
from jaxcompress.prune.magnitude import fixed_masks as fixed_masks
from jaxcompress.prune.magnitude import magnitude_pruning as magnitude_pruning
from jaxcompress.prune.schedules import polynomial_schedule as polynomial_schedule
from jaxcompress.quant.fake_quant import fake_quant_symmetric as fake_quant_symmetric
from jaxcompress.quant.weights import weight_quantization as weight_quantization
from jaxcompress.train.state import TrainState as TrainState
from jaxcompress.train.state import init_train_state as init_train_state
from jaxcompress.train.state import linen_apply_fn as linen_apply_fn
from jaxcompress.train.step import Teacher as Teacher
from jaxcompress.train.step import make_eval_step as make_eval_step
from jaxcompress.train.step import make_train_step as make_train_step
from jaxcompress.quant.activations import calibrate_activations as calibrate_activations
from jaxcompress.quant.activations import quantize_activations as quantize_activations
from jaxcompress.quant.affine import fake_quant as fake_quant
from jaxcompress.quant.qat import quantize_weights as quantize_weights
from jaxcompress.quant.sharing import weight_sharing as weight_sharing

__version__ = "0.1.0"
