"""Function matching (Beyer et al. 2022): in-step augmentations shared by teacher and student.

The train step runs ``augment(rng, batch) -> batch`` inside the jitted step before both forward
passes, so the teacher is evaluated on exactly the augmented images the student sees ("consistent
teaching"). The factories below build such functions; :func:`compose` chains them.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxcompress.core.validation import check_int, check_positive
from jaxcompress.distill.logit_losses import check_rate

#: ``augment(rng, batch) -> batch`` where ``batch`` is ``{'image': (N, H, W, C), 'label': ...}``.
Augment = Callable[[jax.Array, dict], dict]


def random_shift(max_shift: int = 2) -> Augment:
    """Shifts every image by its own random integer offset in ``[-max_shift, max_shift]`` pixels.

    Pixels shifted in are zero (the pad value of standardised data is its mean).

    Args:
      max_shift: largest shift per axis, an int ``>= 0`` (Hinton et al. 2015 jitter MNIST by 2).

    Returns:
      ``augment(rng, batch) -> batch``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> x = jnp.zeros((2, 5, 5, 1)).at[:, 2, 2, 0].set(1.0)
      >>> out = random_shift(1)(jax.random.key(0), {"image": x, "label": jnp.zeros(2, jnp.int32)})
      >>> [float(out["image"][i].sum()) for i in range(2)]
      [1.0, 1.0]
    """
    max_shift = check_int("max_shift", max_shift, minimum=0)

    def augment(rng, batch):
        x = batch["image"]
        if max_shift == 0:
            return batch
        n, h, w = x.shape[0], x.shape[1], x.shape[2]
        pad = ((0, 0), (max_shift, max_shift), (max_shift, max_shift)) + ((0, 0),) * (x.ndim - 3)
        padded = jnp.pad(x, pad)
        offsets = jax.random.randint(rng, (n, 2), 0, 2 * max_shift + 1)

        def crop(img, off):
            start = (off[0], off[1]) + (0,) * (img.ndim - 2)
            return jax.lax.dynamic_slice(img, start, (h, w) + img.shape[2:])

        return {**batch, "image": jax.vmap(crop)(padded, offsets)}

    return augment


def input_dropout(rate: float) -> Augment:
    """Drops input pixels with probability ``rate`` and rescales the rest by ``1 / (1 - rate)``.

    Args:
      rate: drop probability in ``[0, 1)`` (Hinton et al. 2012 use 0.2 on MNIST pixels).

    Returns:
      ``augment(rng, batch) -> batch``.
    """
    rate = check_rate("rate", rate)

    def augment(rng, batch):
        if rate == 0.0:
            return batch
        x = batch["image"]
        keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
        return {**batch, "image": jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)}

    return augment


def mixup(alpha: float = 1.0, *, num_classes: int) -> Augment:
    """Mixup (Zhang et al. 2018) inside the step: ``x = lam * x + (1 - lam) * x[perm]``.

    One ``lam ~ Beta(alpha, alpha)`` per batch and a random permutation pair the examples. Labels
    become soft (float ``(N, num_classes)``), which :func:`~jaxcompress.distill.cross_entropy` (the
    step's default loss, and the hard-label term of ``kd_loss`` / ``hard_label_kd_loss``) takes as
    class probabilities; the step's accuracy metric uses their argmax (DKD needs integer labels).
    Beyer et al. (2022) found mixup of the *shared* teacher/student input the key ingredient of
    function matching.

    Args:
      alpha: Beta concentration, ``> 0``.
      num_classes: width of the soft labels.

    Returns:
      ``augment(rng, batch) -> batch``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> b = {"image": jnp.ones((4, 2, 2, 1)), "label": jnp.arange(4, dtype=jnp.int32)}
      >>> out = mixup(1.0, num_classes=4)(jax.random.key(0), b)
      >>> out["label"].shape, bool(jnp.allclose(out["label"].sum(-1), 1.0))
      ((4, 4), True)
    """
    alpha = check_positive("alpha", alpha)
    num_classes = check_int("num_classes", num_classes, minimum=1)

    def augment(rng, batch):
        x, y = batch["image"], batch["label"]
        k_lam, k_perm = jax.random.split(rng)
        lam = jax.random.beta(k_lam, alpha, alpha)
        perm = jax.random.permutation(k_perm, x.shape[0])
        y = jax.nn.one_hot(y, num_classes) if jnp.issubdtype(y.dtype, jnp.integer) else y
        x = (lam * x + (1.0 - lam) * x[perm]).astype(x.dtype)
        return {**batch, "image": x, "label": lam * y + (1.0 - lam) * y[perm]}

    return augment


def compose(*augments: Augment) -> Augment:
    """Chains augmentations left to right, each with its own key.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> aug = compose(random_shift(2), input_dropout(0.0))
      >>> aug(jax.random.key(0), {"image": jnp.ones((1, 4, 4, 1)), "label": jnp.zeros(1, jnp.int32)})["image"].shape
      (1, 4, 4, 1)
    """
    for i, a in enumerate(augments):
        if not callable(a):
            raise TypeError(f"augments[{i}] must be a function augment(rng, batch) -> batch, got {a!r}.")

    def augment(rng, batch):
        for a, key in zip(augments, jax.random.split(rng, max(len(augments), 1))):
            batch = a(key, batch)
        return batch

    return augment
