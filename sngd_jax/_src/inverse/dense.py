"""Dense inverse methods: the cached representation is the explicit inverse.

A refresh factorizes ``G + rho I`` (Cholesky or a symmetric eigendecomposition)
and caches ``(G + rho I)^{-1}``, so that every step's preconditioning is one
batched matrix product (``dense_apply``), ``2 d^2 O`` FLOPs for a ``d x O``
gradient block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src.inverse import host as host_lib
from sngd_jax._src.inverse.base import (
    InverseMethod,
    MethodInfo,
    add_shift,
    all_finite_per_block,
    dense_apply_flops,
    symmetrize,
)


def dense_identity(b: int, d: int, dtype) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(d, dtype=dtype), (b, d, d))


def dense_apply(inverse: jax.Array, g: jax.Array) -> jax.Array:
  """``G^{-1} g`` for a cached explicit inverse: one batched matrix product."""
  return jnp.matmul(inverse, g.astype(inverse.dtype), precision=dtypes_lib.HIGHEST)


SMALL_DIM = 2
"""Blocks up to this size are inverted in closed form (``small_inverse``), not by LAPACK."""

CONSTANT_EYE_MAX_DIM = 1024
"""Up to this size ``cholesky_refresh``'s identity is a constant of the program."""


def small_inverse(g: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse of ``A = G + rho I`` for ``1 x 1`` and ``2 x 2`` blocks, in closed form.

  ``d = 1``: ``A^{-1} = 1 / a``. ``d = 2``: with ``A = [[a, b], [b, c]]``
  (``b`` the mean of the two off-diagonal entries),
  ``A^{-1} = [[c, -b], [-b, a]] / (a c - b^2)``. ``A`` is positive definite
  exactly when ``a > 0`` and ``a c - b^2 > 0``, the cases in which Cholesky
  succeeds; ``ok`` is False otherwise or where the inverse is not finite.
  Elementwise, so a whole stack is one kernel on every platform: per-unit
  factors of normalization layers (``(scale, bias)``, ``d = 2``) come in
  stacks of hundreds, which one LAPACK call per block would loop over on CPU.
  """
  a = add_shift(g, shift)
  if g.shape[-1] == 1:
    inverse = 1.0 / a
    return inverse, all_finite_per_block(inverse) & (a[:, 0, 0] > 0)
  a00, a11 = a[:, 0, 0], a[:, 1, 1]
  a01 = 0.5 * (a[:, 0, 1] + a[:, 1, 0])
  det = a00 * a11 - a01 * a01
  inverse = jnp.stack([jnp.stack([a11, -a01], -1), jnp.stack([-a01, a00], -1)], -2)
  inverse = inverse / det[:, None, None]
  return inverse, all_finite_per_block(inverse) & (a00 > 0) & (det > 0)


def cholesky_refresh(g: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse by a Cholesky factorization, a triangular inverse and a product.

  ``G + rho I = L L^T``, ``(G + rho I)^{-1} = L^{-T} L^{-1}`` (``L^{-1}`` by one
  triangular solve, then one product: symmetric to rounding, and no transpose
  kernel to compile); the explicit
  inverse is cached so that every step's preconditioning is one product.
  Blocks of at most ``SMALL_DIM`` take the closed form of ``small_inverse``
  (the same inverse, without a library call).

  Args:
    g: ``(b, d, d)`` symmetric positive semi-definite blocks.
    shift: ``(b,)`` damping ``rho``.

  Returns:
    ``(inverse, ok)``; ``ok`` is False for a block whose factorization failed
    (not positive definite, or non-finite).
  """
  if g.shape[-1] <= SMALL_DIM:
    return small_inverse(g, shift)
  g_damped = add_shift(g, shift)
  chol = jnp.linalg.cholesky(g_damped)
  d = g.shape[-1]
  # Up to d = 1024 the identity is a constant of the program (at most 4 MiB in float32):
  # no kernel builds it (the same rule as ``statistics.checked_block_trace``).
  eye = jnp.broadcast_to(np.eye(d, dtype=g.dtype) if d <= CONSTANT_EYE_MAX_DIM
                         else jnp.eye(d, dtype=g.dtype), g.shape)
  linv = jax.lax.linalg.triangular_solve(chol, eye, left_side=True, lower=True)
  inverse = jnp.einsum("bki,bkj->bij", linv, linv, precision=dtypes_lib.HIGHEST)
  return inverse, all_finite_per_block(inverse)


def eigh_refresh(g: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse ``V diag(1 / (lam + rho)) V^T`` from ``G = V diag(lam) V^T``.

  The eigendecomposition is of the undamped ``G``, so the damping shifts the
  eigenvalues exactly. ``ok`` is False where ``lam + rho <= 0`` or non-finite.
  """
  lam, v = jnp.linalg.eigh(g)
  shifted = lam + shift[:, None]
  inverse = symmetrize(jnp.matmul(v / shifted[:, None, :], jnp.swapaxes(v, -1, -2),
                                  precision=dtypes_lib.HIGHEST))
  return inverse, all_finite_per_block(inverse) & jnp.all(shifted > 0, axis=-1)


@functools.cache  # equal arguments, one method: see base.InverseMethod
def cholesky() -> InverseMethod:
  """Cholesky: exact, the cheapest dense method (the default up to ``max_dim``)."""
  info = lambda d: MethodInfo("cholesky", d ** 3 / 3 + 3 * d ** 3, dense_apply_flops(d))
  return InverseMethod(dense_identity, cholesky_refresh, dense_apply, info=info,
                       batch_safe=lambda d: d <= SMALL_DIM,
                       host=lambda d: host_lib.cholesky(SMALL_DIM))


@functools.cache  # equal arguments, one method: see base.InverseMethod
def eigh() -> InverseMethod:
  """Symmetric eigendecomposition: exact; the eigenvalues are shifted exactly."""
  info = lambda d: MethodInfo("eigh", None, dense_apply_flops(d))
  return InverseMethod(dense_identity, eigh_refresh, dense_apply, info=info)
