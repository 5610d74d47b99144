"""Cost of a distillation train step against its parts: teacher forward + plain student step.

Candidate: one jitted ``make_train_step(..., teacher=Teacher(...))`` step (teacher forward in eval
mode, KD loss, student backward and update). Baseline: a jitted teacher forward followed by a
jitted plain (labels-only) student step, i.e. what the KD step has to do at minimum. Both are timed
interleaved in one process after warm-up; each sample is the median per-step time over a block of
steps ended by ``block_until_ready``. ``ratio`` = candidate / baseline (lower is better; <= 1.05
means distillation adds no overhead beyond the teacher's forward pass).

Usage: python experiments/benchmarks/kd_overhead.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.models import student_cnn, teacher_cnn
from jaxcompress.train import split_variables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    reps, block = (5, 3) if args.quick else (15, 5)

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(args.batch_size, 32, 32, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, args.batch_size), jnp.int32)
    batch = {"image": x, "label": y}
    teacher, student = teacher_cnn(), student_cnn()
    t_params, _ = split_variables(teacher.init(jax.random.key(0), x[:1]))
    s_params, _ = split_variables(student.init(jax.random.key(1), x[:1]))
    opt = optax.adam(1e-3)
    t_apply, s_apply = jc.linen_apply_fn(teacher), jc.linen_apply_fn(student)
    kd = jc.Teacher(t_apply, functools.partial(jc.kd_loss, temperature=4.0, kd_weight=0.9, ce_weight=0.1))

    kd_step = jax.jit(jc.make_train_step(s_apply, opt, teacher=kd), donate_argnums=0)
    plain_step = jax.jit(jc.make_train_step(s_apply, opt), donate_argnums=0)
    t_forward = jax.jit(lambda p, b: t_apply(p, {}, b, train=False, rng=None)[0])
    kd_state = jc.init_train_state(s_params, opt)  # init_train_state copies: the states share nothing
    plain_state = jc.init_train_state(s_params, opt)

    def run_kd(n):
        nonlocal kd_state
        t0 = time.perf_counter()
        for _ in range(n):
            kd_state, m = kd_step(kd_state, batch, (t_params, {}))
        jax.block_until_ready((kd_state, m))
        return (time.perf_counter() - t0) / n

    def run_base(n):
        nonlocal plain_state
        t0 = time.perf_counter()
        for _ in range(n):
            logits = t_forward(t_params, batch)
            plain_state, m = plain_step(plain_state, batch)
        jax.block_until_ready((logits, plain_state, m))
        return (time.perf_counter() - t0) / n

    def run_teacher(n):
        t0 = time.perf_counter()
        for _ in range(n):
            logits = t_forward(t_params, batch)
        jax.block_until_ready(logits)
        return (time.perf_counter() - t0) / n

    for f in (run_kd, run_base, run_teacher):  # warm-up: compile and settle
        f(2)
    samples = {"kd_step": [], "teacher_forward_plus_student_step": [], "teacher_forward": []}
    for _ in range(reps):
        samples["kd_step"].append(run_kd(block))
        samples["teacher_forward_plus_student_step"].append(run_base(block))
        samples["teacher_forward"].append(run_teacher(block))
    med = {k: float(np.median(v)) for k, v in samples.items()}
    ratio = med["kd_step"] / med["teacher_forward_plus_student_step"]
    record = {
        "benchmark": "kd_overhead",
        "candidate": "jitted KD train step (teacher_cnn -> student_cnn, kd_loss T=4)",
        "baseline": "jitted teacher forward + jitted plain student train step",
        "batch_size": args.batch_size, "reps": reps, "steps_per_sample": block,
        "median_seconds_per_step": med, "samples_seconds_per_step": samples,
        "ratio": ratio, "lower_is_better": True,
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
                        "device": str(jax.devices()[0].device_kind), "python": platform.python_version()},
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(json.dumps(med))
    print(f"{ratio:.4f}")


if __name__ == "__main__":
    main()
