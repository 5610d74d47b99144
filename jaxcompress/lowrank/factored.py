"""Low-rank models: any Flax model with chosen Dense/Conv layers run as two smaller layers.

:class:`LowRank` wraps a model and, through ``nn.intercept_methods``, runs each named Dense or
Conv layer as two layers: ``x @ u @ v + bias`` (Dense), a ``kh x kw`` convolution to ``rank``
channels then a 1x1 one (``'reshape'``), or a ``kh x 1`` then a ``1 x kw`` convolution
(``'spatial'``). The wrapped model's code is untouched and its parameter paths are kept: a
factored layer ``fc1`` holds ``fc1/u``, ``fc1/v`` and ``fc1/bias`` instead of ``fc1/kernel``.

Why a model rewrite rather than a :class:`~jaxcompress.core.transform.Transform` whose view is
``u @ v``: the view of a transform is a dense kernel, so training and inference would still
run the full product; here the factors *are* the model's params, the ordinary train step and
optimizer train them, the forward pass costs ``r (m + n)`` instead of ``m n`` in training as at
inference, and the saved model holds the two small layers, never the product.
:func:`factorize` is the post-training step (truncated SVD of trained kernels); fine-tuning is
ordinary training of the result with ``make_train_step(linen_apply_fn(lowrank_module), ...)``.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxcompress.lowrank.svd import check_mode, factor_kernel, pick_rank

_DN = ("NHWC", "HWIO", "NHWC")


def _pairs(value, n, what):
    if value is None:
        return (1,) * n
    if isinstance(value, int):
        return (value,) * n
    return tuple(value)


def _conv(x, kernel, strides, padding):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DN)


def _check_conv(m: nn.Conv):
    if len(m.kernel_size) != 2:
        raise ValueError(f"LowRank factors 2-D convolutions only; layer {m.name!r} has kernel_size {m.kernel_size}.")
    if (m.feature_group_count != 1 or _pairs(m.input_dilation, 2, "") != (1, 1)
            or _pairs(m.kernel_dilation, 2, "") != (1, 1)):
        raise ValueError(f"LowRank: layer {m.name!r} uses groups or dilation, which factoring does not support.")
    if not (isinstance(m.padding, str) and m.padding in ("SAME", "VALID")):
        raise ValueError(f"LowRank: layer {m.name!r} has padding {m.padding!r}; 'SAME' and 'VALID' are supported.")


class LowRank(nn.Module):
    """``module`` with the layers named in ``ranks`` run as two smaller layers.

    Attributes:
      module: any Flax Linen model (its Dense and Conv layers are found by path).
      ranks: ``{layer path: rank}``, e.g. ``{'fc1': 64}``; a path is the layer's module names
        joined by ``'/'`` (``'fc1'``, ``'stage2_block0/conv1'``).
      mode: ``'reshape'`` or ``'spatial'`` for convolutions (see :mod:`jaxcompress.lowrank.svd`).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> model = LowRank(MLP(), {'fc1': 32})
      >>> v = model.init(jax.random.key(0), jnp.zeros((1, 784)))
      >>> {k: x.shape for k, x in sorted(v['params']['fc1'].items())}
      {'bias': (300,), 'u': (784, 32), 'v': (32, 300)}
      >>> model.apply(v, jnp.zeros((2, 784))).shape
      (2, 10)
    """

    module: nn.Module
    ranks: Mapping[str, int]
    mode: str = "reshape"

    def setup(self):
        check_mode(self.mode)
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        seen = set()

        def intercept(next_fun, args, kwargs, context):
            m = context.module
            if context.method_name != "__call__" or not isinstance(m, (nn.Dense, nn.Conv)):
                return next_fun(*args, **kwargs)
            path = "/".join(m.path)
            if path not in self.ranks:
                return next_fun(*args, **kwargs)
            seen.add(path)
            return _factored_call(m, args[0], int(self.ranks[path]), self.mode)

        with nn.intercept_methods(intercept):
            out = self.module(*args, **kwargs)
        missing = sorted(set(self.ranks) - seen)
        if missing:
            raise ValueError(f"LowRank: ranks names {missing}, which are not Dense or Conv layers of the model.")
        return out


def _factored_call(m, x, r: int, mode: str):
    init = nn.initializers.lecun_normal()
    dtype = m.param_dtype
    if isinstance(m, nn.Dense):
        u = m.param("u", init, (x.shape[-1], r), dtype)
        v = m.param("v", init, (r, m.features), dtype)
        y = jnp.dot(jnp.dot(x, u), v)
    else:
        _check_conv(m)
        kh, kw = m.kernel_size
        sh, sw = _pairs(m.strides, 2, "strides")
        cin = x.shape[-1]
        if mode == "reshape":
            u = m.param("u", init, (kh, kw, cin, r), dtype)
            v = m.param("v", init, (r, m.features), dtype)
            y = jnp.dot(_conv(x, u, (sh, sw), m.padding), v)
        else:
            u = m.param("u", init, (kh, 1, cin, r), dtype)
            v = m.param("v", init, (1, kw, r, m.features), dtype)
            y = _conv(_conv(x, u, (sh, 1), m.padding), v, (1, sw), m.padding)
    if m.use_bias:
        y = y + m.param("bias", nn.initializers.zeros_init(), (m.features,), dtype)
    return y


def factorize(
    module: nn.Module,
    params: Any,
    *,
    ranks: Optional[Mapping[str, int]] = None,
    energy: Optional[Mapping[str, float]] = None,
    mode: str = "reshape",
) -> tuple[LowRank, Any]:
    """Post-training factorization: truncated SVD of the named layers' trained kernels.

    Args:
      module: the trained model.
      params: its params.
      ranks: ``{layer path: rank}``; or
      energy: ``{layer path: fraction of squared singular values to keep}`` (exactly one of the two).
      mode: ``'reshape'`` or ``'spatial'`` for convolutions.

    Returns:
      ``(LowRank(module, ranks, mode), params)`` with each factored layer's kernel replaced by
      ``u``, ``v`` (its bias kept): the best rank-``r`` approximation of each kernel.

    Raises:
      ValueError: both or neither of ``ranks``/``energy``, a path that is not a layer with a
        kernel, a rank out of range.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> p = MLP().init(jax.random.key(0), jnp.zeros((1, 784)))['params']
      >>> model, q = factorize(MLP(), p, ranks={'fc1': 300})   # full rank: the same model
      >>> x = jax.random.normal(jax.random.key(1), (2, 784))
      >>> bool(jnp.allclose(model.apply({'params': q}, x), MLP().apply({'params': p}, x), atol=1e-4))
      True
    """
    check_mode(mode)
    if (ranks is None) == (energy is None):
        raise ValueError("factorize: give exactly one of ranks={path: rank} or energy={path: fraction}.")
    wanted = dict(ranks if ranks is not None else energy)
    params = jax.tree.map(lambda x: x, dict(params))
    chosen = {}
    for path, value in wanted.items():
        node, keys = params, path.split("/")
        for k in keys[:-1]:
            node = node.get(k, {}) if isinstance(node, Mapping) else {}
        layer = node.get(keys[-1]) if isinstance(node, Mapping) else None
        if not isinstance(layer, Mapping) or "kernel" not in layer:
            raise ValueError(f"factorize: {path!r} is not a layer with a 'kernel' in the params.")
        kernel = np.asarray(layer["kernel"])
        r = pick_rank(kernel, rank=value, mode=mode) if ranks is not None else pick_rank(kernel, energy=value, mode=mode)
        u, v = factor_kernel(kernel, r, mode)
        new = {k: x for k, x in layer.items() if k != "kernel"}
        new.update(u=jnp.asarray(u), v=jnp.asarray(v))
        # Copy the path's dicts so the caller's params are not changed.
        node = params
        for k in keys[:-1]:
            node[k] = dict(node[k])
            node = node[k]
        node[keys[-1]] = new
        chosen[path] = r
    return LowRank(module, chosen, mode), params
