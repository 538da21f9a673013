"""Square roots of damped blocks, and the inverse methods built on them.

``eigh_roots``, ``denman_beavers`` and ``newton_schulz`` return
``Y = A^{1/2}`` and ``Z = A^{-1/2}`` of a stack of SPD blocks ``A`` together
with the error estimate ``max(||Y Z - I||_F / sqrt(d), ||Y Y - A||_F / ||A||_F)``.
The reconstructed network (``sngd_jax._src.reconstruct``) uses them for
``G^{1/2}`` and ``G^{-1/2}``; ``root_refresh`` turns one into an inverse
method, ``(G + rho I)^{-1} = Z Z``.

The coupled iterations (W. Liu et al., arXiv:2412.07441, use them for the
reconstructed network's ``G^{1/2}`` and ``G^{-1/2}``; N. J. Higham, *Functions
of Matrices*, 2008, ch. 6) start from ``A`` scaled to spectral radius at most 1:

* Denman-Beavers: ``Y_0 = A, Z_0 = I``;
  ``Y <- (Y + Z^{-1}) / 2, Z <- (Z + Y^{-1}) / 2``.
* Newton-Schulz (matrix products only): ``T = (3 I - Z Y) / 2``;
  ``Y <- Y T, Z <- T Z``.

Both keep ``Y_k = A Z_k``, so ``Y Z - I = A Z^2 - I`` measures convergence.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.inverse.base import (
  InverseMethod,
  MethodInfo,
  add_shift,
  all_finite_per_block,
  check_count,
  dense_apply_flops,
  frobenius_norm,
  method_factory,
  symmetrize,
)
from sngd_jax._src.inverse.dense import dense_apply, dense_identity


class Roots(NamedTuple):
  """Square root and inverse square root of a stack of SPD blocks.

  Attributes:
    sqrt: ``Y ~ A^{1/2}``, shape ``(..., d, d)``.
    inv_sqrt: ``Z ~ A^{-1/2}``, same shape.
    error: ``max(||Y Z - I||_F / sqrt(d), ||Y Y - A||_F / ||A||_F)`` per
      block, shape ``(...)``, computed in the working precision.
  """

  sqrt: jax.Array
  inv_sqrt: jax.Array
  error: jax.Array


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=dtypes_lib.HIGHEST)


def _inverse_error(y: jax.Array, z: jax.Array) -> jax.Array:
  d = y.shape[-1]
  r = _mm(y, z) - jnp.eye(d, dtype=y.dtype)[(None,) * (y.ndim - 2)]
  return jnp.linalg.norm(r, axis=(-2, -1)) / math.sqrt(d)


def _root_error(y: jax.Array, z: jax.Array, a: jax.Array) -> jax.Array:
  """``max(||Y Z - I||_F / sqrt(d), ||Y Y - A||_F / ||A||_F)`` per block.

  The second term catches a drift that keeps ``Y Z = I`` but loses
  ``Y^2 = A`` (Denman-Beavers in float32 at condition numbers near 1/eps).
  """
  sq = frobenius_norm(_mm(y, y) - a) / frobenius_norm(a)
  return jnp.maximum(_inverse_error(y, z), sq)


def _scale(a: jax.Array, scale: str) -> jax.Array:
  """A per-block ``s >= lambda_max(A)`` so that ``A / s`` has spectrum in ``(0, 1]``."""
  if scale == "frobenius":
    s = frobenius_norm(a)
  elif scale == "trace":
    s = jnp.trace(a, axis1=-2, axis2=-1)
  else:
    raise ValueError(f"sngd: unknown scale {scale!r}; expected 'frobenius' or 'trace'")
  # A zero block stays zero (and fails the finiteness check) instead of 0/0.
  return jnp.where(s > 0, s, jnp.ones_like(s))


def _real_floating(a: jax.Array, name: str) -> None:
  """Raises for a matrix that is not real floating: an integer matrix has no integer roots,
  and a complex one is not the symmetric matrix these roots are for."""
  if not jnp.issubdtype(a.dtype, jnp.floating):
    raise TypeError(f"sngd: {name} takes a real floating matrix (float16, bfloat16, float32 "
                    f"or float64), got {a.dtype}; cast it with .astype(jnp.float32)")


def eigh_roots(a: jax.Array) -> Roots:
  """Exact ``A^{1/2}`` and ``A^{-1/2}`` from ``A = V diag(lam) V^T``.

  ``A^{p} = V diag(lam^p) V^T``; a non-positive eigenvalue gives non-finite
  entries in ``A^{-1/2}``.

  Args:
    a: symmetric positive definite blocks, shape ``(..., d, d)``.

  Returns:
    ``Roots`` in the input dtype (computed in ``compute_dtype``).
  """
  _real_floating(a, "eigh_roots")
  dtype = a.dtype
  a = symmetrize(a.astype(compute_dtype(dtype)))
  lam, v = jnp.linalg.eigh(a)
  vt = jnp.swapaxes(v, -1, -2)
  # NaN where lam < 0 (the error check then fails the block), from the square root itself:
  # no NaN constant, which jax_debug_nans would stop at eagerly even for a valid block
  root = jnp.sqrt(lam)
  y = _mm(v * root[..., None, :], vt)
  z = _mm(v / root[..., None, :], vt)
  return Roots(y.astype(dtype), z.astype(dtype), _root_error(y, z, a))


def _tolerance(tol: Union[float, str, None], dtype) -> Optional[float]:
  """``tol`` as a number (``"auto"`` is ``1e3 * eps`` of ``dtype``), or None."""
  if tol == "auto":
    return 1e3 * float(jnp.finfo(dtype).eps)
  if isinstance(tol, str):
    raise ValueError(f"sngd: unknown tol {tol!r}; expected a number, 'auto' or None")
  return tol


def _coupled_iteration(step, a: jax.Array, num_iters: int, tol: Union[float, str, None],
                       scale: str) -> Roots:
  """Runs ``(Y, Z) <- step(Y, Z)`` from ``(A / s, I)`` and unscales the result."""
  dtype = a.dtype
  a = symmetrize(a.astype(compute_dtype(dtype)))
  s = _scale(a, scale)[..., None, None]
  y = a / s
  # I, typed as Y (``0 * y``): inside a shard_map the loop carry must vary over the same
  # mesh axes as the block it iterates on (a non-finite block fails either way)
  z = jnp.eye(a.shape[-1], dtype=a.dtype)[(None,) * (y.ndim - 2)] + 0 * y
  limit = _tolerance(tol, a.dtype)
  if limit is None:
    y, z = jax.lax.fori_loop(0, num_iters, lambda _, c: step(*c), (y, z))
  else:
    def cond(carry):
      k, y, z = carry
      # Non-finite blocks have failed already; they must not stop the others.
      err = _inverse_error(y, z)
      return (k < num_iters) & (jnp.max(jnp.where(jnp.isfinite(err), err, 0.0)) > limit)

    def body(carry):
      k, y, z = carry
      return (k + 1,) + step(y, z)

    _, y, z = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), y, z))
  error = _root_error(y, z, a / s)
  y, z = y * jnp.sqrt(s), z / jnp.sqrt(s)
  return Roots(y.astype(dtype), z.astype(dtype), error)


def _db_step(y, z):
  # Both inverses in one batched LAPACK call, not two independent ones: on XLA:CPU two
  # batched LAPACK calls running at once can deadlock the thread pool (docs/known-issues.md).
  inv_z, inv_y = jnp.linalg.inv(jnp.stack([z, y]))
  return 0.5 * (y + inv_z), 0.5 * (z + inv_y)


def _ns_step(y, z):
  t = 1.5 * jnp.eye(y.shape[-1], dtype=y.dtype)[(None,) * (y.ndim - 2)] - 0.5 * _mm(z, y)
  return _mm(y, t), _mm(t, z)


def denman_beavers(a: jax.Array, num_iters: int = 40, tol: Union[float, str, None] = None,
                   scale: str = "frobenius") -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the coupled Denman-Beavers iteration.

  With ``A`` scaled by ``s`` (``||A||_F`` or ``tr(A)``):

  ```
  Y_0 = A / s,  Z_0 = I,
  Y_{k+1} = (Y_k + Z_k^{-1}) / 2,   Z_{k+1} = (Z_k + Y_k^{-1}) / 2,
  ```

  then ``A^{1/2} = sqrt(s) Y``, ``A^{-1/2} = Z / sqrt(s)``. Converges
  quadratically once the spectrum is near 1; a smallest scaled eigenvalue
  ``mu`` costs about ``log2(1/sqrt(mu))`` extra steps. Two matrix inverses a
  step.

  Args:
    a: symmetric positive definite blocks, shape ``(..., d, d)``.
    num_iters: the number of steps, or the most when ``tol`` is given.
    tol: stop once every block's ``||Y Z - I||_F / sqrt(d)`` is at most this
      (checked before each step); ``"auto"`` is ``1e3 * eps`` of the working
      precision; None runs exactly ``num_iters`` steps.
    scale: ``"frobenius"`` or ``"trace"``.

  Returns:
    ``Roots``; bfloat16/float16 inputs are computed in float32 and the
    roots cast back.
  """
  _real_floating(a, "denman_beavers")
  return _coupled_iteration(_db_step, a, num_iters, tol, scale)


def newton_schulz(a: jax.Array, num_iters: int = 40, tol: Union[float, str, None] = None,
                  scale: str = "frobenius") -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the coupled Newton-Schulz iteration.

  Matrix products only (three a step):

  ```
  Y_0 = A / s,  Z_0 = I,  T_k = (3 I - Z_k Y_k) / 2,
  Y_{k+1} = Y_k T_k,   Z_{k+1} = T_k Z_k,
  ```

  with ``s = ||A||_F`` or ``tr(A)`` so that the scaled spectrum lies in
  ``(0, 1]`` (convergence needs ``||I - A / s|| < 1``). Each component with
  scaled eigenvalue ``mu`` grows by about 1.5 a step until it is near
  ``mu^{-1/2}``, then converges quadratically: about
  ``log(1/mu) / (2 log 1.5) + 5`` steps.

  bfloat16/float16 inputs are computed with float32 iterates and float32
  accumulation (``precision=HIGHEST``), then cast back: the iteration is not
  stable at 8 bits of mantissa.

  Args:
    a: symmetric positive definite blocks, shape ``(..., d, d)``.
    num_iters: the number of steps, or the most when ``tol`` is given.
    tol: stop once every block's ``||Y Z - I||_F / sqrt(d)`` is at most this
      (checked before each step); ``"auto"`` is ``1e3 * eps`` of the working
      precision; None runs exactly ``num_iters`` steps.
    scale: ``"frobenius"`` or ``"trace"``.

  Returns:
    ``Roots``.
  """
  _real_floating(a, "newton_schulz")
  return _coupled_iteration(_ns_step, a, num_iters, tol, scale)


ROOTS: dict[str, Callable[..., Roots]] = {
    "eigh": eigh_roots,
    "denman_beavers": denman_beavers,
    "newton_schulz": newton_schulz,
}
"""The square-root methods by name, for ``sqrt_and_inv_sqrt`` and ``sngd_jax.factor_roots``."""


def sqrt_and_inv_sqrt(a: jax.Array, method: str = "eigh", **kwargs) -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the named method (a key of ``ROOTS``)."""
  if method not in ROOTS:
    raise ValueError(f"sngd: unknown root method {method!r}; expected one of {sorted(ROOTS)}")
  return ROOTS[method](a, **kwargs)


def root_refresh(roots: Callable[..., Roots], error_bound: float, **kwargs):
  """An inverse refresh ``(G + rho I)^{-1} = Z Z`` from an inverse square root ``Z``.

  Args:
    roots: a function like ``newton_schulz`` returning ``Roots``.
    error_bound: a block whose ``Roots.error`` exceeds this fails.
    **kwargs: passed to ``roots``.

  Returns:
    A ``refresh(g, shift)`` function for ``InverseMethod``.
  """

  def refresh(g, shift):
    r = roots(add_shift(g, shift), **kwargs)
    z = r.inv_sqrt.astype(compute_dtype(g.dtype))
    inverse = symmetrize(_mm(z, z)).astype(g.dtype)
    ok = all_finite_per_block(inverse) & (r.error <= error_bound)
    return inverse, ok

  return refresh


@method_factory  # equal arguments, one method: see base.InverseMethod
def denman_beavers_inverse(num_iters: int = 40, tol: Union[float, str, None] = "auto",
                           error_bound: float = 1e-3,
                           scale: str = "frobenius") -> InverseMethod:
  """``(G + rho I)^{-1} = Z Z`` with ``Z`` from ``denman_beavers``."""
  check_count("num_iters", num_iters)
  refresh = root_refresh(denman_beavers, error_bound, num_iters=num_iters, tol=tol, scale=scale)
  info = lambda d: MethodInfo("denman_beavers", None, dense_apply_flops(d))
  return InverseMethod(dense_identity, refresh, dense_apply, info=info)


@method_factory  # equal arguments, one method: see base.InverseMethod
def newton_schulz_inverse(num_iters: int = 40, tol: Union[float, str, None] = "auto",
                          error_bound: float = 1e-3,
                          scale: str = "frobenius") -> InverseMethod:
  """``(G + rho I)^{-1} = Z Z`` with ``Z`` from ``newton_schulz`` (products only)."""
  check_count("num_iters", num_iters)
  refresh = root_refresh(newton_schulz, error_bound, num_iters=num_iters, tol=tol, scale=scale)
  info = lambda d: MethodInfo("newton_schulz", None, dense_apply_flops(d))
  return InverseMethod(dense_identity, refresh, dense_apply, info=info)
