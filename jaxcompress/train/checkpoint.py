"""Checkpoints of the whole TrainState with orbax: atomic, every N steps, last K kept, verified.

What is saved: every array leaf of the :class:`~jaxcompress.train.state.TrainState` (params,
optimizer state, compression state such as masks, scales, observer statistics and schedule
counters, model state such as BatchNorm statistics, the step, the PRNG key; never a teacher,
which is a step argument, not state) plus a
JSON record with each leaf's path, shape and dtype, a SHA-256 digest of all leaf bytes, and a
caller-defined data position (epoch, batch, ...). Restoring needs a state of the same structure
(``like``), e.g. a freshly initialised one, so a checkpoint from a different model is refused
with the differences listed.

Why it loses nothing when killed. Orbax writes each step into a temporary directory and renames
it when complete, so a process killed mid-write leaves no step that looks finished; a finished
step whose files were later truncated or damaged fails its digest (or its read), and
:meth:`Checkpointer.restore` then falls back to the previous step with a warning. "No
checkpoint" (``restore`` returns ``None``) and "checkpoints exist but none can be read"
(:class:`CheckpointError`) are different outcomes.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Any, NamedTuple, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxcompress.core.validation import check_int, is_prng_key

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """Checkpoints exist in the directory but none can be used (damaged, foreign or unreadable)."""


class Restored(NamedTuple):
    """A restored checkpoint.

    Attributes:
      state: the state, with the structure of ``like``.
      step: the checkpoint's step number.
      data_position: what was passed as ``data_position`` when saving (JSON types), or ``None``.
    """

    state: Any
    step: int
    data_position: Any


def _flatten(state) -> tuple[list, list[dict]]:
    """Array leaves (PRNG keys as their raw data) and their descriptions."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    leaves, spec = [], []
    for path, x in flat:
        impl = None
        if is_prng_key(x):
            impl = str(jax.random.key_impl(x))
            x = jax.random.key_data(x)
        elif not isinstance(x, jax.Array):
            x = np.asarray(x)
        spec.append({"path": jax.tree_util.keystr(path), "shape": list(x.shape), "dtype": str(x.dtype),
                     "key_impl": impl})
        leaves.append(x)
    return leaves, spec


def _host_bytes(x) -> bytes:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if not x.is_fully_replicated:
            return b""  # a sharded leaf: each process sees only part of it
        x = x.addressable_data(0)
    return np.ascontiguousarray(np.asarray(x)).tobytes()


def _digest(leaves) -> str:
    h = hashlib.sha256()
    for x in leaves:
        h.update(_host_bytes(x))
    return h.hexdigest()


class Checkpointer:
    """Saves a TrainState every ``every`` steps into ``directory``, keeping the last ``keep``.

    Args:
      directory: where the step directories go (created if missing).
      every: save when ``state.step % every == 0`` (or when forced).
      keep: number of most recent checkpoints kept.

    Example:
      >>> import tempfile, jax.numpy as jnp, optax
      >>> from jaxcompress.train.state import init_train_state
      >>> state = init_train_state({'w': jnp.ones((2, 2))}, optax.sgd(0.1))
      >>> with tempfile.TemporaryDirectory() as d:
      ...     ckpt = Checkpointer(d, every=1, keep=2)
      ...     _ = ckpt.save(state._replace(step=state.step + 1), data_position={'epoch': 0, 'batch': 1})
      ...     r = ckpt.restore(state)
      ...     ckpt.close()
      >>> r.step, r.data_position, float(r.state.params['w'][0, 0])
      (1, {'epoch': 0, 'batch': 1}, 1.0)
    """

    def __init__(self, directory: Any, *, every: int = 1000, keep: int = 3):
        self.every = check_int("every", every, minimum=1)
        self.keep = check_int("keep", keep, minimum=1)
        self.directory = os.path.abspath(os.fspath(directory))
        if os.path.exists(self.directory) and not os.path.isdir(self.directory):
            raise ValueError(f"directory {self.directory!r} is a file; give a directory for the checkpoints.")
        parent = self.directory
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            raise ValueError(f"directory {self.directory!r} cannot be written ({parent!r} is not writable); "
                             "give a writable directory for the checkpoints.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.keep, enable_async_checkpointing=False, cleanup_tmp_directories=True
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("arrays", "meta"))

    def steps(self) -> list[int]:
        """The finished checkpoints' steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(self, state: Any, *, data_position: Any = None, force: bool = False) -> bool:
        """Writes ``state`` if its step is a multiple of ``every`` (or ``force``); returns whether it did.

        ``data_position`` is any JSON value telling the input pipeline where to resume.
        """
        try:
            json.dumps(data_position)
        except (TypeError, ValueError) as e:
            raise TypeError(f"data_position must be JSON-serialisable (dicts, lists, str, int, float, bool, None), "
                            f"got {data_position!r}: {e}. Nothing was written.") from None
        step = int(jax.device_get(state.step))
        if not force and step % self.every:
            return False
        if step in self._manager.all_steps():
            return False
        leaves, spec = _flatten(state)
        meta = {"format": FORMAT_VERSION, "step": step, "leaves": spec, "digest": _digest(leaves),
                "data_position": data_position}
        arrays = {f"leaf_{i:05d}": x for i, x in enumerate(leaves)}
        self._manager.save(
            step,
            args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(meta)),
            force=True,
        )
        self._manager.wait_until_finished()
        return True

    def _read_meta(self, step: int) -> dict:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, like: Any, *, step: Optional[int] = None) -> Optional[Restored]:
        """Restores the newest readable checkpoint (or ``step``) into the structure of ``like``.

        Args:
          like: a state of the same structure, shapes and dtypes (its values are ignored; its
            arrays' shardings are used for the restored arrays).
          step: a specific step; default the newest whose data verify.

        Returns:
          A :class:`Restored`, or ``None`` when the directory holds no checkpoint.

        Raises:
          ValueError: the checkpoint holds a different state (another model, optimizer or
            transform), or ``step`` is given and cannot be read.
          CheckpointError: checkpoints exist but every one is damaged or not one of ours.
        """
        like_leaves, like_spec = _flatten(like)
        treedef = jax.tree_util.tree_structure(like)
        candidates = [step] if step is not None else sorted(self.steps(), reverse=True)
        for s in candidates:
            try:
                meta = self._read_meta(s)
                if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
                    raise ValueError(f"not a checkpoint of format {FORMAT_VERSION}")
            except Exception as e:  # unreadable or foreign record
                if step is not None:
                    raise ValueError(f"checkpoint step {s} in {self.directory} cannot be read: {e}") from e
                warnings.warn(f"checkpoint step {s} is unreadable ({type(e).__name__}); trying the previous one.")
                continue
            _check_same_state(meta, like_spec, s, self.directory)
            try:
                target = {f"leaf_{i:05d}": x for i, x in enumerate(like_leaves)}
                got = self._manager.restore(
                    s, args=ocp.args.Composite(arrays=ocp.args.StandardRestore(target))
                )["arrays"]
                leaves = [got[f"leaf_{i:05d}"] for i in range(len(like_leaves))]
                ok = _digest(leaves) == meta["digest"]
            except Exception as e:
                ok, err = False, e
            if not ok:
                if step is not None:
                    raise ValueError(f"checkpoint step {s} in {self.directory} is damaged (digest mismatch).")
                warnings.warn(f"checkpoint step {s} is damaged (truncated or corrupt); using the previous one.")
                continue
            out = []
            for x, spec in zip(leaves, meta["leaves"]):
                if spec["key_impl"] is not None:
                    x = jax.random.wrap_key_data(x, impl=spec["key_impl"])
                out.append(x)
            return Restored(jax.tree_util.tree_unflatten(treedef, out), int(meta["step"]), meta["data_position"])
        if candidates:
            raise CheckpointError(
                f"{self.directory} holds checkpoints at steps {sorted(candidates)} but none can be read (damaged, "
                "or not written by this library); remove them or restore from another directory."
            )
        return None

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.close()


def _check_same_state(meta: dict, like_spec: list[dict], step: int, directory: str) -> None:
    saved = meta.get("leaves", [])
    strip = lambda specs: [(d["path"], tuple(d["shape"]), d["dtype"], d["key_impl"]) for d in specs]
    a, b = strip(saved), strip(like_spec)
    if a == b:
        return
    only_saved = [x for x in a if x not in b][:5]
    only_like = [x for x in b if x not in a][:5]
    raise ValueError(
        f"checkpoint step {step} in {directory} holds a different state ({len(a)} leaves) than the one "
        f"given to restore ({len(b)} leaves): saved but not expected (path, shape, dtype): {only_saved}; "
        f"expected but not saved: {only_like}. Restore with the model, optimizer and compression "
        "transform the checkpoint was written with, or use another directory."
    )
