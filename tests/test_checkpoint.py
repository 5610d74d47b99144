"""Checkpoints: exact round trip, damaged steps skipped, other models refused, SIGKILL resume bitwise.

Run as a script, this file is the training job the kill test starts and kills:
``python test_checkpoint.py CKPT_DIR OUT.npz [STEP_SLEEP]``.
"""
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

TOTAL_STEPS = 40
EVERY = 4
BATCH = 32


def _job_parts():
    import jax.numpy as jnp
    import optax

    from jaxcompress.core.transform import chain
    from jaxcompress.models.mlp import MLP
    from jaxcompress.prune import pruning
    from jaxcompress.prune.schedules import polynomial_schedule
    from jaxcompress.quant.weights import weight_quantization
    from jaxcompress.train import init_train_state, linen_apply_fn, make_train_step, split_variables
    import jax

    model = MLP(features=(32, 16), num_classes=10, dropout_rate=0.2)  # dropout: the rng matters
    params, mstate = split_variables(model.init(jax.random.key(0), jnp.zeros((1, 64))))
    transform = chain(
        pruning(0.8, schedule=polynomial_schedule(begin_step=0, end_step=24, frequency=4)),
        weight_quantization(8),
    )
    opt = optax.adamw(1e-2)
    step = make_train_step(linen_apply_fn(model), opt, transform=transform)
    state = init_train_state(params, opt, transform=transform, model_state=mstate, rng=7)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 64)).astype(np.float32)
    y = (np.abs(x[:, :10]).argmax(1)).astype(np.int32)
    return step, state, x, y


def _batch(x, y, step):
    """Batch ``step`` of a seeded epoch order: the data position follows from the step alone."""
    per_epoch = len(y) // BATCH
    epoch, i = divmod(step, per_epoch)
    order = np.random.default_rng([0, epoch]).permutation(len(y))[i * BATCH : (i + 1) * BATCH]
    return {"image": x[order], "label": y[order]}, {"epoch": epoch, "batch": i}


def _main(ckpt_dir, out, step_sleep):
    import jax

    from jaxcompress.train import Checkpointer

    step_fn, state, x, y = _job_parts()
    ckpt = Checkpointer(ckpt_dir, every=EVERY, keep=2)
    restored = ckpt.restore(state)
    if restored is not None:
        state = restored.state
        assert restored.data_position == _batch(x, y, restored.step)[1]
        print(f"resumed {restored.step}", flush=True)
    step_fn = jax.jit(step_fn, donate_argnums=0)
    while int(state.step) < TOTAL_STEPS:
        batch, _ = _batch(x, y, int(state.step))
        state, _ = step_fn(state, batch)
        ckpt.save(state, data_position=_batch(x, y, int(state.step))[1])
        print(f"step {int(state.step)}", flush=True)
        time.sleep(step_sleep)
    ckpt.close()
    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    arrays = {}
    for path, v in leaves:
        if jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key):
            v = jax.random.key_data(v)
        arrays[jax.tree_util.keystr(path)] = np.asarray(v)
    np.savez(out, **arrays)


def _spawn(env, ckpt_dir, out, sleep):
    env = dict(env)
    # A restarted job loads its compiled step from JAX's persistent cache, as a preempted job
    # does in production: the resumed runs skip compilation and must still match bitwise the
    # reference, which compiles everything itself (a cache of its own, never read).
    env["JAX_COMPILATION_CACHE_DIR"] = f"{ckpt_dir}-jit-cache"
    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    return subprocess.Popen([sys.executable, __file__, str(ckpt_dir), str(out), str(sleep)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _kill_and_resume(tmp_path, child_env, kills):
    """SIGKILL a training run ``kills`` times at random steps; the last run resumes and ends bitwise
    equal to an uninterrupted run."""
    seed = int.from_bytes(os.urandom(4), "little")
    # the first kill comes after the first checkpoint (step EVERY), so every later run must resume
    env = child_env(1)
    points = sorted(random.Random(seed).sample(range(EVERY, TOTAL_STEPS - 2), kills))
    reference = _spawn(env, tmp_path / "ref", tmp_path / "ref.npz", 0.02)
    resumed_from = []
    for point in points:
        p = _spawn(env, tmp_path / "killed", tmp_path / "killed.npz", 0.02)
        for line in p.stdout:
            if line.startswith("resumed"):
                resumed_from.append(int(line.split()[1]))
            if line.startswith("step") and int(line.split()[1]) >= point:
                break
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=60)
        assert p.returncode == -signal.SIGKILL, p.stderr.read()
    final = _spawn(env, tmp_path / "killed", tmp_path / "killed.npz", 0.0)
    out, err = final.communicate(timeout=120)
    assert final.returncode == 0, err
    resumed_from.append(int(out.split("resumed")[1].split()[0]))
    _, err = reference.communicate(timeout=120)
    assert reference.returncode == 0, err
    assert any((tmp_path / "killed-jit-cache").iterdir())  # the resumed runs had a cache to load
    # every run after the first resumed from a checkpoint, never from scratch
    assert len(resumed_from) == kills and all(s > 0 and s % EVERY == 0 for s in resumed_from), (seed, resumed_from)
    a, b = np.load(tmp_path / "ref.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(a.files) == sorted(b.files) and len(a.files) > 10
    for k in a.files:
        assert a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes(), (seed, points, k)
    assert int(a["['step']" if "['step']" in a.files else ".step"]) == TOTAL_STEPS


def test_sigkill_resumes_bitwise(tmp_path, child_env):
    _kill_and_resume(tmp_path, child_env, kills=1)


@pytest.mark.slow  # three kills: the one-kill test above runs the same path in the default suite
def test_sigkill_three_times_resumes_bitwise(tmp_path, child_env):
    _kill_and_resume(tmp_path, child_env, kills=3)


_STATES = {}


def _state_after(n):
    """The state after ``n`` steps (one compiled step, states memoised)."""
    import jax

    if not _STATES:
        step_fn, state, x, y = _job_parts()
        _STATES.update(jit=jax.jit(step_fn), data=(x, y), fresh=state)
    state, x, y = _STATES["fresh"], *_STATES["data"]
    for i in range(n):
        if i + 1 in _STATES:
            state = _STATES[i + 1]
            continue
        state, _ = _STATES["jit"](state, _batch(x, y, i)[0])
        _STATES[i + 1] = state
    return state


def _equal_bits(a, b):
    import jax

    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        if jax.dtypes.issubdtype(u.dtype, jax.dtypes.prng_key):
            u, v = jax.random.key_data(u), jax.random.key_data(v)
        if np.asarray(u).tobytes() != np.asarray(v).tobytes():
            return False
    return True


def test_round_trip_keep_and_damaged_step(tmp_path):
    import jax
    import pytest

    from jaxcompress.train import Checkpointer

    fresh = _state_after(0)
    s4, s8 = _state_after(4), _state_after(8)
    ckpt = Checkpointer(tmp_path, every=4, keep=2)
    assert not ckpt.save(_state_after(3))  # not a multiple of every
    for s in (s4, s8, _state_after(12)):
        assert ckpt.save(s, data_position={"epoch": 0, "batch": int(s.step)})
    assert ckpt.steps() == [8, 12]  # keep=2
    r = ckpt.restore(fresh, step=8)
    assert r.step == 8 and r.data_position == {"epoch": 0, "batch": 8} and _equal_bits(r.state, s8)
    assert r.state.compression_state[0].masks is not None and int(r.state.compression_state[0].count) == 8
    assert jax.random.key_impl(r.state.rng) == jax.random.key_impl(fresh.rng)

    # a step directory truncated mid-write: every file of step 12 cut to half its length
    for f in (tmp_path / "12").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    with pytest.warns(UserWarning, match="step 12"):
        r = Checkpointer(tmp_path, every=4, keep=2).restore(fresh)
    assert r.step == 8 and _equal_bits(r.state, s8)
    # an unfinished (temporary) write is not a step at all
    (tmp_path / "16.orbax-checkpoint-tmp-1").mkdir()
    assert 16 not in Checkpointer(tmp_path, every=4, keep=2).steps()
    # every step damaged: not "no checkpoint" but an error saying so
    for f in (tmp_path / "8").rglob("*"):
        if f.is_file() and f.stat().st_size > 0:
            with open(f, "r+b") as fh:
                fh.truncate(f.stat().st_size // 2)
    from jaxcompress.train import CheckpointError

    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match=r"steps \[8, 12\] but none can be read"):
        Checkpointer(tmp_path, every=4, keep=2).restore(fresh)
    ckpt.close()


def test_foreign_checkpoint_bad_directory_and_data_position(tmp_path):
    import jax.numpy as jnp
    import optax
    import orbax.checkpoint as ocp
    import pytest

    from jaxcompress.train import CheckpointError, Checkpointer, init_train_state

    state = init_train_state({"w": jnp.ones((3, 2))}, optax.sgd(0.1))
    foreign = ocp.CheckpointManager(tmp_path / "foreign", item_names=("arrays",))
    foreign.save(1, args=ocp.args.Composite(arrays=ocp.args.StandardSave({"x": jnp.ones(3)})))
    foreign.wait_until_finished()
    foreign.close()
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="none can be read"):
        Checkpointer(tmp_path / "foreign").restore(state)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        Checkpointer(tmp_path / "file")
    ckpt = Checkpointer(tmp_path / "c", every=1)
    with pytest.raises(TypeError, match="JSON-serialisable.*Nothing was written"):
        ckpt.save(state._replace(step=state.step + 1), data_position={"epoch": object()})
    assert ckpt.steps() == []
    assert not any(p.name.endswith("tmp") or "tmp" in p.name for p in (tmp_path / "c").iterdir())
    ckpt.close()


def test_errors(tmp_path):
    import jax.numpy as jnp
    import optax
    import pytest

    from jaxcompress.train import Checkpointer, init_train_state

    assert Checkpointer(tmp_path / "empty").restore(init_train_state({"w": jnp.ones(2)}, optax.sgd(1))) is None
    ckpt = Checkpointer(tmp_path / "a", every=1)
    ckpt.save(init_train_state({"w": jnp.ones((3, 2))}, optax.adam(1e-3)), force=True)
    other = init_train_state({"w": jnp.ones((4, 2))}, optax.adam(1e-3))
    with pytest.raises(ValueError, match=r"different state.*\(4, 2\)"):
        ckpt.restore(other)
    with pytest.raises(ValueError, match="different state"):
        ckpt.restore(init_train_state({"w": jnp.ones((3, 2))}, optax.sgd(1e-3)))
    with pytest.raises(ValueError, match="every must be >= 1"):
        Checkpointer(tmp_path / "b", every=0)


if __name__ == "__main__":
    _main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else 0.0)
