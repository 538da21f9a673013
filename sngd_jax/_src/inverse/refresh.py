"""Refreshing the cached inverses: grouping, the method call, and acceptance.

``refresh_inverses`` is the one place where the transform inverts its
factors. Blocks of equal size and dtype (from every layer, and every unit of an
rfim layer) are stacked and refreshed in one batched call of the inverse
method, which keeps the compiled program small and the kernels busy. Each
refreshed block must then pass ``accept_refresh``; a rejected block keeps
its previous inverse (the identity before the first refresh) and is counted.

A layer whose factor was never fed (weight ``w_t = 0``: a layer that no step has called yet
under ``uncalled="skip"``, or only on zero rows) has no factor to invert (``G_t / w_t`` reads
as 0, whose damped inverse is ``1 / abs_damping`` or does not exist). Its blocks keep their
previous inverse, the identity that ``init`` made (its gradient passes unchanged), and are
not counted as failures: nothing failed. The first refresh after its first batch inverts
its factor as usual (``refresh_inverses_xla``: ``w_t > 0``).

Acceptance: a block of ``A = G + s I`` (``G`` positive semi-definite, shift
``s = damping * tr(G) + abs_damping``) is accepted only if

- ``s > 0`` and ``1 / s`` is finite (a zero or subnormal shift means the
  damped matrix may be singular: there is nothing safe to invert);
- the representation, applied to a fixed probe ``v``, gives ``y = A^{-1} v``
  with ``v^T y > 0`` (positive definite along ``v``) and
  ``||y|| <= 2 ||v|| / s`` (the exact inverse obeys ``||A^{-1}|| <= 1 / s``
  for any PSD ``G``, also for low-rank approximations of ``G``; an inverse
  that breaks the bound by a factor 2 is numerically wrong).

The representation must also be finite. Its small leaves (at most one axis
per block: eigenvalues, shifts) are checked entry by entry; its matrices
(``d x d`` inverses and roots, the Nystrom basis ``U``) through ``y``: both
comparisons are False for a ``y`` that is not finite, and every entry of ``v``
is positive, so a NaN or an infinity at entry ``(i, j)`` of an explicit
inverse makes ``y_i`` non-finite and one in ``U`` spreads to all of ``y``.
So the test needs no pass over a ``d x d`` matrix: one product with ``v``, two
reductions of length ``d`` and the small leaves (few kernels: every kernel adds
to the compile time of the step). ``tests/test_reliability.py`` puts a NaN or
an infinity at every position of a dense and of a Nystrom representation.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax._src import control, statistics
from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse import diagonal as diagonal_lib
from sngd_jax._src.inverse import host as host_lib
from sngd_jax._src.inverse.base import (
  InverseMethod,
  all_finite_per_block,
  damping_shift,
  is_batch_safe,
  layer_groups,
  symmetrize,
)


def _probe(d: int, dtype) -> jax.Array:
  """A fixed probe vector with no structure aligned to the axes, ``||v|| = 1``.

  A constant of the compiled program (computed in numpy, ``host.probe``, which the
  host refresh shares): no kernel.
  """
  return jnp.asarray(host_lib.probe(d, np.float64), dtype)


def accept_refresh(apply_fn, rep: Any, blocks: jax.Array | jax.ShapeDtypeStruct,
                   shift: jax.Array, ok: jax.Array) -> jax.Array:
  """Per-block acceptance of a refreshed inverse (see the module docstring).

  Args:
    apply_fn: the method's ``apply(rep, g)`` for ``g`` of shape ``(b, d, k)``.
    rep: the new representation of ``A^{-1}`` (leading axis ``b``).
    blocks: the refreshed blocks, shape ``(b, d, d)`` (only shape and dtype are used).
    shift: the damping shift ``s`` per block, shape ``(b,)``.
    ok: the method's own flags, shape ``(b,)``.

  Returns:
    ``(b,)`` bool: the blocks whose new inverse may be used.
  """
  b, d, _ = blocks.shape
  dtype = blocks.dtype
  v = jnp.broadcast_to(_probe(d, dtype)[None, :, None], (b, d, 1))
  y = apply_fn(rep, v)[..., 0].astype(dtype)
  inv_shift = 1.0 / shift.astype(dtype)
  # v.y and y.y as one product (a norm's reduction makes several kernels on XLA:CPU)
  vy, yy = jnp.einsum("kbd,bd->kb", jnp.stack([v[..., 0], y]), y, precision=dtypes_lib.HIGHEST)
  positive = vy > 0  # False for NaN
  bounded = jnp.sqrt(yy) <= 2.0 * inv_shift  # False for NaN and Inf
  good_shift = (shift > 0) & jnp.isfinite(inv_shift)
  small = [all_finite_per_block(leaf) for leaf in jax.tree.leaves(rep) if leaf.ndim <= 2]
  finite_small = jnp.all(jnp.stack(small), axis=0) if small else True
  return ok & positive & bounded & good_shift & finite_small


UNROLL_MAX = 8
"""On CPU, groups of up to this many blocks are refreshed by separate one-block calls written
out in the program; larger groups by a loop (``lax.map``) of one-block calls."""

UNROLL_LAYERS_MAX = 16
"""On CPU, groups of up to this many one-block layers are written out too
(``_per_block_group``): their calls share every kernel (12 one-block layers of ``d = 9``
compile 14 fusions written out, 38 through the loop), whereas a layer of several blocks
is sliced per block, a kernel per offset (one layer of 12 blocks: 35 written out, 25
through the loop)."""


def one_call_per_member(refresh):
  """``refresh`` that stays one LAPACK call per block under a caller's ``jax.vmap``.

  A user who vmaps the training step (an ensemble, several seeds in one program) batches
  every call inside it, so the one-block calls of ``batched_refresh`` would become
  batched LAPACK calls again, which deadlock XLA:CPU's thread pool when two run at once
  (docs/known-issues.md; a vmapped MLP step hung in two concurrent ``spotrf`` calls). Under
  ``vmap`` this function runs the members one after another
  (``jax.custom_batching.sequential_vmap``: a ``lax.map``). ``refresh`` is traced first and
  the values it closes over (the step's tracers) become explicit arguments, so that a
  batched one is mapped too. The derivative is ``refresh``'s own
  (``control.with_derivatives_of``), so forward- and reverse-mode differentiation through
  the update work as before; only a vmap of such a derivative batches the calls.
  """

  def call(stacked, shift):
    run, consts = control.traced_with_explicit_closure(refresh, stacked, shift)
    sequential = jax.custom_batching.sequential_vmap(run)
    return control.with_derivatives_of(run, sequential)(stacked, shift, *consts)

  return call


def _block_by_block(refresh, stacked: Any, shift: jax.Array):
  """``refresh`` applied to one block at a time: a batch of one per call.

  Up to ``UNROLL_MAX`` blocks the calls are written out, each after the one
  before (``optimization_barrier``, as the groups in ``refresh_inverses``: a
  method may itself make batched LAPACK calls for one block, as
  ``denman_beavers`` does); XLA:CPU compiles the kernels of equal shapes once.
  More blocks go through ``lax.map``, whose loop XLA:CPU compiles as a program
  of its own (``benchmarks/README.md``, *Compile time*).
  """
  b = shift.shape[0]
  refresh = one_call_per_member(refresh)
  if b <= UNROLL_MAX:
    outs, previous = [], None
    for i in range(b):
      block = jax.tree.map(lambda a, i=i: a[i:i + 1], stacked)
      if previous is not None:
        block, _ = jax.lax.optimization_barrier((block, previous))
      previous = refresh(block, shift[i:i + 1])
      outs.append(previous)
    return jax.tree.map(lambda *parts: jnp.concatenate(parts), *outs)

  def one(args):
    blocks, sh = args
    out = refresh(jax.tree.map(lambda a: a[None], blocks), sh[None])
    return jax.tree.map(lambda a: a[0], out)
  return jax.lax.map(one, (stacked, shift))


def batched_refresh(refresh, stacked: Any, shift: jax.Array, batch_safe: bool = False):
  """``refresh(stacked, shift)`` on GPU/TPU; on CPU one block per LAPACK call.

  jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op thread pool and
  block their own pool thread until the parts finish, so two batched calls that
  XLA runs at once deadlock a pool of two threads. Programs running at once on
  several CPU devices of one process (``xla_force_host_platform_device_count``,
  a sharded step) share that pool (a triangular solve of ``cho_solve`` in a
  stack dump, docs/known-issues.md), and so can two calls of one program on one
  device (two ``spotrf`` in a stack dump of the scanned transformer example,
  although ``refresh_inverses`` orders its groups). With a batch of one the
  kernel runs on its own thread: a group of one block is called directly,
  larger groups one block per call on CPU (``_block_by_block``); on CPU both stay
  one block per call under a caller's ``jax.vmap`` (``one_call_per_member``).
  A refresh that calls no such kernel for these blocks (``batch_safe``, from
  ``InverseMethod.batch_safe``: the closed-form inverse of ``2 x 2`` blocks)
  takes the whole group in one call on every platform.
  """
  if batch_safe:  # no LAPACK call
    return refresh(stacked, shift)
  # One block: nothing to split, but a caller's vmap must not batch it on CPU.
  cpu = (one_call_per_member(refresh) if shift.shape[0] == 1
         else functools.partial(_block_by_block, refresh))
  return jax.lax.platform_dependent(stacked, shift, cpu=cpu, default=refresh)


def refresh_group(method: InverseMethod, stacked: Any, shift: jax.Array, d: int, dtype,
                  platform: str | None = None):
  """One group of equal-size blocks: the method's refresh, then ``accept_refresh``.

  Args:
    method: the inverse method.
    stacked: ``(b, d, d)`` blocks, or a stacked ``Sketch`` of them.
    shift: the damping shift per block, shape ``(b,)``.
    d: the block size.
    dtype: the blocks' dtype.
    platform: None: ``batched_refresh`` (the form for each platform); ``"cpu"``: a caller
      already in the CPU branch of a ``platform_dependent`` with one block
      (``one_call_per_member``); ``"default"``: one already in the GPU/TPU branch (one
      batched call).

  Returns:
    ``(rep, ok)``: the new representations (leading axis ``b``) and the ``(b,)``
    flags of the blocks that passed the method's own check and ``accept_refresh``.
  """
  if platform == "cpu":
    assert shift.shape[0] == 1, shift.shape
    rep, ok = one_call_per_member(method.refresh)(stacked, shift)
  elif platform == "default":
    rep, ok = method.refresh(stacked, shift)
  else:
    rep, ok = batched_refresh(method.refresh, stacked, shift, is_batch_safe(method, d))
  b = shift.shape[0]
  return rep, accept_refresh(method.apply, rep, jax.ShapeDtypeStruct((b, d, d), dtype),
                             shift, ok)


def keep_accepted(new: Any, ok: jax.Array, old: Any) -> Any:
  """``new`` where ``ok`` (one flag per block, the leading axis), else ``old``."""
  return jax.tree.map(
      lambda n, o: jnp.where(ok.reshape((-1,) + (1,) * (n.ndim - 1)), n, o), new, old)


def refresh_inverses(specs, factors, weights, old_inverses, method: InverseMethod, damping,
                     abs_damping):
  """Refreshes every layer's inverse, one batched method call per (size, dtype) group.

  On CPU, with ``host_refresh(method)`` and where every group's method has a NumPy
  twin (``InverseMethod.host``:
  ``cholesky``, ``nystrom``, ``auto``), the whole refresh runs on the host in one
  ``jax.pure_callback`` (``inverse/host.py``: the same results to rounding, a
  fraction of the compile time); elsewhere, and on GPU and TPU, in XLA
  (``refresh_inverses_xla``).

  Args:
    specs: the layers, by path.
    factors: the running factors ``G_t`` (arrays or sketches), by path.
    weights: their weights ``w_t`` (the factor in use is ``G_t / w_t``).
    old_inverses: the cached representations, kept for rejected blocks.
    method: the inverse method.
    damping: relative damping (a value).
    abs_damping: absolute damping (a value).

  Returns:
    ``(inverses, failures)``: the new representations by path and the number
    of rejected blocks (int32).
  """
  the_plan = host_lib.plan(specs, factors, method)
  args = (specs, factors, weights, old_inverses, method, damping, abs_damping)
  if the_plan is None:
    return refresh_inverses_xla(*args)
  return jax.lax.platform_dependent(
      cpu=lambda: host_lib.refresh_inverses(the_plan, factors, weights, old_inverses, damping,
                                            abs_damping),
      default=lambda: refresh_inverses_xla(*args))


def refresh_inverses_xla(specs, factors, weights, old_inverses, method: InverseMethod, damping,
                         abs_damping):
  """``refresh_inverses`` compiled to XLA kernels (the arguments and results are the same).

  Kernels are compiled per distinct fused computation: XLA:CPU compiles equal ones once
  (``benchmarks/README.md``, *Compile time*). So the failures are counted once for all
  layers (one sum over every block's flag, not one per group), and on CPU a written-out
  group (``_per_block_group``) refreshes each layer's blocks from its own factor, without
  stacking the group and slicing it again, which made a kernel per block offset.
  """
  diagonal, groups = layer_groups(specs, factors)
  new_inverses, oks, feds = {}, [], []
  for path in diagonal:
    rep, ok = diagonal_lib.refresh(statistics.normalized(factors[path], weights[path]),
                                   damping, abs_damping)
    fed = weights[path] > 0  # never fed: keeps its identity, and nothing failed
    new_inverses[path] = jnp.where(ok & fed, rep, old_inverses[path])
    oks.append(jnp.reshape(ok, (1,)))
    feds.append(jnp.reshape(fed, (1,)))
  # The groups are refreshed one after another (a data dependence through
  # optimization_barrier), never concurrently: on XLA:CPU (jaxlib 0.10.2) a batched LAPACK
  # call splits its batch over XLA's thread pool and blocks its own pool thread until the
  # parts finish, so as many concurrent calls as pool threads (2 on a 2-core machine)
  # deadlock the pool (docs/known-issues.md). On GPU and TPU the order costs nothing.
  previous = None
  for (d, dtype, sketched), paths_in_group in groups.items():
    blocks = {}
    for p in paths_in_group:
      g = statistics.normalized(factors[p], weights[p])
      # stacked Sketch: y (n, d, r), trace (n,); a layer's stack axes flattened
      blocks[p] = sketch_lib.flat_blocks(g) if sketched else g.reshape((-1, d, d))
    sizes = [jax.tree.leaves(blocks[p])[0].shape[0] for p in paths_in_group]
    args = (method, paths_in_group, sizes, d, dtype, sketched, damping, abs_damping)
    limit = UNROLL_LAYERS_MAX if all(n == 1 for n in sizes) else UNROLL_MAX
    if 1 < sum(sizes) <= limit and not is_batch_safe(method, d):
      refreshed = jax.lax.platform_dependent(
          blocks, previous, cpu=functools.partial(_per_block_group, *args),
          default=functools.partial(_stacked_group, *args, "default"))
    else:
      refreshed = _stacked_group(*args, None, blocks, previous)
    previous = refreshed
    refreshed, ok_group = refreshed
    oks.append(ok_group)
    for p, n in zip(paths_in_group, sizes, strict=True):
      rep, ok = refreshed[p]
      fed = weights[p] > 0  # never fed: keeps its identity, uncounted
      feds.append(jnp.broadcast_to(fed, (n,)))
      new_inverses[p] = keep_accepted(rep, ok & fed, old_inverses[p])
  # Every block's flags in one vector, counted by one reduction.
  failures = (jnp.sum(~jnp.concatenate(oks) & jnp.concatenate(feds), dtype=jnp.int32) if oks
              else jnp.zeros((), jnp.int32))
  return new_inverses, failures


def _stacked_group(method, paths, sizes, d, dtype, sketched, damping, abs_damping, platform,
                   blocks, previous):
  """One group's blocks stacked and refreshed by ``refresh_group`` (``batched_refresh``: one
  batched call on GPU/TPU): ``({path: (rep, ok)}, ok)``, leading axis the layer's blocks
  (the group's, for the last ``ok``)."""
  stacked = jax.tree.map(lambda *a: jnp.concatenate(a), *[blocks[p] for p in paths])
  if not sketched:
    stacked = symmetrize(stacked)
  shift = damping_shift(stacked, damping, abs_damping)
  if previous is not None:  # after the previous group's refresh: one at a time
    stacked, _ = jax.lax.optimization_barrier((stacked, previous))
  rep, ok = refresh_group(method, stacked, shift, d, dtype, platform)
  out, start = {}, 0
  for p, size in zip(paths, sizes, strict=True):
    sl = slice(start, start + size)
    start += size
    out[p] = (jax.tree.map(lambda r, sl=sl: r[sl], rep), ok[sl])
  return out, ok


def _per_block_group(method, paths, sizes, d, dtype, sketched, damping, abs_damping, blocks,
                     previous):
  """``_stacked_group`` on CPU for a written-out group (``UNROLL_MAX``,
  ``UNROLL_LAYERS_MAX``): each block refreshed from its layer's factor by its own
  one-block call, each after the one before
  (``optimization_barrier``), as ``_block_by_block`` does for a stack; the same inverses
  and flags. A layer of one block is not sliced, so equal-size layers run equal kernels,
  which XLA:CPU compiles once."""
  out = {}
  for p, n in zip(paths, sizes, strict=True):
    parts = []
    for i in range(n):
      one = blocks[p] if n == 1 else jax.tree.map(lambda a, i=i: a[i:i + 1], blocks[p])
      if not sketched:
        one = symmetrize(one)
      shift = damping_shift(one, damping, abs_damping)
      if previous is not None:
        one, _ = jax.lax.optimization_barrier((one, previous))
      previous = refresh_group(method, one, shift, d, dtype, "cpu")
      parts.append(previous)
    out[p] = parts[0] if n == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  return out, jnp.concatenate([out[p][1] for p in paths])
