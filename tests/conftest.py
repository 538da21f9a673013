"""Test setup: import the package from this checkout, and fix JAX's platform."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# jaxlib 0.10.2 on CPU: a LAPACK call (LU, Cholesky) inside a loop or conditional sometimes
# never signals completion (all XLA threads idle, the caller blocked in BlockUntilReady);
# reproduced in 1 of ~10 compilations of a Denman-Beavers refresh, not with jaxlib 0.9.2,
# and never with XLA's concurrency-optimized scheduler off (docs/known-issues.md).
_SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if _SCHEDULER_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _SCHEDULER_FLAG).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

# Run CPU computations in the calling thread (no effect on the hang above, which it was
# first thought to cure; kept because it costs nothing measurable for these small tests).
jax.config.update("jax_cpu_enable_async_dispatch", False)


@pytest.fixture(scope="module")
def x64():
  """float64 enabled for a whole test module.

  A module opts in with ``pytestmark = pytest.mark.usefixtures("x64")``; a test
  that needs float32 inside it uses ``with jax.enable_x64(False):``.
  """
  with jax.enable_x64(True):
    yield
