"""Gradient accumulation that also accumulates the local Fisher statistics.

``optax.MultiSteps`` averages the gradients of ``k`` micro-batches and hands
the mean to the wrapped optimizer once every ``k`` calls. Wrapped around
``sngd_jax.sngd`` it forwards the extra arguments of each call, so only
the last micro-batch's ``activations`` would reach the preconditioner: its
factors would see ``1/k`` of the data. ``MultiSteps`` accumulates, next
to the gradients, each layer's batch estimate of the local Fisher, weighted by
its rows: after micro-batches ``i = 1..k`` with ``n_i`` rows each,

```
G^ = (sum_i n_i G^_i) / (sum_i n_i) = (1/N) sum_rows x~ x~^T,
```

exactly the estimate of one batch of all ``N = sum_i n_i`` rows (the same
holds per output unit for ``fisher="rfim"``, for token counts of embeddings,
and for the sketch ``(G^ Omega, tr G^)`` of the Nystrom layers, which is linear
in ``G^``: their accumulator is ``d x r``, never ``d x d``). A stack of dense
layers counts the rows of each of its layers (``(E,)``, or ``(L, E)`` for MoE
blocks scanned over depth): under a row mask per layer
(``with_row_mask(..., per_layer=True)``, the experts of a mixture of experts)
expert ``e`` gets ``G^_e = sum_i n_ie G^_ie / sum_i n_ie``, the Gram of all the
rows routed to it in the ``k`` micro-batches over their number, a micro-batch
that routed it none adding nothing, and one routed none in the whole cycle is
kept (or started) as in one step of ``sngd``. On the emitting
call the inner optimizer gets the mean gradient and ``statistics=`` the
accumulated estimates in place of ``activations=``, and folds them in exactly
as it would fold in one big batch's (on the same factor steps, with the same
outlier limit). Under ``axis_name`` each micro-batch's estimates are averaged
over the axis as they are accumulated, so the accumulators are replicated like
the rest of the state (one all-reduce per micro-batch of a factor step).
"""

from __future__ import annotations

import inspect
import math
import typing
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from optax._src import numerics
from optax.transforms import MaskedState

from sngd_jax._src import control, distributed, transform
from sngd_jax._src.state import SNGDState, sngd_states


class MultiStepsState(NamedTuple):
  """State of ``MultiSteps``: ``optax.MultiStepsState`` plus the statistics.

  Attributes:
    mini_step: micro-batches accumulated so far in this step.
    gradient_step: inner optimizer steps taken.
    inner_opt_state: the wrapped optimizer's state.
    acc_grads: the mean (or sum) of the micro-batches' gradients.
    skip_state: what ``should_skip_update_fn`` returned.
    acc_statistics: per layer path, the row-weighted mean of the micro-batches'
      batch estimates, in the form of the sngd state's factor (empty when the
      wrapped optimizer holds no ``sngd_jax.sngd``).
    acc_rows: per layer path, the rows accumulated, counted in the dtype of its factor (a
      float: an int32 count wrapped past ``2**31`` rows in one cycle); for a stack of dense
      layers one count per layer of the stack (the stack's shape: ``_rows_shape``).
  """

  mini_step: jax.Array
  gradient_step: jax.Array
  inner_opt_state: Any
  acc_grads: Any
  skip_state: Any
  acc_statistics: dict[str, Any]
  acc_rows: dict[str, jax.Array]


def _sngd_state(inner_state: Any) -> tuple[Optional[SNGDState], bool]:
  """The one ``SNGDState`` inside an optimizer state (or None), and whether it is under a
  mask (``optax.masked``, ``optax.multi_transform``: it sees part of the params)."""
  found = sngd_states(inner_state)
  if len(found) > 1:
    raise ValueError(f"sngd: MultiSteps accumulates the statistics of one `sngd` transform; "
                     f"the wrapped optimizer holds {len(found)}. Wrap each group's optimizer "
                     "in its own `sngd_jax.MultiSteps` inside `optax.multi_transform` "
                     "(each accumulates its group's statistics and emits on the same calls)")
  if not found:
    return None, False
  masks = [m for m in jax.tree.leaves(inner_state, is_leaf=lambda s: isinstance(s, MaskedState))
           if isinstance(m, MaskedState)]
  return found[0], any(sngd_states(m.inner_state) for m in masks)


def _rows_dtype(factor: Any) -> Any:
  """The dtype a layer's accumulated rows are counted in: that of its factor (float32, or
  float64 under x64). An int32 count wrapped negative past ``2**31`` rows in one cycle (a
  stride-1 conv on large images over many micro-batches), which made the row weights
  ``n / total`` negative; a float count only rounds, and the weights need only its ratio."""
  return jax.tree.leaves(factor)[0].dtype


def _rows_shape(spec: Any) -> tuple[int, ...]:
  """The shape of a layer's accumulated row count: its stack's for a stack of dense layers
  (each layer counts its own rows: under ``with_row_mask(..., per_layer=True)``, the experts of
  a mixture of experts, they differ), a scalar otherwise (a normalization layer's stack is
  flattened into its channels, ``statistics._per_layer``)."""
  return tuple(spec.stack) if spec.stack and spec.structure == "dense" else ()


def _rows_shapes(sngd_state: SNGDState, tree: Any) -> dict[str, tuple[int, ...]]:
  """``_rows_shape`` of each layer of the state, found in ``tree`` (the params or the
  gradients: the whole tree also under a mask, whose ``sngd`` holds some of its layers)."""
  specs = transform._layers_of(sngd_state.config, tree)
  return {p: _rows_shape(specs[p]) if p in specs else () for p in sngd_state.factors}


def _as_rows(n: Any, shape: tuple[int, ...], dtype: Any, path: str) -> jax.Array:
  """A row count ``n`` of a layer in the accumulator's ``shape`` and ``dtype``. A scalar
  count of a stack (no mask per layer: the rows of every layer of the stack together, on the
  scale of ``statistics.num_rows``) becomes each layer's, ``n / prod(shape)``."""
  n = jnp.asarray(n, dtype)
  if n.shape == shape:
    return n
  if n.ndim == 0:
    return jnp.broadcast_to(n / math.prod(shape), shape)
  raise ValueError(
      f"sngd: MultiSteps: layer {path!r} has a row count per layer of shape {n.shape} (a row "
      f"mask per layer of a stack, `with_row_mask(..., per_layer=True)`), and its params a "
      f"stack of shape {shape}: pass `stacked=` to sngd as for its update without MultiSteps")


def _fold_gradient(acc_update, g: jax.Array, acc: jax.Array, mini_step: jax.Array) -> jax.Array:
  """``optax.MultiSteps``'s fold of a micro-batch's gradient ``g`` into the accumulator
  (``acc + (g - acc) / (n + 1)``, or ``g + acc``), with its operands cast explicitly.

  The dtype is the one JAX's default promotion gives ``g`` with ``acc`` (float64 gradients
  with the default float32 accumulator: float64; bfloat16 ones: float32), so the result is the
  one of the default rules bit for bit, also under jax_numpy_dtype_promotion="strict", which
  refuses to mix two float dtypes, or a float with the int32 count ``n`` (the count is exact
  in any float dtype for any ``k``).
  """
  with jax.numpy_dtype_promotion("standard"):
    dtype = jnp.promote_types(g.dtype, acc.dtype)
  return acc_update(g.astype(dtype), acc.astype(dtype), n_acc=mini_step.astype(dtype))


def _cond(sngd_state: Optional[SNGDState]):
  """The conditional of the emitting call and of the statistics: one that stays a
  conditional under a caller's ``jax.vmap`` (an ensemble; a plain ``lax.cond`` became a
  select there, which ran the inner update, refreshes included, and the statistics on every
  micro-batch), except with ``axis_name``, whose collectives it cannot re-vmap: the inner
  sngd's own ``transform._schedule_cond``."""
  if sngd_state is None:
    return control.schedule_cond
  return transform._schedule_cond(sngd_state.config)


# A pytree without leaves, as `optax.MultiSteps` (not a tuple) is one leaf: as a NamedTuple
# subclass it was flattened into its two functions and rebuilt by calling the class on them
# (`MultiSteps(init_fn, update_fn)`), which failed wherever JAX rebuilds a tree holding it:
# an argument of `eqx.filter_jit`, a field of an `eqx.Module`, `jax.tree.map`.
@jax.tree_util.register_static
class MultiSteps(optax.MultiSteps, optax.GradientTransformationExtraArgs):
  """``optax.MultiSteps`` that accumulates the local Fisher statistics too.

  Same signature and semantics as ``optax.MultiSteps``: every call
  accumulates the gradients and returns zero updates, except every
  ``every_k_schedule(gradient_step)``-th, which returns the wrapped
  optimizer's update for the accumulated gradients. When the wrapped
  optimizer holds a ``sngd_jax.sngd``, each call's ``activations=`` are
  reduced to per-layer batch estimates, averaged over the micro-batches
  weighted by rows, and passed to it as ``statistics=``: ``k`` micro-batches of
  ``n`` examples give the update of one batch of ``k n`` (with the mean
  gradient; ``use_grad_mean=True``). The estimates are computed only for the
  steps that read them (one in ``factor_every`` of the inner optimizer's;
  every call if ``factor_every`` is injected), and the wrapped optimizer runs
  only on the emitting call (under ``lax.cond``). With ``stats_batch_size``
  set, each micro-batch's estimate is from its own first ``stats_batch_size``
  examples. An ``sngd`` under ``optax.masked`` or ``optax.multi_transform``
  gets the statistics of the layers it sees, as it sees them.

  Examples:
    ```python
    tx = sngd_jax.MultiSteps(sngd_jax.sngd_momentum(0.03), every_k_schedule=4)
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    ```

  It is also an ``optax.GradientTransformationExtraArgs`` (the pair ``(init, update)``),
  so optax's wrappers (``optax.chain``, ``optax.apply_if_finite``,
  ``optax.multi_transform``, ...) pass ``activations=`` on to it, as they do not for
  ``optax.MultiSteps``; ``gradient_transformation()`` is not needed.
  """

  # What help() and IDEs show: optax.MultiSteps.__init__'s arguments, which it takes.
  __signature__ = inspect.signature(optax.MultiSteps)

  def __new__(cls, *args: Any, **kwargs: Any) -> MultiSteps:
    # The tuple's two entries call this object's methods. (optax's wrappers only pass
    # extra arguments to a GradientTransformationExtraArgs; without them a wrapped
    # MultiSteps saw no `activations=`.)
    del args, kwargs
    self = tuple.__new__(cls, (lambda params: self.init(params),
                               lambda *a, **k: self.update(*a, **k)))
    return self  # optax.MultiSteps.__init__ sets the rest

  def init(self, params: Any) -> MultiStepsState:
    """The ``optax.MultiSteps`` state plus zero statistics accumulators."""
    base = super().init(params)
    sngd_state, _ = _sngd_state(base.inner_opt_state)
    acc_stats = {} if sngd_state is None else jax.tree.map(jnp.zeros_like, sngd_state.factors)
    acc_rows = {}
    if sngd_state is not None:
      shapes = _rows_shapes(sngd_state, params)
      acc_rows = {p: jnp.zeros(shapes[p], _rows_dtype(f)) for p, f in sngd_state.factors.items()}
    return MultiStepsState(*typing.cast(Any, base), acc_statistics=acc_stats,
                           acc_rows=acc_rows)

  def _accumulate(self, updates: Any, state: MultiStepsState,
                  sngd_state: SNGDState, activations: Any, masked: bool):
    """Folds this micro-batch's batch estimates into the row-weighted means."""
    def fold(_):
      estimates, rows = transform.local_statistics(updates, sngd_state, activations, masked)
      # Under `axis_name` (shard_map/pmap) each device's estimate is of its own shard: the mean
      # over the axis now keeps the accumulators replicated, like the rest of the state (the
      # mean of the means is the row-weighted mean of the global batch: equal shards). Kept
      # per device, they were a state that differs between devices: refused by `shard_map`'s
      # check_vma, and, with check_vma=False, lost on a checkpoint of one replica.
      axis_name = sngd_state.config.axis_name
      rows = dict(rows)
      for path in list(estimates):
        n = rows[path]
        if isinstance(n, int):  # no row mask: equal shards, plain mean
          estimates[path] = distributed.axis_mean(estimates[path], axis_name)
        else:  # row masks: each device's estimate weighs by its real rows (per layer of a
          # stack with a mask per layer: each expert's by its own)
          estimates[path], rows[path] = transform.weighted_axis_mean(estimates[path], n,
                                                                     axis_name)
      if set(rows) != set(state.acc_statistics):
        raise ValueError(
            "sngd: MultiSteps accumulates the statistics of every layer in every micro-batch; "
            f"layers {sorted(set(state.acc_statistics) - set(rows))} have no captured "
            "call in this one (`uncalled=\"skip\"` is not supported under MultiSteps)")
      new_stats, new_rows = {}, {}
      for path in state.acc_statistics:
        if path not in estimates:  # called on 0 rows (no estimate): adds nothing
          new_stats[path], new_rows[path] = state.acc_statistics[path], state.acc_rows[path]
          continue
        estimate = estimates[path]
        acc_rows = state.acc_rows[path]
        n = _as_rows(rows[path], acc_rows.shape, acc_rows.dtype, path)
        total = acc_rows + n
        new_rows[path] = total
        # n / total, the weight in the sum's dtype (one per layer of a stack); 0 while every
        # row so far was masked (an expert routed no token yet adds its estimate, 0, times 0)
        weight = n / jnp.where(total > 0, total, 1)
        new_stats[path] = jax.tree.map(
            lambda acc, e, weight=weight: acc + (e.astype(acc.dtype) - acc)
            * transform._per_layer(weight, acc).astype(acc.dtype),
            state.acc_statistics[path], estimate)
      return new_stats, new_rows

    factor_every = sngd_state.config.factor_every
    if factor_every is None:  # injected: not known at trace time
      return fold(None)
    return _cond(sngd_state)(sngd_state.count % factor_every == 0, fold,
                             lambda _: (state.acc_statistics, state.acc_rows), None)

  def update(self, updates: Any, state: MultiStepsState, params: Optional[Any] = None,
             **extra_args: Any) -> tuple[Any, MultiStepsState]:
    """Accumulates gradients and statistics; the inner update every ``k`` calls."""
    if not isinstance(state, MultiStepsState):
      raise TypeError(
          f"sngd: the state given to `sngd_jax.MultiSteps.update` is a {type(state).__name__}, "
          "not the `MultiStepsState` that its `init` makes. A checkpoint restored without a "
          "target comes back as plain dicts and lists: restore it into `tx.init(params)` "
          "(e.g. orbax `restore(path, target)`, `flax.serialization.from_bytes(template, "
          "data)` with a template made by `init`, such as `TrainState.create(..., tx=tx)`)")
    activations = extra_args.pop("activations", None)
    sngd_state, masked = _sngd_state(state.inner_opt_state)
    if sngd_state is not None:  # a state saved with int32 counts (before 2026-12-05), or with
      # one count per stack (before per-layer counts), resumes
      shapes = _rows_shapes(sngd_state, updates)
      state = state._replace(acc_rows={
          p: _as_rows(r, shapes.get(p, ()), _rows_dtype(sngd_state.factors[p]), p)
          for p, r in state.acc_rows.items()})
    if sngd_state is None and activations is not None:
      extra_args["activations"] = activations
    k_steps = self._every_k_schedule(state.gradient_step)
    should_skip, skip_state = self._should_skip_update_fn(updates, state.gradient_step, params)
    should_skip = typing.cast(jax.Array, should_skip)
    if (should_skip.dtype, should_skip.shape) != (jnp.bool_, ()):
      raise ValueError(
          "The `should_skip_update_fn` function should return a boolean scalar array, but it "
          f"returned an array of dtype {should_skip.dtype} and shape {should_skip.shape}")

    def inner_update(acc_grads, acc_stats, inner_state, acc_rows):
      kwargs = dict(extra_args)
      if sngd_state is not None:
        # A layer with no rows in the whole cycle has no estimate: its factor is kept.
        kwargs["statistics"], kwargs["statistics_rows"] = acc_stats, acc_rows
      out, new_inner = self._opt.update(optax.tree.cast_like(acc_grads, updates), inner_state,
                                        params=params, **kwargs)
      return out, jax.tree.map(lambda n, o: n.astype(o.dtype), new_inner, inner_state)

    def hold(acc_grads, acc_stats, inner_state, acc_rows):
      out = jax.eval_shape(inner_update, acc_grads, acc_stats, inner_state, acc_rows)[0]
      return optax.tree.zeros_like(out), inner_state

    def do_update(_):
      acc_grads = jax.tree.map(
          lambda g, acc: _fold_gradient(self._acc_update, g, acc, state.mini_step),
          updates, state.acc_grads)
      acc_stats, acc_rows = state.acc_statistics, state.acc_rows
      if sngd_state is not None:
        acc_stats, acc_rows = self._accumulate(updates, state, sngd_state, activations, masked)
      emit = state.mini_step == (k_steps - 1)
      out, inner_state = _cond(sngd_state)(emit, lambda ops: inner_update(*ops),
                                           lambda ops: hold(*ops),
                                           (acc_grads, acc_stats, state.inner_opt_state,
                                            acc_rows))
      reset = lambda tree: jax.tree.map(lambda a: jnp.where(emit, jnp.zeros_like(a), a), tree)
      return out, MultiStepsState(
          mini_step=typing.cast(Any, numerics.safe_increment(state.mini_step)) % k_steps,
          gradient_step=jnp.where(emit, numerics.safe_increment(state.gradient_step),
                                  state.gradient_step),
          inner_opt_state=inner_state,
          # Zeroed by a select: `(1 - emit) * g` keeps a NaN (0 * NaN), which would poison
          # every later cycle's mean (optax.MultiSteps does that).
          acc_grads=reset(jax.tree.map(lambda g: g.astype(self._accumulator_dtype), acc_grads)),
          skip_state=skip_state,
          acc_statistics=reset(acc_stats),
          acc_rows=reset(acc_rows))

    def skip(_):
      out, _ = hold(optax.tree.cast_like(state.acc_grads, updates), state.acc_statistics,
                    state.inner_opt_state, state.acc_rows)
      return out, state._replace(skip_state=skip_state)

    return jax.lax.cond(should_skip, skip, do_update, None)

  def gradient_transformation(self) -> optax.GradientTransformationExtraArgs:
    """This wrapper as an ``optax.GradientTransformationExtraArgs``."""
    return optax.GradientTransformationExtraArgs(init=self.init,
                                                 update=typing.cast(Any, self.update))
