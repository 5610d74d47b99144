"""Byte-level language modelling on the Python standard library: distil, prune 50%, then W8A8.

A teacher Transformer and a smaller student are trained on the standard library's source code
(``load_python_corpus``: whole files split into train/validation/test by path hash, bytes as
tokens). The student is trained twice with the same initialisation, batches and step budget: on
the labels only (the baseline), and with token-level knowledge distillation from the teacher
(``kd_loss`` on every position's next-byte logits, for each temperature in ``--temperatures``;
the one with the best validation perplexity goes on). That distilled student is pruned to 50% of
its Transformer-block kernels with a gradual (Zhu & Gupta) schedule while fine-tuning with the
teacher, and then fine-tuned with 8-bit per-channel weights and 8-bit calibrated activations
(the inputs of every Dense layer) with the masks kept.

Every stage trains through ``make_train_step`` / ``fit`` on ``sample_windows`` batches and is
scored by the library's eval step over ``eval_windows`` (every next byte of the split once, in
non-overlapping windows of ``--seq-len``). Choices are made on validation; each stage's final
model is scored on the test split once.

Usage: python experiments/transformer_lm.py [--quick] [--out PATH_WITHOUT_SUFFIX]
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcompress.core.transform import chain
from jaxcompress.data.text import eval_windows, load_python_corpus, sample_windows
from jaxcompress.distill.losses import kd_loss, perplexity
from jaxcompress.models.transformer import TransformerLM
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.train.loop import fit
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.evaluation import evaluate, make_eval_step
from jaxcompress.train.objectives import token_loss, token_metrics
from jaxcompress.train.step import Teacher, make_train_step

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
# Pruned: the kernels inside the Transformer blocks (attention and MLP projections); the
# embeddings and the output layer stay dense, as is usual for the first and last layer.
BLOCK_KERNELS = [(r"^block_\d+/.*/kernel$", True), (".*", None)]
# 8-bit weights: every Dense kernel (blocks and output layer); the embedding tables stay float.
DENSE_KERNELS = [(r"kernel$", True), (".*", None)]

FULL = dict(seq_len=64, batch_size=32, teacher=dict(dim=128, depth=4, heads=4), student=dict(dim=64, depth=2, heads=4),
            teacher_steps=2500, student_steps=2000, prune_steps=600, w8a8_steps=400, eval_every=500,
            teacher_lr=1e-3, student_lr=2e-3, prune_lr=5e-4, w8a8_lr=2e-4, temperatures=[1.0, 2.0],
            kd_weight=0.5, ce_weight=0.5, max_bytes=None, calibration_batches=8)
QUICK = dict(FULL, seq_len=32, batch_size=16, teacher=dict(dim=32, depth=1, heads=2), student=dict(dim=16, depth=1, heads=2),
             teacher_steps=60, student_steps=40, prune_steps=20, w8a8_steps=20, eval_every=40, temperatures=[2.0],
             max_bytes=50_000, calibration_batches=2)


def compression(stage: str, *, steps: int = 0, masks=None):
    """The compression transform of a stage: the one place naming the pruning and
    weight-quantization transforms of the library.

    ``'pruned'``: 50% of each block kernel, reached by a cubic schedule over the first 60% of
    ``steps`` (masks recomputed 10 times). ``'w8a8'``: the pruned stage's ``masks`` kept fixed,
    then symmetric 8-bit per-output-channel weights and 8-bit inputs of the same layers (affine,
    calibrated ranges, an EMA in training).
    """
    from jaxcompress import fixed_masks, polynomial_schedule, pruning, weight_quantization

    if stage == "pruned":
        end = max(int(0.6 * steps), 1)
        schedule = polynomial_schedule(begin_step=0, end_step=end, frequency=max(end // 10, 1))
        return pruning(0.5, rules=BLOCK_KERNELS, schedule=schedule)
    if stage == "w8a8":
        return chain(fixed_masks(masks), weight_quantization(8, rules=DENSE_KERNELS, activation_bits=8,
                                                             activation_range="calibrated"))
    raise ValueError(f"stage must be 'pruned' or 'w8a8', got {stage!r}.")


def batches(tokens, *, batch_size, seq_len, seed):
    """An endless stream of random training windows (the same seed gives the same stream)."""
    rng = np.random.default_rng(seed)
    while True:
        yield sample_windows(tokens, batch_size=batch_size, seq_len=seq_len, rng=rng)


def optimizer(lr, steps):
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10), steps, lr / 10)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


class Scorer:
    """Validation / test scores of a model (mean per-byte NLL -> perplexity and bits per byte)."""

    def __init__(self, corpus, cfg):
        self.corpus, self.cfg = corpus, cfg

    @functools.lru_cache(maxsize=None)
    def eval_step(self, apply_fn, transform):
        return jax.jit(make_eval_step(apply_fn, transform=transform, loss_fn=token_loss, metrics_fn=token_metrics))

    def __call__(self, apply_fn, state, transform=None, split="validation"):
        step = self.eval_step(apply_fn, transform)
        t0 = time.time()
        out = evaluate(step, state, eval_windows(getattr(self.corpus, split), batch_size=64,
                                                 seq_len=self.cfg["seq_len"]))
        return {"perplexity": float(perplexity(out["loss"])), "bits_per_byte": out["loss"] / math.log(2),
                "nll": out["loss"], "accuracy": out["accuracy"], "tokens": out["count"],
                "eval_seconds": round(time.time() - t0, 1)}


def train(name, apply_fn, params, model_state, cfg, corpus, score, *, steps, lr, seed, transform=None, teacher=None,
          teacher_variables=None, log=None, compression_state=None):
    """Trains ``params`` for ``steps`` with ``fit``, scoring validation every ``eval_every`` steps
    (from ``compression_state``, e.g. calibrated ranges, when given)."""
    opt = optimizer(lr, steps)
    state = init_train_state(params, opt, transform=transform, model_state=model_state, rng=seed)
    if compression_state is not None:
        state = state._replace(compression_state=jax.tree.map(jnp.array, compression_state))
    step = jax.jit(make_train_step(apply_fn, opt, loss_fn=token_loss, metrics_fn=token_metrics,
                                   transform=transform, teacher=teacher), donate_argnums=0)
    data = batches(corpus.train, batch_size=cfg["batch_size"], seq_len=cfg["seq_len"], seed=seed)
    curve, seconds, done = [], 0.0, 0
    while done < steps:
        n = min(cfg["eval_every"], steps - done)
        t0 = time.time()
        state, metrics = fit(step, state, data, num_steps=n, teacher_variables=teacher_variables, desc=name,
                             progress=False)
        seconds += time.time() - t0
        done += n
        val = score(apply_fn, state, transform)
        curve.append({"step": done, "train_loss": metrics["loss"], "val_perplexity": val["perplexity"],
                      "val_bits_per_byte": val["bits_per_byte"]})
        print(f"{name}: step {done}/{steps} train loss {metrics['loss']:.4f} val ppl {val['perplexity']:.3f} "
              f"({val['bits_per_byte']:.3f} bits/byte) [{seconds:.0f}s]", flush=True)
    record = {"steps": steps, "lr": lr, "seed": seed, "train_seconds": round(seconds, 1),
              "ms_per_step": round(1000 * seconds / steps, 1), "validation": val, "curve": curve}
    if log is not None:
        log.append({"name": name, "steps": steps, "lr": lr, "seed": seed,
                    "validation_perplexity": val["perplexity"]})
    return state, record


def block_sparsity(view):
    """Fraction of exact zeros over the block kernels of a view."""
    from jaxcompress.core.rules import select

    chosen = jax.tree.leaves(select(view, BLOCK_KERNELS), is_leaf=lambda x: x is None)
    leaves = [np.asarray(w) for w, c in zip(jax.tree.leaves(view), chosen) if c]
    return float(sum((w == 0).sum() for w in leaves) / sum(w.size for w in leaves))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny models and corpus: a smoke check in under a minute")
    ap.add_argument("--out", default=None, help="output path without suffix (default experiments/results/"
                                                "transformer_lm, or transformer_lm_quick with --quick)")
    args = ap.parse_args()
    cfg = QUICK if args.quick else FULL
    out_path = Path(args.out or RESULTS / ("transformer_lm_quick" if args.quick else "transformer_lm"))
    t_start = time.time()
    corpus = load_python_corpus(max_bytes=cfg["max_bytes"])
    score = Scorer(corpus, cfg)
    T, tried, stages = cfg["seq_len"], [], {}
    tokens0 = jnp.zeros((1, T), jnp.int32)

    teacher_model = TransformerLM(vocab_size=256, max_len=T, **cfg["teacher"])
    student_model = TransformerLM(vocab_size=256, max_len=T, **cfg["student"])
    teacher_fn = linen_apply_fn(teacher_model, inputs="tokens")
    student_fn = linen_apply_fn(student_model, inputs="tokens")
    count = lambda p: int(sum(np.size(x) for x in jax.tree.leaves(p)))  # noqa: E731

    # 1. Teacher, on labels.
    t_params, t_state = split_variables(teacher_model.init(jax.random.key(100), tokens0))
    teacher_state, stages["teacher"] = train(
        "teacher", teacher_fn, t_params, t_state, cfg, corpus, score, steps=cfg["teacher_steps"], lr=cfg["teacher_lr"], seed=100, log=tried)
    teacher_variables = (teacher_state.params, teacher_state.model_state)
    finals = {"teacher": (teacher_fn, teacher_state, None)}

    # 2. Student on labels only, and 3. with token-level KD: same init, batches and steps.
    s_params, s_state = split_variables(student_model.init(jax.random.key(0), tokens0))
    state, stages["student_labels_only"] = train(
        "student labels only", student_fn, s_params, s_state, cfg, corpus, score, steps=cfg["student_steps"],
        lr=cfg["student_lr"], seed=0, log=tried)
    finals["student_labels_only"] = (student_fn, state, None)

    def kd_teacher(temperature):
        return Teacher(teacher_fn, functools.partial(kd_loss, temperature=temperature, kd_weight=cfg["kd_weight"],
                                                     ce_weight=cfg["ce_weight"]), labels="targets")

    kd_runs = {}
    for temperature in cfg["temperatures"]:
        state, record = train(
            f"student KD T={temperature:g}", student_fn, s_params, s_state, cfg, corpus, score, steps=cfg["student_steps"],
            lr=cfg["student_lr"], seed=0, teacher=kd_teacher(temperature), teacher_variables=teacher_variables,
            log=tried)
        tried[-1]["temperature"] = temperature
        kd_runs[temperature] = (state, {**record, "temperature": temperature})
    best_t = min(kd_runs, key=lambda t: kd_runs[t][1]["validation"]["perplexity"])
    kd_state, stages["student_kd"] = kd_runs[best_t]
    stages["student_kd"]["chosen_on_validation_from"] = {f"T={t:g}": r["validation"]["perplexity"]
                                                         for t, (_, r) in kd_runs.items()}
    finals["student_kd"] = (student_fn, kd_state, None)
    kd = kd_teacher(best_t)

    # 4. The distilled student pruned 50% (gradual), fine-tuned with the teacher.
    prune_t = compression("pruned", steps=cfg["prune_steps"])
    pruned_state, stages["student_kd_pruned50"] = train(
        "pruned 50%", student_fn, kd_state.params, kd_state.model_state, cfg, corpus, score, steps=cfg["prune_steps"], lr=cfg["prune_lr"], seed=1,
        transform=prune_t, teacher=kd, teacher_variables=teacher_variables, log=tried)
    tried[-1]["temperature"] = best_t
    stages["student_kd_pruned50"]["block_kernel_sparsity"] = block_sparsity(
        jax.jit(prune_t.apply)(pruned_state.params, pruned_state.compression_state))
    finals["student_kd_pruned50"] = (student_fn, pruned_state, prune_t)

    # 5. W8A8: the masks kept, 8-bit weights, activations calibrated on training batches, fine-tuned.
    w8a8_t = compression("w8a8", masks=pruned_state.compression_state.masks)
    start = w8a8_t.init(pruned_state.params)
    view = jax.jit(w8a8_t.apply)(pruned_state.params, start)
    calibration = [sample_windows(corpus.train, batch_size=cfg["batch_size"], seq_len=T,
                                  rng=np.random.default_rng(1000 + i)) for i in range(cfg["calibration_batches"])]
    calibrated = calibrate_activations(w8a8_t, start, student_fn, view, pruned_state.model_state, calibration)
    ptq = score(student_fn, init_train_state(pruned_state.params, optax.sgd(0.0), transform=w8a8_t,
                                             model_state=pruned_state.model_state)._replace(compression_state=calibrated),
                w8a8_t)
    print(f"W8A8 before fine-tuning: val ppl {ptq['perplexity']:.3f}", flush=True)
    w8a8_state, stages["student_kd_pruned50_w8a8"] = train(
        "W8A8", student_fn, pruned_state.params, pruned_state.model_state, cfg, corpus, score, steps=cfg["w8a8_steps"],
        lr=cfg["w8a8_lr"], seed=2, transform=w8a8_t, teacher=kd, teacher_variables=teacher_variables, log=tried,
        compression_state=calibrated)
    tried[-1]["temperature"] = best_t
    stages["student_kd_pruned50_w8a8"]["validation_before_fine_tuning"] = ptq
    stages["student_kd_pruned50_w8a8"]["block_kernel_sparsity"] = block_sparsity(
        jax.jit(w8a8_t.apply)(w8a8_state.params, w8a8_state.compression_state))
    finals["student_kd_pruned50_w8a8"] = (student_fn, w8a8_state, w8a8_t)

    # Test split: each stage's final model, once.
    for name, (fn, st, tr) in finals.items():
        stages[name]["test"] = score(fn, st, tr, split="test")
    stages["teacher"]["params"] = count(teacher_state.params)
    for name in stages:
        if name != "teacher":
            stages[name]["params"] = count(s_params)

    record = {
        "experiment": "Byte-level LM on the Python standard library: teacher -> KD student -> 50% pruned -> W8A8",
        "quick": args.quick,
        "corpus": {"python_version": corpus.python_version, "files_sha256": corpus.files_sha256,
                   "sha256": dict(corpus.sha256), "max_bytes": cfg["max_bytes"],
                   "files": {s: len(corpus.files[s]) for s in ("train", "validation", "test")},
                   "bytes": {s: int(len(getattr(corpus, s))) for s in ("train", "validation", "test")}},
        "config": {**cfg, "optimizer": "clip_by_global_norm(1.0) then Adam, warmup (min(100, steps/10)) + cosine "
                                        "decay to lr/10", "kd_loss": f"kd_weight {cfg['kd_weight']}, ce_weight "
                                        f"{cfg['ce_weight']}, temperature chosen on validation", "dropout": 0.0,
                   "evaluation": "eval_windows: every next byte of the split once, non-overlapping windows of "
                                 "seq_len (a byte has 0..seq_len-1 bytes of context)"},
        "chosen_temperature": best_t,
        "configurations_tried": tried,
        "stages": stages,
        "wall_seconds": round(time.time() - t_start, 1),
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count(),
                        "python": platform.python_version(), "cpu_count": __import__("os").cpu_count()},
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    out_path.with_suffix(".md").write_text(markdown(record) + "\n")
    print(markdown(record))


LABELS = {
    "teacher": "teacher (labels)",
    "student_labels_only": "student, labels only (baseline)",
    "student_kd": "student, token-level KD",
    "student_kd_pruned50": "KD student, 50% of block kernels pruned, KD fine-tuned",
    "student_kd_pruned50_w8a8": "... then W8A8 (8-bit weights per channel, 8-bit calibrated activations), KD fine-tuned",
}


def markdown(r):
    cfg, st, c = r["config"], r["stages"], r["corpus"]
    kd_vs = st["student_kd"]["validation"]["perplexity"] - st["student_labels_only"]["validation"]["perplexity"]
    kd_test = st["student_kd"]["test"]["perplexity"] - st["student_labels_only"]["test"]["perplexity"]
    lines = [
        "# Byte-level Transformer LM on the Python standard library: KD, 50% pruning, W8A8",
        "",
        *(["**Quick smoke run (tiny models, 50 kB per split): not a result.**", ""] if r["quick"] else []),
        f"Corpus: the standard library of Python {c['python_version']} (`load_python_corpus`), split by file: "
        + ", ".join(f"{s} {c['files'][s]} files / {c['bytes'][s]:,} bytes" for s in c["files"])
        + f". File-list SHA-256 `{c['files_sha256'][:16]}…`; split SHA-256 "
        + ", ".join(f"{s} `{h[:16]}…`" for s, h in c["sha256"].items()) + " (full digests in the JSON).",
        "",
        f"Models: `TransformerLM` teacher dim {cfg['teacher']['dim']} depth {cfg['teacher']['depth']} "
        f"({st['teacher']['params']:,} params), student dim {cfg['student']['dim']} depth {cfg['student']['depth']} "
        f"({st['student_kd']['params']:,} params); byte vocabulary 256, context {cfg['seq_len']}, batch "
        f"{cfg['batch_size']}. Both students share initialisation, batches and {cfg['student_steps']} steps; KD is "
        f"`kd_loss(kd_weight={cfg['kd_weight']}, ce_weight={cfg['ce_weight']})` on every position, temperature "
        f"{r['chosen_temperature']:g} chosen on validation from {cfg['temperatures']}.",
        "",
        "Perplexity per byte (bits/byte = log2 of it) over every next byte of the split, scored in "
        f"non-overlapping windows of {cfg['seq_len']} bytes. Validation after each stage; test once per final model.",
        "",
        "| stage | steps | train s (with compilation) | ms/step | val perplexity | val bits/byte | test perplexity | test bits/byte |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in LABELS.items():
        s = st[name]
        lines.append(f"| {label} | {s['steps']} | {s['train_seconds']:.0f} | {s['ms_per_step']:.0f} | "
                     f"{s['validation']['perplexity']:.3f} | {s['validation']['bits_per_byte']:.3f} | "
                     f"{s['test']['perplexity']:.3f} | {s['test']['bits_per_byte']:.3f} |")
    w = st["student_kd_pruned50_w8a8"]
    verdict = ("The KD student had the lower perplexity" if kd_vs < 0
               else "The KD student did not have the lower perplexity")
    lines += [
        "",
        f"{verdict} on validation (perplexity {st['student_kd']['validation']['perplexity']:.3f} vs "
        f"{st['student_labels_only']['validation']['perplexity']:.3f}, difference {kd_vs:+.3f}; on test "
        f"{kd_test:+.3f}), same step budget (the KD steps also run the teacher's forward pass). One seed: "
        "this is a measurement, not a claim that KD is better, which would need >= 3 seeds.",
        f"Validation perplexity of KD students by temperature: "
        + ", ".join(f"{k} {v:.3f}" for k, v in st["student_kd"]["chosen_on_validation_from"].items()) + ".",
        f"Block-kernel sparsity of the pruned view: {st['student_kd_pruned50']['block_kernel_sparsity']:.3f} "
        f"(W8A8 view {w['block_kernel_sparsity']:.3f}). W8A8 right after calibration, before fine-tuning: validation "
        f"perplexity {w['validation_before_fine_tuning']['perplexity']:.3f}.",
        "Activation quantization covers the inputs of every Dense layer (attention projections, MLP, output layer); "
        "the attention score and value products and the embedding tables stay in float.",
        "",
        f"Wall time of the whole run: {r['wall_seconds'] / 60:.1f} min on {r['environment']['cpu_count']} CPU cores "
        f"({r['environment']['backend']}, jax {r['environment']['jax']}), shared with other work, so times are "
        "indicative. Every configuration trained is listed in the JSON (`configurations_tried`).",
        "",
        f"Run: `python experiments/transformer_lm.py{' --quick' if r['quick'] else ''}`",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
