"""Sparsity schedules: when masks are recomputed and to which sparsity."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_fraction, check_int, check_positive


class PolynomialSchedule(NamedTuple):
    """Gradual pruning of Zhu & Gupta (2017), "To prune, or not to prune".

    ``s_t = s_f + (s_i - s_f) * (1 - (t - t0) / (n * dt)) ** power`` for ``t0 <= t <= t0 + n*dt``,
    with ``power = 3`` in the paper. Before ``t0`` nothing is pruned; after ``t0 + n*dt`` the
    sparsity stays at ``s_f``. Masks are recomputed only at ``t0, t0 + dt, ...`` and at the end step.

    Attributes:
      initial_sparsity: ``s_i``.
      begin_step: ``t0``.
      end_step: ``t0 + n * dt``.
      frequency: ``dt``, steps between mask updates.
      power: the exponent (3 in the paper).
    """

    initial_sparsity: float = 0.0
    begin_step: int = 0
    end_step: int = 0
    frequency: int = 100
    power: float = 3.0

    def sparsity(self, step, final_sparsity) -> jax.Array:
        """The target sparsity at ``step`` for a leaf whose final sparsity is ``final_sparsity``."""
        step = jnp.asarray(step, jnp.float32)
        span = max(self.end_step - self.begin_step, 1)
        progress = jnp.clip((step - self.begin_step) / span, 0.0, 1.0)
        progress = jnp.where(step >= self.end_step, 1.0, progress)  # one-shot: begin == end
        s = final_sparsity + (self.initial_sparsity - final_sparsity) * (1.0 - progress) ** self.power
        return jnp.where(step < self.begin_step, 0.0, s)

    def is_update_step(self, step) -> jax.Array:
        """Whether masks are recomputed at ``step``."""
        step = jnp.asarray(step, jnp.int32)
        in_range = (step >= self.begin_step) & (step <= self.end_step)
        on_grid = (step - self.begin_step) % self.frequency == 0
        return in_range & (on_grid | (step == self.end_step))


def polynomial_schedule(
    *, begin_step: int = 0, end_step: int, frequency: int = 100, initial_sparsity: float = 0.0, power: float = 3.0
) -> PolynomialSchedule:
    """Builds a validated :class:`PolynomialSchedule`.

    Args:
      begin_step: first step at which masks are computed (``t0``).
      end_step: step at which the final sparsity is reached (``t0 + n*dt``); ``>= begin_step``.
      frequency: steps between mask updates (``dt``), ``>= 1``.
      initial_sparsity: sparsity at ``begin_step`` (``s_i``), in ``[0, 1)``.
      power: exponent of the decay, ``> 0`` (3 in Zhu & Gupta).

    Raises:
      ValueError / TypeError: naming the offending argument.

    Example:
      >>> s = polynomial_schedule(begin_step=0, end_step=100, frequency=10)
      >>> round(float(s.sparsity(50, 0.8)), 4)   # 0.8 * (1 - 0.5**3)
      0.7
    """
    begin_step = check_int("begin_step", begin_step)
    end_step = check_int("end_step", end_step)
    if end_step < begin_step:
        raise ValueError(f"end_step ({end_step}) must be >= begin_step ({begin_step}).")
    frequency = check_int("frequency", frequency, minimum=1)
    initial_sparsity = check_fraction("initial_sparsity", initial_sparsity)
    power = check_positive("power", power)
    return PolynomialSchedule(initial_sparsity, begin_step, end_step, frequency, power)


def one_shot_schedule(step: int = 0) -> PolynomialSchedule:
    """Prune once, to the final sparsity, at ``step`` (at ``init`` when ``step == 0``)."""
    step = check_int("step", step)
    return PolynomialSchedule(0.0, step, step, 1, 3.0)


class IterativeSchedule(NamedTuple):
    """Iterative prune-and-retrain: each round removes ``rate`` of the weights still alive.

    Round ``r = 1, 2, ...`` starts at ``begin_step + (r - 1) * round_steps`` and prunes to
    ``1 - (1 - rate) ** r``, capped at the final sparsity (reached exactly by the last round);
    between rounds the network retrains with its masks fixed (Han et al. 2015; Frankle & Carbin 2019
    prune 20% per round).

    Attributes:
      rate: fraction of the surviving weights removed per round, in ``(0, 1)``.
      begin_step: step of the first round.
      round_steps: steps of retraining between rounds.
      num_rounds: number of rounds; the last one reaches the final sparsity.
    """

    rate: float = 0.2
    begin_step: int = 0
    round_steps: int = 100
    num_rounds: int = 1

    @property
    def end_step(self) -> int:
        return self.begin_step + (self.num_rounds - 1) * self.round_steps

    def sparsity(self, step, final_sparsity) -> jax.Array:
        """The target sparsity at ``step`` for a leaf whose final sparsity is ``final_sparsity``."""
        step = jnp.asarray(step, jnp.int32)
        rounds = jnp.clip((step - self.begin_step) // self.round_steps + 1, 0, self.num_rounds)
        s = jnp.minimum(1.0 - (1.0 - self.rate) ** rounds.astype(jnp.float32), final_sparsity)
        return jnp.where(step >= self.end_step, final_sparsity, jnp.where(step < self.begin_step, 0.0, s))

    def is_update_step(self, step) -> jax.Array:
        """Whether masks are recomputed at ``step`` (the first step of each round)."""
        step = jnp.asarray(step, jnp.int32)
        offset = step - self.begin_step
        return (offset >= 0) & (offset % self.round_steps == 0) & (step <= self.end_step)


def iterative_schedule(*, rate: float = 0.2, round_steps: int, num_rounds: int, begin_step: int = 0) -> IterativeSchedule:
    """Builds a validated :class:`IterativeSchedule` (prune ``rate`` of the survivors per round).

    Args:
      rate: fraction of the remaining weights removed per round, in ``(0, 1)``.
      round_steps: retraining steps between rounds, ``>= 1``.
      num_rounds: rounds, ``>= 1``; the last one reaches the final sparsity.
      begin_step: step of the first round.

    Raises:
      ValueError / TypeError: naming the offending argument.

    Example:
      >>> s = iterative_schedule(rate=0.5, round_steps=10, num_rounds=3)
      >>> [round(float(s.sparsity(t, 0.9)), 3) for t in (0, 10, 20)]
      [0.5, 0.75, 0.9]
    """
    rate = check_fraction("rate", rate)
    if rate == 0.0:
        raise ValueError("rate must be in (0, 1), got 0.0: each round must prune something, e.g. rate=0.2.")
    round_steps = check_int("round_steps", round_steps, minimum=1)
    num_rounds = check_int("num_rounds", num_rounds, minimum=1)
    begin_step = check_int("begin_step", begin_step)
    return IterativeSchedule(rate, begin_step, round_steps, num_rounds)
