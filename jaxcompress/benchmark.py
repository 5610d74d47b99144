"""Timing two programs fairly on a noisy machine: interleaved blocks, an A/A control, intervals.

Wall-clock ratios on a shared machine drift by several percent between runs, so one ratio of
two medians says little. :func:`compare` times every program in the same process, in blocks
whose order is shuffled, and always times the baseline twice under two names: the ratio of the
two identical baselines (the A/A control) shows how large a difference the noise alone makes.
Each ratio comes with a bootstrap interval over blocks (paired: a block's programs ran
back to back), and a ratio is only called a result when its interval excludes the bar it is
compared with (:func:`verdict`). XLA's own cost analysis of the compiled programs
(:func:`cost_analysis`: FLOPs, bytes accessed) does not depend on the machine's load and is
reported beside the times.
"""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

from jaxcompress.core.validation import check_int

#: The name under which :func:`compare` times the baseline a second time (the A/A control).
CONTROL = "baseline_control"


def _interval(a: np.ndarray, b: np.ndarray, rng: np.random.Generator, resamples: int, level: float):
    """Ratio of medians ``median(a) / median(b)`` and its percentile-bootstrap interval over blocks."""
    idx = rng.integers(0, len(a), size=(resamples, len(a)))
    boot = np.median(a[idx], axis=1) / np.median(b[idx], axis=1)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(boot, [tail, 100 - tail])
    return float(np.median(a) / np.median(b)), float(lo), float(hi)


def compare(
    programs: Mapping[str, Callable[[], Any]],
    *,
    baseline: str,
    blocks: int = 30,
    calls: int = 5,
    warmup: int = 2,
    seed: int = 0,
    resamples: int = 2000,
    level: float = 0.95,
) -> dict:
    """Times ``programs`` interleaved in shuffled blocks, with an A/A control of ``baseline``.

    Args:
      programs: ``{name: fn}``; each ``fn()`` runs one unit of work (e.g. one train step on state
        it keeps itself); its result is waited for with :func:`jax.block_until_ready`.
      baseline: the name in ``programs`` every other program is compared with; it is also timed
        a second time as :data:`CONTROL`.
      blocks: blocks; in each, every program runs ``calls`` times in a freshly shuffled order.
      calls: consecutive calls per program per block (their mean is one sample).
      warmup: calls per program before timing (compilation, caches).
      seed: seed of the shuffling and of the bootstrap.
      resamples: bootstrap resamples of the blocks.
      level: the interval's coverage.

    Returns:
      ``{'seconds': {name: [per-call seconds per block]}, 'median_s': {name: s}, 'ratios':
      {name: {'ratio', 'low', 'high'}} (vs the baseline; CONTROL's entry is the A/A ratio),
      'level', 'blocks', 'calls', 'order', 'load': {'before', 'after', 'cpus'}}``.

    Raises:
      ValueError: ``baseline`` not in ``programs``, a name equal to :data:`CONTROL`, bad counts.

    Example:
      >>> import jax.numpy as jnp
      >>> x = jnp.ones((64, 64))
      >>> r = compare({'a': lambda: x @ x, 'b': lambda: x @ x}, baseline='a', blocks=4, calls=2)
      >>> sorted(r['ratios']), r['blocks']
      (['b', 'baseline_control'], 4)
    """
    if baseline not in programs:
        raise ValueError(f"baseline {baseline!r} is not one of the programs {sorted(programs)}.")
    if CONTROL in programs:
        raise ValueError(f"{CONTROL!r} is reserved for the A/A control; rename that program.")
    blocks, calls = check_int("blocks", blocks, minimum=1), check_int("calls", calls, minimum=1)
    warmup = check_int("warmup", warmup, minimum=0)
    runs = dict(programs)
    runs[CONTROL] = programs[baseline]
    names = list(runs)
    for name in names:
        for _ in range(warmup):
            jax.block_until_ready(runs[name]())
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = []
    load_before = os.getloadavg()
    for _ in range(blocks):
        perm = [names[i] for i in rng.permutation(len(names))]
        order.append(perm)
        for name in perm:
            fn = runs[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / calls)
    load_after = os.getloadavg()
    base = np.asarray(samples[baseline])
    ratios = {}
    for name in names:
        if name == baseline:
            continue
        r, lo, hi = _interval(np.asarray(samples[name]), base, rng, resamples, level)
        ratios[name] = {"ratio": r, "low": lo, "high": hi}
    return {
        "seconds": samples,
        "median_s": {n: float(np.median(v)) for n, v in samples.items()},
        "ratios": ratios,
        "level": level,
        "blocks": blocks,
        "calls": calls,
        "order": order,
        "load": {"before": list(load_before), "after": list(load_after), "cpus": os.cpu_count()},
    }


def verdict(ratio: Mapping[str, float], bar: float, *, lower_is_better: bool = True) -> str:
    """``'meets'``, ``'misses'`` or ``'inconclusive'``: whether ``ratio``'s interval excludes ``bar``.

    Example:
      >>> verdict({'ratio': 0.9, 'low': 0.85, 'high': 0.95}, 1.0)
      'meets'
      >>> verdict({'ratio': 0.98, 'low': 0.9, 'high': 1.05}, 1.0)
      'inconclusive'
    """
    lo, hi = float(ratio["low"]), float(ratio["high"])
    below, above = hi < bar, lo > bar
    if not (below or above):
        return "inconclusive"
    return "meets" if below == lower_is_better else "misses"


def cost_analysis(fn: Callable, *args: Any) -> dict:
    """XLA's cost analysis of ``jax.jit(fn)`` compiled for ``args``: ``{'flops', 'bytes_accessed'}``.

    Example:
      >>> import jax.numpy as jnp
      >>> cost_analysis(lambda a, b: a @ b, jnp.ones((8, 4)), jnp.ones((4, 2)))['flops']
      128.0
    """
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(analysis, (list, tuple)):  # older JAX: one dict per computation
        analysis = analysis[0] if analysis else {}
    analysis = analysis or {}
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes_accessed": float(analysis.get("bytes accessed", float("nan")))}


def environment(**extra: Any) -> dict:
    """JAX version, backend, device count, Python, processor and CPU count, plus ``extra``."""
    return {"jax": jax.__version__, "backend": jax.default_backend(), "device_count": jax.device_count(),
            "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), **extra}


def summary(timing: Mapping[str, Any], name: str) -> str:
    """One line: ``name``'s ratio to the baseline and the A/A control, each with its interval.

    Example:
      >>> t = {'ratios': {'c': {'ratio': 1.1, 'low': 1.0, 'high': 1.2},
      ...                 CONTROL: {'ratio': 1.0, 'low': 0.9, 'high': 1.1}}}
      >>> summary(t, 'c')
      'c 1.100 [1.000, 1.200], A/A 1.000 [0.900, 1.100]'
    """
    r, aa = timing["ratios"][name], timing["ratios"][CONTROL]
    return (f"{name} {r['ratio']:.3f} [{r['low']:.3f}, {r['high']:.3f}], "
            f"A/A {aa['ratio']:.3f} [{aa['low']:.3f}, {aa['high']:.3f}]")


def write_result(path: Any, result: dict, *, ratio: Optional[float] = None) -> None:
    """Writes ``result`` as JSON to ``path`` (creating its folder) and prints the top-level ratio last."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    value = result.get("ratio") if ratio is None else ratio
    if value is not None:
        print(f"{float(value):.4f}")
