"""Data-parallel SNGD with JAX's own sharding: statistics and inverse refreshes.

SNGD's local Fisher of a layer is an average over rows (samples, positions):
``G = (1/n) sum_i x~_i x~_i^T``. With the batch split over devices, the global
statistic is the mean of the per-shard statistics (every shard has the same
static shape under ``jit``, ``shard_map`` and ``pmap``, so plain means weigh
all rows equally)::

    G = (1/k) sum_s G_s,   G_s = (1/m) X~_s^T X~_s,   n = k m.

Two ways to get it, both with XLA's collectives and no host code:

* ``jax.jit`` with the batch sharded over a mesh axis (``NamedSharding``):
  ``X~^T X~`` contracts the sharded row axis and XLA inserts the all-reduce.
  For meshes with explicit axes (the default of ``jax.make_mesh`` in recent
  JAX) the contraction is told that its output is replicated
  (:func:`replicated_out_sharding`).
* ``shard_map``/``pmap``: each device sees its shard only, so ``sngd`` takes an
  ``axis_name`` and averages the batch estimates with ``lax.pmean``
  (:func:`axis_mean`), and agrees across the axis on whether a step is finite
  (:func:`all_agree`) so that every device takes the same ``lax.cond`` branch.

The inverse refresh of a group of ``b`` equal-size blocks (``(b, d, d)``) can
be split over devices, as Distributed Shampoo and kfac-jax do: the stack is
padded with copies of its first block to a multiple of the device count ``k``, device
``s`` refreshes blocks ``[s b'/k, (s+1) b'/k)``, and the pieces are all-gathered,
so the cached inverses stay replicated (:func:`split_refresh`,
:func:`shard_method`). Work per device drops from ``b`` to ``ceil(b/k)``
blocks, at the cost of one all-gather of the inverses per refresh.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from sngd_jax import matfun

AxisName = Union[str, Sequence[str]]


def _explicit_mesh(x: jax.Array):
  """The mesh of ``x``'s sharding type if it has explicit axes, else None."""
  mesh = getattr(jax.typeof(x).sharding, "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in tuple(mesh.axis_types):
    return None
  return mesh


def replicate(x: jax.Array) -> jax.Array:
  """Reshards an explicitly sharded array to replicated; any other array is returned as is.

  The cached inverses are replicated; a gradient block sharded over a model
  axis (explicit mesh) is gathered before it meets them.
  """
  mesh = _explicit_mesh(x)
  return x if mesh is None else jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec()))


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Gives ``x`` the sharding type of ``like`` under an explicit mesh; else returns ``x``."""
  if _explicit_mesh(like) is None:
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding)


def replicated_out_sharding(x: jax.Array) -> Optional[NamedSharding]:
  """The ``out_sharding`` for a contraction over the rows of ``x``.

  Under a mesh with explicit axes, contracting an axis that is sharded is
  ambiguous to JAX's sharding-in-types and must name its output sharding; the
  local Fisher is replicated (an all-reduce over the row shards). Elsewhere
  (no mesh, or auto axes, where XLA's partitioner decides) returns None.

  Args:
    x: an array whose leading (row) axis may be sharded.

  Returns:
    A replicated ``NamedSharding`` on ``x``'s mesh, or None.
  """
  mesh = _explicit_mesh(x)
  return None if mesh is None else NamedSharding(mesh, PartitionSpec())


def axis_mean(x: Any, axis_name: Optional[AxisName]) -> Any:
  """``lax.pmean`` over a bound axis (``shard_map``/``pmap``); identity for None."""
  if axis_name is None:
    return x
  return jax.lax.pmean(x, axis_name)


def all_agree(flag: jax.Array, axis_name: Optional[AxisName]) -> jax.Array:
  """True only where ``flag`` is True on every device of the axis."""
  if axis_name is None:
    return flag
  return jax.lax.psum((~flag).astype(jnp.int32), axis_name) == 0


def _axis_tuple(axis_name: AxisName) -> tuple[str, ...]:
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


def split_refresh(refresh, stacked: jax.Array, shift: jax.Array, axis_name: AxisName):
  """Runs a block refresh with the blocks split over a bound axis.

  Must be called where ``axis_name`` is bound (inside ``shard_map`` or
  ``pmap``), with the same ``stacked`` on every device.

  Args:
    refresh: ``refresh((b, d, d), (b,)) -> (rep, ok)`` of an
      :class:`sngd_jax.matfun.InverseMethod`; ``rep`` is a pytree whose
      leaves have leading axis ``b``.
    stacked: the symmetrized blocks ``G``, ``(b, d, d)``, or a stacked
      :class:`sngd_jax.sketch.Sketch`, replicated.
    shift: the damping shift ``rho`` per block, ``(b,)``, replicated.
    axis_name: the axis (or tuple of axes) to split over.

  Returns:
    ``(rep, ok)`` for all ``b`` blocks, replicated (all-gathered).
  """
  axes = _axis_tuple(axis_name)
  num = jax.lax.axis_size(axes)
  b = shift.shape[0]
  chunk = -(-b // num)
  pad = chunk * num - b
  if pad:
    # Copies of the first block (any method handles them as it does that block); their
    # results are dropped below. `stacked` may be a pytree (a stacked sketch).
    stacked = jax.tree.map(
        lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, axis=0)]), stacked)
    shift = jnp.concatenate([shift, jnp.repeat(shift[:1], pad)])
  start = jax.lax.axis_index(axes) * chunk
  local = jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, start, chunk), stacked)
  rep, ok = refresh(local, jax.lax.dynamic_slice_in_dim(shift, start, chunk))
  gather = lambda v: jax.lax.all_gather(v, axes, tiled=True, to="invarying")[:b]
  return jax.tree.map(gather, rep), gather(ok)


def shard_method(method: matfun.InverseMethod, axis_name: Optional[AxisName] = None,
                 mesh: Optional[Mesh] = None) -> matfun.InverseMethod:
  """An inverse method whose refresh is split over devices.

  Args:
    method: the method to wrap.
    axis_name: split over this bound axis (for ``sngd`` used inside
      ``shard_map``/``pmap``).
    mesh: when ``axis_name`` is None, split over every device of this mesh
      (all its axes) with a ``shard_map`` inside ``jit``; None uses the mesh
      set by ``jax.set_mesh``.

  Returns:
    The same method with ``refresh`` split; ``identity`` and ``apply`` are
    unchanged. The refreshed representation is replicated.
  """
  if axis_name is not None:
    def refresh(stacked, shift):
      return split_refresh(method.refresh, stacked, shift, axis_name)
  else:
    def refresh(stacked, shift):
      use = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
      if use is None or use.empty:
        raise ValueError(
            "sngd: `shard_refresh=True` without `axis_name` needs a mesh: pass "
            "`shard_refresh=mesh` or call inside `with jax.set_mesh(mesh):`")
      axes = tuple(use.axis_names)
      fn = jax.shard_map(lambda s, r: split_refresh(method.refresh, s, r, axes), mesh=mesh,
                         in_specs=(PartitionSpec(), PartitionSpec()), out_specs=PartitionSpec())
      return fn(stacked, shift)
  return method._replace(refresh=refresh)
