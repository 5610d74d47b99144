"""CPU inference latency of a CNN with half its filters removed structurally, and its accuracy.

The library's CNN (conv C1 -> pool -> conv C2 -> pool -> dense 128 -> 10) is trained on MNIST
(55,000 training images; the last 5,000 are the validation split), at each width of ``--widths``
(default: the library's default CNN(32, 64) and the twice wider CNN(64, 128)). Half the filters of
both convolutions are then masked with ``tied_channel_masks`` (kernel columns and biases together)
and removed with ``shrink``: the result is ``CNN(channels=(C1 / 2, C2 / 2))``, whose outputs equal
the masked model's (the largest difference is recorded). The small model is fine-tuned with the ordinary
train step; the number of fine-tuning epochs is chosen on the validation split, and the test set
is scored once for the dense and once for the final small model.

Timing: jitted inference at batch 256 with :func:`jaxcompress.benchmark.compare` (shuffled
interleaved blocks, the baseline timed twice as an A/A control, bootstrap 95% intervals). Each
model runs two ways: as the plain Flax model (``dense``, the baseline; ``shrunk``), and through
the library's inference (:func:`jaxcompress.infer.choose_paths`: per layer, the convolution or
the matrix product over its input patches, whichever measures faster, then checked on the whole
model), ``dense_infer`` and ``shrunk_infer``. The headline ratio is the shrunk model's fastest
program over the dense model's fastest program (each model served as well as the library can);
the plain-model ratio is reported beside it. XLA's cost analysis (FLOPs, bytes accessed) of every
compiled program is included. The top-level ``ratio`` is the largest headline ratio over the
widths (the bar must hold at every width to be met).

Usage: python experiments/benchmarks/shrink_latency.py --out FILE.json [--quick] [--widths 32,64 64,128]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress import infer
from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, verdict, write_result
from jaxcompress.data import epochs, load_mnist
from jaxcompress.export import channel_groups, shrink, tied_channel_masks
from jaxcompress.models import CNN
from jaxcompress.prune.structures import Channels
from jaxcompress.train import split_variables

ROOT = Path(__file__).resolve().parents[2]


def train(module, params, batches, steps, lr):
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = jc.init_train_state(params, opt)
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), opt), donate_argnums=0)
    state, _ = jc.fit(step, state, batches, num_steps=steps, progress=False)
    return state


def accuracy(module, state, x, y) -> float:
    ev = jax.jit(jc.make_eval_step(jc.linen_apply_fn(module)))
    return float(jc.evaluate(ev, state, {"image": x, "label": y})["accuracy"])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=float, default=3.0)
    ap.add_argument("--finetune-epochs", type=int, default=2, help="largest fine-tuning length tried")
    ap.add_argument("--blocks", type=int, default=30)
    ap.add_argument("--layer-blocks", type=int, default=10)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--widths", nargs="+", default=["32,64", "64,128"],
                    help="the dense CNNs' channel counts, C1,C2 each (even numbers)")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.blocks, args.layer_blocks, args.calls = 0.25, 1, 6, 3, 2
    widths = []
    for w in args.widths:
        try:
            c = tuple(int(v) for v in w.split(","))
        except ValueError:
            c = ()
        if len(c) != 2 or any(v < 2 or v % 2 for v in c):
            ap.error(f"--widths: {w!r} is not two even channel counts C1,C2 (e.g. 32,64)")
        widths.append(c)
    data = load_mnist(args.data_dir, download=False)
    models = {f"cnn_{c1}_{c2}": measure((c1, c2), args, data) for c1, c2 in widths}
    worst = max(models, key=lambda k: models[k]["ratio"])
    result = {
        "benchmark": "shrink_latency",
        "ratio": models[worst]["ratio"],
        "ratio_definition": "the largest, over the widths, of: median CPU latency of jitted inference at batch 256 "
                            "of the CNN with 50% of the filters of both convolutions removed by shrink / the dense "
                            f"CNN, each on its faster program (here {worst}); lower is better",
        "ratio_interval_95": models[worst]["ratio_interval_95"],
        "aa": models[worst]["aa"],
        "verdict": models[worst]["verdict"],
        "target": "ratio <= 0.55 and test accuracy within 1 point of dense, at every width",
        "models": models,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "environment": environment(quick=args.quick),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).with_suffix(".md").write_text(markdown(result))
    for k, m in models.items():
        print(f"{k}: shrunk / dense {_cell({'ratio': m['ratio'], 'low': m['ratio_interval_95'][0], 'high': m['ratio_interval_95'][1]})} "
              f"({m['verdict']}), test drop {m['accuracy']['test_drop_points']:.2f} points")
    write_result(args.out, result)


def measure(channels: tuple, args, data) -> dict:
    """Trains the dense CNN of ``channels``, shrinks half its filters away, fine-tunes, and times both."""
    x_tr, y_tr = data.train_images[:55000], data.train_labels[:55000]
    x_val, y_val = data.train_images[55000:], data.train_labels[55000:]
    bs, per_epoch = 128, 55000 // 128
    t0 = time.time()

    dense = CNN(channels=channels, hidden=128)
    params, _ = split_variables(dense.init(jax.random.key(0), x_tr[:1]))
    steps = max(int(args.epochs * per_epoch), 1)
    state = train(dense, params, epochs(x_tr, y_tr, bs, seed=0, num_epochs=int(np.ceil(args.epochs))), steps, 1e-3)
    dense_params = state.params
    dense_val = accuracy(dense, state, x_val, y_val)

    # Half the filters of both convolutions, masked together with their biases, then removed.
    masks = tied_channel_masks(dense_params, channel_groups(dense), {"conv1": 0.5, "conv2": 0.5})
    t = jc.fixed_masks(masks, structure=Channels(axis=-1))
    s = t.init(dense_params)
    small = shrink(dense, dense_params, t.describe(dense_params, s))
    probe = data.test_images[:512]
    masked_out = dense.apply({"params": t.apply(dense_params, s)}, probe)
    small_out = small.module.apply({"params": small.params}, probe)
    max_diff = float(jnp.max(jnp.abs(masked_out - small_out)))
    before_val = accuracy(small.module, jc.init_train_state(small.params, optax.sgd(0.0)), x_val, y_val)

    # Fine-tune the small dense model; the epoch count is chosen on the validation split.
    finetune_log, best = [], None
    for e in range(1, args.finetune_epochs + 1):
        steps_ft = max(int((e if not args.quick else 0.25) * per_epoch), 1)
        st = train(small.module, small.params, epochs(x_tr, y_tr, bs, seed=1, num_epochs=max(e, 1)), steps_ft, 3e-4)
        val = accuracy(small.module, st, x_val, y_val)
        finetune_log.append({"epochs": e if not args.quick else 0.25, "steps": steps_ft, "val_accuracy": val})
        if best is None or val > best[0]:
            best = (val, e, st)
    dense_test = accuracy(dense, state, data.test_images, data.test_labels)
    small_test = accuracy(small.module, best[2], data.test_images, data.test_labels)
    train_seconds = time.time() - t0

    x = jnp.asarray(data.test_images[:256])
    models = {"dense": (dense, dense_params), "shrunk": (small.module, best[2].params)}
    programs, plans = {}, {}
    for name, (module, p) in models.items():
        programs[name] = ((lambda m: lambda p, v: m.apply({"params": p}, v))(module), jax.tree.map(jnp.copy, p))
        prepared = infer.prepare(module, p, {}, x, call_kwargs={})
        plan = infer.choose_paths(prepared, blocks=args.layer_blocks, calls=args.calls, seed=len(plans))
        plans[name] = {"paths": plan.paths, "layer_timings": plan.timings, "whole_model_check": plan.whole}
        programs[f"{name}_infer"] = infer.inference_program(prepared, plan)
    jitted = {k: (jax.jit(f), w) for k, (f, w) in programs.items()}
    lat = compare({k: (lambda f, w: lambda: f(w, x))(f, w) for k, (f, w) in jitted.items()}, baseline="dense",
                  blocks=args.blocks, calls=args.calls)
    del lat["order"]
    lat["cost"] = {k: cost_analysis(f, w, x) for k, (f, w) in programs.items()}
    med = lat["median_s"]
    best_dense = min(("dense", "dense_infer"), key=med.get)
    best_small = min(("shrunk", "shrunk_infer"), key=med.get)
    # the headline interval: the two fastest programs re-compared, the dense one as baseline
    head = compare({"dense": (lambda f, w: lambda: f(w, x))(*jitted[best_dense]),
                    "shrunk": (lambda f, w: lambda: f(w, x))(*jitted[best_small])},
                   baseline="dense", blocks=args.blocks, calls=args.calls, seed=1)
    r = head["ratios"]["shrunk"]
    n_dense = sum(v.size for v in jax.tree.leaves(dense_params))
    n_small = sum(v.size for v in jax.tree.leaves(small.params))
    drop = 100 * (dense_test - small_test)
    out = {
        "ratio": r["ratio"],
        "ratio_definition": "median CPU latency of jitted inference at batch 256 of the CNN with 50% of the filters "
                            f"of both convolutions removed by shrink {tuple(small.module.channels)} / the dense CNN "
                            f"{tuple(channels)}, each on its faster program ({best_small} vs {best_dense}); lower is "
                            "better",
        "ratio_interval_95": [r["low"], r["high"]],
        "aa": head["ratios"][CONTROL],
        "verdict": verdict(r, 0.55),
        "plain_model_ratio": lat["ratios"]["shrunk"],
        "programs": {"fastest_dense": best_dense, "fastest_shrunk": best_small},
        "latency": lat,
        "headline_timing": {k: v for k, v in head.items() if k != "order"},
        "plans": plans,
        "params": {"dense": int(n_dense), "shrunk": int(n_small)},
        "dense_channels": list(channels),
        "shrunk_channels": list(small.module.channels),
        "max_abs_diff_shrunk_vs_masked_before_finetune": max_diff,
        "accuracy": {"dense_val": dense_val, "dense_test": dense_test, "shrunk_val_before_finetune": before_val,
                     "finetune_log": finetune_log, "chosen_finetune_epochs": best[1], "shrunk_val": best[0],
                     "shrunk_test": small_test, "test_drop_points": drop},
        "train_seconds": round(train_seconds, 1),
    }
    print(f"CNN{tuple(channels)}: dense test {100 * dense_test:.2f}%, shrunk test {100 * small_test:.2f}% "
          f"(before fine-tuning: val {100 * before_val:.2f}%), max |shrunk - masked| {max_diff:.2e}")
    print(", ".join(f"{k} {v['ratio']:.3f} [{v['low']:.3f}, {v['high']:.3f}]" for k, v in lat["ratios"].items()))
    return out


def _cell(r):
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def markdown(res: dict) -> str:
    """The results as Markdown, every number read from ``res``."""
    cfg = res["config"]
    lines = ["# Structural shrink: latency and accuracy of a CNN with half its filters removed", "",
             "`python experiments/benchmarks/shrink_latency.py --out experiments/benchmarks/results/shrink_latency.json "
             f"--epochs {cfg['epochs']:g} --finetune-epochs {cfg['finetune_epochs']} --widths {' '.join(cfg['widths'])}`.",
             "", f"Environment: {res['environment']}.", ""]
    for name, m in res["models"].items():
        lines += _model_markdown(m)
    lines += ["## Bars", ""]
    for name, m in res["models"].items():
        acc = m["accuracy"]
        ok_acc = acc["test_drop_points"] <= 1.0
        lines += [f"- CNN{tuple(m['dense_channels'])} -> CNN{tuple(m['shrunk_channels'])}: "
                  f"{m['programs']['fastest_shrunk']} / {m['programs']['fastest_dense']} = "
                  f"{_cell({'ratio': m['ratio'], 'low': m['ratio_interval_95'][0], 'high': m['ratio_interval_95'][1]})}"
                  f" (A/A {_cell(m['aa'])}); bar <= 0.55: **{m['verdict']}**; test accuracy within 1 point of dense: "
                  f"{'met' if ok_acc else 'NOT met'} ({abs(acc['test_drop_points']):.2f} points "
                  f"{'lower' if acc['test_drop_points'] >= 0 else 'higher'}); plain Flax models (no path choice): "
                  f"{_cell(m['plain_model_ratio'])}."]
    lines += [f"- Over all widths (the top-level ratio, the largest headline): {res['ratio']:.3f}: **{res['verdict']}** "
              "(`meets`: the interval lies wholly below the bar)."]
    return "\n".join(lines) + "\n"


def _model_markdown(m: dict) -> list:
    lat, acc = m["latency"], m["accuracy"]
    c1, c2 = m["dense_channels"]
    lines = [f"## CNN({c1}, {c2}) -> CNN{tuple(m['shrunk_channels'])}", "",
             f"CNN({c1}, {c2}, dense 128) on MNIST, {m['params']['dense']:,} params; half the filters of both "
             f"convolutions masked with their biases and removed by `shrink`: CNN{tuple(m['shrunk_channels'])}, "
             f"{m['params']['shrunk']:,} params. Before fine-tuning the shrunk model's outputs equal the masked "
             f"model's to {m['max_abs_diff_shrunk_vs_masked_before_finetune']:.1e} (512 test images). "
             f"Training and fine-tuning took {m['train_seconds']} s.", "",
             "| model | validation accuracy | test accuracy |", "|---|---:|---:|",
             f"| dense | {100 * acc['dense_val']:.2f}% | {100 * acc['dense_test']:.2f}% |",
             f"| shrunk, before fine-tuning | {100 * acc['shrunk_val_before_finetune']:.2f}% | - |",
             f"| shrunk, fine-tuned {acc['chosen_finetune_epochs']} epoch(s) (chosen on validation) | "
             f"{100 * acc['shrunk_val']:.2f}% | {100 * acc['shrunk_test']:.2f}% |", "",
             "Latency at batch 256 (median of interleaved shuffled blocks; ratio to the plain dense model with its "
             "bootstrap 95% interval; `baseline_control` is the A/A control). `*_infer` runs through "
             "`jaxcompress.infer` with the paths chosen by measurement.", "",
             "| program | median ms | ratio to dense | FLOPs | bytes accessed |", "|---|---:|---:|---:|---:|",
             f"| dense | {1e3 * lat['median_s']['dense']:.2f} | 1 | {lat['cost']['dense']['flops']:.3g} | "
             f"{lat['cost']['dense']['bytes_accessed']:.3g} |"]
    for k, v in lat["ratios"].items():
        c = lat["cost"].get(k, lat["cost"]["dense"])
        lines.append(f"| {k} | {1e3 * lat['median_s'][k]:.2f} | {_cell(v)} | {c['flops']:.3g} | {c['bytes_accessed']:.3g} |")
    lines += ["", "Paths chosen per layer (the whole-model check's winner in brackets):", ""]
    for k, p in m["plans"].items():
        w = p["whole_model_check"]
        lines.append(f"- {k}: {p['paths']}" + ("" if w is None else (
            f" ({w['chosen']}; the per-layer choice {w['candidates']['per_layer']} ran "
            f"{_cell(w['ratios']['per_layer'])} of the all-float program)")))
        for layer, t in p["layer_timings"].items():
            lines.append(f"  - {layer} alone, ratio to its float32 convolution: "
                         + ", ".join(f"{c} {_cell(r)}" for c, r in t["ratios"].items()))
    return lines + [""]


if __name__ == "__main__":
    main()
