"""The end-to-end demo: teacher -> distilled student -> pruned -> int8 QAT, with a report.

Every stage uses the library's public pieces (models, transforms, KD loss, train step); the
recipe only wires them and measures.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
import time
from typing import Callable, Optional

import jax
import numpy as np
import optax

from jaxcompress.core.transform import Transform, chain
from jaxcompress.data.batching import epochs as epoch_batches
from jaxcompress.data.batching import num_batches
from jaxcompress.data import DATA_DIR_ENV, Dataset, load_dataset
from jaxcompress.distill.losses import kd_loss
from jaxcompress.export.artifact import save
from jaxcompress.export.reader import load
from jaxcompress.export.size import size_report
from jaxcompress.models.cnn import student_cnn, teacher_cnn
from jaxcompress.prune import erk_sparsities, fixed_masks, pruning, sparsity_report, sparsity_rules
from jaxcompress.prune.schedules import polynomial_schedule
from jaxcompress.quant.weights import weight_quantization
from jaxcompress.train.loop import fit
from jaxcompress.train.parallel import data_parallel, per_device_batch_size, step_axis_name
from jaxcompress.train.state import init_train_state, linen_apply_fn, split_variables
from jaxcompress.train.step import Teacher, evaluate, make_eval_step, make_train_step


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (defaults reach the targets on MNIST in a few CPU minutes).

    Epoch counts may be fractional; the stage lengths and ``batch_size`` left at ``None`` take the
    values of :data:`STAGE_DEFAULTS` for the data set actually loaded (the bundled digits set, when
    the demo falls back to it, trains more epochs than MNIST), and the report records the values
    used. ``train_subset``/``test_subset`` cut the data (smoke tests). ``parallel`` (``'none'``,
    ``'pmap'``, ``'shard'``) trains data-parallel on ``devices`` devices (default all);
    ``batch_size`` is then the global batch, split evenly over the devices.
    """

    dataset: str = "mnist"
    data_dir: Optional[str] = None
    batch_size: Optional[int] = None
    learning_rate: float = 1e-3
    teacher_epochs: Optional[float] = None
    student_epochs: Optional[float] = None
    prune_epochs: Optional[float] = None
    qat_epochs: Optional[float] = None
    sparsity: float = 0.9
    bits: int = 8
    temperature: float = 4.0
    kd_weight: float = 0.9
    ce_weight: float = 0.1
    seed: int = 0
    train_subset: Optional[int] = None
    test_subset: Optional[int] = None
    progress: bool = True
    parallel: str = "none"
    devices: Optional[int] = None


#: Stage lengths and batch size per data set, for the :class:`DemoConfig` settings left at ``None``
#: (other data sets: MNIST's). The small bundled digits set (1,437 training images) trains more epochs.
STAGE_DEFAULTS = {
    "mnist": dict(teacher_epochs=2.0, student_epochs=1.5, prune_epochs=1.25, qat_epochs=0.5, batch_size=128),
    "digits": dict(teacher_epochs=40.0, student_epochs=40.0, prune_epochs=30.0, qat_epochs=10.0, batch_size=64),
}


def _load(config: DemoConfig, log: Callable[[str], None]) -> Dataset:
    explicit = config.data_dir is not None or os.environ.get(DATA_DIR_ENV)
    name = "mnist" if config.dataset == "digits" else config.dataset
    if config.dataset == "digits":
        return load_dataset("digits")
    return load_dataset(name, config.data_dir, download=True, fallback_to_digits=not explicit, log=log)


def _stage_record(name, accuracy, view, seconds, artifact, *, description=None, weight_bits=32):
    """The stage's report row; the model is saved to ``artifact`` and its file size recorded."""
    saved = save(artifact, view, description)
    size = size_report(view, description, artifact=saved)
    return {
        "name": name,
        "test_accuracy": accuracy,
        "params": size.params,
        "nonzero_params": size.nonzero_params,
        "weight_bits": weight_bits,
        "bytes_float32": size.bytes_float32,
        "bytes_compressed": size.bytes_compressed,
        "file_bytes": size.file_bytes,
        "artifact": os.path.basename(artifact),
        "seconds": round(seconds, 2),
    }


#: Density multipliers of the small, sensitive layers (first and last layers keep more weights),
#: a per-layer allocation by sensitivity in the spirit of Han et al. (2015); other layers: 1.
DENSITY_RULES = [("^conv1/", 5.0), ("^conv2/", 2.0), ("^head/", 3.0), (".*", True)]


def run_demo(
    config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print, *, artifact_dir: Optional[str] = None
) -> dict:
    """Trains a teacher, distills a student, prunes it, quantizes it, and reports every stage.

    Each stage's model is saved as a packed artifact (:func:`jaxcompress.export.save`) and its
    file size reported; the final model's test accuracy is measured again on the weights loaded
    back from its file.

    Args:
      config: a :class:`DemoConfig`.
      log: where progress messages go.
      artifact_dir: where the stage artifacts go (default: a temporary directory, removed after).

    Returns:
      The report: ``{"dataset", "source", "stages": [...], "config"}``; each stage holds
      ``name, test_accuracy, params, nonzero_params, weight_bits, bytes_float32,
      bytes_compressed, file_bytes, artifact, seconds`` (and ``sparsity`` for the pruned stages,
      ``test_accuracy_from_file`` for the last).
    """
    if artifact_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_demo(config, log, artifact_dir=tmp)
    os.makedirs(artifact_dir, exist_ok=True)
    artifact = lambda i: os.path.join(artifact_dir, f"stage{i}.npz")  # noqa: E731
    data = _load(config, log)
    defaults = STAGE_DEFAULTS.get(data.name, STAGE_DEFAULTS["mnist"])
    config = dataclasses.replace(config, **{k: v for k, v in defaults.items() if getattr(config, k) is None})
    xs, ys = data.train_images, data.train_labels
    xt, yt = data.test_images, data.test_labels
    if config.train_subset:
        xs, ys = xs[: config.train_subset], ys[: config.train_subset]
    if config.test_subset:
        xt, yt = xt[: config.test_subset], yt[: config.test_subset]
    log(f"data: {data.name} from {data.source}: {len(ys)} train / {len(yt)} test images {xs.shape[1:]}")

    key = jax.random.key(config.seed)
    k_teacher, k_student = jax.random.split(key)
    eval_bs = min(1000, len(yt))
    stages: list[dict] = []

    axis_name = step_axis_name(config.parallel)
    if config.parallel != "none":
        n = len(jax.devices()) if config.devices is None else config.devices
        per_device_batch_size(config.batch_size, n)

    def run_stage(name, model_apply, state, step, epochs, seed, transform: Optional[Transform] = None, teacher=None):
        t0 = time.time()
        dp = data_parallel(step, parallel=config.parallel, devices=config.devices)
        num_steps = max(int(round(epochs * num_batches(len(ys), config.batch_size))), 1)
        batches = epoch_batches(xs, ys, config.batch_size, seed=seed, num_epochs=int(np.ceil(epochs)))
        state, metrics = fit(dp.step, dp.put_state(state), batches, num_steps=num_steps, desc=name,
                             teacher_variables=None if teacher is None else dp.put_teacher(teacher),
                             progress=config.progress)
        state = dp.get_state(state)
        ev = evaluate(jax.jit(make_eval_step(model_apply, transform=transform)), state,
                      {"image": xt, "label": yt}, batch_size=eval_bs)
        log(f"{name}: test accuracy {ev['accuracy']:.4f} (train loss {metrics['loss']:.4f}) "
            f"in {time.time() - t0:.1f} s")
        return state, ev["accuracy"], time.time() - t0

    # 1. Teacher.
    teacher = teacher_cnn(data.num_classes)
    t_apply = linen_apply_fn(teacher)
    t_params, t_mstate = split_variables(teacher.init(k_teacher, xs[:1]))
    opt = optax.adam(config.learning_rate)
    state = init_train_state(t_params, opt, model_state=t_mstate, rng=config.seed)
    state, acc, secs = run_stage("teacher", t_apply, state, make_train_step(t_apply, opt, axis_name=axis_name),
                                 config.teacher_epochs, config.seed)
    stages.append(_stage_record("teacher", acc, state.params, secs, artifact(1)))
    teacher_variables = (state.params, state.model_state)

    # 2. Student distilled from the teacher (Hinton et al. 2015).
    student = student_cnn(data.num_classes)
    s_apply = linen_apply_fn(student)
    s_params, s_mstate = split_variables(student.init(k_student, xs[:1]))
    kd = Teacher(t_apply, functools.partial(kd_loss, temperature=config.temperature,
                                            kd_weight=config.kd_weight, ce_weight=config.ce_weight))

    def student_stage(name, params, epochs, seed, transform, lr):
        opt = optax.adam(lr)
        st = init_train_state(params, opt, transform=transform, model_state=s_mstate, rng=seed)
        step = make_train_step(s_apply, opt, transform=transform, teacher=kd, axis_name=axis_name)
        return run_stage(name, s_apply, st, step, epochs, seed, transform, teacher=teacher_variables)

    state, acc, secs = student_stage("student (distilled)", s_params, config.student_epochs,
                                     config.seed + 1, None, config.learning_rate)
    stages.append(_stage_record("student (distilled)", acc, state.params, secs, artifact(2)))

    # 3. Gradual magnitude pruning (Zhu & Gupta 2017) while fine-tuning with the teacher.
    steps = max(int(round(config.prune_epochs * num_batches(len(ys), config.batch_size))), 1)
    end = max(int(0.6 * steps), 1)
    rules = sparsity_rules(erk_sparsities(state.params, config.sparsity, rules=DENSITY_RULES, power=0.0))
    pruner = pruning(
        config.sparsity, schedule=polynomial_schedule(begin_step=0, end_step=end, frequency=max(end // 10, 1)),
        rules=rules,
    )
    state, acc, secs = student_stage("student pruned", state.params, config.prune_epochs,
                                     config.seed + 2, pruner, config.learning_rate / 2)
    masks = state.compression_state.masks
    view = pruner.apply(state.params, state.compression_state)
    record = _stage_record(f"student pruned {config.sparsity:.0%}", acc, view, secs, artifact(3),
                           description=pruner.describe(state.params, state.compression_state))
    record["sparsity"] = sparsity_report(view, masks)[1].sparsity
    stages.append(record)

    # 4. int8 (or config.bits) weight QAT, keeping the masks.
    qat = chain(fixed_masks(masks), weight_quantization(config.bits))
    state, acc, secs = student_stage(f"student pruned + int{config.bits} QAT", view, config.qat_epochs,
                                     config.seed + 3, qat, config.learning_rate / 4)
    view = qat.apply(state.params, state.compression_state)
    record = _stage_record(f"student pruned {config.sparsity:.0%} + int{config.bits}", acc, view, secs, artifact(4),
                           description=qat.describe(state.params, state.compression_state), weight_bits=config.bits)
    record["sparsity"] = sparsity_report(view, masks)[1].sparsity
    loaded, _ = load(artifact(4), like=view)  # the model as a user gets it from the file
    record["test_accuracy_from_file"] = evaluate(
        jax.jit(make_eval_step(s_apply)), state._replace(params=loaded), {"image": xt, "label": yt}, batch_size=eval_bs,
    )["accuracy"]
    log(f"final model loaded back from {record['artifact']} ({record['file_bytes']:,} bytes): "
        f"test accuracy {record['test_accuracy_from_file']:.4f}")
    stages.append(record)
    return {
        "dataset": data.name,
        "source": data.source,
        "stages": stages,
        "config": dataclasses.asdict(config),
        "environment": {"jax": jax.__version__, "backend": jax.default_backend(), "devices": jax.device_count()},
    }
