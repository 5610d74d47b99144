"""Data-parallel train steps: one device (jit), ``jax.pmap``, or ``jax.jit`` over a ``'data'`` mesh.

Global-batch semantics. The batch a step is given is always the *global* batch: with ``D``
devices each device computes on ``global_batch // D`` examples, gradients (and BatchNorm
statistics) are averaged over devices, so one optimizer step sees the same mean loss over the
same examples whatever ``D`` is. Equal per-device shards make the mean of the per-device means
the global mean, which is why the global batch must divide evenly (:func:`per_device_batch_size`).
Changing the global batch changes the optimization; :func:`scale_learning_rate` gives the usual
linear (Goyal et al. 2017) or square-root rule.

Multi-host. After :func:`initialize_multihost`, each process reads only its slice of every global
batch (:func:`process_batch_slice`), and :func:`shard_batch` joins the process-local pieces into one
global array with ``jax.make_array_from_process_local_data``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

#: The parallel modes of :func:`data_parallel` (and the CLI's ``--parallel``).
PARALLEL_MODES = ("none", "pmap", "shard")
#: The mesh axis (and pmap axis name) the batch is split over.
DATA_AXIS = "data"


def _check_mode(parallel: Any) -> str:
    if parallel not in PARALLEL_MODES:
        raise ValueError(f"parallel must be one of {PARALLEL_MODES}, got {parallel!r}.")
    return parallel


def _devices(devices: Union[None, int, Sequence[Any]]) -> list:
    available = jax.devices()
    if devices is None:
        return list(available)
    if isinstance(devices, numbers.Integral) and not isinstance(devices, bool):
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"devices must be between 1 and the {len(available)} available devices, got {devices}. "
                "On CPU, more devices come from XLA_FLAGS=--xla_force_host_platform_device_count=N "
                "set before JAX starts."
            )
        return list(available[: int(devices)])
    devices = list(devices)
    if not devices:
        raise ValueError("devices must not be empty.")
    return devices


def data_mesh(devices: Union[None, int, Sequence[Any]] = None, *, axis_name: str = DATA_AXIS) -> Mesh:
    """A one-axis mesh over ``devices`` (default: all, across all processes) for data parallelism.

    Args:
      devices: ``None`` (all devices), a count (the first N), or a list of devices.
      axis_name: the mesh axis name.

    Returns:
      A :class:`jax.sharding.Mesh` with the single axis ``axis_name``.

    Example:
      >>> data_mesh(1).axis_names
      ('data',)
    """
    return Mesh(np.array(_devices(devices)), (axis_name,))


def check_mesh(mesh: Any, axis_name: str = DATA_AXIS) -> Mesh:
    """Checks ``mesh`` is a :class:`~jax.sharding.Mesh` with an ``axis_name`` axis and returns it.

    Raises:
      TypeError: not a Mesh.
      ValueError: the mesh has no ``axis_name`` axis.
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh, got {type(mesh).__name__}.")
    if axis_name not in mesh.axis_names:
        raise ValueError(
            f"mesh has axes {tuple(mesh.axis_names)} but no {axis_name!r} axis to split the batch over; "
            f"build it with data_mesh() or name one axis {axis_name!r}."
        )
    return mesh


def per_device_batch_size(global_batch_size: int, num_devices: int) -> int:
    """``global_batch_size // num_devices``, refusing a global batch that does not divide evenly.

    Example:
      >>> per_device_batch_size(128, 8)
      16
    """
    for name, v in (("global_batch_size", global_batch_size), ("num_devices", num_devices)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    if global_batch_size % num_devices:
        lower = (global_batch_size // num_devices) * num_devices
        raise ValueError(
            f"the global batch of {global_batch_size} examples does not split evenly over {num_devices} "
            f"devices; use a multiple of {num_devices} (e.g. {max(lower, num_devices)} or "
            f"{lower + num_devices})."
        )
    return global_batch_size // num_devices


def scale_learning_rate(
    base_learning_rate: float, global_batch_size: int, base_batch_size: int = 256, *, rule: str = "linear"
) -> float:
    """Scales a learning rate tuned for ``base_batch_size`` to ``global_batch_size``.

    ``rule='linear'`` multiplies by ``global / base`` (Goyal et al. 2017, with warm-up);
    ``rule='sqrt'`` by its square root (common for Adam-type optimizers).

    Example:
      >>> scale_learning_rate(0.1, 1024, 256)
      0.4
      >>> scale_learning_rate(1e-3, 1024, 256, rule='sqrt')
      0.002
    """
    if rule not in ("linear", "sqrt"):
        raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}.")
    for name, v in (("global_batch_size", global_batch_size), ("base_batch_size", base_batch_size)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}.")
    ratio = global_batch_size / base_batch_size
    return float(base_learning_rate) * (ratio if rule == "linear" else math.sqrt(ratio))


def step_axis_name(parallel: str, axis_name: str = DATA_AXIS) -> Optional[str]:
    """The ``axis_name`` to build the step (and BatchNorm) with for a parallel mode.

    Only ``pmap`` needs explicit collectives; sharded ``jax.jit`` sees global arrays, so its mean
    over the batch already is the global mean.

    Example:
      >>> step_axis_name('pmap'), step_axis_name('shard'), step_axis_name('none')
      ('data', None, None)
    """
    return axis_name if _check_mode(parallel) == "pmap" else None


def initialize_multihost(
    coordinator_address: str, num_processes: int, process_id: int, *, cpu_collectives: Optional[str] = "gloo"
) -> None:
    """Starts ``jax.distributed`` for a multi-process run (call before any other JAX call).

    Args:
      coordinator_address: ``'host:port'`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index, ``0 .. num_processes - 1``.
      cpu_collectives: CPU cross-process collectives (``'gloo'``; ``None`` leaves JAX's default),
        needed only when the devices are CPUs.
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}.")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def process_batch_slice(global_batch_size: int) -> slice:
    """The slice of each global batch that this process reads (by ``jax.process_index()``).

    Example:
      >>> process_batch_slice(64)  # one process reads everything
      slice(0, 64, None)
    """
    n = jax.process_count()
    local = per_device_batch_size(global_batch_size, n)
    start = jax.process_index() * local
    return slice(start, start + local)


def shard_batch(batch: Any, mesh: Mesh, axis_name: str = DATA_AXIS) -> Any:
    """Global arrays split on ``axis_name`` from this process's part of the batch.

    In one process the part is the whole global batch; with several processes each passes its
    :func:`process_batch_slice` and the result is the concatenation in process order.

    Raises:
      ValueError: the mesh lacks ``axis_name`` or the batch does not split over its devices.
    """
    check_mesh(mesh, axis_name)
    sharding = NamedSharding(mesh, PartitionSpec(axis_name))
    local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)

    def put(x):
        if isinstance(x, jax.Array) and x.sharding == sharding:
            return x  # already laid out (e.g. prefetched)
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        per_device_batch_size(x.shape[0], local_devices)
        global_shape = (x.shape[0] * jax.process_count(),) + tuple(x.shape[1:])
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places every leaf of ``tree`` on all devices of ``mesh`` (fully replicated).

    With several processes every process passes the same values; each provides the copies of its
    own devices (``jax.device_put`` only reaches addressable devices).
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def put(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def split_for_pmap(batch: Any, num_devices: int) -> Any:
    """Reshapes every ``(B, ...)`` leaf to ``(num_devices, B // num_devices, ...)`` for ``pmap``."""

    def split(path, x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0:
            raise ValueError(
                f"batch leaf {jax.tree_util.keystr(path)!r} is a scalar; every batch entry needs a leading "
                "example axis to split over the devices (give it shape (batch, ...)), or pass it outside the batch."
            )
        per_device_batch_size(x.shape[0], num_devices)
        return x.reshape((num_devices, x.shape[0] // num_devices) + tuple(x.shape[1:]))

    return jax.tree_util.tree_map_with_path(split, batch)


class DataParallel(NamedTuple):
    """A step compiled for one parallel mode, with the functions that lay out its inputs.

    Attributes:
      mode: ``'none'``, ``'pmap'`` or ``'shard'``.
      num_devices: devices the batch is split over.
      mesh: the ``'data'`` mesh (``'shard'``), else ``None``.
      step: ``(device state, global batch[, teacher_variables]) -> (device state, metrics)``; the
        batch may be NumPy; the state is donated, the teacher's variables never are.
      put_state: a host/one-device state -> the layout ``step`` expects (replicated).
      get_state: the step's state -> one copy (on one device when running in one process).
      put_teacher: teacher variables -> the layout ``step`` expects: on the device (``'none'``),
        as they are (``'pmap'`` broadcasts them to every device), replicated over the mesh
        (``'shard'``). Under ``'shard'`` a teacher too large for one device may instead be given
        laid out by the caller (e.g. its kernels sharded with a ``NamedSharding`` on the mesh):
        the compiled step takes the arrays' own layout.
    """

    mode: str
    num_devices: int
    mesh: Optional[Mesh]
    step: Callable[..., tuple[Any, dict]]
    put_state: Callable[[Any], Any]
    get_state: Callable[[Any], Any]
    put_teacher: Callable[[Any], Any]


def _check_step_axis(step: Callable, parallel: str, axis_name: str) -> None:
    """Refuses a step built for another parallel mode (a step from make_train_step knows its axis)."""
    if not hasattr(step, "axis_name"):
        return
    built = step.axis_name
    if parallel == "pmap" and built != axis_name:
        raise ValueError(
            f"parallel='pmap' needs a step that averages over the {axis_name!r} axis, but this step was built "
            f"with axis_name={built!r}: each device would train its own copy. Build it with "
            f"make_train_step(..., axis_name=step_axis_name('pmap')) (= {axis_name!r})."
        )
    if parallel != "pmap" and built is not None:
        raise ValueError(
            f"parallel={parallel!r} runs on global arrays and needs a step built with axis_name=None, but this "
            f"step was built with axis_name={built!r} (an axis only pmap binds). Build it with "
            f"make_train_step(..., axis_name=step_axis_name({parallel!r})) (= None)."
        )


def data_parallel(
    step: Callable,
    *,
    parallel: str = "shard",
    devices: Union[None, int, Sequence[Any]] = None,
    mesh: Optional[Mesh] = None,
    axis_name: str = DATA_AXIS,
    donate: bool = True,
) -> DataParallel:
    """Compiles a train step for one device, ``jax.pmap``, or ``jax.jit`` over a data mesh.

    Build ``step`` with ``make_train_step(..., axis_name=step_axis_name(parallel))`` (and Flax
    BatchNorm with the same ``axis_name``): only ``pmap`` averages with explicit collectives. A
    step from :func:`~jaxcompress.train.step.make_train_step` built for another mode is refused.

    Args:
      step: the unmapped ``(TrainState, batch[, teacher_variables]) -> (TrainState, metrics)``.
      parallel: ``'none'`` (``jax.jit`` on one device), ``'pmap'``, or ``'shard'``.
      devices: ``None`` (all), a count, or a list (``'pmap'``/``'shard'`` without ``mesh``).
      mesh: for ``'shard'``, a mesh with an ``axis_name`` axis (default :func:`data_mesh`).
      axis_name: the batch axis.
      donate: donate the state's buffers to the step.

    Returns:
      A :class:`DataParallel`.

    Raises:
      ValueError: unknown mode, a mesh without ``axis_name``, a step built for another mode; at
        call time, a global batch that does not split evenly over the devices.

    Example:
      >>> import jax.numpy as jnp
      >>> f = lambda s, b: (s + jnp.mean(b['x']), {})
      >>> dp = data_parallel(f, parallel='shard', devices=1)
      >>> float(dp.get_state(dp.step(dp.put_state(jnp.float32(1.0)), {'x': jnp.ones(4)})[0]))
      2.0
    """
    parallel = _check_mode(parallel)
    _check_step_axis(step, parallel, axis_name)
    donate_argnums = (0,) if donate else ()
    if parallel == "none":
        device = _devices(devices)[0]
        compiled = jax.jit(step, donate_argnums=donate_argnums)
        put = lambda s: jax.device_put(s, device)  # noqa: E731
        return DataParallel("none", 1, None, compiled, put, lambda s: s, put)
    if parallel == "pmap":
        devs = _devices(devices)
        n = len(devs)
        mapped = jax.pmap(step, axis_name=axis_name, devices=devs, donate_argnums=donate_argnums)
        mapped_teacher = jax.pmap(
            step, axis_name=axis_name, devices=devs, donate_argnums=donate_argnums, in_axes=(0, 0, None)
        )

        def pmap_step(state, batch, teacher_variables=None):
            batch = split_for_pmap(batch, n)
            if teacher_variables is None:
                state, metrics = mapped(state, batch)
            else:
                state, metrics = mapped_teacher(state, batch, teacher_variables)
            return state, jax.tree.map(lambda m: m[0], metrics)

        stacked = NamedSharding(Mesh(np.array(devs), (axis_name,)), PartitionSpec(axis_name))

        def put_state(state):
            # one copy per device, laid out as pmap expects whatever the state's current placement
            return jax.tree.map(
                lambda x: jax.device_put(jnp.broadcast_to(jax.device_put(x, devs[0]), (n,) + jnp.shape(x)), stacked),
                state,
            )

        def get_state(state):
            return jax.tree.map(lambda x: jax.device_put(x[0], devs[0]), state)

        return DataParallel("pmap", n, None, pmap_step, put_state, get_state, lambda t: t)
    mesh = data_mesh(devices, axis_name=axis_name) if mesh is None else check_mesh(mesh, axis_name)
    replicated = NamedSharding(mesh, PartitionSpec())
    # Inputs keep the layout they were given (put_state / shard_batch / put_teacher or the
    # caller's own sharding of a large teacher); outputs are replicated.
    compiled = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=donate_argnums)

    def shard_step(state, batch, *teacher_variables):
        return compiled(state, shard_batch(batch, mesh, axis_name), *teacher_variables)

    def get_state(state):
        if jax.process_count() > 1:
            return state
        return jax.device_put(state, mesh.devices.flat[0])

    put = lambda s: replicate(s, mesh)  # noqa: E731
    return DataParallel("shard", int(mesh.shape[axis_name]), mesh, shard_step, put, get_state, put)
