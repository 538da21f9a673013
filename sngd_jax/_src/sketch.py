"""Large layers' statistics kept as a Nystrom sketch ``(S Omega, tr S, c)`` of ``G = S + c I``.

A rank-``r`` Nystrom model (``sngd_jax.inverse.nystrom``) reads the local Fisher
``G`` (``d x d``) only through ``Y = G Omega`` with a fixed ``d x r`` test
matrix ``Omega`` and through ``tr(G)`` (for the damping and the tail
eigenvalue). Both are linear in ``G``, so the running average can be kept as
the sketch itself (J. A. Tropp, A. Yurtsever, M. Udell, V. Cevher, "Fixed-rank
approximation of a positive-semidefinite matrix from streaming data", NeurIPS
2017):

```
Y_t = decay * Y_{t-1} + (1 - decay) G^ Omega,      c_t = decay * (c_{t-1} + (1 - w_{t-1}) p),
G^ Omega = (1/n) X~^T (X~ Omega),      tr(G^) = (1/n) sum_ij X~_ij^2,
```

(``p I``: the prior ``P(G^)``; see below), the same numbers, up to rounding, as sketching
the dense average ``G_t Omega = Y_t + c_t Omega`` at refresh time, for ``O(d r)``
memory instead of ``O(d^2)`` and a batch estimate of ``4 n d r`` FLOPs instead of ``2 n d^2`` (the
``785``-wide input layer of an MNIST MLP at ``r = 128``: 3x fewer). The
refresh no longer multiplies ``G Omega`` (``2 d^2 r``). What is lost is the
dense ``G`` itself: a sketched layer's reconstructed network
(``sngd_jax.damped_factors``) is the Nystrom model's.

**The prior's identity part is kept exactly.** The moving average starts from a
prior ``c I`` (``prior="identity"``, ``"scaled_identity"``), whose weight
``decay^t c`` dominates the factor for the first tens of updates. A sketch of
``S + c I`` would hand it to the rank-``r`` model, which cannot represent it: its
range is then nearly the random ``range(Omega)``, and the data's leading
directions are lost (on the 785-wide input layer of a Fashion-MNIST MLP with
prior weight 0.975, the preconditioned gradient was 40% off the exact one, 2%
with the identity part kept apart: ``benchmarks/nystrom_prior.py``,
``benchmarks/results/nystrom_prior.json``). So a ``Sketch``
holds ``(S Omega, tr S, c)`` for the factor ``S + c I``; the EMA is linear in
all three, and the Nystrom model of ``S`` gets ``c`` added to every eigenvalue
and to the tail (exact for ``S`` of rank at most ``r``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from sngd_jax._src import dtypes as dtypes_lib


class Sketch(NamedTuple):
  """A local Fisher ``G = S + c I`` seen through a fixed test matrix ``Omega``.

  Attributes:
    y: ``S Omega``, shape ``(..., d, r)``.
    trace: ``tr(S)``, shape ``(...)``.
    eye: ``c``, the coefficient of the identity part (the prior's), shape ``(...)``.
  """

  y: jax.Array
  trace: jax.Array
  eye: jax.Array


def flat_blocks(s: Sketch) -> Sketch:
  """A (stack of) sketch(es) as one axis of blocks: ``y (b, d, r)``, ``trace (b,)``, ``eye (b,)``
  (``b = 1`` for one layer, the number of layers for a stack of them)."""
  return Sketch(s.y.reshape((-1,) + s.y.shape[-2:]), s.trace.reshape(-1), s.eye.reshape(-1))


def is_sketch(factor: Any) -> bool:
  """Whether a state factor is a ``Sketch`` (else a dense array)."""
  return isinstance(factor, Sketch)


def row_sums(x: jax.Array, omega: jax.Array, out_sharding=None,
             weights: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """``(X~^T (X~ Omega), ||X~||_F^2)``: the sketch of the sum over rows of ``x~ x~^T`` (and its
  trace); divided by the rows ``n``, the batch estimate ``(1/n) X~^T X~`` as a ``Sketch``.

  With ``weights`` ``m`` (one per row, a row mask): ``(X~^T M (X~ Omega), tr(X~^T M X~))``,
  ``M = diag(m)``, the sketch of ``sum_r m_r x~_r x~_r^T``."""
  omega = omega.astype(x.dtype)
  proj = jnp.matmul(x, omega, precision=dtypes_lib.HIGHEST)
  mx = x if weights is None else weights[:, None].astype(x.dtype) * x
  y = jnp.matmul(mx.T, proj, precision=dtypes_lib.HIGHEST, out_sharding=out_sharding)
  return y, jnp.sum(mx * x)


def of_dense(g: jax.Array, omega: jax.Array) -> Sketch:
  """``(G Omega, tr G)`` of a dense ``(..., d, d)`` factor (the reference, and priors)."""
  tr = block_trace(g)
  return Sketch(jnp.matmul(g, omega.astype(g.dtype), precision=dtypes_lib.HIGHEST), tr,
                jnp.zeros_like(tr))


def identity(omega: jax.Array, dtype) -> Sketch:
  """The sketch of ``I``: ``S = 0``, ``c = 1``."""
  return Sketch(jnp.zeros(omega.shape, dtype), jnp.zeros((), dtype), jnp.ones((), dtype))


def zeros(d: int, rank: int, dtype) -> Sketch:
  """The sketch of the zero matrix (the state before the first factor update)."""
  return Sketch(jnp.zeros((d, rank), dtype), jnp.zeros((), dtype), jnp.zeros((), dtype))


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
    return jnp.sum(full_trace(factor))
  return jnp.sum(block_trace(factor))


def full_trace(s: Sketch) -> jax.Array:
  """``tr(S + c I) = tr(S) + c d`` per block, shape ``s.trace.shape``."""
  return s.trace + s.y.shape[-2] * s.eye
