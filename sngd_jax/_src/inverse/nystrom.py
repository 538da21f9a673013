"""Randomized Nystrom approximation of local Fisher blocks, applied by Woodbury.

For a large layer (``d`` inputs) the ``d x d`` inverse costs ``O(d^3)`` work and
``O(d^2)`` memory. Nystrom keeps a rank-``r`` eigendecomposition instead:

```
G ~ G_r = U diag(lam) U^T,        U: d x r orthonormal,
```

from a sketch ``Y = G Omega`` with a fixed random ``d x r`` test matrix
``Omega`` (J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank
approximation of a positive-semidefinite matrix from streaming data", NeurIPS
2017, Algorithm 3, with its stabilizing shift ``nu``). The remaining directions
get the mean discarded eigenvalue ``tau = (tr(G) - sum(lam)) / (d - r)``
(``tail="mean"``; ``tail="zero"`` treats them as 0), so the model is
``M = U diag(lam) U^T + tau (I - U U^T)`` and, with damping ``rho``, every power
is applied in ``O(d r)`` work and memory (Woodbury / spectral form):

```
(M + rho I)^p v = U ((lam + rho)^p - (tau + rho)^p) U^T v + (tau + rho)^p v,
```

``p = -1`` for the preconditioner and ``p = -1/2, 1/2`` for the reconstructed
network (paper: W. Liu et al., arXiv:2412.07441). At ``r = d`` (or for ``G`` of
rank at most ``r``) the approximation is exact up to rounding.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.inverse import base
from sngd_jax._src.inverse import host as host_lib

DEFAULT_RANK = 128
"""The rank of ``nystrom()`` and of ``auto()``'s large layers."""
TAILS = ("mean", "zero")


class NystromRep(NamedTuple):
  """A rank-``r`` model of a stack of damped blocks (leading axis ``b``).

  Attributes:
    basis: ``U``, shape ``(b, d, r)``, orthonormal columns (or zero columns
      for dropped directions).
    eigenvalues: ``lam``, shape ``(b, r)``, non-negative.
    tail: ``tau``, shape ``(b,)``: the eigenvalue given to ``range(U)^perp``.
    shift: ``rho``, shape ``(b,)``: the damping.
  """

  basis: jax.Array
  eigenvalues: jax.Array
  tail: jax.Array
  shift: jax.Array


@functools.lru_cache(maxsize=32)
def _test_matrix_np(d: int, rank: int, seed: int) -> np.ndarray:
  omega = np.random.default_rng([seed, d]).standard_normal((d, rank))
  return np.linalg.qr(omega)[0]


def test_matrix(d: int, rank: int, seed: int, dtype) -> jax.Array:
  """The fixed sketch ``Omega``: ``d x r`` with orthonormal columns, from a Gaussian.

  Made once per ``(d, r, seed)`` on the host (a compile-time constant): the
  tall QR is then not part of every refresh.
  """
  return jnp.asarray(_test_matrix_np(d, rank, seed), dtype)


def approximate(g: jax.Array, rank: int, seed: int = 0,
                tail: str = "mean") -> tuple[jax.Array, jax.Array, jax.Array]:
  """Rank-``r`` Nystrom approximation of a stack of PSD blocks.

  ``Y = G Omega``, ``nu = sqrt(d) eps ||Y||_F``, ``Y_nu = Y + nu Omega``,
  ``C C^T = Omega^T Y_nu`` (Cholesky), ``B = Y_nu C^{-T}``; then
  ``B B^T`` is the Nystrom approximation ``G Omega (Omega^T G Omega)^+ Omega^T G``
  of ``G + nu I``. Its eigenvectors come from the small ``r x r`` matrix
  ``B^T B = W diag(s^2) W^T`` as ``U = B W diag(1/s)`` (a tall QR or SVD is far
  slower on CPU), and ``lam = max(s^2 - nu, 0)``. Directions with
  ``s^2 <= 100 eps s_max^2`` are numerically unreliable and join the tail.
  A zero ``G`` takes ``nu = sqrt(d) eps`` and gives the exact model ``0``; where
  the small Cholesky fails (``Omega^T Y_nu`` not positive definite: a sketch
  that no PSD ``G`` makes) ``lam`` is NaN, and the refresh fails.
  ``G_r <= G`` in the PSD order; with probability at least ``1 - 6 p^{-p}``
  (N. Halko, P.-G. Martinsson, J. A. Tropp, SIAM Review 2011, Thm. 10.8,
  applied to ``G^{1/2}``), for any ``k = r - p``, ``p >= 4``:

  ```
  ||G - G_r||_2 <= [(1 + 8 sqrt(r p log p)) lam_{k+1}^{1/2}
                    + 3 sqrt(r) (sum_{j>k} lam_j)^{1/2}]^2.
  ```

  Args:
    g: symmetric PSD blocks, shape ``(b, d, d)``.
    rank: ``r``; capped at ``d``.
    seed: seed of the fixed test matrix (the same ``Omega`` at every refresh).
    tail: ``"mean"`` or ``"zero"``, see the module docstring.

  Returns:
    ``(U, lam, tau)`` of shapes ``(b, d, r)``, ``(b, r)``, ``(b,)``; the
    columns of ``U`` of dropped directions are zero (they carry no weight).
  """
  work = compute_dtype(g.dtype)
  d = g.shape[-1]
  omega = test_matrix(d, min(rank, d), seed, work)
  return from_sketch(sketch_lib.of_dense(g.astype(work), omega), seed, tail, g.dtype)


def from_sketch(s: sketch_lib.Sketch, seed: int = 0, tail: str = "mean",
                dtype=None, omega: Optional[jax.Array] = None
                ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``approximate`` from the sketch ``(S Omega, tr S, c)`` of ``G = S + c I`` alone.

  The rank-``r`` model is of ``S``; the identity part ``c I`` (the prior's) is added
  exactly, to every eigenvalue and to the tail (``sngd_jax._src.sketch``).

  Args:
    s: a stacked ``sngd_jax.Sketch``, ``y`` of shape ``(b, d, r)``,
      ``trace`` and ``eye`` of shape ``(b,)``, made with ``test_matrix(d, r, seed)``.
    seed: the seed of that test matrix.
    tail: ``"mean"`` or ``"zero"``.
    dtype: the dtype of the result (default ``s.y``'s).
    omega: the test matrix itself, ``(d, r)``, instead of ``seed`` (the one a method's
      ``sketch`` gives, whatever its seed).

  Returns:
    ``(U, lam, tau)`` as ``approximate``.
  """
  if tail not in TAILS:
    raise ValueError(f"sngd: unknown Nystrom tail {tail!r}; expected one of {TAILS}")
  dtype = dtype or s.y.dtype
  work = compute_dtype(s.y.dtype)
  y = s.y.astype(work)
  trace = s.trace.astype(work)
  d, rank = y.shape[-2:]
  eps = jnp.finfo(work).eps
  omega = test_matrix(d, rank, seed, work) if omega is None else omega.astype(work)
  # ``|Y_ij| <= ||G||_2 <= tr G`` (``G`` PSD, ``Omega`` orthonormal): scaled by the trace,
  # ``||Y||_F`` cannot overflow where it is representable, and it is one dot product. A
  # zero factor (``tr G = 0``) takes ``||Y||_F = 1`` instead of 0: its core ``nu I`` then
  # factors, and the model is the exact ``M = 0`` (``lam = 0``, ``tau = 0``), not a failure.
  scale = jnp.where(trace > 0, trace, jnp.ones_like(trace))
  unit = y / scale[:, None, None]
  norm = jnp.sqrt(jnp.einsum("bdr,bdr->b", unit, unit, precision=dtypes_lib.HIGHEST))
  nu = math.sqrt(d) * eps * scale * jnp.where(trace > 0, norm, 1.0)
  y_nu = y + nu[:, None, None] * omega[None]
  # ``core`` and ``gram`` are symmetric to rounding and only their lower triangles are
  # read (LAPACK's potrf and syevd): no symmetrization, and ``B`` solved from the right
  # (``B C^T = Y_nu``), so the refresh compiles no transpose kernel (XLA:CPU compiles
  # every kernel on its own: ``benchmarks/README.md``, *Compile time*).
  core = jnp.einsum("dr,bds->brs", omega, y_nu, precision=dtypes_lib.HIGHEST)
  chol = jnp.linalg.cholesky(core, symmetrize_input=False)
  b = jax.lax.linalg.triangular_solve(chol, y_nu, left_side=False, lower=True,
                                      transpose_a=True)
  gram = jnp.einsum("bdr,bds->brs", b, b, precision=dtypes_lib.HIGHEST)
  s2, w = jnp.linalg.eigh(gram, symmetrize_input=False)
  reliable = s2 > 100 * eps * s2[:, -1:]  # eigh sorts ascending: the last is the largest
  s2_safe = jnp.where(reliable, s2, 1.0)
  u = jnp.matmul(b, w, precision=dtypes_lib.HIGHEST) / jnp.sqrt(s2_safe)[:, None, :]
  u = jnp.where(reliable[:, None, :], u, 0.0)
  # ``0 * s2``: where the small Cholesky failed (``core`` not positive definite: a sketch
  # no PSD factor makes, or rounding), ``B``, the Gram matrix and ``s2`` are NaN and so is
  # ``lam``; the refresh then fails (``ok``) and the block keeps its old inverse, instead
  # of passing as a model of the tail alone.
  lam = jnp.where(reliable, jnp.maximum(s2 - nu[:, None], 0.0), 0.0 * s2)
  # both sums as one product (a reduction makes several kernels on XLA:CPU)
  lam_sum, kept = jnp.einsum("bkr,r->kb", jnp.stack([lam, reliable.astype(work)], axis=1),
                             jnp.ones((rank,), work), precision=dtypes_lib.HIGHEST)
  if tail == "mean":
    rest = trace - lam_sum
    tau = jnp.where(kept < d, jnp.maximum(rest, 0.0) / jnp.maximum(d - kept, 1), 0.0)
  else:
    tau = jnp.zeros(y.shape[:1], work)
  eye = s.eye.astype(work)
  return u.astype(dtype), (lam + eye[:, None]).astype(dtype), (tau + eye).astype(dtype)


def power_apply(rep: NystromRep, v: jax.Array, power: float) -> jax.Array:
  """``(M + rho I)^p v`` in ``O(d r k)`` work, ``v`` of shape ``(b, d, k)``."""
  lam = (rep.eigenvalues + rep.shift[:, None]) ** power
  rest = (rep.tail + rep.shift) ** power
  v = v.astype(rep.basis.dtype)
  coeff = jnp.einsum("bdr,bdk->brk", rep.basis, v, precision=dtypes_lib.HIGHEST)
  coeff = coeff * (lam - rest[:, None])[:, :, None]
  return jnp.einsum("bdr,brk->bdk", rep.basis, coeff, precision=dtypes_lib.HIGHEST) + \
      rest[:, None, None] * v


def dense(rep: NystromRep) -> jax.Array:
  """The model ``M + rho I`` as dense ``(b, d, d)`` matrices (for tests and inspection)."""
  d = rep.basis.shape[-2]
  eye = jnp.eye(d, dtype=rep.basis.dtype)
  return power_apply(rep, jnp.broadcast_to(eye, rep.basis.shape[:1] + (d, d)), 1.0)


@base.method_factory  # equal arguments, one method: see base.InverseMethod
def nystrom(rank: int = DEFAULT_RANK, seed: int = 0, tail: str = "mean") -> base.InverseMethod:
  """Nystrom inverse method: ``O(d r)`` cached memory, ``O(d^2 r)`` refresh work.

  Args:
    rank: the rank ``r`` kept (capped at ``d``).
    seed: seed of the fixed test matrix.
    tail: ``"mean"`` (default) gives the discarded directions the mean
      discarded eigenvalue, so that they are not amplified by ``1 / rho``;
      ``"zero"`` is the plain Nystrom model.

  Returns:
    An ``sngd_jax.inverse.InverseMethod`` whose representation is a
    ``NystromRep``; a refresh fails where the result is not finite.
  """
  if tail not in TAILS:
    raise ValueError(f"sngd: unknown Nystrom tail {tail!r}; expected one of {TAILS}")
  base.check_count("rank", rank)

  def identity(b, d, dtype):
    r = min(rank, d)
    return NystromRep(jnp.zeros((b, d, r), dtype), jnp.zeros((b, r), dtype),
                      jnp.zeros((b,), dtype), jnp.ones((b,), dtype))

  def refresh(g, shift):
    if sketch_lib.is_sketch(g):
      u, lam, tau = from_sketch(g, seed, tail)
      finite_input = (base.all_finite_per_block(g.y) & jnp.isfinite(g.trace)
                      & jnp.isfinite(g.eye))
    else:
      u, lam, tau = approximate(g, rank, seed, tail)
      finite_input = base.all_finite_per_block(g)
    rep = NystromRep(u, lam, tau, shift.astype(u.dtype))
    ok = finite_input & base.all_finite_per_block(u) \
        & base.all_finite(lam, axis=-1) & jnp.isfinite(tau) & (tau + shift > 0)
    return rep, ok

  def apply(rep, v):
    return power_apply(rep, v, -1.0)

  def sketch(d, dtype):
    # Sketch only where it saves memory and work: at r >= d the model is the dense G.
    return test_matrix(d, rank, seed, dtype) if rank < d else None

  def info(d):
    r = min(rank, d)
    return base.MethodInfo(f"nystrom(rank={r})", refresh_flops(d, r), apply_flops(d, r))

  return base.InverseMethod(identity, refresh, apply, sketch, info,
                            host=lambda d: host_lib.nystrom(rank, seed, tail, _test_matrix_np,
                                                           NystromRep))


def refresh_flops(d: int, rank: int, from_sketch: bool = False) -> float:
  """Refresh of one rank-``r`` block: sketch ``G Omega`` (``2 d^2 r``; not needed
  when the state keeps the sketch), the small Cholesky, solve, Gram, eigh and basis."""
  r = min(rank, d)
  return (0 if from_sketch else 2 * d * d * r) + 7 * d * r * r + 10 * r ** 3


def apply_flops(d: int, rank: int) -> float:
  """``(M + rho I)^{-1} v`` for one column ``v``: ``U^T v``, ``U (c * .)`` and the tail term."""
  return 4.0 * d * min(rank, d) + 2.0 * d
