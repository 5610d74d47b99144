"""A plain epoch loop over in-memory arrays, shared by the CLI and the experiments."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import numpy as np
from tqdm.auto import tqdm

from jaxcompress.data.batching import epochs as epoch_batches
from jaxcompress.data.batching import num_batches
from jaxcompress.train.state import TrainState


def fit(
    step: Callable,
    state: TrainState,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    batch_size: int,
    num_epochs: float,
    seed: int = 0,
    desc: str = "train",
    progress: bool = True,
    log_every: int = 50,
    teacher_variables=None,
) -> tuple[TrainState, dict]:
    """Runs a (jitted) train step over shuffled batches for ``num_epochs`` epochs.

    Args:
      step: ``(state, batch) -> (state, metrics)``, e.g. ``jax.jit(make_train_step(...))``.
      state: the initial :class:`~jaxcompress.train.state.TrainState`.
      images, labels: the training set.
      batch_size: examples per step.
      num_epochs: may be fractional (e.g. ``0.5`` runs half an epoch of steps).
      seed: shuffling seed (epoch ``e`` uses ``[seed, e]``).
      desc: progress bar label.
      progress: show a tqdm progress bar.
      log_every: steps between reads of the metrics (each read waits for the device).
      teacher_variables: passed to every step as its third argument (distillation).

    Returns:
      ``(state, last_metrics)`` with the metrics as Python floats.
    """
    if num_epochs <= 0:
        raise ValueError(f"num_epochs must be > 0, got {num_epochs}.")
    per_epoch = num_batches(len(labels), batch_size)
    total = max(int(round(num_epochs * per_epoch)), 1)
    batches = epoch_batches(images, labels, batch_size, seed=seed, num_epochs=int(np.ceil(num_epochs)))
    metrics = {}
    bar = tqdm(total=total, desc=desc, disable=not progress, leave=False, mininterval=1.0)
    for i, batch in zip(range(total), batches):
        state, metrics = step(state, batch) if teacher_variables is None else step(state, batch, teacher_variables)
        if (i + 1) % log_every == 0 or i + 1 == total:
            bar.set_postfix({k: f"{float(v):.4f}" for k, v in metrics.items()})
        bar.update(1)
    bar.close()
    return state, {k: float(v) for k, v in jax.device_get(metrics).items()}
