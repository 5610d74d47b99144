"""Low-rank factorization by truncated SVD at several ranks, fine-tuned: LeNet-300-100 and the CIFAR CNN.

* LeNet-300-100 (``models.MLP``) on MNIST: ``fc1`` 784x300 -> 784xr, rx300 and ``fc2`` 300x100 ->
  300x(r/2), (r/2)x100; the 100x10 head stays dense.
* The CIFAR CNN (``teacher_cnn``: conv 32, conv 64, dense 128) on CIFAR-10: ``conv2`` as a
  spatial pair (3x1 conv 32 -> r, then 1x3 conv r -> 64) and ``fc1`` 4096x128 -> 4096x(2r),
  (2r)x128; ``conv1`` (three input channels) and the head stay dense.

Each dense model is trained on its training set less a validation split (MNIST: the last 5,000
training images; CIFAR-10: the last 5,000). Each rank is factored with ``factorize`` and
fine-tuned with the ordinary train step (the factors are the params). Reported per rank:
validation accuracy after factoring and after fine-tuning, test accuracy (scored once per final
model), the bytes of the saved artifact file (``jaxcompress.export.save``: the two small
layers, not their product) and the CPU latency of jitted inference at batch 256 against the
dense model (:func:`jaxcompress.benchmark.compare`: shuffled interleaved blocks, A/A control,
bootstrap 95% intervals), with XLA's FLOP count. The "best setting" of each model is chosen on
validation accuracy among ranks whose latency interval lies wholly below 0.7x dense.

Usage: python experiments/lowrank.py [--quick] [--models mlp,cnn] [--out experiments/results/lowrank]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.benchmark import CONTROL, compare, cost_analysis, environment, verdict
from jaxcompress.data import epochs, load_cifar10, load_mnist
from jaxcompress.export import save
from jaxcompress.lowrank import factorize
from jaxcompress.models import MLP, teacher_cnn
from jaxcompress.train import split_variables

ROOT = Path(__file__).resolve().parents[1]


def train(module, params, x, y, num_epochs, lr, seed):
    steps = max(int(num_epochs * (len(y) // 128)), 1)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = jc.init_train_state(params, opt)
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), opt), donate_argnums=0)
    state, _ = jc.fit(step, state, epochs(x, y, 128, seed=seed, num_epochs=int(np.ceil(num_epochs))),
                      num_steps=steps, progress=False)
    return state


def accuracy(module, state, x, y) -> float:
    ev = jax.jit(jc.make_eval_step(jc.linen_apply_fn(module)))
    return float(jc.evaluate(ev, state, {"image": x, "label": y}, batch_size=1000)["accuracy"])


def file_bytes(params) -> int:
    with tempfile.TemporaryDirectory() as d:
        return save(Path(d) / "model.npz", params).file_bytes


def run_model(name, module, data, ranks_of, settings, args):
    (x_tr, y_tr), (x_val, y_val), (x_te, y_te) = data
    t0 = time.time()
    params, _ = split_variables(module.init(jax.random.key(0), x_tr[:1]))
    state = train(module, params, x_tr, y_tr, args.epochs[name], 1e-3, 0)
    dense_params = state.params
    rows = [{"model": "dense", "rank": None, "val_accuracy": accuracy(module, state, x_val, y_val),
             "test_accuracy": accuracy(module, state, x_te, y_te), "file_bytes": file_bytes(dense_params),
             "float32_bytes": 4 * sum(v.size for v in jax.tree.leaves(dense_params))}]
    print(f"{name} dense: val {rows[0]['val_accuracy']:.4f} test {rows[0]['test_accuracy']:.4f}", flush=True)
    apply = (lambda m: lambda p, v: m.apply({"params": p}, v))
    programs = {"dense": (apply(module), dense_params)}
    for s in settings:
        ranks = ranks_of(s)
        lr_model, q = factorize(module, dense_params, ranks=ranks, mode="spatial")
        val0 = accuracy(lr_model, jc.init_train_state(q, optax.sgd(0.0)), x_val, y_val)
        st = train(lr_model, q, x_tr, y_tr, args.finetune_epochs[name], 3e-4, 1)
        row = {"model": f"rank {s}", "rank": ranks, "val_accuracy_after_svd": val0,
               "val_accuracy": accuracy(lr_model, st, x_val, y_val), "test_accuracy": accuracy(lr_model, st, x_te, y_te),
               "file_bytes": file_bytes(st.params), "float32_bytes": 4 * sum(v.size for v in jax.tree.leaves(st.params))}
        rows.append(row)
        programs[f"rank_{s}"] = (apply(lr_model), st.params)
        print(f"{name} rank {s}: val after SVD {val0:.4f}, fine-tuned val {row['val_accuracy']:.4f} "
              f"test {row['test_accuracy']:.4f}, {row['file_bytes']:,} file bytes", flush=True)
    train_seconds = time.time() - t0
    x = jnp.asarray(x_te[:256])
    jitted = {k: (jax.jit(f), p) for k, (f, p) in programs.items()}
    lat = compare({k: (lambda f, p: lambda: f(p, x))(f, p) for k, (f, p) in jitted.items()}, baseline="dense",
                  blocks=args.blocks, calls=args.calls)
    del lat["order"], lat["seconds"]
    cost = {k: cost_analysis(f, p, x) for k, (f, p) in programs.items()}
    rows[0].update(latency={"ratio": 1.0, "low": 1.0, "high": 1.0}, xla_flops=cost["dense"]["flops"])
    for s, row in zip(settings, rows[1:]):
        row.update(latency=lat["ratios"][f"rank_{s}"], xla_flops=cost[f"rank_{s}"]["flops"],
                   latency_verdict_0_7=verdict(lat["ratios"][f"rank_{s}"], 0.7))
    fast = [r for r in rows[1:] if r["latency_verdict_0_7"] == "meets"]
    best = max(fast, key=lambda r: r["val_accuracy"]) if fast else None
    met = best is not None and 100 * (rows[0]["test_accuracy"] - best["test_accuracy"]) <= 1.0
    return {"rows": rows, "aa": lat["ratios"][CONTROL], "latency": lat,
            "chosen_on_validation": None if best is None else best["model"], "target_met": met,
            "epochs": args.epochs[name], "finetune_epochs": args.finetune_epochs[name],
            "train_seconds": round(train_seconds, 1)}


def _cell(r):
    return f"{r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}]"


def markdown(out: dict) -> str:
    lines = ["# Low-rank factorization: LeNet-300-100 (MNIST) and the CIFAR CNN (CIFAR-10)", "",
             "`python experiments/lowrank.py`. " + f"Environment: {out['environment']}.", "",
             "Each dense model trained with Adam (cosine decay from 1e-3, batch 128), each rank factored by truncated "
             "SVD and fine-tuned (cosine decay from 3e-4). LeNet-300-100: fc1 at rank r, fc2 at r/2, head dense. "
             "CIFAR CNN: conv2 as a 3x1 / 1x3 pair at rank r, fc1 at rank 2r, conv1 and head dense. File bytes: the "
             "saved artifact (`jaxcompress.export.save`, float32 tensors, the two factors of each layer). Latency: "
             "jitted inference at batch 256, ratio to dense with its bootstrap 95% interval. Test accuracy scored once "
             "per final model. No published reference is claimed for these numbers.", ""]
    for name, res in out["models"].items():
        lines += [f"## {name}", "",
                  f"Dense {res['epochs']:g} epoch(s), fine-tuning {res['finetune_epochs']:g} epoch(s); "
                  f"A/A control {_cell(res['aa'])}; training {res['train_seconds']} s.", "",
                  "| model | val after SVD | val (fine-tuned) | test | file bytes | float32 bytes | latency vs dense | "
                  "XLA FLOPs |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in res["rows"]:
            v0 = r.get("val_accuracy_after_svd")
            lines.append(f"| {r['model']} | {'-' if v0 is None else f'{v0:.4f}'} | {r['val_accuracy']:.4f} | "
                         f"{r['test_accuracy']:.4f} | {r['file_bytes']:,} | {r['float32_bytes']:,} | "
                         f"{'1' if r['rank'] is None else _cell(r['latency'])} | {r['xla_flops']:.3g} |")
        lines += ["", f"Chosen on validation among ranks measurably below 0.7x dense latency: "
                      f"{res['chosen_on_validation']}; bar (<= 0.7x latency within 1 point of dense test accuracy): "
                      f"{'met' if res['target_met'] else 'NOT met'}.", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--blocks", type=int, default=20)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--mnist-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--cifar-dir", default=None, help="folder with cifar-10-batches-bin (default: the loader's)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "lowrank"))
    args = ap.parse_args()
    args.epochs = {"mlp": 10, "cnn": 4}
    args.finetune_epochs = {"mlp": 3, "cnn": 1}
    mnist_settings, cnn_settings = [128, 64, 32, 16], [32, 16, 8]
    if args.quick:
        args.epochs, args.finetune_epochs = {"mlp": 0.3, "cnn": 0.05}, {"mlp": 0.2, "cnn": 0.05}
        args.blocks, args.calls, mnist_settings, cnn_settings = 4, 3, [64, 16], [16]
    models = {}
    if "mlp" in args.models:
        m = load_mnist(args.mnist_dir, download=False)
        data = ((m.train_images[:55000], m.train_labels[:55000]), (m.train_images[55000:], m.train_labels[55000:]),
                (m.test_images, m.test_labels))
        models["LeNet-300-100 on MNIST"] = run_model(
            "mlp", MLP(), data, lambda r: {"fc1": r, "fc2": max(r // 2, 1)}, mnist_settings, args)
    if "cnn" in args.models:
        c = load_cifar10(args.cifar_dir, download=False)
        data = ((c.train_images[:45000], c.train_labels[:45000]), (c.train_images[45000:], c.train_labels[45000:]),
                (c.test_images, c.test_labels))
        models["CIFAR CNN on CIFAR-10"] = run_model(
            "cnn", teacher_cnn(), data, lambda r: {"conv2": r, "fc1": 2 * r}, cnn_settings, args)
    out = {"experiment": "lowrank", "models": models,
           "target": "a setting with latency <= 0.7x dense (interval wholly below) within 1 point of its test accuracy",
           "config": {"blocks": args.blocks, "calls": args.calls, "quick": args.quick},
           "environment": environment(quick=args.quick)}
    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(out, indent=2))
    text = markdown(out)
    base.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
