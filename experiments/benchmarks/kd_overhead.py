"""Cost of a distillation train step against its parts: teacher forward + plain student step.

Candidate: one jitted ``make_train_step(..., teacher=Teacher(...))`` step (teacher forward in eval
mode, KD loss, student backward and update). Baseline: a jitted teacher forward followed by a
jitted plain (labels-only) student step, i.e. what the KD step has to do at minimum. Timed with
:func:`jaxcompress.benchmark.compare` (shuffled blocks of 5 steps, the baseline timed twice as an
A/A control, a bootstrap 95% interval); ``ratio`` = candidate / baseline (lower is better; an
interval below 1.05 means distillation adds no overhead beyond the teacher's forward pass). The
candidate does strictly more work, so a ratio below 1.0 is noise. XLA's cost analysis gives the
FLOP ratio of the compiled programs.

Usage: python experiments/benchmarks/kd_overhead.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, summary, verdict, write_result
from jaxcompress.models import student_cnn, teacher_cnn
from jaxcompress.train import split_variables


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()

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
    kd_raw, plain_raw = jc.make_train_step(s_apply, opt, teacher=kd), jc.make_train_step(s_apply, opt)
    kd_step, plain_step = jax.jit(kd_raw, donate_argnums=0), jax.jit(plain_raw, donate_argnums=0)
    t_forward = jax.jit(lambda p, b: t_apply(p, {}, b, train=False, rng=None)[0])
    states = {"kd": jc.init_train_state(s_params, opt), "plain": jc.init_train_state(s_params, opt)}
    teacher_variables = (t_params, {})
    costs = {
        "candidate": cost_analysis(kd_raw, states["kd"], batch, teacher_variables),
        "baseline": {k: a + b for (k, a), b in zip(
            cost_analysis(plain_raw, states["plain"], batch).items(),
            cost_analysis(lambda p, b: t_apply(p, {}, b, train=False, rng=None)[0], t_params, batch).values())},
    }

    def run_kd():
        states["kd"], m = kd_step(states["kd"], batch, teacher_variables)
        return m

    def run_base():
        logits = t_forward(t_params, batch)
        states["plain"], m = plain_step(states["plain"], batch)
        return logits, m

    timing = compare({"teacher_forward_plus_student_step": run_base, "kd_step": run_kd},
                     baseline="teacher_forward_plus_student_step", blocks=6 if args.quick else 30, calls=5)
    cand = timing["ratios"]["kd_step"]
    record = {
        "benchmark": "kd_overhead",
        "candidate": "jitted KD train step (teacher_cnn -> student_cnn, kd_loss T=4)",
        "baseline": "jitted teacher forward + jitted plain student train step",
        "batch_size": args.batch_size,
        "ratio": cand["ratio"], "ratio_interval": [cand["low"], cand["high"]],
        "aa_ratio": timing["ratios"][CONTROL],
        "verdict_vs_1.05": verdict(cand, 1.05),
        "flop_ratio": costs["candidate"]["flops"] / costs["baseline"]["flops"],
        "cost_analysis": costs,
        "lower_is_better": True,
        "note": "the candidate does the baseline's work plus the KD loss: a ratio below 1.0 is noise "
                "(or the fusion of the teacher forward into one program), not a speed-up",
        "timing": timing,
        "environment": environment(quick=args.quick),
    }
    print(f"{summary(timing, 'kd_step')}, FLOP ratio {record['flop_ratio']:.4f}")
    write_result(args.out, record)


if __name__ == "__main__":
    main()
