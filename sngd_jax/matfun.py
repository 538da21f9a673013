"""Damped inverses of local Fisher blocks, batched over stacks of equal size.

Every method works on a stack ``G`` of shape ``(b, d, d)`` and the damping

    G_damped = G + (damping * tr(G) + abs_damping) I,

(the reference code's relative rule, per block). A method caches a
*representation* of ``G_damped^{-1}`` (a pytree with leading axis ``b``) and
applies it to gradient blocks ``g`` of shape ``(b, d, k)``. A refresh returns
the new representation and an ``ok`` flag per block; a block that failed
(non-finite) is not used.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

Rep = Any


class InverseMethod(NamedTuple):
  """A way to invert damped blocks.

  Attributes:
    identity: ``identity(b, d, dtype)`` -> the representation of ``I``.
    refresh: ``refresh(G_damped)`` with ``G_damped`` of shape ``(b, d, d)`` ->
      ``(rep, ok)`` with ``ok`` a bool array of shape ``(b,)``.
    apply: ``apply(rep, g)`` with ``g`` of shape ``(b, d, k)`` -> ``G_damped^{-1} g``.
  """

  identity: Callable[[int, int, Any], Rep]
  refresh: Callable[[jax.Array], tuple[Rep, jax.Array]]
  apply: Callable[[Rep, jax.Array], jax.Array]


def damp(g: jax.Array, damping, abs_damping) -> jax.Array:
  """Symmetrizes a stack of blocks and adds ``(damping * tr(G) + abs_damping) I``.

  Args:
    g: blocks of shape ``(..., d, d)``.
    damping: relative damping (scalar).
    abs_damping: absolute damping (scalar).

  Returns:
    The damped blocks, same shape and dtype.
  """
  g = 0.5 * (g + jnp.swapaxes(g, -1, -2))
  shift = damping * jnp.trace(g, axis1=-2, axis2=-1) + abs_damping
  return g + shift[..., None, None].astype(g.dtype) * jnp.eye(g.shape[-1], dtype=g.dtype)


def all_finite_per_block(x: jax.Array) -> jax.Array:
  """``(b,)`` flags: every entry of block ``i`` is finite."""
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _dense_identity(b: int, d: int, dtype) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(d, dtype=dtype), (b, d, d))


def _dense_apply(inverse: jax.Array, g: jax.Array) -> jax.Array:
  return jnp.matmul(inverse, g, precision=jax.lax.Precision.HIGHEST)


def cholesky_refresh(g_damped: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Explicit inverse by a Cholesky factorization and two triangular solves.

  ``G = L L^T``, ``G^{-1} = L^{-T} L^{-1}``; the explicit inverse is cached so
  that every step's preconditioning is one matrix product.

  Args:
    g_damped: ``(b, d, d)`` symmetric positive definite blocks.

  Returns:
    ``(G^{-1}, ok)``; ``ok`` is False for a block whose factorization failed
    (not positive definite, or non-finite).
  """
  chol = jnp.linalg.cholesky(g_damped)
  eye = jnp.broadcast_to(jnp.eye(g_damped.shape[-1], dtype=g_damped.dtype), g_damped.shape)
  inverse = jax.vmap(lambda c, e: jax.scipy.linalg.cho_solve((c, True), e))(chol, eye)
  inverse = 0.5 * (inverse + jnp.swapaxes(inverse, -1, -2))
  return inverse, all_finite_per_block(inverse)


METHODS: dict[str, InverseMethod] = {
    "cholesky": InverseMethod(_dense_identity, cholesky_refresh, _dense_apply),
}


def get_method(name: str) -> InverseMethod:
  """Looks up an inverse method by name, with a clear error."""
  try:
    return METHODS[name]
  except KeyError:
    raise ValueError(f"sngd: unknown inverse method {name!r}; expected one of "
                     f"{sorted(METHODS)}") from None
