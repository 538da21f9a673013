"""Matrix functions of damped local Fisher blocks, batched over stacks of equal size.

Every function works on a stack of symmetric positive semi-definite blocks
``G`` of shape ``(b, d, d)`` and a per-block shift ``rho`` (the damping,
:func:`damping_shift`)::

    rho = damping * tr(G) + abs_damping,     G_rho = G + rho I,

the reference code's relative rule. Two kinds of functions live here:

* square roots, :func:`eigh_roots`, :func:`denman_beavers` and
  :func:`newton_schulz`, which return ``Y = A^{1/2}`` and ``Z = A^{-1/2}``
  together with the error estimate
  ``max(||Y Z - I||_F / sqrt(d), ||Y Y - A||_F / ||A||_F)``;
* *inverse methods* (:class:`InverseMethod`), which cache a representation of
  ``G_rho^{-1}`` at a refresh and apply it to gradient blocks at every step.
  The dense ones (:data:`METHODS`) cache the explicit inverse; Nystrom
  (:mod:`sngd_jax.nystrom`) caches a rank-``r`` eigendecomposition; block
  diagonal and size-dependent (``"auto"``) methods wrap others.

A refresh returns the new representation and an ``ok`` flag per block: False
when the result is not finite or an error estimate exceeds its bound. The
caller (:func:`sngd_jax.sngd`) keeps the previous representation of such a
block and counts the event.

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
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp

from sngd_jax import sketch as sketch_lib

Rep = Any

_HIGHEST = jax.lax.Precision.HIGHEST


class InverseMethod(NamedTuple):
  """A way to represent and apply ``(G + rho I)^{-1}`` for stacks of blocks.

  The functions receive static shapes, so a method may choose what to do by
  the block size ``d`` (see :func:`auto`).

  Attributes:
    identity: ``identity(b, d, dtype)`` -> the representation of ``I``, used
      before the first refresh.
    refresh: ``refresh(G, rho)`` with ``G`` symmetric, shape ``(b, d, d)``,
      undamped, and ``rho`` of shape ``(b,)`` -> ``(rep, ok)``, ``rep`` a
      pytree with leading axis ``b`` and ``ok`` a bool array of shape ``(b,)``.
    apply: ``apply(rep, g)`` with ``g`` of shape ``(b, d, k)`` ->
      ``(G + rho I)^{-1} g`` (or the method's approximation of it).
    sketch: optional; ``sketch(d, dtype)`` -> a ``d x r`` test matrix
      ``Omega`` for blocks of size ``d`` whose statistics the method reads only
      through ``(G Omega, tr G)``, or None. For such blocks the transform keeps
      the running factor as a :class:`sngd_jax.sketch.Sketch` and ``refresh``
      receives a stacked ``Sketch`` (``y`` of shape ``(b, d, r)``, ``trace``
      of shape ``(b,)``) instead of ``G``.
  """

  identity: Callable[[int, int, Any], Rep]
  refresh: Callable[[jax.Array, jax.Array], tuple[Rep, jax.Array]]
  apply: Callable[[Rep, jax.Array], jax.Array]
  sketch: Optional[Callable[[int, Any], Optional[jax.Array]]] = None


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


# ---------------------------------------------------------------------------
# Damping.


def symmetrize(g: jax.Array) -> jax.Array:
  """``(G + G^T) / 2`` over the last two axes."""
  return 0.5 * (g + jnp.swapaxes(g, -1, -2))


def damping_shift(g, damping, abs_damping) -> jax.Array:
  """``rho = damping * tr(G) + abs_damping`` per block, shape ``g.shape[:-2]``.

  ``g`` may also be a (stacked) :class:`sngd_jax.sketch.Sketch`, whose ``trace``
  is ``tr(G)`` per block.
  """
  if sketch_lib.is_sketch(g):
    trace, dtype = g.trace, g.trace.dtype
  else:
    trace, dtype = jnp.trace(g, axis1=-2, axis2=-1), g.dtype
  return jnp.asarray(damping * trace + abs_damping).astype(dtype)


def add_shift(g: jax.Array, shift: jax.Array) -> jax.Array:
  """``G + rho I`` for a stack of blocks and a shift of shape ``g.shape[:-2]``."""
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  return g + jnp.asarray(shift, g.dtype)[..., None, None] * eye


def damp(g: jax.Array, damping, abs_damping) -> jax.Array:
  """Symmetrizes a stack of blocks and adds ``(damping * tr(G) + abs_damping) I``.

  Args:
    g: blocks of shape ``(..., d, d)``.
    damping: relative damping (scalar).
    abs_damping: absolute damping (scalar).

  Returns:
    The damped blocks, same shape and dtype.
  """
  g = symmetrize(g)
  return add_shift(g, damping_shift(g, damping, abs_damping))


def all_finite_per_block(x: jax.Array) -> jax.Array:
  """``(b,)`` flags: every entry of block ``i`` is finite."""
  return jnp.all(jnp.isfinite(x.reshape(x.shape[0], -1)), axis=1)


# ---------------------------------------------------------------------------
# Square roots.


def compute_dtype(dtype) -> jnp.dtype:
  """The working precision: float32 for bfloat16/float16 inputs, else the input's."""
  return jnp.promote_types(dtype, jnp.float32)


def _mm(a: jax.Array, b: jax.Array) -> jax.Array:
  return jnp.matmul(a, b, precision=_HIGHEST)


def _inverse_error(y: jax.Array, z: jax.Array) -> jax.Array:
  d = y.shape[-1]
  r = _mm(y, z) - jnp.eye(d, dtype=y.dtype)
  return jnp.linalg.norm(r, axis=(-2, -1)) / math.sqrt(d)


def _root_error(y: jax.Array, z: jax.Array, a: jax.Array) -> jax.Array:
  """``max(||Y Z - I||_F / sqrt(d), ||Y Y - A||_F / ||A||_F)`` per block.

  The second term catches a drift that keeps ``Y Z = I`` but loses
  ``Y^2 = A`` (Denman-Beavers in float32 at condition numbers near 1/eps).
  """
  sq = jnp.linalg.norm(_mm(y, y) - a, axis=(-2, -1)) / jnp.linalg.norm(a, axis=(-2, -1))
  return jnp.maximum(_inverse_error(y, z), sq)


def _scale(a: jax.Array, scale: str) -> jax.Array:
  """A per-block ``s >= lambda_max(A)`` so that ``A / s`` has spectrum in ``(0, 1]``."""
  if scale == "frobenius":
    s = jnp.linalg.norm(a, axis=(-2, -1))
  elif scale == "trace":
    s = jnp.trace(a, axis1=-2, axis2=-1)
  else:
    raise ValueError(f"sngd: unknown scale {scale!r}; expected 'frobenius' or 'trace'")
  # A zero block stays zero (and fails the finiteness check) instead of 0/0.
  return jnp.where(s > 0, s, jnp.ones_like(s))


def eigh_roots(a: jax.Array) -> Roots:
  """Exact ``A^{1/2}`` and ``A^{-1/2}`` from ``A = V diag(lam) V^T``.

  ``A^{p} = V diag(lam^p) V^T``; a non-positive eigenvalue gives non-finite
  entries in ``A^{-1/2}``.

  Args:
    a: symmetric positive definite blocks, shape ``(..., d, d)``.

  Returns:
    :class:`Roots` in the input dtype (computed in :func:`compute_dtype`).
  """
  dtype = a.dtype
  a = symmetrize(a.astype(compute_dtype(dtype)))
  lam, v = jnp.linalg.eigh(a)
  vt = jnp.swapaxes(v, -1, -2)
  root = jnp.sqrt(jnp.where(lam >= 0, lam, jnp.nan))
  y = _mm(v * root[..., None, :], vt)
  z = _mm(v / root[..., None, :], vt)
  return Roots(y.astype(dtype), z.astype(dtype), _root_error(y, z, a))


def _coupled_iteration(step, a: jax.Array, num_iters: int, tol: Union[float, str, None],
                       scale: str) -> Roots:
  """Runs ``(Y, Z) <- step(Y, Z)`` from ``(A / s, I)`` and unscales the result."""
  dtype = a.dtype
  a = symmetrize(a.astype(compute_dtype(dtype)))
  s = _scale(a, scale)[..., None, None]
  y = a / s
  z = jnp.broadcast_to(jnp.eye(a.shape[-1], dtype=a.dtype), a.shape)
  if tol == "auto":
    tol = 1e3 * float(jnp.finfo(a.dtype).eps)
  if tol is None:
    y, z = jax.lax.fori_loop(0, num_iters, lambda _, c: step(*c), (y, z))
  else:
    def cond(carry):
      k, y, z = carry
      # Non-finite blocks have failed already; they must not stop the others.
      err = _inverse_error(y, z)
      return (k < num_iters) & (jnp.max(jnp.where(jnp.isfinite(err), err, 0.0)) > tol)

    def body(carry):
      k, y, z = carry
      return (k + 1,) + step(y, z)

    _, y, z = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), y, z))
  error = _root_error(y, z, a / s)
  y, z = y * jnp.sqrt(s), z / jnp.sqrt(s)
  return Roots(y.astype(dtype), z.astype(dtype), error)


def _db_step(y, z):
  return 0.5 * (y + jnp.linalg.inv(z)), 0.5 * (z + jnp.linalg.inv(y))


def _ns_step(y, z):
  t = 1.5 * jnp.eye(y.shape[-1], dtype=y.dtype) - 0.5 * _mm(z, y)
  return _mm(y, t), _mm(t, z)


def denman_beavers(a: jax.Array, num_iters: int = 40, tol: Union[float, str, None] = None,
                   scale: str = "frobenius") -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the coupled Denman-Beavers iteration.

  With ``A`` scaled by ``s`` (``||A||_F`` or ``tr(A)``)::

      Y_0 = A / s,  Z_0 = I,
      Y_{k+1} = (Y_k + Z_k^{-1}) / 2,   Z_{k+1} = (Z_k + Y_k^{-1}) / 2,

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
    :class:`Roots`; bfloat16/float16 inputs are computed in float32 and the
    roots cast back.
  """
  return _coupled_iteration(_db_step, a, num_iters, tol, scale)


def newton_schulz(a: jax.Array, num_iters: int = 40, tol: Union[float, str, None] = None,
                  scale: str = "frobenius") -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the coupled Newton-Schulz iteration.

  Matrix products only (three a step)::

      Y_0 = A / s,  Z_0 = I,  T_k = (3 I - Z_k Y_k) / 2,
      Y_{k+1} = Y_k T_k,   Z_{k+1} = T_k Z_k,

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
    :class:`Roots`.
  """
  return _coupled_iteration(_ns_step, a, num_iters, tol, scale)


ROOTS: dict[str, Callable[..., Roots]] = {
    "eigh": eigh_roots,
    "denman_beavers": denman_beavers,
    "newton_schulz": newton_schulz,
}


def sqrt_and_inv_sqrt(a: jax.Array, method: str = "eigh", **kwargs) -> Roots:
  """``A^{1/2}`` and ``A^{-1/2}`` by the named method (a key of :data:`ROOTS`)."""
  if method not in ROOTS:
    raise ValueError(f"sngd: unknown root method {method!r}; expected one of {sorted(ROOTS)}")
  return ROOTS[method](a, **kwargs)


# ---------------------------------------------------------------------------
# Dense inverse methods: the cached representation is the explicit inverse.


def _dense_identity(b: int, d: int, dtype) -> jax.Array:
  return jnp.broadcast_to(jnp.eye(d, dtype=dtype), (b, d, d))


def dense_apply(inverse: jax.Array, g: jax.Array) -> jax.Array:
  """``G^{-1} g`` for a cached explicit inverse: one batched matrix product."""
  return jnp.matmul(inverse, g.astype(inverse.dtype), precision=_HIGHEST)


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
  inverse = symmetrize(_mm(v / shifted[:, None, :], jnp.swapaxes(v, -1, -2)))
  return inverse, all_finite_per_block(inverse) & jnp.all(shifted > 0, axis=-1)


def root_refresh(roots: Callable[..., Roots], error_bound: float, **kwargs):
  """An inverse refresh ``(G + rho I)^{-1} = Z Z`` from an inverse square root ``Z``.

  Args:
    roots: a function like :func:`newton_schulz` returning :class:`Roots`.
    error_bound: a block whose :attr:`Roots.error` exceeds this fails.
    **kwargs: passed to ``roots``.

  Returns:
    A ``refresh(g, shift)`` function for :class:`InverseMethod`.
  """

  def refresh(g, shift):
    r = roots(add_shift(g, shift), **kwargs)
    z = r.inv_sqrt.astype(compute_dtype(g.dtype))
    inverse = symmetrize(_mm(z, z)).astype(g.dtype)
    ok = all_finite_per_block(inverse) & (r.error <= error_bound)
    return inverse, ok

  return refresh


def cholesky() -> InverseMethod:
  """Cholesky: exact, the cheapest dense method (the default up to ``max_dim``)."""
  return InverseMethod(_dense_identity, cholesky_refresh, dense_apply)


def eigh() -> InverseMethod:
  """Symmetric eigendecomposition: exact; the eigenvalues are shifted exactly."""
  return InverseMethod(_dense_identity, eigh_refresh, dense_apply)


def denman_beavers_inverse(num_iters: int = 40, tol: Union[float, str, None] = "auto",
                           error_bound: float = 1e-3,
                           scale: str = "frobenius") -> InverseMethod:
  """``(G + rho I)^{-1} = Z Z`` with ``Z`` from :func:`denman_beavers`."""
  refresh = root_refresh(denman_beavers, error_bound, num_iters=num_iters, tol=tol, scale=scale)
  return InverseMethod(_dense_identity, refresh, dense_apply)


def newton_schulz_inverse(num_iters: int = 40, tol: Union[float, str, None] = "auto",
                          error_bound: float = 1e-3,
                          scale: str = "frobenius") -> InverseMethod:
  """``(G + rho I)^{-1} = Z Z`` with ``Z`` from :func:`newton_schulz` (products only)."""
  refresh = root_refresh(newton_schulz, error_bound, num_iters=num_iters, tol=tol, scale=scale)
  return InverseMethod(_dense_identity, refresh, dense_apply)
