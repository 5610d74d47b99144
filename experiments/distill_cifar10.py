"""CIFAR-10: does a student CNN trained with KD or DKD beat the same student trained on labels?

Teacher ``teacher_cnn()`` (conv 32, conv 64, dense 128) is trained once (params cached as .npz);
three students ``student_cnn()`` (dense 64) per seed are trained identically (same init, same
batches, same schedule): labels only, Hinton KD, and decoupled KD (Zhao et al. 2022). Mean and
std over seeds. Runs through ``make_train_step`` / ``fit`` / ``evaluate``.

Usage: python experiments/distill_cifar10.py [--teacher-epochs N] [--student-epochs N] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np
import optax

import jaxcompress as jc
from jaxcompress.data import load_cifar10
from jaxcompress.distill import dkd_loss, kd_loss
from jaxcompress.models import student_cnn, teacher_cnn
from jaxcompress.train import evaluate, split_variables
from jaxcompress.data import epochs as epoch_batches
from jaxcompress.train.loop import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"


def save_npz(path, params):
    from flax import traverse_util

    np.savez(path, **{"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(params).items()})


def load_npz(path):
    from flax import traverse_util

    with np.load(path, allow_pickle=False) as f:
        return traverse_util.unflatten_dict({tuple(k.split("/")): f[k] for k in f.files})


def train(module, data, *, epochs, train_size=None, batch_size, lr, seed, teacher=None, teacher_params=None, desc):
    params, model_state = split_variables(module.init(jax.random.key(seed), data.train_images[:1]))
    steps = max(int(epochs * ((train_size or len(data.train_labels)) // batch_size)), 1)
    optimizer = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = jc.init_train_state(params, optimizer, model_state=model_state, rng=seed)
    teacher_variables = None if teacher is None else (teacher_params, {})
    step = jax.jit(jc.make_train_step(jc.linen_apply_fn(module), optimizer, teacher=teacher), donate_argnums=0)
    t0 = time.time()
    n = len(data.train_labels) if train_size is None else train_size
    batches = epoch_batches(data.train_images[:n], data.train_labels[:n], batch_size, seed=seed,
                            num_epochs=int(np.ceil(epochs)))
    state, _ = fit(step, state, batches, num_steps=steps, teacher_variables=teacher_variables, desc=desc,
                   progress=False)
    seconds = time.time() - t0
    ev = evaluate(jax.jit(jc.make_eval_step(jc.linen_apply_fn(module))), state,
                  {"image": data.test_images, "label": data.test_labels})
    print(f"{desc}: test accuracy {ev['accuracy']:.4f} ({seconds:.0f}s)", flush=True)
    return state.params, {"test_accuracy": ev["accuracy"], "epochs": epochs, "train_seconds": round(seconds, 1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-epochs", type=float, default=5)
    ap.add_argument("--student-epochs", type=float, default=2)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--student-train-size", type=int, default=None,
                    help="train students on the first N training images (the teacher always sees all)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=4.0)
    ap.add_argument("--teacher-cache", default="/tmp/jaxcompress_cifar_teacher.npz")
    ap.add_argument("--out", default=str(RESULTS / "distill_cifar10"))
    args = ap.parse_args()
    data = load_cifar10(download=False)
    T = args.temperature

    teacher = teacher_cnn()
    cache, meta = Path(args.teacher_cache), Path(args.teacher_cache).with_suffix(".json")
    if cache.exists() and meta.exists() and json.loads(meta.read_text()).get("epochs") == args.teacher_epochs:
        t_params, t_result = load_npz(cache), {**json.loads(meta.read_text()), "from_cache": True}
    else:
        t_params, t_result = train(teacher, data, epochs=args.teacher_epochs, batch_size=args.batch_size,
                                   lr=1e-3, seed=100, desc="teacher")
        save_npz(cache, t_params)
        meta.write_text(json.dumps(t_result))
    t_apply = jc.linen_apply_fn(teacher)
    methods = {
        "no_kd": None,
        "kd": jc.Teacher(t_apply, functools.partial(kd_loss, temperature=T, kd_weight=0.5, ce_weight=0.5)),
        "dkd": jc.Teacher(t_apply, functools.partial(dkd_loss, temperature=T, tckd_weight=1.0, nckd_weight=2.0,
                                                     ce_weight=1.0)),
    }
    runs = {name: [] for name in methods}
    for seed in args.seeds:
        for name, kd in methods.items():
            _, r = train(student_cnn(), data, epochs=args.student_epochs, train_size=args.student_train_size,
                         batch_size=args.batch_size, lr=1e-3,
                         seed=seed, teacher=kd, teacher_params=t_params, desc=f"student {name} seed {seed}")
            runs[name].append({"seed": seed, **r})
    summary = {name: {"mean": float(np.mean([r["test_accuracy"] for r in rs])),
                      "std": float(np.std([r["test_accuracy"] for r in rs], ddof=1)) if len(rs) > 1 else 0.0}
               for name, rs in runs.items()}
    record = {
        "experiment": "CIFAR-10 teacher/student CNN: no-KD vs KD vs DKD",
        "teacher": t_result, "students": runs, "summary": summary,
        "published": {"source": "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022, Table 1 (CIFAR-100, "
                                "ResNet32x4 -> ResNet8x4)", "student": 72.50, "kd": 73.33, "dkd": 76.32},
        "config": {**{k: v for k, v in vars(args).items() if k not in ("data_dir", "out")}, "optimizer": "adam, cosine decay from 1e-3", "kd": "kd_weight 0.5, ce_weight 0.5",
                   "dkd": "tckd_weight 1, nckd_weight 2, ce_weight 1", "augmentation": "none"},
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version()},
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps(record, indent=2))
    md = ["# CIFAR-10 distillation: teacher CNN -> student CNN", "",
          f"Teacher `teacher_cnn()` trained {args.teacher_epochs:g} epochs: test accuracy "
          f"{t_result['test_accuracy']:.4f} (all 50,000 training images). Students `student_cnn()` trained "
          f"{args.student_epochs:g} epochs each on the first {args.student_train_size or 50000:,} training images "
          f"(Adam, cosine decay from 1e-3, batch {args.batch_size}, no augmentation), seeds {args.seeds}; "
          "within a seed the three students share init and batch order.", "",
          "| student | test accuracy, mean | std (ddof 1) | per seed |", "| --- | ---: | ---: | --- |"]
    for name in methods:
        per = ", ".join(f"{r['test_accuracy']:.4f}" for r in runs[name])
        md.append(f"| {name} | {summary[name]['mean']:.4f} | {summary[name]['std']:.4f} | {per} |")
    md += ["", f"KD: `kd_loss(T={T:g}, kd_weight=0.5, ce_weight=0.5)`; DKD: `dkd_loss(T={T:g}, tckd_weight=1, "
           "nckd_weight=2, ce_weight=1)` (no warm-up).", "",
           "Published reference (different data set and models, for orientation only): Zhao et al. 2022, Table 1, "
           "CIFAR-100 ResNet32x4 -> ResNet8x4: student 72.50, KD 73.33, DKD 76.32 (top-1 %, 240 epochs).", "",
           f"Run: `python experiments/distill_cifar10.py --teacher-epochs {args.teacher_epochs:g} "
           f"--student-epochs {args.student_epochs:g} "
           + (f"--student-train-size {args.student_train_size} " if args.student_train_size else "")
           + f"--seeds {' '.join(map(str, args.seeds))}`"]
    Path(args.out + ".md").write_text("\n".join(md) + "\n")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
