"""The inverse methods that :func:`sngd_jax.sngd` can use, and the size rule.

``sngd(inverse=...)`` takes a key of :data:`METHODS` or an
:class:`sngd_jax.matfun.InverseMethod` built by one of the factories here
(``auto(max_dim=1024)``, ``nystrom.nystrom(rank=128)``, ...).

Large layers: a ``d x d`` dense inverse costs ``O(d^3)`` work and ``O(d^2)``
memory per refresh. :func:`auto` keeps the exact Cholesky inverse up to
``max_dim`` and above it switches to a Nystrom model of rank ``rank``
(``O(d r)`` memory) or to the inverses of the diagonal blocks of at most
``block_size`` (``O(d * block_size)`` memory), which drops the couplings between
input groups (as Shampoo's blocking does).
"""

from __future__ import annotations

from typing import Union

import jax
import jax.numpy as jnp

from sngd_jax import matfun
from sngd_jax import nystrom as nystrom_lib
from sngd_jax import sketch as sketch_lib
from sngd_jax.matfun import InverseMethod

LARGE = ("nystrom", "blocks")


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
    An :class:`InverseMethod`; its representation is ``inner``'s with axes
    ``(b, n, ...)``.
  """
  inner = inner or matfun.cholesky()

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

  return InverseMethod(identity, refresh, apply)


def auto(max_dim: int = 512, large: str = "nystrom", rank: int = 128,
         block_size: int = 512, small: InverseMethod | None = None) -> InverseMethod:
  """Chooses the method by block size ``d`` (static, so each size compiles its own).

  ``d <= max_dim``: ``small`` (Cholesky, exact). ``d > max_dim``: a Nystrom
  model of rank ``rank`` (``large="nystrom"``) or the diagonal blocks of at most
  ``block_size`` (``large="blocks"``).

  Why 512 and 128: every step multiplies each gradient by the cached inverse,
  ``2 d^2 O`` FLOPs dense against ``4 d r O`` for the Nystrom model, whatever
  the batch size. On the README's MLP (batch 128) the dense product for the
  785-wide input layer cost more than the whole forward and backward pass
  (``benchmarks/README.md``, *Where the time goes*); rank 128 cuts that
  product from 316 to 103 MFLOP and the step by ~16%, for an EMA loss after
  1,500 steps of 0.171 instead of 0.161 (``benchmarks/results/defaults.md``).
  Up to ``d = 4 r = 512`` the dense
  product costs at most twice the Nystrom one and stays exact. The Nystrom
  refresh is ``O(d^2 r)`` instead of ``O(d^3)``, and Cholesky is the fastest
  exact method at every size measured (``benchmarks/matfun.py``).

  Args:
    max_dim: the largest block inverted exactly.
    large: ``"nystrom"`` or ``"blocks"``.
    rank: the Nystrom rank for large blocks.
    block_size: the sub-block size for ``large="blocks"``.
    small: the method up to ``max_dim`` (default Cholesky).

  Returns:
    An :class:`InverseMethod` that dispatches on ``d``.
  """
  if large not in LARGE:
    raise ValueError(f"sngd: unknown large-layer method {large!r}; expected one of {LARGE}")
  small = small or matfun.cholesky()
  big = nystrom_lib.nystrom(rank) if large == "nystrom" else block_diagonal(block_size)

  def pick(d: int) -> InverseMethod:
    return small if d <= max_dim else big

  def sketch(d, dtype):
    method = pick(d)
    return method.sketch(d, dtype) if method.sketch is not None else None

  def dim(g):  # a dense stack (b, d, d) or a sketch with y of shape (b, d, r)
    return g.y.shape[-2] if sketch_lib.is_sketch(g) else g.shape[-1]

  return InverseMethod(
      identity=lambda b, d, dtype: pick(d).identity(b, d, dtype),
      refresh=lambda g, shift: pick(dim(g)).refresh(g, shift),
      apply=lambda rep, v: pick(v.shape[-2]).apply(rep, v),
      sketch=sketch,
  )


METHODS: dict[str, InverseMethod] = {
    "cholesky": matfun.cholesky(),
    "eigh": matfun.eigh(),
    "denman_beavers": matfun.denman_beavers_inverse(),
    "newton_schulz": matfun.newton_schulz_inverse(),
    "nystrom": nystrom_lib.nystrom(),
    "blocks": block_diagonal(),
    "auto": auto(),
}
"""Inverse methods by name, with default settings (factories for other settings)."""


def get_method(inverse: Union[str, InverseMethod]) -> InverseMethod:
  """Looks up an inverse method by name (or passes an :class:`InverseMethod` through)."""
  if isinstance(inverse, InverseMethod):
    return inverse
  try:
    return METHODS[inverse]
  except (KeyError, TypeError):
    raise ValueError(f"sngd: unknown inverse method {inverse!r}; expected one of "
                     f"{sorted(METHODS)} or a sngd_jax.matfun.InverseMethod") from None

