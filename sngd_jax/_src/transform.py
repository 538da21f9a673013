"""The ``sngd`` gradient transformation: local Fisher preconditioning.

Structured natural gradient descent (W. Liu et al., "Reconstructing Deep Neural
Networks: Unleashing the Optimization Potential of Natural Gradient Descent",
arXiv:2412.07441) replaces the Fisher matrix of natural gradient descent by
small *local* Fisher matrices built from each layer's inputs. For a layer with
augmented weights ``W~ = [W; b^T]`` (``d x O``) and local Fisher ``G``:

```
Delta W~ = (G + (damping * tr(G) + abs_damping) I)^{-1} grad_W~ L,
```

or column by column with ``G_j`` for ``fisher="rfim"``. This is plain gradient
descent on a *reconstructed* network whose layers are preceded by
``x~ -> G^{-1/2} x~`` and whose weights are ``G^{1/2} W~``.

One update is a pipeline of named stages, each a function below:
check inputs -> update statistics -> refresh inverses -> precondition ->
trust region -> write back -> guard.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple, Optional, cast

import jax
import jax.numpy as jnp
import optax

from sngd_jax._src import control, distributed, paths, precondition, statistics, validation
from sngd_jax._src import layers as layers_lib
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.capture.records import Activations, stacked_rows_pooled
from sngd_jax._src.config import DEFAULTS, AxisName, SNGDConfig, caller_stacklevel, value_at
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.inverse import diagonal as diagonal_lib
from sngd_jax._src.inverse.base import InverseMethod, is_nystrom
from sngd_jax._src.inverse.refresh import refresh_inverses
from sngd_jax._src.inverse.registry import get_method
from sngd_jax._src.inverse.sharded import shard_method
from sngd_jax._src.state import SNGDState as SNGDState


def _layer_dtype(leaf: Any) -> jnp.dtype:
  return compute_dtype(leaf.dtype)


def _flatten(tree: Any) -> tuple[list[Any], Any, dict[tuple[str, ...], int]]:
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
  index = {paths.leaf_parts(p): i for i, (p, _) in enumerate(leaves_with_path)}
  return [leaf for _, leaf in leaves_with_path], treedef, index


def _sketch_omegas(specs: dict[str, layers_lib.LayerSpec], leaves, index,
                   method: InverseMethod) -> dict[str, jax.Array]:
  """The test matrix ``Omega`` of every layer whose factor is kept as a sketch.

  Those are the single-block (``fisher="linear"``) layers, and stacks of them (one sketch
  per layer of a scan over depth, with the same ``Omega``), for whose size the inverse
  method reads ``G = S + c I`` only through ``(S Omega, tr S, c)`` (the Nystrom model of
  ``inverse="auto"`` above ``max_dim``; see ``sngd_jax._src.sketch``).
  """
  if method.sketch is None:
    return {}
  out = {}
  for path, spec in specs.items():
    if spec.structure == "dense" and not spec.per_unit:
      omega = method.sketch(spec.dim, _layer_dtype(leaves[index[spec.kernel]]))
      if omega is not None:
        out[path] = omega
  return out


def _init_state(params: Any, specs: dict[str, layers_lib.LayerSpec], method: InverseMethod,
                config: SNGDConfig) -> SNGDState:
  leaves, _, index = _flatten(params)
  omegas = _sketch_omegas(specs, leaves, index, method)
  factors, weights, inverses = {}, {}, {}
  for path, spec in specs.items():
    dtype = _layer_dtype(leaves[index[spec.kernel]])
    if path in omegas:
      factors[path] = jax.tree.map(lambda a, s=spec.stack: jnp.zeros(s + a.shape, a.dtype),
                                   sketch_lib.zeros(spec.dim, omegas[path].shape[1], dtype))
    else:
      factors[path] = jnp.zeros(spec.factor_shape, dtype)
    weights[path] = jnp.zeros((), dtype)
    if spec.structure == "diagonal":
      inverses[path] = diagonal_lib.identity(spec.in_dim, dtype)
    else:
      inverses[path] = method.identity(spec.num_blocks, spec.dim, dtype)
  # Separate buffers for each counter, so a jitted step may donate the state.
  zero = lambda: jnp.zeros((), jnp.int32)
  return SNGDState(count=zero(), factors=factors, weights=weights, inverses=inverses,
                   has_inverse=jnp.zeros((), bool), num_refresh_failures=zero(),
                   num_skipped_steps=zero(), config=config.static())


def tree_all_finite(tree: Any) -> jax.Array:
  """Whether every floating leaf of ``tree`` is finite, from one sum per leaf.

  A NaN or an infinity makes the sum non-finite (``inf - inf`` is NaN), so
  ``isfinite(sum(x))`` is False whenever ``x`` holds one; it is also False when
  finite values sum past the range of the accumulator (float32 for float32 and
  narrower leaves: ``|x| ~ 1e38 / x.size``; float64 for float64 leaves), which
  then skips a step that was finite: the conservative side. A float sum is one
  reduction kernel, where XLA:CPU splits ``all(isfinite(x))`` (a predicate reduction)
  into several (``inverse.base.all_finite``), and this check runs on every gradient leaf
  every step. Each floating leaf is summed in ``dtypes.compute_dtype`` of its dtype, a
  complex one (a layer left to the next transform) in its own.
  """
  flags = []
  for x in jax.tree.leaves(tree):
    dtype = jnp.asarray(x).dtype
    if jnp.issubdtype(dtype, jnp.floating):
      flags.append(jnp.isfinite(jnp.sum(x, dtype=compute_dtype(dtype))))
    elif jnp.issubdtype(dtype, jnp.complexfloating):  # a layer left to the next transform
      flags.append(jnp.isfinite(jnp.sum(x)))
  return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def _sub_batch(calls, size: int):
  """The first ``size`` examples of every captured call (at every time step of a cell).

  An embedding's lookups are kept whole: counting tokens costs next to nothing, and a
  lookup need not have an example axis (learned positions ``embed(jnp.arange(T))``,
  whose leading axis is the position), so cutting it could drop positions.
  """
  def cut(c):
    if c.batch_axis is not None:  # a batch sharded unevenly for `size` is gathered first
      # (time-major rows, cut per time step after a reshape, whenever it is sharded)
      ax, rows = c.batch_axis, size if c.time_steps == 1 else 1
      cut_able = lambda a: None if a is None else distributed.sliceable(a, ax, rows)
      c = c.replace(inputs=cut_able(c.inputs), outputs=cut_able(c.outputs),
                    row_mask=cut_able(c.row_mask))  # the same examples' mask
    return c.first_examples(size)
  return tuple(c if statistics.is_lookup(c) else cut(c) for c in calls)


def _statistics_activations(config: SNGDConfig, activations: Activations) -> Activations:
  """The activations the statistics are computed from (a sub-batch if so configured)."""
  if config.stats_batch_size is None:
    return activations
  _warn_if_example_axes_differ(activations, config.stats_batch_size)
  return {p: _sub_batch(calls, config.stats_batch_size) for p, calls in activations.items()}


def _warn_if_example_axes_differ(activations: Activations, size: int) -> None:
  """Warns (while tracing) when ``stats_batch_size`` cuts example axes that are not the same
  examples: the layers' calls have example axes of different lengths (a graph network's
  nodes, edges and graphs; rows flattened or gathered from several examples).

  A layer's lengths are the distinct lengths of its calls, so a model called on two batches
  of different sizes in every layer (a PINN's interior and boundary points) does not warn, nor
  does a layer called several times on one batch beside layers called once (a cell called once
  per step by ``hk.static_unroll`` or a Python loop, then a readout of every step; until
  2026-12-07 its ``(B, B, ...)`` calls were compared with the readout's ``(B,)`` and warned);
  embedding lookups (counted whole), records without an example axis and calls on one
  example (a layer on one unbatched vector, a conditioning input) are not compared, and
  nothing is said when no axis is longer than ``size`` (nothing is cut).
  """
  lengths = {}
  for path, calls in activations.items():
    n = tuple(sorted({c.num_examples for c in calls if c.num_examples is not None
                      and c.num_examples > 1 and not statistics.is_lookup(c)}))
    if n:
      lengths[path] = n
  if len(set(lengths.values())) < 2 or max(max(n) for n in lengths.values()) <= size:
    return
  listed = [f"{p!r}: {n[0] if len(n) == 1 else n}" for p, n in sorted(lengths.items())]
  if len(listed) > 8:
    listed = listed[:8] + [f"... {len(listed) - 8} more"]
  warnings.warn(
      f"sngd: stats_batch_size={size} takes the first {size} entries of each layer's example "
      f"axis (the leading axis of its input), and these axes differ in length in this batch "
      f"({', '.join(listed)}), so they do not index the same examples: in a graph network "
      f"they are the nodes, the edges and the graphs (each layer's estimate comes from its "
      f"own first {size} nodes, edges or graphs), in a layer called on rows flattened or "
      f"gathered from several examples (`(B*T, D)`, selected positions) its first {size} "
      "rows. For the statistics of whole examples, leave `stats_batch_size` unset (for the "
      "first graphs of a batch, mask the rest with `sngd_jax.with_row_mask`, one mask per "
      "kind of row: docs/layer-coverage.md, *Graph networks*).",
      stacklevel=caller_stacklevel())


def _masked_rows(specs, acts: Activations) -> dict[str, jax.Array]:
  """The weighted row count ``sum_r m_r`` of each layer with row masks
  (``sngd_jax.with_row_mask``), traced: a layer whose count is 0 keeps its factor."""
  out = {}
  for path, spec in specs.items():
    if path in acts:
      n = statistics.weighted_rows(spec, acts[path])
      if n is not None:
        out[path] = n
  return out


def _batch_estimates(specs, omegas, acts: Activations) -> dict[str, Any]:
  """Each layer's local batch estimate ``G^`` (a sketch for the sketched layers)."""
  out, after = {}, None
  for path, spec in specs.items():
    if path not in acts:  # not called in this step (`uncalled="skip"`)
      continue
    if statistics.num_rows(spec, acts[path]) == 0:  # called on no rows (no edges, an
      continue  # expert without tokens): no estimate (0/0), so its factor is kept as uncalled
    # `after`: a conv layer's patch rows are formed in chunks, after the
    # previous layer's estimate, so that XLA does not hold every layer's at once.
    if path in omegas:
      out[path] = statistics.batch_sketch(spec, acts[path], omegas[path], after)
    else:
      out[path] = statistics.batch_factor(spec, acts[path], after)
    after = statistics.dependency(out[path])
  return out


class _Inputs(NamedTuple):
  """The checked inputs of one update.

  Attributes:
    specs: the preconditioned layers, by path.
    leaves: the flat gradient leaves.
    treedef: their tree structure.
    index: leaf parts -> position in ``leaves``.
    omegas: the sketch test matrix of each sketched layer.
    activations: the captured calls of each preconditioned layer (None when
      ready batch estimates are given instead).
    estimates: the ready batch estimate of each preconditioned layer
      (``update(..., statistics=...)``), or None.
    estimate_rows: the rows each of ``estimates`` averages (``statistics_rows=``), or None:
      a layer with 0 keeps its factor.
  """

  specs: dict[str, layers_lib.LayerSpec]
  leaves: list[Any]
  treedef: Any
  index: dict[tuple[str, ...], int]
  omegas: dict[str, jax.Array]
  activations: Optional[dict[str, Any]]
  estimates: Optional[dict[str, Any]] = None
  estimate_rows: Optional[dict[str, jax.Array]] = None


def _check_inputs(config: SNGDConfig, method: InverseMethod, updates: Any, state: SNGDState,
                  activations: Optional[Activations],
                  estimates: Optional[dict[str, Any]] = None,
                  estimate_rows: Optional[dict[str, Any]] = None) -> _Inputs:
  """Stage 1: finds the layers and raises errors naming the layer for what does not fit."""
  if not isinstance(state, SNGDState):
    what = type(state).__name__
    if isinstance(state, str):  # a restored dict's key, as optax.chain iterates over it
      what = "dict (restored without a target: its keys reached sngd)"
    raise TypeError(
        f"sngd: the optimizer state is a {what}, not the `SNGDState` that "
        "`init` makes. A checkpoint restored without a target comes back as plain dicts and "
        "lists: restore it into `tx.init(params)` (e.g. orbax `restore(path, target)`, "
        "`flax.serialization.from_state_dict(tx.init(params), restored)`)")
  specs = _layers_of(config, updates)
  if not specs:
    validation.check_has_layers(updates, activations)
  if estimates is not None:
    if activations is not None:
      raise ValueError("sngd: pass either `activations=` or `statistics=` to `update`, not "
                       "both")
    validation.check_statistics(specs, state.factors, estimates)
  else:
    activations = stacked_rows_pooled(activations)
    validation.check_structure(specs, state.factors, activations,
                               skip_uncalled=config.uncalled == "skip")
    assert activations is not None  # checked above
    activations = {p: statistics.layer_calls(s, activations[s.source or p])
                   for p, s in specs.items() if activations.get(s.source or p)}
  leaves, treedef, index = _flatten(updates)
  validation.check_param_dtypes(specs, leaves, index, "updates")
  omegas = _sketch_omegas(specs, leaves, index, method)
  validation.check_state_shapes(specs, state.factors,
                                {p: o.shape[1] for p, o in omegas.items()})
  if estimates is not None:
    rows = None if estimate_rows is None else {p: estimate_rows[p] for p in specs
                                               if p in estimate_rows}
    return _Inputs(specs, leaves, treedef, index, omegas, None,
                   {p: estimates[p] for p in specs}, rows)
  assert activations is not None  # checked by check_structure
  validation.check_activations({p: specs[p] for p in activations}, activations)
  return _Inputs(specs, leaves, treedef, index, omegas, activations)


def _schedule_cond(config: SNGDConfig):
  """The conditional of the statistics and refresh schedule.

  ``control.schedule_cond`` keeps it a conditional under a caller's ``jax.vmap`` (an
  ensemble). With ``axis_name`` the predicates agree over the named axis (``all_agree``) and
  the branches hold that axis's collectives, which that function's batching rule cannot
  bind (it re-vmaps the branches without the name), so a plain ``lax.cond`` is kept: under
  ``pmap`` or ``shard_map`` it is the same, and a ``vmap(..., axis_name=...)`` emulating data
  parallelism traces as before.
  """
  return jax.lax.cond if config.axis_name is not None else control.schedule_cond


def _update_statistics(config: SNGDConfig, inputs: _Inputs, state: SNGDState,
                       grads_finite: jax.Array):
  """Stage 2: on factor steps, folds the batch's local Fisher into the moving average.

  Runs under ``lax.cond``: the ``X~^T X~`` products are paid only on one step
  in ``factor_every``, the only steps that read the activations. Those steps
  are rejected (the statistics left as they were, and the step skipped by the
  caller) when an activation is not finite, or when a batch estimate is not
  ``statistics.in_range``: finite activations can still overflow
  ``X~^T X~``. Given ready batch estimates (``update(..., statistics=...)``,
  from ``sngd_jax.MultiSteps``) instead of activations, those are checked and
  folded in the same way, on the same steps. A running factor that is itself
  out of range (only possible in a state written otherwise) restarts from its
  prior, and its blocks are counted with the refresh failures.

  Returns:
    ``(factors, weights, accepted, restarted)``: ``accepted`` False for a
    rejected factor step (True on other steps), ``restarted`` the number of
    blocks restarted (int32).
  """
  specs, omegas, axis_name = inputs.specs, inputs.omegas, config.axis_name
  none_restarted = jnp.zeros((), jnp.int32)
  keep_factors = lambda accepted: (state.factors, state.weights, accepted, none_restarted)
  if inputs.estimates is None:
    source = inputs.activations
    estimate_of = lambda acts: (_batch_estimates(specs, omegas, acts),
                                _masked_rows(specs, acts), True)
  else:
    source = inputs.estimates
    estimate_of = lambda estimates: (estimates, inputs.estimate_rows, False)

  def update_factors(source):
    estimates, estimate_rows, local = estimate_of(source)
    out_f, out_w, estimates_ok, restarted = {}, {}, [], none_restarted
    for path, spec in specs.items():
      if path not in estimates:  # not called in this step (`uncalled="skip"`), or on 0 rows
        out_f[path], out_w[path] = state.factors[path], state.weights[path]
        continue
      if local and estimate_rows and path in estimate_rows:
        # Row masks: each device's estimate weighs by its own real rows.
        estimate, rows = weighted_axis_mean(estimates[path], estimate_rows[path], axis_name)
      else:
        estimate = distributed.axis_mean(estimates[path], axis_name)
        rows = None if estimate_rows is None else estimate_rows.get(path)
      estimates_ok.append(statistics.in_range(estimate))
      factor, weight, restart = statistics.restart_if_out_of_range(state.factors[path],
                                                                   state.weights[path])
      if config.max_factor_ratio is not None:
        estimate = statistics.limit_outlier(estimate, factor, weight, config.max_factor_ratio)
      if rows is not None and jnp.ndim(rows) > 0:
        # One count per layer of a stack (`with_row_mask(..., per_layer=True)`): a layer
        # without rows (an expert that received no token) keeps its factor.
        estimate = _empty_layers_kept(estimate, factor, weight, jnp.asarray(rows))
        rows = jnp.sum(rows)
      out_f[path], out_w[path] = statistics.ema_update(
          factor, weight, estimate, config.decay, config.prior, omegas.get(path))
      if rows is not None:
        # No rows in any micro-batch (``MultiSteps``), or every row masked: no estimate,
        # the factor is kept.
        empty = rows == 0
        keep = lambda new, old, empty=empty: jnp.where(empty, old, new)
        out_f[path] = jax.tree.map(keep, out_f[path], state.factors[path])
        out_w[path] = keep(out_w[path], state.weights[path])
        restart = restart & ~empty
      restarted += restart.astype(jnp.int32) * spec.num_blocks
    in_range = jnp.all(jnp.stack(estimates_ok)) if estimates_ok else jnp.array(True)
    accepted = distributed.all_agree(in_range, axis_name)  # no layers: nothing to reject
    select = lambda new, old: jnp.where(accepted, new, old)
    return (jax.tree.map(select, out_f, state.factors), jax.tree.map(select, out_w, state.weights),
            accepted, jnp.where(accepted, restarted, 0))

  def new_factors(_):
    data = source
    if inputs.estimates is None:
      data = _statistics_activations(config, cast(Activations, data))
    finite = distributed.all_agree(tree_all_finite(data), axis_name)
    return jax.lax.cond(finite, update_factors, lambda _: keep_factors(jnp.array(False)), data)

  do_factor = grads_finite & (state.count % config.factor_every == 0)
  return _schedule_cond(config)(do_factor, new_factors,
                                lambda _: keep_factors(jnp.array(True)), None)


def _per_layer(rows: jax.Array, leaf: jax.Array) -> jax.Array:
  """A count per layer of a stack (shape: the stack's), or a scalar, broadcastable against
  a leaf of the stack's factor (the stack axes first)."""
  return rows.reshape(rows.shape + (1,) * (leaf.ndim - rows.ndim))


def _empty_layers_kept(estimate: Any, factor: Any, weight: jax.Array, rows: jax.Array) -> Any:
  """The estimate of a stack of layers with one row count each, with that of each layer
  without rows (``rows == 0``: an expert that received no token) replaced so that the
  moving average keeps its factor: its factor in use, ``G_{t-1} / w_{t-1}``. The weight
  ``w`` is one for the whole stack, so the factor itself cannot simply be kept: with
  ``prior="none"`` the new weight differs, and ``ema_update`` of ``G_{t-1} / w_{t-1}`` is
  what leaves ``G_t / w_t = G_{t-1} / w_{t-1}`` (every prior). Before the first estimate
  (``w = 0``) such a layer has no factor: it starts from the row-weighted mean of the
  estimates of the layers of its block that have rows, those that differ from it in the last
  stack axis only (the experts of one mixture-of-experts block, ``(E,)``, or ``(L, E)`` for
  blocks scanned over depth: they read the same tokens), ``sum_e n_le G^_le / sum_e n_le``;
  where no layer of its block has rows, from that mean over the whole stack. Its gradient is
  0 on that step. Where no layer has rows the caller keeps the whole stack's factor."""
  empty = rows == 0
  axes = tuple(range(rows.ndim))
  total = jnp.sum(rows)
  block = jnp.sum(rows, axis=-1, keepdims=True)  # the rows of each block (the last axis)

  def one(e, f):
    def mean(weights, over):  # sum_l w_l G^_l over the layers `over`
      return jnp.sum(e * _per_layer(weights, e).astype(e.dtype), axis=over, keepdims=True)
    whole = mean(rows / jnp.where(total > 0, total, 1), axes)
    own = mean(rows / jnp.where(block > 0, block, 1), rows.ndim - 1)
    pooled = jnp.where(_per_layer(block > 0, e), own, whole)
    kept = jnp.where(weight > 0, f / jnp.maximum(weight, jnp.finfo(f.dtype).tiny),
                     jnp.broadcast_to(pooled, e.shape).astype(f.dtype))
    return jnp.where(_per_layer(empty, e), kept.astype(e.dtype), e)

  return jax.tree.map(one, estimate, factor)


def weighted_axis_mean(estimate: Any, rows: jax.Array,
                       axis_name: Optional[AxisName]) -> tuple[Any, jax.Array]:
  """``(sum_s n_s G^_s / sum_s n_s, mean_s n_s)`` over the devices of ``axis_name``.

  With row masks the devices' shards hold different numbers of real rows ``n_s``: the
  estimate of the global batch is their row-weighted mean (``axis_mean`` of ``n_s G^_s``
  over that of ``n_s``), 0 where no device has a row. Without ``axis_name``, the inputs.
  """
  if axis_name is None:
    return estimate, rows
  total = distributed.axis_mean(rows, axis_name)
  safe = jnp.where(total > 0, total, jnp.ones_like(total))
  mean = distributed.axis_mean(
      jax.tree.map(lambda e: e * _per_layer(rows, e).astype(e.dtype), estimate), axis_name)
  return jax.tree.map(lambda e: e / _per_layer(safe, e).astype(e.dtype), mean), total


def seen_by_state(spec: layers_lib.LayerSpec, factor: Any) -> layers_lib.LayerSpec:
  """``spec`` as the ``sngd`` whose state holds ``factor`` saw the layer: without its bias
  when that ``sngd`` did not see the bias (a ``MaskedNode`` under ``optax.masked`` /
  ``multi_transform``, so ``discover`` found no bias).

  Read from the block size ``d`` the state keeps, not from a shape comparison: a dense
  factor is ``(..., d, d)``, a Nystrom sketch ``(S Omega, tr S, c)`` has ``y`` of shape
  ``(..., d, r)``, and ``d = in_dim + 1`` exactly when the bias row ``x~ = [x; 1]`` is in it
  (``in_dim`` is the kernel's, which the mask does not change). A diagonal factor (a lookup
  table) has no bias to drop.
  """
  if spec.bias is None or spec.structure == "diagonal":
    return spec
  d = factor.y.shape[-2] if sketch_lib.is_sketch(factor) else factor.shape[-1]
  return dataclasses.replace(spec, bias=None) if d == spec.in_dim else spec


def as_seen_by(sngd_state: SNGDState, updates: Any) -> Any:
  """``updates`` as an ``sngd`` under a mask sees them: ``optax.MaskedNode()`` for the
  leaves of layers its state does not hold, and for a bias its factor has no row for
  (``seen_by_state``).

  ``MultiSteps`` gets the whole gradient tree; the masked ``sngd`` inside it was made
  (``init``) from the masked one, whose layers are those of its state. A layer whose
  kernel is in the mask and its bias not has a factor without the bias row (``discover``
  sees no bias where the bias is a ``MaskedNode``).
  """
  config = sngd_state.config
  specs = _layers_of(config, updates)
  hide = set()
  for path, spec in specs.items():
    if path not in sngd_state.factors:
      hide.update(p for p in (spec.kernel, spec.bias) if p is not None)
    elif spec.bias is not None and seen_by_state(spec, sngd_state.factors[path]).bias is None:
      hide.add(spec.bias)
  if not hide:
    return updates
  return jax.tree_util.tree_map_with_path(
      lambda key_path, leaf: optax.MaskedNode() if paths.leaf_parts(key_path) in hide else leaf,
      updates)


def local_statistics(updates: Any, state: SNGDState, activations: Activations,
                     masked: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
  """The batch estimates ``G^`` that ``update`` would fold in from ``activations``.

  What ``sngd_jax.MultiSteps`` accumulates over micro-batches: per layer
  path, this device's estimate (before the ``axis_name`` mean and the outlier
  limit, which ``update`` applies to what it is given) in the form of the
  state's factor (a ``sngd_jax.Sketch`` for sketched layers, never a
  dense ``d x d`` for them), and the number of rows ``n`` it averages.

  Args:
    updates: the gradients (their tree names the layers).
    state: the ``SNGDState`` (its recorded configuration says which
      layers, which Fisher kind, and which are sketched).
    activations: from ``sngd_jax.capture``.
    masked: the ``sngd`` of ``state`` is under ``optax.masked`` or ``optax.multi_transform``
      and ``updates`` is the whole tree: read it as that ``sngd`` sees it
      (``as_seen_by``).

  Returns:
    ``(estimates, rows)``; with row masks (``sngd_jax.with_row_mask``) a layer's rows are
    ``sum_r m_r``, traced (0 when every row is masked).
  """
  config = state.config
  if masked:
    updates = as_seen_by(state, updates)
  inputs = _check_inputs(config, _method_of(config), updates, state, activations)
  acts = _statistics_activations(config, cast(Activations, inputs.activations))
  estimates = _batch_estimates(inputs.specs, inputs.omegas, acts)
  rows: dict[str, Any] = {p: statistics.num_rows(spec, acts[p])
                          for p, spec in inputs.specs.items() if p in acts}
  rows.update(_masked_rows(inputs.specs, acts))
  return estimates, rows


def _refresh(config: SNGDConfig, method: InverseMethod, specs, factors, weights,
             state: SNGDState, finite: jax.Array):
  """Stage 3: every ``inverse_every`` steps (and at the first), refreshes the inverses.

  With ``inverse_warmup`` also at ``count = factor_every * 2^k`` (1, 2, 4, 8, ... factor
  updates after the first, which is at step 0) before ``inverse_every``.

  Returns:
    ``(inverses, failures, refreshed)``.
  """
  count = state.count

  def new_inverses(_):
    return refresh_inverses(specs, factors, weights, state.inverses, method,
                            value_at(config.damping, count),
                            value_at(config.abs_damping, count))

  due = (count % config.inverse_every == 0) | ~state.has_inverse
  if config.inverse_warmup:  # also after factor updates 1, 2, 4, 8, ... until inverse_every
    k = count // config.factor_every
    due |= ((count % config.factor_every == 0) & (k > 0) & ((k & (k - 1)) == 0)
            & (count < config.inverse_every))
  do_inverse = finite & due
  inverses, failures = _schedule_cond(config)(
      do_inverse, new_inverses, lambda _: (state.inverses, jnp.zeros((), jnp.int32)), None)
  return inverses, failures, do_inverse


def _write_back(inputs: _Inputs, pres: dict[str, jax.Array], scale: Optional[jax.Array]):
  """Stage 6: splits each scaled ``(d, O)`` update into its kernel and bias leaves.

  Returns:
    ``(out, narrowed)``: the flat output leaves (unpreconditioned leaves are the
    gradients) and the outputs cast to a narrower dtype than their factor's,
    which may overflow and are checked by the guard.
  """
  out, narrowed = list(inputs.leaves), []
  for path, spec in inputs.specs.items():
    if path not in pres:  # the output-layer spec of a tied table: with the table's
      continue
    pre = pres[path] if scale is None else pres[path] * scale.astype(pres[path].dtype)
    # into `out`: layers that are columns of one kernel (`LayerSpec.columns`) each write theirs
    for i, part in precondition.split(spec, pre, out, inputs.index).items():
      out[i] = distributed.reshard_like(part, inputs.leaves[i])
      if jnp.finfo(inputs.leaves[i].dtype).bits < jnp.finfo(pre.dtype).bits:
        narrowed.append(out[i])
  return out, narrowed


def _guard(config: SNGDConfig, finite: jax.Array, narrowed, out):
  """Stage 7: zero updates for a step that is not finite, or that overflowed.

  Finite inputs can still overflow (e.g. a float16 update of a tiny-scale
  layer): such a step is skipped like a non-finite one, so no non-finite value
  ever leaves the transform. Its statistics were finite and are kept; only the
  update is zeroed. The check costs no pass over the updates: a non-finite
  entry of any ``u_l`` makes ``q = sum <g, u>`` non-finite, the trust-region
  scale is at most 1, leaves that are not preconditioned are the (checked)
  gradients, and only outputs cast to a narrower dtype are summed again.
  ``finite`` is the step's flag with ``q``'s finiteness already folded in
  (``precondition.scale_and_check``).

  Returns:
    ``(out, ok)``.
  """
  ok = finite & tree_all_finite(narrowed)
  ok = distributed.all_agree(ok, config.axis_name)
  return [jnp.where(ok, u, jnp.zeros_like(u)) for u in out], ok


def _layers_of(config: SNGDConfig, tree: Any) -> dict[str, layers_lib.LayerSpec]:
  """The layers of a params-shaped tree as ``config`` sees them (its ``fisher`` and
  ``stacked``): the one way ``init``, ``update`` and the reports built on a state find them."""
  return layers_lib.discover(tree, config.fisher, config.stacked)


def _method_of(config: SNGDConfig) -> InverseMethod:
  method = get_method(config.inverse)
  if config.shard_refresh is not False:
    mesh = config.shard_refresh if isinstance(config.shard_refresh, jax.sharding.Mesh) else None
    method = shard_method(method, axis_name=config.axis_name, mesh=mesh)
  return method


def _warn_rfim_nystrom(specs, method: InverseMethod, config: SNGDConfig) -> None:
  """Warns for rfim layers whose blocks get a Nystrom model with the prior inside it.

  A linear layer's Nystrom state is a sketch that keeps the prior ``c I`` out of the
  low-rank model (exact while the data's rank is below ``r``); rfim keeps dense per-unit
  blocks, whose model takes its range from ``G + c I`` as a whole: while the prior
  dominates (the first tens of factor updates) nearly a random subspace.
  """
  if config.prior == "none":
    return
  wide = [p for p, s in specs.items() if s.structure == "dense" and s.fisher == "rfim"
          and is_nystrom(method, s.dim)]
  if wide:
    warnings.warn(
        f"sngd: rfim layers {wide} get a Nystrom model of each unit's dense block with the "
        f"prior ({config.prior!r}) inside it (only a linear layer's sketch keeps the prior "
        "out), which is far from the exact inverse while the prior dominates the factor. "
        "Pass `inverse=\"cholesky\"` for exact blocks, `fisher=\"linear\"` for these "
        "layers, or `prior=\"none\"` (docs/matrix-functions.md).",
        stacklevel=caller_stacklevel())


def sngd_from_config(config: SNGDConfig) -> optax.GradientTransformationExtraArgs:
  """``sngd`` for a ready ``SNGDConfig``."""
  method = _method_of(config)

  def init_fn(params):
    validation.check_not_under_projection()
    validation.check_not_params_placeholder(params)
    specs = _layers_of(config, params)
    validation.warn_unmatched_option_keys(params, config.fisher, config.stacked)
    validation.warn_no_layers(params, specs, config.stacked)
    validation.warn_under_optax_multisteps()
    _warn_rfim_nystrom(specs, method, config)
    leaves, _, index = _flatten(params)
    validation.check_param_dtypes(specs, leaves, index, "params")
    return _init_state(params, specs, method, config)

  def update_fn(updates, state, params=None, *, activations=None, statistics=None,
                statistics_rows=None, **extra_args):
    del params, extra_args
    validation.check_axis_name(config.axis_name)
    # The named scopes label the stages in profiles and in the compiled program's metadata.
    inputs = _check_inputs(config, method, updates, state, activations, statistics,
                           statistics_rows)
    with jax.named_scope("sngd_check"):
      grads_finite = distributed.all_agree(tree_all_finite(inputs.leaves), config.axis_name)
    with jax.named_scope("sngd_statistics"):
      factors, weights, accepted, restarted = _update_statistics(config, inputs, state,
                                                                 grads_finite)
    finite = grads_finite & accepted
    with jax.named_scope("sngd_refresh"):
      inverses, failures, refreshed = _refresh(config, method, inputs.specs, factors, weights,
                                               state, finite)
    factor_dtypes = {p: jax.tree.leaves(factors[p])[0].dtype for p in inputs.specs}
    with jax.named_scope("sngd_precondition"):
      pres, sq_norm = precondition.precondition(inputs.specs, inputs.leaves, inputs.index,
                                                inverses, factor_dtypes, method)
      radius = None if config.max_norm is None else value_at(config.max_norm, state.count)
      scale, q_finite = precondition.scale_and_check(sq_norm, radius, finite)
      out, narrowed = _write_back(inputs, pres, scale)  # scaled before the cast
    with jax.named_scope("sngd_guard"):
      out, ok = _guard(config, finite & q_finite, narrowed, out)
    # A skipped step changed no factor or inverse (both conds are gated on `finite`), so
    # only the step counter needs holding back: no select over the large state every step.
    # Replicated as `init` made them, so that a jitted step compiles once (auto mesh axes).
    factors, weights, inverses = distributed.keep_replicated((factors, weights, inverses))
    new_state = state.replace(
        count=jnp.where(finite, state.count + 1, state.count),
        factors=factors,
        weights=weights,
        inverses=inverses,
        has_inverse=state.has_inverse | refreshed,
        num_refresh_failures=state.num_refresh_failures + failures + restarted,
        num_skipped_steps=state.num_skipped_steps + (~ok).astype(jnp.int32),
    )
    return jax.tree_util.tree_unflatten(inputs.treedef, out), new_state

  # SNGDState is a pytree, though not one of the types optax's `OptState` alias lists.
  return optax.GradientTransformationExtraArgs(cast(optax.TransformInitFn, init_fn), update_fn)


def sngd(
    *,
    fisher: layers_lib.FisherSpec = DEFAULTS.fisher,
    stacked: layers_lib.StackSpec = DEFAULTS.stacked,
    inverse: str | InverseMethod = DEFAULTS.inverse,
    damping: optax.ScalarOrSchedule = DEFAULTS.damping,
    abs_damping: optax.ScalarOrSchedule = DEFAULTS.abs_damping,
    decay: float = DEFAULTS.decay,
    factor_every: int = DEFAULTS.factor_every,
    inverse_every: int = DEFAULTS.inverse_every,
    inverse_warmup: bool = DEFAULTS.inverse_warmup,
    prior: str = DEFAULTS.prior,
    stats_batch_size: Optional[int] = DEFAULTS.stats_batch_size,
    max_factor_ratio: Optional[float] = DEFAULTS.max_factor_ratio,
    max_norm: optax.ScalarOrSchedule | None = DEFAULTS.max_norm,
    axis_name: Optional[AxisName] = DEFAULTS.axis_name,
    shard_refresh: bool | jax.sharding.Mesh = DEFAULTS.shard_refresh,
    uncalled: str = DEFAULTS.uncalled,
) -> optax.GradientTransformationExtraArgs:
  """Preconditions each layer's gradient by its damped local Fisher inverse.

  For every layer found in the params (a ``kernel`` with an optional ``bias``,
  an ``embedding``, a normalization ``scale``; see ``sngd_jax.discover``)
  the transform keeps a running local Fisher ``G`` and a cached inverse, and
  maps the layer's gradient to

  ```
  [Delta W; Delta b^T] = (G + (damping * tr(G) + abs_damping) I)^{-1} [g_W; g_b^T]
  ```

  (per output unit ``j`` with ``G_j`` when ``fisher="rfim"``). Leaves that are
  not part of such a layer pass through unchanged. With ``max_norm`` set, the
  preconditioned layers' updates ``u_l`` are then scaled jointly so that their
  norm in the local-Fisher metric stays within a trust region:

  ```
  q = sum_l <g_l, u_l> = sum_l g_l^T (G_l + rho_l I)^{-1} g_l = ||u||_G^2,
  u_l <- u_l * min(1, max_norm / sqrt(q)),
  ```

  which bounds the first-order change of every layer's outputs per unit of
  learning rate (the norm constraint of K-FAC, Ba et al. 2017, without the
  learning rate: this transform does not know it). A step whose gradients are
  not finite, or a factor step (one of every ``factor_every``, the only steps
  that read the activations) whose activations are not finite or whose batch
  estimate overflows (a non-finite entry, or a trace above ``finfo.max / 16``:
  finite inputs of scale ``~1e19`` in float32), returns zero updates and
  leaves the state as it was (counted in ``num_skipped_steps``); a step whose
  preconditioned update would overflow its dtype also returns zero updates
  and is counted, keeping its (finite) statistics. Refreshed inverses that
  fail the acceptance test keep the previous inverse (the identity before the
  first), counted in ``num_refresh_failures``. The guarantee and its limits:
  ``docs/reliability.md``.

  Args:
    fisher: ``"linear"`` (``G = E[x~ x~^T]``), ``"rfim"``
      (``G_j = E[sigmoid(z_j)^2 x~ x~^T]``), a mapping from layer path to kind
      (unlisted layers get ``"linear"``, ``None`` leaves a layer alone) or a
      callable from layer path to kind.
    stacked: for stacked layers whose params do not show their stack axes
      (a bias-free kernel applied under ``nn.scan`` over depth, ``nnx.scan``
      or a vmap over its weights): a mapping from layer path prefix to the
      number of leading stack axes of every kernel under it, e.g.
      ``{"blocks": 1}``. Each layer of a stack gets its own local Fisher.
      Stacked layers with a bias, and Equinox layers, are recognized without
      it; capture and ``sngd_jax.coverage`` say where it is needed.
    inverse: the inverse method, a key of ``sngd_jax.inverse.METHODS``
      (``"cholesky"``, ``"eigh"``, ``"denman_beavers"``, ``"newton_schulz"``,
      ``"nystrom"``, ``"blocks"``, ``"auto"``) or a
      ``sngd_jax.inverse.InverseMethod`` (e.g.
      ``sngd_jax.inverse.auto(max_dim=1024)``). The default ``"auto"`` is exact
      Cholesky for layers of up to 512 inputs (``d <= 513`` with the bias row) and a
      rank-128 Nystrom model above, whose
      ``O(d r)`` product replaces the ``O(d^2)`` one; those layers keep the
      sketch ``(S Omega, tr S, c)`` of ``G = S + c I`` in the state instead of ``G`` (``O(d r)``
      memory, ``4 n d r`` statistics).
    damping: relative damping, adds ``damping * tr(G) * I``; a schedule of the
      step count is accepted.
    abs_damping: absolute damping, adds ``abs_damping * I``.
    decay: EMA decay of ``G`` per factor update; ``0.0`` uses the current
      batch's estimate alone. The averaging horizon in steps is about
      ``factor_every / (1 - decay)`` (200 with the defaults, as the reference
      code's ``0.995`` every step).
    factor_every: update ``G`` every this many steps (the ``X~^T X~`` cost is
      paid only then).
    inverse_every: refresh the cached inverse every this many steps; the first
      step always computes one.
    inverse_warmup: also refresh after the factor updates number 1, 2, 4, 8, ...
      (steps ``factor_every * 2^k``) until ``inverse_every``, so that the
      early inverses follow the factor's average as it moves away from its
      prior instead of keeping the first step's for ``inverse_every`` steps.
    prior: how the average of ``G`` starts, one of ``sngd_jax.PRIORS``
      (``"identity"`` is the reference code's).
    stats_batch_size: if set, ``G^`` is estimated from the first this many
      examples of the batch only (every row of theirs: all positions, patches
      or tokens, and every time step of a recurrent cell), which cuts the
      ``X~^T X~`` cost; None uses the whole batch. A Python int (with
      ``optax.inject_hyperparams``, list it in ``static_args``). The examples are
      each layer's own leading axis: where the layers' axes differ in length (a
      graph network's nodes, edges and graphs) each takes its own first entries,
      and ``update`` warns.
    max_factor_ratio: if set, a batch estimate whose trace exceeds this many
      times the running factor's is scaled down to it, so that one outlier
      batch cannot dominate the moving average; ``None`` disables it.
    max_norm: the trust-region radius above (a float or a schedule of the
      step count); ``None`` disables it.
    axis_name: for use inside ``shard_map``/``pmap`` with the batch split over
      this axis (or tuple of axes): batch estimates are averaged with
      ``lax.pmean`` so every device holds the global batch's statistics, and a
      step is skipped on all devices if it is not finite on one. Gradients
      must be averaged by the caller, as for any optax optimizer. Leave None
      under plain ``jax.jit`` with sharded arrays, where XLA inserts the
      all-reduce itself.
    shard_refresh: split each inverse refresh over devices (each refreshes a
      slice of the stacked blocks, then all-gather) instead of repeating it on
      every device: ``True`` splits over ``axis_name`` inside
      ``shard_map``/``pmap``, or over the mesh set by ``jax.set_mesh`` under
      ``jit``; a ``jax.sharding.Mesh`` splits over all its devices under
      ``jit``. The cached inverses stay replicated.
    uncalled: what ``update`` does for a layer of the params with no captured
      call in this step (which layers a step calls is fixed when it is traced).
      ``"error"`` (default) raises, naming the layer: a layer that ``capture``
      cannot record (an unsupported layout, a call under ``lax.while_loop``) would
      otherwise be preconditioned by statistics that never see its inputs.
      ``"skip"``: such a layer's factor is left as it is on that step (no
      statistics; its gradient, zero when the layer is not called, is still
      preconditioned), for models whose steps call some layers only (a
      multi-task model training one head per step). ``coverage`` lists the
      layers a step calls.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(updates, state,
    params=None, *, activations=None, statistics=None, **extra_args)`` takes
    the activations from ``sngd_jax.capture`` and ignores other keyword
    arguments. ``statistics`` replaces ``activations`` with ready batch
    estimates, as ``sngd_jax.MultiSteps`` passes those of several
    micro-batches, and ``statistics_rows`` (optional) the rows each layer's
    estimate averages: a layer with 0 rows keeps its factor.

  References:
    W. Liu et al., *Reconstructing Deep Neural Networks: Unleashing the
    Optimization Potential of Natural Gradient Descent*, arXiv:2412.07441.
  """
  return sngd_from_config(SNGDConfig(
      fisher=fisher, stacked=stacked, inverse=inverse, damping=damping,
      abs_damping=abs_damping, decay=decay,
      factor_every=factor_every, inverse_every=inverse_every,
      inverse_warmup=inverse_warmup, prior=prior,
      stats_batch_size=stats_batch_size, max_factor_ratio=max_factor_ratio,
      max_norm=max_norm, axis_name=axis_name, shard_refresh=shard_refresh, uncalled=uncalled))
