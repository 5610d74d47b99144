"""CPU inference latency of pruned Dense layers vs sparsity: dense-with-zeros, BCOO, BCSR, gather, N:M.

Model: an MLP 784-1200-1200-10 (random weights: latency only) whose two hidden kernels are
pruned by magnitude (``pruning(s)``, the head kept dense) at sparsities 50..99%, and once with a
2:4 structure (``NM(2, 4)``, 50%). Batches 1 and 256.

Per layer (:func:`jaxcompress.infer.choose_paths`): every path is timed on the layer's real input
with :func:`jaxcompress.benchmark.compare` against the dense product with zeros (``float``), with
an A/A control and bootstrap 95% intervals; a sparse path is chosen only when its interval is
wholly below 1. The ``gather`` path is an ELLPACK layout (per output column, the non-zeros'
rows and values); for a 2:4 kernel it is exactly the N:M layout (values plus positions).
Whole model: the chosen plan against the dense model (same weights, zeros included), again with
an A/A control. The top-level ratio is the worst chosen / dense over sparsities and batches.

Usage: python experiments/benchmarks/sparse_inference.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import jaxcompress as jc
from jaxcompress import infer
from jaxcompress.benchmark import compare, cost_analysis, environment, verdict, write_result
from jaxcompress.models import MLP
from jaxcompress.prune.structures import NM
from jaxcompress.train import split_variables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--blocks", type=int, default=15)
    ap.add_argument("--layer-blocks", type=int, default=8)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    sparsities = [0.5, 0.8, 0.9, 0.95, 0.99]
    if args.quick:
        args.blocks, args.layer_blocks, args.calls, sparsities = 3, 3, 2, [0.5, 0.99]
    t0 = time.time()
    model = MLP((1200, 1200))
    rng = np.random.default_rng(0)
    pool = jnp.asarray(rng.uniform(size=(256, 28, 28, 1)), jnp.float32)
    params, _ = split_variables(model.init(jax.random.key(1), pool[:1]))
    rules = [("head", None), ("kernel", True)]
    settings = [(f"unstructured_{s}", jc.pruning(s, rules=rules)) for s in sparsities]
    settings.append(("nm_2_4", jc.pruning(0.5, structure=NM(2, 4), rules=rules)))
    results = {}
    for name, t in settings:
        s = t.init(params)
        view, desc = t.apply(params, s), t.describe(params, s)
        for batch in (1, 256):
            x = pool[:batch]
            prepared = infer.prepare(model, view, desc, x)
            plan = infer.choose_paths(prepared, blocks=args.layer_blocks, calls=args.calls)
            dense = (lambda p, v: model.apply({"params": p}, v), view)
            chosen = infer.inference_program(prepared, plan)
            err = float(jnp.max(jnp.abs(jax.jit(chosen[0])(chosen[1], x) - model.apply({"params": view}, x))))
            progs = {"dense": dense, "chosen": chosen}
            jitted = {k: (jax.jit(f), w) for k, (f, w) in progs.items()}
            r = compare({k: (lambda f, w: lambda: f(w, x))(f, w) for k, (f, w) in jitted.items()}, baseline="dense",
                        blocks=args.blocks, calls=args.calls)
            del r["seconds"], r["order"]
            r["cost"] = {k: cost_analysis(f, w, x) for k, (f, w) in progs.items()}
            r["plan"] = plan.paths
            r["layer_timings"] = plan.timings
            r["max_abs_diff_chosen_vs_dense"] = err
            r["verdict_chosen_vs_1"] = verdict(r["ratios"]["chosen"], 1.0)
            results[f"{name}/batch{batch}"] = r
            layer_ms = {l: {k: round(v * 1e3, 3) for k, v in tm["median_s"].items()} for l, tm in plan.timings.items()}
            print(f"{name} batch {batch}: plan {plan.paths}; chosen/dense {r['ratios']['chosen']['ratio']:.3f} "
                  f"A/A {r['ratios']['baseline_control']['ratio']:.3f}; layer ms {layer_ms}")
    worst = max(results, key=lambda k: results[k]["ratios"]["chosen"]["ratio"])
    result = {
        "benchmark": "sparse_inference",
        "ratio": results[worst]["ratios"]["chosen"]["ratio"],
        "ratio_definition": "largest over sparsities and batches of median latency(chosen per-layer plan) / "
                            "median latency(dense model with zeros); lower is better",
        "worst_case": worst,
        "target": "the chosen path is never slower than dense",
        "results": results,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "seconds": round(time.time() - t0, 1),
        "environment": environment(quick=args.quick),
    }
    write_result(args.out, result)


if __name__ == "__main__":
    main()
