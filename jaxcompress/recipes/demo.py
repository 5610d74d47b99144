"""The end-to-end demo: the shipped ``demo`` recipe (teacher -> distilled student -> pruned ->
int8 QAT -> export), run by the recipe runner with :class:`DemoConfig`'s settings mapped onto it."""
from __future__ import annotations

import dataclasses
import tempfile
from typing import Callable, Optional

from jaxcompress.recipes.runner import run_recipe
from jaxcompress.recipes.tasks import load_split
from jaxcompress.recipes.schema import load_recipe


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """Settings of :func:`run_demo` (defaults reach the targets on MNIST in a few CPU minutes).

    Epoch counts may be fractional; the stage lengths and ``batch_size`` left at ``None`` take the
    values of :data:`STAGE_DEFAULTS` for the data set actually loaded (the bundled digits set, when
    the demo falls back to it, trains more epochs than MNIST), and the report's ``config`` (the
    recipe that ran) records the values used. ``train_subset``/``test_subset`` cut the data (smoke
    tests); the validation split (10%) is carved from what remains of the training set.
    ``parallel`` (``'none'``, ``'pmap'``, ``'shard'``) trains data-parallel on ``devices`` devices
    (default all); ``batch_size`` is then the global batch, split evenly over the devices.
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

#: Density multipliers of the small, sensitive layers (first and last layers keep more weights),
#: a per-layer allocation by sensitivity in the spirit of Han et al. (2015); other layers: 1.
#: The shipped recipe's prune stage holds the same rules (``density_rules``).
DENSITY_RULES = [("^conv1/", 5.0), ("^conv2/", 2.0), ("^head/", 3.0), (".*", True)]

_EPOCHS = ("teacher_epochs", "student_epochs", "prune_epochs", "qat_epochs")


def demo_recipe(config: DemoConfig = DemoConfig(), loaded_dataset: Optional[str] = None) -> dict:
    """The shipped ``demo`` recipe with ``config`` mapped onto it.

    ``loaded_dataset`` is the data set actually loaded (``'digits'`` after a fallback), which
    chooses the :data:`STAGE_DEFAULTS` for the settings left at ``None``.

    Example:
      >>> r = demo_recipe(DemoConfig(sparsity=0.8, bits=4))
      >>> [s.get("label", s["name"]) for s in r["stages"]]
      ['teacher', 'student (distilled)', 'student pruned 80%', 'student pruned 80% + int4', 'export']
    """
    recipe = load_recipe("demo")
    name = loaded_dataset or config.dataset
    defaults = STAGE_DEFAULTS.get(name, STAGE_DEFAULTS["mnist"])
    value = lambda k: defaults[k] if getattr(config, k) is None else getattr(config, k)  # noqa: E731
    recipe["seeds"] = [config.seed]
    recipe["parallel"], recipe["devices"] = config.parallel, config.devices
    recipe["data"].update(name=config.dataset, dir=config.data_dir, train_subset=config.train_subset,
                          test_subset=config.test_subset, batch_size=value("batch_size"))
    teacher, student, pruned, quantized, _ = recipe["stages"]
    for stage, epochs, lr in zip((teacher, student, pruned, quantized), _EPOCHS, (1, 1, 2, 4)):
        stage.update(epochs=value(epochs), learning_rate=config.learning_rate / lr)
    for stage in (student, pruned, quantized):
        stage.update(temperature=config.temperature, kd_weight=config.kd_weight, ce_weight=config.ce_weight)
    pruned.update(sparsity=config.sparsity, label=f"student pruned {config.sparsity:.0%}")
    quantized.update(bits=config.bits, label=f"student pruned {config.sparsity:.0%} + int{config.bits}")
    return recipe


def run_demo(
    config: DemoConfig = DemoConfig(), log: Callable[[str], None] = print, *, artifact_dir: Optional[str] = None
) -> dict:
    """Trains a teacher, distills a student, prunes it, quantizes it, and reports every stage.

    Runs :func:`demo_recipe` with :func:`~jaxcompress.recipes.runner.run_recipe`: each stage's
    model is saved as a packed artifact (:func:`jaxcompress.export.save`) and its file size
    reported; the final model's test accuracy is measured again on the weights loaded back from
    its file (``test_accuracy_from_file``).

    Args:
      config: a :class:`DemoConfig`.
      log: where progress messages go.
      artifact_dir: the run's output directory (default: a temporary directory, removed after);
        a re-run in the same directory resumes from its checkpoints.

    Returns:
      The report of :func:`~jaxcompress.recipes.runner.run_recipe`; its four stage rows are
      ``teacher``, ``student (distilled)``, ``student pruned S%`` and ``student pruned S% + intB``.
    """
    if artifact_dir is None:
        with tempfile.TemporaryDirectory() as tmp:
            return run_demo(config, log, artifact_dir=tmp)
    recipe = demo_recipe(config)
    split = load_split(recipe["data"], log)
    if split.name != config.dataset:  # the fallback to the bundled digits: their stage lengths
        recipe = demo_recipe(config, split.name)
    return run_recipe(recipe, artifact_dir, progress=config.progress, log=log, split=split)
