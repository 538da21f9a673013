"""Data-parallel SNGD with JAX's own sharding: statistics, agreement and resharding.

SNGD's local Fisher of a layer is an average over rows (samples, positions):
``G = (1/n) sum_i x~_i x~_i^T``. With the batch split over devices, the global
statistic is the mean of the per-shard statistics (every shard has the same
static shape under ``jit``, ``shard_map`` and ``pmap``, so plain means weigh
all rows equally):

```
G = (1/k) sum_s G_s,   G_s = (1/m) X~_s^T X~_s,   n = k m.
```

Two ways to get it, both with XLA's collectives and no host code:

* ``jax.jit`` with the batch sharded over a mesh axis (``NamedSharding``):
  ``X~^T X~`` contracts the sharded row axis and XLA inserts the all-reduce.
  For meshes with explicit axes (the default of ``jax.make_mesh`` in recent
  JAX) the contraction is told that its output is replicated
  (``replicated_out_sharding``).
* ``shard_map``/``pmap``: each device sees its shard only, so ``sngd`` takes an
  ``axis_name`` and averages the batch estimates with ``lax.pmean``
  (``axis_mean``), and agrees across the axis on whether a step is finite
  (``all_agree``) so that every device takes the same ``lax.cond`` branch.

Splitting the inverse refreshes over devices is ``sngd_jax._src.inverse.sharded``.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec

AxisName = Union[str, Sequence[str]]


def axis_names(axis_name: AxisName) -> tuple[str, ...]:
  """The names of ``axis_name`` as a tuple (one name or a sequence of them)."""
  return (axis_name,) if isinstance(axis_name, str) else tuple(axis_name)


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


def unshard_axis(x: jax.Array, axis: int) -> jax.Array:
  """``x`` with axis ``axis`` replicated under an explicit mesh (its other axes keep their
  sharding); any other array is returned as is.

  Under sharding-in-types, concatenating along an axis, or slicing it, needs that axis
  unsharded and the operands' shardings equal: the bias column of ``X~`` (rows sharded
  over a data axis, features over a model axis), and ``W~ = [W; b^T]`` (a kernel
  sharded over its inputs, FSDP).
  """
  mesh = _explicit_mesh(x)
  if mesh is None:
    return x
  spec = list(jax.typeof(x).sharding.spec) + [None] * x.ndim
  spec = spec[:x.ndim]
  spec[axis % x.ndim] = None
  return jax.sharding.reshard(x, NamedSharding(mesh, PartitionSpec(*spec)))


def sliceable(x: jax.Array, axis: int, size: int) -> jax.Array:
  """``x`` with axis ``axis`` replicated under an explicit mesh where that axis is sharded
  over a number of devices that does not divide ``size``; any other array as is.

  JAX cannot cut ``size`` entries off such an axis (``ShardingTypeError: slicing on
  sharded dims where out dim ... is not divisible``): the first examples of a batch
  sharded over a data axis (``stats_batch_size``).
  """
  mesh = _explicit_mesh(x)
  if mesh is None:
    return x
  entry = (tuple(jax.typeof(x).sharding.spec) + (None,) * x.ndim)[axis % x.ndim]
  names = () if entry is None else axis_names(entry)
  shards = 1
  for name in names:
    shards *= mesh.shape[name]
  return x if size % shards == 0 else unshard_axis(x, axis)


def reshard_like(x: jax.Array, like: jax.Array) -> jax.Array:
  """Gives ``x`` the sharding type of ``like`` under an explicit mesh; else returns ``x``."""
  if _explicit_mesh(like) is None:
    return x
  return jax.sharding.reshard(x, jax.typeof(like).sharding)


def keep_replicated(tree: Any) -> Any:
  """``tree``'s arrays constrained to replicated under a set mesh whose axes are all auto
  (``jax.set_mesh`` of a mesh made with ``AxisType.Auto``); elsewhere ``tree`` as is.

  ``init`` makes the state replicated. Under auto axes XLA's partitioner chooses the sharding
  of the state an update returns, and it shards a per-unit factor ``(O, d, d)`` like the
  kernel's output axis where the kernel is sharded over a model axis: the next call of a
  jitted step then sees a state of another sharding and compiles the step a second time.
  Under explicit axes the state's sharding is part of its type and stays replicated
  (``replicated_out_sharding``); inside ``shard_map`` (manual axes) there is nothing to
  constrain.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
    return tree
  return jax.lax.with_sharding_constraint(tree, NamedSharding(mesh, PartitionSpec()))


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
