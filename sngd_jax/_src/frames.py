"""Where user code is on the call stack, for warnings that should point at it."""

from __future__ import annotations

import sys


def caller_stacklevel() -> int:
  """``warnings.warn``'s ``stacklevel`` that names the first frame of user code: outside
  ``sngd_jax`` and the libraries it runs under (JAX, Flax, optax, Equinox).

  Warnings are raised at different depths inside the library (a configuration checked under
  ``sngd()`` or under the aliases that call it, a capture's records frozen under ``capture``,
  ``capture_nnx`` or ``capture_eqx``), so a fixed level would point inside the library for
  some of them. (``warnings.warn(skip_file_prefixes=...)`` needs Python 3.12.)
  """
  frame = sys._getframe(1)  # the frame that calls `warnings.warn`: level 1
  level = 1
  while frame is not None and _is_library(frame.f_globals.get("__name__", "")):
    frame = frame.f_back
    level += 1
  return level


# Modules between the library and the user's line: a captured loss runs under
# `jax.value_and_grad`, an `init` under `optax.MultiSteps` or `nnx.Optimizer`.
_LIBRARIES = ("sngd_jax", "jax", "jaxlib", "flax", "optax", "equinox", "chex")


def _is_library(module: str) -> bool:
  return any(module == name or module.startswith(name + ".") for name in _LIBRARIES)
