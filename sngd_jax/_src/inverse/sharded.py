"""Inverse refreshes split over devices.

The refresh of a group of ``b`` equal-size blocks (``(b, d, d)``) can be split
over devices, as Distributed Shampoo and kfac-jax do: the stack is padded with
copies of its first block to a multiple of the device count ``k``, device ``s``
refreshes blocks ``[s b'/k, (s+1) b'/k)``, and the pieces are all-gathered, so
the cached inverses stay replicated (``split_refresh``,
``shard_method``). Work per device drops from ``b`` to ``ceil(b/k)``
blocks, at the cost of one all-gather of the inverses per refresh.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sngd_jax._src.distributed import AxisName, axis_names
from sngd_jax._src.inverse.base import InverseMethod, check_method


def split_refresh(refresh, stacked: jax.Array, shift: jax.Array, axis_name: AxisName):
  """Runs a block refresh with the blocks split over a bound axis.

  Must be called where ``axis_name`` is bound (inside ``shard_map`` or
  ``pmap``), with the same ``stacked`` on every device.

  Args:
    refresh: ``refresh((b, d, d), (b,)) -> (rep, ok)`` of an
      ``sngd_jax.inverse.InverseMethod``; ``rep`` is a pytree whose
      leaves have leading axis ``b``.
    stacked: the symmetrized blocks ``G``, ``(b, d, d)``, or a stacked
      ``sngd_jax.Sketch``, replicated.
    shift: the damping shift ``rho`` per block, ``(b,)``, replicated.
    axis_name: the axis (or tuple of axes) to split over.

  Returns:
    ``(rep, ok)`` for all ``b`` blocks, replicated (all-gathered).
  """
  axes = axis_names(axis_name)
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


def shard_method(method: InverseMethod, axis_name: Optional[AxisName] = None,
                 mesh: Optional[Mesh] = None) -> InverseMethod:
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
    unchanged. The refreshed representation is replicated. Without a NumPy twin
    (``InverseMethod.host``): the split refresh runs in XLA on every platform.
  """
  check_method("shard_method", method)
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
  return method._replace(refresh=refresh, host=None)
