"""Test setup: import the package from this checkout, and fix JAX's platform."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# No XLA_FLAGS and no jax.config changes: the suite runs what users run. The XLA:CPU hang of
# jaxlib 0.10.2 (docs/known-issues.md) is avoided in the library itself, not by a flag here.
import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def x64():
  """float64 enabled for a whole test module.

  A module opts in with ``pytestmark = pytest.mark.usefixtures("x64")``; a test
  that needs float32 inside it uses ``with jax.enable_x64(False):``.
  """
  with jax.enable_x64(True):
    yield


@pytest.fixture(scope="module", autouse=True)
def _release_compiled_programs():
  """Drops JAX's compiled programs after each test module.

  One process runs many modules; their executables are rarely shared and
  otherwise accumulate (several GB by the end of the suite).
  """
  yield
  jax.clear_caches()
