"""Data-parallel step time on 1, 2, 4, 8 devices for the same global batch, and bytes communicated.

The step: a distilled (KD from the teacher CNN), pruned and int8 fake-quantized student CNN,
built once with ``make_train_step`` and compiled by ``data_parallel`` with ``parallel='shard'``
(``jax.jit`` over a ``'data'`` mesh) on the first N devices, plus ``parallel='pmap'`` on all of
them. All configurations are timed with :func:`jaxcompress.benchmark.compare` (shuffled
interleaved blocks, the one-device step timed twice as an A/A control, bootstrap 95% intervals).

Bytes communicated per step: the gradients are all-reduced once per step, so each device sends
and receives about ``2 (N - 1) / N`` times the gradient size (ring all-reduce); the gradient size
itself is reported too. BatchNorm statistics are not in this model.

``ratio`` = time on the most devices / time on one device (sharded jit), for the same global batch:
below 1 when the devices are real parallel hardware; on fake CPU devices sharing a few cores it
measures the partitioning overhead instead.

On CPU the script asks XLA for 8 host devices before JAX starts; on GPU/TPU it uses the devices
there are (counts 1, 2, 4, 8 that fit).

Usage: python experiments/benchmarks/parallel.py --out FILE.json [--quick]
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import functools  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxcompress as jc  # noqa: E402
from jaxcompress.benchmark import CONTROL, compare, environment, summary, write_result  # noqa: E402
from jaxcompress.models import student_cnn, teacher_cnn  # noqa: E402
from jaxcompress.prune.schedules import one_shot_schedule  # noqa: E402
from jaxcompress.train import data_parallel, shard_batch, split_variables, step_axis_name  # noqa: E402


def build(parallel, devices, x):
    teacher, student = teacher_cnn(), student_cnn()
    t_params, _ = split_variables(teacher.init(jax.random.key(0), x[:1]))
    s_params, _ = split_variables(student.init(jax.random.key(1), x[:1]))
    transform = jc.chain(jc.pruning(0.9, schedule=one_shot_schedule()), jc.weight_quantization(8))
    opt = optax.adam(1e-3)
    kd = jc.Teacher(jc.linen_apply_fn(teacher),
                    functools.partial(jc.kd_loss, temperature=4.0, kd_weight=0.9, ce_weight=0.1))
    step = jc.make_train_step(jc.linen_apply_fn(student), opt, transform=transform, teacher=kd,
                              axis_name=step_axis_name(parallel))
    state = jc.init_train_state(s_params, opt, transform=transform)
    dp = data_parallel(step, parallel=parallel, devices=devices)
    grad_bytes = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(s_params))
    return dp, dp.put_state(state), dp.put_teacher((t_params, {})), grad_bytes


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=None, help="global batch (default: 256, --quick: 64)")
    args = ap.parse_args()
    reps, block = (3, 2) if args.quick else (15, 5)
    args.batch_size = args.batch_size or (64 if args.quick else 256)

    rng = np.random.default_rng(0)
    x = rng.normal(size=(args.batch_size, 28, 28, 1)).astype(np.float32)
    y = rng.integers(0, 10, args.batch_size).astype(np.int32)
    counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
    configs = {f"shard_{n}": ("shard", n) for n in counts}
    configs[f"pmap_{counts[-1]}"] = ("pmap", counts[-1])
    runs = {}
    for name, (parallel, n) in configs.items():
        dp, state, teacher, grad_bytes = build(parallel, n, x)
        batch = {"image": x, "label": y}
        if parallel == "shard":
            batch = shard_batch(batch, dp.mesh)  # laid out once: time the step, not the transfer
        runs[name] = {"dp": dp, "state": state, "teacher": teacher, "batch": batch, "n": n}

    def program(name):
        r = runs[name]

        def run():
            r["state"], m = r["dp"].step(r["state"], r["batch"], r["teacher"])
            return r["state"], m

        return run

    timing = compare({name: program(name) for name in runs}, baseline="shard_1",
                     blocks=reps, calls=block, warmup=2)
    medians = timing["median_s"]
    top = f"shard_{counts[-1]}"
    ratio = timing["ratios"][top] if top != "shard_1" else {"ratio": 1.0, "low": 1.0, "high": 1.0}
    result = {
        "benchmark": "parallel",
        "what": "median seconds per train step (KD + 90% pruning + int8 QAT student CNN), same global batch",
        "global_batch": args.batch_size,
        "median_step_seconds": medians,
        "timing": timing,
        "gradient_bytes": grad_bytes,
        "allreduce_bytes_per_device": {
            name: int(round(2 * (r["n"] - 1) / r["n"] * grad_bytes)) for name, r in runs.items()
        },
        "per_device_batch": {name: args.batch_size // r["n"] for name, r in runs.items()},
        "ratio": ratio["ratio"],
        "ratio_interval": [ratio["low"], ratio["high"]],
        "aa_ratio": timing["ratios"][CONTROL],
        "ratio_means": f"{top} / shard_1 step time (lower is better)",
        "environment": environment(quick=args.quick, device_kind=jax.devices()[0].device_kind),
    }
    for name, t in medians.items():
        if name in runs:
            print(f"{name}: {t * 1e3:.2f} ms/step, all-reduce {result['allreduce_bytes_per_device'][name]} B/device")
    if top != "shard_1":
        print(summary(timing, top))
    write_result(args.out, result)


if __name__ == "__main__":
    main()
