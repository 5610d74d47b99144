"""The recipe schema's keys: per key a checker ``value -> problem or None``, the defaults, the kinds.

:mod:`jaxcompress.recipes.schema` walks a recipe with these tables; a checker returns ``None``
for a good value and otherwise the end of the error message (``"must be ..., got ..."``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional

from jaxcompress.data.load import DATASETS, TFDS_PREFIX

#: The stage kinds, in the order a recipe usually lists them.
STAGE_KINDS = ("train", "distill", "prune", "quantize", "share", "factorize", "oneshot", "finetune", "export")
#: The models a recipe can name (``[model] kind``), with the keys each one takes.
MODEL_KINDS = ("mlp", "lenet5", "caffe_lenet", "cnn", "teacher_cnn", "student_cnn", "resnet", "transformer_lm")
#: The byte-level text corpora a recipe can name; they take ``seq_len`` and the ``transformer_lm`` model.
TEXT_DATASETS = ("python_corpus",)
TEXT_MODELS = ("transformer_lm",)
#: The one-shot methods of an ``oneshot`` stage (``methods = [{ method = "sparsegpt", ... }]``):
#: reparametrisations, then a solver (the order is checked by ``jaxcompress.oneshot.split_pipeline``).
ONESHOT_METHODS = ("rotation", "smoothquant", "awq", "wanda", "sparsegpt", "gptq", "rtn")
#: Image shape (H, W, C) of each named data set, to build the model before any data is read.
INPUT_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3), "digits": (8, 8, 1)}
CATCH_ALL = (".*", "")
#: The sparsities at which a prune stage with ``allocation = "sensitivity"`` prunes each layer alone.
SENSITIVITY_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: The sparsities and bit widths a prune stage with ``allocation = "budget"`` tries on each layer.
BUDGET_SPARSITY_GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
BUDGET_BITS_GRID = (2, 3, 4, 6, 8)


# --- the schema: per key a checker ``value -> problem or None`` ----------------------------------

def _int(low: int, high: Optional[int] = None) -> Callable[[Any], Optional[str]]:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int) or v < low or (high is not None and v > high):
            return f"must be an integer {'in [%d, %d]' % (low, high) if high is not None else '>= %d' % low}, got {v!r}."
        return None
    return check


def _number(low: float, high: float, *, low_open=False, high_open=True, example="") -> Callable:
    def check(v):
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > low if low_open else v >= low) and (v < high if high_open else v <= high)
        if not ok:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            return f"must be a number in {interval}{example}, got {v!r}."
        return None
    return check


def choice(*options) -> Callable:
    def check(v):
        return None if isinstance(v, str) and v in options else f"must be one of {list(options)}, got {v!r}."
    return check


def of_type(kind: type, what: str) -> Callable:
    def check(v):
        return None if isinstance(v, kind) and not (kind is int and isinstance(v, bool)) else f"must be {what}, got {v!r}."
    return check


def _int_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
        return f"must be a non-empty list of integers >= 1, got {v!r}."
    return None


def _int_pair(v):
    if _int_list(v) or len(v) != 2:
        return f"must be a list of two integers >= 1, e.g. [20, 50], got {v!r}."
    return None


def _seeds(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v):
        return f"must be a non-empty list of integers >= 0, e.g. [0, 1, 2], got {v!r}."
    if len(set(v)) != len(v):
        return f"must not repeat a seed, got {v!r}."
    return None


def _fraction_list(v):
    if not isinstance(v, list) or not v or not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and 0 <= x < 1 for x in v):
        return f"must be a non-empty list of sparsities in [0, 1), e.g. [0.5, 0.9, 0.95], got {v!r}."
    return None


def _bits_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and 2 <= x <= 8
                                                   for x in v):
        return f"must be a non-empty list of bit widths in 2..8, e.g. [2, 4, 8], got {v!r}."
    return None


def _layer_table(value_check: Callable, example: str) -> Callable:
    def check(v):
        if not isinstance(v, dict) or not v:
            return f"must be a table of layer paths, e.g. {example}, got {v!r}."
        for k, x in v.items():
            problem = value_check(x)
            if problem:
                return f"{k!r} {problem}"
        return None
    return check


def _budget(v):
    if isinstance(v, str) or (isinstance(v, int) and not isinstance(v, bool) and v >= 1):
        return None
    return f"must be a file size in bytes (an integer >= 1) or the name of an earlier stage, got {v!r}."


def published(v):
    if not isinstance(v, dict) or set(v) != {"source", "test_error"} or not isinstance(v["source"], str):
        return ('must be a table with source = "..." and test_error = { STAGE = percent, ... }, '
                f"got {v!r}.")
    errors = v["test_error"]
    if not isinstance(errors, dict) or not errors or not all(
            isinstance(e, (int, float)) and not isinstance(e, bool) and 0 <= e <= 100 for e in errors.values()):
        return f"test_error must map stage names to percentages in [0, 100], e.g. {{ dense = 1.64 }}, got {errors!r}."
    return None


#: The in-step augmentations a training stage can name (``augment = { shift = 2, ... }``), each with its check.
AUGMENTS = {
    "shift": _int(0),
    "input_dropout": _number(0, 1),
    "mixup": _number(0, math.inf, low_open=True),
}


def _augment(v):
    if not isinstance(v, dict) or not v:
        return ("must be a table of in-step augmentations, e.g. { shift = 2, input_dropout = 0.2 } (shift: pixels; "
                f"input_dropout: drop rate; mixup: Beta alpha), got {v!r}.")
    for k, x in v.items():
        if k not in AUGMENTS:
            return f"names {k!r}, not one of {list(AUGMENTS)}."
        problem = AUGMENTS[k](x)
        if problem:
            return f"{k} {problem}"
    return None


def _dataset(v):
    if isinstance(v, str) and (v in DATASETS or v in TEXT_DATASETS or (v.startswith(TFDS_PREFIX) and v != TFDS_PREFIX)):
        return None
    return f"must be one of {list(DATASETS) + list(TEXT_DATASETS)} or '{TFDS_PREFIX}<name>', got {v!r}."


def _methods(v):
    """The one-shot pipeline: tables ``{ method = NAME, setting = value, ... }`` (their settings and
    order are checked against the methods themselves when the recipe is read)."""
    example = '[{ method = "rotation" }, { method = "gptq", bits = 4, group_size = 128 }]'
    if not isinstance(v, list) or not v or not all(isinstance(m, dict) for m in v):
        return f"must be a non-empty array of tables such as {example}, got {v!r}."
    for j, m in enumerate(v):
        if m.get("method") not in ONESHOT_METHODS:
            return f"[{j}] method must be one of {list(ONESHOT_METHODS)}, got {m.get('method')!r}."
    return None


def _validation(v):
    if isinstance(v, float) and 0.0 < v < 1.0:
        return None
    if isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return None
    return f"must be a fraction in (0, 1) or a number of training examples >= 1, got {v!r}."


def _rules(value_check: Callable) -> Callable:
    def check(v):
        if not isinstance(v, list) or not v:
            return f'must be a non-empty list of [regex, value] pairs, e.g. [["^conv1/", false], [".*", true]], got {v!r}.'
        for j, rule in enumerate(v):
            if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
                return f"[{j}] must be a [regex, value] pair, got {rule!r}."
            try:
                re.compile(rule[0])
            except re.error as e:
                return f"[{j}] has an invalid regex {rule[0]!r}: {e}."
            problem = value_check(rule[1])
            if problem:
                return f"[{j}] value {problem}"
        return None
    return check


def _sparsity_value(v):
    if isinstance(v, bool):
        return None
    return _number(0, 1, example=" (a per-layer sparsity)")(v)


def _positive_value(v):
    if isinstance(v, bool):
        return None
    return _number(0, math.inf, low_open=True, example=" (a density multiplier)")(v)


def _bits_value(v):
    if isinstance(v, bool) or v in ("binary", "ternary"):
        return None
    return _int(2, 8)(v) and f"must be true, false, 2..8, 'binary' or 'ternary', got {v!r}."


MODEL_KEYS = {
    "mlp": {"features": _int_list, "dropout_rate": _number(0, 1)},
    "lenet5": {"channels": _int_pair, "features": _int_pair},
    "caffe_lenet": {"channels": _int_pair, "hidden": _int(1)},
    "cnn": {"channels": _int_list, "hidden": _int(1), "batch_norm": of_type(bool, "true or false")},
    "teacher_cnn": {},
    "student_cnn": {},
    "resnet": {"blocks": _int_list, "widths": _int_list},
    "transformer_lm": {"dim": _int(1), "depth": _int(1), "heads": _int(1), "mlp_ratio": _int(1),
                       "dropout": _number(0, 1)},
}

TOP_KEYS = {
    "name": of_type(str, "a string"),
    "description": of_type(str, "a string"),
    "seeds": _seeds,
    "parallel": choice("none", "pmap", "shard"),
    "devices": _int(1),
    "checkpoint_every": _int(1),
    "reference": of_type(str, "the name of a stage the others are compared with, seed by seed"),
    "score_test": of_type(bool, "true or false (false for a tuning run that must not see the test set)"),
}
DATA_KEYS = {
    "name": _dataset,
    "dir": of_type(str, "a directory path"),
    "download": of_type(bool, "true or false"),
    "fallback_to_digits": of_type(bool, "true or false"),
    "validation": _validation,
    "split_seed": _int(0),
    "train_subset": _int(1),
    "validation_subset": _int(1),
    "test_subset": _int(1),
    "seq_len": _int(1),
    "max_bytes": _int(1),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
}
_TRAINING = {
    "epochs": _number(0, math.inf, high_open=True),
    "steps": _int(0),
    "eval_every": _int(1),
    "grad_clip": _number(0, math.inf, low_open=True, example=" (a global gradient norm, e.g. 1.0)"),
    "learning_rate": _number(0, math.inf, low_open=True),
    "optimizer": choice("adam", "adamw", "sgd"),
    "teacher": of_type(str, "the name of an earlier stage"),
    "temperature": _number(0, math.inf, low_open=True),
    "kd_weight": _number(0, math.inf),
    "ce_weight": _number(0, math.inf),
    "lr_schedule": choice("constant", "cosine", "warmup_cosine"),
    "weight_decay": _number(0, math.inf, example=" (an L2 factor on the kernels, e.g. 5e-4)"),
    "augment": _augment,
}
_COMMON = {"name": of_type(str, "a string"), "kind": choice(*STAGE_KINDS), "label": of_type(str, "a string"),
           "from": of_type(str, "the name of an earlier stage"),
           "reference": of_type(str, "the name of a stage this one is compared with, seed by seed")}
STAGE_KEYS = {
    "train": {**_COMMON, **_TRAINING, "model": of_type(dict, "a table such as { kind = \"cnn\", hidden = 128 }")},
    "distill": {**_COMMON, **_TRAINING, "model": of_type(dict, "a table such as { kind = \"cnn\", hidden = 64 }"),
                "loss": choice("kd", "dkd"), "tckd_weight": _number(0, math.inf), "nckd_weight": _number(0, math.inf)},
    "prune": {
        **_COMMON, **_TRAINING,
        "sparsity": _number(0, 1, example=" (e.g. 0.9 for 90% of the weights zero)"),
        "schedule": choice("one_shot", "polynomial", "iterative"),
        "rounds": _int(1),
        "schedule_end": _number(0, 1, low_open=True, high_open=False),
        "criterion": choice("magnitude", "random", "saliency", "movement"),
        "structure": choice("unstructured", "channels", "2:4"),
        "scope": choice("layer", "global"),
        "rules": _rules(_sparsity_value),
        "density_rules": _rules(_positive_value),
        "erk_power": _number(0, math.inf),
        "allocation": choice("sensitivity", "budget"),
        "sensitivity_grid": _fraction_list,
        "bits": _int(2, 8),
        "symmetric": of_type(bool, "true or false"),
        "per_channel": of_type(bool, "true or false"),
        "budget": _budget,
        "max_drop": _number(0, 1, high_open=False, example=" (an accuracy drop, e.g. 0.01 for one point)"),
        "bits_grid": _bits_list,
    },
    "quantize": {
        **_COMMON, **_TRAINING,
        "bits": lambda v: None if v in ("binary", "ternary") else (
            _int(2, 8)(v) and f"must be 2..8, 'binary' or 'ternary', got {v!r}."),
        "symmetric": of_type(bool, "true or false"),
        "per_channel": of_type(bool, "true or false"),
        "group_size": _int(1),
        "rules": _rules(_bits_value),
        "activation_bits": _int(2, 8),
        "calibration_batches": _int(1),
    },
    "share": {
        **_COMMON, **_TRAINING,
        "bits": _int(1, 8),
        "rules": _rules(lambda v: None if isinstance(v, bool) else (
            _int(1, 8)(v) and f"must be true, false or a bit width 1..8, got {v!r}.")),
        "iters": _int(1),
    },
    "factorize": {
        **_COMMON, **_TRAINING,
        "ranks": _layer_table(_int(1), "{ fc1 = 32, fc2 = 16 }"),
        "energy": _layer_table(_number(0, 1, low_open=True, high_open=False), "{ fc1 = 0.9 }"),
        "mode": choice("reshape", "spatial"),
    },
    "oneshot": {
        **_COMMON,
        "methods": _methods,
        "rules": _rules(lambda v: None if isinstance(v, bool) else f"must be true or false, got {v!r}."),
        "calibration": _int(1),
        "calibration_batch": _int(1),
        "sequential": of_type(bool, "true or false"),
    },
    "finetune": {**_COMMON, **_TRAINING},
    "export": {**_COMMON, "file": of_type(str, "a file name such as 'model.npz'"),
               "float_dtype": choice("float32", "float16"), "context_coding": of_type(bool, "true or false")},
}
REQUIRED = {"prune": ("sparsity",), "quantize": ("bits",), "distill": ("teacher",), "oneshot": ("methods",)}
DEFAULTS = {
    "top": {"name": "recipe", "seeds": [0], "parallel": "none", "checkpoint_every": 500, "score_test": True},
    "data": {"download": True, "fallback_to_digits": False, "validation": 0.1, "split_seed": 0,
             "batch_size": 128, "eval_batch_size": 1000},
    "training": {"epochs": 1.0, "learning_rate": 1e-3, "optimizer": "adam", "lr_schedule": "constant", "temperature": 4.0,
                 "kd_weight": 0.9, "ce_weight": 0.1},
    "prune": {"schedule": "polynomial", "schedule_end": 0.6, "criterion": "magnitude",
              "structure": "unstructured", "scope": "layer", "erk_power": 1.0, "symmetric": True, "per_channel": True},
    "quantize": {"symmetric": True, "per_channel": True, "epochs": 0.5, "calibration_batches": 8},
    "share": {"iters": 30, "epochs": 1.0},
    "factorize": {"mode": "reshape"},
    "oneshot": {"calibration": 128, "calibration_batch": 16, "sequential": True},
    "export": {"file": "model.npz", "float_dtype": "float32", "context_coding": False},
}
