"""Calibration cost: Hessian accumulation vs calibration sequences, the OBS solve vs model width.

For TransformerLMs of width ``d`` (depth 1; its block kernels are ``(d, d)`` and ``(d, 4d)`` /
``(4d, d)``) it times, warm and jitted, with medians of ``--repeats`` runs:

* ``accumulate``: :func:`~jaxcompress.oneshot.calibrate_layers` (one forward pass per batch plus
  ``X^T X`` of every block layer) over ``n`` calibration sequences of 64 tokens: linear in ``n``;
* ``solve``: :func:`~jaxcompress.oneshot.gptq` (4-bit, g128) of one ``(d, d)`` kernel from its
  Hessian: the Cholesky factorisations are cubic in ``d``, the column sweep ``d^2`` per row block.

The fitted log-log slopes (time ~ n^a, time ~ d^b) are reported; ``ratio`` is the accumulation
time at the largest ``n`` over the smallest divided by the ratio of the ``n`` (1.0 = exactly
linear; lower is better). An A/A control times the smallest configuration twice.

Usage: python experiments/benchmarks/calibration.py --out FILE.json [--quick]
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

from jaxcompress.models.transformer import TransformerLM
from jaxcompress.oneshot import calibrate_layers, gptq
from jaxcompress.train.state import linen_apply_fn

RULES = [(r"^block_\d+/.*/kernel$", True), (".*", None)]


def median_time(fn, repeats):
    jax.block_until_ready(fn())  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def slope(xs, ys):
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    widths = [64, 128, 256] if args.quick else [64, 128, 256, 512, 1024]
    sequences = [16, 32, 64] if args.quick else [32, 64, 128, 256, 512]
    repeats = args.repeats or (3 if args.quick else 5)
    rng = np.random.default_rng(0)

    accumulate = {}
    for d in widths[:2]:
        model = TransformerLM(vocab_size=256, max_len=64, dim=d, depth=1, heads=4)
        apply_fn = linen_apply_fn(model, inputs="tokens")
        params = model.init(jax.random.key(0), jnp.zeros((1, 64), jnp.int32))["params"]
        for n in sequences:
            batches = [{"tokens": rng.integers(0, 256, size=(16, 64)).astype(np.int32)} for _ in range(n // 16)]
            accumulate[f"d{d}_n{n}"] = median_time(
                lambda: calibrate_layers(apply_fn, params, {}, batches, rules=RULES), repeats)
            print(f"accumulate d={d} n={n}: {accumulate[f'd{d}_n{n}'] * 1e3:.1f} ms", flush=True)
    solve = {}
    for d in widths:
        x = rng.normal(size=(4 * d, d)).astype(np.float32)
        w = jnp.asarray(rng.normal(size=(d, d)), jnp.float32)
        xtx = jnp.asarray(x.T @ x)
        solve[f"d{d}"] = median_time(lambda: gptq(w, xtx, 4, group_size=min(128, d)).kernel, repeats)
        print(f"solve d={d}: {solve[f'd{d}'] * 1e3:.1f} ms", flush=True)
    d0 = widths[0]
    aa = [median_time(lambda: gptq(jnp.asarray(rng.normal(size=(d0, d0)), jnp.float32), jnp.eye(d0), 4).kernel, repeats)
          for _ in range(2)]
    n_slope = {d: slope(sequences, [accumulate[f"d{d}_n{n}"] for n in sequences]) for d in widths[:2]}
    d_slope = slope(widths, [solve[f"d{d}"] for d in widths])
    d = widths[1]
    ratio = (accumulate[f"d{d}_n{sequences[-1]}"] / accumulate[f"d{d}_n{sequences[0]}"]) / (sequences[-1] / sequences[0])
    result = {
        "accumulate_seconds": accumulate, "solve_seconds": solve,
        "accumulate_slope_in_sequences": n_slope, "solve_slope_in_width": d_slope,
        "aa_control_seconds": aa, "aa_ratio": aa[1] / aa[0],
        "ratio": ratio,
        "ratio_means": "accumulation time growth over sequence-count growth (1.0 = linear)",
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version()},
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"slopes: accumulate ~ n^{n_slope}, solve ~ d^{d_slope:.2f}")
    print(f"{ratio:.3f}")


if __name__ == "__main__":
    main()
