"""CPU inference latency of low-rank factored models against their dense model, at the recipes' ranks.

The models and ranks are read from the shipped recipes ``mnist_lowrank`` (LeNet-300-100) and
``cifar10_lowrank`` (the teacher CNN), so this benchmark times exactly the factorizations whose
accuracy and file bytes those recipes report. Latency does not depend on the weights' values, so
each model is initialised at random and factored by :func:`jaxcompress.lowrank.factorize` at each
factorize stage's ranks and mode. Jitted inference on a random batch (``--batch``, default 256) is
timed with :func:`jaxcompress.benchmark.compare` (shuffled interleaved blocks, the dense model
timed twice as an A/A control, bootstrap 95% intervals), and XLA's cost analysis (FLOPs, bytes
accessed) of every compiled program is recorded. A factored model does less arithmetic than its
dense model, so a ratio below 1.0 is a real speed-up when its interval lies wholly below 1.0.
The top-level ``ratio`` is the largest factored / dense ratio over all stages.

Usage: python experiments/benchmarks/lowrank_latency.py --out FILE.json [--quick] [--batch 256]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax

from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, verdict, write_result
from jaxcompress.lowrank import factorize
from jaxcompress.recipes.models import build_model
from jaxcompress.recipes.keys import INPUT_SHAPES
from jaxcompress.recipes.schema import load_recipe

RECIPES = ("mnist_lowrank", "cifar10_lowrank")


def bench(recipe_name: str, batch: int, blocks: int, calls: int) -> dict:
    recipe = load_recipe(recipe_name)
    shape = INPUT_SHAPES[recipe["data"]["name"]]
    stages = [s for s in recipe["stages"] if s["kind"] == "factorize"]
    module = build_model(stages[0]["model"], 10)
    x = jax.random.uniform(jax.random.key(0), (batch, *shape))
    params = module.init(jax.random.key(1), x[:1])["params"]
    programs = {"dense": (module, params)}
    for s in stages:
        programs[s["name"]] = factorize(module, params, mode=s["mode"],
                                        **{k: dict(s[k]) for k in ("ranks", "energy") if k in s})
    fns = {k: (jax.jit(lambda p, v, m=m: m.apply({"params": p}, v)), p) for k, (m, p) in programs.items()}
    r = compare({k: (lambda f, p: lambda: f(p, x))(f, p) for k, (f, p) in fns.items()}, baseline="dense",
                blocks=blocks, calls=calls)
    del r["seconds"], r["order"]
    r["cost"] = {k: cost_analysis(lambda p, v, m=m: m.apply({"params": p}, v), p, x) for k, (m, p) in programs.items()}
    r["stages"] = {s["name"]: {"label": s.get("label", s["name"]), "ranks": s.get("ranks"), "energy": s.get("energy"),
                               "mode": s["mode"], "verdict_vs_1": verdict(r["ratios"][s["name"]], 1.0)}
                   for s in stages}
    r["model"] = stages[0]["model"]
    return r


def _cell(r):
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def markdown(result: dict) -> str:
    lines = ["# Low-rank inference latency on CPU (XLA:CPU)", "",
             f"`python experiments/benchmarks/lowrank_latency.py --out experiments/benchmarks/results/lowrank_latency.json` "
             f"({result['seconds']} s). Environment: {result['environment']}.", "",
             f"Batch {result['batch']}; ratio = median latency of the factored model / the dense model's (lower is "
             "better), bootstrap 95% interval over shuffled interleaved blocks; A/A = the dense model timed twice. "
             "Ranks and modes are those of the recipes' factorize stages (their accuracy and file bytes are in "
             "`experiments/results/<recipe>/report.md`).", ""]
    for name, r in result["results"].items():
        lines += [f"## {name}: {r['model']}", "",
                  f"Dense {1e3 * r['median_s']['dense']:.3f} ms, {r['cost']['dense']['flops']:.3g} FLOPs; "
                  f"A/A control {_cell(r['ratios'][CONTROL])}.", "",
                  "| stage | ranks | mode | latency vs dense | verdict vs 1.0 | FLOPs vs dense |",
                  "| --- | --- | --- | ---: | --- | ---: |"]
        for k, s in r["stages"].items():
            flops = r["cost"][k]["flops"] / r["cost"]["dense"]["flops"]
            lines.append(f"| {s['label']} | {s['ranks'] or s['energy']} | {s['mode']} | {_cell(r['ratios'][k])} | "
                         f"{s['verdict_vs_1']} | {flops:.3f} |")
        lines.append("")
    lines.append(f"Largest factored / dense ratio: {result['ratio']:.3f} ({result['worst_case']}).")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--calls", type=int, default=5)
    args = ap.parse_args()
    if args.quick:
        args.blocks, args.calls, args.batch = 3, 2, min(args.batch, 16)
    t0 = time.time()
    results = {name: bench(name, args.batch, args.blocks, args.calls) for name in RECIPES}
    worst = max(((n, k) for n, r in results.items() for k in r["stages"]),
                key=lambda nk: results[nk[0]]["ratios"][nk[1]]["ratio"])
    result = {"benchmark": "lowrank_latency", "environment": environment(quick=args.quick), "batch": args.batch,
              "results": results, "ratio": results[worst[0]]["ratios"][worst[1]]["ratio"],
              "worst_case": "/".join(worst), "seconds": round(time.time() - t0, 1),
              "ratio_definition": "largest over the recipes' factorize stages of median latency(factored) / "
                                  "median latency(dense); lower is better"}
    write_result(args.out, result)
    Path(args.out).with_suffix(".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
