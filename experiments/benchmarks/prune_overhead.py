"""Overhead of magnitude pruning in the train step, and the cost of one mask update.

Candidate: LeNet-5, batch 128, Adam, ``pruning(0.9)`` with masks recomputed every 100
steps (``polynomial_schedule(frequency=100)``, inside the jitted step under ``lax.cond``).
Baseline: the same step without a transform. :func:`jaxcompress.benchmark.compare` times them
in one process in shuffled blocks of 100 consecutive steps (so every candidate block contains
exactly one mask update: the amortised cost), with the baseline timed twice as an A/A control,
and gives a bootstrap 95% interval of the ratio; XLA's cost analysis of both compiled steps gives
the FLOP ratio, which does not depend on the machine's load.

Second measurement: one mask update (``update`` on an update step, the argsort of every tensor)
for a pytree with the kernel shapes of ResNet-18 (11.7M kernel weights) and ResNet-50 (25.5M), against
the same ``update`` on a step without mask recomputation.

Usage: python experiments/benchmarks/prune_overhead.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, summary, verdict, write_result
from jaxcompress.core import update_info
from jaxcompress.models import LeNet5
from jaxcompress.prune import polynomial_schedule
from jaxcompress.train import split_variables

BLOCK = 100


def resnet_kernels(depth: int):
    """Kernel shapes (HWIO conv, IO dense) of ResNet-18 / ResNet-50 for ImageNet (He et al. 2016)."""
    shapes = [(7, 7, 3, 64)]
    widths = (64, 128, 256, 512)
    if depth == 18:
        blocks, cin = (2, 2, 2, 2), 64
        for stage, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                shapes += [(3, 3, cin, w), (3, 3, w, w)]
                if cin != w:
                    shapes.append((1, 1, cin, w))
                cin = w
        shapes.append((512, 1000))
    else:
        blocks, cin = (3, 4, 6, 3), 64
        for w, n in zip(widths, blocks):
            for b in range(n):
                shapes += [(1, 1, cin, w), (3, 3, w, w), (1, 1, w, 4 * w)]
                if cin != 4 * w:
                    shapes.append((1, 1, cin, 4 * w))
                cin = 4 * w
        shapes.append((2048, 1000))
    rng = np.random.default_rng(0)
    return {f"layer{i}": {"kernel": jnp.asarray(rng.normal(size=s), jnp.float32)} for i, s in enumerate(shapes)}


def time_train_steps(quick: bool):
    module = LeNet5()
    rng = np.random.default_rng(0)
    batch = {"image": jnp.asarray(rng.normal(size=(128, 28, 28, 1)), jnp.float32),
             "label": jnp.asarray(rng.integers(0, 10, 128), jnp.int32)}
    params, _ = split_variables(module.init(jax.random.key(0), batch["image"][:1]))
    optimizer = optax.adam(1e-3)
    apply_fn = jc.linen_apply_fn(module)
    # Constant 90% (initial = final sparsity), masks recomputed every BLOCK steps.
    schedule = polynomial_schedule(begin_step=0, end_step=10**9, frequency=BLOCK, initial_sparsity=0.9)
    prune = jc.pruning(0.9, schedule=schedule)
    programs, states, costs = {}, {}, {}
    for name, transform in (("baseline", None), ("candidate", prune)):
        state = jc.init_train_state(params, optimizer, transform=transform)
        raw = jc.make_train_step(apply_fn, optimizer, transform=transform)
        costs[name] = cost_analysis(raw, state, batch)
        step = jax.jit(raw, donate_argnums=0)
        states[name] = state

        def run(name=name, step=step):
            states[name], m = step(states[name], batch)
            return m

        programs[name] = run
    # One call is one step; a block is BLOCK consecutive steps, so every candidate block holds
    # exactly one mask update (the amortised cost). The baseline is timed twice (A/A control).
    timing = compare(programs, baseline="baseline", blocks=4 if quick else 20, calls=BLOCK, warmup=BLOCK)
    masks = states["candidate"].compression_state.masks
    sparsity = float(np.mean([np.mean(~np.asarray(m)) for m in jax.tree.leaves(masks)]))
    return timing, costs, sparsity


def time_mask_update(depth: int, reps: int):
    params = resnet_kernels(depth)
    schedule = polynomial_schedule(begin_step=1, end_step=10**9, frequency=BLOCK, initial_sparsity=0.9)
    t = jc.pruning(0.9, schedule=schedule)
    state = t.init(params)  # begin_step=1: no masks computed at init
    update = jax.jit(t.update)
    out = {}
    for name, step in (("update_step", BLOCK + 1), ("other_step", BLOCK + 2)):
        s = state._replace(count=jnp.asarray(step - 1, jnp.int32))
        jax.block_until_ready(update(params, s, update_info(step)))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            jax.block_until_ready(update(params, s, update_info(step)))
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    out["weights"] = int(sum(x.size for x in jax.tree.leaves(params)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    timing, costs, sparsity = time_train_steps(args.quick)
    updates = {f"resnet{d}": time_mask_update(d, 3 if args.quick else 7) for d in ((18,) if args.quick else (18, 50))}
    cand = timing["ratios"]["candidate"]
    result = {
        "benchmark": "prune_overhead",
        "ratio": cand["ratio"],
        "ratio_interval": [cand["low"], cand["high"]],
        "aa_ratio": timing["ratios"][CONTROL],
        "verdict_vs_1": verdict(cand, 1.0),
        "flop_ratio": costs["candidate"]["flops"] / costs["baseline"]["flops"],
        "bytes_ratio": costs["candidate"]["bytes_accessed"] / costs["baseline"]["bytes_accessed"],
        "cost_analysis": costs,
        "ratio_definition": "median per-step time over blocks of 100 LeNet-5 train steps with 90% magnitude pruning "
                            "(one mask update per block) / the same without pruning; lower is better",
        "mean_kernel_sparsity_at_end": sparsity,
        "timing": timing,
        "mask_update": updates,
        "environment": environment(quick=args.quick),
    }
    for name, u in updates.items():
        print(f"{name}: {u['weights']:,} weights, mask update {u['update_step'] * 1e3:.1f} ms, "
              f"other steps {u['other_step'] * 1e3:.2f} ms")
    print(f"{summary(timing, 'candidate')}, FLOP ratio {result['flop_ratio']:.4f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
