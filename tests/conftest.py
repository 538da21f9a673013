"""Test setup: import the package from this checkout, and fix JAX's platform."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

# Run CPU computations in the calling thread. With asynchronous dispatch, jaxlib 0.10.2 on
# this 2-core VM twice left a test waiting forever for a finished buffer (all XLA worker
# threads idle, the main thread blocked in BlockUntilReady); synchronous dispatch avoids
# that wait and costs nothing measurable for these small tests.
jax.config.update("jax_cpu_enable_async_dispatch", False)
