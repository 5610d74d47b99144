"""Weights held on given quantization grids: the state one-shot quantizers (GPTQ) produce.

GPTQ chooses each group's scale when the group starts, from weights that earlier columns' error
feedback has already changed, so the grid of its result is *not* the min/max of the result:
re-deriving ranges from the weights (as :func:`~jaxcompress.quant.weights.weight_quantization`
does) would move them. :func:`grid_quantization` keeps the grids it is given, per leaf, and puts
the weights on them with the library's fake-quant arithmetic
(:func:`~jaxcompress.quant.affine.fake_quant_affine`), so a view already on its grid is left
exactly as it is, and fine-tuning afterwards keeps the grid.
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import flax.struct
import jax
import jax.numpy as jnp

from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import LeafSpec, Transform
from jaxcompress.quant.affine import fake_quant_affine, quant_range


@flax.struct.dataclass
class Grid:
    """The quantization grid of one Dense kernel ``(in, out)``.

    ``view = scale * (clip(round(w / scale) + zero_point, qmin, qmax) - zero_point)``, with one
    ``scale`` per output channel (shape ``(1, out)``) or, with ``group_size``, one per group of
    ``group_size`` consecutive inputs and output channel (shape ``(in // group_size, out)``).

    Attributes:
      scale: float32 steps.
      zero_point: float32 holding integers, shaped like ``scale`` (0 for symmetric grids).
      bits: bit width (static).
      symmetric: signed grid with zero point 0 (static); else unsigned ``[0, 2^b - 1]``.
      narrow: narrow signed range ``[-(2^(b-1) - 1), 2^(b-1) - 1]`` (static, symmetric only).
      group_size: inputs per group, or ``None`` for per output channel (static).
    """

    scale: jax.Array
    zero_point: jax.Array
    bits: int = flax.struct.field(pytree_node=False)
    symmetric: bool = flax.struct.field(pytree_node=False, default=False)
    narrow: bool = flax.struct.field(pytree_node=False, default=False)
    group_size: Optional[int] = flax.struct.field(pytree_node=False, default=None)

    @property
    def quant_range(self) -> tuple[int, int]:
        """``(qmin, qmax)`` of the grid."""
        return quant_range(self.bits, signed=self.symmetric, narrow=self.narrow and self.symmetric)

    def full(self, a: jax.Array) -> jax.Array:
        """``a`` (shaped like ``scale``) broadcast to the kernel: groups repeated along the inputs."""
        return a if self.group_size is None else jnp.repeat(a, self.group_size, axis=-2)

    def quantize(self, w: jax.Array) -> jax.Array:
        """``w`` put on this grid (straight-through gradient, as ``fake_quant_affine``)."""
        qmin, qmax = self.quant_range
        return fake_quant_affine(w, self.full(self.scale), self.full(self.zero_point), qmin, qmax)

    def spec(self) -> LeafSpec:
        """The :class:`~jaxcompress.core.transform.LeafSpec` export reads."""
        grouped = self.group_size is not None
        return LeafSpec(
            bits=self.bits,
            scheme="symmetric" if self.symmetric else "affine",
            channel_axis=None if grouped else -1,
            group_size=self.group_size,
            group_axis=-2 if grouped else None,
            scale=self.scale,
            zero_point=None if self.symmetric else self.zero_point.astype(jnp.int32),
        )


def is_grid(x) -> bool:
    """``is_leaf`` predicate for trees of :class:`Grid` or ``None``."""
    return x is None or isinstance(x, Grid)


class GridState(NamedTuple):
    """State of :func:`grid_quantization`.

    Attributes:
      count: int32, ``update`` calls so far.
      grids: a :class:`Grid` at each quantized leaf, ``None`` elsewhere.
    """

    count: jax.Array
    grids: Any


def _check(params, grids):
    treedef = jax.tree.structure(params)
    try:
        flat = treedef.flatten_up_to(grids)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"grids must be shaped like the params, with a Grid or None per leaf: {e}. Use the grids "
            "one_shot returned for these params."
        ) from None
    for (path, w), g in zip(jax.tree.leaves_with_path(params), flat):
        if g is None:
            continue
        if not isinstance(g, Grid):
            raise TypeError(f"grids[{path_name(path)!r}] must be a Grid or None, got {type(g).__name__}.")
        shape = tuple(jnp.shape(w))
        want = None
        if len(shape) == 2 and (g.group_size is None or shape[0] % g.group_size == 0):
            want = (shape[0] // (g.group_size or shape[0]), shape[1])
        if tuple(g.scale.shape) != want:
            raise ValueError(
                f"grids[{path_name(path)!r}] has scale shape {tuple(g.scale.shape)} but the leaf has shape "
                f"{shape}; a grid fits a 2-D kernel (in, out) with one scale per output channel or group."
            )


def grid_quantization(grids: Any) -> Transform:
    """A transform that puts the selected kernels on given grids and never changes the grids.

    Args:
      grids: a pytree shaped like the params with a :class:`Grid` at quantized kernels and
        ``None`` elsewhere (what :func:`~jaxcompress.oneshot.one_shot` returns for GPTQ).

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`GridState`; ``describe`` gives
      bits, scheme, axis or group, scale and zero point per quantized kernel.

    Raises:
      ValueError: at ``init``, when the grids do not fit the params.

    Example:
      >>> import jax.numpy as jnp
      >>> g = Grid(scale=jnp.array([[0.5, 1.0]]), zero_point=jnp.array([[0.0, 0.0]]), bits=4, symmetric=True)
      >>> t = grid_quantization({'k': g})
      >>> p = {'k': jnp.array([[0.3, 2.2], [-0.9, 0.4]])}
      >>> s = t.init(p)
      >>> t.apply(p, s)['k'].tolist()
      [[0.5, 2.0], [-1.0, 0.0]]
      >>> t.describe(p, s)['k'].bits, t.describe(p, s)['k'].scheme
      (4, 'symmetric')
    """

    def init(params):
        _check(params, grids)
        return GridState(count=jnp.zeros((), jnp.int32), grids=grids)

    def apply(params, state):
        return jax.tree.map(lambda g, w: w if g is None else g.quantize(w), state.grids, params, is_leaf=is_grid)

    def update(params, state, info):
        del params, info
        return state._replace(count=state.count + 1)

    def describe(params, state):
        del params
        leaves = jax.tree.leaves_with_path(state.grids, is_leaf=is_grid)
        return {path_name(p): g.spec() for p, g in leaves if g is not None}

    return Transform(init, apply, update, describe)
