"""Test-session setup: eight fake CPU devices, so data-parallel code runs on one machine.

The suite is dominated by XLA compiling many small programs, not by running them, so the tests
ask XLA's CPU backend for its lowest LLVM optimization level: compilation is about a quarter
cheaper, and the programs run somewhat slower, which small tests do not notice. Results agree
with the default level to float32 rounding, not bitwise (multiply-adds are fused differently):
five compressed, distilled float32 train steps give losses equal to 1e-7 relative. That is the
size of difference a change of summation order makes, which every tolerance in the suite is
written for; bitwise comparisons are between runs of one session, children included, which
inherit these flags. Benchmarks under ``experiments/`` never import this file and run at XLA's
defaults.
"""
import os

_FLAGS = {
    "xla_force_host_platform_device_count": "8",
    "xla_backend_optimization_level": "0",
}
_current = os.environ.get("XLA_FLAGS", "")
os.environ["XLA_FLAGS"] = " ".join(
    [_current] + [f"--{name}={value}" for name, value in _FLAGS.items() if name not in _current]
).strip()


# Many tests compile the same small programs (the same models, transforms and steps): one
# persistent compilation cache for the session, shared by the xdist workers and the child
# processes tests start, compiles each of them once. A fresh directory per session, so nothing
# carries over between runs (the session's first process removes it at exit).
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxcompress-test-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
