"""Memory, communication and compute of SNGD, per layer, before running it.

For a layer with a local Fisher of size ``d`` (``d = I + 1`` with a bias) held
as ``b`` blocks (``b = 1`` for ``fisher="linear"``, ``b = O`` for ``"rfim"``),
``O`` outputs, ``n`` rows per global batch and ``s`` bytes per entry:

* state: the running factor, ``b d^2 s`` bytes (``(d r + 1) s`` for a layer
  kept as a rank-``r`` sketch, ``sngd_jax._src.sketch``), plus the cached
  inverse (its size depends on the method; read exactly from
  ``jax.eval_shape`` of ``init``: ``b d^2 s`` for ``"cholesky"``);
* data-parallel communication: one all-reduce of the batch estimate per factor
  update, ``b d^2 s`` bytes (the gradients' own all-reduce, ``d O s``, is the
  same as for any optimizer and is not counted); with ``shard_refresh`` one
  all-gather of the inverse per refresh;
* compute: the batch estimate ``2 n b d^2`` flops per factor update
  (``4 n d r + 2 n d`` sketched), the
  refresh per inverse update (``"cholesky"``: Cholesky ``d^3/3``, the
  triangular inverse ``L^{-1}``, ``d^3``, and the product ``L^{-T} L^{-1}``,
  ``2 d^3``, per block), and the
  preconditioning ``2 d^2 O`` per step.

Amortized per step: ``factor / factor_every + refresh / inverse_every + apply``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import jax
import numpy as np

from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse import nystrom as nystrom_lib
from sngd_jax._src.inverse.base import MethodInfo, describe
from sngd_jax._src.transform import _layers_of, _method_of, sngd


def sketch_factor_flops(rows: int, d: int, rank: int) -> float:
  """Batch estimate of a sketched factor: ``X~ Omega`` and ``X~^T (.)`` (``2 n d r`` each)
  and the trace ``sum X~^2`` (``2 n d``)."""
  return 4.0 * rows * d * rank + 2.0 * rows * d


class LayerCost(NamedTuple):
  """Estimated costs of one preconditioned layer.

  Attributes:
    path: the layer path.
    fisher: ``"linear"`` or ``"rfim"``.
    method: how its blocks are inverted, e.g. ``"cholesky"`` or
      ``"nystrom(rank=128)"`` (from the inverse method's ``info``).
    dim: size ``d`` of each local Fisher block.
    num_blocks: number of ``d x d`` blocks ``b``.
    factor_bytes: bytes of the running factor in the state.
    inverse_bytes: bytes of the cached inverse representation in the state.
    allreduce_bytes: bytes all-reduced per factor update in data-parallel
      training (the batch estimate).
    allgather_bytes: bytes all-gathered per refresh with ``shard_refresh``.
    factor_flops: flops of one batch estimate (None without ``batch_rows``).
    refresh_flops: flops of one inverse refresh, all blocks (None when the
      inverse method gives no formula, e.g. the iterative roots).
    apply_flops: flops of preconditioning the gradient, every step (None
      when the method gives no formula).
    flops_per_step: amortized flops per step (None if a part is unknown).
  """

  path: str
  fisher: str
  method: str
  dim: int
  num_blocks: int
  factor_bytes: int
  inverse_bytes: int
  allreduce_bytes: int
  allgather_bytes: int
  factor_flops: Optional[float]
  refresh_flops: Optional[float]
  apply_flops: Optional[float]
  flops_per_step: Optional[float]

  @property
  def state_bytes(self) -> int:
    """Bytes of optimizer state for this layer (factor and inverse)."""
    return self.factor_bytes + self.inverse_bytes


def nbytes(tree: Any) -> int:
  """Bytes of all leaves of ``tree`` (arrays or ``ShapeDtypeStruct``)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def cost_estimate(params: Any, batch_rows: Optional[int | Mapping[str, int]] = None,
                  **sngd_kwargs: Any) -> dict[str, LayerCost]:
  """Per-layer state, communication and flops of ``sngd_jax.sngd`` on ``params``.

  Nothing is computed on arrays: the state shapes come from
  ``jax.eval_shape(sngd(**sngd_kwargs).init, params)``, so ``params`` may be
  ``jax.ShapeDtypeStruct`` leaves (e.g. ``jax.eval_shape(model.init, ...)``)
  for a model too large to build here.

  Args:
    params: the params pytree (arrays or ``ShapeDtypeStruct``).
    batch_rows: rows ``n`` of the local Fisher per global batch (the batch
      size for a dense layer on vectors; batch x positions for sequences and
      for a conv layer's patches), or a mapping from layer path to its rows
      where the layers see different counts (a conv net). None, or a layer
      missing from the mapping, leaves ``factor_flops`` unknown. The statistics
      read the rows of the examples they are computed from: with
      ``stats_batch_size=k`` pass the rows of ``k`` examples (``batch_rows``
      does not know the batch size, so ``stats_batch_size`` does not rescale it).
    **sngd_kwargs: the arguments given to ``sngd_jax.sngd`` (``fisher``,
      ``inverse``, ``inverse_every``, ``factor_every``, ...).

  Returns:
    A ``LayerCost`` per preconditioned layer path, in tree order.

  Examples:
    ```python
    costs = sngd_jax.cost_estimate(params, batch_rows=128, inverse_every=100)
    print(sngd_jax.format_costs(costs))
    ```
  """
  state = jax.eval_shape(sngd(**sngd_kwargs).init, params)
  config = state.config
  method = _method_of(config)
  specs = _layers_of(config, params)
  costs = {}
  for path, spec in specs.items():
    d, b = spec.dim, spec.num_blocks
    rows = batch_rows.get(path) if isinstance(batch_rows, Mapping) else batch_rows
    factor = state.factors[path]
    factor_bytes = nbytes(factor)
    inverse_bytes = nbytes(state.inverses[path])
    if spec.structure == "diagonal":  # embeddings: token counts, an elementwise inverse
      info = MethodInfo("diagonal", 2.0 * d, 1.0)
      factor_flops = None if rows is None else float(rows)
      block_flops = info.refresh_flops
    elif sketch_lib.is_sketch(factor):  # a rank-r Nystrom layer whose state is G Omega
      info = describe(method, d)
      rank = factor.y.shape[-1]
      factor_flops = None if rows is None else b * sketch_factor_flops(rows, d, rank)
      block_flops = nystrom_lib.refresh_flops(d, rank, from_sketch=True)
    else:
      info = describe(method, d)
      factor_flops = None if rows is None else 2.0 * rows * b * d * d
      block_flops = info.refresh_flops
    refresh_flops = None if block_flops is None else b * block_flops
    apply_flops = None if info.apply_flops is None else info.apply_flops * spec.out_dim
    per_step = None
    if None not in (factor_flops, refresh_flops, apply_flops):
      per_step = (factor_flops / config.factor_every
                  + refresh_flops / config.inverse_every + apply_flops)
    costs[path] = LayerCost(
        path=path, fisher=spec.fisher, method=info.name, dim=d, num_blocks=b,
        factor_bytes=factor_bytes, inverse_bytes=inverse_bytes, allreduce_bytes=factor_bytes,
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
  """A markdown table of ``cost_estimate``'s result, with a total row."""
  head = ("| layer | fisher | method | d x d x blocks | state | all-reduce / factor update | "
          "refresh flops | flops / step (amortized) |")
  lines = [head, "|" + " --- |" * 8]
  def row(name, kind, method, shape, c_state, c_ar, c_ref, c_step):
    lines.append(f"| {name} | {kind} | {method} | {shape} | {_human(c_state, 'B')} | "
                 f"{_human(c_ar, 'B')} | {_human(c_ref, 'flop')} | {_human(c_step, 'flop')} |")
  for c in costs.values():
    row(c.path, c.fisher, c.method, f"{c.dim} x {c.dim} x {c.num_blocks}", c.state_bytes,
        c.allreduce_bytes, c.refresh_flops, c.flops_per_step)
  vals = list(costs.values())
  total = lambda f: None if any(f(c) is None for c in vals) else sum(f(c) for c in vals)
  row("**total**", "", "", "", total(lambda c: c.state_bytes), total(lambda c: c.allreduce_bytes),
      total(lambda c: c.refresh_flops), total(lambda c: c.flops_per_step))
  return "\n".join(lines)
