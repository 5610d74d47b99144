"""jaxcompress: pruning, quantization and knowledge distillation as pure transforms over JAX pytrees.

Names follow one pattern: transforms are nouns (``pruning``, ``weight_quantization``), losses
end in ``_loss``, functions over arrays are verbs (``fake_quant``, ``binarize``), factories of
functions start with ``make_``. The subpackages hold the rest of each concept.
"""
__version__ = "0.1.0"

from jaxcompress._lazy import lazy_names

# Each public name and the module it comes from. They are imported on first use (PEP 562), so that
# ``import jaxcompress`` and the command line's recipe checks start without loading JAX.
_PUBLIC = {
    # The abstraction: transforms, composition, selection by path rules, self-description.
    "explain": "jaxcompress.core.rules",
    "select": "jaxcompress.core.rules",
    "LeafSpec": "jaxcompress.core.transform",
    "Trainable": "jaxcompress.core.transform",
    "Transform": "jaxcompress.core.transform",
    "UpdateInfo": "jaxcompress.core.transform",
    "chain": "jaxcompress.core.transform",
    "identity": "jaxcompress.core.transform",
    "intercepted": "jaxcompress.core.transform",
    # Pruning.
    "rigl": "jaxcompress.prune.dynamic",
    "set_pruning": "jaxcompress.prune.dynamic",
    "sparse_optimizer": "jaxcompress.prune.optax_adapter",
    "fixed_masks": "jaxcompress.prune.pruner",
    "pruning": "jaxcompress.prune.pruner",
    "straight_through": "jaxcompress.prune.pruner",
    "sparsity_report": "jaxcompress.prune.report",
    "snip_masks": "jaxcompress.prune.saliency",
    "polynomial_schedule": "jaxcompress.prune.schedules",
    "allocate_sparsity": "jaxcompress.prune.sensitivity",
    "sensitivity_analysis": "jaxcompress.prune.sensitivity",
    # Quantization.
    "calibrate_activations": "jaxcompress.quant.activations",
    "fake_quant": "jaxcompress.quant.affine",
    "lsq_quantization": "jaxcompress.quant.lsq",
    "weight_sharing": "jaxcompress.quant.sharing",
    "QuantSpec": "jaxcompress.quant.weights",
    "weight_quantization": "jaxcompress.quant.weights",
    # One-shot (post-training, data-aware) compression.
    "GPTQ": "jaxcompress.oneshot",
    "SparseGPT": "jaxcompress.oneshot",
    "Wanda": "jaxcompress.oneshot",
    "one_shot": "jaxcompress.oneshot",
    # Distillation.
    "capture_apply_fn": "jaxcompress.distill.capture",
    "distill_loss": "jaxcompress.distill.capture",
    "dkd_loss": "jaxcompress.distill.logit_losses",
    "hard_label_kd_loss": "jaxcompress.distill.logit_losses",
    "cross_entropy": "jaxcompress.distill.losses",
    "kd_loss": "jaxcompress.distill.losses",
    "frozen_apply_fn": "jaxcompress.distill.teachers",
    # Training.
    "fit": "jaxcompress.train.loop",
    "data_parallel": "jaxcompress.train.parallel",
    "TrainState": "jaxcompress.train.state",
    "init_train_state": "jaxcompress.train.state",
    "linen_apply_fn": "jaxcompress.train.state",
    "Teacher": "jaxcompress.train.step",
    "classification_loss": "jaxcompress.train.objectives",
    "classification_metrics": "jaxcompress.train.objectives",
    "evaluate": "jaxcompress.train.evaluation",
    "make_eval_step": "jaxcompress.train.evaluation",
    "make_train_step": "jaxcompress.train.step",
    "token_loss": "jaxcompress.train.objectives",
    "token_metrics": "jaxcompress.train.objectives",
    # Export.
    "size_report": "jaxcompress.export.size",
}
__all__ = sorted(_PUBLIC)

__getattr__, __dir__ = lazy_names(__name__, _PUBLIC, globals())
