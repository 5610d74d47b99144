"""Recipe files: TOML read with :mod:`tomllib`, checked against a small declarative schema.

A recipe names a model, a data set with its validation split, the seeds, and ordered stages.
Everything that can be checked without training is checked by :func:`load_recipe`: unknown
keys, values of the wrong type or out of range, stages that refer to unknown stages, and
parameter rules that match no parameter of the stage's model. Each error is a
:class:`RecipeError` naming the key and its line in the file.

Over several seeds, ``reference = "STAGE"`` compares every other stage with that one seed by seed
(the report's ``paired`` list), and a stage's own ``reference = "STAGE"`` compares it with another
stage instead (e.g. a pruned model with its dense parent, a distilled student with the same
student trained on labels); ``[published]`` (``source``, ``test_error = { STAGE = percent }``)
quotes published numbers beside the measured ones; ``score_test = false`` makes a tuning run
that never scores the test set. A prune stage with ``allocation = "sensitivity"`` chooses its
per-layer sparsities by pruning each layer of its starting model alone over ``sensitivity_grid``
and scoring it on the validation split; one with ``allocation = "budget"`` chooses each layer's
sparsity and bit width (from ``sensitivity_grid`` and ``bits_grid``, each layer compressed alone
and scored on the validation split, its packed bytes measured) so that the saved file fits
``budget`` (a number of bytes, or the name of an earlier stage whose file on the same seed sets
it), or, with ``max_drop``, so that the file is smallest within that predicted accuracy drop. A
prune stage with ``bits`` quantizes the kept weights to that many bits while it prunes. A quantize
stage with ``activation_bits`` also quantizes every Dense/Conv input, with ranges calibrated (min/max)
on ``calibration_batches`` training batches before the stage trains (``epochs = 0``: post-training
quantization) and moved by an EMA while it trains. A distill stage trains on Hinton KD
(``temperature``, ``kd_weight``, ``ce_weight``) or, with ``loss = "dkd"``, on decoupled KD
(``temperature``, ``tckd_weight``, ``nckd_weight``, ``ce_weight``). A factorize stage replaces
the named layers of a float, unpruned model by their truncated SVD (``ranks = { fc1 = 32 }`` or
``energy = { fc1 = 0.9 }``; ``mode = "spatial"`` splits a convolution into a kx1 and a 1xk one)
and fine-tunes the two factors; its row records the validation accuracy right after the SVD
(``validation_accuracy_factored``). A training stage may set ``lr_schedule = "cosine"``
(cosine decay from ``learning_rate`` to 0 over the stage) and ``augment = { shift = 2,
input_dropout = 0.2, mixup = 1.0 }``: in-step augmentations (a random shift of up to ``shift``
pixels, input dropout, mixup with that Beta alpha), applied in that order to the batch both the
student and its teacher see.

Example:
  >>> recipe = parse_recipe('''
  ... [data]
  ... name = "digits"
  ... [model]
  ... kind = "mlp"
  ... features = [32]
  ... [[stages]]
  ... name = "dense"
  ... kind = "train"
  ... epochs = 1
  ... [[stages]]
  ... name = "pruned"
  ... kind = "prune"
  ... sparsity = 1.5
  ... ''')
  Traceback (most recent call last):
    ...
  jaxcompress.recipes.schema.RecipeError: <recipe>:14: stages[1].sparsity: must be a number in [0, 1) (e.g. 0.9 for 90% of the weights zero), got 1.5 (stage 'pruned').
"""
from __future__ import annotations

import copy
import math
import re
import tomllib
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from jaxcompress.data.load import DATASETS, TFDS_PREFIX

#: The stage kinds, in the order a recipe usually lists them.
STAGE_KINDS = ("train", "distill", "prune", "quantize", "factorize", "finetune", "export")
#: The models a recipe can name (``[model] kind``), with the keys each one takes.
MODEL_KINDS = ("mlp", "lenet5", "cnn", "teacher_cnn", "student_cnn", "resnet")
#: Image shape (H, W, C) of each named data set, to build the model before any data is read.
INPUT_SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3), "digits": (8, 8, 1)}
_CATCH_ALL = (".*", "")
#: The sparsities at which a prune stage with ``allocation = "sensitivity"`` prunes each layer alone.
SENSITIVITY_GRID = (0.0, 0.5, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99)
#: The sparsities and bit widths a prune stage with ``allocation = "budget"`` tries on each layer.
BUDGET_SPARSITY_GRID = (0.0, 0.5, 0.7, 0.8, 0.9, 0.95)
BUDGET_BITS_GRID = (2, 3, 4, 6, 8)


class RecipeError(ValueError):
    """A recipe that cannot run, with the offending ``key`` (e.g. ``'stages[2].sparsity'``) and ``line``."""

    def __init__(self, message: str, *, key: str = "", line: Optional[int] = None, source: str = "<recipe>"):
        where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + (f"{key}: " if key else "") + message)
        self.key, self.line, self.source = key, line, source


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


def _choice(*options) -> Callable:
    def check(v):
        return None if isinstance(v, str) and v in options else f"must be one of {list(options)}, got {v!r}."
    return check


def _type(kind: type, what: str) -> Callable:
    def check(v):
        return None if isinstance(v, kind) and not (kind is int and isinstance(v, bool)) else f"must be {what}, got {v!r}."
    return check


def _int_list(v):
    if not isinstance(v, list) or not v or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 1 for x in v):
        return f"must be a non-empty list of integers >= 1, got {v!r}."
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


def _published(v):
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
    if isinstance(v, str) and (v in DATASETS or (v.startswith(TFDS_PREFIX) and v != TFDS_PREFIX)):
        return None
    return f"must be one of {list(DATASETS)} or '{TFDS_PREFIX}<name>', got {v!r}."


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
    "lenet5": {"channels": _int_list, "features": _int_list},
    "cnn": {"channels": _int_list, "hidden": _int(1), "batch_norm": _type(bool, "true or false")},
    "teacher_cnn": {},
    "student_cnn": {},
    "resnet": {"blocks": _int_list, "widths": _int_list},
}

TOP_KEYS = {
    "name": _type(str, "a string"),
    "description": _type(str, "a string"),
    "seeds": _seeds,
    "parallel": _choice("none", "pmap", "shard"),
    "devices": _int(1),
    "checkpoint_every": _int(1),
    "reference": _type(str, "the name of a stage the others are compared with, seed by seed"),
    "score_test": _type(bool, "true or false (false for a tuning run that must not see the test set)"),
}
DATA_KEYS = {
    "name": _dataset,
    "dir": _type(str, "a directory path"),
    "download": _type(bool, "true or false"),
    "fallback_to_digits": _type(bool, "true or false"),
    "validation": _validation,
    "split_seed": _int(0),
    "train_subset": _int(1),
    "test_subset": _int(1),
    "batch_size": _int(1),
    "eval_batch_size": _int(1),
}
_TRAINING = {
    "epochs": _number(0, math.inf, high_open=True),
    "learning_rate": _number(0, math.inf, low_open=True),
    "optimizer": _choice("adam", "adamw", "sgd"),
    "teacher": _type(str, "the name of an earlier stage"),
    "temperature": _number(0, math.inf, low_open=True),
    "kd_weight": _number(0, math.inf),
    "ce_weight": _number(0, math.inf),
    "lr_schedule": _choice("constant", "cosine"),
    "augment": _augment,
}
_COMMON = {"name": _type(str, "a string"), "kind": _choice(*STAGE_KINDS), "label": _type(str, "a string"),
           "from": _type(str, "the name of an earlier stage"),
           "reference": _type(str, "the name of a stage this one is compared with, seed by seed")}
STAGE_KEYS = {
    "train": {**_COMMON, **_TRAINING, "model": _type(dict, "a table such as { kind = \"cnn\", hidden = 128 }")},
    "distill": {**_COMMON, **_TRAINING, "model": _type(dict, "a table such as { kind = \"cnn\", hidden = 64 }"),
                "loss": _choice("kd", "dkd"), "tckd_weight": _number(0, math.inf), "nckd_weight": _number(0, math.inf)},
    "prune": {
        **_COMMON, **_TRAINING,
        "sparsity": _number(0, 1, example=" (e.g. 0.9 for 90% of the weights zero)"),
        "schedule": _choice("one_shot", "polynomial"),
        "schedule_end": _number(0, 1, low_open=True, high_open=False),
        "criterion": _choice("magnitude", "random", "saliency", "movement"),
        "structure": _choice("unstructured", "channels", "2:4"),
        "scope": _choice("layer", "global"),
        "rules": _rules(_sparsity_value),
        "density_rules": _rules(_positive_value),
        "erk_power": _number(0, math.inf),
        "allocation": _choice("sensitivity", "budget"),
        "sensitivity_grid": _fraction_list,
        "bits": _int(2, 8),
        "symmetric": _type(bool, "true or false"),
        "per_channel": _type(bool, "true or false"),
        "budget": _budget,
        "max_drop": _number(0, 1, high_open=False, example=" (an accuracy drop, e.g. 0.01 for one point)"),
        "bits_grid": _bits_list,
    },
    "quantize": {
        **_COMMON, **_TRAINING,
        "bits": lambda v: None if v in ("binary", "ternary") else (
            _int(2, 8)(v) and f"must be 2..8, 'binary' or 'ternary', got {v!r}."),
        "symmetric": _type(bool, "true or false"),
        "per_channel": _type(bool, "true or false"),
        "group_size": _int(1),
        "rules": _rules(_bits_value),
        "activation_bits": _int(2, 8),
        "calibration_batches": _int(1),
    },
    "factorize": {
        **_COMMON, **_TRAINING,
        "ranks": _layer_table(_int(1), "{ fc1 = 32, fc2 = 16 }"),
        "energy": _layer_table(_number(0, 1, low_open=True, high_open=False), "{ fc1 = 0.9 }"),
        "mode": _choice("reshape", "spatial"),
    },
    "finetune": {**_COMMON, **_TRAINING},
    "export": {**_COMMON, "file": _type(str, "a file name such as 'model.npz'"),
               "float_dtype": _choice("float32", "float16")},
}
REQUIRED = {"prune": ("sparsity",), "quantize": ("bits",), "distill": ("teacher",)}
DEFAULTS = {
    "top": {"name": "recipe", "seeds": [0], "parallel": "none", "checkpoint_every": 500, "score_test": True},
    "data": {"download": True, "fallback_to_digits": False, "validation": 0.1, "split_seed": 0,
             "batch_size": 128, "eval_batch_size": 1000},
    "training": {"epochs": 1.0, "learning_rate": 1e-3, "optimizer": "adam", "lr_schedule": "constant", "temperature": 4.0,
                 "kd_weight": 0.9, "ce_weight": 0.1},
    "prune": {"schedule": "polynomial", "schedule_end": 0.6, "criterion": "magnitude",
              "structure": "unstructured", "scope": "layer", "erk_power": 1.0, "symmetric": True, "per_channel": True},
    "quantize": {"symmetric": True, "per_channel": True, "epochs": 0.5, "calibration_batches": 8},
    "factorize": {"mode": "reshape"},
    "export": {"file": "model.npz", "float_dtype": "float32"},
}


# --- where a key is in the text ------------------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+|\"[^\"]*\"|'[^']*')\s*=")


def locate(text: str, path: Sequence[Any]) -> Optional[int]:
    """The 1-based line of ``path`` (e.g. ``('stages', 2, 'sparsity')``) in TOML ``text``.

    Finds the table (``[data]``, the third ``[[stages]]``) and then the ``key =`` line inside it;
    a key not written in the file (a missing required key) gives the table's header line.
    Nested values (a rule inside ``rules``, a key of an inline ``model`` table) give the line of
    the enclosing key. ``None`` when the table is not in the text either.

    Example:
      >>> locate('[data]\\nname = "x"\\n[[stages]]\\nkind = "a"\\n[[stages]]\\nkind = "b"\\n', ('stages', 1, 'kind'))
      6
    """
    table, rest = (), list(path)
    if rest and rest[0] in ("data", "model"):
        table, rest = (rest[0],), rest[1:]
    elif rest and rest[0] == "stages" and len(rest) > 1:
        table, rest = ("stages", rest[1]), rest[2:]
    key = rest[0] if rest else None
    current: tuple = ()
    counts: dict[str, int] = {}
    header_line = 1 if not table else None
    for number, line in enumerate(text.splitlines(), start=1):
        m = _HEADER.match(line)
        if m:
            name = m.group(2).strip().strip("\"'")
            if m.group(1) == "[[":
                counts[name] = counts.get(name, -1) + 1
                current = (name, counts[name])
            else:
                current = (name,)
            if current == table:
                header_line = number
            continue
        k = _KEY.match(line)
        if k and key is not None and current == table and k.group(1).strip("\"'") == str(key):
            return number
    return header_line


# --- validation ----------------------------------------------------------------------------------

class _Checker:
    def __init__(self, text: str, source: str):
        self.text, self.source = text, source

    def fail(self, path: Sequence[Any], message: str):
        key = _key_name(path)
        raise RecipeError(message, key=key, line=locate(self.text, path), source=self.source)

    def table(self, values: Any, schema: dict, path: tuple, what: str, extra: str = ""):
        if not isinstance(values, dict):
            self.fail(path, f"must be a table ([{_key_name(path)}]), got {values!r}.")
        for k, v in values.items():
            if k not in schema:
                close = _close(k, schema)
                self.fail(path + (k,), f"unknown key in {what}{extra}; "
                          f"{'did you mean ' + repr(close) + '? ' if close else ''}allowed: {sorted(schema)}.")
            problem = schema[k](v)
            if problem:
                self.fail(path + (k,), problem[:-1] + extra + "." if extra else problem)


def _key_name(path: Sequence[Any]) -> str:
    out = ""
    for p in path:
        out += f"[{p}]" if isinstance(p, int) else (("." if out else "") + str(p))
    return out


def _close(key: str, schema: dict) -> Optional[str]:
    import difflib

    hits = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    return hits[0] if hits else None


def parse_recipe(text: str, *, source: str = "<recipe>", check_rules: bool = True) -> dict:
    """Validates a recipe given as TOML text and returns it with every default filled in.

    Args:
      text: the TOML text.
      source: the file name used in messages.
      check_rules: also build each stage's model (shapes only, no data, no training) and refuse
        parameter rules that match no parameter. Needs the data set's image shape, known for the
        named data sets; for ``tfds:`` sets the runner checks the rules once the data is loaded.

    Returns:
      The recipe as a dict: top-level keys, ``data``, ``model`` and ``stages`` (a list of dicts,
      each with ``name``, ``kind``, ``from`` and the stage's settings).

    Raises:
      RecipeError: naming the key and its line.
    """
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        at = re.search(r"line (\d+)", str(e))
        raise RecipeError(f"not valid TOML: {e}", line=int(at.group(1)) if at else None, source=source) from None
    c = _Checker(text, source)
    top_schema = {**TOP_KEYS, "published": _published, "data": _type(dict, "a table"), "model": _type(dict, "a table"),
                  "stages": _type(list, "an array of tables ([[stages]])")}
    c.table(raw, top_schema, (), "the recipe")
    recipe = {**copy.deepcopy(DEFAULTS["top"]), **{k: v for k, v in raw.items() if k not in ("data", "model", "stages")}}
    if "data" not in raw:
        c.fail(("data",), "missing table [data]; give at least name = \"mnist\" (or another data set).")
    c.table(raw["data"], DATA_KEYS, ("data",), "[data]")
    if "name" not in raw["data"]:
        c.fail(("data", "name"), f"missing; give one of {list(DATASETS)}.")
    recipe["data"] = {**DEFAULTS["data"], **raw["data"]}
    if "model" not in raw:
        c.fail(("model",), f"missing table [model]; give kind = one of {list(MODEL_KINDS)}.")
    recipe["model"] = _check_model(c, raw["model"], ("model",), "[model]")
    stages = raw.get("stages")
    if not stages:
        c.fail(("stages",), "the recipe has no stages; add [[stages]] tables with kind = one of "
               f"{list(STAGE_KINDS)}.")
    recipe["stages"] = []
    names: dict[str, dict] = {}
    for i, stage in enumerate(stages):
        recipe["stages"].append(_check_stage(c, stage, i, names, recipe))
        names[recipe["stages"][-1]["name"]] = recipe["stages"][-1]
    trained = [s["name"] for s in recipe["stages"] if s["kind"] != "export"]
    if "reference" in recipe and recipe["reference"] not in trained:
        c.fail(("reference",), f"{recipe['reference']!r} is not a trained stage; give one of {trained}.")
    for i, stage in enumerate(recipe["stages"]):
        ref = stage.get("reference")
        if ref is not None and (ref not in trained or ref == stage["name"] or stage["kind"] == "export"):
            c.fail(("stages", i, "reference"), f"{ref!r} is not another trained stage; give one of "
                   f"{[t for t in trained if t != stage['name']]}" + (" (an export stage is not compared)."
                                                                    if stage["kind"] == "export" else "."))
    for stage in raw.get("published", {}).get("test_error", {}):
        if stage not in trained:
            c.fail(("published",), f"test_error names {stage!r}, not a trained stage; give one of {trained}.")
    if check_rules:
        shape = INPUT_SHAPES.get(recipe["data"]["name"])
        if shape is not None:
            check_stage_rules(recipe, shape, text=text, source=source)
    return recipe


def _check_model(c: _Checker, model: Any, path: tuple, what: str) -> dict:
    if not isinstance(model, dict):
        c.fail(path, f"must be a table such as {{ kind = \"cnn\" }}, got {model!r}.")
    kind = model.get("kind")
    if kind not in MODEL_KINDS:
        c.fail(path + ("kind",), f"must be one of {list(MODEL_KINDS)}, got {kind!r}.")
    c.table(model, {"kind": _choice(*MODEL_KINDS), **MODEL_KEYS[kind]}, path, f"{what} (model kind {kind!r})")
    return dict(model)


def _check_distill_loss(c: _Checker, stage: dict, out: dict, path: tuple, extra: str) -> None:
    """``loss = 'kd'`` (Hinton: temperature, kd_weight, ce_weight) or ``'dkd'`` (temperature, tckd_weight,
    nckd_weight, ce_weight); a weight of the other loss is refused, not ignored."""
    loss = out.setdefault("loss", "kd")
    own, other = (("tckd_weight", "nckd_weight"), ("kd_weight",)) if loss == "dkd" else \
        (("kd_weight",), ("tckd_weight", "nckd_weight"))
    for key in other:
        if key in stage:
            c.fail(path + (key,), f"{key} is a weight of loss = {'kd' if loss == 'dkd' else 'dkd'!r}, not of "
                   f"loss = {loss!r}{extra}; give {' and '.join(own)} instead.")
    if loss == "dkd":
        out.pop("kd_weight", None)
        out.setdefault("tckd_weight", 1.0)
        out.setdefault("nckd_weight", 8.0)


def _check_stage(c: _Checker, stage: Any, i: int, names: dict, recipe: dict) -> dict:
    path = ("stages", i)
    if not isinstance(stage, dict):
        c.fail(path, f"must be a table ([[stages]]), got {stage!r}.")
    kind = stage.get("kind")
    if kind is None:
        c.fail(path, f"missing kind; give one of {list(STAGE_KINDS)}.")
    if kind not in STAGE_KINDS:
        c.fail(path + ("kind",), f"unknown stage kind {kind!r}; give one of {list(STAGE_KINDS)}.")
    name = stage.get("name")
    if name is None:
        c.fail(path, "missing name; give each stage a name such as name = \"teacher\".")
    extra = f" (stage {name!r})" if isinstance(name, str) else ""
    c.table(stage, STAGE_KEYS[kind], path, f"a {kind} stage", extra)
    if name in names:
        c.fail(path + ("name",), f"{name!r} names an earlier stage too; stage names must be unique.")
    if not re.fullmatch(r"[A-Za-z0-9_.\- ()%+]+", name):
        c.fail(path + ("name",), f"{name!r} may only hold letters, digits, spaces and _ . - ( ) % +.")
    budget = stage.get("allocation") == "budget"
    for key in REQUIRED.get(kind, ()):
        if key not in stage and not (budget and key == "sparsity"):
            c.fail(path, f"a {kind} stage{extra} needs {key!r}"
                   + (" (the name of an earlier train or distill stage)." if key == "teacher" else "."))
    for key in ("from", "teacher"):
        ref = stage.get(key)
        if ref is not None and ref not in names:
            c.fail(path + (key,), f"{ref!r} is not an earlier stage{extra}; earlier stages: {list(names)}.")
    out = {**(DEFAULTS["training"] if kind != "export" else {}), **DEFAULTS.get(kind, {}), **stage}
    if kind in ("train", "distill"):
        out["model"] = _check_model(c, stage["model"], path + ("model",), f"stage {name!r}") if "model" in stage \
            else dict(recipe["model"])
        out["from"] = None
        if "from" in stage:
            c.fail(path + ("from",), f"a {kind} stage starts from a fresh model; remove 'from'{extra}.")
    else:
        if not names and "from" not in stage:
            c.fail(path + ("kind",), f"a {kind} stage{extra} needs a model to start from; put a train or "
                   "distill stage before it.")
        out["from"] = stage.get("from", list(names)[-1] if names else None)
        out["model"] = names[out["from"]]["model"]
    if kind == "distill":
        _check_distill_loss(c, stage, out, path, extra)
    if kind == "factorize":
        if ("ranks" in stage) == ("energy" in stage):
            c.fail(path + ("kind",), f"a factorize stage{extra} needs exactly one of ranks = {{ layer = rank }} or "
                   "energy = { layer = kept fraction of the squared singular values }.")
        compressed = [n for n in _lineage(names, out["from"]) if names[n]["kind"] in ("prune", "quantize", "factorize")]
        if compressed:
            c.fail(path + ("from",), f"factorize starts from a float, unfactored model, but {compressed[0]!r} is a "
                   f"{names[compressed[0]]['kind']} stage it comes from{extra}; factor before pruning or quantizing.")
    if any(names[n]["kind"] == "factorize" for n in _lineage(names, out.get("from"))):
        for key in ("rules", "density_rules"):
            if key in stage:
                c.fail(path + (key,), f"the model of this stage{extra} is factored (its kernels are u and v); "
                       f"{key} are not supported after a factorize stage.")
    if "rules" in stage and "density_rules" in stage:
        c.fail(path + ("density_rules",), f"give either rules or density_rules{extra}, not both.")
    if budget:
        _check_budget_stage(c, stage, out, path, names, extra)
    elif "allocation" in stage:
        for key in ("rules", "density_rules"):
            if key in stage:
                c.fail(path + (key,), f"allocation = 'sensitivity' chooses the per-layer sparsities; remove {key}{extra}.")
        if out["scope"] != "layer":
            c.fail(path + ("scope",), f"allocation = 'sensitivity' gives each layer its own sparsity; use scope = "
                   f"\"layer\"{extra}.")
        if max(out.get("sensitivity_grid", SENSITIVITY_GRID)) < out["sparsity"]:
            c.fail(path + ("sensitivity_grid",), f"must reach the stage's sparsity {out['sparsity']}{extra}; add a "
                   "larger grid point such as 0.98.")
    elif "sensitivity_grid" in stage:
        c.fail(path + ("sensitivity_grid",), f"is only read with allocation = \"sensitivity\" or \"budget\"{extra}.")
    if not budget:
        for key in ("budget", "max_drop", "bits_grid"):
            if key in stage:
                c.fail(path + (key,), f"is only read with allocation = \"budget\"{extra}.")
    return out


def _lineage(names: dict, start: Optional[str]) -> list:
    """``start`` and every stage its model comes from, nearest first."""
    out = []
    while start is not None:
        out.append(start)
        start = names[start].get("from")
    return out


def _check_budget_stage(c: _Checker, stage: dict, out: dict, path: tuple, names: dict, extra: str) -> None:
    for key in ("sparsity", "bits", "rules", "density_rules"):
        if key in stage:
            c.fail(path + (key,), f"allocation = 'budget' chooses each layer's sparsity and bits; remove {key}{extra}.")
    if out["scope"] != "layer" or out["structure"] != "unstructured" or out["criterion"] != "magnitude":
        c.fail(path + ("allocation",), "allocation = 'budget' measures layers pruned by magnitude, unstructured, "
               f"layer by layer; use its default criterion, structure and scope{extra}.")
    if ("budget" in stage) == ("max_drop" in stage):
        c.fail(path + ("allocation",), f"allocation = 'budget' needs exactly one of budget (file bytes, or an earlier "
               f"stage whose file sets them) or max_drop (an allowed accuracy drop){extra}.")
    ref = stage.get("budget")
    if isinstance(ref, str) and (ref not in names or names[ref]["kind"] == "export"):
        c.fail(path + ("budget",), f"{ref!r} is not an earlier trained stage{extra}; earlier stages: "
               f"{[n for n, s in names.items() if s['kind'] != 'export']}.")
    out["sparsity"] = 0.0  # per layer from the allocation
    out.setdefault("sensitivity_grid", list(BUDGET_SPARSITY_GRID))
    out.setdefault("bits_grid", list(BUDGET_BITS_GRID))


def _model_params(model: dict, num_classes: int, shape: tuple):
    """The model's params as shapes only (``jax.eval_shape``: no FLOPs, no memory)."""
    import jax
    import jax.numpy as jnp

    from jaxcompress.recipes.models import build_model

    module = build_model(model, num_classes)
    variables = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)))
    return variables["params"]


def check_stage_rules(recipe: dict, image_shape: tuple, *, num_classes: int = 10, text: str = "",
                      source: str = "<recipe>") -> None:
    """Refuses parameter rules that match no parameter of the stage's model.

    Raises:
      RecipeError: naming ``stages[i].rules[j]`` and its line.
    """
    from jaxcompress.core.rules import explain

    from jaxcompress.core.paths import get_path, leaf_names
    from jaxcompress.lowrank.svd import max_rank

    c = _Checker(text, source)
    cache: dict = {}
    for i, stage in enumerate(recipe["stages"]):
        if stage["kind"] == "factorize":
            model_key = repr(sorted(stage["model"].items()))
            if model_key not in cache:
                cache[model_key] = _model_params(stage["model"], num_classes, image_shape)
            params = cache[model_key]
            key = "ranks" if "ranks" in stage else "energy"
            layers = sorted(path.rsplit("/", 1)[0] for path in leaf_names(params) if path.endswith("/kernel"))
            for layer, value in stage[key].items():
                node = get_path(params, layer) if layer in layers else None
                if node is None:
                    c.fail(("stages", i, key), f"{layer!r} is not a layer with a kernel in stage {stage['name']!r}'s "
                           f"model; its layers are {layers}.")
                limit = max_rank(node["kernel"].shape, stage["mode"])
                if key == "ranks" and value > limit:
                    c.fail(("stages", i, key), f"rank {value} of {layer!r} exceeds its largest rank {limit} "
                           f"(kernel {tuple(node['kernel'].shape)}, mode {stage['mode']!r}).")
        for key in ("rules", "density_rules"):
            rules = stage.get(key)
            if not rules:
                continue
            model_key = repr(sorted(stage["model"].items()))
            if model_key not in cache:
                cache[model_key] = _model_params(stage["model"], num_classes, image_shape)
            params = cache[model_key]
            decisions = explain(params, [tuple(r) for r in rules])
            used = {d.rule for d in decisions if d.rule is not None}
            for j, (pattern, _) in enumerate(rules):
                if j not in used and pattern not in _CATCH_ALL:
                    candidates = [d.path for d in decisions if d.reason != "not floating" and len(d.shape) >= 2]
                    c.fail(("stages", i, key), f"rule {j} {pattern!r} of stage {stage['name']!r} matches no "
                           f"parameter (an earlier rule may take them all); the kernels are {candidates}.")


def load_recipe(path: str | Path, **kwargs) -> dict:
    """Reads and validates a recipe file (see :func:`parse_recipe`); ``path`` may name a shipped recipe.

    Example:
      >>> load_recipe("demo")["stages"][1]["teacher"]
      'teacher'
    """
    p = Path(path)
    if not p.exists():
        shipped = Path(__file__).parent / "shipped" / (p.name if p.suffix else p.name + ".toml")
        if p.stem in shipped_recipes() and p.parent == Path("."):
            p = shipped
        else:
            raise FileNotFoundError(f"recipe {str(path)!r} is not a file nor a shipped recipe "
                                    f"({shipped_recipes()}).")
    return parse_recipe(p.read_text(), source=str(p), **kwargs)


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped with the package (``load_recipe(name)`` reads them)."""
    folder = Path(__file__).parent / "shipped"
    return sorted(q.stem for q in folder.glob("*.toml"))
