"""Large layers' statistics kept as a Nystrom sketch ``(G Omega, tr G)``.

A rank-``r`` Nystrom model (``sngd_jax.inverse.nystrom``) reads the local Fisher
``G`` (``d x d``) only through ``Y = G Omega`` with a fixed ``d x r`` test
matrix ``Omega`` and through ``tr(G)`` (for the damping and the tail
eigenvalue). Both are linear in ``G``, so the running average can be kept as
the sketch itself (J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank
approximation of a positive-semidefinite matrix from streaming data", NeurIPS
2017):

```
Y_t = decay * (Y_{t-1} + (1 - w_{t-1}) P(G^) Omega) + (1 - decay) G^ Omega,
G^ Omega = (1/n) X~^T (X~ Omega),      tr(G^) = (1/n) sum_ij X~_ij^2,
```

the same numbers, up to rounding, as sketching the dense average
``G_t Omega`` at refresh time, for ``O(d r)`` memory instead of ``O(d^2)`` and
a batch estimate of ``4 n d r`` FLOPs instead of ``2 n d^2`` (the
``785``-wide input layer of an MNIST MLP at ``r = 128``: 3x fewer). The
refresh no longer multiplies ``G Omega`` (``2 d^2 r``). What is lost is the
dense ``G`` itself: a sketched layer's reconstructed network
(``sngd_jax.damped_factors``) is the Nystrom model's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

_HIGHEST = jax.lax.Precision.HIGHEST


class Sketch(NamedTuple):
  """A local Fisher seen through a fixed test matrix ``Omega``.

  Attributes:
    y: ``G Omega``, shape ``(..., d, r)``.
    trace: ``tr(G)``, shape ``(...)``.
  """

  y: jax.Array
  trace: jax.Array


def is_sketch(factor: Any) -> bool:
  """Whether a state factor is a ``Sketch`` (else a dense array)."""
  return isinstance(factor, Sketch)


def from_rows(x: jax.Array, omega: jax.Array, out_sharding=None) -> Sketch:
  """The batch estimate ``((1/n) X~^T (X~ Omega), (1/n) ||X~||_F^2)``.

  Args:
    x: the rows ``X~``, shape ``(n, d)``.
    omega: the test matrix, ``(d, r)``.
    out_sharding: passed to the products (replicated output under a mesh).

  Returns:
    A ``Sketch`` with ``y`` of shape ``(d, r)`` in ``x``'s dtype.
  """
  y, tr = row_sums(x, omega, out_sharding)
  n = x.shape[0]
  return Sketch(y / n, tr / n)


def row_sums(x: jax.Array, omega: jax.Array, out_sharding=None) -> tuple[jax.Array, jax.Array]:
  """``(X~^T (X~ Omega), ||X~||_F^2)``: ``from_rows`` before the ``1/n``, a sum over rows."""
  omega = omega.astype(x.dtype)
  proj = jnp.matmul(x, omega, precision=_HIGHEST)
  y = jnp.matmul(x.T, proj, precision=_HIGHEST, out_sharding=out_sharding)
  return y, jnp.sum(x * x)


def of_dense(g: jax.Array, omega: jax.Array) -> Sketch:
  """``(G Omega, tr G)`` of a dense ``(..., d, d)`` factor (the reference, and priors)."""
  return Sketch(jnp.matmul(g, omega.astype(g.dtype), precision=_HIGHEST),
                block_trace(g))


def identity(omega: jax.Array, dtype) -> Sketch:
  """The sketch of ``I``: ``(Omega, d)``."""
  return Sketch(omega.astype(dtype), jnp.asarray(omega.shape[0], dtype))


def zeros(d: int, rank: int, dtype) -> Sketch:
  """The sketch of the zero matrix (the state before the first factor update)."""
  return Sketch(jnp.zeros((d, rank), dtype), jnp.zeros((), dtype))


def block_trace(g: jax.Array) -> jax.Array:
  """``tr(G)`` of each block of a dense ``(..., d, d)`` stack, shape ``g.shape[:-2]``.

  The diagonal as a strided slice of the flattened blocks: one reduction kernel
  (``jnp.trace`` masks the whole ``d x d`` matrix first: two); the same form
  wherever the library takes a block's trace (prior, damping shift, range check).
  """
  d = g.shape[-1]
  return jnp.sum(g.reshape(g.shape[:-2] + (d * d,))[..., ::d + 1], axis=-1)


def trace(factor: Any) -> jax.Array:
  """``tr(G)`` summed over blocks, for a dense ``(..., d, d)`` factor or a ``Sketch``."""
  if is_sketch(factor):
    return jnp.sum(factor.trace)
  return jnp.sum(block_trace(factor))
