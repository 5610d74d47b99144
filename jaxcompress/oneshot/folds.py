"""Exact reparametrisations before quantization: per-input-channel scales folded into producers.

A Dense layer ``y = x W`` computes the same function as ``y = (x / s) (diag(s) W)`` for any
positive ``s`` over its inputs. SmoothQuant and AWQ choose ``s`` so that ``x / s`` and/or
``diag(s) W`` quantize better; the division by ``s`` is *folded* into the layer that produces
``x``, so the model runs unchanged (no rewrite, no extra op):

* a normalisation (params ``scale`` and ``bias``, e.g. ``nn.LayerNorm``): ``scale / s``, ``bias / s``;
* a Dense layer (params ``kernel`` and ``bias``) whose output columns feed the consumer
  channel-for-channel (attention's ``value`` feeds ``out`` through token mixing only):
  ``kernel[:, c] / s_c``, ``bias / s``.

Which producer a consumer's scale folds into is model knowledge, given as ``folds``: ``(regex,
template)`` pairs on the consumer's layer path, first match wins, the template naming the
producer with the regex's groups (``(r'^(block_\\d+)/mlp/fc1$', r'\\1/ln2')``). A layer no fold
matches keeps ``s = 1``. Consumers folding into the same producer (query, key and value after
``ln1``) share one ``s``. :func:`check_folds` proves a fold list on the model itself: random
scales folded in must leave the outputs unchanged.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import get_path, path_name

Folds = Sequence[tuple[str, str]]


def _check_folds(folds) -> list[tuple[re.Pattern, str]]:
    if isinstance(folds, (str, bytes)) or not isinstance(folds, (list, tuple)):
        raise TypeError(f"folds must be a sequence of (regex, template) pairs, got {folds!r}.")
    out = []
    for item in folds:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise TypeError(
                f"each fold must be a (regex, template) pair of strings, e.g. (r'^(block_\\d+)/mlp/fc1$', "
                f"r'\\1/ln2'), got {item!r}."
            )
        out.append((re.compile(item[0]), item[1]))
    return out


def fold_groups(layers: Sequence[str], folds: Folds) -> dict[str, list[str]]:
    """``{producer path: [consumer layers]}`` for the layers a fold matches, in layer order.

    Example:
      >>> folds = [(r'^(b\\d)/(q|k)$', r'\\1/ln'), (r'^(b\\d)/o$', r'\\1/k')]
      >>> fold_groups(['b0/q', 'b0/k', 'b0/o', 'b0/fc2'], folds)
      {'b0/ln': ['b0/q', 'b0/k'], 'b0/k': ['b0/o']}
    """
    compiled = _check_folds(folds)
    groups: dict[str, list[str]] = {}
    for layer in layers:
        for pattern, template in compiled:
            if pattern.search(layer):
                groups.setdefault(pattern.sub(template, layer), []).append(layer)
                break
    return groups


def _producer_leaves(params, producer: str) -> dict[str, Any]:
    node = get_path(params, producer)
    if not isinstance(node, Mapping) or not ({"scale", "kernel"} & set(node)):
        raise ValueError(
            f"fold target {producer!r} is not a normalisation (params 'scale'/'bias') or a Dense layer "
            f"(params 'kernel'/'bias') in the params; fix the folds' templates."
        )
    return dict(node)


def fold_scales(params: Any, scales: Mapping[str, jax.Array], folds: Folds) -> Any:
    """The params with ``diag(s)`` folded into each consumer's kernel rows and ``1/s`` into its producer.

    Args:
      params: the model's params.
      scales: ``{producer path: s}`` with ``s`` of shape ``(in,)`` (positive), one per group of
        :func:`fold_groups`.
      folds: the fold rules (see the module docstring).

    Returns:
      New params computing the same function (exactly in real arithmetic; to float rounding).

    Raises:
      ValueError: a producer that is not a norm or Dense layer, or an ``s`` of the wrong shape.

    Example:
      >>> import jax.numpy as jnp
      >>> p = {'ln': {'scale': jnp.ones(2), 'bias': jnp.zeros(2)}, 'fc': {'kernel': jnp.ones((2, 3))}}
      >>> q = fold_scales(p, {'ln': jnp.array([2.0, 4.0])}, [('^fc$', 'ln')])
      >>> q['ln']['scale'].tolist(), q['fc']['kernel'][:, 0].tolist()
      ([0.5, 0.25], [2.0, 4.0])
    """
    layers = sorted({path_name(p)[: -len("/kernel")] for p, _ in jax.tree.leaves_with_path(params)
                     if path_name(p).endswith("/kernel")})
    groups = fold_groups(layers, folds)
    new: dict[str, jax.Array] = {}
    current = lambda path: new[path] if path in new else get_path(params, path)  # noqa: E731
    for producer, s in scales.items():
        if producer not in groups:
            raise ValueError(f"scales names {producer!r}, which no fold targets; known targets: {sorted(groups)}.")
        s = jnp.asarray(s, jnp.float32)
        for layer in groups[producer]:
            kernel = current(layer + "/kernel")
            if s.shape != (kernel.shape[0],):
                raise ValueError(
                    f"the scale folded into {producer!r} has shape {s.shape}, but {layer!r} has {kernel.shape[0]} "
                    "inputs; give one positive value per input channel."
                )
            new[layer + "/kernel"] = (kernel * s[:, None].astype(kernel.dtype))
        for name in _producer_leaves(params, producer):
            value = current(f"{producer}/{name}")
            if name == "kernel":
                new[f"{producer}/kernel"] = value / s[None, :].astype(value.dtype)
            elif name in ("scale", "bias"):
                new[f"{producer}/{name}"] = value / s.astype(value.dtype)
    return jax.tree.map_with_path(lambda p, w: new.get(path_name(p), w), params)


def check_folds(
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batch: Any,
    folds: Folds,
    layers: Sequence[str],
    *,
    rtol: float = 1e-3,
    seed: int = 0,
) -> dict[str, list[str]]:
    """Checks on one batch that every fold of ``layers`` leaves the model's outputs unchanged.

    Random scales in ``[1/2, 2]`` are folded in for each producer alone; the model's outputs
    must stay within ``rtol`` (relative to their largest magnitude) of the original ones.

    Returns:
      :func:`fold_groups` of ``layers``.

    Raises:
      ValueError: naming each fold that changes the outputs (e.g. a scale folded through a
      non-linearity, or into a producer that feeds other layers too).
    """
    groups = fold_groups(layers, folds)
    ref = np.asarray(apply_fn(params, model_state, batch, train=False, rng=None)[0], np.float64)
    norm = max(float(np.max(np.abs(ref))), 1e-12)
    rng = np.random.default_rng(seed)
    bad = []
    for producer, consumers in groups.items():
        width = get_path(params, consumers[0] + "/kernel").shape[0]
        s = jnp.asarray(np.exp(rng.uniform(-np.log(2), np.log(2), size=width)), jnp.float32)
        out = np.asarray(apply_fn(fold_scales(params, {producer: s}, folds), model_state, batch,
                                  train=False, rng=None)[0], np.float64)
        err = float(np.max(np.abs(out - ref))) / norm
        if not err <= rtol:
            bad.append(f"{consumers} -> {producer!r} (relative change {err:.2e})")
    if bad:
        raise ValueError(
            "these folds change the model's outputs, so a scale cannot be folded there: "
            + "; ".join(bad) + ". Drop them from folds (their layers then keep s = 1)."
        )
    return groups
