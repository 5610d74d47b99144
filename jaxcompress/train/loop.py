"""A plain training loop over any iterable of batches, shared by the CLI and the experiments."""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable

import jax
from tqdm.auto import tqdm

from jaxcompress.core.validation import check_int
from jaxcompress.train.state import TrainState


def fit(
    step: Callable,
    state: TrainState,
    batches: Iterable[dict],
    *,
    num_steps: int,
    teacher_variables: Any = None,
    desc: str = "train",
    progress: bool = True,
    log_every: int = 50,
) -> tuple[TrainState, dict]:
    """Runs a (jitted) train step over ``num_steps`` batches.

    Args:
      step: ``(state, batch[, teacher_variables]) -> (state, metrics)``, e.g.
        ``jax.jit(make_train_step(...), donate_argnums=0)`` or ``data_parallel(...).step``.
      state: the initial :class:`~jaxcompress.train.state.TrainState`.
      batches: an iterable of batch dicts, e.g.
        :func:`~jaxcompress.data.batching.epochs` (images) or
        :func:`~jaxcompress.data.text.sample_windows` calls (tokens); at least ``num_steps`` long.
      num_steps: steps to run.
      teacher_variables: passed to every step as its third argument (distillation).
      desc: progress bar label.
      progress: show a tqdm progress bar.
      log_every: steps between reads of the metrics (each read waits for the device).

    Returns:
      ``(state, last_metrics)`` with the metrics as Python floats; for a step built with
      ``skip_nonfinite=True`` also ``skipped_steps``, the number of steps skipped in this run.

    Raises:
      ValueError: ``num_steps < 1``, or ``batches`` ran out before ``num_steps``.
    """
    num_steps = check_int("num_steps", num_steps, minimum=1)
    extra = () if teacher_variables is None else (teacher_variables,)
    metrics: dict = {}
    skipped = None
    done = 0
    bar = tqdm(total=num_steps, desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for batch in itertools.islice(batches, num_steps):  # takes no batch past the last step from ``batches``
        state, metrics = step(state, batch, *extra)
        if "skipped" in metrics:  # summed on the device: no wait per step
            skipped = metrics["skipped"] if skipped is None else skipped + metrics["skipped"]
        done += 1
        if done % log_every == 0 or done == num_steps:
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()})
        bar.update(1)
    bar.close()
    if done < num_steps:
        raise ValueError(f"batches ran out after {done} of num_steps={num_steps} steps; give a longer iterable.")
    out = {k: float(v) for k, v in jax.device_get(metrics).items()}
    if skipped is not None:
        out["skipped_steps"] = int(jax.device_get(skipped))
    return state, out
