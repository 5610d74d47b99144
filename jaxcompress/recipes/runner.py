"""Running a recipe: every stage trained, scored, saved and checkpointed, once per seed.

Honest by construction: a validation split is carved out of the training set before anything
trains; the runner selects nothing by test accuracy (each stage keeps its last step, and the
only numbers a stage is judged by during a run are on validation data); the test set is scored
once per stage's final model (``test_evaluations`` in each row) and, for an export, once more on
the weights read back from the file, to show the file holds the model; every stage of every
seed, including one that failed, is appended to ``OUT/runs.jsonl`` as it ends (a stage a re-run
restores from its outputs is appended again, marked ``"restored": true``). A recipe with
``score_test = false`` (a tuning run) scores no model on the test set at all.

Layout of ``OUT``: ``seed_S/stage_NAME/`` holds the stage's checkpoints, ``model.npz`` (the
packed artifact) and ``result.json``; a re-run with the same recipe restores finished stages
from their checkpoints and continues an unfinished one from its last checkpoint; once a stage is
trained again, every later stage is too.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np
import optax

from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import chain
from jaxcompress.export.artifact import save
from jaxcompress.export.budget import allocate_budget, budget_sensitivity, budget_transform, compressed_view, file_bytes
from jaxcompress.export.reader import load
from jaxcompress.export.size import size_report
from jaxcompress.lowrank import factorize
from jaxcompress.prune import allocate_sparsity, fixed_masks, sensitivity_analysis, sparsity_report
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.quant.sharing import weight_sharing
from jaxcompress.recipes import tasks
from jaxcompress.recipes.build import (activation_ranges, and_masks, augmentation, distill_loss, optimizer, pruner,
                                       quant_transform)
from jaxcompress.recipes.models import build_methods, build_model
from jaxcompress.recipes.report import paired_comparison
from jaxcompress.recipes.keys import SENSITIVITY_GRID
from jaxcompress.recipes.schema import RecipeError, check_stage_rules
from jaxcompress.recipes.tasks import Split, load_split
from jaxcompress.train.checkpoint import Checkpointer
from jaxcompress.train.loop import fit
from jaxcompress.train.parallel import data_parallel, per_device_batch_size, step_axis_name
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.evaluation import make_eval_step
from jaxcompress.train.step import Teacher, make_train_step

SELECTION = ("none: each stage keeps its last step; validation accuracy is recorded per stage and the test "
             "set is scored once per stage's final model")
SELECTION_NO_TEST = ("none: each stage keeps its last step; validation accuracy is recorded per stage and no model is "
                     "scored on the test set (score_test = false)")


class _Model(NamedTuple):
    """A finished stage's model, as later stages start from it."""

    module: Any
    params: Any
    model_state: Any
    masks: Any
    quant: Optional[dict]
    view: Any
    description: Optional[dict]


def smoke_recipe(recipe: dict, *, train: int = 320, validation: int = 64, test: int = 128) -> dict:
    """The recipe cut to a few seconds: the first seed, a few hundred images, at most one epoch a stage.

    A sensitivity or budget allocation's grids are cut to their two ends (each grid point compresses
    every layer once).

    For checking that a recipe runs end to end, not for its numbers.

    Example:
      >>> from jaxcompress.recipes.schema import load_recipe
      >>> r = smoke_recipe(load_recipe("demo"))
      >>> r["data"]["train_subset"], max(s.get("epochs", 0) for s in r["stages"])
      (320, 1.0)
    """
    out = json.loads(json.dumps(recipe))
    out["seeds"] = out["seeds"][:1]
    data = out["data"]
    if "seq_len" in data:  # text: a few thousand bytes a split, a few steps a stage
        cap = 40 * data["seq_len"]
        data.update(max_bytes=min(data.get("max_bytes") or 50 * cap, 50 * cap), train_subset=50 * cap,
                    validation_subset=cap, test_subset=cap, batch_size=8, eval_batch_size=16)
    else:
        data.update(train_subset=min(data.get("train_subset") or train, train), validation=validation,
                    test_subset=min(data.get("test_subset") or test, test), batch_size=32)
    for stage in out["stages"]:
        if "epochs" in stage:
            stage["epochs"] = min(float(stage["epochs"]), 1.0)
        if "steps" in stage:
            stage["steps"] = min(stage["steps"], 4)
        if "eval_every" in stage:
            stage["eval_every"] = 2
        if stage["kind"] == "oneshot":
            stage.update(calibration=min(stage["calibration"], 8), calibration_batch=min(stage["calibration_batch"], 4))
        if stage.get("allocation") == "sensitivity":
            grid = stage.get("sensitivity_grid", SENSITIVITY_GRID)
            stage["sensitivity_grid"] = [min(grid), max(grid)]
        if stage.get("allocation") == "budget":
            stage["sensitivity_grid"] = sorted({min(stage["sensitivity_grid"]), max(stage["sensitivity_grid"])})
            stage["bits_grid"] = sorted({min(stage["bits_grid"]), max(stage["bits_grid"])})
    return out


def _fingerprint(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _Run:
    """One seed of a recipe."""

    def __init__(self, recipe: dict, split: Split, out: Path, seed: int, *, progress: bool, log: Callable):
        self.recipe, self.split, self.seed, self.progress, self.log = recipe, split, seed, progress, log
        self.out = out
        self.dir = out / f"seed_{seed}"
        self.models: dict[str, _Model] = {}
        self.rows: dict[str, dict] = {}
        self.recomputed = False
        self.restored: set[str] = set()  # stages whose results were read back, not computed
        data = recipe["data"]
        self.batch_size = data["batch_size"]
        self.eval_batch_size = data["eval_batch_size"] if split.text else min(
            data["eval_batch_size"], split.size("test"), split.size("validation"))
        self.parallel, self.devices = recipe["parallel"], recipe.get("devices")
        self.axis_name = step_axis_name(self.parallel)
        self.objective = tasks.objective(split)

    def _num_steps(self, stage: dict) -> int:
        if "steps" in stage:
            return stage["steps"]
        if stage["epochs"] == 0:
            return 0
        return max(int(round(stage["epochs"] * tasks.steps_per_epoch(self.split, self.batch_size))), 1)

    def _apply(self, module):
        return linen_apply_fn(module, inputs=tasks.inputs_key(self.split))

    def _eval_step(self, apply, transform=None):
        return jax.jit(make_eval_step(apply, transform=transform, **self.objective))

    def _scores(self, apply, state, transform, which: str, step=None) -> Optional[dict]:
        """``{'accuracy', ('perplexity')}`` on split ``which`` (``None`` for the test set with ``score_test = false``)."""
        if which == "test" and not self.recipe["score_test"]:
            return None
        step = self._eval_step(apply, transform) if step is None else step
        return tasks.score(step, state, self.split, which, self.eval_batch_size)

    def _evaluate(self, apply, state, transform, which: str, step=None) -> Optional[float]:
        scores = self._scores(apply, state, transform, which, step)
        return None if scores is None else scores["accuracy"]

    def _score_fields(self, apply, state, transform, suffix: str = "") -> dict:
        """The row's ``validation_accuracy``, ``test_accuracy`` (and ``*_perplexity`` on text), with ``suffix``."""
        step = self._eval_step(apply, transform)
        out = {}
        for which in ("validation", "test"):
            scores = self._scores(apply, state, transform, which, step)
            for metric in ("accuracy",) + (("perplexity",) if self.split.text else ()):
                out[f"{which}_{metric}{suffix}"] = None if scores is None else scores[metric]
        return out

    def _validation_accuracy(self, apply, model_state) -> Callable[[Any], float]:
        """``params -> validation accuracy`` of the model ``apply`` runs, with ``model_state`` (one compiled eval step)."""
        step = self._eval_step(apply)

        def accuracy(params):
            return self._evaluate(apply, init_train_state(params, optax.sgd(0.0), model_state=model_state),
                                  None, "validation", step)

        return accuracy

    def _allocate(self, stage: dict, apply, src: "_Model") -> tuple[dict, dict]:
        """Per-layer sparsities from each layer pruned alone, scored on the validation split only."""
        sens = sensitivity_analysis(src.view, self._validation_accuracy(apply, src.model_state), sparsities=stage.get("sensitivity_grid", SENSITIVITY_GRID))
        allocated = allocate_sparsity(sens, stage["sparsity"])
        return allocated, {"baseline": sens.baseline, "sparsities": list(sens.sparsities), "curves": sens.curves}

    def _allocate_budget(self, stage: dict, apply, src: "_Model") -> tuple[dict, dict, dict]:
        """Per-layer sparsity and bits from each layer compressed alone (validation accuracy, packed
        bytes), allocated to the stage's byte budget or allowed drop; the one-shot result is saved to
        check the predicted size, and the budget tightened by any excess (at most 5 times)."""
        grid = dict(symmetric=stage["symmetric"], per_channel=stage["per_channel"])
        sens = budget_sensitivity(src.view, self._validation_accuracy(apply, src.model_state), sparsities=stage["sensitivity_grid"], bits=stage["bits_grid"],
                                  **grid)
        ref = stage.get("budget")
        budget = self.rows[ref]["file_bytes"] if isinstance(ref, str) else ref
        limit, tries = budget, []
        for _ in range(5):
            try:
                choice = (allocate_budget(sens, budget_bytes=limit) if budget is not None
                          else allocate_budget(sens, max_drop=stage["max_drop"]))
            except ValueError as e:
                raise RecipeError(f"{e} (stage {stage['name']!r}, seed {self.seed})", key="budget") from None
            predicted = sens.fixed_bytes + sum(o.nbytes for o in choice.values())
            actual = file_bytes(*compressed_view(src.view, budget_transform(src.view, choice, **grid)))
            tries.append({"limit": limit, "predicted_file_bytes": predicted, "one_shot_file_bytes": actual})
            if budget is None or actual <= budget:
                break
            limit -= actual - budget
        sparsities = {k: float(o.sparsity) for k, o in choice.items()}
        bits = {k: int(o.bits) for k, o in choice.items()}
        info = {"budget_bytes": budget, "max_drop": stage.get("max_drop"), "tries": tries,
                "predicted_drop": float(sum(sens.baseline - o.metric for o in choice.values())),
                "layers": {k: {"sparsity": o.sparsity, "bits": o.bits, "bytes": o.nbytes,
                               "validation_drop": sens.baseline - o.metric} for k, o in choice.items()},
                "baseline": sens.baseline, "fixed_bytes": sens.fixed_bytes,
                "options": {k: [list(o[:3]) + [o.metric] for o in opts] for k, opts in sens.options.items()}}
        return sparsities, bits, info

    def _stage_dir(self, stage: dict) -> Path:
        return self.dir / f"stage_{stage['name'].replace(' ', '_')}"

    def stage(self, index: int, stage: dict) -> None:
        sdir = self._stage_dir(stage)
        key = _fingerprint(self.recipe["data"], self.seed, self.recipe["stages"][: index + 1],
                           *(() if self.recipe["score_test"] else ("test not scored",)))
        result_file = sdir / "result.json"
        if self.recomputed and sdir.exists():
            shutil.rmtree(sdir)  # an earlier stage changed: this one's outputs are stale
        if sdir.exists() and (sdir / "fingerprint").exists() and (sdir / "fingerprint").read_text() != key:
            raise RecipeError(f"{sdir} was written by a different recipe (or data, seed); use another --out "
                              "or remove that directory.", key=f"stages[{index}]")
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "fingerprint").write_text(key)
        if stage["kind"] == "export":
            return self._export(stage, sdir, result_file)
        if stage["kind"] == "oneshot":
            return self._oneshot(index, stage, sdir, result_file)
        t0 = time.time()
        label = stage.get("label", stage["name"])
        if stage["kind"] in ("train", "distill"):
            module = build_model(stage["model"], self.split.num_classes, seq_len=self.split.seq_len)
            init_key = jax.random.fold_in(jax.random.key(self.seed), index)
            params, model_state = split_variables(module.init(init_key, tasks.example_input(self.split)))
            masks, quant = None, None
        else:
            src = self.models[stage["from"]]
            module, params, model_state, masks, quant = src.module, src.params, src.model_state, src.masks, src.quant
        factored = None
        if stage["kind"] == "factorize":  # truncated SVD of the trained kernels; the factors are the new params
            module, params = factorize(module, params, mode=stage["mode"],
                                       **{k: dict(stage[k]) for k in ("ranks", "energy") if k in stage})
            factored = {"ranks": dict(module.ranks), "mode": stage["mode"]}
        apply = self._apply(module)
        num_steps = self._num_steps(stage)
        parts, prune_at, allocated, sensitivity, budget = [], None, None, None, None
        if masks is not None:
            parts.append(fixed_masks(masks))
        if stage["kind"] == "prune":
            if stage.get("bits") is not None or stage.get("allocation") == "budget":
                if quant is not None:
                    raise RecipeError(f"stage {stage['name']!r} quantizes while it prunes, but its model "
                                      f"{stage['from']!r} is quantized already; start from a float stage or drop "
                                      "bits / allocation = 'budget'.", key=f"stages[{index}].from")
            if stage.get("allocation") == "sensitivity":
                allocated, sensitivity = self._allocate(stage, apply, self.models[stage["from"]])
                self.log(f"{label}: sensitivity allocation on validation: "
                         + ", ".join(f"{k} {v:.1%}" for k, v in allocated.items()))
            elif stage.get("allocation") == "budget":
                allocated, layer_bits, budget = self._allocate_budget(stage, apply, self.models[stage["from"]])
                quant = {"bits": 8, "symmetric": stage["symmetric"], "per_channel": stage["per_channel"],
                         "rules": [(f"^{re.escape(k)}$", b) for k, b in layer_bits.items()] + [(".*", None)]}
                self.log(f"{label}: budget allocation on validation ({budget['tries'][-1]['one_shot_file_bytes']:,} "
                         "one-shot file bytes): " + ", ".join(f"{k} {allocated[k]:.0%} / {b} bits"
                                                             for k, b in layer_bits.items()))
            elif stage.get("bits") is not None:
                quant = {"bits": stage["bits"], "symmetric": stage["symmetric"], "per_channel": stage["per_channel"]}
            prune_at = len(parts)
            parts.append(pruner(stage, params, num_steps, allocated))
        if stage["kind"] == "quantize":
            quant = {k: stage.get(k) for k in ("bits", "symmetric", "per_channel", "group_size", "rules",
                                               "activation_bits", "calibration_batches")}
        if quant is not None:
            parts.append(quant_transform(quant))
        if stage["kind"] == "share":  # k-means codebooks of 2**bits trained centroids; zeros and masks stay
            rules = None if stage.get("rules") is None else [
                (r, v if isinstance(v, bool) else 2 ** v) for r, v in stage["rules"]]
            parts.append(weight_sharing(2 ** stage.get("bits", 8), iters=stage["iters"], rules=rules))
        transform = None if not parts else parts[0] if len(parts) == 1 else chain(*parts)
        teacher = self.models.get(stage.get("teacher")) if stage.get("teacher") else None
        kd = None if teacher is None else Teacher(self._apply(teacher.module), distill_loss(stage),
                                                  labels=tasks.labels_key(self.split))
        opt = optimizer(stage, num_steps)
        state = init_train_state(params, opt, transform=transform, model_state=model_state,
                                 rng=self.seed * 1000 + index)
        if quant is not None and quant.get("activation_bits"):
            state = self._calibrate(apply, transform, state, quant["calibration_batches"], index)
        ckpt = Checkpointer(sdir / "checkpoints", every=self.recipe["checkpoint_every"], keep=2)
        try:
            restored = ckpt.restore(state)
            done = restored is not None and restored.step == num_steps and result_file.exists()
            if done:
                state = restored.state
                row = json.loads(result_file.read_text())
                self.log(f"{label}: restored from {sdir.relative_to(self.out)} (step {num_steps})")
                self.restored.add(stage["name"])
            else:
                self.recomputed = True
                start = 0
                if restored is not None and restored.step < num_steps:
                    state, start = restored.state, restored.step
                    self.log(f"{label}: resuming at step {start} of {num_steps}")
                state, loss = self._train(stage, index, label, apply, opt, transform, kd, teacher, state, start,
                                          num_steps, ckpt, sdir)
                ckpt.save(state, force=True, data_position={"step": num_steps})
                scores = self._score_fields(apply, state, transform)
                row = {"name": label, "stage": stage["name"], "kind": stage["kind"], "steps": num_steps,
                       "epochs": stage.get("epochs"), "total_epochs": self._total_epochs(stage), "train_loss": loss,
                       **scores, "test_evaluations": int(scores["test_accuracy"] is not None)}
                if (sdir / "curve.jsonl").exists():
                    row["validation_curve"] = [json.loads(line) for line in (sdir / "curve.jsonl").open()]
                if factored is not None:
                    row.update(factored, validation_accuracy_factored=self._validation_accuracy(apply, model_state)(params))
                if budget is not None:
                    row.update(allocated_sparsity=allocated, budget_allocation=budget)
                elif allocated is not None:
                    row.update(allocated_sparsity=allocated, sensitivity=sensitivity)
        finally:
            ckpt.close()
        cstate = state.compression_state
        view = state.params if transform is None else transform.apply(state.params, cstate)
        description = None if transform is None else transform.describe(state.params, cstate)
        if prune_at is not None:
            inner = cstate[prune_at] if len(parts) > 1 else cstate
            masks = and_masks(masks, inner.masks)
        if not done:
            mixed = (quant and quant.get("rules")) or stage["kind"] == "share"  # per-layer bit widths
            row.update(self._save_stage(sdir, stage, view, description,
                                        bits=None if mixed else quant["bits"] if quant else 32),
                       seconds=round(time.time() - t0, 2))
            ranges = activation_ranges(cstate)
            if ranges:
                row.update(activation_ranges=ranges)
            if masks is not None:
                layers, total = sparsity_report(view, masks)
                row.update(sparsity=total.sparsity, layer_sparsity={r.path: r.sparsity for r in layers})
            result_file.write_text(json.dumps(row, indent=2) + "\n")
            self._log_row(label, row)
        self.rows[stage["name"]] = row
        self.models[stage["name"]] = _Model(module, state.params, state.model_state, masks, quant, view, description)

    def _save_stage(self, sdir: Path, stage: dict, view, description, bits=None) -> dict:
        """Saves the stage's model to ``sdir/model.npz``; returns the row's size fields. ``bits``: the
        code width of the weights, or ``None`` for the mean width over the coded weights."""
        artifact = sdir / "model.npz"
        saved = save(artifact, view, description, metadata={"recipe": self.recipe["name"], "stage": stage["name"],
                                                              "seed": self.seed})
        size = size_report(view, description, artifact=saved)
        if bits is None:
            sizes = {path_name(p): int(np.size(x)) for p, x in jax.tree.leaves_with_path(view)}
            coded = [(sizes[k], d.bits) for k, d in description.items() if d.bits is not None]
            bits = round(sum(n * b for n, b in coded) / max(sum(n for n, _ in coded), 1), 2) if coded else 32
        return {"params": size.params, "nonzero_params": size.nonzero_params,
                "weight_bits": {"binary": 1, "ternary": 2}.get(bits, bits), "bytes_float32": size.bytes_float32,
                "bytes_compressed": size.bytes_compressed, "file_bytes": size.file_bytes,
                "artifact": str(artifact.relative_to(self.out))}

    def _log_row(self, label: str, row: dict) -> None:
        def value(which):
            metric = "perplexity" if self.split.text else "accuracy"
            v = row.get(f"{which}_{metric}")
            return "not scored" if v is None else f"{metric} {v:.4f}"

        self.log(f"{label}: validation {value('validation')}, test {value('test')}, "
                 f"{row['file_bytes']:,} file bytes, {row['seconds']:.1f} s")

    def _oneshot(self, index: int, stage: dict, sdir: Path, result_file: Path, *, force: bool = False) -> None:
        """Compresses the stage's float model in one shot from ``calibration`` training examples (no training).

        The calibration examples are drawn from the seed and the model's stage, so every one-shot
        stage of the same model sees the same ones. A finished stage is restored from its result
        and artifact (``force``: computed again, when an export needs its description)."""
        from jaxcompress.models.transformer import TRANSFORMER_FOLDS
        from jaxcompress.oneshot import one_shot

        t0 = time.time()
        label = stage.get("label", stage["name"])
        src = self.models[stage["from"]]
        artifact = sdir / "model.npz"
        if not force and result_file.exists() and artifact.exists():
            view, _ = load(artifact, like=src.params)
            self.log(f"{label}: restored from {sdir.relative_to(self.out)}")
            self.rows[stage["name"]] = json.loads(result_file.read_text())
            self.models[stage["name"]] = _Model(src.module, view, src.model_state, None, None, view, None)
            self.restored.add(stage["name"])
            return
        self.restored.discard(stage["name"])
        apply = self._apply(src.module)
        source = next(i for i, s in enumerate(self.recipe["stages"]) if s["name"] == stage["from"])
        batches = tasks.calibration_batches(self.split, stage["calibration"], stage["calibration_batch"],
                                            self.seed * 1000 + source)
        rules = None if stage.get("rules") is None else [(r, True if v else None) for r, v in stage["rules"]]
        folds = TRANSFORMER_FOLDS if stage["model"]["kind"] == "transformer_lm" else ()
        methods = build_methods(stage["methods"], stage["model"])
        result = one_shot(methods if len(methods) > 1 else methods[0], apply, src.params, src.model_state, batches,
                          rules=rules, sequential=stage["sequential"], folds=folds)
        compress_seconds = time.time() - t0
        view = result.transform.apply(result.params, result.state)
        description = result.transform.describe(result.params, result.state)
        self.models[stage["name"]] = _Model(src.module, result.params, src.model_state, None, None, view, description)
        if force:  # the row and artifact stand; the model is wanted for an export
            return
        state = init_train_state(result.params, optax.sgd(0.0), transform=result.transform, model_state=src.model_state)
        scores = self._score_fields(apply, state._replace(compression_state=result.state), result.transform)
        total = result.report["_total"]
        row = {"name": label, "stage": stage["name"], "kind": "oneshot", "steps": 0, "epochs": None,
               "total_epochs": self._total_epochs(stage), "train_loss": None, **scores,
               "test_evaluations": int(scores["test_accuracy"] is not None),
               "methods": [dict(m) for m in stage["methods"]], "calibration_examples": stage["calibration"],
               "compress_seconds": round(compress_seconds, 2),
               "calibration_seconds": round(total["calibration_seconds"], 2),
               "solve_seconds": round(total["solve_seconds"], 2), "groups": total["groups"]}
        for part in ("Rotation", "SmoothQuant", "AWQ"):
            if part in result.report:
                row[f"{part.lower()}_seconds"] = round(result.report[part]["seconds"], 2)
        row.update(self._save_stage(sdir, stage, view, description))
        row.update(sparsity=1.0 - row["nonzero_params"] / max(row["params"], 1), seconds=round(time.time() - t0, 2))
        result_file.write_text(json.dumps(row, indent=2) + "\n")
        self.recomputed = True
        self._log_row(label, row)
        self.rows[stage["name"]] = row

    def _calibrate(self, apply, transform, state, count: int, index: int):
        """Min/max input ranges of the quantized layers from ``count`` training batches (no training)."""
        batches = tasks.train_batches(self.split, self.batch_size, self.seed * 1000 + index, count)
        cstate = calibrate_activations(transform, state.compression_state, apply, state.params, state.model_state,
                                       batches)
        return state._replace(compression_state=cstate)

    def _total_epochs(self, stage: dict) -> float:
        """Epochs of this stage and of every stage its model comes from (its whole training budget)."""
        total = 0.0
        while stage is not None:
            total += float(stage.get("epochs", 0.0))
            stage = next((s for s in self.recipe["stages"] if s["name"] == stage["from"]), None)
        return total

    def _train(self, stage, index, label, apply, opt, transform, kd, teacher, state, start, num_steps, ckpt, sdir):
        if num_steps == start:
            return state, None
        if self.parallel != "none":
            per_device_batch_size(self.batch_size, len(jax.devices()) if self.devices is None else self.devices)
        step = make_train_step(apply, opt, transform=transform, teacher=kd, axis_name=self.axis_name,
                               augment=augmentation(stage, self.split.num_classes), **self.objective)
        dp = data_parallel(step, parallel=self.parallel, devices=self.devices)
        # From the data position of the checkpoint on.
        batches = tasks.train_batches(self.split, self.batch_size, self.seed * 1000 + index, num_steps, start)
        every, count = self.recipe["checkpoint_every"], [start]

        def step_and_save(state, batch, *extra):
            state, metrics = dp.step(state, batch, *extra)
            count[0] += 1
            if count[0] % every == 0 and count[0] < num_steps:
                ckpt.save(dp.get_state(state), force=True, data_position={"step": count[0]})
            return state, metrics

        teacher_variables = None if teacher is None else dp.put_teacher((teacher.view, teacher.model_state))
        state = dp.put_state(state)
        curve = sdir / "curve.jsonl"
        if start == 0 and curve.exists():
            curve.unlink()
        eval_every = stage.get("eval_every") or num_steps
        done = start
        eval_step = self._eval_step(apply, transform) if stage.get("eval_every") else None
        while done < num_steps:  # in chunks of eval_every steps, validation scored after each (for the record)
            n = min(eval_every - done % eval_every, num_steps - done)
            state, metrics = fit(step_and_save, state, batches, num_steps=n, teacher_variables=teacher_variables,
                                 desc=label, progress=self.progress)
            done += n
            if eval_step is not None:
                scores = self._scores(apply, dp.get_state(state), transform, "validation", eval_step)
                with curve.open("a") as f:
                    f.write(json.dumps({"step": done, "train_loss": metrics.get("loss"),
                                        **{f"validation_{k}": v for k, v in scores.items()}}) + "\n")
        return dp.get_state(state), metrics.get("loss")

    def _export(self, stage: dict, sdir: Path, result_file: Path) -> None:
        src = self.models[stage["from"]]
        row = self.rows[stage["from"]]
        target = sdir / stage["file"]
        if result_file.exists() and target.exists() and not self.recomputed:
            row.update(json.loads(result_file.read_text()))
            return
        index, parent = next((i, s) for i, s in enumerate(self.recipe["stages"]) if s["name"] == stage["from"])
        if parent["kind"] == "oneshot" and parent["name"] in self.restored:  # its description is wanted: compute it again
            self._oneshot(index, parent, self._stage_dir(parent), self._stage_dir(parent) / "result.json", force=True)
            src = self.models[stage["from"]]
        saved = save(target, src.view, src.description, float_dtype=stage["float_dtype"],
                     context_coding=stage["context_coding"],
                     metadata={"recipe": self.recipe["name"], "stage": stage["from"], "seed": self.seed,
                               "test_accuracy": row["test_accuracy"]})
        loaded, _ = load(target, like=src.view)  # the model as a user gets it from the file
        state = init_train_state(loaded, optax.sgd(0.0), model_state=src.model_state)
        scores = self._score_fields(self._apply(src.module), state, None, "_from_file")  # test None: score_test = false
        metric = "perplexity" if self.split.text else "accuracy"
        acc = scores[f"test_{metric}_from_file"]
        extra = {"exported": str(target.relative_to(self.out)), "exported_file_bytes": saved.file_bytes, **scores}
        result_file.write_text(json.dumps(extra, indent=2) + "\n")
        row.update(extra)
        self.log(f"{row['name']}: exported to {extra['exported']} ({saved.file_bytes:,} bytes)"
                 + ("" if acc is None else f", test {metric} from the file {acc:.4f}"))


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _summary(runs: list[list[dict]]) -> list[dict]:
    """One row per stage: the single run's row, or the mean over seeds with ``*_std`` for accuracies.

    Flat tables of numbers (``layer_sparsity``, ``allocated_sparsity``) are averaged key by key;
    other values (paths, the sensitivity curves) are the first seed's.
    """
    if len(runs) == 1:
        return [dict(r) for r in runs[0]]
    out = []
    for rows in zip(*runs):
        row = dict(rows[0])
        for k, v in rows[0].items():
            if _is_number(v) and all(r.get(k) is not None for r in rows):
                values = np.array([r[k] for r in rows], dtype=np.float64)
                row[k] = float(values.mean())
                if "accuracy" in k or k.endswith("file_bytes"):
                    row[f"{k}_std"] = float(values.std(ddof=1))
            elif isinstance(v, dict) and v and all(_is_number(x) for x in v.values()):
                row[k] = {name: float(np.mean([r[k][name] for r in rows])) for name in v}
        row["seeds"] = len(rows)
        out.append(row)
    return out


def _portable_path(source: str) -> str:
    """A data directory as the report shows it: relative to where the run started, or to the home
    directory when it lies there and not below the start, so the report holds no machine's absolute path."""
    if not os.path.isdir(source):
        return source  # a data set name, not a directory
    here = os.path.relpath(source)
    home = os.path.expanduser("~")
    if here.startswith(os.pardir) and os.path.abspath(source).startswith(home + os.sep):
        return os.path.join("~", os.path.relpath(source, home))
    return here


def run_recipe(recipe: dict, out: str | Path, *, progress: bool = True, log: Callable[[str], None] = print,
               split: Optional[Split] = None) -> dict:
    """Runs every stage of ``recipe`` (from :func:`~jaxcompress.recipes.schema.load_recipe`) for each seed.

    Args:
      recipe: a validated recipe dict.
      out: the output directory (created; a re-run resumes from its checkpoints).
      progress: show progress bars.
      log: where progress messages go.
      split: the data, when already loaded with :func:`load_split` (default: loaded here).

    Returns:
      The report: ``recipe, dataset, source, split, seeds, selection, runs`` (per seed, the stage
      rows), ``stages`` (the rows, or their means and ``*_std`` over seeds), ``paired`` (with a
      ``reference`` stage: :func:`~jaxcompress.recipes.report.paired_comparison` of the test
      accuracies), ``config`` and ``environment``. A stage row holds ``name, stage, kind, steps,
      epochs, total_epochs, train_loss, validation_accuracy, test_accuracy, test_evaluations,
      params, nonzero_params, weight_bits, bytes_float32, bytes_compressed, file_bytes, artifact,
      seconds`` (``activation_ranges`` with quantized inputs; ``sparsity`` and ``layer_sparsity``
      when pruned, counting every zero of the view; ``allocated_sparsity`` and ``sensitivity``
      with a sensitivity allocation; ``allocated_sparsity`` and ``budget_allocation`` with a
      budget allocation; ``exported, exported_file_bytes, test_accuracy_from_file`` when an
      export stage saved it). ``total_epochs`` counts the
      stages the model comes from too; ``test_accuracy`` is ``None`` with ``score_test = false``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    split = load_split(recipe["data"], log) if split is None else split
    shape = (split.seq_len,) if split.text else split.train[0].shape[1:]
    check_stage_rules(recipe, shape, num_classes=split.num_classes)
    log(f"data: {split.name} from {split.source}: {split.size('train')} train / {split.size('validation')} "
        f"validation / {split.size('test')} test {split.unit} {shape}")
    runs = []
    t0 = time.time()
    with open(out / "runs.jsonl", "a") as journal:
        for seed in recipe["seeds"]:
            run = _Run(recipe, split, out, seed, progress=progress, log=log)
            for index, stage in enumerate(recipe["stages"]):
                try:
                    run.stage(index, stage)
                except Exception as e:
                    journal.write(json.dumps({"seed": seed, "stage": stage["name"], "error": f"{type(e).__name__}: {e}"})
                                  + "\n")
                    raise
                if stage["kind"] != "export":
                    journal.write(json.dumps({"seed": seed, "time": round(time.time(), 1), **run.rows[stage["name"]],
                                              **({"restored": True} if stage["name"] in run.restored else {})})
                                  + "\n")
                journal.flush()
            runs.append(list(run.rows.values()))
    own = {s["name"]: s["reference"] for s in recipe["stages"] if s.get("reference")}
    return {
        "recipe": recipe["name"],
        "dataset": split.name,
        "source": _portable_path(split.source),
        "split": {"train": split.size("train"), "validation": split.size("validation"), "test": split.size("test"),
                  "unit": split.unit, **({"seq_len": split.seq_len} if split.text else
                                         {"split_seed": recipe["data"]["split_seed"]})},
        "seeds": list(recipe["seeds"]),
        "selection": SELECTION if recipe["score_test"] else SELECTION_NO_TEST,
        "runs": [{"seed": s, "stages": rows} for s, rows in zip(recipe["seeds"], runs)],
        "stages": _summary(runs),
        **({"paired": paired_comparison(runs, recipe.get("reference"), references=own,
                                                  key="test_perplexity" if split.text else "test_accuracy")}
           if (recipe.get("reference") or own) and recipe["score_test"] else {}),
        "config": {**recipe, "data": {**recipe["data"], **({"dir": _portable_path(recipe["data"]["dir"])}
                                                          if recipe["data"].get("dir") else {})}},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()},
        "total_seconds": round(time.time() - t0, 1),
    }
