"""Diagonal local Fisher factors, stored as vectors (embeddings).

An embedding table ``E`` (``V x D``) is a dense layer whose input is a
one-hot token, so its linear local Fisher ``E[onehot onehot^T]`` is exactly
``diag(f)`` with ``f_v`` the frequency of token ``v``. It is kept as the
vector ``f`` (``V`` numbers instead of ``V^2``) and inverted elementwise with
the same damping rule as the dense blocks (``tr(G) = sum_v f_v``):

```
Delta E[v, :] = grad E[v, :] / (f_v + damping * sum_u f_u + abs_damping).
```

Since ``grad E[v, :]`` is ``f_v`` times the mean gradient of the occurrences
of ``v``, a frequent token's row moves by its mean per-occurrence gradient,
and a rare token's row is held back by the damping.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sngd_jax._src.inverse.base import all_finite


def identity(size: int, dtype) -> jax.Array:
  """The inverse before the first refresh: ones (plain gradient)."""
  return jnp.ones((size,), dtype)


def refresh(factor: jax.Array, damping, abs_damping) -> tuple[jax.Array, jax.Array]:
  """Damped elementwise inverse of a diagonal factor.

  Args:
    factor: the diagonal ``f`` (normalized running average), shape ``(V,)``.
    damping: relative damping (multiplies ``sum(f) = tr(G)``).
    abs_damping: absolute damping.

  Returns:
    ``(1 / (f + damping * sum(f) + abs_damping), ok)``; ``ok`` is a scalar
    bool, False when the result or the shift is not finite (an infinite entry of
    ``f`` would otherwise give the finite inverse 0 for every row).
  """
  shift = damping * jnp.sum(factor) + abs_damping
  inverse = 1.0 / (factor + jnp.asarray(shift, factor.dtype))
  return inverse, all_finite(inverse) & jnp.isfinite(shift)


def apply(inverse: jax.Array, g: jax.Array) -> jax.Array:
  """``diag(inverse) @ g`` for a gradient ``g`` of shape ``(V, D)``."""
  return inverse[:, None] * g
