"""Test-session setup: eight fake CPU devices, so data-parallel code runs on one machine.

The suite is dominated by XLA compiling many small programs, not by running them, so the tests
ask XLA's CPU backend for its lowest LLVM optimization level: compilation is about a quarter
cheaper and the results are the same (floating-point operations are not reassociated without
fast-math, which stays off), while the programs run somewhat slower, which small tests do not
notice. Benchmarks under ``experiments/`` never import this file and run at XLA's defaults.
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

