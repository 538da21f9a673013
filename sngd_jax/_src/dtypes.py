"""The one rule for the dtype sngd computes in (float32, or float64 where an input is), and
the one precision of its products (`HIGHEST`).

Statistics, inverses, the trust region's ``q`` and the finiteness sums all work in
``compute_dtype`` of their inputs: the widest floating dtype among float32 and the
inputs' (bfloat16 and float16 are computed in float32; float64, in x64 mode, stays
float64). It is chosen by width, not by ``jnp.result_type`` or ``jnp.promote_types``,
which refuse float32 with float64 under ``jax_numpy_dtype_promotion="strict"``; each
operand is then cast to it explicitly.

Every product sngd computes (the factors' ``X~^T X~``, the sketches, the refreshes, the
preconditioning, the trust region's ``<g, u>``, the diagnostics and the reconstructed network)
passes ``precision=dtypes.HIGHEST``, read from this module when the step is traced, so that
``jax_default_matmul_precision`` lowers only the model's own products (on GPU, full float32
instead of TF32; on TPU, 6-pass bfloat16). ``benchmarks/gpu.py`` rebinds this one attribute
to measure the backend's default precision instead. The conv patch extractions of
``conv.py`` (convolutions with one-hot kernels: copies of the inputs, not products) pass
``lax.Precision.HIGHEST`` itself and are not rebound: at a lower precision they would round
the patches.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HIGHEST = jax.lax.Precision.HIGHEST
"""The precision of every product sngd computes; read by attribute at trace time."""


def compute_dtype(*dtypes: Any) -> np.dtype:
  """The widest floating dtype among float32 and ``dtypes``.

  Args:
    *dtypes: dtypes, or anything ``np.dtype`` reads as one (``jnp.bfloat16``, ``"float64"``);
      non-floating ones (integer token ids, complex) are not counted.

  Returns:
    float32 for no inputs or inputs of at most 32 bits (bfloat16, float16, float32),
    float64 where one input is float64.
  """
  widest = np.dtype(np.float32)
  for d in dtypes:
    dtype = np.dtype(d)
    if jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize > widest.itemsize:
      widest = dtype
  return widest
