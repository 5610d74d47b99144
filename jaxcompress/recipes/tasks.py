"""What a recipe's data set asks of the runner: image classification or byte-level language modelling.

A :class:`Split` holds the data of a run; the functions here give, for either kind, the batches
a stage trains on (a pure function of the seed and the step, so a resumed stage reads the same
batches), the data a model is scored on, the loss and metrics, and the calibration examples.
"""
from __future__ import annotations

import itertools
import math
from typing import Callable, Iterator, NamedTuple, Optional

import numpy as np

from jaxcompress.data.batching import epochs as epoch_batches
from jaxcompress.data.batching import num_batches
from jaxcompress.recipes.keys import TEXT_DATASETS
from jaxcompress.recipes.schema import RecipeError


class Split(NamedTuple):
    """The data a recipe runs on: train, validation and test.

    For images each split is ``(images, labels)`` and the validation split is carved out of the
    training set; for text (``seq_len`` set) each split is a 1-D array of byte tokens and the
    validation split is the corpus' own held-out files.
    """

    name: str
    source: str
    num_classes: int
    train: tuple | np.ndarray
    validation: tuple | np.ndarray
    test: tuple | np.ndarray
    seq_len: Optional[int] = None

    @property
    def text(self) -> bool:
        return self.seq_len is not None

    def size(self, which: str) -> int:
        """Examples (images) or bytes (text) in split ``which``."""
        part = getattr(self, which)
        return len(part) if self.text else len(part[1])

    @property
    def unit(self) -> str:
        return "bytes" if self.text else "images"


def load_split(data: dict, log: Callable[[str], None] = print) -> Split:
    """Loads the recipe's data set; for images, carves the validation split out of its training set."""
    if data["name"] in TEXT_DATASETS:
        return _load_text(data)
    from jaxcompress.data import load_dataset

    ds = load_dataset(data["name"], data.get("dir"), download=data["download"],
                      fallback_to_digits=data["fallback_to_digits"], log=log)
    xs, ys = ds.train_images, ds.train_labels
    xt, yt = ds.test_images, ds.test_labels
    if data.get("train_subset"):
        xs, ys = xs[: data["train_subset"]], ys[: data["train_subset"]]
    if data.get("test_subset"):
        xt, yt = xt[: data["test_subset"]], yt[: data["test_subset"]]
    v = data["validation"]
    n_val = int(round(v * len(ys))) if isinstance(v, float) else int(v)
    if not 1 <= n_val < len(ys):
        raise RecipeError(f"carves {n_val} of {len(ys)} training examples for validation; give a fraction in (0, 1) "
                          "or a count that leaves training examples.", key="data.validation")
    order = np.random.default_rng(data["split_seed"]).permutation(len(ys))
    val, train = order[:n_val], np.sort(order[n_val:])
    return Split(ds.name, ds.source, ds.num_classes, (xs[train], ys[train]), (xs[val], ys[val]), (xt, yt))


def _load_text(data: dict) -> Split:
    from jaxcompress.data.text import load_python_corpus

    corpus = load_python_corpus(max_bytes=data.get("max_bytes"), root=data.get("dir"))
    parts = {}
    for which in ("train", "validation", "test"):
        tokens = getattr(corpus, which)
        cap = data.get(f"{which}_subset")
        parts[which] = tokens[:cap] if cap else tokens
        if len(parts[which]) < data["seq_len"] + 1:
            raise RecipeError(f"the {which} split holds {len(parts[which])} bytes, fewer than seq_len + 1 = "
                              f"{data['seq_len'] + 1}; use a shorter seq_len or more bytes.", key="data.seq_len")
    source = data.get("dir") or f"the Python {corpus.python_version} standard library (files {corpus.files_sha256[:12]})"
    return Split(data["name"], source, 256, parts["train"], parts["validation"], parts["test"], seq_len=data["seq_len"])


def example_input(split: Split) -> np.ndarray:
    """One input of the model's shape, to initialise it."""
    return np.zeros((1, split.seq_len), np.int32) if split.text else split.train[0][:1]


def inputs_key(split: Split) -> str:
    """The batch entry a model reads."""
    return "tokens" if split.text else "image"


def labels_key(split: Split) -> str:
    """The batch entry a loss scores against (a teacher's ``labels=``)."""
    return "targets" if split.text else "label"


def objective(split: Split) -> dict:
    """``loss_fn`` / ``metrics_fn`` for the train and eval steps (none: the classification defaults)."""
    if not split.text:
        return {}
    from jaxcompress.train.objectives import token_loss, token_metrics

    return {"loss_fn": token_loss, "metrics_fn": token_metrics}


def steps_per_epoch(split: Split, batch_size: int) -> int:
    """Steps of one pass over the training images (text: ``ValueError``, its stages count steps)."""
    if split.text:
        raise ValueError("a text corpus has no epochs; its stages give their length in steps.")
    return num_batches(split.size("train"), batch_size)


def _windows(tokens: np.ndarray, batch_size: int, seq_len: int, seed: tuple) -> dict:
    from jaxcompress.data.text import sample_windows

    return sample_windows(tokens, batch_size=batch_size, seq_len=seq_len, rng=np.random.default_rng(seed))


def train_batches(split: Split, batch_size: int, seed: int, num_steps: int, start: int = 0) -> Iterator[dict]:
    """The batches of steps ``start .. num_steps - 1``: shuffled epochs of images (epoch ``e``
    from ``[seed, e]``), or random windows of the training bytes (step ``i`` from ``[seed, i]``)."""
    if split.text:
        return (_windows(split.train, batch_size, split.seq_len, (seed, i)) for i in range(start, num_steps))
    xs, ys = split.train
    per_epoch = steps_per_epoch(split, batch_size)
    batches = epoch_batches(xs, ys, batch_size, seed=seed, num_epochs=math.ceil(num_steps / per_epoch))
    return itertools.islice(batches, start, num_steps)


def calibration_batches(split: Split, count: int, batch_size: int, seed: int) -> list[dict]:
    """``count`` training examples (windows of text, images) in batches of ``batch_size``, for one-shot calibration."""
    sizes = [min(batch_size, count - i) for i in range(0, count, batch_size)]
    if split.text:
        return [{"tokens": _windows(split.train, n, split.seq_len, (seed, j))["tokens"]} for j, n in enumerate(sizes)]
    order = np.random.default_rng(seed).permutation(split.size("train"))[:count]
    return [{"image": split.train[0][np.sort(order[i: i + n])]} for i, n in zip(range(0, count, batch_size), sizes)]


def score(eval_step: Callable, state, split: Split, which: str, batch_size: int) -> dict:
    """``{'accuracy': ...}`` of a model on split ``which`` (every example, or every next byte once,
    in non-overlapping windows), with ``'perplexity'`` per byte for text."""
    from jaxcompress.train.evaluation import evaluate

    if not split.text:
        x, y = getattr(split, which)
        return {"accuracy": evaluate(eval_step, state, {"image": x, "label": y}, batch_size=batch_size)["accuracy"]}
    from jaxcompress.data.text import eval_windows
    from jaxcompress.distill.losses import perplexity

    out = evaluate(eval_step, state, eval_windows(getattr(split, which), batch_size=batch_size, seq_len=split.seq_len))
    return {"accuracy": out["accuracy"], "perplexity": float(perplexity(out["loss"]))}
