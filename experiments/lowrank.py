"""LeNet-300-100 on MNIST factored by truncated SVD at several ranks, fine-tuned.

The dense LeNet-300-100 (``models.MLP``) is trained on 55,000 MNIST images (the last 5,000 of
the training set are the validation split). For each rank ``r`` the two hidden kernels are
factored with ``factorize`` (``fc1`` 784x300 -> 784xr, rx300; ``fc2`` 300x100 -> 300x(r/2),
(r/2)x100; the 100x10 head stays dense), the result is fine-tuned with the ordinary train step
(the factors are the params), and the model that would be saved holds the two small layers.
Reported per rank: validation accuracy after factoring and after fine-tuning, test accuracy
(scored once per final model), float32 bytes of the params, and the CPU latency of jitted
inference at batch 256 against the dense model, timed interleaved with an A/A control.
The "best setting" is chosen on validation accuracy among ranks with latency <= 0.7x dense.

Usage: python experiments/lowrank.py [--quick] [--out experiments/results/lowrank]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.data import epochs, load_mnist
from jaxcompress.lowrank import factorize
from jaxcompress.models import MLP
from jaxcompress.train import split_variables

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("shrink_latency", ROOT / "experiments/benchmarks/shrink_latency.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--epochs", type=float, default=10)
    ap.add_argument("--finetune-epochs", type=float, default=3)
    ap.add_argument("--ranks", default="128,64,32,16,8")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "lowrank"))
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.ranks, args.rounds, args.reps = 0.3, 0.2, "64,16", 4, 3
    ranks = [int(r) for r in args.ranks.split(",")]
    data = load_mnist(args.data_dir, download=False)
    x_tr, y_tr = data.train_images[:55000], data.train_labels[:55000]
    x_val, y_val = data.train_images[55000:], data.train_labels[55000:]
    bs, per_epoch = 128, 55000 // 128
    t0 = time.time()

    dense = MLP()
    params, _ = split_variables(dense.init(jax.random.key(0), x_tr[:1]))
    steps = max(int(args.epochs * per_epoch), 1)
    state = bench.train(dense, params, epochs(x_tr, y_tr, bs, seed=0, num_epochs=int(np.ceil(args.epochs))), steps, 1e-3)
    dense_params = state.params
    rows = [{"model": "dense", "rank": None, "val_accuracy": bench.accuracy(dense, state, x_val, y_val),
             "test_accuracy": bench.accuracy(dense, state, data.test_images, data.test_labels),
             "bytes": 4 * sum(v.size for v in jax.tree.leaves(dense_params))}]
    print(f"dense: val {rows[0]['val_accuracy']:.4f} test {rows[0]['test_accuracy']:.4f}", flush=True)

    fns = {"dense_a": (lambda p, v: dense.apply({"params": p}, v), jax.tree.map(jnp.copy, dense_params)),
           "dense_b": (lambda p, v: dense.apply({"params": p}, v), jax.tree.map(jnp.copy, dense_params))}
    models = {}
    for r in ranks:
        lr, q = factorize(dense, dense_params, ranks={"fc1": r, "fc2": max(r // 2, 1)})
        val0 = bench.accuracy(lr, jc.init_train_state(q, optax.sgd(0.0)), x_val, y_val)
        ft_steps = max(int(args.finetune_epochs * per_epoch), 1)
        st = bench.train(lr, q, epochs(x_tr, y_tr, bs, seed=1, num_epochs=int(np.ceil(args.finetune_epochs))),
                         ft_steps, 3e-4)
        row = {"model": f"rank {r}", "rank": {"fc1": r, "fc2": max(r // 2, 1)}, "val_accuracy_after_svd": val0,
               "val_accuracy": bench.accuracy(lr, st, x_val, y_val),
               "test_accuracy": bench.accuracy(lr, st, data.test_images, data.test_labels),
               "bytes": 4 * sum(v.size for v in jax.tree.leaves(st.params))}
        rows.append(row)
        models[f"rank_{r}"] = lr
        fns[f"rank_{r}"] = ((lambda m: (lambda p, v: m.apply({"params": p}, v)))(lr), st.params)
        print(f"rank {r}: val after SVD {val0:.4f}, fine-tuned val {row['val_accuracy']:.4f} "
              f"test {row['test_accuracy']:.4f}, {row['bytes']:,} bytes", flush=True)
    train_seconds = time.time() - t0

    x = jnp.asarray(data.test_images[:256])
    lat = bench.latency_report(fns, "dense_a", "dense_b", x, rounds=args.rounds, reps=args.reps)
    for row in rows[1:]:
        key = f"rank_{row['rank']['fc1']}"
        row["latency_ratio"] = lat["ratio_to_baseline"][key]
        row["latency_interval_95"] = lat["ratio_interval_95"][key]
        row["xla_flops"] = lat["xla_cost"][key]["flops"]
    rows[0]["latency_ratio"], rows[0]["xla_flops"] = 1.0, lat["xla_cost"]["dense_a"]["flops"]
    fast = [r for r in rows[1:] if r["latency_ratio"] <= 0.7]
    best = max(fast, key=lambda r: r["val_accuracy"]) if fast else None
    met = best is not None and 100 * (rows[0]["test_accuracy"] - best["test_accuracy"]) <= 1.0
    out = {"experiment": "lowrank", "rows": rows, "aa_ratio": lat["aa_ratio"],
           "aa_interval_95": lat["ratio_interval_95"]["dense_b"], "latency": lat,
           "chosen_on_validation": None if best is None else best["model"],
           "target": "a setting with latency <= 0.7x dense within 1 point of its test accuracy", "target_met": met,
           "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
           "train_seconds": round(train_seconds, 1),
           "environment": {"jax": jax.__version__, "backend": jax.default_backend(),
                           "devices": jax.device_count(), "python": platform.python_version()}}
    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(out, indent=2))
    lines = ["# Low-rank factorization of LeNet-300-100 on MNIST", "",
             f"Dense trained {args.epochs:g} epochs (Adam); each rank factored by truncated SVD (fc1 at rank r, fc2 at "
             f"r/2, head dense) and fine-tuned {args.finetune_epochs:g} epochs. Latency: jitted inference at batch 256 "
             f"on CPU, interleaved, median of {lat['calls_per_program']} calls per program; A/A control (dense vs "
             f"dense) {lat['aa_ratio']:.3f} (95% interval {out['aa_interval_95'][0]:.3f}-{out['aa_interval_95'][1]:.3f}). "
             "Test accuracy scored once per final model. No published reference is claimed for these numbers.", "",
             "| model | val after SVD | val (fine-tuned) | test | bytes (float32) | latency vs dense (95% CI) | XLA FLOPs |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        ci = r.get("latency_interval_95")
        lines.append(f"| {r['model']} | {r.get('val_accuracy_after_svd', float('nan')):.4f} | {r['val_accuracy']:.4f} | "
                     f"{r['test_accuracy']:.4f} | {r['bytes']:,} | {r['latency_ratio']:.3f}"
                     f"{'' if ci is None else f' ({ci[0]:.3f}-{ci[1]:.3f})'} | {r['xla_flops']:.3g} |")
    lines += ["", f"Chosen on validation among settings <= 0.7x latency: {out['chosen_on_validation']}; "
              f"target (<= 0.7x latency within 1 point of dense test accuracy) met: {met}."]
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
