"""Memory, communication and compute of SNGD, per layer, before running it.

For a layer with a local Fisher of size ``d`` (``d = I + 1`` with a bias) held
as ``b`` blocks (``b = 1`` for ``fisher="linear"``, ``b = O`` for ``"rfim"``),
``O`` outputs, ``n`` rows per global batch and ``s`` bytes per entry:

* state: the running factor, ``b d^2 s`` bytes (``(d r + 1) s`` for a layer
  kept as a rank-``r`` sketch, :mod:`sngd_jax.sketch`), plus the cached
  inverse (its size depends on the method; read exactly from
  ``jax.eval_shape`` of ``init``: ``b d^2 s`` for ``"cholesky"``);
* data-parallel communication: one all-reduce of the batch estimate per factor
  update, ``b d^2 s`` bytes (the gradients' own all-reduce, ``d O s``, is the
  same as for any optimizer and is not counted); with ``shard_refresh`` one
  all-gather of the inverse per refresh;
* compute: the batch estimate ``2 n b d^2`` flops per factor update
  (``4 n d r + 2 n d`` sketched), the
  refresh per inverse update (``"cholesky"``: Cholesky ``d^3/3`` plus two
  triangular solves against ``I``, ``2 d^3``, per block), and the
  preconditioning ``2 d^2 O`` per step.

Amortized per step: ``factor / factor_every + refresh / inverse_every + apply``.
"""

from __future__ import annotations

import inspect
import math
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from sngd_jax import layers as layers_lib
from sngd_jax import sketch as sketch_lib
from sngd_jax.transform import sngd

# Flops of one refresh of one (d x d) block, for the methods we can count.
_CHOLESKY_FLOPS = lambda d: d ** 3 / 3 + 2 * d ** 3


def nystrom_refresh_flops(d: int, rank: int, from_sketch: bool = False) -> float:
  """Refresh of one rank-``r`` Nystrom block: sketch ``G Omega`` (``2 d^2 r``; not needed
  when the state keeps the sketch), the small Cholesky, solve, Gram, eigh and basis."""
  r = min(rank, d)
  return (0 if from_sketch else 2 * d * d * r) + 7 * d * r * r + 10 * r ** 3


def sketch_factor_flops(rows: int, d: int, rank: int) -> float:
  """Batch estimate of a sketched factor: ``X~ Omega`` and ``X~^T (.)`` (``2 n d r`` each)
  and the trace ``sum X~^2`` (``2 n d``)."""
  return 4.0 * rows * d * rank + 2.0 * rows * d


REFRESH_FLOPS_PER_BLOCK = {
    "cholesky": _CHOLESKY_FLOPS,
    "nystrom": lambda d: nystrom_refresh_flops(d, 256),
    # The default rule (sngd_jax.methods.auto): exact Cholesky up to d = 512, rank-128 Nystrom.
    "auto": lambda d: _CHOLESKY_FLOPS(d) if d <= 512 else nystrom_refresh_flops(d, 128),
}

# Flops of applying a block's cached inverse to a (d x k) gradient, by method.
_DENSE_APPLY = lambda d, k: 2.0 * d * d * k


def nystrom_apply_flops(d: int, k: int, rank: int) -> float:
  """``(M + rho I)^{-1} v`` for a ``d x k`` ``v``: ``U^T v``, ``U (c * .)``, plus the tail term."""
  return 4.0 * d * min(rank, d) * k + 2.0 * d * k


APPLY_FLOPS = {
    "nystrom": lambda d, k: nystrom_apply_flops(d, k, 256),
    "auto": lambda d, k: _DENSE_APPLY(d, k) if d <= 512 else nystrom_apply_flops(d, k, 128),
}


class LayerCost(NamedTuple):
  """Estimated costs of one preconditioned layer.

  Attributes:
    path: the layer path.
    fisher: ``"linear"`` or ``"rfim"``.
    dim: size ``d`` of each local Fisher block.
    num_blocks: number of ``d x d`` blocks ``b``.
    factor_bytes: bytes of the running factor in the state.
    inverse_bytes: bytes of the cached inverse representation in the state.
    allreduce_bytes: bytes all-reduced per factor update in data-parallel
      training (the batch estimate).
    allgather_bytes: bytes all-gathered per refresh with ``shard_refresh``.
    factor_flops: flops of one batch estimate (None without ``batch_rows``).
    refresh_flops: flops of one inverse refresh, all blocks (None when the
      inverse method has no formula in :data:`REFRESH_FLOPS_PER_BLOCK`).
    apply_flops: flops of preconditioning the gradient, every step.
    flops_per_step: amortized flops per step (None if a part is unknown).
  """

  path: str
  fisher: str
  dim: int
  num_blocks: int
  factor_bytes: int
  inverse_bytes: int
  allreduce_bytes: int
  allgather_bytes: int
  factor_flops: Optional[float]
  refresh_flops: Optional[float]
  apply_flops: float
  flops_per_step: Optional[float]

  @property
  def state_bytes(self) -> int:
    """Bytes of optimizer state for this layer (factor and inverse)."""
    return self.factor_bytes + self.inverse_bytes


def _nbytes(tree: Any) -> int:
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def cost_estimate(params: Any, batch_rows: Optional[int] = None,
                  **sngd_kwargs: Any) -> dict[str, LayerCost]:
  """Per-layer state, communication and flops of :func:`sngd_jax.sngd` on ``params``.

  Nothing is computed on arrays: the state shapes come from
  ``jax.eval_shape(sngd(**sngd_kwargs).init, params)``, so ``params`` may be
  ``jax.ShapeDtypeStruct`` leaves (e.g. ``jax.eval_shape(model.init, ...)``)
  for a model too large to build here.

  Args:
    params: the params pytree (arrays or ``ShapeDtypeStruct``).
    batch_rows: rows ``n`` of the local Fisher per global batch (the batch
      size for a dense layer on vectors; batch x positions for sequences).
      None leaves ``factor_flops`` unknown.
    **sngd_kwargs: the arguments given to :func:`sngd_jax.sngd` (``fisher``,
      ``inverse``, ``inverse_every``, ``factor_every``, ...).

  Returns:
    A :class:`LayerCost` per preconditioned layer path, in tree order.

  Example::

    costs = sngd_jax.cost_estimate(params, batch_rows=128, inverse_every=100)
    print(sngd_jax.format_costs(costs))
  """
  defaults = {k: p.default for k, p in inspect.signature(sngd).parameters.items()}
  options = {**defaults, **sngd_kwargs}
  specs = layers_lib.discover(params, options["fisher"])
  state = jax.eval_shape(sngd(**sngd_kwargs).init, params)
  per_block = REFRESH_FLOPS_PER_BLOCK.get(options["inverse"])
  costs = {}
  for path, spec in specs.items():
    d, b = spec.dim, spec.num_blocks
    factor = state.factors[path]
    factor_bytes = _nbytes(factor)
    inverse_bytes = _nbytes(state.inverses[path])
    if sketch_lib.is_sketch(factor):  # a rank-r Nystrom layer whose state is G Omega
      rank = factor.y.shape[-1]
      factor_flops = None if batch_rows is None else sketch_factor_flops(batch_rows, d, rank)
      block_flops = nystrom_refresh_flops(d, rank, from_sketch=True)
    else:
      factor_flops = None if batch_rows is None else 2.0 * batch_rows * b * d * d
      block_flops = None if per_block is None else per_block(d)
    refresh_flops = None if block_flops is None else b * block_flops
    apply_flops = APPLY_FLOPS.get(options["inverse"], _DENSE_APPLY)(d, spec.out_dim)
    per_step = None
    if factor_flops is not None and refresh_flops is not None:
      per_step = (factor_flops / options["factor_every"]
                  + refresh_flops / options["inverse_every"] + apply_flops)
    costs[path] = LayerCost(
        path=path, fisher=spec.fisher, dim=d, num_blocks=b, factor_bytes=factor_bytes,
        inverse_bytes=inverse_bytes, allreduce_bytes=factor_bytes,
        allgather_bytes=inverse_bytes, factor_flops=factor_flops,
        refresh_flops=refresh_flops, apply_flops=apply_flops, flops_per_step=per_step)
  return costs


def _human(x: Optional[float], unit: str) -> str:
  if x is None:
    return "?"
  for prefix in ("", "K", "M", "G", "T", "P"):
    if abs(x) < 1000 or prefix == "P":
      return f"{x:.3g} {prefix}{unit}"
    x /= 1000.0
  raise AssertionError("unreachable")


def format_costs(costs: dict[str, LayerCost]) -> str:
  """A markdown table of :func:`cost_estimate`'s result, with a total row."""
  head = ("| layer | fisher | d x d x blocks | state | all-reduce / factor update | "
          "refresh flops | flops / step (amortized) |")
  lines = [head, "|" + " --- |" * 7]
  def row(name, kind, shape, c_state, c_ar, c_ref, c_step):
    lines.append(f"| {name} | {kind} | {shape} | {_human(c_state, 'B')} | "
                 f"{_human(c_ar, 'B')} | {_human(c_ref, 'flop')} | {_human(c_step, 'flop')} |")
  for c in costs.values():
    row(c.path, c.fisher, f"{c.dim} x {c.dim} x {c.num_blocks}", c.state_bytes,
        c.allreduce_bytes, c.refresh_flops, c.flops_per_step)
  vals = list(costs.values())
  total = lambda f: None if any(f(c) is None for c in vals) else sum(f(c) for c in vals)
  row("**total**", "", "", total(lambda c: c.state_bytes), total(lambda c: c.allreduce_bytes),
      total(lambda c: c.refresh_flops), total(lambda c: c.flops_per_step))
  return "\n".join(lines)
