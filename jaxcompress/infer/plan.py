"""Compressed inference of an unchanged Flax Linen model: prepare its layers, measure, run the fastest.

:func:`prepare` runs the model once on an example batch, intercepting every ``Dense`` and
``Conv`` call (as activation quantization does; the model is not rewritten). From the
transforms' description it builds, per layer, the arrays of every way to run it
(:mod:`jaxcompress.infer.layers`): float32, weight-only int8 or int4 dequantized inside the
program, int8 x int8 -> int32 with calibrated input ranges, and for pruned Dense kernels BCOO,
BCSR and gather products. A BatchNorm that directly follows a layer is folded into it.

:func:`choose_paths` times every candidate of every layer on that layer's real input with
:func:`~jaxcompress.benchmark.compare` (A/A control, bootstrap interval) and keeps a path only
where its interval lies wholly below float32's; otherwise the layer stays float32. Layer timings
do not always compose (one fused program is not the sum of separately compiled layers), so the
per-layer choice is then checked on the whole model: the chosen plan and the plans that keep
only one layer off float32 (on each path that beat float32 for that layer, not only the fastest:
a runner-up may fuse better with its neighbours) are timed as whole programs against the
all-float plan, and the fastest one measurably faster than all-float wins (all-float when none is). A plan that runs
every layer in float32, with float inputs and no folded BatchNorm, runs as the unchanged model on
the compressed view's weights: the very program of the float model, so it cannot be slower. Which path
wins depends on the backend (XLA:CPU's int8 convolution may be slower than float32), the batch
and the sparsity, so nothing is assumed. :func:`inference_fn` runs the model with a plan.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional

import flax.linen as nn
import jax
import numpy as np

from jaxcompress.benchmark import compare, verdict
from jaxcompress.core.transform import LeafSpec
from jaxcompress.core.validation import check_int
from jaxcompress.core.paths import get_path
from jaxcompress.infer.layers import PATHS, Layer, describe_layer, layer_arrays, run_layer
from jaxcompress.quant.affine import affine_qparams

_LAYERS = (nn.Dense, nn.Conv)


class Prepared(NamedTuple):
    """A model ready for compressed inference (see :func:`prepare`).

    Attributes:
      module: the Linen module.
      variables: its variables without the intercepted layers' and folded norms' params.
      layers: ``{path: Layer}`` in call order.
      arrays: ``{path: {candidate: {name: array}}}``.
      inputs: ``{path: the layer's input on the example batch}`` (what :func:`choose_paths` times on).
      call_kwargs: keyword arguments of every ``module.apply`` call (``{'train': False}``).
      example: the example batch (what :func:`choose_paths` times whole plans on).
    """

    module: nn.Module
    variables: Any
    layers: dict
    arrays: dict
    inputs: dict
    call_kwargs: dict
    example: Any


class Plan(NamedTuple):
    """Per layer, the path it runs and why.

    Attributes:
      paths: ``{layer path: candidate}``.
      timings: ``{layer path: {'median_s': {...}, 'ratios': {...}}}`` from
        :func:`~jaxcompress.benchmark.compare` (ratios to ``'float'``; ``'baseline_control'`` is
        the A/A control); empty for a plan not measured.
      whole: the whole-model check of :func:`choose_paths`: ``{'candidates': {name: {layer:
        path}}, 'median_s', 'ratios'}`` (ratios to the all-float plan, with its A/A control) and
        ``'chosen'``, the candidate kept; ``None`` when no whole programs were timed.
    """

    paths: dict
    timings: dict
    whole: Optional[dict] = None


def _without(tree, paths):
    if not isinstance(tree, Mapping):
        return tree
    out = {}
    for k, v in tree.items():
        inner = [p[len(k) + 1:] for p in paths if p.startswith(k + "/")]
        if k in paths:
            continue
        out[k] = _without(v, inner) if inner else v
    return out


def _with(tree, entries):
    """``tree`` with ``{'a/b': subtree}`` entries put back at their paths (the inverse of :func:`_without`)."""
    out = dict(tree)
    for path, value in entries.items():
        head, _, rest = path.partition("/")
        out[head] = _with(out.get(head, {}), {rest: value}) if rest else value
    return out


def _trace(module, variables, x, call_kwargs):
    """Eager run recording each Dense/Conv call (module, input, output) and BatchNorms fed by one."""
    calls, folds, outputs = {}, {}, {}

    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if context.method_name != "__call__" or not args:
            return next_fun(*args, **kwargs)
        name = "/".join(m.path)
        if isinstance(m, _LAYERS):
            out = next_fun(*args, **kwargs)
            calls[name] = (m, args[0])
            outputs[name] = out
            return out
        if isinstance(m, nn.BatchNorm):
            src = [n for n, o in outputs.items() if o is args[0]]
            if src and m.use_running_average and m.axis == -1:
                folds[src[0]] = (name, m.epsilon, m.use_scale, m.use_bias)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        module.apply(variables, x, **call_kwargs)
    return calls, folds


def prepare(module: nn.Module, params: Any, description: Mapping[str, LeafSpec], example: Any, *,
            model_state: Optional[Mapping] = None, ranges: Optional[Mapping] = None, act_bits: int = 8,
            act_symmetric: bool = False, call_kwargs: Optional[dict] = None) -> Prepared:
    """Builds every inference path of every Dense/Conv layer of ``module`` from its description.

    Args:
      module: a Flax Linen module (e.g. ``LeNet5()``).
      params: its params: the latent weights or the compressed view (masks are applied and codes
        are rounded from the description's scales).
      description: ``transform.describe(params, state)`` (``{}`` for a float model): per kernel
        path, the mask and/or the symmetric per-channel or per-tensor grid.
      example: an input batch; its layers' inputs are what :func:`choose_paths` times on, so
        give the batch size you will serve.
      model_state: other collections, e.g. ``{'batch_stats': ...}``.
      ranges: calibrated activation ranges ``{layer: {'min', 'max'}}``, the ``ranges`` of a
        ``weight_quantization(..., activation_range='calibrated')`` state after
        ``calibrate_activations``; they make the int8 x int8 path available and are applied on
        every path, as the quantizer's interceptor does in eval mode.
      act_bits, act_symmetric: that quantizer's activation grid.
      call_kwargs: keyword arguments of ``module.apply`` (default ``{'train': False}``).

    Returns:
      A :class:`Prepared` model.

    Raises:
      TypeError: ``description`` is not ``{path: LeafSpec}``.
      ValueError: a range for a layer that is not a Dense/Conv, or an unsupported
        convolution (circular padding, input dilation, a mask).
    """
    if not isinstance(description, Mapping) or any(not isinstance(v, LeafSpec) for v in description.values()):
        raise TypeError("description must be {path: LeafSpec} as transform.describe(params, state) returns; "
                        f"got {type(description).__name__}.")
    act_bits = check_int("act_bits", act_bits, minimum=2, maximum=8)
    call_kwargs = {"train": False} if call_kwargs is None else dict(call_kwargs)
    state = dict(model_state or {})
    ranges = dict(ranges or {})
    variables = {"params": params, **state}
    calls, folds = _trace(module, variables, example, call_kwargs)
    extra = sorted(set(ranges) - set(calls))
    if extra:
        raise ValueError(f"ranges has entries for {extra}, which are not Dense/Conv layers; "
                         "compressed inference quantizes the inputs of Dense and Conv layers only.")
    layers, arrays, inputs, removed = {}, {}, {}, []
    for name, (m, x) in calls.items():
        spec = description.get(f"{name}/kernel")
        act = grid = None
        if name in ranges:
            s, z, qmin, qmax = affine_qparams(ranges[name]["min"], ranges[name]["max"], act_bits, symmetric=act_symmetric)
            act, grid = (qmin, qmax), (float(np.asarray(s)), float(np.asarray(z)))
        fold = folds.get(name)
        layer = describe_layer(m, x, act=act, act_grid=grid, norm=None if fold is None else fold[0], spec=spec)
        p = get_path(params, name)
        norm_params = norm_stats = None
        if fold is not None:
            norm_params = get_path(params, fold[0]) or {}
            norm_stats = get_path(state.get("batch_stats", {}), fold[0])
            removed.append(fold[0])
        arrays[name] = layer_arrays(layer, p["kernel"], p.get("bias"), spec, norm_params, norm_stats,
                                    1e-5 if fold is None else fold[1])
        layers[name], inputs[name] = layer, x
        removed.append(name)
    rest = {c: _without(v, removed) for c, v in variables.items()}
    return Prepared(module, rest, layers, arrays, inputs, call_kwargs, example)


def float_plan(prepared: Prepared) -> Plan:
    """The plan that runs every layer in float32 (BatchNorm still folded)."""
    return Plan({n: "float" for n in prepared.layers}, {})


def uniform_plan(prepared: Prepared, path: str) -> Plan:
    """Every layer on ``path`` where it is a candidate, float32 elsewhere."""
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}.")
    return Plan({n: path if path in l.candidates else "float" for n, l in prepared.layers.items()}, {})


def choose_paths(prepared: Prepared, *, blocks: int = 10, calls: int = 5, warmup: int = 2,
                 candidates: Optional[tuple] = None, seed: int = 0, whole_blocks: Optional[int] = None) -> Plan:
    """Times each layer's candidate paths on its example input, picks per layer, then checks the whole model.

    A path other than ``'float'`` is chosen only when the upper end of its ratio interval to
    float32 is below 1 (:func:`~jaxcompress.benchmark.verdict`): on a noisy machine a layer
    stays float32 unless another path is measurably faster. When that leaves some layers off
    float32, the whole model is timed as one program per candidate plan: the per-layer choice,
    and each plan that keeps only one of those layers off float32, on each path that was
    measurably faster for that layer (``'only_LAYER'`` on its fastest path, ``'only_LAYER:PATH'``
    on another). The fastest plan
    whose interval to the all-float plan lies wholly below 1 is returned; when none does, the
    all-float plan is.

    Args:
      prepared: from :func:`prepare`.
      blocks, calls, warmup: :func:`~jaxcompress.benchmark.compare`'s, per layer.
      candidates: restrict to these paths (``'float'`` is always timed).
      seed: shuffling seed.
      whole_blocks: blocks of the whole-model check (default ``blocks``).

    Returns:
      A :class:`Plan` with each layer's timings and the whole-model check.
    """
    paths, timings, faster = {}, {}, {}
    for i, (name, layer) in enumerate(prepared.layers.items()):
        cands = [c for c in layer.candidates if candidates is None or c in candidates or c == "float"]
        x = prepared.inputs[name]
        progs = {}
        for c in cands:
            f = jax.jit(run_layer, static_argnums=(0, 1))
            a = prepared.arrays[name][c]
            progs[c] = (lambda f, c, a: lambda: f(layer, c, a, x))(f, c, a)
        if len(progs) == 1:
            paths[name] = "float"
            continue
        r = compare(progs, baseline="float", blocks=blocks, calls=calls, warmup=warmup, seed=seed + i)
        faster[name] = sorted((c for c in cands if c != "float" and verdict(r["ratios"][c], 1.0) == "meets"),
                              key=lambda c: r["median_s"][c])
        paths[name] = faster[name][0] if faster[name] else "float"
        timings[name] = {"median_s": r["median_s"], "ratios": r["ratios"]}
    off = [n for n, p in paths.items() if p != "float"]
    if not off:
        return Plan(paths, timings)
    plans = {"float": float_plan(prepared).paths, "per_layer": dict(paths)}
    for n in off:  # each layer alone off float32, on each path that beat float32 there (fastest first)
        for c in faster[n]:
            if c != paths[n] or len(off) > 1:
                plans[f"only_{n}" if c == paths[n] else f"only_{n}:{c}"] = {m: c if m == n else "float" for m in paths}
    progs = {}
    for k, pl in plans.items():
        apply, weights = inference_program(prepared, Plan(pl, {}))
        f = jax.jit(apply)
        progs[k] = (lambda f, w: lambda: f(w, prepared.example))(f, weights)
    r = compare(progs, baseline="float", blocks=whole_blocks or blocks, calls=calls, warmup=warmup,
                seed=seed + len(prepared.layers))
    faster = [k for k in plans if k != "float" and verdict(r["ratios"][k], 1.0) == "meets"]
    chosen = min(faster, key=lambda k: r["median_s"][k]) if faster else "float"
    whole = {"candidates": plans, "median_s": r["median_s"], "ratios": r["ratios"], "chosen": chosen}
    return Plan(dict(plans[chosen]), timings, whole)


def inference_program(prepared: Prepared, plan: Plan) -> tuple[Callable, Any]:
    """A pure ``apply(weights, x) -> outputs`` and the ``weights`` it runs with (only the chosen paths' arrays).

    ``jax.jit(apply)`` or ``jax.export`` it; the weights are an argument, not constants. When
    every layer runs in float32 on float inputs with no BatchNorm folded, ``apply`` is the
    model's own ``apply`` on the compressed view's weights (masked, dequantized): nothing is
    intercepted, so the program is the float model's, and ``weights`` are its variables.
    """
    missing = sorted(set(prepared.layers) - set(plan.paths))
    if missing:
        raise ValueError(f"plan has no path for layers {missing}; build it with choose_paths(prepared).")
    for n, p in plan.paths.items():
        if n in prepared.layers and p not in prepared.layers[n].candidates:
            raise ValueError(f"plan runs layer {n!r} on {p!r}, not one of its candidates {prepared.layers[n].candidates}.")
    layers, folded = prepared.layers, {l.norm for l in prepared.layers.values() if l.norm}
    if all(plan.paths[n] == "float" and l.act is None and l.norm is None for n, l in layers.items()):
        kept = {n: {k: v for k, v in prepared.arrays[n]["float"].items() if k == "kernel" or (k == "bias" and l.use_bias)}
                for n, l in layers.items()}
        variables = dict(prepared.variables)
        variables["params"] = _with(variables.get("params", {}), kept)

        def plain(variables, x):
            return prepared.module.apply(variables, x, **prepared.call_kwargs)

        return plain, variables
    weights = {"layers": {n: prepared.arrays[n][plan.paths[n]] for n in layers}, "variables": prepared.variables}

    def apply(weights, x):
        def interceptor(next_fun, args, kwargs, context):
            if context.method_name == "__call__" and args:
                name = "/".join(context.module.path)
                if name in layers and isinstance(context.module, _LAYERS):
                    return run_layer(layers[name], plan.paths[name], weights["layers"][name], args[0])
                if name in folded:
                    return args[0]
            return next_fun(*args, **kwargs)

        with nn.intercept_methods(interceptor):
            return prepared.module.apply(weights["variables"], x, **prepared.call_kwargs)

    return apply, weights


def inference_fn(prepared: Prepared, plan: Plan) -> Callable:
    """``fn(x) -> outputs``: the model run with ``plan``, jitted.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> import jaxcompress as jc
      >>> from jaxcompress.models import MLP
      >>> model, x = MLP((16,)), jax.random.normal(jax.random.key(0), (4, 8))
      >>> params = model.init(jax.random.key(1), x)['params']
      >>> t = jc.weight_quantization(8)
      >>> s = t.init(params)
      >>> prepared = prepare(model, t.apply(params, s), t.describe(params, s), x)
      >>> plan = uniform_plan(prepared, 'weight_int8')
      >>> out = inference_fn(prepared, plan)(x)
      >>> bool(jnp.allclose(out, model.apply({'params': t.apply(params, s)}, x), atol=1e-5))
      True
    """
    apply, weights = inference_program(prepared, plan)
    jitted = jax.jit(apply)
    return lambda x: jitted(weights, x)
