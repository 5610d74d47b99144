"""One call for one-shot, data-aware compression of a Linen model: :func:`one_shot`.

A method is a frozen config (:class:`Wanda`, :class:`SparseGPT`, :class:`GPTQ`) whose
``compress(kernel, stats)`` turns one Dense kernel and its calibration statistics into a
:class:`~jaxcompress.oneshot.obs.LayerResult`. :func:`one_shot` calibrates the selected layers,
applies the method layer by layer and returns the new params together with the transform that
describes them (``fixed_masks`` for masks, ``grid_quantization`` for grids, chained when both),
so size reports, export and fine-tuning through the train step read the result like any other
compressed model.

Sequential calibration (the papers' default): layers are compressed in the order the model calls
them and each group is calibrated on the outputs of the already-compressed layers before it, by
re-running the model with the weights compressed so far. The cost is one pass over the
calibration batches per group.
"""
from __future__ import annotations

import dataclasses
import re
import time
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.rules import Rules
from jaxcompress.core.transform import Transform, chain
from jaxcompress.core.validation import check_fraction, check_int, check_positive
from jaxcompress.oneshot import obs
from jaxcompress.oneshot.calibration import LayerStats, calibrate_layers, call_order, selected_layers
from jaxcompress.oneshot.grid import grid_quantization
from jaxcompress.oneshot.wanda import wanda_mask
from jaxcompress.prune.pruner import fixed_masks
from jaxcompress.prune.structures import NM, Structure, Unstructured


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
    """SparseGPT pruning, optionally with joint quantization (see :func:`~jaxcompress.oneshot.obs.sparsegpt`)."""

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


Method = Union[Wanda, SparseGPT, GPTQ]


class OneShotResult(NamedTuple):
    """What :func:`one_shot` returns.

    Attributes:
      params: the compressed params (pruned weights 0, quantized kernels on their grids): the view.
      transform: the transform describing them: ``fixed_masks(masks, structure=)``,
        ``grid_quantization(grids)``, or their chain.
      state: ``transform.init(params)``; ``transform.apply(params, state)`` equals ``params``.
      report: ``{layer path: {'loss', 'sparsity', 'tokens', 'seconds'}}`` plus
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


def one_shot(
    method: Method,
    apply_fn: Callable,
    params: Any,
    model_state: Any,
    batches,
    *,
    rules: Optional[Rules] = None,
    sequential: Union[bool, str] = True,
    mesh=None,
) -> OneShotResult:
    """Compresses the selected Dense layers of a trained model in one shot from calibration data.

    Args:
      method: :class:`Wanda`, :class:`SparseGPT` or :class:`GPTQ`.
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

    Returns:
      :class:`OneShotResult`.

    Raises:
      ValueError / TypeError: bad method, rules or batches.

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
    if not isinstance(method, (Wanda, SparseGPT, GPTQ)):
        raise TypeError(f"method must be Wanda(...), SparseGPT(...) or GPTQ(...), got {type(method).__name__}.")
    batches = list(batches)
    if not batches:
        raise ValueError("batches is empty; one-shot compression needs calibration batches.")
    layers = selected_layers(params, rules)
    if not layers:
        raise ValueError("the rules select no 2-D Dense kernel to compress; check them with jaxcompress.explain.")
    groups = _groups(apply_fn, params, model_state, batches[0], layers, sequential)
    kernels = {path_name(p)[: -len("/kernel")]: w for p, w in jax.tree.leaves_with_path(params)
               if path_name(p).endswith("/kernel")}
    new, masks, grids, report = {}, {}, {}, {}
    current = params
    calib_s = solve_s = 0.0
    for group in groups:
        t0 = time.perf_counter()
        stats = jax.block_until_ready(
            calibrate_layers(apply_fn, current, model_state, batches, layers=group, hessian=method.hessian, mesh=mesh))
        calib_s += time.perf_counter() - t0
        for name in group:
            t0 = time.perf_counter()
            out = jax.block_until_ready(method.compress(kernels[name], stats[name]))
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
                                      structure=method.structure))
    if grids:
        transforms.append(grid_quantization(jax.tree.map_with_path(lambda p, w: grids.get(path_name(p)), params)))
    transform = transforms[0] if len(transforms) == 1 else chain(*transforms)
    return OneShotResult(current, transform, transform.init(current), report)
