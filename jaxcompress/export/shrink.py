"""Structural shrink: remove pruned channels and neurons physically, giving a smaller dense model.

Channel pruning (``pruning(s, structure=Channels(axis=-1))``) only zeroes kernel columns: the
model still runs at full width. :func:`shrink` reads the masks from the transform's description,
deletes the removed output channels of each layer together with the matching input rows of the
layers that read them (and the BatchNorm entries in between), and returns a smaller module config
with its params: a dense model that computes the same outputs as the masked one.

Which layers share channels is a list of :class:`ChannelGroup` s; :func:`channel_groups` gives
it for the library's MLP, CNN, LeNet5 and ResNet. A residual addition ties channels: every layer
writing to the residual stream of a stage (the stem or the shortcut projection, and each
block's last convolution) is a *producer* of the same group, so a channel can only go from all of
them at once. :func:`tied_channel_masks` ranks each group's channels once (summing the producers'
normalised channel norms) and masks every producer kernel, its bias and its BatchNorm scale and
offset together; with those masks (``fixed_masks(masks, structure=Channels(-1))``) a removed
channel is exactly zero everywhere and :func:`shrink` is exact for every model.

With per-layer masks from ``pruning`` the biases stay, so a removed neuron still emits the
constant ``activation(norm(bias))``. :func:`shrink` folds that constant into the bias of a Dense
consumer (exact, also after a flatten or pooling). A convolution with 'SAME' padding cannot
absorb a constant exactly (its border pixels see fewer of it), so there a removed channel must be
exactly zero and :func:`shrink` says how to get there otherwise.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.core.paths import get_path
from jaxcompress.core.transform import LeafSpec
from jaxcompress.core.validation import check_fraction
from jaxcompress.models.cnn import CNN, LeNet5
from jaxcompress.models.mlp import MLP
from jaxcompress.models.resnet import ResNet
from jaxcompress.prune.masks import num_pruned

#: Flax BatchNorm's default epsilon (the library's models use it).
BN_EPSILON = 1e-5


class ChannelGroup(NamedTuple):
    """Channels that are removed together.

    Attributes:
      name: a label (sparsities may be given per group name).
      producers: module paths (``'fc1'``, ``'stage2_block0/proj'``) of the Dense/Conv layers whose
        output channels these are (last kernel axis and bias). Several producers meet at a
        residual addition.
      consumers: module paths of the Dense/Conv layers that read these channels as their input
        (the kernel's second-to-last axis). A Dense layer after a flatten reads ``P * C`` rows,
        position-major (NHWC), and loses the rows of a removed channel at every position.
      norms: per producer, the BatchNorm module path normalising its output, or ``None``.
      activation: the element-wise function between the (normalised) producer and the consumers
        (``nn.relu``), when the constant output of a removed channel may be folded into Dense
        consumers' biases; ``None``: removed channels must be exactly zero (residual streams).
    """

    name: str
    producers: tuple
    consumers: tuple
    norms: tuple = ()
    activation: Optional[Callable] = None


class Shrunk(NamedTuple):
    """Result of :func:`shrink`.

    Attributes:
      module: the smaller module (same class, fewer features).
      params: its params.
      model_state: its other collections (BatchNorm statistics), ``{}`` if none.
      kept: per group name, the indices of the channels kept (int numpy array).
    """

    module: nn.Module
    params: Any
    model_state: Any
    kept: dict


def _mlp_groups(m: MLP):
    names = [f"fc{i + 1}" for i in range(len(m.features))] + ["head"]
    return [ChannelGroup(n, (n,), (nxt,), (None,), nn.relu) for n, nxt in zip(names[:-1], names[1:])]


def _chain_groups(layers, norms):
    return [
        ChannelGroup(n, (n,), (nxt,), (norm,), nn.relu) for n, nxt, norm in zip(layers[:-1], layers[1:], norms)
    ]


def _resnet_groups(m: ResNet):
    groups = []
    block = lambda s, b: f"stage{s + 1}_block{b}"  # noqa: E731
    for s, n in enumerate(m.blocks):
        first = ("stem", "stem_bn") if s == 0 else (f"{block(s, 0)}/proj", f"{block(s, 0)}/proj_bn")
        producers = [first[0]] + [f"{block(s, b)}/conv2" for b in range(n)]
        norms = [first[1]] + [f"{block(s, b)}/bn2" for b in range(n)]
        readers = [f"{block(s, b)}/conv1" for b in range(0 if s == 0 else 1, n)]
        if s + 1 < len(m.blocks):
            readers += [f"{block(s + 1, 0)}/conv1", f"{block(s + 1, 0)}/proj"]
        else:
            readers.append("head")
        groups.append(ChannelGroup(f"stage{s + 1}", tuple(producers), tuple(readers), tuple(norms), None))
        for b in range(n):
            p = block(s, b)
            groups.append(ChannelGroup(f"{p}/conv1", (f"{p}/conv1",), (f"{p}/conv2",), (f"{p}/bn1",), nn.relu))
    return groups


def channel_groups(module: nn.Module) -> list:
    """The :class:`ChannelGroup` s of a library model: which channels can go, and with what.

    Every hidden layer of an ``MLP``, ``LeNet5`` and ``CNN``; for a ``ResNet`` the residual
    stream of each stage (stem or projection plus every block's ``conv2``) and each block's
    inner ``conv1``. Output layers are never in a group.

    Raises:
      TypeError: for another module; pass ``groups=`` (and ``rebuild=``) to :func:`shrink` yourself.

    Example:
      >>> from jaxcompress.models import MLP
      >>> [(g.name, g.producers, g.consumers) for g in channel_groups(MLP())]
      [('fc1', ('fc1',), ('fc2',)), ('fc2', ('fc2',), ('head',))]
    """
    if isinstance(module, MLP):
        return _mlp_groups(module)
    if isinstance(module, LeNet5):
        return _chain_groups(["conv1", "conv2", "fc1", "fc2", "head"], [None] * 4)
    if isinstance(module, CNN):
        convs = [f"conv{i + 1}" for i in range(len(module.channels))]
        norms = [f"bn{i + 1}" if module.batch_norm else None for i in range(len(convs))] + [None]
        return _chain_groups(convs + ["fc1", "head"], norms)
    if isinstance(module, ResNet):
        return _resnet_groups(module)
    raise TypeError(
        f"channel_groups knows MLP, LeNet5, CNN and ResNet, got {type(module).__name__}; describe your model's "
        "channels with ChannelGroup(...) and pass groups= and rebuild= to shrink."
    )


def _rebuild(module: nn.Module, widths: dict) -> nn.Module:
    if isinstance(module, MLP):
        return module.clone(features=tuple(widths[f"fc{i + 1}"] for i in range(len(module.features))))
    if isinstance(module, LeNet5):
        return module.clone(channels=(widths["conv1"], widths["conv2"]), features=(widths["fc1"], widths["fc2"]))
    if isinstance(module, CNN):
        return module.clone(
            channels=tuple(widths[f"conv{i + 1}"] for i in range(len(module.channels))), hidden=widths["fc1"]
        )
    if isinstance(module, ResNet):
        stages = tuple(widths["stem" if s == 0 else f"stage{s + 1}_block0/proj"] for s in range(len(module.blocks)))
        inner = tuple(
            widths[f"stage{s + 1}_block{b}/conv1"] for s, n in enumerate(module.blocks) for b in range(n)
        )
        return module.clone(widths=stages, inner=inner)
    raise TypeError(f"no rebuild rule for {type(module).__name__}; pass rebuild=(module, widths) -> module.")


def _set(tree: dict, path: str, value) -> None:
    keys = path.split("/")
    node = tree
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


def _copy(tree):
    return {k: _copy(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def _layer(params, path: str, what: str):
    layer = get_path(params, path)
    if layer is None or get_path(layer, "kernel") is None:
        raise ValueError(f"{what} {path!r} is not a layer with a 'kernel' in the params; check the ChannelGroup paths.")
    return layer


def tied_channel_masks(params: Any, groups: Sequence[ChannelGroup], sparsity: Union[float, dict], *, ord: int = 1):
    """Channel masks shared by every layer of each group: kernels, biases and BatchNorm together.

    Each group's channels are ranked by the sum over its producers of the channel's ``ord``-norm
    divided by that producer's mean channel norm (so layers of different scale weigh alike), and
    ``round(sparsity * channels)`` lowest are removed from every producer kernel, bias and
    BatchNorm scale and offset at once: a removed channel is exactly zero, before and after any
    residual addition.

    Args:
      params: the model's params.
      groups: e.g. ``channel_groups(module)``.
      sparsity: fraction of each group's channels to remove, or ``{group name: fraction}``
        (groups not named keep every channel).
      ord: 1 or 2.

    Returns:
      A pytree like ``params`` with bool masks at the masked leaves and ``None`` elsewhere: use it
      with ``fixed_masks(masks, structure=Channels(axis=-1))``.

    Raises:
      ValueError: bad sparsity or ``ord``, a group path missing from the params, producers of one
        group with different channel counts, or a sparsity for an unknown group name.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> p = MLP((4,)).init(jax.random.key(0), jnp.zeros((1, 3)))['params']
      >>> m = tied_channel_masks(p, channel_groups(MLP((4,))), 0.5)
      >>> m['fc1']['kernel'].shape, int(m['fc1']['bias'].sum()), m['head']['kernel'] is None
      ((3, 4), 2, True)
    """
    if ord not in (1, 2):
        raise ValueError(f"ord must be 1 or 2, got {ord!r}.")
    names = {g.name for g in groups}
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - names)
        if unknown:
            raise ValueError(f"sparsity names groups {unknown} that are not among {sorted(names)}.")
        per_group = {k: check_fraction(f"sparsity[{k!r}]", v) for k, v in sparsity.items()}
    else:
        s = check_fraction("sparsity", sparsity)
        per_group = {n: s for n in names}
    masks = jax.tree.map(lambda _: None, params)
    masks = _copy(masks)
    for g in groups:
        if g.name not in per_group:
            continue
        layers = [_layer(params, p, "producer") for p in g.producers]
        widths = {int(jnp.shape(l["kernel"])[-1]) for l in layers}
        if len(widths) != 1:
            raise ValueError(f"group {g.name!r}: producers {g.producers} have different channel counts {sorted(widths)}.")
        score = 0.0
        for l in layers:
            k = np.abs(np.asarray(l["kernel"], np.float64).reshape(-1, np.shape(l["kernel"])[-1]))
            norm = k.sum(0) if ord == 1 else np.sqrt((k * k).sum(0))
            score = score + norm / max(norm.mean(), 1e-30)
        c = widths.pop()
        keep = np.ones(c, bool)
        keep[np.argsort(score, kind="stable")[: num_pruned(c, per_group[g.name])]] = False  # ties: earlier first
        for i, p in enumerate(g.producers):
            _set(masks, f"{p}/kernel", jnp.asarray(np.broadcast_to(keep, np.shape(layers[i]["kernel"]))))
            if get_path(params, f"{p}/bias") is not None:
                _set(masks, f"{p}/bias", jnp.asarray(keep))
            norm = g.norms[i] if i < len(g.norms) else None
            if norm is not None:
                for leaf in ("scale", "bias"):
                    if get_path(params, f"{norm}/{leaf}") is not None:
                        _set(masks, f"{norm}/{leaf}", jnp.asarray(keep))
    return masks


def _masks_from(description) -> dict:
    if not isinstance(description, Mapping):
        raise TypeError(
            f"description must be a {{path: LeafSpec}} dict (transform.describe(params, state)), "
            f"got {type(description).__name__}."
        )
    out = {}
    for path, spec in description.items():
        if not isinstance(spec, LeafSpec):
            raise TypeError(f"description[{path!r}] is a {type(spec).__name__}, expected a LeafSpec.")
        if spec.mask is not None:
            out[path] = np.asarray(spec.mask, bool)
    return out


def _dead_value(params, model_state, group: ChannelGroup, i: int, removed: np.ndarray) -> np.ndarray:
    """What producer ``i`` emits (after its norm) at the removed channels: its bias, normalised."""
    bias = get_path(params, f"{group.producers[i]}/bias")
    v = np.zeros(len(removed)) if bias is None else np.asarray(bias, np.float64)[removed]
    norm = group.norms[i] if i < len(group.norms) else None
    if norm is not None:
        stats = get_path(model_state.get("batch_stats", {}), norm) if model_state else None
        if stats is None:
            raise ValueError(f"BatchNorm {norm!r} of group {group.name!r} has no batch_stats in model_state.")
        mean = np.asarray(stats["mean"], np.float64)[removed]
        var = np.asarray(stats["var"], np.float64)[removed]
        scale = get_path(params, f"{norm}/scale")
        offset = get_path(params, f"{norm}/bias")
        scale = 1.0 if scale is None else np.asarray(scale, np.float64)[removed]
        offset = 0.0 if offset is None else np.asarray(offset, np.float64)[removed]
        v = (v - mean) / np.sqrt(var + BN_EPSILON) * scale + offset
    return v


def shrink(
    module: nn.Module,
    params: Any,
    description: Mapping[str, LeafSpec],
    *,
    model_state: Any = None,
    groups: Optional[Sequence[ChannelGroup]] = None,
    rebuild: Optional[Callable[[nn.Module, dict], nn.Module]] = None,
) -> Shrunk:
    """Removes the channels the masks prune: a smaller dense model with the same outputs.

    A channel of a group goes when every producer's kernel mask removes it (with tied masks, all
    or none do). Its producer kernel columns, biases and BatchNorm entries are deleted, and so
    are the consumers' input rows. If the removed channel still emits a constant (a bias the
    masks kept), the constant's contribution is added to the bias of Dense consumers; other
    consumers need it to be exactly zero.

    Args:
      module: the model (``MLP``, ``LeNet5``, ``CNN``, ``ResNet``, or any with ``groups`` and
        ``rebuild``).
      params: its params, latent or masked (the description's masks are applied first).
      description: ``transform.describe(params, state)``; the producer kernels' masks decide.
      model_state: e.g. ``{'batch_stats': ...}`` (needed with BatchNorm).
      groups: default ``channel_groups(module)``.
      rebuild: ``(module, {producer path: width}) -> smaller module``; default for the library's models.

    Returns:
      A :class:`Shrunk` ``(module, params, model_state, kept)``. Inference with the running
      statistics (``train=False``) gives the masked model's outputs to float rounding.

    Raises:
      TypeError: ``description`` is not a dict of ``LeafSpec`` s, or an unknown model without ``groups``.
      ValueError: a group path is missing, or a removed channel emits a non-zero constant into a
        convolution or a residual addition (use :func:`tied_channel_masks`, which also masks
        biases and BatchNorm).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress import pruning
      >>> from jaxcompress.models import MLP
      >>> from jaxcompress.prune.structures import Channels
      >>> model = MLP((8, 6))
      >>> p = model.init(jax.random.key(0), jnp.zeros((1, 5)))['params']
      >>> t = pruning(0.5, structure=Channels(axis=-1), rules=[('head', None), ('kernel', True)])
      >>> s = t.init(p)
      >>> small = shrink(model, p, t.describe(p, s))
      >>> small.module.features
      (4, 3)
      >>> x = jax.random.normal(jax.random.key(1), (3, 5))
      >>> masked = model.apply({'params': t.apply(p, s)}, x)
      >>> bool(jnp.allclose(small.module.apply({'params': small.params}, x), masked, atol=1e-5))
      True
    """
    groups = channel_groups(module) if groups is None else list(groups)
    masks = _masks_from(description)
    model_state = {} if model_state is None else model_state
    params = jax.tree.map(np.asarray, _copy(params))
    for path, m in masks.items():  # the masked view
        leaf = get_path(params, path)
        if leaf is None:
            raise ValueError(f"description names {path!r}, which is not a leaf of params.")
        _set(params, path, np.where(m, np.asarray(leaf), 0).astype(np.asarray(leaf).dtype))
    state = jax.tree.map(np.asarray, _copy(model_state))
    widths, kept_of = {}, {}
    for g in groups:
        for p in g.producers + g.consumers:
            _layer(params, p, "layer")
        c = int(jnp.shape(get_path(params, f"{g.producers[0]}/kernel"))[-1])
        keep = np.zeros(c, bool)
        for p in g.producers:
            m = masks.get(f"{p}/kernel")
            keep |= np.ones(c, bool) if m is None else m.reshape(-1, c).any(0)
        kept, removed = np.flatnonzero(keep), np.flatnonzero(~keep)
        if len(kept) == 0:  # a layer needs at least one channel; keep the first (it emits a constant)
            keep[0] = True
            kept, removed = np.flatnonzero(keep), np.flatnonzero(~keep)
        kept_of[g.name] = kept
        dead = sum(_dead_value(params, state, g, i, removed) for i in range(len(g.producers)))
        if g.activation is not None and len(removed):
            dead = np.asarray(g.activation(jnp.asarray(dead)), np.float64)
        if np.any(dead != 0):
            if g.activation is None:
                raise ValueError(
                    f"group {g.name!r}: removed channels {removed[dead != 0].tolist()} still emit a constant into a "
                    "residual addition; prune this group with tied_channel_masks(...), which also masks the biases "
                    "and BatchNorm scale and offset, so a removed channel is exactly zero."
                )
            for q in g.consumers:
                k = get_path(params, f"{q}/kernel")
                if jnp.ndim(k) != 2:
                    raise ValueError(
                        f"group {g.name!r}: removed channels emit a constant (bias kept by the masks) into the "
                        f"convolution {q!r}, which cannot absorb it exactly; prune with tied_channel_masks(...) so "
                        "biases and BatchNorm of removed channels are masked too."
                    )
                k3 = np.asarray(k, np.float64).reshape(-1, c, k.shape[-1])
                shift = np.einsum("c,pco->o", dead, k3[:, removed, :])
                b = get_path(params, f"{q}/bias")
                if b is None:
                    raise ValueError(f"group {g.name!r}: consumer {q!r} has no bias to absorb the removed constant.")
                _set(params, f"{q}/bias", (np.asarray(b, np.float64) + shift).astype(np.asarray(b).dtype))
        for p in g.producers:
            widths[p] = len(kept)
            _set(params, f"{p}/kernel", np.take(get_path(params, f"{p}/kernel"), kept, axis=-1))
            if get_path(params, f"{p}/bias") is not None:
                _set(params, f"{p}/bias", np.take(get_path(params, f"{p}/bias"), kept, axis=-1))
        for norm in g.norms:
            if norm is None:
                continue
            for tree, leaves in ((params, ("scale", "bias")), (state.get("batch_stats", {}), ("mean", "var"))):
                for leaf in leaves:
                    v = get_path(tree, f"{norm}/{leaf}")
                    if v is not None:
                        _set(tree, f"{norm}/{leaf}", np.take(v, kept, axis=-1))
        for q in g.consumers:
            k = get_path(params, f"{q}/kernel")
            shape = np.shape(k)
            if len(shape) == 2 and shape[0] != c:  # a Dense after a flatten: P positions x c channels
                k3 = np.reshape(k, (-1, c, shape[-1]))
                _set(params, f"{q}/kernel", np.reshape(np.take(k3, kept, axis=1), (-1, shape[-1])))
            else:
                _set(params, f"{q}/kernel", np.take(k, kept, axis=-2))
    new_module = (rebuild or _rebuild)(module, widths)
    params = jax.tree.map(jnp.asarray, params)
    return Shrunk(new_module, params, jax.tree.map(jnp.asarray, state), kept_of)
