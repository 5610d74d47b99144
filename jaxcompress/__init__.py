"""jaxcompress: pruning, quantization and knowledge distillation as pure transforms over JAX pytrees.

Names follow one pattern: transforms are nouns (``pruning``, ``weight_quantization``), losses
end in ``_loss``, functions over arrays are verbs (``fake_quant``, ``binarize``), factories of
functions start with ``make_``. The subpackages hold the rest of each concept.
"""
__version__ = "0.1.0"

# The abstraction: transforms, composition, selection by path rules, self-description.
from jaxcompress.core.rules import explain as explain
from jaxcompress.core.rules import select as select
from jaxcompress.core.transform import LeafSpec as LeafSpec
from jaxcompress.core.transform import Trainable as Trainable
from jaxcompress.core.transform import Transform as Transform
from jaxcompress.core.transform import UpdateInfo as UpdateInfo
from jaxcompress.core.transform import chain as chain
from jaxcompress.core.transform import identity as identity
from jaxcompress.core.transform import intercepted as intercepted

# Pruning.
from jaxcompress.prune.dynamic import rigl as rigl
from jaxcompress.prune.dynamic import set_pruning as set_pruning
from jaxcompress.prune.optax_adapter import sparse_optimizer as sparse_optimizer
from jaxcompress.prune.pruner import fixed_masks as fixed_masks
from jaxcompress.prune.pruner import pruning as pruning
from jaxcompress.prune.pruner import straight_through as straight_through
from jaxcompress.prune.report import sparsity_report as sparsity_report
from jaxcompress.prune.saliency import snip_masks as snip_masks
from jaxcompress.prune.schedules import polynomial_schedule as polynomial_schedule
from jaxcompress.prune.sensitivity import allocate_sparsity as allocate_sparsity
from jaxcompress.prune.sensitivity import sensitivity_analysis as sensitivity_analysis

# Quantization.
from jaxcompress.quant.activations import calibrate_activations as calibrate_activations
from jaxcompress.quant.affine import fake_quant as fake_quant
from jaxcompress.quant.lsq import lsq_quantization as lsq_quantization
from jaxcompress.quant.sharing import weight_sharing as weight_sharing
from jaxcompress.quant.weights import QuantSpec as QuantSpec
from jaxcompress.quant.weights import weight_quantization as weight_quantization

# One-shot (post-training, data-aware) compression.
from jaxcompress.oneshot import GPTQ as GPTQ
from jaxcompress.oneshot import SparseGPT as SparseGPT
from jaxcompress.oneshot import Wanda as Wanda
from jaxcompress.oneshot import one_shot as one_shot

# Distillation.
from jaxcompress.distill.capture import capture_apply_fn as capture_apply_fn
from jaxcompress.distill.capture import distill_loss as distill_loss
from jaxcompress.distill.logit_losses import dkd_loss as dkd_loss
from jaxcompress.distill.logit_losses import hard_label_kd_loss as hard_label_kd_loss
from jaxcompress.distill.losses import cross_entropy as cross_entropy
from jaxcompress.distill.losses import kd_loss as kd_loss
from jaxcompress.distill.teachers import frozen_apply_fn as frozen_apply_fn

# Training.
from jaxcompress.train.loop import fit as fit
from jaxcompress.train.parallel import data_parallel as data_parallel
from jaxcompress.train.state import TrainState as TrainState
from jaxcompress.train.state import init_train_state as init_train_state
from jaxcompress.train.state import linen_apply_fn as linen_apply_fn
from jaxcompress.train.step import Teacher as Teacher
from jaxcompress.train.objectives import classification_loss as classification_loss
from jaxcompress.train.objectives import classification_metrics as classification_metrics
from jaxcompress.train.evaluation import evaluate as evaluate
from jaxcompress.train.evaluation import make_eval_step as make_eval_step
from jaxcompress.train.step import make_train_step as make_train_step
from jaxcompress.train.objectives import token_loss as token_loss
from jaxcompress.train.objectives import token_metrics as token_metrics

# Export.
from jaxcompress.export.size import size_report as size_report
