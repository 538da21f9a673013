"""Benchmarks of sngd_jax (see benchmarks/README.md)."""

import os


def add_xla_flag(flag: str) -> None:
  """Appends ``flag`` to ``XLA_FLAGS`` unless present; call before JAX is imported."""
  if flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


def force_cpu_devices(n: int) -> None:
  """``n`` XLA:CPU devices in this process; call before JAX starts its backend.

  Also gives XLA:CPU a pool of ``8 n`` threads (``PJRT_NPROC``) unless one is set: with one
  thread per device, programs on forced devices can hang at a collective
  (docs/known-issues.md; the tests do the same in ``tests/forced_devices.py``).
  """
  add_xla_flag(f"--xla_force_host_platform_device_count={n}")
  os.environ.setdefault("PJRT_NPROC", str(8 * n))


# On CPU, jaxlib's LAPACK kernels (every inverse refresh) run in SciPy's OpenBLAS, whose
# busy-waiting worker threads take the cores from XLA's (docs/performance.md; measured in
# results/profile_step*.json). Every optimizer here runs with it capped, as the docs
# recommend; `run_kfac` passes the same cap to kfac-jax's process.
OPENBLAS_CAP = "1"

from sngd_jax import limit_lapack_threads  # noqa: E402

limit_lapack_threads(int(OPENBLAS_CAP))
