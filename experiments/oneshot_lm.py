"""One-shot compression of a byte-level Transformer LM: magnitude vs Wanda vs SparseGPT, RTN vs GPTQ.

A TransformerLM is trained on the Python standard library's sources (``load_python_corpus``:
whole files split by path hash, bytes as tokens), then compressed without any retraining:

* 50% unstructured and 2:4 sparsity of every Transformer-block kernel (attention and MLP
  projections; embeddings and the output layer stay dense): magnitude (``pruning``), Wanda and
  SparseGPT (``jaxcompress.oneshot``);
* 4-bit and 3-bit weights with groups of 128 inputs on an asymmetric min/max grid:
  round-to-nearest (``weight_quantization``) vs GPTQ (and GPTQ with act-order).

The one-shot methods calibrate sequentially on ``--calibration`` random windows of the *training*
split; perplexity is measured on the *test* split (every next byte once, non-overlapping
windows; the first ``test_bytes`` of the split). The published trend this checks (OPT-125M,
WikiText2): magnitude 50% 27.7 -> 193, SparseGPT 37, Wanda 38.9; GPTQ 4-bit 31.1 vs RTN 37.3
from fp16 27.7.

Usage: python experiments/oneshot_lm.py [--quick] [--out PATH_WITHOUT_SUFFIX] [--params FILE.npz]
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.data.text import eval_windows, load_python_corpus, sample_windows
from jaxcompress.distill.losses import perplexity
from jaxcompress.models.transformer import TransformerLM
from jaxcompress.oneshot import GPTQ, SparseGPT, Wanda, one_shot
from jaxcompress.prune.pruner import pruning
from jaxcompress.prune.structures import NM
from jaxcompress.quant.weights import weight_quantization
from jaxcompress.train.loop import fit
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.step import make_train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
BLOCK_KERNELS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]

FULL = dict(seq_len=64, batch_size=32, model=dict(dim=128, depth=2, heads=4), steps=1500, lr=2e-3,
            calibration=128, calibration_batch=16, test_bytes=200_000, group_size=128)
QUICK = dict(FULL, model=dict(dim=32, depth=1, heads=2), steps=60, calibration=16, test_bytes=20_000, group_size=32)
PUBLISHED = {"source": "SparseGPT (Frantar & Alistarh 2023) Table 1 / Wanda (Sun et al. 2023) Table 3 / "
                       "GPTQ (Frantar et al. 2022) Table 3: OPT-125M on WikiText2",
             "dense": 27.66, "magnitude_50": 193.0, "sparsegpt_50": 37.0, "wanda_50": 38.9,
             "rtn_4bit": 37.28, "gptq_4bit": 31.12}


def train(model, corpus, cfg):
    apply_fn = linen_apply_fn(model, inputs="tokens")
    params, model_state = split_variables(model.init(jax.random.key(0), jnp.zeros((1, cfg["seq_len"]), jnp.int32)))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg["lr"], max(cfg["steps"] // 20, 1), cfg["steps"], cfg["lr"] / 10)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    state = init_train_state(params, opt, model_state=model_state, rng=0)
    step = jax.jit(make_train_step(apply_fn, opt, loss_fn=token_loss, metrics_fn=token_metrics), donate_argnums=0)
    rng = np.random.default_rng(0)
    data = iter(lambda: sample_windows(corpus.train, batch_size=cfg["batch_size"], seq_len=cfg["seq_len"], rng=rng), None)
    t0 = time.time()
    state, metrics = fit(step, state, data, num_steps=cfg["steps"], progress=False)
    return state.params, {"steps": cfg["steps"], "train_loss": metrics["loss"], "seconds": round(time.time() - t0, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model and data: a smoke check")
    ap.add_argument("--out", default=None, help="output path without suffix")
    ap.add_argument("--params", default=None, help="npz of trained params to reuse (written if missing)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    out = Path(args.out or RESULTS / ("oneshot_lm_quick" if args.quick else "oneshot_lm"))
    t_start = time.time()
    corpus = load_python_corpus(max_bytes=200_000 if args.quick else None)
    T = cfg["seq_len"]
    model = TransformerLM(vocab_size=256, max_len=T, **cfg["model"])
    apply_fn = linen_apply_fn(model, inputs="tokens")

    template, _ = split_variables(model.init(jax.random.key(0), jnp.zeros((1, T), jnp.int32)))
    flat, treedef = jax.tree.flatten(template)
    if args.params and Path(args.params).exists():
        with np.load(args.params, allow_pickle=False) as f:
            params = jax.tree.unflatten(treedef, [jnp.asarray(f[str(i)]) for i in range(len(flat))])
        training = {"loaded": str(Path(args.params).name)}
    else:
        params, training = train(model, corpus, cfg)
        if args.params:
            np.savez(args.params, **{str(i): np.asarray(x) for i, x in enumerate(jax.tree.leaves(params))})
    print("trained:", training, flush=True)

    test = corpus.test[: cfg["test_bytes"] + 1]
    steps = {}

    def score(p, transform=None):
        if transform not in steps:
            steps[transform] = jax.jit(make_eval_step(apply_fn, transform=transform, loss_fn=token_loss,
                                                      metrics_fn=token_metrics))
        state = init_train_state(p, optax.identity(), transform=transform, model_state={})
        r = evaluate(steps[transform], state, eval_windows(test, batch_size=64, seq_len=T))
        return float(perplexity(r["loss"]))

    rng = np.random.default_rng(1)
    calib = [sample_windows(corpus.train, batch_size=cfg["calibration_batch"], seq_len=T, rng=rng)
             for _ in range(cfg["calibration"] // cfg["calibration_batch"])]
    calib = [{"tokens": b["tokens"]} for b in calib]

    rows = [{"setting": "dense", "method": "float32", "perplexity": score(params)}]
    dense = rows[0]["perplexity"]
    print(rows[0], flush=True)
    g = cfg["group_size"]

    def baseline(setting, name, t):
        t0 = time.time()
        ppl = score(params, t)
        rows.append({"setting": setting, "method": name, "perplexity": ppl, "seconds": round(time.time() - t0, 1)})
        print(rows[-1], flush=True)

    def oneshot(setting, name, method):
        t0 = time.time()
        r = one_shot(method, apply_fn, params, {}, calib, rules=BLOCK_KERNELS)
        wall = time.time() - t0
        tot = r.report["_total"]
        rows.append({"setting": setting, "method": name, "perplexity": score(r.params, r.transform),
                     "compress_seconds": round(wall, 2), "calibration_seconds": round(tot["calibration_seconds"], 2),
                     "solve_seconds": round(tot["solve_seconds"], 2), "groups": tot["groups"]})
        print(rows[-1], flush=True)

    for setting, structure in (("50% unstructured", None), ("2:4", NM(2, 4))):
        kw = {} if structure is None else {"structure": structure}
        baseline(setting, "magnitude", pruning(0.5, rules=BLOCK_KERNELS, **kw))
        oneshot(setting, "Wanda", Wanda(0.5, **kw))
        oneshot(setting, "SparseGPT", SparseGPT(0.5, **kw))
    for bits in (4, 3):
        setting = f"{bits}-bit g{g}"
        baseline(setting, "round-to-nearest", weight_quantization(bits, symmetric=False, group_size=g, rules=BLOCK_KERNELS))
        oneshot(setting, "GPTQ", GPTQ(bits, group_size=g))
        oneshot(setting, "GPTQ act-order", GPTQ(bits, group_size=g, act_order=True))

    def increase(setting, method):
        return next(r["perplexity"] for r in rows if r["setting"] == setting and r["method"] == method) - dense

    bars = {}
    for setting in ("50% unstructured", "2:4"):
        mag = increase(setting, "magnitude")
        for m in ("Wanda", "SparseGPT"):
            bars[f"{m} {setting}: increase <= 1/2 of magnitude's"] = increase(setting, m) <= 0.5 * mag
    bars[f"GPTQ 4-bit g{g}: increase <= 1/2 of round-to-nearest's"] = (
        increase(f"4-bit g{g}", "GPTQ") <= 0.5 * increase(f"4-bit g{g}", "round-to-nearest"))
    result = {
        "config": cfg, "training": training, "dense_test_perplexity": dense, "rows": rows, "bars": bars,
        "published": PUBLISHED,
        "corpus": {"files_sha256": corpus.files_sha256, "python": corpus.python_version,
                   "test_bytes_scored": int(len(test) - 1), "calibration_sequences": cfg["calibration"]},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version()},
        "seconds": round(time.time() - t_start, 1),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# One-shot compression of a byte-level Transformer LM ({'quick' if args.quick else 'full'})", "",
          f"TransformerLM {cfg['model']}, trained {training}; test perplexity (per byte) on the first "
          f"{len(test) - 1} bytes of the test split; calibration: {cfg['calibration']} windows of {T} bytes "
          "from the training split; block kernels compressed, embeddings and output layer float.", "",
          "| setting | method | test perplexity | increase over dense | compress s |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        md.append(f"| {r['setting']} | {r['method']} | {r['perplexity']:.3f} | {r['perplexity'] - dense:+.3f} | "
                  f"{r.get('compress_seconds', '')} |")
    md += ["", "Bars: " + "; ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in bars.items()), "",
           f"Published (OPT-125M, WikiText2; {PUBLISHED['source']}): dense {PUBLISHED['dense']}, magnitude 50% "
           f"{PUBLISHED['magnitude_50']}, SparseGPT 50% {PUBLISHED['sparsegpt_50']}, Wanda 50% {PUBLISHED['wanda_50']}; "
           f"4-bit RTN {PUBLISHED['rtn_4bit']}, GPTQ {PUBLISHED['gptq_4bit']}.", ""]
    out.with_suffix(".md").write_text("\n".join(md))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        settings = list(dict.fromkeys(r["setting"] for r in rows[1:]))
        fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.2), sharey=False)
        for ax, s in zip(axes, settings):
            sel = [r for r in rows if r["setting"] == s]
            ax.bar([r["method"] for r in sel], [r["perplexity"] - dense for r in sel], color="tab:blue")
            ax.set_title(s)
            ax.tick_params(axis="x", rotation=30, labelsize=7)
        axes[0].set_ylabel("test perplexity increase over dense")
        fig.tight_layout()
        fig.savefig(out.with_suffix(".png"), dpi=110)
    except ImportError:
        pass
    print(json.dumps(bars))


if __name__ == "__main__":
    main()
