"""Two processes on localhost (4 fake CPU devices each, gloo collectives) train like one process.

Run as a script, this file is one of the two processes:
``python test_multihost.py PORT PROCESS_ID OUT.npz``.
"""
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

TESTS = Path(__file__).resolve().parent
STEPS = 5


def _worker(port, process_id, out):
    from jaxcompress.train import initialize_multihost

    initialize_multihost(f"127.0.0.1:{port}", 2, process_id)
    import jax

    sys.path.insert(0, str(TESTS))
    import test_parallel as tp

    from jaxcompress.train import data_parallel, process_batch_slice, step_axis_name

    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    # float64 compute, as the single-process reference (see test_parallel._run)
    with jax.enable_x64(True):
        step, state, teacher = tp._setup(step_axis_name("shard"))
        dp = data_parallel(step, parallel="shard")  # mesh over all 8 devices of both processes
        state, teacher = dp.put_state(state), dp.put_teacher(teacher)
        x, y = tp._data()
        x = x.astype(np.float64)
        mine = process_batch_slice(tp.GLOBAL_BATCH)
        for i in range(STEPS):
            gx = x[i * tp.GLOBAL_BATCH : (i + 1) * tp.GLOBAL_BATCH]
            gy = y[i * tp.GLOBAL_BATCH : (i + 1) * tp.GLOBAL_BATCH]
            # each process reads only its own part of the global batch
            state, metrics = dp.step(state, {"image": gx[mine], "label": gy[mine]}, teacher)
    params = jax.tree_util.tree_flatten_with_path(state.params)[0]
    arrays = {jax.tree_util.keystr(p): np.asarray(v.addressable_data(0)) for p, v in params}
    arrays["loss"] = np.asarray(metrics["loss"].addressable_data(0))
    np.savez(out, **arrays)
    jax.distributed.shutdown()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference():
    sys.path.insert(0, str(TESTS))
    import test_parallel as tp

    return tp._run("none", devices=1, steps=STEPS)


# Slow (44 s: two JAX processes compiling a data-parallel step each): the step's equality across
# devices runs in the default suite in tests/test_parallel.py (jit, pmap and sharded on 8 devices).
@pytest.mark.slow
def test_two_processes_equal_single_process(tmp_path, child_env):
    import jax

    port = _free_port()
    env = child_env(4)
    procs = [
        subprocess.Popen([sys.executable, __file__, str(port), str(i), str(tmp_path / f"p{i}.npz")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for i in range(2)
    ]
    ref, ref_losses = _reference()  # while the two processes run
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=240)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    flat = jax.tree_util.tree_flatten_with_path(ref.params)[0]
    scale = max(float(np.max(np.abs(np.asarray(v)))) for _, v in flat)
    for i in range(2):
        got = np.load(tmp_path / f"p{i}.npz")
        assert abs(float(got["loss"]) - ref_losses[-1]) <= 1e-5 * abs(ref_losses[-1])
        for path, v in flat:
            d = np.max(np.abs(got[jax.tree_util.keystr(path)].astype(np.float64) - np.asarray(v, np.float64)))
            assert d <= 1e-5 * scale, (i, jax.tree_util.keystr(path), d)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
