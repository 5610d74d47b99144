"""One call for one-shot, data-aware compression of a Linen model: :func:`one_shot`.

A *solver* is a frozen config (:class:`Wanda`, :class:`SparseGPT`, :class:`GPTQ`) whose
``compress(kernel, stats)`` turns one Dense kernel and its calibration statistics into a
:class:`~jaxcompress.oneshot.obs.LayerResult`, or :class:`RTN` (round to nearest with the
library's one weight quantizer, optionally with calibrated 8-bit inputs: W8A8).
:func:`one_shot` calibrates the selected layers, applies the solver layer by layer and returns
the new params together with the transform that describes them (``fixed_masks`` for masks,
``grid_quantization`` for grids, chained when both; ``weight_quantization`` for RTN), so size
reports, export and fine-tuning through the train step read the result like any other
compressed model.

A *reparametrisation* (:class:`Rotation`, :class:`SmoothQuant`, :class:`AWQ`) rewrites the
float params into an equivalent model that quantizes better, folding its scales or rotations
into neighbouring layers (:mod:`jaxcompress.oneshot.folds`, :mod:`jaxcompress.oneshot.rotate`);
a list ``[reparametrisations..., solver]`` composes them, e.g. ``[Rotation(head_dim=32),
SparseGPT(0.5, structure=NM(2, 4), bits=4, group_size=128)]``; :class:`AWQ` alone implies its
round-to-nearest solver.

Sequential calibration (the papers' default): layers are compressed in the order the model calls
them and each group is calibrated on the outputs of the already-compressed layers before it, by
re-running the model with the weights compressed so far. The cost is one pass over the
calibration batches per group.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import get_path, path_name
from jaxcompress.core.rules import Rules
from jaxcompress.core.transform import Transform, chain
from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.oneshot import obs
from jaxcompress.oneshot.calibration import LayerStats, calibrate_layers, call_order, selected_layers
from jaxcompress.oneshot.folds import Folds, check_folds, fold_scales
from jaxcompress.oneshot.grid import grid_quantization
from jaxcompress.oneshot.rotate import rotate_transformer
from jaxcompress.oneshot.smooth import awq_clip, awq_scales, smoothquant_scales
from jaxcompress.oneshot.wanda import wanda_mask
from jaxcompress.prune.pruner import fixed_masks
from jaxcompress.prune.structures import NM, Structure, Unstructured
from jaxcompress.quant.activations import calibrate_activations
from jaxcompress.quant.affine import fake_quant
from jaxcompress.quant.weights import weight_quantization


def _check_structure(structure):
    if not isinstance(structure, (Unstructured, NM)):
        raise ValueError(f"structure must be Unstructured() or NM(n, m), got {structure!r}.")


@dataclasses.dataclass(frozen=True)
class Wanda:
    """Wanda pruning: keep the weights with the largest ``|W_ij| * ||X_j||`` per output; no update.

    Attributes:
      sparsity: fraction pruned per output (``Unstructured``).
      structure: ``Unstructured()`` or ``NM(n, m)``.
    """

    sparsity: float = 0.5
    structure: Structure = Unstructured()
    hessian = False

    def __post_init__(self):
        check_fraction("sparsity", self.sparsity)
        _check_structure(self.structure)

    def compress(self, kernel, stats: LayerStats) -> obs.LayerResult:
        mask = wanda_mask(kernel, stats.sum_sq, self.sparsity, structure=self.structure)
        return obs.LayerResult(jnp.where(mask, kernel, 0), mask, None, None)


@dataclasses.dataclass(frozen=True)
class SparseGPT:
    """SparseGPT pruning, optionally with joint quantization (see :func:`~jaxcompress.oneshot.obs.sparsegpt`).

    Attributes:
      sparsity, structure: the fraction pruned; ``Unstructured()`` or ``NM(n, m)``.
      bits, group_size, symmetric, narrow: joint quantization of the kept weights (``bits=None``: none).
      blocksize: columns per block of lazy updates and, unstructured, of adaptive mask selection:
        each block's mask is chosen from the weights as earlier blocks' updates left them. The
        paper's 128 is a small part of a wide layer; for a layer of 128 inputs it is the whole
        layer, one mask chosen up front. On the 128-wide ``oneshot_lm`` model blocks of 8 were best
        on validation (perplexity 3.68 against 4.52 with 128; experiments/results/oneshot_lm/blocksize).
      percdamp: damping ``percdamp * mean(diag H)`` added to the Hessian's diagonal.
    """

    sparsity: float = 0.5
    structure: Structure = Unstructured()
    bits: Optional[int] = None
    group_size: Optional[int] = None
    symmetric: bool = False
    narrow: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    hessian = True

    def __post_init__(self):
        check_fraction("sparsity", self.sparsity)
        _check_structure(self.structure)
        if self.bits is not None:
            check_int("bits", self.bits, minimum=2, maximum=8)
        check_int("blocksize", self.blocksize, minimum=1)
        check_positive("percdamp", self.percdamp)

    def compress(self, kernel, stats: LayerStats) -> obs.LayerResult:
        kw = dataclasses.asdict(self)
        return obs.sparsegpt(kernel, stats.xtx, kw.pop("sparsity"), **kw)


@dataclasses.dataclass(frozen=True)
class GPTQ:
    """GPTQ weight quantization (see :func:`~jaxcompress.oneshot.obs.gptq`)."""

    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    narrow: bool = False
    act_order: bool = False
    blocksize: int = 128
    percdamp: float = 0.01
    hessian = True
    structure = None

    def __post_init__(self):
        check_int("bits", self.bits, minimum=2, maximum=8)
        check_int("blocksize", self.blocksize, minimum=1)
        check_positive("percdamp", self.percdamp)

    def compress(self, kernel, stats: LayerStats) -> obs.LayerResult:
        kw = dataclasses.asdict(self)
        return obs.gptq(kernel, stats.xtx, kw.pop("bits"), **kw)


@dataclasses.dataclass(frozen=True)
class RTN:
    """Round-to-nearest with the library's weight quantizer (min/max grids), optionally W8A8.

    Attributes:
      bits: weight bits ``2..8``.
      group_size: inputs per group, or ``None`` for one grid per output channel.
      symmetric, narrow: the grid (default asymmetric for weight-only, as GPTQ and AWQ).
      activation_bits: quantize each selected layer's input to this many bits, or ``None``.
      activation_symmetric: signed symmetric input grid instead of affine.
      activation_range: ``'calibrated'``: one static range per layer input, the min/max over all
        calibration batches (SmoothQuant's O3); ``'token'``: each token's own range over the input
        features at run time, nothing calibrated (SmoothQuant's O1, LLM.int8's inputs).
    """

    bits: int = 8
    group_size: Optional[int] = None
    symmetric: bool = False
    narrow: bool = False
    activation_bits: Optional[int] = None
    activation_symmetric: bool = False
    activation_range: str = "calibrated"
    hessian = False
    structure = None

    def __post_init__(self):
        check_int("bits", self.bits, minimum=2, maximum=8)
        if self.group_size is not None:
            check_int("group_size", self.group_size, minimum=1)
        if self.activation_bits is not None:
            check_int("activation_bits", self.activation_bits, minimum=2, maximum=8)
        if self.activation_range not in ("calibrated", "token"):
            raise ValueError(f"activation_range must be 'calibrated' (static, from the calibration batches) or "
                             f"'token' (each token's own range at run time), got {self.activation_range!r}.")

    @property
    def calibrates_inputs(self) -> bool:
        """Whether the input ranges come from the calibration batches."""
        return self.activation_bits is not None and self.activation_range == "calibrated"

    def transform(self, rules) -> Transform:
        return weight_quantization(
            self.bits, symmetric=self.symmetric, narrow=self.narrow, group_size=self.group_size, rules=rules,
            activation_bits=self.activation_bits, activation_symmetric=self.activation_symmetric,
            activation_range="dynamic" if self.activation_bits is None else self.activation_range)


@dataclasses.dataclass(frozen=True)
class SmoothQuant:
    """SmoothQuant: fold ``s_j = max|X_j|^alpha / max|W_j|^(1-alpha)`` into each layer group (before W8A8).

    Attributes:
      alpha: migration strength in ``[0, 1]`` (the paper's 0.5).
    """

    alpha: float = 0.5
    hessian = False

    def __post_init__(self):
        check_fraction("alpha", self.alpha, allow_one=True)

    def scales(self, kernels, stats: LayerStats):
        return smoothquant_scales(stats.max_abs, kernels, self.alpha), None


@dataclasses.dataclass(frozen=True)
class AWQ:
    """AWQ: per group, the activation-aware scale searched for this weight grid, then folded.

    Alone it implies :class:`RTN` with the same grid; before :class:`GPTQ` it composes.

    Attributes:
      bits, group_size, symmetric, narrow: the weight grid the search quantizes to.
      n_grid: points of the exponent grid (the paper's 20), also of the clipping search.
      clip: after scaling, shrink each group's range where that lowers its error
        (:func:`~jaxcompress.oneshot.smooth.awq_clip`), as the reference implementation does.
    """

    bits: int = 4
    group_size: Optional[int] = None
    symmetric: bool = False
    narrow: bool = False
    n_grid: int = 20
    clip: bool = True
    hessian = True

    def __post_init__(self):
        check_int("bits", self.bits, minimum=2, maximum=8)
        check_int("n_grid", self.n_grid, minimum=1)
        if self.group_size is not None:
            check_int("group_size", self.group_size, minimum=1)

    def quantizer(self):
        return functools.partial(fake_quant, bits=self.bits, symmetric=self.symmetric, narrow=self.narrow,
                                 channel_axis=-1, group_size=self.group_size)

    def scales(self, kernels, stats: LayerStats):
        r = awq_scales(kernels, stats.sum_abs / jnp.maximum(stats.count, 1), stats.xtx, self.quantizer(),
                       n_grid=self.n_grid)
        return r.scale, float(r.ratio)

    def clipped(self, kernel, xtx):
        return awq_clip(kernel, xtx, self.quantizer(), group_size=self.group_size, n_grid=self.n_grid)[0]

    def solver(self) -> RTN:
        return RTN(self.bits, group_size=self.group_size, symmetric=self.symmetric, narrow=self.narrow)


@dataclasses.dataclass(frozen=True)
class Rotation:
    """Rotate the residual stream (and attention values per head) of a pre-LayerNorm Transformer.

    See :func:`~jaxcompress.oneshot.rotate.rotate_transformer`; needs ``one_shot(folds=...)``.
    The defaults name :class:`~jaxcompress.models.TransformerLM`'s parameters.

    Attributes:
      head_dim: attention head width for the per-head value rotation, or ``None``.
      seed: the random rotation.
      embeddings: regex on the embedding tables' leaf paths.
      writers: regex on the layers writing into the stream.
    """

    head_dim: Optional[int] = None
    seed: int = 0
    embeddings: str = r"^(embed|pos_embed)/embedding$"
    writers: str = r"^block_\d+/(attn/out|mlp/fc2)$"

    def __post_init__(self):
        if self.head_dim is not None:
            check_int("head_dim", self.head_dim, minimum=1)
        check_int("seed", self.seed)


Method = Union[Wanda, SparseGPT, GPTQ, RTN]
Reparametrisation = Union[Rotation, SmoothQuant, AWQ]
_SOLVERS = (Wanda, SparseGPT, GPTQ, RTN)
_REPARAMS = (Rotation, SmoothQuant, AWQ)


class OneShotResult(NamedTuple):
    """What :func:`one_shot` returns.

    Attributes:
      params: the compressed params (pruned weights 0, quantized kernels on their grids): the view,
        with any reparametrisation folded in. For :class:`RTN` the reparametrised float params,
        which its transform rounds.
      transform: the transform describing them: ``fixed_masks(masks, structure=)``,
        ``grid_quantization(grids)``, or their chain; ``weight_quantization`` for :class:`RTN`.
      state: the transform's state (``transform.init(params)``; for RTN with ``activation_bits``
        the calibrated input ranges). For the grid solvers ``transform.apply(params, state)``
        equals ``params``.
      report: ``{layer path: {'loss', 'sparsity', 'tokens', 'seconds'}}``, an entry per
        reparametrisation (``'Rotation'``, ``'SmoothQuant'``, ``'AWQ'``: seconds, groups) and
        ``'_total': {'calibration_seconds', 'solve_seconds', 'groups'}``.
    """

    params: Any
    transform: Transform
    state: Any
    report: dict


def _groups(apply_fn, params, model_state, batch, layers, sequential):
    order = call_order(apply_fn, params, model_state, batch, layers)
    if sequential is False:
        return [[name for g in order for name in g]]
    if sequential is True:
        return order
    if not isinstance(sequential, str):
        raise TypeError(f"sequential must be True, False or a regex naming groups (e.g. r'^block_\\d+'), got {sequential!r}.")
    pattern = re.compile(sequential)
    groups: dict = {}
    for name in (n for g in order for n in g):
        m = pattern.search(name)
        groups.setdefault(m.group(0) if m else name, []).append(name)
    return list(groups.values())


def split_pipeline(methods) -> tuple[list, Method]:
    """``(reparametrisations, solver)`` of a one-shot method or list (see :func:`one_shot`).

    Raises:
      TypeError / ValueError: an unknown method, an empty list, a solver that is not last or more
        than one, or reparametrisations without a solver (AWQ last brings its own).

    Example:
      >>> split_pipeline([Rotation(), GPTQ(4)])[1]
      GPTQ(bits=4, group_size=None, symmetric=False, narrow=False, act_order=False, blocksize=128, percdamp=0.01)
    """
    steps = list(methods) if isinstance(methods, (list, tuple)) else [methods]
    for m in steps:
        if not isinstance(m, _SOLVERS + _REPARAMS):
            raise TypeError(
                f"method must be a Wanda, SparseGPT, GPTQ, RTN, Rotation, SmoothQuant or AWQ config (or a list "
                f"of them), got {type(m).__name__}."
            )
    if not steps:
        raise ValueError("method is an empty list; give a solver such as GPTQ(4), optionally after reparametrisations.")
    solvers = [m for m in steps if isinstance(m, _SOLVERS)]
    if len(solvers) > 1 or (solvers and steps[-1] is not solvers[0]):
        raise ValueError(
            f"a one-shot pipeline is reparametrisations (Rotation, SmoothQuant, AWQ) followed by at most one "
            f"solver (Wanda, SparseGPT, GPTQ, RTN) last, got {[type(m).__name__ for m in steps]}. For pruning and "
            "quantization together use SparseGPT(..., bits=...)."
        )
    if solvers:
        return steps[:-1], solvers[0]
    if isinstance(steps[-1], AWQ):
        return steps, steps[-1].solver()
    raise ValueError(
        f"{[type(m).__name__ for m in steps]} only reparametrises the model; end the list with a solver, e.g. "
        "RTN(8, activation_bits=8) for W8A8."
    )


def _reparametrise(step, apply_fn, params, model_state, batches, layers, folds, mesh, report):
    """One reparametrisation of the float params; adds its entry to ``report``."""
    t0 = time.perf_counter()
    name = type(step).__name__
    if not folds:
        raise ValueError(f"{name} folds its scales or rotations into neighbouring layers: pass one_shot(folds=...) "
                         "naming each layer's input producer (for TransformerLM: models.transformer.TRANSFORMER_FOLDS).")
    if isinstance(step, Rotation):
        new = rotate_transformer(params, folds, embeddings=step.embeddings, writers=step.writers,
                                 head_dim=step.head_dim, seed=step.seed)
        ref = apply_fn(params, model_state, batches[0], train=False, rng=None)[0]
        out = apply_fn(new, model_state, batches[0], train=False, rng=None)[0]
        err = float(jnp.max(jnp.abs(out - ref)) / jnp.maximum(jnp.max(jnp.abs(ref)), 1e-12))
        if not err <= 1e-3:
            raise ValueError(
                f"the rotation changes the model's outputs (relative {err:.2e}): the folds, embeddings or writers "
                "do not describe this model's residual stream (every array added to it, every layer reading it)."
            )
        report[name] = {"seconds": time.perf_counter() - t0, "relative_output_change": err}
        return new
    groups = check_folds(apply_fn, params, model_state, batches[0], folds, layers)
    consumers = [c for cs in groups.values() for c in cs]
    clip = isinstance(step, AWQ) and step.clip
    stats = calibrate_layers(apply_fn, params, model_state, batches, layers=layers if clip else consumers,
                             hessian=step.hessian, mesh=mesh)
    scales, ratios = {}, {}
    for producer, group in groups.items():
        kernels = [get_path(params, c + "/kernel") for c in group]
        scales[producer], ratios[producer] = step.scales(kernels, stats[group[0]])
    new = fold_scales(params, scales, folds)
    if clip:
        # The folded layer's input is X / s: its X^T X is diag(1/s) X^T X diag(1/s).
        inv = {c: 1.0 / scales[p] for p, cs in groups.items() for c in cs}
        clipped = {}
        for layer in layers:
            xtx = stats[layer].xtx
            if layer in inv:
                xtx = xtx * inv[layer][:, None] * inv[layer][None, :]
            clipped[layer + "/kernel"] = step.clipped(get_path(new, layer + "/kernel"), xtx)
        new = jax.tree.map_with_path(lambda p, w: clipped.get(path_name(p), w), new)
    report[name] = {"seconds": time.perf_counter() - t0, "groups": {p: g for p, g in groups.items()},
                    "unscaled": sorted(set(layers) - set(consumers))}
    if isinstance(step, AWQ):
        report[name]["ratios"] = ratios
    return new


def one_shot(
    method: Union[Method, Reparametrisation, list],
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batches,
    *,
    rules: Optional[Rules] = None,
    sequential: Union[bool, str] = True,
    mesh=None,
    folds: Folds = (),
) -> OneShotResult:
    """Compresses the selected Dense layers of a trained model in one shot from calibration data.

    Args:
      method: a solver (:class:`Wanda`, :class:`SparseGPT`, :class:`GPTQ`, :class:`RTN`), or a
        list of reparametrisations (:class:`Rotation`, :class:`SmoothQuant`, :class:`AWQ`)
        ending with a solver; :class:`AWQ` alone is AWQ with its round-to-nearest solver.
      apply_fn: ``apply_fn(params, model_state, batch, *, train, rng) -> (outputs, model_state)``.
      params, model_state: the trained model.
      batches: calibration batches as ``apply_fn`` takes them (a few hundred sequences in total
        is the papers' setting); read once per group.
      rules: ``(regex, True/None)`` rules on kernel paths; default every 2-D kernel. Keeping the
        output layer dense is usual: ``[('^head/', None), ('.*', True)]``.
      sequential: ``True`` compresses layer groups in call order (layers reading the same input,
        e.g. query/key/value, together), each calibrated on the compressed model so far;
        a regex (e.g. ``r'^block_\\d+'``) groups the layers whose paths it matches the same way
        (block by block); ``False`` calibrates every layer on the float model in one pass.
      mesh: a ``'data'`` mesh to split calibration batches over (see
        :func:`~jaxcompress.oneshot.calibration.calibrate_layers`), or ``None``.
      folds: ``(regex, template)`` rules naming the producer of each layer's input (see
        :mod:`jaxcompress.oneshot.folds`), needed by the reparametrisations; each fold is checked
        on the model (a fold that changes the outputs is refused).

    Returns:
      :class:`OneShotResult`; its ``report`` has an entry per reparametrisation.

    Raises:
      ValueError / TypeError: bad method, rules, folds or batches.

    Example:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from jaxcompress.models import MLP
      >>> from jaxcompress.train import linen_apply_fn
      >>> m = MLP(features=(16,))
      >>> x = jnp.asarray(np.random.default_rng(0).normal(size=(64, 8)), jnp.float32)
      >>> params = m.init(jax.random.key(0), x)['params']
      >>> r = one_shot(SparseGPT(0.5), linen_apply_fn(m), params, {}, [{'image': x}],
      ...              rules=[('^head/', None), ('.*', True)])
      >>> float(jnp.mean(r.params['fc1']['kernel'] == 0))
      0.5
      >>> r.transform.describe(r.params, r.state)['fc1/kernel'].mask.shape
      (8, 16)
    """
    reparams, solver = split_pipeline(method)
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; one-shot compression needs calibration batches.")
    layers = selected_layers(params, rules)
    if not layers:
        raise ValueError("the rules select no 2-D Dense kernel to compress; check them with jaxcompress.explain.")
    report: dict = {}
    for step in reparams:
        params = _reparametrise(step, apply_fn, params, model_state, batches, layers, folds, mesh, report)
    if isinstance(solver, RTN):
        t0 = time.perf_counter()
        selection = [(f"^{re.escape(name)}/kernel$", True) for name in layers] + [(".*", None)]
        transform = solver.transform(selection)
        state = transform.init(params)
        if solver.calibrates_inputs:
            state = calibrate_activations(transform, state, apply_fn, transform.apply(params, state), model_state,
                                          batches)
        report["_total"] = {"calibration_seconds": time.perf_counter() - t0, "solve_seconds": 0.0, "groups": 0}
        return OneShotResult(params, transform, state, report)
    groups = _groups(apply_fn, params, model_state, batches[0], layers, sequential)
    kernels = {path_name(p)[: -len("/kernel")]: w for p, w in jax.tree.leaves_with_path(params)
               if path_name(p).endswith("/kernel")}
    new, masks, grids = {}, {}, {}
    current = params
    calib_s = solve_s = 0.0
    for group in groups:
        t0 = time.perf_counter()
        stats = jax.block_until_ready(
            calibrate_layers(apply_fn, current, model_state, batches, layers=group, hessian=solver.hessian, mesh=mesh))
        calib_s += time.perf_counter() - t0
        for name in group:
            t0 = time.perf_counter()
            out = jax.block_until_ready(solver.compress(kernels[name], stats[name]))
            dt = time.perf_counter() - t0
            solve_s += dt
            new[name + "/kernel"] = out.kernel
            if out.mask is not None:
                masks[name + "/kernel"] = out.mask
            if out.grid is not None:
                grids[name + "/kernel"] = out.grid
            report[name] = {
                "loss": None if out.loss is None else float(out.loss),
                "sparsity": None if out.mask is None else float(1.0 - jnp.mean(out.mask)),
                "tokens": int(stats[name].count),
                "seconds": dt,
            }
        current = jax.tree.map_with_path(lambda p, w: new.get(path_name(p), w), params)
    report["_total"] = {"calibration_seconds": calib_s, "solve_seconds": solve_s, "groups": len(groups)}
    transforms = []
    if masks:
        transforms.append(fixed_masks(jax.tree.map_with_path(lambda p, w: masks.get(path_name(p)), params),
                                      structure=solver.structure))
    if grids:
        transforms.append(grid_quantization(jax.tree.map_with_path(lambda p, w: grids.get(path_name(p)), params)))
    transform = transforms[0] if len(transforms) == 1 else chain(*transforms)
    return OneShotResult(current, transform, transform.init(current), report)
