"""Feature capture from unmodified Flax Linen models, and losses over the captured features.

A capturing apply function returns :class:`Outputs` ``(logits, features)`` instead of logits;
the train step reads ``.logits`` for its shape check and metrics and hands the whole structure
to the teacher's loss, which :func:`distill_loss` builds from a logit loss plus feature terms.
"""
from __future__ import annotations

import re
from typing import Any, Callable, NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
from flax import traverse_util

from jaxcompress.core.transform import Trainable, Transform, identity, intercepted
from jaxcompress.distill.feature_losses import apply_regressor
from jaxcompress.distill.logit_losses import check_weight


class Outputs(NamedTuple):
    """What a capturing apply function returns.

    Attributes:
      logits: float ``(N, num_classes)``.
      features: ``{name: array}`` of captured intermediates, names being module paths joined by
        ``'/'`` (e.g. ``'conv2'``, ``'block1/feat'`` for a value sown as ``'feat'``).
    """

    logits: jax.Array
    features: dict


def logits_of(output) -> jax.Array:
    """The logits of an apply function's output, whether plain logits or :class:`Outputs`."""
    return output.logits if isinstance(output, Outputs) else output


def _select(intermediates: dict, patterns) -> dict:
    found = {}
    for path, value in traverse_util.flatten_dict(intermediates).items():
        path = path[:-1] if path[-1] == "__call__" else path
        name = "/".join(path)
        if any(p.search(name) for p in patterns):
            found[name] = value[-1] if isinstance(value, tuple) else value
    return found


def capture_apply_fn(
    module: nn.Module, features: Sequence[str], *, inputs: str = "image", rng_collection: str = "dropout"
) -> Callable:
    """Like :func:`~jaxcompress.train.state.linen_apply_fn`, also returning selected intermediates.

    Uses Flax's ``capture_intermediates`` (the output of every submodule whose path matches) and
    any values the model ``sow``s into ``'intermediates'``; the model is not changed.

    Args:
      module: a Linen module called as ``module(x, train=...)``.
      features: regexes (:func:`re.search`) on module paths such as ``'conv2'`` or ``'^fc1$'``;
        each must match at least one captured value (checked at trace time).
      inputs: the batch entry the module takes.
      rng_collection: the rng name for stochastic layers.

    Returns:
      ``apply_fn(params, model_state, batch, *, train, rng) -> (Outputs, model_state)``.

    Raises:
      ValueError: no patterns, or a pattern that matches nothing (the message lists the paths).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.models import MLP
      >>> m = MLP(features=(8, 4))
      >>> params = m.init(jax.random.key(0), jnp.zeros((2, 3)))['params']
      >>> out, _ = capture_apply_fn(m, ['^fc2$'])(params, {}, {'image': jnp.ones((2, 3))}, train=False)
      >>> out.logits.shape, {k: v.shape for k, v in out.features.items()}
      ((2, 10), {'fc2': (2, 4)})
    """
    if isinstance(features, str) or not features:
        raise ValueError(f"features must be a non-empty list of path regexes, e.g. ['conv2'], got {features!r}.")
    patterns = [re.compile(p) for p in features]

    def wanted(mdl, method_name):
        return method_name == "__call__" and any(p.search("/".join(mdl.path)) for p in patterns)

    def apply_fn(params, model_state, batch, *, train: bool, rng=None):
        variables = {"params": params, **model_state}
        rngs = {rng_collection: rng} if rng is not None else {}
        mutable = ["intermediates"] + (list(model_state.keys()) if train else [])
        logits, new = module.apply(variables, batch[inputs], train=train, rngs=rngs, mutable=mutable,
                                   capture_intermediates=wanted)
        new = dict(new)
        captured = _select(new.pop("intermediates", {}), patterns)
        for p in patterns:
            if not any(p.search(name) for name in captured):
                raise ValueError(
                    f"feature pattern {p.pattern!r} matched no module output; captured: {sorted(captured)}. "
                    "Patterns are regexes on '/'-joined module paths such as 'conv2' or 'block1/feat'."
                )
        return Outputs(logits, captured), (new if train and model_state else model_state)

    return apply_fn


class RegressorState(NamedTuple):
    """State of :func:`feature_regressors`.

    Attributes:
      regressors: ``Trainable({module path: init_regressor(...) params})``, trained by the step's
        optimizer with the student.
    """

    regressors: Trainable


def feature_regressors(regressors: dict) -> Transform:
    """FitNets regressors (Romero et al. 2015) as a transform: trained with the student, dropped after.

    The regressors live in the transform's state as :class:`~jaxcompress.core.transform.Trainable`
    values (the one home of values a method trains); the student's params stay the model's own.
    While the model runs (inside :func:`~jaxcompress.train.step.make_train_step`), the
    transform's interceptor maps the output of each named module through its regressor and sows
    the result as ``'PATH/regressed'``, which :func:`capture_apply_fn` captures like any other
    feature: use ``FeatureTerm('PATH/regressed', teacher_feature, hint_loss)``. The weights are
    not changed (``apply`` is the identity), so the regressors can be chained with compression
    transforms and simply left out when the student is saved.

    Args:
      regressors: ``{module path: init_regressor(...)}`` (paths as ``'conv2'`` or ``'block/fc'``).

    Returns:
      A :class:`~jaxcompress.core.transform.Transform` with :class:`RegressorState`.

    Raises:
      TypeError: ``regressors`` is not a dict of ``{'kernel', 'bias'}`` params keyed by path.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jaxcompress.distill.feature_losses import init_regressor
      >>> from jaxcompress.models import MLP
      >>> m = MLP(features=(4,))
      >>> p = m.init(jax.random.key(0), jnp.zeros((2, 3)))['params']
      >>> t = feature_regressors({'fc1': init_regressor(jax.random.key(1), (2, 4), (2, 6))})
      >>> with intercepted(t, t.init(p), train=False):
      ...     out, _ = capture_apply_fn(m, ['fc1/regressed'])(p, {}, {'image': jnp.ones((2, 3))}, train=False)
      >>> out.features['fc1/regressed'].shape
      (2, 6)
    """
    if not isinstance(regressors, dict) or not regressors:
        raise TypeError(f"regressors must be a non-empty dict {{module path: init_regressor(...)}}, got {regressors!r}.")
    for name, reg in regressors.items():
        if not isinstance(name, str) or not isinstance(reg, dict) or set(reg) != {"kernel", "bias"}:
            raise TypeError(f"regressors[{name!r}] must be init_regressor(...) params ({{'kernel', 'bias'}}) under a "
                            f"module path, got {type(reg).__name__}.")

    def init(params):
        del params
        return RegressorState(Trainable(dict(regressors)))

    def intercept(state, *, train, axis_name, observed, observe=None):
        del train, axis_name, observed, observe
        regs = state.regressors.value

        def interceptor(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            name = "/".join(context.module.path)
            if context.method_name == "__call__" and name in regs:
                context.module.sow("intermediates", "regressed", apply_regressor(regs[name], out))
            return out

        return interceptor

    # the weights are left as they are: identity's apply, update and describe
    return identity()._replace(init=init, intercept=intercept)


class FeatureTerm(NamedTuple):
    """One feature term of :func:`distill_loss`.

    Attributes:
      student: name of the student's captured feature.
      teacher: name of the teacher's captured feature.
      loss: ``loss(student_feature, teacher_feature) -> (N,)``, e.g. ``hint_loss``,
        ``attention_transfer_loss``, ``rkd_distance_loss``.
      weight: ``>= 0``.
    """

    student: str
    teacher: str
    loss: Callable[[jax.Array, jax.Array], jax.Array]
    weight: float = 1.0


def distill_loss(logit_loss: Optional[Callable] = None, features: Sequence[FeatureTerm] = ()) -> Callable:
    """Combines a logit loss and feature terms into one ``Teacher.loss``.

    ``loss(student_out, teacher_out, labels=labels) = logit_loss(s.logits, t.logits, labels=labels)
    + sum_k weight_k * loss_k(s.features[student_k], t.features[teacher_k])``, per example.

    Args:
      logit_loss: e.g. ``functools.partial(kd_loss, temperature=4.0)``; None for features only.
      features: :class:`FeatureTerm` s.

    Returns:
      ``loss(student_out, teacher_out, *, labels=None) -> (N,)``.

    Raises:
      ValueError: a negative weight; at trace time, a feature name that was not captured.

    Example:
      >>> import functools, jax.numpy as jnp
      >>> from jaxcompress.distill import hint_loss, kd_loss
      >>> loss = distill_loss(functools.partial(kd_loss, temperature=2.0),
      ...                     [FeatureTerm('fc1', 'fc1', hint_loss, 0.5)])
      >>> s = Outputs(jnp.zeros((1, 3)), {'fc1': jnp.ones((1, 4))})
      >>> t = Outputs(jnp.zeros((1, 3)), {'fc1': jnp.zeros((1, 4))})
      >>> float(loss(s, t)[0])
      0.5
    """
    terms = []
    for i, term in enumerate(features):
        if not isinstance(term, FeatureTerm):
            raise TypeError(f"features[{i}] must be a FeatureTerm(student, teacher, loss, weight), got {term!r}.")
        terms.append(term._replace(weight=check_weight(f"features[{i}].weight", term.weight)))
    if logit_loss is None and not terms:
        raise ValueError("distill_loss needs a logit_loss or at least one FeatureTerm.")

    def loss(student_out, teacher_out, *, labels=None):
        s_logits, t_logits = logits_of(student_out), logits_of(teacher_out)
        total = 0.0 if logit_loss is None else logit_loss(s_logits, t_logits, labels=labels)
        for term in terms:
            for who, out, name in (("student", student_out, term.student), ("teacher", teacher_out, term.teacher)):
                feats = out.features if isinstance(out, Outputs) else {}
                if name not in feats:
                    raise ValueError(
                        f"{who} feature {name!r} was not captured (have {sorted(feats)}); build the {who}'s "
                        "apply function with capture_apply_fn(module, [...]) selecting it."
                    )
            total = total + term.weight * term.loss(student_out.features[term.student],
                                                     teacher_out.features[term.teacher])
        return total

    return loss
