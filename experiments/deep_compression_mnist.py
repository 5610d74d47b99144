"""Deep Compression (Han et al. 2016) on MNIST, measured in the bytes of the saved file.

Han, Mao & Dally (2016), "Deep Compression: Compressing Deep Neural Networks with Pruning,
Trained Quantization and Huffman Coding" (ICLR), Table 1: LeNet-300-100 1070 KB -> 27 KB (40x),
test error 1.64% -> 1.58%; LeNet-5 1720 KB -> 44 KB (39x), 0.80% -> 0.74%. Tables 2 and 3 give
the per-layer settings: LeNet-300-100 keeps 8% / 9% / 26% of ip1 / ip2 / ip3 with 6-bit shared
weights; LeNet-5 keeps 66% / 12% / 8% / 19% of conv1 / conv2 / ip1 / ip2 with 8-bit shared weights
in the convolutions and 5-bit in the fully connected layers; both with 5-bit relative indices
before Huffman coding. The pruning rates are those of Han et al. (2015), "Learning both Weights
and Connections", Tables 2 and 3.

The pipeline, per model and seed, through the library's public API only:

1. train the dense model (``make_train_step`` + ``fit``, Adam with cosine decay);
2. iterative magnitude pruning to the per-layer sparsities (``pruning`` with
   ``iterative_schedule``), retraining between rounds and after the last one with masks held;
3. per-layer k-means weight sharing with linear initialisation (``weight_sharing``), the masks
   held by ``fixed_masks``; the centroids are ``Trainable`` and fine-tuned by the ordinary step;
4. ``jaxcompress.export.save`` of the compressed view (sparse layouts with relative indices or
   bitmasks, codebook indices, Huffman coding of every stream), then ``load`` of that file and
   evaluation of the loaded weights.

The compression ratio is ``4 * parameters / os.path.getsize(artifact)`` and every error is that
of the model loaded back from its artifact. The last 5,000 training images are held out as a
validation split; every configuration tried is scored on it and logged, one is chosen per model
by a rule fixed in advance (:func:`choose`), and the test set is scored once per final model
(the chosen configuration, one run per seed) and once for each dense reference.

The LeNet-5 of Han et al. is Caffe's ``lenet`` example (conv 20 -> pool -> conv 50 -> pool ->
ip 500 -> ReLU -> ip 10, 431,080 parameters), not LeCun et al.'s 1998 network that
``jaxcompress.models.LeNet5`` implements (61,706 parameters), so it is defined here.

Usage: python experiments/deep_compression_mnist.py [--seeds 3] [--quick] [--out BASE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.data import epochs, load_mnist
from jaxcompress.export import load, save
from jaxcompress.models import MLP
from jaxcompress.prune import fixed_masks, iterative_schedule, pruning
from jaxcompress.quant import weight_sharing
from jaxcompress.train import evaluate, fit, split_variables

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
VALIDATION = 5000


class CaffeLeNet5(nn.Module):
    """Caffe's MNIST ``lenet`` (the LeNet-5 of Han et al.): no ReLU after the convolutions.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> v = CaffeLeNet5().init(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
      >>> sum(x.size for x in jax.tree.leaves(v))
      431080
    """

    @nn.compact
    def __call__(self, x, train: bool = False):
        x = nn.max_pool(nn.Conv(20, (5, 5), padding="VALID", name="conv1")(x), (2, 2), (2, 2))
        x = nn.max_pool(nn.Conv(50, (5, 5), padding="VALID", name="conv2")(x), (2, 2), (2, 2))
        x = jnp.reshape(x, (x.shape[0], -1))
        x = nn.relu(nn.Dense(500, name="fc1")(x))
        return nn.Dense(10, name="fc2")(x)


# Published numbers (Han et al. 2016, Tables 1-3) and the settings each model starts from.
MODELS = {
    "lenet300": {
        "title": "LeNet-300-100",
        "module": MLP,
        "published": {"source": "Han et al. 2016, Deep Compression, Table 1 and Table 2",
                      "reference_kb": 1070, "compressed_kb": 27, "ratio": 40,
                      "reference_error_pct": 1.64, "compressed_error_pct": 1.58,
                      "weights_kept": {"ip1": 0.08, "ip2": 0.09, "ip3": 0.26},
                      "weight_bits": {"ip1": 6, "ip2": 6, "ip3": 6}, "index_bits": 5,
                      "bits_after_huffman": {"weights": 5.1, "index": 3.7}},
        "bar": {"ratio": 40.0, "error_pct": 1.7},
        "layers": ("fc1/kernel", "fc2/kernel", "head/kernel"),
        # Han et al. 2015 Table 2 (kept 8% / 9% / 26%).
        "sparsity": {"paper": {"fc1/kernel": 0.92, "fc2/kernel": 0.91, "head/kernel": 0.74},
                     "sparser": {"fc1/kernel": 0.94, "fc2/kernel": 0.92, "head/kernel": 0.74}},
        "bits": {"paper 6-bit": {"fc1/kernel": 6, "fc2/kernel": 6, "head/kernel": 6},
                 "5-bit": {"fc1/kernel": 5, "fc2/kernel": 5, "head/kernel": 5},
                 "4-bit": {"fc1/kernel": 4, "fc2/kernel": 4, "head/kernel": 4}},
        "epochs": {"dense": 15, "round": 2, "rounds": 4, "retrain": 4, "share": 2},
        "grid": {"weight_decay": [5e-4, 0.0, 5e-3], "sparsity": ["paper", "sparser"],
                 "bits": ["paper 6-bit", "5-bit", "4-bit"], "bias_dtype": ["float16", "float32"]},
    },
    "lenet5": {
        "title": "LeNet-5 (Caffe)",
        "module": CaffeLeNet5,
        "published": {"source": "Han et al. 2016, Deep Compression, Table 1 and Table 3",
                      "reference_kb": 1720, "compressed_kb": 44, "ratio": 39,
                      "reference_error_pct": 0.80, "compressed_error_pct": 0.74,
                      "weights_kept": {"conv1": 0.66, "conv2": 0.12, "ip1": 0.08, "ip2": 0.19},
                      "weight_bits": {"conv1": 8, "conv2": 8, "ip1": 5, "ip2": 5}, "index_bits": 5,
                      "bits_after_huffman": {"weights": 4.1, "index": 4.4}},
        "bar": {"ratio": 39.0, "error_pct": 0.9},
        "layers": ("conv1/kernel", "conv2/kernel", "fc1/kernel", "fc2/kernel"),
        # Han et al. 2015 Table 3 (kept 66% / 12% / 8% / 19%).
        "sparsity": {"paper": {"conv1/kernel": 0.34, "conv2/kernel": 0.88, "fc1/kernel": 0.92, "fc2/kernel": 0.81},
                     "sparser": {"conv1/kernel": 0.34, "conv2/kernel": 0.88, "fc1/kernel": 0.94, "fc2/kernel": 0.81}},
        "bits": {"paper 8/5-bit": {"conv1/kernel": 8, "conv2/kernel": 8, "fc1/kernel": 5, "fc2/kernel": 5},
                 "6/4-bit": {"conv1/kernel": 6, "conv2/kernel": 6, "fc1/kernel": 4, "fc2/kernel": 4}},
        "epochs": {"dense": 4, "round": 1, "rounds": 3, "retrain": 1, "share": 0.5},
        # Weight decay is not searched here (each value costs a full run): 5e-4, Caffe's lenet
        # solver value, which the LeNet-300-100 search also chose.
        "grid": {"weight_decay": [5e-4], "sparsity": ["paper", "sparser"],
                 "bits": ["paper 8/5-bit", "6/4-bit"], "bias_dtype": ["float16", "float32"]},
    },
}


def rules_for(per_layer: dict) -> list:
    """``(regex, value)`` rules that give each named leaf its value and leave the rest alone."""
    return [(f"^{name}$", value) for name, value in per_layer.items()]


def load_splits(data_dir: str, quick: bool) -> dict:
    """Train (first 55,000), validation (last 5,000 training images) and test arrays."""
    d = load_mnist(data_dir, download=False)
    n = len(d.train_labels) - VALIDATION
    splits = {
        "train": (d.train_images[:n], d.train_labels[:n]),
        "val": (d.train_images[n:], d.train_labels[n:]),
        "test": (d.test_images, d.test_labels),
    }
    if quick:  # a tiny subset for the smoke test
        splits = {"train": tuple(a[:1024] for a in splits["train"]), "val": tuple(a[:256] for a in splits["val"]),
                  "test": tuple(a[:256] for a in splits["test"])}
    return splits


class Runner:
    """Trains, compresses, saves and scores one model on one seed."""

    def __init__(self, name: str, splits: dict, seed: int, *, batch_size: int, lr: float, share_lr: float,
                 workdir: str, weight_decay: float = 0.0, epoch_scale: float = 1.0):
        self.name, self.cfg = name, MODELS[name]
        self.module = self.cfg["module"]()
        self.apply_fn = jc.linen_apply_fn(self.module)
        self.splits, self.seed = splits, seed
        self.batch_size, self.lr, self.share_lr = batch_size, lr, share_lr
        self.workdir, self.weight_decay = workdir, weight_decay
        self.per_epoch = len(splits["train"][1]) // batch_size
        self.epochs = {k: v * epoch_scale for k, v in self.cfg["epochs"].items()}
        self.epochs["rounds"] = self.cfg["epochs"]["rounds"]
        self.eval_step = jax.jit(jc.make_eval_step(self.apply_fn))
        self.seconds: dict = {}

    def steps(self, epochs: float) -> int:
        return max(1, int(round(epochs * self.per_epoch)))

    def _train(self, params, transform, num_steps, lr, desc, batch_seed):
        # L2 weight decay on the kernels, added to the gradient as in Caffe (Han et al. train with it).
        kernels = lambda tree: jax.tree.map(lambda x: jnp.ndim(x) >= 2, tree)  # noqa: E731
        optimizer = optax.chain(optax.add_decayed_weights(self.weight_decay, mask=kernels),
                                optax.adam(optax.cosine_decay_schedule(lr, num_steps)))
        state = jc.init_train_state(params, optimizer, transform=transform, rng=self.seed)
        step = jax.jit(jc.make_train_step(self.apply_fn, optimizer, transform=transform), donate_argnums=0)
        x, y = self.splits["train"]
        batches = epochs(x, y, self.batch_size, seed=1000 * self.seed + batch_seed,
                         num_epochs=-(-num_steps // self.per_epoch))
        t0 = time.time()
        state, _ = fit(step, state, batches, num_steps=num_steps, desc=f"{self.name} {desc}", progress=False)
        jax.block_until_ready(state.params)
        self.seconds[desc] = self.seconds.get(desc, 0.0) + time.time() - t0
        return state

    def error(self, params, split: str) -> float:
        """Error (%) of plain params (e.g. loaded from a file) on a split."""
        x, y = self.splits[split]
        state = jc.init_train_state(params, optax.identity())
        return 100.0 * (1.0 - evaluate(self.eval_step, state, {"image": x, "label": y})["accuracy"])

    def dense(self):
        x = self.splits["train"][0][:1]
        params, _ = split_variables(self.module.init(jax.random.key(self.seed), x))
        state = self._train(params, None, self.steps(self.epochs["dense"]), self.lr, "dense", 0)
        return state.params

    def prune(self, params, sparsity: dict):
        rounds = self.epochs["rounds"]
        round_steps = self.steps(self.epochs["round"])
        top = max(sparsity.values())
        rate = 1.0 - (1.0 - top) ** (1.0 / rounds)  # the sparsest layer reaches its target at the last round
        schedule = iterative_schedule(rate=rate, round_steps=round_steps, num_rounds=rounds)
        transform = pruning(top, schedule=schedule, rules=rules_for(sparsity))
        total = rounds * round_steps + self.steps(self.epochs["retrain"])
        state = self._train(params, transform, total, self.lr / 2, "prune", 1)
        return state.params, state.compression_state.masks

    def share(self, params, masks, bits: dict):
        transform = jc.chain(fixed_masks(masks), weight_sharing(rules=rules_for({k: 2**b for k, b in bits.items()})))
        return transform, self._train(params, transform, self.steps(self.epochs["share"]), self.share_lr, "share", 2)

    def export(self, transform, state, tag: str, float_dtype: str) -> dict:
        """Saves the compressed view, loads the file back; returns its bytes and the loaded params."""
        view = transform.apply(state.params, state.compression_state)
        description = transform.describe(state.params, state.compression_state)
        path = os.path.join(self.workdir, f"{self.name}_s{self.seed}_{tag}.npz")
        report = save(path, view, description, float_dtype=float_dtype)
        loaded, info = load(path, like=view)
        file_bytes = os.path.getsize(path)
        floats = 4 * sum(int(np.size(a)) for a in jax.tree.leaves(view))
        return {
            "path": path, "params": loaded, "file_bytes": file_bytes, "float32_bytes": floats,
            "ratio": floats / file_bytes,
            "nonzero_weights": int(sum(np.count_nonzero(np.asarray(loaded_leaf(loaded, k))) for k in self.cfg["layers"])),
            "tensors": [{"path": t.path, "layout": t.layout, "kind": t.kind, "bits": t.bits, "count": t.count,
                         "bytes": t.nbytes, "raw_bytes": t.raw_bytes, "entropy_bytes": round(t.entropy_bytes, 1)}
                        for t in report.tensors],
            "index_bits": {k: r.get("index_bits") for k, r in info.tensors.items() if r.get("layout") == "relative"},
        }


def loaded_leaf(params, path: str):
    node = params
    for part in path.split("/"):
        node = node[part]
    return node


def choose(rows: list, bar: dict) -> dict:
    """The configuration kept for a model, from validation only (rule fixed before any run).

    Among configurations whose artifact reaches the ratio bar and whose validation error is within
    the error bar, the lowest validation error (ties: the higher ratio). If none does both: the
    highest ratio among those within the error bar; if none is: the lowest validation error.
    """
    both = [r for r in rows if r["ratio"] >= bar["ratio"] and r["val_error_pct"] <= bar["error_pct"]]
    if both:
        return min(both, key=lambda r: (r["val_error_pct"], -r["ratio"]))
    accurate = [r for r in rows if r["val_error_pct"] <= bar["error_pct"]]
    if accurate:
        return max(accurate, key=lambda r: r["ratio"])
    return min(rows, key=lambda r: r["val_error_pct"])


def search(runner: Runner, grid: dict) -> tuple[list, dict]:
    """Seed ``runner.seed``: every (weight decay, sparsity, bits, bias dtype) configuration of
    ``grid``, each saved, loaded back and scored on validation.

    For each weight decay the sparser setting is tried only when no configuration at the paper's
    sparsities reaches both bars on validation. Returns the rows and, per configuration, the
    loaded params (to score the chosen one on test) and the dense params.
    """
    cfg, bar = runner.cfg, runner.cfg["bar"]
    rows, keep, dense_of = [], {}, {}
    for wd in grid["weight_decay"]:
        runner.weight_decay = wd
        dense = dense_of[wd] = runner.dense()
        dense_val = runner.error(dense, "val")
        wd_rows: list = []
        for sp_name in grid["sparsity"]:
            if sp_name != "paper" and any(r["ratio"] >= bar["ratio"] and r["val_error_pct"] <= bar["error_pct"] for r in wd_rows):
                break
            sparsity = cfg["sparsity"][sp_name]
            pruned, masks = runner.prune(dense, sparsity)
            held = fixed_masks(masks)
            pruned_val = runner.error(held.apply(pruned, held.init(pruned)), "val")
            for bits_name in grid["bits"]:
                bits = cfg["bits"][bits_name]
                transform, state = runner.share(pruned, masks, bits)
                for dtype in grid["bias_dtype"]:
                    config = f"weight decay {wd:g}, {sp_name} sparsity, {bits_name}, {dtype} biases"
                    art = runner.export(transform, state, f"{len(rows)}", dtype)
                    row = {"config": config, "weight_decay": wd, "sparsity_setting": sp_name,
                           "per_layer_sparsity": sparsity, "bits_setting": bits_name, "bits": bits, "bias_dtype": dtype,
                           "dense_val_error_pct": round(dense_val, 3), "pruned_val_error_pct": round(pruned_val, 3),
                           "val_error_pct": round(runner.error(art["params"], "val"), 3),
                           **{k: v for k, v in art.items() if k not in ("params", "path")}}
                    print(f"{runner.name} seed {runner.seed}: {config}: {row['file_bytes']:,} B, "
                          f"{row['ratio']:.1f}x, val error {row['val_error_pct']:.2f}%", flush=True)
                    wd_rows.append(row)
                    keep[config] = art["params"]
        rows += wd_rows
    return rows, {"dense": dense_of, "final": keep}


def final_run(runner: Runner, chosen: dict) -> dict:
    """Another seed: the chosen configuration only, then the test set once."""
    dense = runner.dense()
    pruned, masks = runner.prune(dense, chosen["per_layer_sparsity"])
    transform, state = runner.share(pruned, masks, chosen["bits"])
    art = runner.export(transform, state, "final", chosen["bias_dtype"])
    return {"dense": dense, "artifact": art, "val_error_pct": runner.error(art["params"], "val")}


def dense_reference(runner: Runner, dense) -> dict:
    """The dense model saved as a float32 artifact, loaded back and scored on test."""
    path = os.path.join(runner.workdir, f"{runner.name}_s{runner.seed}_dense.npz")
    save(path, dense)
    loaded, _ = load(path, like=dense)
    return {"file_bytes": os.path.getsize(path), "test_error_pct": runner.error(loaded, "test"),
            "val_error_pct": runner.error(loaded, "val")}


def run_model(name: str, splits: dict, args, workdir: str) -> dict:
    seeds = list(range(args.seeds))
    kw = dict(batch_size=args.batch_size, lr=args.lr, share_lr=args.share_lr, workdir=workdir,
              epoch_scale=0.05 if args.quick else 1.0)
    t0 = time.time()
    grid = {k: runner_grid[:1] if args.quick else runner_grid for k, runner_grid in MODELS[name]["grid"].items()}
    runner = Runner(name, splits, seeds[0], **kw)
    rows, kept = search(runner, grid)
    chosen = choose(rows, runner.cfg["bar"])
    runner.weight_decay = chosen["weight_decay"]
    per_seed = [{
        "seed": seeds[0], "val_error_pct": chosen["val_error_pct"], "file_bytes": chosen["file_bytes"],
        "ratio": chosen["ratio"], "test_error_pct": runner.error(kept["final"][chosen["config"]], "test"),
        "dense": dense_reference(runner, kept["dense"][chosen["weight_decay"]]), "seconds": dict(runner.seconds),
    }]
    for seed in seeds[1:]:
        r = Runner(name, splits, seed, weight_decay=chosen["weight_decay"], **kw)
        out = final_run(r, chosen)
        per_seed.append({"seed": seed, "val_error_pct": out["val_error_pct"], "file_bytes": out["artifact"]["file_bytes"],
                         "ratio": out["artifact"]["ratio"], "test_error_pct": r.error(out["artifact"]["params"], "test"),
                         "dense": dense_reference(r, out["dense"]), "seconds": dict(r.seconds)})
    for s in per_seed:
        print(f"{name} seed {s['seed']}: {s['file_bytes']:,} B, {s['ratio']:.1f}x, test error "
              f"{s['test_error_pct']:.2f}% (dense {s['dense']['test_error_pct']:.2f}%)", flush=True)

    def stats(key, sub=None):
        v = np.array([(s[sub] if sub else s)[key] for s in per_seed], float)
        return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "values": v.tolist()}

    bar = runner.cfg["bar"]
    summary = {"file_bytes": stats("file_bytes"), "ratio": stats("ratio"), "test_error_pct": stats("test_error_pct"),
               "dense_test_error_pct": stats("test_error_pct", "dense"), "dense_file_bytes": stats("file_bytes", "dense")}
    every_seed = all(s["ratio"] >= bar["ratio"] and s["test_error_pct"] <= bar["error_pct"] for s in per_seed)
    mean_meets = summary["ratio"]["mean"] >= bar["ratio"] and summary["test_error_pct"]["mean"] <= bar["error_pct"]
    return {"model": name, "title": runner.cfg["title"], "published": runner.cfg["published"], "bar": bar,
            "epochs": runner.epochs, "grid": grid, "configurations": rows, "chosen": chosen["config"],
            "chosen_row": {k: v for k, v in chosen.items() if k != "tensors"}, "chosen_tensors": chosen["tensors"],
            "seeds": per_seed, "summary": summary, "bar_met_every_seed": every_seed, "bar_met_mean": mean_meets,
            "seconds": round(time.time() - t0, 1)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="lenet300,lenet5")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--share-lr", type=float, default=1e-4)
    ap.add_argument("--quick", action="store_true", help="tiny subset and a few steps (smoke test)")
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "mnist"))
    ap.add_argument("--out", default=None, help="base path of the .json/.md/.png (default experiments/results/...)")
    ap.add_argument("--render", default=None, metavar="JSON", help="only rewrite the .md and .png of a results .json")
    args = ap.parse_args(argv)
    if args.render:
        render(args.render)
        return json.loads(Path(args.render).read_text())
    if args.out is None:
        if args.quick:
            ap.error("--quick needs --out (the committed results are from a full run)")
        args.out = str(RESULTS / "deep_compression_mnist")
    t0 = time.time()
    splits = load_splits(args.data_dir, args.quick)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        ap.error(f"--models: unknown {unknown}; choose from {sorted(MODELS)}")
    with tempfile.TemporaryDirectory() as workdir:
        results = [run_model(m, splits, args, workdir) for m in models]
    out = {
        "experiment": "deep_compression_mnist",
        "models": results,
        "config": {k: v for k, v in vars(args).items() if k not in ("data_dir", "out")},
        "split": {k: len(v[1]) for k, v in splits.items()},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version()},
        "seconds": round(time.time() - t0, 1),
    }
    base = Path(args.out)
    base.parent.mkdir(parents=True, exist_ok=True)
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(out))
    plot(out, base.with_suffix(".png"))
    print(f"total {out['seconds']:.0f}s", flush=True)
    return out


# What was run before the committed run, and what it showed (kept with the results).
DEVELOPMENT_NOTE = (
    "Before the committed run: an earlier version of this script (without weight decay, LeNet-300-100 only, "
    "one seed) chose weight decay 0, paper sparsity, 4-bit on validation (1.66%) and scored it on the test set: "
    "1.82%, above the bar. Weight decay (and float16 biases) were then added to the search, all of it "
    "on validation; the configurations of that earlier run are rows of the LeNet-300-100 table below (weight "
    "decay 0). Weight decay values 0, 5e-4 and 5e-3 were also probed on validation with a script that called "
    "these functions; those configurations are likewise rows of the table. No other test score was seen, apart "
    "from smoke runs of barely trained models on 256 test images."
)


def _pm(stat: dict, fmt: str) -> str:
    return format(stat["mean"], fmt) + ("" if len(stat["values"]) < 2 else " ± " + format(stat["std"], fmt))


def markdown(out: dict) -> str:
    """The results page: our numbers next to the paper's, every configuration tried, the method."""
    cfg = out["config"]
    n_seeds = len(out["models"][0]["seeds"]) if out["models"] else 0
    seeds_text = f"mean ± standard deviation over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    lines = [
        "# Deep Compression on MNIST, in the bytes of the saved file",
        "",
        "Han, Mao & Dally (2016), *Deep Compression: Compressing Deep Neural Networks with Pruning, Trained "
        "Quantization and Huffman Coding* (ICLR 2016), Table 1, against our pipeline: magnitude pruning with "
        "retraining, k-means weight sharing with fine-tuned centroids, then `jaxcompress.export.save` (sparse "
        "layouts with relative indices, codebook indices, Huffman coding). **Ratio = float32 bytes of all "
        "parameters / `os.path.getsize` of the saved artifact**; every error is measured on the model *loaded "
        "back from that file*. All choices were made on a validation split (the last 5,000 training images); "
        f"the test set (10,000 images) was scored once per final model. Numbers are {seeds_text}.",
        "",
        "| model | paper: size, ratio, error | ours: float32 bytes | ours: file bytes | ours: ratio | ours: test error (from file) | dense reference test error (paper) | bar | bar met |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for m in out["models"]:
        p, s, bar = m["published"], m["summary"], m["bar"]
        met = "yes, every seed" if m["bar_met_every_seed"] else ("yes, on the mean (not every seed)" if m["bar_met_mean"] else "**no**")
        lines.append(
            f"| {m['title']} | {p['reference_kb']} KB -> {p['compressed_kb']} KB, {p['ratio']}x, "
            f"{p['reference_error_pct']:.2f}% -> {p['compressed_error_pct']:.2f}% | {m['chosen_row']['float32_bytes']:,} | "
            f"{_pm(s['file_bytes'], ',.0f')} | {_pm(s['ratio'], '.1f')}x | {_pm(s['test_error_pct'], '.2f')}% | "
            f"{_pm(s['dense_test_error_pct'], '.2f')}% ({p['reference_error_pct']:.2f}%) | >= {bar['ratio']:g}x at <= "
            f"{bar['error_pct']:g}% | {met} |"
        )
    lines += ["", "Verdict:", ""]
    for m in out["models"]:
        bar, seeds = m["bar"], m["seeds"]
        worst_ratio, worst_err = min(s["ratio"] for s in seeds), max(s["test_error_pct"] for s in seeds)
        verdict = "met" if m["bar_met_every_seed"] else ("met on the mean only" if m["bar_met_mean"] else "not met")
        paper_bits = [r for r in m["configurations"] if r["bits_setting"].startswith("paper")
                      and r["weight_decay"] == m["chosen_row"]["weight_decay"] and r["sparsity_setting"] == "paper"
                      and r["bias_dtype"] == m["chosen_row"]["bias_dtype"]]
        lines.append(
            f"- {m['title']}: the bar (>= {bar['ratio']:g}x at <= {bar['error_pct']:g}% test error) is **{verdict}**; "
            f"worst seed {worst_ratio:.1f}x and {worst_err:.2f}% (margin {bar['error_pct'] - worst_err:.2f} points). "
            f"Chosen bits: {m['chosen_row']['bits_setting']}"
            + (f"; with the paper's bit widths ({paper_bits[0]['bits_setting']}) our file is {paper_bits[0]['file_bytes']:,} "
               f"bytes, {paper_bits[0]['ratio']:.1f}x, below the paper's {m['published']['ratio']}x: each stored weight "
               "(value + position) costs more bits in our file than the paper reports (the per-tensor table gives ours)." if paper_bits and
               not m["chosen_row"]["bits_setting"].startswith("paper") else ".")
        )
    lines += ["", DEVELOPMENT_NOTE]
    lines += ["", "Per seed (the chosen configuration; seed 0 is the run the choice was made on):", "",
              "| model | seed | file bytes | ratio | validation error | test error | dense file bytes | dense test error |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for m in out["models"]:
        for r in m["seeds"]:
            lines.append(f"| {m['title']} | {r['seed']} | {r['file_bytes']:,} | {r['ratio']:.1f}x | {r['val_error_pct']:.2f}% | "
                         f"{r['test_error_pct']:.2f}% | {r['dense']['file_bytes']:,} | {r['dense']['test_error_pct']:.2f}% |")
    for m in out["models"]:
        p, e = m["published"], m["epochs"]
        lines += [
            "", f"## {m['title']}", "",
            f"Published ({p['source']}): weights kept {', '.join(f'{k} {100 * v:.0f}%' for k, v in p['weights_kept'].items())}; "
            f"shared-weight bits {', '.join(f'{k} {v}' for k, v in p['weight_bits'].items())}; {p['index_bits']}-bit relative "
            f"indices; after Huffman coding {p['bits_after_huffman']['weights']} bits per weight and "
            f"{p['bits_after_huffman']['index']} bits per index on average.",
            "",
            f"Chosen on validation: **{m['chosen']}**.",
            "",
            "Where the bytes of the chosen artifact (seed 0) go, per tensor (bits / stored value counts value, "
            "position and table bytes; the Shannon bound is the order-0 entropy of the value and position streams):",
            "", "| tensor | layout | kind | bits | stored values | bytes | bits / stored value | Shannon bound (bytes) |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for t in m["chosen_tensors"]:
            lines.append(f"| {t['path']} | {t['layout']} | {t['kind']} | {t['bits']} | {t['count']:,} | {t['bytes']:,} | "
                         f"{8 * t['bytes'] / max(t['count'], 1):.2f} | {t['entropy_bytes']:,.0f} |")
        payload = sum(t["bytes"] for t in m["chosen_tensors"])
        lines += [
            "", f"Tensor streams {payload:,} bytes; the rest of the {m['chosen_row']['file_bytes']:,}-byte file is the "
            "format's JSON records (shapes, codebooks' layout, SHA-256 digests) and the zip container.",
            "", "Every configuration tried (seed 0, scored on validation from its loaded artifact):", "",
            "| configuration | non-zero weights | file bytes | ratio | dense val error | pruned val error | val error (from file) | meets both bars on val |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        bar = m["bar"]
        for r in m["configurations"]:
            ok = r["ratio"] >= bar["ratio"] and r["val_error_pct"] <= bar["error_pct"]
            name = f"**{r['config']}** (chosen)" if r["config"] == m["chosen"] else r["config"]
            lines.append(f"| {name} | {r['nonzero_weights']:,} | {r['file_bytes']:,} | {r['ratio']:.1f}x | "
                         f"{r['dense_val_error_pct']:.2f}% | {r['pruned_val_error_pct']:.2f}% | {r['val_error_pct']:.2f}% | "
                         f"{'yes' if ok else 'no'} |")
        lines += [
            "", f"Training budget (fixed in advance by the machine's time, not searched): dense {e['dense']:g} epochs; "
            f"pruning in {e['rounds']} rounds of {e['round']:g} epoch(s) each, then {e['retrain']:g} epoch(s) of retraining with "
            f"the masks held; centroid fine-tuning {e['share']:g} epoch(s). Search and seeds took {m['seconds']:.0f} s.",
        ]
    lines += [
        "", "## Method", "",
        f"- Data: MNIST, 55,000 training images, 5,000 validation images (the last of the training set), 10,000 test "
        f"images, standardised, no augmentation. Batch {cfg['batch_size']}, Adam with cosine decay from {cfg['lr']:g} "
        f"(dense), {cfg['lr'] / 2:g} (pruning and retraining) and {cfg['share_lr']:g} (centroid fine-tuning), L2 weight "
        "decay on the kernels added to the gradient (Caffe's convention; Han et al. trained with Caffe and SGD).",
        "- Pruning: `pruning(..., schedule=iterative_schedule(...), rules=...)` with the paper's per-layer sparsities "
        "(Han et al. 2015, Tables 2-3), each round removing the same fraction of the surviving weights so that the "
        "sparsest layer reaches its target at the last round; then retraining with the masks held.",
        "- Weight sharing: `chain(fixed_masks(masks), weight_sharing(rules=...))`, one codebook per layer with "
        "2^bits centroids, k-means with linear initialisation over the non-zero weights; the centroids are "
        "`Trainable`, so the ordinary train step sums the gradients of each centroid's members and Adam updates them "
        "(the paper's Section 3.3). Biases stay floats (float16 or float32, a searched option).",
        "- Export: `jaxcompress.export.save(path, view, description)` packs each leaf as its description says and "
        "keeps the smallest of dense, bitmask and relative-index layouts (2..8-bit gaps with padding entries, as the "
        "paper's 5-bit scheme), each stream raw or canonical-Huffman coded; `load(path)` reads it back and checks every "
        "digest; errors are those of the loaded weights.",
        "- The LeNet-5 of the paper is Caffe's MNIST `lenet` (20 and 50 5x5 convolutions without ReLU, each followed "
        "by 2x2 max pooling, a 500-unit ReLU layer, 10 outputs; 431,080 parameters, 1,724,320 float32 bytes, the "
        "paper's 1720 KB); it is defined in the script. LeNet-300-100 is `jaxcompress.models.MLP()` (266,610 "
        "parameters, 1,066,440 bytes, the paper's 1070 KB).",
        "- Selection rule (fixed before the runs): among configurations reaching both bars on validation, the "
        "lowest validation error (ties: the higher ratio); else the highest ratio within the error bar; else the "
        "lowest validation error. For each weight decay, the sparser setting is tried only when no configuration "
        "at the paper's sparsities reaches both bars on validation.",
        f"- Environment: JAX {out['environment']['jax']} on {out['environment']['backend']}, "
        f"{out['environment']['devices']} device(s); the whole run took {out['seconds']:.0f} s.",
    ]
    return "\n".join(lines) + "\n"


def plot(out: dict, path: Path) -> None:
    """Validation error against compression ratio of every configuration, test points of the final runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = out["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, m in zip(axes[0], models):
        rows, bar = m["configurations"], m["bar"]
        ax.scatter([r["ratio"] for r in rows], [r["val_error_pct"] for r in rows], c="tab:blue", alpha=0.6,
                   label="configurations (validation)")
        ax.scatter([s["ratio"] for s in m["seeds"]], [s["test_error_pct"] for s in m["seeds"]], c="tab:red", marker="x",
                   label="chosen, each seed (test)")
        p = m["published"]
        ax.scatter([p["ratio"]], [p["compressed_error_pct"]], c="k", marker="*", s=120, label="Han et al. 2016 (test)")
        ax.axvline(bar["ratio"], color="gray", ls="--", lw=1)
        ax.axhline(bar["error_pct"], color="gray", ls="--", lw=1)
        ax.set_xlabel("float32 bytes / artifact file bytes")
        ax.set_ylabel("error of the loaded model (%)")
        ax.set_title(m["title"])
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(json_path: str) -> None:
    """Writes the .md and .png next to an existing results .json."""
    base = Path(json_path)
    out = json.loads(base.read_text())
    base.with_suffix(".md").write_text(markdown(out))
    plot(out, base.with_suffix(".png"))


if __name__ == "__main__":
    main()
