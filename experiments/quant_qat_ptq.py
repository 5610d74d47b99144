"""QAT and PTQ at 1..8 bits on MNIST (LeNet-5) and CIFAR-10 (the teacher CNN).

For each data set: a float model is trained once (its params cached in an ``.npz``), then
- int8 PTQ: weights only, and weights + activations with ranges calibrated on 8 training
  batches (min/max observer), no training;
- QAT: a short fine-tune from the float model for each of W8, W4, W3, W2, ternary, binary
  (weights only) and W8A8, W4A4 (activation ranges calibrated first, then an EMA in training,
  fixed at evaluation). For 2-bit, ternary and binary weights the first and last layers stay at
  8 bits (as XNOR-Net and TWN keep them in full precision); everything else is quantized.

Writes ``experiments/results/quant_qat_ptq.json`` and ``.md``.

Usage: python experiments/quant_qat_ptq.py [--datasets mnist cifar10] [--quick]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.core.paths import path_name
from jaxcompress.data import load_cifar10, load_mnist
from jaxcompress.models import LeNet5, teacher_cnn
from jaxcompress.quant import calibrate_activations, weight_quantization
from jaxcompress.train import evaluate, init_train_state, linen_apply_fn, make_eval_step, make_train_step
from jaxcompress.train import split_variables
from jaxcompress.data import epochs as epoch_batches
from jaxcompress.train.loop import fit

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
MNIST_DIR = ROOT.parent.parent / "shared" / "data" / "mnist"
EDGE_8BIT = [("conv1|head", 8), (".*", True)]  # first and last layer at 8 bits

# (name, weight kind, activation bits, weight rules)
CONFIGS = [
    ("float fine-tuned", None, None, None),  # the same extra epoch without quantization
    ("W8", 8, None, None),
    ("W4", 4, None, None),
    ("W3", 3, None, None),
    ("W2", 2, None, EDGE_8BIT),
    ("ternary", "ternary", None, EDGE_8BIT),
    ("binary", "binary", None, EDGE_8BIT),
    ("W8A8", 8, 8, None),
    ("W4A4", 4, 4, None),
]

# Li et al. 2016, "Ternary Weight Networks", Table 3 (LeNet-5 on MNIST; VGG-7 on CIFAR-10).
PUBLISHED = {
    "mnist": {"float": 99.41, "ternary": 99.35, "binary": 99.05, "model": "LeNet-5"},
    "cifar10": {"float": 92.88, "ternary": 92.56, "binary": 90.18, "model": "VGG-7 (larger than ours)"},
}


def save_npz(path: Path, tree) -> None:
    np.savez(path, **{path_name(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(tree)})


def load_npz(path: Path, like):
    with np.load(path, allow_pickle=False) as f:
        leaves = [jnp.asarray(f[path_name(p)]) for p, _ in jax.tree.leaves_with_path(like)]
    return jax.tree.unflatten(jax.tree.structure(like), leaves)


def run_dataset(name: str, args) -> dict:
    if name == "mnist":
        ds, model = load_mnist(MNIST_DIR if MNIST_DIR.exists() else None), LeNet5()
    else:
        ds, model = load_cifar10(), teacher_cnn()
    xtr, ytr, xte, yte = ds.train_images, ds.train_labels, ds.test_images, ds.test_labels
    if args.quick:
        xtr, ytr, xte, yte = xtr[:4096], ytr[:4096], xte[:2000], yte[:2000]
    params, model_state = split_variables(model.init(jax.random.key(0), xtr[:1]))
    base_fn = linen_apply_fn(model)
    out = {"model": type(model).__name__, "train_examples": len(ytr), "test_examples": len(yte), "runs": {}}

    def train(apply_fn, p, ms, transform, lr, epochs, seed, compression_state=None):
        opt = optax.adam(lr)
        p, ms = jax.tree.map(jnp.array, (p, ms))  # the step donates its state; keep the originals
        state = init_train_state(p, opt, transform=transform, model_state=ms, rng=seed)
        if compression_state is not None:  # calibrated activation ranges
            state = state._replace(compression_state=jax.tree.map(jnp.array, compression_state))
        step = jax.jit(make_train_step(apply_fn, opt, transform=transform), donate_argnums=0)
        t0 = time.perf_counter()
        batches = epoch_batches(xtr, ytr, args.batch, seed=seed, num_epochs=int(np.ceil(epochs)))
        state, _ = fit(step, state, batches, num_steps=int(epochs * (len(ytr) // args.batch)), progress=False)
        jax.block_until_ready(state)
        return state, time.perf_counter() - t0

    def test_acc(apply_fn, state, transform):
        ev = jax.jit(make_eval_step(apply_fn, transform=transform))
        return 100.0 * evaluate(ev, state, {"image": xte, "label": yte}, batch_size=1000)["accuracy"]

    Path(args.cache).mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache) / f"quant_{name}_float_e{args.float_epochs}{'_quick' if args.quick else ''}.npz"
    if cache.exists():
        params = load_npz(cache, params)
        float_seconds = json.loads((cache.with_suffix(".json")).read_text())["seconds"]
    else:
        state, float_seconds = train(base_fn, params, model_state, None, 1e-3, args.float_epochs, 0)
        params = state.params
        save_npz(cache, params)
        cache.with_suffix(".json").write_text(json.dumps({"seconds": float_seconds}))
    opt0 = optax.adam(1e-3)
    float_state = init_train_state(params, opt0, model_state=model_state)
    out["runs"]["float"] = {"accuracy": test_acc(base_fn, float_state, None), "train_epochs": args.float_epochs,
                            "train_seconds": round(float_seconds, 1)}

    calib = [{"image": xtr[i * 256 : (i + 1) * 256]} for i in range(8)]
    w8 = weight_quantization(8)
    ptq_w = init_train_state(params, opt0, transform=w8, model_state=model_state)
    out["runs"]["PTQ int8 W8"] = {"accuracy": test_acc(base_fn, ptq_w, w8), "train_epochs": 0, "train_seconds": 0}

    def calibrated(transform):
        """The transform's initial state with activation ranges calibrated on the float model."""
        return calibrate_activations(transform, transform.init(params), base_fn, params, model_state, calib)

    w8a8 = weight_quantization(8, activation_bits=8, activation_range="calibrated")
    ptq_wa = init_train_state(params, opt0, transform=w8a8, model_state=model_state)._replace(
        compression_state=calibrated(w8a8))
    out["runs"]["PTQ int8 W8A8"] = {
        "accuracy": test_acc(base_fn, ptq_wa, w8a8), "train_epochs": 0, "train_seconds": 0,
    }

    for cname, kind, abits, rules in CONFIGS:
        if args.only and cname not in args.only:
            continue
        t, start = None, None
        if kind is not None:
            t = weight_quantization(kind, rules=rules, activation_bits=abits,
                                    activation_range="dynamic" if abits is None else "calibrated")
        if abits is not None:
            start = calibrated(t)
        before_state = init_train_state(params, opt0, transform=t, model_state=model_state)
        before = test_acc(base_fn, before_state if start is None else before_state._replace(compression_state=start), t)
        state, secs = train(base_fn, params, model_state, t, args.ft_lr, args.ft_epochs, 1, start)
        key = cname if kind is None else f"QAT {cname}"
        out["runs"][key] = {
            "accuracy": test_acc(base_fn, state, t), "accuracy_before_finetune": before,
            "train_epochs": args.ft_epochs, "train_seconds": round(secs, 1),
        }
        print(name, cname, out["runs"][key], flush=True)
    return out


def to_markdown(results: dict, args) -> str:
    lines = [
        "# QAT and PTQ, 1..8 bits: MNIST (LeNet-5) and CIFAR-10 (teacher CNN)",
        "",
        "Produced by `python experiments/quant_qat_ptq.py`"
        + (" --quick (subsets)" if args.quick else "")
        + f" on {results['env']['backend']} ({results['env']['device']}), jax {results['env']['jax']}.",
        f"Float models: adam 1e-3, batch {args.batch}, {args.float_epochs} epochs from scratch. QAT: adam "
        f"{args.ft_lr}, batch {args.batch}, {args.ft_epochs} epoch(s) of fine-tuning from the float model. "
        "Weights per output channel; 2..8 bits narrow symmetric. Activations: every Dense/Conv input, "
        "affine, ranges calibrated on 8 batches of 256 training images (min/max), then an EMA during QAT. "
        "W2/ternary/binary keep conv1 and head at 8 bits. 'float fine-tuned' is the float model given the "
        "same extra epoch without quantization: the fair reference for the QAT rows (epochs trained: "
        "the fine-tune only; add the float epochs for the total). 'before fine-tune' is the quantized "
        "float model before QAT, i.e. PTQ at that bit width. Times are wall-clock seconds on a shared "
        "2-core CPU machine (other jobs were running), so they are indicative only.",
        "",
    ]
    for ds, r in results["datasets"].items():
        pub = PUBLISHED[ds]
        fl = r["runs"]["float"]["accuracy"]
        ft = r["runs"].get("float fine-tuned", {}).get("accuracy")
        order = ["float", "float fine-tuned", "PTQ int8 W8", "PTQ int8 W8A8"] + [f"QAT {c[0]}" for c in CONFIGS]
        keys = sorted(r["runs"], key=lambda k: order.index(k) if k in order else len(order))
        lines += [f"## {ds} ({r['model']}; {r['train_examples']} train / {r['test_examples']} test images)", "",
                  "| run | test accuracy % | vs float | vs float fine-tuned | before fine-tune % | epochs trained "
                  "| train seconds | published % |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for k in keys:
            v = r["runs"][k]
            p = pub.get(k.replace("QAT ", ""), "")
            before = v.get("accuracy_before_finetune")
            vs_ft = "" if ft is None else f"{v['accuracy'] - ft:+.2f}"
            lines.append(
                f"| {k} | {v['accuracy']:.2f} | {v['accuracy'] - fl:+.2f} | {vs_ft} | "
                f"{'' if before is None else f'{before:.2f}'} | {v['train_epochs']} | {v['train_seconds']} | {p} |"
            )
        lines += ["", f"Published column: Li et al. 2016, *Ternary Weight Networks*, Table 3 ({pub['model']}); "
                  "their models trained for far longer, with first and last layers in full precision.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in results["datasets"]]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4), squeeze=False)
    for ax, ds in zip(axes[0], names):
        runs = results["datasets"][ds]["runs"]
        order = ["float", "float fine-tuned", "PTQ int8 W8", "PTQ int8 W8A8"] + [f"QAT {c[0]}" for c in CONFIGS]
        labels = sorted(runs, key=lambda k: order.index(k) if k in order else len(order))
        acc = [runs[k]["accuracy"] for k in labels]
        colors = ["gray" if k.startswith("float") else ("tab:orange" if k.startswith("PTQ") else "tab:blue") for k in labels]
        ax.bar(range(len(labels)), acc, color=colors)
        ax.axhline(runs["float"]["accuracy"], color="k", lw=0.8, ls="--")
        ax.set_xticks(range(len(labels)), [k.replace("QAT ", "") for k in labels], rotation=45, ha="right")
        ax.set_ylim(min(acc) - 2, max(acc) + 1)
        ax.set_ylabel("test accuracy %")
        ax.set_title(f"{ds}: float (gray), PTQ (orange), QAT (blue)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=["mnist", "cifar10"])
    ap.add_argument("--only", nargs="*", default=None, help="QAT configs to run (default: all)")
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--ft-epochs", type=float, default=1.0)
    ap.add_argument("--ft-lr", type=float, default=3e-4)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--cache", default="/tmp")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--name", default="quant_qat_ptq")
    ap.add_argument("--merge", action="store_true", help="merge new runs into the saved .json")
    ap.add_argument("--report-only", action="store_true", help="rewrite .md and .png from the saved .json")
    args = ap.parse_args()
    if args.report_only:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        saved = argparse.Namespace(**results["settings"])
        (RESULTS / f"{args.name}.md").write_text(to_markdown(results, saved))
        plot(results, RESULTS / f"{args.name}.png")
        return
    results = {
        "env": {"jax": jax.__version__, "backend": jax.default_backend(), "device": jax.devices()[0].device_kind,
                "device_count": jax.device_count()},
        "settings": vars(args),
        "datasets": {},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.merge:  # add runs (e.g. --only 'float fine-tuned') to a saved result
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
    for ds in args.datasets:
        new = run_dataset(ds, args)
        if args.merge and ds in results["datasets"]:
            new["runs"] = {**results["datasets"][ds]["runs"], **new["runs"]}
        results["datasets"][ds] = new
        (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=2))
        (RESULTS / f"{args.name}.md").write_text(to_markdown(results, args))
    plot(results, RESULTS / f"{args.name}.png")
    print((RESULTS / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
