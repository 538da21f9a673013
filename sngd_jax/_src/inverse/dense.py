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

from sngd_jax._src.inverse.base import (
    HIGHEST,
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
  return jnp.matmul(inverse, g.astype(inverse.dtype), precision=HIGHEST)


def cholesky_refresh(g: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse by a Cholesky factorization and two triangular solves.

  ``G + rho I = L L^T``, ``(G + rho I)^{-1} = L^{-T} L^{-1}``; the explicit
  inverse is cached so that every step's preconditioning is one product.

  Args:
    g: ``(b, d, d)`` symmetric positive semi-definite blocks.
    shift: ``(b,)`` damping ``rho``.

  Returns:
    ``(inverse, ok)``; ``ok`` is False for a block whose factorization failed
    (not positive definite, or non-finite).
  """
  g_damped = add_shift(g, shift)
  chol = jnp.linalg.cholesky(g_damped)
  eye = jnp.broadcast_to(jnp.eye(g.shape[-1], dtype=g.dtype), g.shape)
  inverse = jax.vmap(lambda c, e: jax.scipy.linalg.cho_solve((c, True), e))(chol, eye)
  inverse = symmetrize(inverse)
  return inverse, all_finite_per_block(inverse)


def eigh_refresh(g: jax.Array, shift: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse ``V diag(1 / (lam + rho)) V^T`` from ``G = V diag(lam) V^T``.

  The eigendecomposition is of the undamped ``G``, so the damping shifts the
  eigenvalues exactly. ``ok`` is False where ``lam + rho <= 0`` or non-finite.
  """
  lam, v = jnp.linalg.eigh(g)
  shifted = lam + shift[:, None]
  inverse = symmetrize(jnp.matmul(v / shifted[:, None, :], jnp.swapaxes(v, -1, -2),
                                  precision=HIGHEST))
  return inverse, all_finite_per_block(inverse) & jnp.all(shifted > 0, axis=-1)


@functools.cache  # equal arguments, one method: see base.InverseMethod
def cholesky() -> InverseMethod:
  """Cholesky: exact, the cheapest dense method (the default up to ``max_dim``)."""
  info = lambda d: MethodInfo("cholesky", d ** 3 / 3 + 2 * d ** 3, dense_apply_flops(d))
  return InverseMethod(dense_identity, cholesky_refresh, dense_apply, info=info)


@functools.cache  # equal arguments, one method: see base.InverseMethod
def eigh() -> InverseMethod:
  """Symmetric eigendecomposition: exact; the eigenvalues are shifted exactly."""
  info = lambda d: MethodInfo("eigh", None, dense_apply_flops(d))
  return InverseMethod(dense_identity, eigh_refresh, dense_apply, info=info)
