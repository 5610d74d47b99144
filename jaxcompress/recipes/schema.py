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

Text: with ``[data] name = "python_corpus"`` (the standard library's sources as bytes, split into
train / validation / test files by path hash; ``seq_len`` sets the window, ``max_bytes`` and the
``*_subset`` keys count bytes) the model is a ``transformer_lm``, every training stage gives its
length in ``steps`` (random windows of the training files), and each stage is scored by next-byte
perplexity (and accuracy) on every byte of the validation and test files once. Any training
stage may give ``steps`` instead of ``epochs``, ``eval_every`` (validation scored every that many
steps into the row's ``validation_curve``, for the record; nothing is selected from it),
``grad_clip`` (a global gradient norm) and ``lr_schedule = "warmup_cosine"`` (5% linear warm-up,
then cosine decay to a tenth). An ``oneshot`` stage compresses a trained float model without
training, layer by layer from ``calibration`` training examples (``methods``: reparametrisations
``rotation``, ``smoothquant``, ``awq``, then one solver ``wanda``, ``sparsegpt``, ``gptq`` or
``rtn``, each table holding the method's settings; ``rules`` select the kernels); only an export
may follow it.

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
import re
import tomllib
from pathlib import Path
from typing import Any, Optional, Sequence

from jaxcompress.data.load import DATASETS
from jaxcompress.recipes.layouts import resnet_stages
from jaxcompress.recipes.keys import (BUDGET_BITS_GRID, BUDGET_SPARSITY_GRID, CATCH_ALL, DATA_KEYS, DEFAULTS,
                                      INPUT_SHAPES, MODEL_KEYS, MODEL_KINDS, REQUIRED, SENSITIVITY_GRID, STAGE_KEYS,
                                      STAGE_KINDS, TEXT_DATASETS, TEXT_MODELS, TOP_KEYS, choice, of_type, published)

#: The data keys that only images take, and those that only text takes.
_IMAGE_DATA_KEYS = ("validation", "split_seed", "download", "fallback_to_digits")
_TEXT_DATA_KEYS = ("seq_len", "max_bytes", "validation_subset")

class RecipeError(ValueError):
    """A recipe that cannot run, with the offending ``key`` (e.g. ``'stages[2].sparsity'``) and ``line``."""

    def __init__(self, message: str, *, key: str = "", line: Optional[int] = None, source: str = "<recipe>"):
        where = f"{source}:{line}: " if line is not None else f"{source}: "
        super().__init__(where + (f"{key}: " if key else "") + message)
        self.key, self.line, self.source = key, line, source


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
      check_rules: also work out each stage's parameter shapes (without JAX, no data, no
        training) and refuse parameter rules that match no parameter. Needs the data set's image
        shape, known for the named data sets; for ``tfds:`` sets the runner checks the rules once
        the data is loaded.

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
    top_schema = {**TOP_KEYS, "published": published, "data": of_type(dict, "a table"), "model": of_type(dict, "a table"),
                  "stages": of_type(list, "an array of tables ([[stages]])")}
    c.table(raw, top_schema, (), "the recipe")
    recipe = {**copy.deepcopy(DEFAULTS["top"]), **{k: v for k, v in raw.items() if k not in ("data", "model", "stages")}}
    if "data" not in raw:
        c.fail(("data",), "missing table [data]; give at least name = \"mnist\" (or another data set).")
    c.table(raw["data"], DATA_KEYS, ("data",), "[data]")
    if "name" not in raw["data"]:
        c.fail(("data", "name"), f"missing; give one of {list(DATASETS)}.")
    recipe["data"] = _check_data(c, raw["data"])
    if "model" not in raw:
        c.fail(("model",), f"missing table [model]; give kind = one of {list(MODEL_KINDS)}.")
    recipe["model"] = _check_model(c, raw["model"], ("model",), "[model]", recipe["data"])
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
        shape = (recipe["data"]["seq_len"],) if is_text(recipe) else INPUT_SHAPES.get(recipe["data"]["name"])
        if shape is not None:
            check_stage_rules(recipe, shape, text=text, source=source)
    return recipe


def is_text(recipe: dict) -> bool:
    """Whether the recipe's data set is a byte-level text corpus (language modelling)."""
    return recipe["data"]["name"] in TEXT_DATASETS


def _check_data(c: _Checker, data: dict) -> dict:
    """The data table with its defaults: images get a validation split carved with ``split_seed``;
    a text corpus has its own validation files and needs ``seq_len``."""
    if data["name"] in TEXT_DATASETS:
        for key in _IMAGE_DATA_KEYS:
            if key in data:
                c.fail(("data", key), f"is not read for the text corpus {data['name']!r} (its validation split is "
                       "files held out of training by path hash; validation_subset caps the bytes scored); remove it.")
        if "seq_len" not in data:
            c.fail(("data",), f"the text corpus {data['name']!r} needs seq_len (the window of bytes a model reads), "
                   "e.g. seq_len = 64.")
        return {**{k: v for k, v in DEFAULTS["data"].items() if k not in _IMAGE_DATA_KEYS}, **data}
    for key in _TEXT_DATA_KEYS:
        if key in data:
            c.fail(("data", key), f"is only read for a text corpus ({list(TEXT_DATASETS)}), not for "
                   f"{data['name']!r}; remove it.")
    return {**DEFAULTS["data"], **data}


def _check_model(c: _Checker, model: Any, path: tuple, what: str, data: dict) -> dict:
    if not isinstance(model, dict):
        c.fail(path, f"must be a table such as {{ kind = \"cnn\" }}, got {model!r}.")
    kind = model.get("kind")
    if kind not in MODEL_KINDS:
        c.fail(path + ("kind",), f"must be one of {list(MODEL_KINDS)}, got {kind!r}.")
    c.table(model, {"kind": choice(*MODEL_KINDS), **MODEL_KEYS[kind]}, path, f"{what} (model kind {kind!r})")
    text = data["name"] in TEXT_DATASETS
    if (kind in TEXT_MODELS) != text:
        wanted = list(TEXT_MODELS) if text else [k for k in MODEL_KINDS if k not in TEXT_MODELS]
        c.fail(path + ("kind",), f"{kind!r} does not read {'text' if text else 'images'} ({data['name']!r}); "
               f"give one of {wanted}.")
    if kind == "transformer_lm":
        for key in ("dim", "depth", "heads"):
            if key not in model:
                c.fail(path, f"a transformer_lm{' in ' + what if what != '[model]' else ''} needs {key} "
                       "(e.g. dim = 128, depth = 2, heads = 4).")
        if model["dim"] % model["heads"]:
            c.fail(path + ("heads",), f"must divide dim = {model['dim']}, got {model['heads']}.")
    if kind == "resnet":
        blocks, widths = resnet_stages(model)
        if len(blocks) != len(widths):
            c.fail(path + ("widths",), f"needs one width per stage of blocks = {blocks}, got {widths}.")
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
    out = {**(DEFAULTS["training"] if kind not in ("export", "oneshot") else {}), **DEFAULTS.get(kind, {}), **stage}
    if kind in ("train", "distill"):
        out["model"] = _check_model(c, stage["model"], path + ("model",), f"stage {name!r}", recipe["data"]) \
            if "model" in stage else dict(recipe["model"])
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
    if kind not in ("export", "oneshot"):
        _check_length(c, stage, out, path, recipe, extra)
    if kind == "oneshot":
        _check_oneshot(c, stage, out, path, names, extra)
    if kind == "factorize":
        if ("ranks" in stage) == ("energy" in stage):
            c.fail(path + ("kind",), f"a factorize stage{extra} needs exactly one of ranks = {{ layer = rank }} or "
                   "energy = { layer = kept fraction of the squared singular values }.")
        compressed = [n for n in _lineage(names, out["from"]) if names[n]["kind"] in ("prune", "quantize", "factorize")]
        if compressed:
            c.fail(path + ("from",), f"factorize starts from a float, unfactored model, but {compressed[0]!r} is a "
                   f"{names[compressed[0]]['kind']} stage it comes from{extra}; factor before pruning or quantizing.")
    _check_share_order(c, stage, out, path, names, extra)
    if "rounds" in stage and out.get("schedule") != "iterative":
        c.fail(path + ("rounds",), f"is only read with schedule = \"iterative\"{extra}.")
    if out.get("schedule") == "iterative":
        out.setdefault("rounds", 4)
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


def _check_length(c: _Checker, stage: dict, out: dict, path: tuple, recipe: dict, extra: str) -> None:
    """A training stage's length: ``epochs``, or ``steps`` (always ``steps`` on text, where an epoch is not defined)."""
    if is_text(recipe):
        if "epochs" in stage:
            c.fail(path + ("epochs",), f"text stages train on random windows, so their length is in steps; give "
                   f"steps = N instead{extra}.")
        if "steps" not in stage:
            c.fail(path, f"a {out['kind']} stage on text{extra} needs steps (0 for none, e.g. post-training "
                   "quantization).")
        for key in ("augment",) + (("loss",) if stage.get("loss") == "dkd" else ()):
            if key in stage:
                c.fail(path + (key,), f"{key} = {stage[key]!r} is for image classification; remove it{extra}.")
    elif "steps" in stage and "epochs" in stage:
        c.fail(path + ("steps",), f"give either epochs or steps{extra}, not both.")
    if "steps" in stage:
        out.pop("epochs", None)


def _check_oneshot(c: _Checker, stage: dict, out: dict, path: tuple, names: dict, extra: str) -> None:
    """A one-shot stage starts from a trained float model, and its methods' settings are the methods' own."""
    compressed = [n for n in _lineage(names, out["from"]) if names[n]["kind"] not in ("train", "distill", "finetune")]
    if compressed:
        c.fail(path + ("from",), f"one-shot compression starts from a trained float model, but {compressed[0]!r} is a "
               f"{names[compressed[0]]['kind']} stage it comes from{extra}; start from a train, distill or finetune "
               "stage.")
    from jaxcompress.recipes.models import build_methods

    try:
        build_methods(stage["methods"], out["model"])
    except (ValueError, TypeError) as e:
        c.fail(path + ("methods",), f"{e}{extra}")


def _check_share_order(c: _Checker, stage: dict, out: dict, path: tuple, names: dict, extra: str) -> None:
    """Weight sharing starts from a float (possibly pruned) model, and only an export may follow it (or a one-shot stage)."""
    lineage = _lineage(names, out.get("from"))
    shared = [n for n in lineage if names[n]["kind"] in ("share", "oneshot")]
    if shared and out["kind"] != "export":
        what = ("weight sharing (its codebooks are the final weights)" if names[shared[0]]["kind"] == "share"
                else "one-shot compression (its weights are final)")
        c.fail(path + ("from",), f"{shared[0]!r} is a {names[shared[0]]['kind']} stage this {out['kind']} stage's model "
               f"comes from{extra}; only an export stage may follow {what}.")
    if out["kind"] == "share" and "bits" not in stage and any(v is True for _, v in stage.get("rules", [[None, True]])):
        c.fail(path, f"a share stage{extra} needs bits (the codebook of each shared kernel has 2**bits entries), or "
               "rules that give every shared kernel its bit width.")
    if out["kind"] == "share":
        coded = [n for n in lineage if names[n]["kind"] == "quantize" or names[n].get("bits") is not None
                 or names[n].get("allocation") == "budget"]
        if coded:
            c.fail(path + ("from",), f"weight sharing clusters float weights, but {coded[0]!r} quantizes the model "
                   f"this stage comes from{extra}; share a float (possibly pruned) model instead.")


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


def check_stage_rules(recipe: dict, image_shape: tuple, *, num_classes: int = 10, text: str = "",
                      source: str = "<recipe>") -> None:
    """Refuses parameter rules that match no parameter of the stage's model, and factorize ranks
    a layer cannot have. Works on the models' parameter shapes
    (:func:`~jaxcompress.recipes.layouts.param_shapes`), without JAX.

    ``image_shape``: one example's shape (``(seq_len,)`` for a text model).

    Raises:
      RecipeError: naming ``stages[i].rules[j]`` and its line.
    """
    from jaxcompress.core.rules import decide
    from jaxcompress.lowrank.svd import max_rank
    from jaxcompress.recipes.layouts import param_shapes

    c = _Checker(text, source)
    for i, stage in enumerate(recipe["stages"]):
        try:
            shapes = param_shapes(stage["model"], num_classes, image_shape)
        except ValueError as e:
            c.fail(("model",) if stage["model"] == recipe["model"] else ("stages", i, "model"), str(e))
        if stage["kind"] == "factorize":
            key = "ranks" if "ranks" in stage else "energy"
            layers = sorted(path.rsplit("/", 1)[0] for path in shapes if path.endswith("/kernel"))
            for layer, value in stage[key].items():
                if layer not in layers:
                    c.fail(("stages", i, key), f"{layer!r} is not a layer with a kernel in stage {stage['name']!r}'s "
                           f"model; its layers are {layers}.")
                kernel = shapes[f"{layer}/kernel"]
                limit = max_rank(kernel, stage["mode"])
                if key == "ranks" and value > limit:
                    c.fail(("stages", i, key), f"rank {value} of {layer!r} exceeds its largest rank {limit} "
                           f"(kernel {kernel}, mode {stage['mode']!r}).")
        for key in ("rules", "density_rules"):
            rules = stage.get(key)
            if not rules:
                continue
            decisions = decide([(path, shape, "float32", True) for path, shape in shapes.items()],
                               [tuple(r) for r in rules])
            used = {d.rule for d in decisions if d.rule is not None}
            for j, (pattern, _) in enumerate(rules):
                if j not in used and pattern not in CATCH_ALL:
                    candidates = [d.path for d in decisions if len(d.shape) >= 2]
                    c.fail(("stages", i, key), f"rule {j} {pattern!r} of stage {stage['name']!r} matches no "
                           f"parameter (an earlier rule may take them all); the kernels are {candidates}.")


def load_recipe(path: str | Path, **kwargs) -> dict:
    """Reads and validates a recipe file (see :func:`parse_recipe`); ``path`` may name a shipped recipe.

    Example:
      >>> load_recipe("demo")["stages"][1]["teacher"]
      'teacher'
    """
    p = Path(path)
    if not p.is_file():  # a shipped recipe's name (a directory of that name, e.g. a run's output, is not a recipe)
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
