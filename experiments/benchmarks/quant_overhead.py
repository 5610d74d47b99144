"""Cost of W8A8 quantization-aware training: one train step with and without fake quantization.

LeNet-5, batch 128, adam. Candidate: ``weight_quantization(8, activation_bits=8)`` (per-channel
symmetric weights, every Dense/Conv input on a dynamic affine range). Baseline: the
same step in float. Where Qwix is installed (``pip install qwix``, optional), its QAT model
(``QtProvider`` with int8 weights and activations) is timed in the same loop for comparison.
Timed with :func:`jaxcompress.benchmark.compare`: shuffled interleaved blocks of 10 steps, the
float step timed twice as an A/A control, a bootstrap 95% interval of the ratio (lower is
better); XLA's cost analysis of the compiled steps gives the FLOP ratio.

Usage: python experiments/benchmarks/quant_overhead.py --out FILE.json [--quick]
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, summary, verdict, write_result
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
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    batches = [
        {"image": jnp.asarray(rng.normal(size=(BATCH, 28, 28, 1)), jnp.float32),
         "label": jnp.asarray(rng.integers(0, 10, BATCH), jnp.int32)}
        for _ in range(8)
    ]
    model = LeNet5()
    params, model_state = split_variables(model.init(jax.random.key(0), batches[0]["image"]))
    opt = optax.adam(1e-3)
    raw, states, programs, costs = {}, {}, {}, {}

    def build(name, apply_fn, transform, p=params, ms=model_state):
        raw[name] = make_train_step(apply_fn, opt, transform=transform)
        states[name] = init_train_state(p, opt, transform=transform, model_state=ms, rng=0)
        costs[name] = cost_analysis(raw[name], states[name], batches[0])
        step = jax.jit(raw[name], donate_argnums=0)
        count = [0]

        def run():
            states[name], m = step(states[name], batches[count[0] % len(batches)])
            count[0] += 1
            return m

        programs[name] = run

    build("float", linen_apply_fn(model), None)
    build("w8a8", linen_apply_fn(model), weight_quantization(8, activation_bits=8))
    qmodel, qwix_version = _qwix_model(model)
    if qmodel is not None:
        q_params, q_state = split_variables(qmodel.init(jax.random.key(0), batches[0]["image"]))
        build("qwix_w8a8", linen_apply_fn(qmodel), None, q_params, q_state)

    timing = compare(programs, baseline="float", blocks=6 if args.quick else 30, calls=10, warmup=5)
    cand = timing["ratios"]["w8a8"]
    result = {
        "benchmark": "quant_overhead",
        "model": "LeNet-5",
        "batch": BATCH,
        "optimizer": "adam",
        "ratio": cand["ratio"],
        "ratio_interval": [cand["low"], cand["high"]],
        "aa_ratio": timing["ratios"][CONTROL],
        "verdict_vs_1": verdict(cand, 1.0),
        "ratio_meaning": "W8A8 QAT step / float step, median over shuffled blocks of 10 steps (lower is better); "
                         "the candidate does strictly more work, so a ratio below 1.0 is noise",
        "flop_ratio": costs["w8a8"]["flops"] / costs["float"]["flops"],
        "cost_analysis": costs,
        "qwix_ratio": timing["ratios"].get("qwix_w8a8"),
        "qwix_version": qwix_version,
        "timing": timing,
        "environment": environment(quick=args.quick),
    }
    print(f"{summary(timing, 'w8a8')}, FLOP ratio {result['flop_ratio']:.4f}")
    write_result(args.out, result)


if __name__ == "__main__":
    main()
