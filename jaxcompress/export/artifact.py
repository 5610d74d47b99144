"""Saves a compressed model as one artifact file: packed, entropy-coded weights and a program.

:func:`save` packs every leaf of the compressed view as its description says
(:func:`~jaxcompress.export.pack.pack_leaf`) and writes the file atomically;
:func:`~jaxcompress.export.reader.load` reads it back bit for bit and checks every digest.
:func:`export_program` serializes the model's forward pass with ``jax.export`` (StableHLO), to
store in the same file and run where the model's Python code is absent
(:func:`~jaxcompress.export.reader.load_program`). The format is documented in
:mod:`jaxcompress.export.reader`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from typing import Any, Callable, NamedTuple, Optional

import jax
import numpy as np

from jaxcompress.core.paths import path_name
from jaxcompress.core.transform import LeafSpec
from jaxcompress.data.dataset import write_atomic
from jaxcompress.export.pack import finish_record, pack_leaf
from jaxcompress.export.reader import FORMAT, ArtifactInfo, canonical_json, record_digest


class ArtifactReport(NamedTuple):
    """What :func:`save` wrote.

    Attributes:
      path: the file.
      file_bytes: its size on disk (``os.path.getsize``).
      payload_bytes: bytes of packed tensor streams (without the program).
      program_bytes: bytes of the serialized program (0 without one).
      bytes_float32: the size of every leaf as float32.
      tensors: a :class:`~jaxcompress.export.pack.TensorReport` per leaf (layout, bytes, and the
        Shannon bound beside them).
    """

    path: str
    file_bytes: int
    payload_bytes: int
    program_bytes: int
    bytes_float32: int
    tensors: tuple


def _check_description(view, description) -> dict:
    description = {} if description is None else description
    if not isinstance(description, dict) or not all(isinstance(v, LeafSpec) for v in description.values()):
        raise TypeError(
            f"description must be the {{path: LeafSpec}} dict of transform.describe(params, state) or None, "
            f"got {type(description).__name__}."
        )
    names = {path_name(p) for p, _ in jax.tree.leaves_with_path(view)}
    unknown = sorted(set(description) - names)
    if unknown:
        raise ValueError(
            f"description names leaves that the view does not have: {unknown[:5]}. Describe the same "
            "params: transform.describe(params, state)."
        )
    return description


def save(
    path: str | os.PathLike,
    view: Any,
    description: Optional[dict] = None,
    *,
    metadata: Optional[dict] = None,
    program: Optional[bytes] = None,
    float_dtype: str = "float32",
    context_coding: bool = False,
) -> ArtifactReport:
    """Writes the compressed view as packed, entropy-coded tensors to one ``.npz`` file.

    Args:
      path: the file to write (replaced atomically; its directory must exist).
      view: the params as the model runs them, ``transform.apply(params, state)``. Latent params
        are accepted for leaves that are only pruned (their mask is applied).
      description: ``transform.describe(params, state)``; ``None`` stores every leaf as floats.
      metadata: a JSON-serializable dict stored with the weights (accuracy, recipe...).
      program: a serialized program from :func:`export_program`, stored in the same file.
      float_dtype: ``'float32'`` (exact) or ``'float16'`` for the leaves the description does not
        name (biases, norms).
      context_coding: also try, for every sparse kernel, its mask arithmetic-coded with adaptive
        row and column contexts (:mod:`~jaxcompress.export.arithmetic`; a Python loop per weight,
        about a second per million weights to write and as long to read), kept where it is the
        smallest. Such a file is format version 2.

    Returns:
      An :class:`ArtifactReport` with the file's real size.

    Raises:
      TypeError: ``description``, ``metadata`` or ``program`` of the wrong type.
      ValueError: a leaf is not exactly on the grid its description gives (pass the view and the
        description of the same transform and state), or ``float_dtype`` is not supported.

    Example:
      >>> import os, tempfile, jax.numpy as jnp
      >>> from jaxcompress.quant import weight_quantization
      >>> from jaxcompress.export import load
      >>> p = {'w': jnp.linspace(-1, 1, 64).reshape(8, 8), 'b': jnp.ones(8)}
      >>> t = weight_quantization(4)
      >>> s = t.init(p)
      >>> view = t.apply(p, s)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     r = save(os.path.join(d, 'model.npz'), view, t.describe(p, s))
      ...     params, info = load(r.path)
      >>> bool((params['w'] == view['w']).all()), info.tensors['w']['kind'], info.tensors['w']['bits']
      (True, 'int', 4)
    """
    if float_dtype not in ("float32", "float16"):
        raise ValueError(f"float_dtype must be 'float32' or 'float16', got {float_dtype!r}.")
    if not isinstance(context_coding, bool):
        raise TypeError(f"context_coding must be True or False, got {type(context_coding).__name__}: "
                        f"{context_coding!r}.")
    if metadata is not None and not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a JSON-serializable dict or None, got {type(metadata).__name__}.")
    if program is not None and not isinstance(program, (bytes, bytearray)):
        raise TypeError(f"program must be the bytes of export_program(...), got {type(program).__name__}.")
    try:
        canonical_json(metadata or {})
    except (TypeError, ValueError) as e:
        raise TypeError(f"metadata must be JSON-serializable (str, numbers, lists, dicts): {e}.") from None
    description = _check_description(view, description)
    records, chunks, reports, offset, floats = [], [], [], 0, 0
    for p, x in jax.tree.leaves_with_path(view):
        name = path_name(p)
        record, data, report = pack_leaf(name, np.asarray(x), description.get(name), float_dtype=float_dtype,
                                         context_coding=context_coding)
        records.append(finish_record(record, offset, data))
        chunks.append(data)
        reports.append(report)
        offset += len(data)
        floats += 4 * int(np.size(x))
    program_record = None
    if program is not None:
        program_record = {"offset": offset, "nbytes": len(program)}
        program_record["sha256"] = record_digest(program_record, bytes(program))
        chunks.append(bytes(program))
    payload = b"".join(chunks)
    meta = {
        "format": FORMAT,
        "version": 2 if any(r["layout"] == "context" for r in records) else 1,
        "payload_bytes": len(payload),
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "metadata": metadata or {},
        "program": program_record,
        "tensors": records,
    }
    meta_bytes = json.dumps(meta, separators=(",", ":"), allow_nan=False).encode()
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        metadata=np.frombuffer(meta_bytes, np.uint8),
        payload=np.frombuffer(payload, np.uint8),
        sha256=np.frombuffer(hashlib.sha256(meta_bytes + payload).digest(), np.uint8),
    )
    written = write_atomic(path, buf.getvalue())
    return ArtifactReport(str(written), os.path.getsize(written), offset if program is None else program_record["offset"],
                          0 if program is None else len(program), floats, tuple(reports))


def description_of(info: ArtifactInfo) -> dict:
    """The ``{path: LeafSpec}`` of a loaded artifact: what its tensors were stored as.

    Masks are the stored positions (the view's non-zeros) of sparse tensors.
    """
    out = {}
    for name, r in info.tensors.items():
        if r["kind"] == "float" and r["layout"] == "dense":
            continue
        out[name] = LeafSpec(
            bits=r.get("bits") if r["kind"] != "float" else None,
            scheme=r.get("scheme"),
            channel_axis=r.get("channel_axis"),
            group_size=r.get("group_size"),
            group_axis=r.get("group_axis"),
            scale=r.get("scale"),
            zero_point=r.get("zero_point"),
            codebook=r.get("codebook"),
        )
    return out


def export_program(
    fn: Callable[[Any, Any], Any],
    params: Any,
    example_batch: Any,
    *,
    polymorphic_batch: bool = True,
    platforms: Optional[tuple] = ("cpu",),
) -> bytes:
    """Serializes ``fn(params, batch)`` as a ``jax.export`` program (StableHLO).

    The params are an argument of the program, not constants in it: the program is run with the
    weights loaded from the artifact (``load_program(path).call(params, batch)``).

    Args:
      fn: the forward pass, ``fn(params, batch) -> outputs``; e.g. for a Flax Linen module
        ``lambda p, x: module.apply({'params': p}, x)``.
      params: the params (arrays or ``jax.ShapeDtypeStruct``), with the structure that
        :func:`~jaxcompress.export.reader.load` gives (nested dicts of the saved paths).
      example_batch: inputs with the shapes and dtypes the program takes.
      polymorphic_batch: the leading axis of every batch array is symbolic (any batch size).
      platforms: the backends it can run on (``('cpu', 'cuda')`` for both; ``None``: the
        default backend).

    Returns:
      The serialized program (``bytes``).

    Example:
      >>> import jax.numpy as jnp
      >>> from jax import export
      >>> p = {'w': jnp.ones((3, 2))}
      >>> blob = export_program(lambda p, x: x @ p['w'], p, jnp.ones((4, 3)))
      >>> export.deserialize(bytearray(blob)).call(p, jnp.ones((7, 3))).shape
      (7, 2)
    """
    spec = lambda a: jax.ShapeDtypeStruct(np.shape(a), np.asarray(a).dtype if not hasattr(a, "dtype") else a.dtype)  # noqa: E731
    param_specs = jax.tree.map(spec, params)
    batch_specs = jax.tree.map(spec, example_batch)
    if polymorphic_batch:
        batch_specs = jax.export.symbolic_args_specs(batch_specs, "b, ...")
    exported = jax.export.export(jax.jit(fn), platforms=platforms)(param_specs, batch_specs)
    return bytes(exported.serialize())
