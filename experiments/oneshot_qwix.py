"""Qwix's one-shot quantizers on the dense model of a ``jaxcompress run oneshot_lm`` run, side by side.

``python experiments/oneshot_qwix.py RUN_DIR`` reads the run's report, its dense model (from the
stage's saved artifact) and draws the same calibration windows the run's one-shot stages used
(``jaxcompress.recipes.tasks.calibration_batches`` with the same seed); ``qwix_rows`` runs Qwix
(``qwix.contrib``: GPTQ, AWQ, SmoothQuant; plain Qwix PTQ as the round-to-nearest baseline)
through its public API on the same TransformerLM and the same block kernels (every ``block_N``
Dense layer: attention query/key/value/out and MLP fc1/fc2; embeddings, LayerNorms and ``head``
stay float), and scores each quantized Qwix model with the library's ``evaluate`` on the test
bytes. It writes ``RUN_DIR/qwix.json`` and ``RUN_DIR/qwix.md``: each Qwix row beside the run's
stage of the same setting and method (where the run tried the method several ways, SmoothQuant's
alphas, GPTQ sequential or in one pass, the one with the best validation perplexity). Every row
carries ``config``: the exact scheme Qwix ran (grid formulas included), so the same scheme can be
run with jaxcompress.

What Qwix 0.1.8 does differently from the experiment's one-shot methods (all in ``config``):

* Its asymmetric (``minmax``) grid exists only for int4 and int8: 3-bit asymmetric raises, so
  the 3-bit rows of the experiment's asymmetric scheme record that error, and symmetric rows
  (``'... symmetric'`` settings, ``absmax`` grids, which Qwix has at 3 bits) are added for both
  bit widths.
* Its symmetric grids map ``absmax`` to ``2^(b-1) - 0.5`` and keep the full signed range
  ``[-2^(b-1), 2^(b-1) - 1]``: ``+absmax`` rounds to the clipped top level.
* Its GPTQ refuses asymmetric grids (zero points) and 3-bit storage: of the GPTQ rows only
  ``'4-bit ... symmetric'`` runs; the others record Qwix's error and the line that raised it.
* GPTQ and AWQ calibrate in one pass on the float model: every layer's statistics come from
  float inputs, not from the outputs of already-quantized layers. GPTQ has no act-order; AWQ
  has no clipping search and scores scales by an activation-weighted weight error.
* ``SqInferenceProvider`` does not quantize activations: ``act_qtype`` only sets the
  smoothing scales, so Qwix's own SmoothQuant runs W8 with float activations (the setting
  ``'W8, float inputs'``, beside the run's stages of SmoothQuant with 8-bit weights alone). The row
  ``'Qwix SmoothQuant, int8 activations'`` feeds Qwix's SmoothQuant weights to Qwix's
  ``PtqProvider`` activation quantization (dynamic, per token) for a real W8A8. Qwix averages
  the smoothing scales ``s`` and their inverses separately over the calibration batches.
* Its W8A8 quantizes activations dynamically, per token (each position's own absmax), not on
  a static calibrated range: its rows are the setting ``'W8A8 per-token'``, beside the run's
  stages of that scheme (``RTN(..., activation_range='token')``), not the static per-tensor
  ``'W8A8'`` stages.

Usage: ``python experiments/oneshot_qwix.py RUN_DIR`` (needs ``pip install -e ".[qwix]"``), or
``rows = qwix_rows(model, params, calib, test_tokens, seq_len=64, group_size=128)``.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
import traceback
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxcompress.data.text import eval_windows
from jaxcompress.distill.losses import perplexity
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.state import init_train_state, linen_apply_fn

# Qwix matches module paths ('block_0/attn/query'); dot_general only, so the attention
# einsums (q.k and weights.v, activations on both sides) are never quantized.
BLOCK_MODULES = r"block_\d+/.*"
LAYERS = ("block_N Dense kernels (attn query/key/value/out, mlp fc1/fc2), quantized along their "
          "input axis; embeddings, LayerNorms and head float")

# Qwix's arithmetic as XLA compiles it: divisions by a constant or a broadcast scale become
# products with float32 reciprocals (which decides the level of ties such as -absmax).
_WEIGHT_GRIDS = {
    "minmax": ("asymmetric: lo = min(min(w_g), 0), hi = max(max(w_g), 0), qmin, qmax = -2^(b-1), "
               "2^(b-1) - 1, scale = (hi - lo) * float32(1 / (qmax - qmin)) (1 where < sqrt(float32 tiny)), "
               "zero_point = round_half_even(qmin - lo * (1 / scale)) clipped to [qmin, qmax], "
               "w_hat = (clip(round_half_even(w * (1 / scale) + zero_point), qmin, qmax) - zero_point) * scale"),
    "absmax": ("symmetric: scale = max|w_g| * float32(1 / (2^(b-1) - 0.5)) (1 where < sqrt(float32 tiny)), "
               "w_hat = clip(round_half_even(w * (1 / scale)), -2^(b-1), 2^(b-1) - 1) * scale: +max|w_g| "
               "lands on 2^(b-1) - 0.5 and is clipped to 2^(b-1) - 1, -max|w_g| rounds to -2^(b-1) or "
               "-(2^(b-1) - 1) by float32 rounding"),
}


def qwix_rows(model, params, calib, test_tokens, *, seq_len, group_size) -> list[dict]:
    """Qwix GPTQ, AWQ, SmoothQuant and round-to-nearest on ``model``, one row per setting and method.

    Args:
      model: a ``TransformerLM``.
      params: its trained params (``variables['params']``).
      calib: calibration batches ``{'tokens': int32 (B, seq_len)}``.
      test_tokens: the test bytes, scored as the recipe runner scores (``eval_windows``: every next byte once).
      seq_len: the window length.
      group_size: inputs per weight group of the 4- and 3-bit settings.

    Returns:
      Rows ``{'setting', 'method', 'perplexity', 'calibration_seconds', 'config'}`` (and
      ``'error'`` with ``'perplexity': None`` where Qwix refused the scheme).

    Raises:
      ValueError: empty ``calib``.
    """
    import qwix  # the optional extra: imported only when the comparison runs

    if not calib:
        raise ValueError("calib must hold at least one batch {'tokens': (B, seq_len)}, got none.")
    # Qwix's calibration providers find no weight to calibrate among NumPy arrays (as ``load`` returns
    # them): GPTQ and AWQ then quietly give round-to-nearest. Its params are JAX arrays.
    params = jax.tree.map(jnp.asarray, params)
    tokens = [jnp.asarray(b["tokens"], jnp.int32) for b in calib]
    common = {"library": f"qwix {qwix.__version__}", "layers": LAYERS,
              "calibration": f"{len(tokens)} batches of {tuple(tokens[0].shape)} tokens",
              "calibration_seconds": "wall time of Qwix's statistics and quantize_params, jit "
                                     "compilation included, until the quantized params are ready"}
    rows = []

    def run(setting, method, build, config):
        t0 = time.time()
        try:
            qmodel, qparams = build()
            jax.block_until_ready(qparams)
            seconds = round(time.time() - t0, 2)
            ppl = score(qmodel, qparams, test_tokens, seq_len)
            row = {"setting": setting, "method": method, "perplexity": ppl, "calibration_seconds": seconds}
        except (ValueError, TypeError, NotImplementedError, AssertionError) as e:
            row = {"setting": setting, "method": method, "perplexity": None, "calibration_seconds": None,
                   "error": f"{type(e).__name__}: {e}", "error_at": qwix_frame(e)}
        row["config"] = {**common, **config}
        rows.append(row)
        print(row, flush=True)

    from qwix.contrib import awq, gptq, smooth_quant

    for symmetric in (False, True):
        method_name = "absmax" if symmetric else "minmax"
        for bits in (4, 3):
            qtype = jnp.int4 if bits == 4 else "int3"
            rule = dict(module_path=BLOCK_MODULES, op_names=("dot_general",), weight_qtype=qtype,
                        weight_calibration_method=method_name, tile_size=group_size)
            setting = f"{bits}-bit g{group_size}" + (" symmetric" if symmetric else "")
            weights = weight_config(bits, qtype, method_name, group_size)
            ptq_rules = [qwix.QuantizationRule(**rule)]
            run(setting, "Qwix round-to-nearest",
                lambda: ptq(model, params, qwix.PtqProvider(ptq_rules), ptq_rules, qwix.quantize_params, seq_len),
                {"weights": weights, "activations": "float", "api": "qwix.PtqProvider + qwix.quantize_params"})
            run(setting, "Qwix GPTQ",
                lambda: calibrated(model, params, tokens, gptq.GptqCalibrationProvider([gptq.GptqRule(**rule)]),
                                   qwix.PtqProvider(ptq_rules), ptq_rules, gptq.quantize_params, seq_len),
                {"weights": weights, "activations": "float",
                 "api": "qwix.contrib.gptq: GptqCalibrationProvider, quantize_params; qwix.PtqProvider",
                 "gptq": {"damping": "0.01 * mean(diag(H)) added to diag(H)", "block_size": 128,
                          "act_order": False, "hessian": "H = mean over calibration batches of X X^T "
                          "(X: the layer's inputs of one batch, all tokens)",
                          "sequential": False, "inputs": "float model's layer inputs, one pass",
                          "dead_inputs": "diag(H) == 0: H_ii = 1 and w_i = 0",
                          "order": "columns (inputs) in their natural order, in blocks of 128",
                          "group_params": "each group's grid from the weights as they stand at the start "
                                          "of its 128-column block (earlier blocks' compensation applied, "
                                          "not that of earlier columns of its own block; as the reference "
                                          "GPTQ code); with groups of 128 a group is a block"}})
            awq_rule = awq.AwqRule(**rule)
            run(setting, "Qwix AWQ",
                lambda: calibrated(model, params, tokens, awq.AwqCalibrationProvider([awq_rule]),
                                   awq.AwqInferenceProvider(ptq_rules), ptq_rules, awq.quantize_params, seq_len),
                {"weights": weights, "activations": "float",
                 "api": "qwix.contrib.awq: AwqCalibrationProvider, quantize_params, AwqInferenceProvider",
                 "awq": {"act_stat": "a_j = mean over calibration batches of the batch mean |x_j| "
                                     "(per input channel j, float model's inputs, one pass)",
                         "grid_search": "ratio in linspace(0, 1, 20); s = clip((a / max a)^ratio, 1e-4) "
                                        "(a / max a first clipped to >= 1e-4), s /= sqrt(max s * min s)",
                         "loss": "mean(((w - Q(w * s) / s) * a)^2): activation-weighted weight error, "
                                 "not the layer's output error",
                         "clip_search": False,
                         "inference": "kernel = dequantize(Q(w * s)) / s (s is not folded into the previous layer)"}})

    w8 = weight_config(8, jnp.int8, "absmax", None)
    act = {"bits": 8, "qtype": "int8", "symmetric": True,
           "range": "dynamic: each token's own range at inference, nothing calibrated",
           "granularity": "per token (one scale per position of each sequence, over the layer's input features)",
           "grid": "scale = max|x_token| * float32(1 / 127.5), x_hat = clip(round_half_even(x * (1 / scale)), "
                   "-128, 127) * scale"}
    a8 = dict(module_path=BLOCK_MODULES, op_names=("dot_general",), weight_qtype=jnp.int8, act_qtype=jnp.int8)
    a8_rules = [qwix.QuantizationRule(**a8)]
    run("W8A8 per-token", "Qwix round-to-nearest",
        lambda: ptq(model, params, qwix.PtqProvider(a8_rules), a8_rules, qwix.quantize_params, seq_len),
        {"weights": w8, "activations": act, "api": "qwix.PtqProvider + qwix.quantize_params"})
    sq_stats = {"alpha": 0.5, "scales": "s_j = clip((max|x_j| / 127.5)^alpha / (max|w_j,:| / 127.5)^(1 - alpha), "
                                        "1e-5) per input channel j (x: the batch's tokens; w_j,: the kernel's "
                                        "row j), then averaged over calibration batches (mean of per-batch s)",
                "weights_quantized": "Q(w * s_j) per output channel, s_j the batch mean of s",
                "activations_scaled": "x_j * r_j, r_j = batch mean of 1 / s_j (Qwix averages s and 1 / s "
                                      "separately, so r_j >= 1 / mean(s_j): not an exact inverse)"}
    sq_rule = [smooth_quant.SqRule(**a8, alpha=0.5)]
    w8_rules = [qwix.QuantizationRule(module_path=BLOCK_MODULES, op_names=("dot_general",), weight_qtype=jnp.int8)]
    run("W8, float inputs", "Qwix round-to-nearest",
        lambda: ptq(model, params, qwix.PtqProvider(w8_rules), w8_rules, qwix.quantize_params, seq_len),
        {"weights": w8, "activations": "float", "api": "qwix.PtqProvider + qwix.quantize_params"})
    run("W8, float inputs", "Qwix SmoothQuant",
        lambda: calibrated(model, params, tokens, smooth_quant.SqCalibrationProvider(sq_rule),
                           smooth_quant.SqInferenceProvider(sq_rule), sq_rule, smooth_quant.quantize_params, seq_len),
        {"weights": w8, "smoothquant": sq_stats,
         "activations": "float: SqInferenceProvider multiplies x by 1/s and multiplies by the int8 kernel "
                        "without quantizing x (W8A16 in effect; act_qtype only enters the scales)",
         "api": "qwix.contrib.smooth_quant: SqCalibrationProvider, quantize_params, SqInferenceProvider"})
    run("W8A8 per-token", "Qwix SmoothQuant, int8 activations",
        lambda: calibrated(model, params, tokens, smooth_quant.SqCalibrationProvider(sq_rule),
                           smoothed_activations_provider(sq_rule), sq_rule, smooth_quant.quantize_params, seq_len),
        {"weights": w8, "smoothquant": sq_stats, "activations": act,
         "api": "qwix.contrib.smooth_quant: SqCalibrationProvider, quantize_params; inference: x * r as "
                "SqInferenceProvider, then qwix.PtqProvider.dot_general (its int8 activation quantization) "
                "on the SmoothQuant kernel"})
    return rows


def qwix_frame(error: BaseException) -> str:
    """The innermost line of Qwix's own source that the traceback of ``error`` passes through."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/qwix/" in f.filename]
    if not frames:
        return "outside qwix"
    f = frames[-1]
    return f"qwix/{f.filename.rsplit('/qwix/', 1)[1]}:{f.lineno} ({f.name}): {f.line}"


def weight_config(bits, qtype, method, group_size) -> dict:
    """The ``config['weights']`` of a row: Qwix's ``method`` grid at ``bits``, per channel or group."""
    return {"bits": bits, "qtype": str(getattr(qtype, "__name__", qtype)), "symmetric": method == "absmax",
            "calibration_method": method, "grid": _WEIGHT_GRIDS[method],
            "granularity": ("per output channel" if group_size is None else
                            f"per output channel and group of {group_size} consecutive inputs"),
            "group_size": group_size}


def ptq(model, params, provider, rules, quantize_params, seq_len, *stats):
    """Qwix's quantized model and params: ``quantize_params(params, abstract, *stats)``.

    ``abstract`` is the params tree of ``model`` under ``qwix.PtqProvider(rules)``, which marks
    every weight it quantizes and how (Qwix's SmoothQuant provider marks none itself); the
    quantized model runs with ``provider``.
    """
    import qwix

    qmodel = qwix.quantize_model(model, provider)
    marked = qwix.quantize_model(model, qwix.PtqProvider(rules))
    abstract = jax.eval_shape(marked.init, jax.random.key(0), jnp.zeros((1, seq_len), jnp.int32))["params"]
    # jit: GPTQ's column loop is Python; eagerly it dispatches every column's ops one by one.
    return qmodel, jax.jit(lambda p, *s: quantize_params(p, abstract, *s))(params, *stats)


def calibrated(model, params, tokens, calibration_provider, inference_provider, rules, quantize_params, seq_len):
    """Collects Qwix's ``quant_stats`` over ``tokens`` with ``calibration_provider``, then quantizes."""
    import qwix

    cmodel = qwix.quantize_model(model, calibration_provider)

    @jax.jit
    def collect(stats, x):
        _, new = cmodel.apply({"params": params, "quant_stats": stats}, x, mutable=["quant_stats"])
        return new["quant_stats"]

    stats = {}
    for x in tokens:
        stats = collect(stats, x)
    return ptq(model, params, inference_provider, rules, quantize_params, seq_len, stats)


def score(qmodel, qparams, test_tokens, seq_len) -> float:
    """Test perplexity of Qwix's quantized model, by the library's evaluation, as the recipe runner scores.

    Qwix's quantized params hold integer leaves, which a TrainState's params may not; they are
    passed as the ``'params'`` collection of ``model_state``, which ``linen_apply_fn`` merges
    into the variables unchanged in eval mode.
    """
    step = jax.jit(make_eval_step(linen_apply_fn(qmodel, inputs="tokens"), loss_fn=token_loss,
                                  metrics_fn=token_metrics))
    state = init_train_state({}, optax.identity(), model_state={"params": qparams})
    r = evaluate(step, state, eval_windows(test_tokens, batch_size=64, seq_len=seq_len))
    return float(perplexity(r["loss"]))


def smoothed_activations_provider(rules):
    """Qwix's ``SqInferenceProvider`` with Qwix's PTQ activation quantization of the smoothed inputs.

    ``SqInferenceProvider`` multiplies the inputs by its stored ``inv_sq_scale`` and calls the
    quantized dot without quantizing them; this one hands the smoothed inputs and the SmoothQuant
    kernel to ``PtqProvider.dot_general``, which quantizes the inputs by the rule's ``act_qtype``.
    """
    from qwix import PtqProvider
    from qwix._src.providers.ptq import WithAux  # the wrapper PtqProvider reads quantized kernels from
    from qwix.contrib import smooth_quant

    class SmoothedActivations(smooth_quant.SqInferenceProvider):
        def dot_general(self, lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, *,
                        out_sharding=None):
            if isinstance(rhs, smooth_quant.WithSqScale):
                lhs = lhs * rhs.inv_sq_scale
                rhs = WithAux(rhs.array, rhs.how)
            return PtqProvider.dot_general(self, lhs, rhs, dimension_numbers, precision=precision,
                                           preferred_element_type=preferred_element_type,
                                           out_sharding=out_sharding)

    return SmoothedActivations(rules)


def ours_for(report: dict, setting: str, method: str) -> dict | None:
    """The run's stage row of ``setting`` and ``method`` (labels ``'SETTING: METHOD'``). Where the
    run tried the method several ways (SmoothQuant's alphas ``'SETTING: SmoothQuant alpha A'``;
    variants ``'SETTING: METHOD, VARIANT'`` such as GPTQ in one pass), the one with the best
    validation perplexity."""
    method = method[len("Qwix "):].split(",")[0]
    prefix = f"{setting}: {method}" + (" alpha " if method == "SmoothQuant" else ", ")
    tried = [r for r in report["stages"] if r["name"] == f"{setting}: {method}" or r["name"].startswith(prefix)]
    if len(tried) > 1:
        return min(tried, key=lambda r: r["validation_perplexity"])
    return tried[0] if tried else None


def comparison(report: dict, rows: list[dict]) -> list[dict]:
    """Each Qwix row with the run's matching stage: both test perplexities and both compression times."""
    out = []
    for row in rows:
        ours = ours_for(report, row["setting"], row["method"])
        out.append({"setting": row["setting"], "method": row["method"], "qwix_test_perplexity": row["perplexity"],
                    "qwix_seconds": row["calibration_seconds"], "error": row.get("error"),
                    "ours": None if ours is None else ours["name"],
                    "ours_test_perplexity": None if ours is None else ours["test_perplexity"],
                    "ours_seconds": None if ours is None else ours.get("compress_seconds"),
                    "ours_at_or_below_qwix": None if ours is None or row["perplexity"] is None
                    else bool(ours["test_perplexity"] <= row["perplexity"])})
    return out


def markdown(result: dict) -> str:
    dense = result["dense_test_perplexity"]
    lines = [f"# Qwix {result['qwix']} beside `jaxcompress run oneshot_lm`", "",
             f"`python experiments/oneshot_qwix.py {result['run']}` (the output directory of `jaxcompress run "
             f"oneshot_lm`; {result['seconds']:.0f} s): Qwix's one-shot "
             f"quantizers on the run's dense model (test perplexity {dense:.4f}) with the run's {result['calibration']}"
             " calibration windows, scored on the same test bytes; each beside the run's stage of the same setting "
             "(where the run tried the method several ways, SmoothQuant's alphas and GPTQ sequential or in one pass, "
             "the one with the best validation perplexity). Seconds: wall time until the "
             "compressed weights are ready (jit compilation included), on the same machine, one after the other.", "",
             "| setting | Qwix method | Qwix test perplexity | Qwix s | ours | our test perplexity | our s | ours <= Qwix |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: | --- |"]
    for c in result["comparison"]:
        q = "refused: " + c["error"].split(":")[0] if c["qwix_test_perplexity"] is None else f"{c['qwix_test_perplexity']:.4f}"
        o = "-" if c["ours_test_perplexity"] is None else f"{c['ours_test_perplexity']:.4f}"
        verdict = {None: "-", True: "yes", False: "NO"}[c["ours_at_or_below_qwix"]]
        lines.append(f"| {c['setting']} | {c['method']} | {q} | {c['qwix_seconds'] or '-'} | {c['ours'] or '-'} | {o} | "
                     f"{c['ours_seconds'] if c['ours_seconds'] is not None else '-'} | {verdict} |")
    met = [c for c in result["comparison"] if c["ours_at_or_below_qwix"] is not None]
    lines += ["", f"Ours at or below Qwix on {sum(c['ours_at_or_below_qwix'] for c in met)} of {len(met)} settings "
              "both ran. The schemes Qwix ran are in `qwix.json` (`rows[i].config`).", ""]
    return "\n".join(lines)


class OneShotRun(NamedTuple):
    """What a ``jaxcompress run oneshot_lm`` directory holds for a comparison on its dense model."""

    report: dict  # the run's report.json
    split: Any  # the run's data, loaded again from its recipe
    model: Any  # the Linen model of the stage the one-shot stages start from
    params: Any  # that stage's weights, loaded from its saved artifact
    dense_row: dict  # that stage's row of the report
    oneshot: dict  # the first one-shot stage's config (calibration count and batch)
    calib: list  # the calibration batches the run's one-shot stages used


def load_run(run: Path) -> OneShotRun:
    """The dense model of a ``oneshot_lm`` run and the calibration windows its one-shot stages drew
    (:func:`jaxcompress.recipes.tasks.calibration_batches` with the run's seed and source stage)."""
    from jaxcompress.export.reader import load
    from jaxcompress.recipes import tasks
    from jaxcompress.recipes.models import build_model

    report = json.loads((run / "report.json").read_text())
    stages = report["config"]["stages"]
    oneshot = next(s for s in stages if s["kind"] == "oneshot")
    source = next(i for i, s in enumerate(stages) if s["name"] == oneshot["from"])
    split = tasks.load_split(report["config"]["data"])
    model = build_model(stages[source]["model"], split.num_classes, seq_len=split.seq_len)
    like = model.init(jax.random.key(0), tasks.example_input(split))["params"]
    dense_row = next(r for r in report["runs"][0]["stages"] if r["stage"] == oneshot["from"])
    params, _ = load(run / dense_row["artifact"], like=like)
    calib = tasks.calibration_batches(split, oneshot["calibration"], oneshot["calibration_batch"],
                                      report["seeds"][0] * 1000 + source)
    return OneShotRun(report, split, model, params, dense_row, oneshot, calib)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", help="the output directory of `jaxcompress run oneshot_lm`")
    args = ap.parse_args(argv)
    import qwix

    t0 = time.time()
    loaded = load_run(Path(args.run))
    stages = loaded.report["config"]["stages"]
    group = next(m["group_size"] for s in stages if s["kind"] == "oneshot" for m in s["methods"] if "group_size" in m)
    rows = qwix_rows(loaded.model, loaded.params, loaded.calib, loaded.split.test, seq_len=loaded.split.seq_len,
                     group_size=group)
    runs0 = {"stages": loaded.report["runs"][0]["stages"]}
    result = {"run": str(args.run), "qwix": qwix.__version__,
              "dense_test_perplexity": loaded.dense_row["test_perplexity"],
              "calibration": loaded.oneshot["calibration"], "rows": rows, "comparison": comparison(runs0, rows),
              "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                              "python": platform.python_version()},
              "seconds": round(time.time() - t0, 1)}
    run = Path(args.run)
    (run / "qwix.json").write_text(json.dumps(result, indent=2) + "\n")
    (run / "qwix.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
