"""The inverse methods ``sngd_jax.sngd`` can use by name, and the size rule.

``sngd(inverse=...)`` takes a key of ``METHODS`` or an
``sngd_jax.inverse.InverseMethod`` built by one of the factories in
``sngd_jax.inverse`` (``auto(max_dim=1024)``, ``nystrom(rank=64)``, ...).

Large layers: a ``d x d`` dense inverse costs ``O(d^3)`` work and ``O(d^2)``
memory per refresh. ``auto`` keeps the exact Cholesky inverse up to
``max_dim`` and above it switches to a Nystrom model of rank ``rank``
(``O(d r)`` memory) or to the inverses of the diagonal blocks of at most
``block_size``.
"""

from __future__ import annotations

from typing import Union

from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse import dense, roots
from sngd_jax._src.inverse import nystrom as nystrom_lib
from sngd_jax._src.inverse.base import (
    InverseMethod,
    describe,
    host_of,
    is_batch_safe,
    method_factory,
)
from sngd_jax._src.inverse.blocks import block_diagonal

AUTO_MAX_DIM = 512
"""The widest layer input ``auto()`` inverts exactly (blocks up to ``d = 513`` with the bias
row)."""


LARGE = ("nystrom", "blocks")


@method_factory  # equal arguments, one method: see base.InverseMethod
def auto(max_dim: int = AUTO_MAX_DIM, large: str = "nystrom",
         rank: int = nystrom_lib.DEFAULT_RANK,
         block_size: int = 512, small: InverseMethod | None = None) -> InverseMethod:
  """Chooses the method by block size ``d`` (static, so each size compiles its own).

  ``d <= max_dim + 1``: ``small`` (Cholesky, exact). ``d > max_dim + 1``: a Nystrom
  model of rank ``rank`` (``large="nystrom"``) or the diagonal blocks of at most
  ``block_size`` (``large="blocks"``). The ``+ 1`` is the bias row of
  ``x~ = [x; 1]``: a ``max_dim``-wide layer stays exact whether or not it has a
  bias (the method sees only the block size ``d``).

  Why a size rule: every step multiplies each gradient by the cached inverse,
  ``2 d^2 O`` FLOPs dense against ``4 d r O`` for the Nystrom model, whatever
  the batch size, and the dense refresh is ``O(d^3)`` against ``O(d^2 r)``. Up
  to ``d = 4 r`` the dense product costs at most twice the Nystrom one and
  stays exact. The measured trade-off (step time and loss for each rank) is in
  ``benchmarks/results/defaults.md``; per-layer choices are printed by
  ``sngd_jax.coverage`` and ``sngd_jax.cost_estimate``.

  Args:
    max_dim: the widest layer input inverted exactly (blocks up to ``max_dim + 1``).
    large: ``"nystrom"`` or ``"blocks"``.
    rank: the Nystrom rank for large blocks.
    block_size: the sub-block size for ``large="blocks"``.
    small: the method up to ``max_dim + 1`` (default Cholesky).

  Returns:
    An ``InverseMethod`` that dispatches on ``d``.
  """
  if large not in LARGE:
    raise ValueError(f"sngd: unknown large-layer method {large!r}; expected one of {LARGE}")
  small = small or dense.cholesky()
  big = nystrom_lib.nystrom(rank) if large == "nystrom" else block_diagonal(block_size)

  def pick(d: int) -> InverseMethod:
    return small if d <= max_dim + 1 else big

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
      info=lambda d: describe(pick(d), d),
      batch_safe=lambda d: is_batch_safe(pick(d), d),
      host=lambda d: host_of(pick(d), d),
  )


METHODS: dict[str, InverseMethod] = {
    "cholesky": dense.cholesky(),
    "eigh": dense.eigh(),
    "denman_beavers": roots.denman_beavers_inverse(),
    "newton_schulz": roots.newton_schulz_inverse(),
    "nystrom": nystrom_lib.nystrom(),
    "blocks": block_diagonal(),
    "auto": auto(),
}
"""Inverse methods by name, with default settings (factories for other settings)."""


def get_method(inverse: Union[str, InverseMethod]) -> InverseMethod:
  """Looks up an inverse method by name (or passes an ``InverseMethod`` through)."""
  if isinstance(inverse, InverseMethod):
    return inverse
  try:
    return METHODS[inverse]
  except (KeyError, TypeError):
    raise ValueError(f"sngd: unknown inverse method {inverse!r}; expected one of "
                     f"{sorted(METHODS)} or a sngd_jax.inverse.InverseMethod") from None
