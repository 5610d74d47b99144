"""Cost of W8A8 quantization-aware training: one train step with and without fake quantization.

LeNet-5, batch 128, adam. Candidate: ``weight_quantization(8, activation_bits=8)`` (per-channel
symmetric weights, every Dense/Conv input on a dynamic affine range). Baseline: the
same step in float. Where Qwix is installed (``pip install qwix``, optional), its QAT model
(``QtProvider`` with int8 weights and activations) is timed in the same loop for comparison.
Steps are timed one at a time (``block_until_ready``), interleaved candidate / baseline / Qwix,
after a warm-up; the ratio is the candidate's median over the baseline's (lower is better).

Usage: python experiments/benchmarks/quant_overhead.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.models import LeNet5
from jaxcompress.quant import weight_quantization
from jaxcompress.train import init_train_state, linen_apply_fn, make_train_step, split_variables

BATCH = 128


def _qwix_model(model):
    try:
        import qwix
    except ImportError:
        return None, None
    rule = qwix.QtRule(module_path=".*", weight_qtype="int8", act_qtype="int8")
    return qwix.quantize_model(model, qwix.QtProvider([rule])), getattr(qwix, "__version__", "?")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    args = ap.parse_args()
    steps, warmup = (40, 5) if args.quick else (args.steps, 20)

    rng = np.random.default_rng(0)
    batches = [
        {"image": jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}
        for _ in range(8)
    ]
    model = LeNet5()
    params, model_state = split_variables(model.init(jax.random.key(0), batches[0]["image"]))
    opt = optax.adam(1e-3)

    def build(apply_fn, transform, p=params, ms=model_state):
        step = jax.jit(make_train_step(apply_fn, opt, transform=transform), donate_argnums=0)
        p, ms = jax.tree.map(jnp.array, (p, ms))  # own buffers: each state is donated separately
        return step, init_train_state(p, opt, transform=transform, model_state=ms, rng=0)

    runs = {
        "float": build(linen_apply_fn(model), None),
        "w8a8": build(linen_apply_fn(model), weight_quantization(8, activation_bits=8)),
    }
    qmodel, qwix_version = _qwix_model(model)
    if qmodel is not None:
        q_params, q_state = split_variables(qmodel.init(jax.random.key(0), batches[0]["image"]))
        runs["qwix_w8a8"] = build(linen_apply_fn(qmodel), None, q_params, q_state)

    states = {k: s for k, (_, s) in runs.items()}
    times = {k: [] for k in runs}
    for i in range(warmup + steps):
        for k, (step, _) in runs.items():
            b = batches[i % len(batches)]
            t0 = time.perf_counter()
            states[k], m = step(states[k], b)
            jax.block_until_ready((states[k], m))
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "benchmark": "quant_overhead",
        "model": "LeNet-5",
        "batch": BATCH,
        "optimizer": "adam",
        "steps_timed": steps,
        "warmup": warmup,
        "median_s": med,
        "min_s": {k: min(v) for k, v in times.items()},
        "p25_s": {k: float(np.percentile(v, 25)) for k, v in times.items()},
        "p75_s": {k: float(np.percentile(v, 75)) for k, v in times.items()},
        "ratio": med["w8a8"] / med["float"],
        "ratio_meaning": "W8A8 QAT step median / float step median (lower is better)",
        "qwix_ratio": (med["qwix_w8a8"] / med["float"]) if "qwix_w8a8" in med else None,
        "qwix_version": qwix_version,
        "env": {
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "device_count": jax.device_count(),
            "device": str(jax.devices()[0].device_kind),
            "python": platform.python_version(),
        },
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    for k, v in med.items():
        print(f"{k}: median {v * 1e3:.3f} ms")
    if result["qwix_ratio"] is not None:
        print(f"qwix ratio {result['qwix_ratio']:.3f}")
    print(f"{result['ratio']:.4f}")


if __name__ == "__main__":
    main()
