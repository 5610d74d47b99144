"""CPU inference latency of a CNN with half its filters removed structurally, and its accuracy.

The library's CNN (conv 32 -> pool -> conv 64 -> pool -> dense 128 -> 10) is trained on MNIST
(55,000 training images; the last 5,000 are the validation split). Half the filters of both
convolutions are then masked with ``tied_channel_masks`` (kernel columns and biases together) and
removed with ``shrink``: the result is ``CNN(channels=(16, 32))``, whose outputs equal the masked
model's (the largest difference is recorded). The small model is fine-tuned with the ordinary
train step; the number of fine-tuning epochs is chosen on the validation split, and the test set
is scored once for the dense and once for the final small model.

Timing: jitted inference at batch 256 for three programs: the dense model twice (an A/A control:
two identical baselines) and the shrunk model. Each round runs the three in a random order,
``--reps`` calls each after a warm-up; the ratio is median(shrunk) / median(dense A) over all
calls, with a bootstrap 95% interval; the A/A ratio median(dense B) / median(dense A) shows the
noise floor. XLA's cost analysis (FLOPs, bytes accessed) of both compiled programs is included.

Usage: python experiments/benchmarks/shrink_latency.py --out FILE.json [--quick]
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

import jaxcompress as jc
from jaxcompress.data import epochs, load_mnist
from jaxcompress.export import channel_groups, shrink, tied_channel_masks
from jaxcompress.models import CNN
from jaxcompress.prune.structures import Channels
from jaxcompress.train import split_variables

ROOT = Path(__file__).resolve().parents[2]


def cost(fn, params, x) -> dict:
    """XLA's cost analysis of the compiled program ``fn(params, x)``: FLOPs and bytes accessed."""
    analysis = jax.jit(fn).lower(params, x).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):
        analysis = analysis[0]
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


def time_interleaved(fns: dict, x, *, rounds: int, reps: int, seed: int = 0) -> dict:
    """Per-call seconds of each jitted ``fn(params, x)`` of ``fns[name] = (fn, params)``, the names
    run in a random order every round (params are arguments, not constants folded into the program)."""
    rng = np.random.default_rng(seed)
    jitted = {k: (lambda f, p: (lambda v: f(p, v)))(jax.jit(f), p) for k, (f, p) in fns.items()}
    for f in jitted.values():  # compile and warm up
        for _ in range(3):
            jax.block_until_ready(f(x))
    times = {k: [] for k in fns}
    names = list(fns)
    for _ in range(rounds):
        for k in rng.permutation(names):
            f = jitted[k]
            for _ in range(reps):
                t0 = time.perf_counter()
                jax.block_until_ready(f(x))
                times[k].append(time.perf_counter() - t0)
    return times


def ratio_interval(candidate, baseline, *, samples: int = 2000, seed: int = 0) -> list:
    """Bootstrap 95% interval of median(candidate) / median(baseline)."""
    rng = np.random.default_rng(seed)
    c, b = np.asarray(candidate), np.asarray(baseline)
    r = [np.median(rng.choice(c, len(c))) / np.median(rng.choice(b, len(b))) for _ in range(samples)]
    return [float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))]


def latency_report(fns: dict, baseline: str, control: str, x, *, rounds: int, reps: int) -> dict:
    """Medians, ratios to ``baseline`` with intervals (``control`` is the A/A twin), and XLA costs."""
    times = time_interleaved(fns, x, rounds=rounds, reps=reps)
    med = {k: float(np.median(v)) for k, v in times.items()}
    out = {"median_s": med, "calls_per_program": len(times[baseline]), "rounds": rounds, "reps": reps,
           "ratio_to_baseline": {}, "ratio_interval_95": {}, "xla_cost": {k: cost(f, p, x) for k, (f, p) in fns.items()}}
    for k in fns:
        if k != baseline:
            out["ratio_to_baseline"][k] = med[k] / med[baseline]
            out["ratio_interval_95"][k] = ratio_interval(times[k], times[baseline])
    out["aa_ratio"] = out["ratio_to_baseline"][control]
    return out


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
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.finetune_epochs, args.rounds, args.reps = 0.25, 1, 6, 3
    data = load_mnist(args.data_dir, download=False)
    x_tr, y_tr = data.train_images[:55000], data.train_labels[:55000]
    x_val, y_val = data.train_images[55000:], data.train_labels[55000:]
    bs, per_epoch = 128, 55000 // 128
    t0 = time.time()

    dense = CNN(channels=(32, 64), hidden=128)
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
    apply_dense = lambda p, v: dense.apply({"params": p}, v)  # noqa: E731
    fns = {"dense_a": (apply_dense, jax.tree.map(jnp.copy, dense_params)),
           "dense_b": (apply_dense, jax.tree.map(jnp.copy, dense_params)),
           "shrunk": (lambda p, v: small.module.apply({"params": p}, v), best[2].params)}
    lat = latency_report(fns, "dense_a", "dense_b", x, rounds=args.rounds, reps=args.reps)
    ratio = lat["ratio_to_baseline"]["shrunk"]
    n_dense = sum(v.size for v in jax.tree.leaves(dense_params))
    n_small = sum(v.size for v in jax.tree.leaves(small.params))
    result = {
        "benchmark": "shrink_latency",
        "ratio": ratio,
        "ratio_definition": "median CPU latency of jitted inference at batch 256: CNN with 50% of the filters of both "
                            "convolutions removed by shrink (16, 32 channels) / the dense CNN (32, 64); lower is better",
        "ratio_interval_95": lat["ratio_interval_95"]["shrunk"],
        "aa_ratio": lat["aa_ratio"],
        "aa_interval_95": lat["ratio_interval_95"]["dense_b"],
        "target": "ratio <= 0.55 and test accuracy within 1 point of dense",
        "latency": lat,
        "params": {"dense": int(n_dense), "shrunk": int(n_small)},
        "shrunk_channels": list(small.module.channels),
        "max_abs_diff_shrunk_vs_masked_before_finetune": max_diff,
        "accuracy": {"dense_val": dense_val, "dense_test": dense_test, "shrunk_val_before_finetune": before_val,
                     "finetune_log": finetune_log, "chosen_finetune_epochs": best[1], "shrunk_val": best[0],
                     "shrunk_test": small_test, "test_drop_points": 100 * (dense_test - small_test)},
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")},
        "train_seconds": round(train_seconds, 1),
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
                        "python": platform.python_version(), "quick": args.quick},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"dense test {100 * dense_test:.2f}%, shrunk test {100 * small_test:.2f}% "
          f"(before fine-tuning: val {100 * before_val:.2f}%), max |shrunk - masked| {max_diff:.2e}")
    print(f"A/A {lat['aa_ratio']:.3f} {result['aa_interval_95']}; shrunk interval {result['ratio_interval_95']}; "
          f"FLOPs {lat['xla_cost']['shrunk']['flops']:.3g} vs {lat['xla_cost']['dense_a']['flops']:.3g}")
    print(f"{ratio:.4f}")


if __name__ == "__main__":
    main()
