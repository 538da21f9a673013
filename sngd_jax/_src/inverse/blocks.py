"""Block-diagonal (block-Jacobi) inverses of large blocks.

``G + rho I ~ blockdiag(G_11 + rho I, ..., G_nn + rho I)`` keeps only the
diagonal sub-blocks of at most ``block_size`` (``O(d * block_size)`` memory),
dropping the couplings between input groups as Shampoo's blocking does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sngd_jax._src.inverse import dense
from sngd_jax._src.inverse.base import (
  InverseMethod,
  MethodInfo,
  check_count,
  describe,
  is_batch_safe,
  is_nystrom,
  method_factory,
)


def _split(d: int, block_size: int) -> tuple[int, int, int]:
  """``(n, s, pad)``: ``n`` sub-blocks of size ``s = min(block_size, d)``, ``pad`` rows added."""
  size = min(block_size, d)
  num = -(-d // size)
  return num, size, num * size - d


def diagonal_blocks(g: jax.Array, block_size: int) -> jax.Array:
  """The diagonal blocks of a stack ``(b, d, d)`` as ``(b, n, s, s)``.

  ``s = min(block_size, d)`` and ``n = ceil(d / s)``.

  The last block is padded with an identity so that it stays invertible and
  its padding decouples from the real coordinates.
  """
  b, d = g.shape[0], g.shape[-1]
  num, block_size, pad = _split(d, block_size)
  if pad:
    g = jnp.pad(g, ((0, 0), (0, pad), (0, pad)))
    g = g.at[:, d:, d:].set(jnp.eye(pad, dtype=g.dtype))
  g = g.reshape(b, num, block_size, num, block_size)
  idx = jnp.arange(num)
  return jnp.moveaxis(g[:, idx, :, idx, :], 0, 1)


@method_factory  # equal arguments, one method: see base.InverseMethod
def block_diagonal(block_size: int = 512,
                   inner: InverseMethod | None = None) -> InverseMethod:
  """Inverts only the diagonal blocks of at most ``block_size`` (block-Jacobi).

  ``G + rho I ~ blockdiag(G_11 + rho I, ..., G_nn + rho I)`` with the shift
  ``rho`` of the whole block; all ``b * n`` sub-blocks go to one batched call
  of ``inner``. A block fails if any of its sub-blocks fails.

  Args:
    block_size: the sub-block size ``s``; blocks with ``d <= s`` are exact.
    inner: the method for the sub-blocks (default Cholesky).

  Returns:
    An ``InverseMethod``; its representation is ``inner``'s with axes
    ``(b, n, ...)``.
  """
  check_count("block_size", block_size)
  inner = inner or dense.cholesky()
  if is_nystrom(inner, block_size):
    raise ValueError(
        "sngd: block_diagonal needs an exact inner method (the last sub-block is padded with "
        "an identity, whose directions a low-rank model would keep instead of the data's)")

  def identity(b, d, dtype):
    num, size, _ = _split(d, block_size)
    rep = inner.identity(b * num, size, dtype)
    return jax.tree.map(lambda r: r.reshape((b, num) + r.shape[1:]), rep)

  def refresh(g, shift):
    b = g.shape[0]
    blocks = diagonal_blocks(g, block_size)
    num = blocks.shape[1]
    rep, ok = inner.refresh(blocks.reshape((b * num,) + blocks.shape[2:]),
                            jnp.repeat(shift, num))
    rep = jax.tree.map(lambda r: r.reshape((b, num) + r.shape[1:]), rep)
    return rep, jnp.all(ok.reshape(b, num), axis=1)

  def apply(rep, v):
    b, d, k = v.shape
    num, size, pad = _split(d, block_size)
    v = jnp.pad(v, ((0, 0), (0, pad), (0, 0))).reshape(b * num, size, k)
    flat = jax.tree.map(lambda r: r.reshape((b * num,) + r.shape[2:]), rep)
    return inner.apply(flat, v).reshape(b, num * size, k)[:, :d]

  def info(d):
    num, size, _ = _split(d, block_size)
    sub = describe(inner, size)
    scale = lambda f: None if f is None else num * f
    return MethodInfo(f"blocks({num} x {sub.name} {size})", scale(sub.refresh_flops),
                      scale(sub.apply_flops))

  def batch_safe(d):
    return is_batch_safe(inner, _split(d, block_size)[1])

  return InverseMethod(identity, refresh, apply, info=info, batch_safe=batch_safe)
