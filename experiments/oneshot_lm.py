"""One-shot compression of a byte-level Transformer LM: pruning, weight-only and W8A8 quantization.

A TransformerLM is trained on the Python standard library's sources (``load_python_corpus``:
whole files split by path hash, bytes as tokens) until its validation perplexity stops
improving, then compressed without any retraining:

* 50% unstructured and 2:4 sparsity of every Transformer-block kernel (attention and MLP
  projections; embeddings and the output layer stay dense): magnitude (``pruning``), Wanda and
  SparseGPT (``jaxcompress.oneshot``);
* 4-bit and 3-bit weights with groups of 128 inputs on an asymmetric min/max grid:
  round-to-nearest vs GPTQ (and act-order) vs AWQ (and AWQ then GPTQ);
* W8A8 (8-bit symmetric weights per output channel, 8-bit inputs of every block layer with a
  static per-tensor range calibrated on the calibration windows): round-to-nearest vs
  SmoothQuant (its migration strength chosen on validation) vs a rotation of the residual stream
  and attention values (``Rotation``);
* 2:4 with joint 4-bit g128 quantization (SparseGPT), without and with the rotation first;
* Qwix's GPTQ, AWQ and SmoothQuant (``qwix.contrib``) on the same trained model, scored and timed
  in the same run (``experiments/oneshot_qwix.py``; skipped when qwix is not installed).

The one-shot methods calibrate sequentially on ``--calibration`` random windows of the *training*
split. Every configuration is scored on the validation split; choices (training length,
SmoothQuant's alpha) use validation only; each final model is scored once on the *test* split
(every next byte once, non-overlapping windows; the first ``test_bytes`` of the split). The
published trend this checks (OPT-125M, WikiText2): magnitude 50% 27.7 -> 193, SparseGPT 37,
Wanda 38.9; GPTQ 4-bit 31.1 vs RTN 37.3 from fp16 27.7.

Usage: python experiments/oneshot_lm.py [--quick] [--out PATH_WITHOUT_SUFFIX] [--params FILE.npz]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.data.text import eval_windows, load_python_corpus, sample_windows
from jaxcompress.distill.losses import perplexity
from jaxcompress.models.transformer import TRANSFORMER_FOLDS, TransformerLM
from jaxcompress.oneshot import AWQ, GPTQ, RTN, Rotation, SmoothQuant, SparseGPT, Wanda, one_shot
from jaxcompress.prune.pruner import pruning
from jaxcompress.prune.structures import NM
from jaxcompress.train.loop import fit
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BLOCK_KERNELS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]

FULL = dict(seq_len=64, batch_size=32, model=dict(dim=128, depth=2, heads=4), steps=6000, eval_every=500, lr=2e-3,
            calibration=128, calibration_batch=16, test_bytes=200_000, validation_bytes=200_000, group_size=128,
            smoothquant_alphas=(0.25, 0.5, 0.75))
QUICK = dict(FULL, model=dict(dim=32, depth=1, heads=2), steps=60, eval_every=30, calibration=16, test_bytes=20_000,
             validation_bytes=20_000, group_size=32, smoothquant_alphas=(0.5,))
PUBLISHED = {"source": "SparseGPT (Frantar & Alistarh 2023) Table 1 / Wanda (Sun et al. 2023) Table 3 / "
                       "GPTQ (Frantar et al. 2022) Table 3: OPT-125M on WikiText2",
             "dense": 27.66, "magnitude_50": 193.0, "sparsegpt_50": 37.0, "wanda_50": 38.9,
             "rtn_4bit": 37.28, "gptq_4bit": 31.12}
#: Validation perplexity must improve by less than this over the last quarter of training.
CONVERGED = 0.01


def train(model, corpus, cfg, score):
    """Adam with warm-up and cosine decay for ``steps``; validation perplexity every ``eval_every``."""
    apply_fn = linen_apply_fn(model, inputs="tokens")
    params, model_state = split_variables(model.init(jax.random.key(0), jnp.zeros((1, cfg["seq_len"]), jnp.int32)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg["lr"], max(cfg["steps"] // 20, 1), cfg["steps"], cfg["lr"] / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = init_train_state(params, opt, model_state=model_state, rng=0)
    step = jax.jit(make_train_step(apply_fn, opt, loss_fn=token_loss, metrics_fn=token_metrics), donate_argnums=0)
    rng = np.random.default_rng(0)
    data = iter(lambda: sample_windows(corpus.train, batch_size=cfg["batch_size"], seq_len=cfg["seq_len"], rng=rng), None)
    t0, done, curve = time.time(), 0, []
    while done < cfg["steps"]:
        n = min(cfg["eval_every"], cfg["steps"] - done)
        state, metrics = fit(step, state, data, num_steps=n, progress=False)
        done += n
        curve.append({"step": done, "train_loss": metrics["loss"], "val_perplexity": score(state.params, split="validation")})
        print(f"train: step {done} loss {metrics['loss']:.4f} val ppl {curve[-1]['val_perplexity']:.4f}", flush=True)
    quarter = [c["val_perplexity"] for c in curve if c["step"] >= 0.75 * cfg["steps"]]
    gain = (max(quarter) - quarter[-1]) / quarter[-1] if len(quarter) > 1 else float("nan")
    return state.params, {"steps": cfg["steps"], "train_loss": metrics["loss"], "seconds": round(time.time() - t0, 1),
                          "curve": curve, "last_quarter_val_gain": gain, "converged": bool(gain < CONVERGED)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model and data: a smoke check")
    ap.add_argument("--out", default=None, help="output path without suffix")
    ap.add_argument("--params", default=None, help="npz of trained params to reuse (written if missing)")
    ap.add_argument("--no-qwix", action="store_true", help="skip the Qwix comparison")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out or RESULTS / ("oneshot_lm_quick" if args.quick else "oneshot_lm"))
    t_start = time.time()
    corpus = load_python_corpus(max_bytes=200_000 if args.quick else None)
    T = cfg["seq_len"]
    model = TransformerLM(vocab_size=256, max_len=T, **cfg["model"])
    apply_fn = linen_apply_fn(model, inputs="tokens")
    splits = {"validation": corpus.validation[: cfg["validation_bytes"] + 1], "test": corpus.test[: cfg["test_bytes"] + 1]}
    steps = {}

    def score(p, transform=None, state=None, split="test"):
        if transform not in steps:
            steps[transform] = jax.jit(make_eval_step(apply_fn, transform=transform, loss_fn=token_loss,
                                                      metrics_fn=token_metrics))
        ts = init_train_state(p, optax.identity(), transform=transform, model_state={})
        if state is not None:
            ts = ts._replace(compression_state=state)
        r = evaluate(steps[transform], ts, eval_windows(splits[split], batch_size=64, seq_len=T))
        return float(perplexity(r["loss"]))

    template, _ = split_variables(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
    flat, treedef = jax.tree.flatten(template)
    if args.params and Path(args.params).exists():
        with np.load(args.params, allow_pickle=False) as f:
            params = jax.tree.unflatten(treedef, [jnp.asarray(f[str(i)]) for i in range(len(flat))])
            training = json.loads(str(f["training"])) if "training" in f else {}
        training["loaded"] = str(Path(args.params).name)
    else:
        params, training = train(model, corpus, cfg, score)
        if args.params:
            np.savez(args.params, training=json.dumps(training),
                     **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    print("trained:", {k: v for k, v in training.items() if k != "curve"}, flush=True)

    rng = np.random.default_rng(1)
    calib = [sample_windows(corpus.train, batch_size=cfg["calibration_batch"], seq_len=T, rng=rng)
             for _ in range(cfg["calibration"] // cfg["calibration_batch"])]
    calib = [{"tokens": b["tokens"]} for b in calib]
    g = cfg["group_size"]
    head_dim = cfg["model"]["dim"] // cfg["model"]["heads"]
    rows, tried = [], []

    def record(setting, name, p, transform=None, state=None, final=True, **extra):
        row = {"setting": setting, "method": name, "validation_perplexity": score(p, transform, state, "validation")}
        if final:
            row["perplexity"] = score(p, transform, state, "test")
        row.update(extra)
        (rows if final else tried).append(row)
        print(row, flush=True)
        return row

    record("dense", "float32", params)
    dense = rows[0]["perplexity"]

    def baseline(setting, name, t):
        t0 = time.time()
        record(setting, name, params, t, seconds=round(time.time() - t0, 1))

    def oneshot(setting, name, method, final=True, **extra):
        t0 = time.time()
        r = one_shot(method, apply_fn, params, {}, calib, rules=BLOCK_KERNELS, folds=TRANSFORMER_FOLDS)
        wall = time.time() - t0
        tot = r.report["_total"]
        timing = {"compress_seconds": round(wall, 2), "calibration_seconds": round(tot["calibration_seconds"], 2),
                  "solve_seconds": round(tot["solve_seconds"], 2), "groups": tot["groups"]}
        for k in ("Rotation", "SmoothQuant", "AWQ"):
            if k in r.report:
                timing[f"{k.lower()}_seconds"] = round(r.report[k]["seconds"], 2)
        if "AWQ" in r.report:
            timing["awq_ratios"] = r.report["AWQ"]["ratios"]
        return record(setting, name, r.params, r.transform, r.state, final=final, **timing, **extra)

    for setting, structure in (("50% unstructured", None), ("2:4", NM(2, 4))):
        kw = {} if structure is None else {"structure": structure}
        baseline(setting, "magnitude", pruning(0.5, rules=BLOCK_KERNELS, **kw))
        oneshot(setting, "Wanda", Wanda(0.5, **kw))
        oneshot(setting, "SparseGPT", SparseGPT(0.5, **kw))
    # Asymmetric min/max grids (the GPTQ and AWQ papers'), and symmetric absmax grids over the full
    # signed range (absmax -> 2^(b-1) - 1/2, Qwix's symmetric scheme) for the comparison with Qwix.
    for bits, symmetric in ((4, False), (3, False), (4, True), (3, True)):
        setting = f"{bits}-bit g{g}" + (" symmetric" if symmetric else "")
        grid = dict(group_size=g, symmetric=symmetric)
        oneshot(setting, "round-to-nearest", RTN(bits, **grid))
        oneshot(setting, "GPTQ", GPTQ(bits, **grid))
        if not symmetric:
            oneshot(setting, "GPTQ act-order", GPTQ(bits, act_order=True, **grid))
        oneshot(setting, "AWQ", AWQ(bits, **grid))
        oneshot(setting, "AWQ + GPTQ", [AWQ(bits, **grid), GPTQ(bits, **grid)])
    w8a8 = RTN(8, symmetric=True, narrow=True, activation_bits=8)
    oneshot("W8A8", "round-to-nearest", w8a8)
    candidates = [oneshot("W8A8", f"SmoothQuant alpha={a}", [SmoothQuant(a), w8a8], final=False, alpha=a)
                  for a in cfg["smoothquant_alphas"]]
    alpha = min(candidates, key=lambda r: r["validation_perplexity"])["alpha"]
    oneshot("W8A8", "SmoothQuant", [SmoothQuant(alpha), w8a8], alpha=alpha, chosen_on_validation_from=[
        {"alpha": r["alpha"], "validation_perplexity": r["validation_perplexity"]} for r in candidates])
    oneshot("W8A8", "rotation", [Rotation(head_dim=head_dim), w8a8])
    joint = SparseGPT(0.5, structure=NM(2, 4), bits=4, group_size=g)
    oneshot(f"2:4 + 4-bit g{g}", "SparseGPT joint", joint)
    oneshot(f"2:4 + 4-bit g{g}", "rotation + SparseGPT joint", [Rotation(head_dim=head_dim), joint])

    qwix = {"skipped": "--no-qwix"} if args.no_qwix else {}
    if not args.no_qwix:
        try:
            import oneshot_qwix
        except ImportError as e:  # qwix is an optional extra
            qwix = {"skipped": f"qwix not importable: {e}"}
        else:
            for row in oneshot_qwix.qwix_rows(model, params, calib, splits["test"], seq_len=T, group_size=g):
                rows.append(row)
                print(row, flush=True)

    def get(setting, method, key="perplexity"):
        return next((r[key] for r in rows if r["setting"] == setting and r["method"] == method), None)

    def increase(setting, method):
        return get(setting, method) - dense

    bars = {}
    for setting in ("50% unstructured", "2:4"):
        mag = increase(setting, "magnitude")
        for m in ("Wanda", "SparseGPT"):
            bars[f"{m} {setting}: increase <= 1/2 of magnitude's"] = increase(setting, m) <= 0.5 * mag
    bars[f"GPTQ 4-bit g{g}: increase <= 1/2 of round-to-nearest's"] = (
        increase(f"4-bit g{g}", "GPTQ") <= 0.5 * increase(f"4-bit g{g}", "round-to-nearest"))
    # Each Qwix row against the same method of ours in the same setting ("Qwix GPTQ" -> "GPTQ").
    for r in rows:
        if r["method"].startswith("Qwix ") and r.get("perplexity") is not None:
            ours = r["method"][len("Qwix "):].split(",")[0]
            if get(r["setting"], ours) is not None:
                bars[f"{r['setting']} {ours}: perplexity <= {r['method']}'s"] = get(r["setting"], ours) <= r["perplexity"]
    result = {
        "config": cfg, "training": training, "dense_test_perplexity": dense, "rows": rows,
        "tried_on_validation_only": tried, "bars": bars, "published": PUBLISHED, "qwix": qwix,
        "corpus": {"files_sha256": corpus.files_sha256, "python": corpus.python_version,
                   "test_bytes_scored": int(len(splits["test"]) - 1),
                   "validation_bytes_scored": int(len(splits["validation"]) - 1),
                   "calibration_sequences": cfg["calibration"]},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version()},
        "seconds": round(time.time() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result, quick=args.quick))
    plot(result, out.with_suffix(".png"))
    print(json.dumps(bars))


def markdown(result, quick=False):
    cfg, training, dense = result["config"], result["training"], result["dense_test_perplexity"]
    pub = result["published"]
    md = [f"# One-shot compression of a byte-level Transformer LM ({'quick' if quick else 'full'})", "",
          "`python experiments/oneshot_lm.py` (" + ("--quick" if quick else "full run") + f", {result['seconds']:.0f} s).",
          "",
          f"TransformerLM {cfg['model']}, trained {training.get('steps')} steps (train loss "
          f"{training.get('train_loss', float('nan')):.3f}; validation perplexity gained "
          f"{100 * training.get('last_quarter_val_gain', float('nan')):.2f}% over the last quarter of training: "
          f"{'converged' if training.get('converged') else 'NOT converged'} by the {100 * CONVERGED:.0f}% rule). "
          f"Validation perplexity on the first {result['corpus']['validation_bytes_scored']} bytes of the validation "
          f"split (all choices), test perplexity (per byte) on the first {result['corpus']['test_bytes_scored']} bytes "
          f"of the test split, once per final model. Calibration: {cfg['calibration']} windows of {cfg['seq_len']} bytes "
          "from the training split. Block kernels compressed; embeddings and the output layer float.", "",
          "| setting | method | validation perplexity | test perplexity | increase over dense (test) | compress s |",
          "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in result["rows"]:
        ppl = r.get("perplexity")
        val = r.get("validation_perplexity")
        secs = r.get("compress_seconds", r.get("calibration_seconds", ""))
        md.append(f"| {r['setting']} | {r['method']} | {'' if val is None else f'{val:.3f}'} | "
                  f"{'failed: ' + r.get('error', '') if ppl is None else f'{ppl:.3f}'} | "
                  f"{'' if ppl is None else f'{ppl - dense:+.3f}'} | {secs} |")
    if result["tried_on_validation_only"]:
        md += ["", "Configurations tried on validation only (the choice among them):", "",
               "| setting | method | validation perplexity |", "| --- | --- | ---: |"]
        md += [f"| {r['setting']} | {r['method']} | {r['validation_perplexity']:.3f} |" for r in result["tried_on_validation_only"]]
    md += ["", "Bars: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in result["bars"].items()), "",
           f"Published (OPT-125M, WikiText2; {pub['source']}): dense {pub['dense']}, magnitude 50% "
           f"{pub['magnitude_50']}, SparseGPT 50% {pub['sparsegpt_50']}, Wanda 50% {pub['wanda_50']}; "
           f"4-bit RTN {pub['rtn_4bit']}, GPTQ {pub['gptq_4bit']}.", ""]
    if result["qwix"].get("skipped"):
        md += [f"Qwix comparison skipped: {result['qwix']['skipped']}.", ""]
    return "\n".join(md)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = result["dense_test_perplexity"]
    rows = [r for r in result["rows"][1:] if r.get("perplexity") is not None]
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.4 * len(settings), 3.6), sharey=False)
    for ax, s in zip(np.atleast_1d(axes), settings):
        sel = [r for r in rows if r["setting"] == s]
        colors = ["tab:orange" if r["method"].startswith("Qwix") else "tab:blue" for r in sel]
        ax.bar([r["method"] for r in sel], [r["perplexity"] - dense for r in sel], color=colors)
        ax.set_title(s)
        ax.tick_params(axis="x", rotation=40, labelsize=7)
    np.atleast_1d(axes)[0].set_ylabel("test perplexity increase over dense")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
