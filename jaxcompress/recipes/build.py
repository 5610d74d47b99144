"""A recipe stage's settings as the library's objects: its optimizer, augmentation, distillation
loss, pruner with its schedule, and weight quantizer, each built from the checked stage dict
(``recipes/schema.py``) the runner holds."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import numpy as np
import optax

from jaxcompress.core.transform import Transform
from jaxcompress.distill.logit_losses import dkd_loss
from jaxcompress.distill.losses import kd_loss
from jaxcompress.distill.matching import compose, input_dropout, mixup, random_shift
from jaxcompress.prune import erk_sparsities, pruning, sparsity_rules
from jaxcompress.prune.schedules import iterative_schedule, one_shot_schedule, polynomial_schedule
from jaxcompress.prune.structures import NM, Channels, Unstructured
from jaxcompress.quant.weights import weight_quantization


def distill_loss(stage: dict):
    """The per-example loss of a stage with a teacher: Hinton KD, or decoupled KD with ``loss = 'dkd'``."""
    if stage.get("loss") == "dkd":
        return functools.partial(dkd_loss, temperature=stage["temperature"], tckd_weight=stage["tckd_weight"],
                                 nckd_weight=stage["nckd_weight"], ce_weight=stage["ce_weight"])
    return functools.partial(kd_loss, temperature=stage["temperature"], kd_weight=stage["kd_weight"],
                             ce_weight=stage["ce_weight"])


def optimizer(stage: dict, num_steps: int):
    """The stage's optimizer; ``weight_decay`` adds that multiple of every kernel (ndim >= 2) to its
    gradient before the optimizer sees it (L2 regularisation as Caffe applies it), and ``grad_clip``
    first scales the gradient to at most that global norm."""
    lr = stage["learning_rate"]
    if stage["lr_schedule"] == "cosine":
        lr = optax.cosine_decay_schedule(lr, max(num_steps, 1))
    elif stage["lr_schedule"] == "warmup_cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, lr, max(num_steps // 20, 1), max(num_steps, 2), lr / 10)
    opt = {"adam": optax.adam, "adamw": optax.adamw, "sgd": optax.sgd}[stage["optimizer"]](lr)
    if stage.get("weight_decay"):
        kernels = lambda tree: jax.tree.map(lambda x: np.ndim(x) >= 2, tree)  # noqa: E731
        opt = optax.chain(optax.add_decayed_weights(stage["weight_decay"], mask=kernels), opt)
    if stage.get("grad_clip"):
        opt = optax.chain(optax.clip_by_global_norm(stage["grad_clip"]), opt)
    return opt


def augmentation(stage: dict, num_classes: int):
    """The stage's in-step augmentation (shift, then input dropout, then mixup), or ``None``."""
    spec = stage.get("augment")
    if not spec:
        return None
    parts = []
    if spec.get("shift"):
        parts.append(random_shift(spec["shift"]))
    if spec.get("input_dropout"):
        parts.append(input_dropout(spec["input_dropout"]))
    if "mixup" in spec:
        parts.append(mixup(spec["mixup"], num_classes=num_classes))
    return compose(*parts) if parts else None


def and_masks(a, b):
    if a is None:
        return b
    return jax.tree.map(lambda x, y: x if y is None else (y if x is None else x & y), a, b,
                        is_leaf=lambda x: x is None)


def quant_transform(quant: dict) -> Transform:
    acts = {} if not quant.get("activation_bits") else {"activation_bits": quant["activation_bits"],
                                                         "activation_range": "calibrated"}
    return weight_quantization(quant["bits"], symmetric=quant["symmetric"],
                               channel_axis=-1 if quant["per_channel"] else None,
                               group_size=quant.get("group_size"),
                               rules=None if quant.get("rules") is None else [tuple(r) for r in quant["rules"]],
                               **acts)


def prune_schedule(stage: dict, num_steps: int, rules: Optional[list]):
    """When a prune stage of ``num_steps`` steps prunes: gradually (``polynomial``, Zhu & Gupta), in
    ``rounds`` (``iterative``), or all at once at its first step (``one_shot``, or a stage of no steps)."""
    if stage["schedule"] == "polynomial" and num_steps > 0:
        end = max(int(stage["schedule_end"] * num_steps), 1)
        return polynomial_schedule(begin_step=0, end_step=end, frequency=max(end // 10, 1))
    if stage["schedule"] == "iterative" and num_steps > 0:
        # ``rounds`` magnitude rounds, evenly spread over the first ``schedule_end`` of the stage, each
        # removing the same fraction of the survivors, so the sparsest layer reaches its target at the
        # last round; training goes on between rounds and after the last one with the masks held.
        rounds = stage["rounds"]
        top = max([stage["sparsity"]] + [v for _, v in rules or () if isinstance(v, (int, float))
                                         and not isinstance(v, bool)])
        return iterative_schedule(rate=max(1.0 - (1.0 - top) ** (1.0 / rounds), 1e-6),
                                  round_steps=max(int(stage["schedule_end"] * num_steps) // rounds, 1), num_rounds=rounds)
    return one_shot_schedule()


def pruner(stage: dict, params, num_steps: int, allocated: Optional[dict] = None) -> Transform:
    if allocated is not None:
        rules = sparsity_rules(allocated)
    elif stage.get("density_rules"):
        per_leaf = erk_sparsities(params, stage["sparsity"], rules=[tuple(r) for r in stage["density_rules"]],
                                  power=stage["erk_power"])
        rules = sparsity_rules(per_leaf)
    else:
        rules = None if stage.get("rules") is None else [tuple(r) for r in stage["rules"]]
    schedule = prune_schedule(stage, num_steps, rules)
    structure = {"unstructured": Unstructured(), "channels": Channels(), "2:4": NM(2, 4)}[stage["structure"]]
    return pruning(stage["sparsity"], criterion=stage["criterion"], structure=structure, scope=stage["scope"],
                   schedule=schedule, rules=rules)


def activation_ranges(cstate) -> Optional[dict]:
    """``{layer: [min, max]}`` of the input ranges a quantizer's state holds (``None`` without any)."""
    for part in cstate if isinstance(cstate, tuple) and not hasattr(cstate, "_fields") else (cstate,):
        ranges = getattr(part, "ranges", None)
        if ranges:
            return {k: [float(r["min"]), float(r["max"])] for k, r in ranges.items()}
    return None
