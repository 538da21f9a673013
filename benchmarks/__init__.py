"""Benchmarks of sngd_jax (see benchmarks/README.md)."""

import os

# jaxlib 0.10.2 on CPU sometimes never completes a LAPACK call inside a loop or conditional
# (e.g. the Cholesky refresh under lax.cond); XLA's concurrency-optimized scheduler off
# avoids it (README, *Known issues*). Set before any module here imports JAX.
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _SCHEDULER_FLAG).strip()
