"""Local Fisher statistics: rows, batch estimates, priors, the moving average.

For a layer with augmented inputs ``x~ = [x; 1]`` (rows of a matrix ``X~``,
``n`` rows pooled over the batch, positions and calls) and pre-activations ``z``:

* linear:  ``G = (1/n) X~^T X~ = E[x~ x~^T]``, one ``d x d`` matrix;
* rfim:    ``G_j = (1/n) sum_i s(z_ij)^2 x~_i x~_i^T``, ``s = sigmoid``, one per
  output unit ``j`` (the relative Fisher information of a softplus/ReLU unit).

The running estimate is an exponential moving average with a prior ``P``:

```
G_t = decay * (G_{t-1} + (1 - w_{t-1}) * P(G^)) + (1 - decay) * G^,
```

read through the weight ``w`` as ``G_t / w_t``. The prior decides how the
average starts (see ``PRIORS``).

Rows by layer type (each captured call has a ``kind``, see ``ROWS``):

* ``dense``: every position of the input (batch, time, tokens, heads: all
  axes but the contracted ones) is a row; ``DenseGeneral``/``Einsum``
  contract several axes, flattened in the kernel's order.
* ``conv``: one row per (example, output position, feature group): the input
  patch, in the kernel's row order (``sngd_jax._src.conv``); ``conv_transpose``
  likewise over the stride-dilated input.
* ``norm`` (``structure="per_channel"``): per channel ``c`` the rows
  ``[xhat_c; 1]``; ``G_c = E[w x~_c x~_c^T]`` with ``w = 1`` (linear) or
  ``sigmoid(y_c)^2`` (rfim), a ``2 x 2`` block per channel.
* ``embed`` (``structure="diagonal"``): ``G_vv = (count of token v) / n``,
  the exact (diagonal) ``E[onehot onehot^T]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from sngd_jax._src import conv as conv_lib
from sngd_jax._src import distributed
from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.capture.records import Captured, stack_shape
from sngd_jax._src.distributed import replicated_out_sharding
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.layers import TRANSPOSED_USE, LayerSpec

PRIORS = ("scaled_identity", "identity", "none")
"""How the factor average starts.

* ``"scaled_identity"`` (default): starts from ``(tr(G^_1)/d) I``, an
  isotropic matrix with the first batch's scale: invariant to input scale. The
  early step of a layer with small inputs is ``lr / (tr(G^_1)/d)``, which blew
  up deep narrow MLPs unless the trust region (``sngd(max_norm=...)``, on by
  default) bounds it (``benchmarks/results/prior_stability.md``).
* ``"identity"`` (the reference code): starts from ``I``, so early steps are
  close to plain SGD and the preconditioner moves in as batches accumulate
  (weight ``1 - decay^t``).
* ``"none"``: a bias-corrected average of batch estimates only
  (``w_t = 1 - decay^t``); with ``decay=0`` the factor is the current batch's.
  Its first inverses are those of one rank-deficient batch: it diverged
  everywhere without the trust region.
"""

# kind -> function(Captured) -> (inputs (n, I), outputs (n, O)) as rows.
# (x rows, z rows); z is None when the outputs were not recorded.
RowFn = Callable[[Captured], tuple[jax.Array, Optional[jax.Array]]]


def to_rows(a: jax.Array, n_features: int) -> jax.Array:
  """``(*rows, *features)`` -> ``(prod(rows), prod(features))``, the last ``n_features`` axes
  the features.

  In two reshapes, each merging one group of axes: under a mesh with explicit axes JAX infers
  the sharding of such a reshape (the rows keep the batch's sharding), but refuses one that
  merges two groups at once (``ShardingTypeError: This reshape is not supported``).
  """
  if n_features != 1:
    a = a.reshape(a.shape[:a.ndim - n_features] + (math.prod(a.shape[a.ndim - n_features:]),))
  return a.reshape(-1, a.shape[-1])


def _rows_of(z: Optional[jax.Array], n_rows: int) -> Optional[jax.Array]:
  """``z`` as ``(n_rows, -1)``: its trailing axes that make up one row are the features."""
  if z is None or n_rows == 0:
    return None if z is None else z.reshape(n_rows, -1)
  size = math.prod(z.shape) // n_rows
  for k in range(1, z.ndim + 1):
    if math.prod(z.shape[z.ndim - k:]) == size:
      return to_rows(z, k)
  return z.reshape(n_rows, -1)


def dense_rows(call: Captured) -> tuple[jax.Array, Optional[jax.Array]]:
  """Rows of a dense call: every non-contracted position is a sample.

  ``call.config`` is ``()`` (contract the last axis, ``nn.Dense``) or
  ``(axes, out_perm)``: the input axes the kernel contracts, in the kernel's
  order, and the output transpose that puts the row axes first in input order
  and the kernel's output axes last in kernel order (None when already so).
  """
  x = call.inputs
  if call.config:
    axes, out_perm = call.config
    x = jnp.moveaxis(x, axes, tuple(range(x.ndim - len(axes), x.ndim)))
    x = to_rows(x, len(axes))
    z = call.outputs
    if z is not None and out_perm is not None:
      z = jnp.transpose(z, out_perm)
  else:
    x = x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)
    z = call.outputs
  return x, _rows_of(z, x.shape[0])


def conv_rows(call: Captured) -> tuple[jax.Array, Optional[jax.Array]]:
  """Rows of a conv call: input patches (kernel row order) and their outputs."""
  z = call.outputs
  return (conv_lib.patches(call.inputs, call.config),
          None if z is None else conv_lib.conv_output_rows(z, call.config))


def norm_rows(call: Captured) -> tuple[jax.Array, Optional[jax.Array]]:
  """Rows of a normalization call: ``xhat`` and ``y``, channels last, ``(n, C)``.

  ``call.config`` is ``(feature_axes,)``; ``call.inputs`` is the normalized
  ``xhat`` (before scale and bias), ``call.outputs`` is ``y``.
  """
  (feature_axes,) = call.config
  def rows(a: jax.Array) -> jax.Array:
    a = jnp.moveaxis(a, feature_axes, tuple(range(a.ndim - len(feature_axes), a.ndim)))
    return to_rows(a, len(feature_axes))
  return rows(call.inputs), None if call.outputs is None else rows(call.outputs)


def conv_transpose_rows(call: Captured) -> tuple[jax.Array, Optional[jax.Array]]:
  """Rows of a transposed conv call: patches of the stride-dilated input."""
  z = call.outputs
  return (conv_lib.transpose_patches(call.inputs, call.config),
          None if z is None else z.reshape(-1, z.shape[-1]))


ROWS: dict[str, RowFn] = {"dense": dense_rows, "conv": conv_rows,
                          "conv_transpose": conv_transpose_rows, "norm": norm_rows}
# Which row kinds each layer structure accepts.
STRUCTURE_KINDS = {"dense": ("dense", "conv", "conv_transpose"), "per_channel": ("norm",),
                    "diagonal": ("embed",)}


def input_axes_hint(spec, call) -> str:
  """The fix for a dense call whose inputs are not the kernel's inputs as the params tell
  them (a bias-free kernel with several output axes), else ``""``."""
  if call.kind != "dense":
    return ""
  n = len(call.config[0]) if call.config else 1
  return (f"; if the kernel's first {n} axes are its inputs (a bias-free projection to "
          f"several output axes), pass fisher={{{spec.path!r}: ({spec.fisher!r}, {n})}}")


def other_layer_hint(spec, widths: Sequence[int]) -> str:
  """The cause and fix when a layer's calls read different numbers of input features, one
  of them the layer's own (calls of two layers captured at one path), else ``""``."""
  if spec.in_dim not in widths or len(set(widths)) < 2:
    return ""
  return (f"; its {len(widths)} calls read {sorted(set(widths))} input features: calls of "
          f"another layer were captured at the path {spec.path!r} (a module applied with "
          "other params inside the captured function, e.g. a frozen pretrained backbone "
          "run by its own `apply`, whose layers are named from its own root as the trained "
          "model's are). Pass that module's params to the captured function as another "
          "argument (`loss(params, other_params, x)`: capture leaves out the calls of a "
          "later argument's weights; this also serves a critic that an actor's loss runs "
          "through), or apply it outside the captured function and pass its outputs in, or "
          "make it a submodule of the trained model and freeze it with "
          "`optax.multi_transform` (`optax.set_to_zero()` for its label)")


def row_weights(call: Captured, n_rows: int) -> Optional[jax.Array]:
  """The weight of each of a call's ``n_rows`` rows, in the order of ``ROWS`` (or of
  ``norm_rows``, token ids for an embedding), from its ``row_mask``; None without one.

  The row mask (``sngd_jax.with_row_mask``) has the inputs' axes, full along the example
  (and token) axes and size 1 elsewhere; it is broadcast over the other row axes (heads,
  positions, feature groups) and dropped along the axes the layer contracts. For a call of
  one layer (``stack = 0``).
  """
  w = call.row_mask
  if w is None:
    return None
  x = call.inputs
  if call.kind in ("conv", "conv_transpose"):
    rank = len(call.config[0])
    lead = x.ndim - rank - 1
    examples = math.prod(x.shape[:lead])
    groups = call.config[5] if call.kind == "conv" else 1
    positions = n_rows // max(examples * groups, 1)
    w = jnp.broadcast_to(w, x.shape[:lead] + w.shape[lead:]).reshape(examples, -1)
    return jnp.broadcast_to(w[:, :, None], (examples, positions, groups)).reshape(-1)
  if call.kind == "embed" and call.config != ("attend",):
    return jnp.broadcast_to(w, x.shape).reshape(-1)
  if call.kind == "norm":
    (axes,) = call.config
  elif call.kind == "dense" and call.config:
    axes = call.config[0]
  else:  # nn.Dense, and the output-layer use of a tied table: the last axis
    axes = (x.ndim - 1,)
  axes = tuple(a % x.ndim for a in axes)
  w = jnp.broadcast_to(w, tuple(1 if i in axes else n for i, n in enumerate(x.shape)))
  return jnp.moveaxis(w, axes, tuple(range(x.ndim - len(axes), x.ndim))).reshape(-1)


def _weights_or_ones(call: Captured, n_rows: int, dtype) -> jax.Array:
  """``row_weights`` of a call, ones for a call without a row mask, in ``dtype``."""
  w = row_weights(call, n_rows)
  return jnp.ones((n_rows,), dtype) if w is None else w.astype(dtype)


def weighted_rows(spec: LayerSpec, calls: Sequence[Captured]) -> Optional[jax.Array]:
  """The rows a layer's batch estimate averages, counted with their row-mask weights
  (``sum_r m_r``, traced), on the scale of ``num_rows``; None when no call has a row mask.

  A layer whose count is 0 in a step has no estimate and keeps its factor.

  A stack of layers whose row mask has the stack axes in full (one mask per layer,
  ``with_row_mask(..., per_layer=True)``: the experts of a mixture of experts) has a count
  per layer, of the stack's shape; each layer whose count is 0 keeps its factor. Otherwise
  the count is one scalar, that of every layer of the stack together.
  """
  if all(c.row_mask is None for c in calls):
    return None
  total = None
  per_layer = any(per_layer_mask(c) for c in calls)
  for c in calls:
    k = c.stack
    one = dataclasses.replace(
        c, inputs=c.inputs[(0,) * k], outputs=None, stack=0,
        batch_axis=None if c.batch_axis is None else c.batch_axis - k,
        row_mask=None if c.row_mask is None else c.row_mask[(0,) * k])
    n = num_rows(spec, [one])
    if per_layer_mask(c):
      def member(m, one=one, n=n):
        w = row_weights(dataclasses.replace(one, row_mask=m), n)
        assert w is not None
        return jnp.sum(w)
      for _ in range(k):
        member = jax.vmap(member)
      count = member(c.row_mask)
    else:
      w = row_weights(one, n)
      count = (jnp.asarray(n, jnp.float32) if w is None else jnp.sum(w)) * (
          1 if per_layer else math.prod(stack_shape(c)))  # per layer: each layer's rows
    total = count if total is None else total + count
  return total


def per_layer_mask(call: Captured) -> bool:
  """Whether a call's row mask weighs each layer of its stack by a mask of its own (its
  stack axes in full, ``with_row_mask(..., per_layer=True)``), not one mask for all."""
  k = call.stack
  return (call.row_mask is not None and k > 0
          and any(n != 1 for n in call.row_mask.shape[:k]))


def layer_rows(spec: LayerSpec,
               calls: Sequence[Captured]) -> tuple[jax.Array, Optional[jax.Array]]:
  """Pools the rows of all calls of a layer into ``(X~, Z)`` (see ``weighted_layer_rows``)."""
  x, z, _ = weighted_layer_rows(spec, calls)
  return x, z


def weighted_layer_rows(spec: LayerSpec, calls: Sequence[Captured]
                        ) -> tuple[jax.Array, Optional[jax.Array], Optional[jax.Array]]:
  """Pools the rows of all calls of a layer into ``(X~, Z, m)``.

  Args:
    spec: the layer.
    calls: its captured calls.

  Returns:
    ``X~`` of shape ``(n, d)`` (a ones column appended when the layer has a
    bias), ``Z`` of shape ``(n, O)`` (None when some call kept no outputs),
    in the statistics dtype, and the rows' weights ``m`` of shape ``(n,)`` from the
    calls' row masks (ones for a call without one; None when no call has one).

  Raises:
    ValueError: naming the layer path, if a call's feature sizes do not match.
  """
  xs, zs = [], []
  for call in calls:
    _check_kind(spec, call)
    x, z = ROWS[call.kind](call)
    xs.append(x)
    zs.append(z)
  for call, x, z in zip(calls, xs, zs, strict=True):
    if x.shape[-1] != spec.in_dim or (z is not None and z.shape[-1] != spec.out_dim):
      raise ValueError(
          f"sngd: layer {spec.path!r}: captured activations have {x.shape[-1]} input and "
          f"{'?' if z is None else z.shape[-1]} output features per row (inputs "
          f"{call.inputs.shape}, outputs {getattr(call.outputs, 'shape', None)}), but its "
          f"kernel expects {spec.in_dim} inputs and {spec.out_dim} outputs"
          + (other_layer_hint(spec, [a.shape[-1] for a in xs]) or input_axes_hint(spec, call)))
  dtype = compute_dtype(*(x.dtype for x in xs))
  x = jnp.concatenate(xs).astype(dtype)
  z = None if any(z is None for z in zs) else jnp.concatenate(zs).astype(dtype)
  m = None
  if any(c.row_mask is not None for c in calls):
    m = jnp.concatenate([_weights_or_ones(c, a.shape[0], dtype)
                         for c, a in zip(calls, xs, strict=True)])
  if spec.bias is not None:
    x = distributed.unshard_axis(x, 1)  # features sharded over a model axis (explicit mesh)
    x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)  # keeps x's row sharding
  return x, z, m


def _check_kind(spec: LayerSpec, call: Captured) -> None:
  if call.kind not in STRUCTURE_KINDS[spec.structure]:
    raise ValueError(
        f"sngd: layer {spec.path!r} ({spec.structure} local Fisher from its params) got "
        f"activations of kind {call.kind!r}; expected {STRUCTURE_KINDS[spec.structure]}")


def _is_attend(call: Captured) -> bool:
  return call.config == ("attend",)


def is_lookup(call: Captured) -> bool:
  """Whether a call is an embedding table's lookup (token ids; not its ``attend`` use)."""
  return call.kind == "embed" and not _is_attend(call)


def untied_output_use(spec: LayerSpec, calls: Sequence[Captured]) -> bool:
  """An embedding table without ``fisher="tied"`` that is also the output layer (the
  table's spec is a ``Linear``'s when ``eqx.nn.Shared`` put the ``Linear``'s weight in the
  ``Embedding``)."""
  return (spec.structure in ("diagonal", "dense") and not spec.tied
          and any(_is_attend(c) for c in calls))


def tied_message(path: str) -> str:
  """The error for an embedding table also used as the output layer without ``'tied'``."""
  return (f"sngd: embedding {path!r} is also used as the output layer (`attend`, or a Linear "
          "and an Embedding reading one weight through `eqx.nn.Shared`: tied "
          "weights), so its local Fisher is not the lookup's diagonal one (nor a dense "
          "layer's). Pass "
          f"`fisher={{{path!r}: 'tied'}}` to precondition the table as both layers "
          "(the update is (D + rho I)^{-1} g_E (G_h + rho I)^{-1}, D the lookup's diagonal "
          "local Fisher, G_h the output layer's), or "
          f"`fisher={{{path!r}: None}}` to leave it to the next transform.")




def transposed_use_message(path: str) -> str:
  """The error for a table also read transposed by another layer (``TRANSPOSED_USE``)."""
  return (f"sngd: embedding {path!r} is also read transposed by a Linear (`eqx.nn.Shared` "
          "with a `get` that transposes the table, `E^T`): that layer's inputs index the "
          "table's rows, as the lookup's token ids do, so the table's local Fisher is not "
          "the lookup's diagonal `diag(f)`, nor the Kronecker pair of "
          "`fisher='tied'` (which is for a readout `logits = W h` with `W = E`, the table "
          "untransposed). An Equinox `Linear` stores its weight `(out, in)` as the table is "
          "stored `(vocabulary, features)`, so an output layer `Linear(features, "
          "vocabulary)` ties to the table without a transpose (`get=lambda p: "
          f"p[0].weight`) and takes `fisher={{{path!r}: 'tied'}}`. A `Linear(V, D)` that "
          "reads the table transposed is preconditioned exactly when it holds the param "
          "instead (`where=lambda p: p[0].weight, get=lambda p: jnp.transpose(p[1].weight)`: "
          "the lookups are then that Linear's calls on one-hot rows, pooled into its dense "
          f"local Fisher). Otherwise pass `fisher={{{path!r}: None}}` to leave the table to "
          "the next transform, or untie the two layers (no `eqx.nn.Shared`).")


def layer_calls(spec: LayerSpec, calls: Sequence[Captured]) -> tuple[Captured, ...]:
  """The calls a layer's local Fisher is estimated from.

  A tied embedding table (``fisher="tied"``: ``E`` is also the output layer
  ``logits = h E^T``, ``attend``) has two specs: the lookup's reads the
  table's lookups, the output layer's reads its ``attend`` calls as dense
  calls (inputs: the queries ``h``). Every other layer reads all of its calls.

  Raises:
    ValueError: for a tied table without lookups or without ``attend`` calls; for a table
      also read transposed (``TRANSPOSED_USE``), tied or not; for a table also used as
      the output layer without ``fisher="tied"``.
  """
  if any(c.kind == "embed" and c.config == TRANSPOSED_USE for c in calls):
    raise ValueError(transposed_use_message(spec.source or spec.path))
  if untied_output_use(spec, calls):
    raise ValueError(tied_message(spec.path))
  if not spec.tied:
    return tuple(calls)
  if spec.tied_head:
    out = tuple(dataclasses.replace(c, kind="dense", config=()) for c in calls if _is_attend(c))
    use = "used its table as the output layer (`attend`)"
  else:
    out = tuple(c for c in calls if not _is_attend(c))
    use = "looked up a row of its table"
  if not out:
    path = spec.source or spec.path
    raise ValueError(
        f"sngd: layer {path!r} has fisher='tied', but the captured function never {use}; "
        "'tied' is for a table used both ways (drop it for a table used one way)")
  return out


def embed_counts(spec: LayerSpec, calls: Sequence[Captured], dtype) -> jax.Array:
  """Token frequencies ``count(v) / n`` over all calls of an embedding, ``(V,)``.

  With row masks, ``sum_r m_r [id_r = v] / sum_r m_r``: masked lookups are not counted
  (zero when every lookup is masked).
  """
  ids = jnp.concatenate([c.inputs.reshape(-1) for c in calls])
  if all(c.row_mask is None for c in calls):
    counts = jnp.zeros((spec.in_dim,), dtype).at[ids].add(1.0, mode="drop")
    return counts / ids.shape[0]
  m = jnp.concatenate([_weights_or_ones(c, c.inputs.size, dtype) for c in calls])
  counts = jnp.zeros((spec.in_dim,), dtype).at[ids].add(m, mode="drop")
  return counts / _positive(jnp.sum(m))


def _positive(n: jax.Array) -> jax.Array:
  """A traced row count as a divisor: 1 where it is 0 (every row masked: the sum it
  divides is 0 too, and the layer keeps its factor)."""
  return jnp.where(n > 0, n, jnp.ones_like(n))


def _needs_outputs(spec: LayerSpec, calls: Sequence[Captured]) -> None:
  if spec.fisher == "rfim" and any(c.outputs is None for c in calls):
    raise ValueError(
        f"sngd: layer {spec.path!r} has fisher='rfim', which weighs rows by the layer's "
        "outputs, but they were not captured: capture with `outputs=True` "
        "(`sngd_jax.capture(loss_fn, outputs=True)`; `capture_nnx`, `capture_eqx`, `capture_hk` "
        "the same; "
        "the default keeps only the inputs)")


def check_stack(spec: LayerSpec, calls: Sequence[Captured]) -> None:
  """Requires the calls' stack shape to be the one the params give the layer.

  Raises:
    ValueError: naming the layer path and both shapes, and what to pass.
  """
  shapes = {stack_shape(c) for c in calls}
  if len(shapes) != 1:
    raise ValueError(
        f"sngd: layer {spec.path!r} was called both inside and outside a transform over its "
        f"params (stack shapes {sorted(shapes)}); its calls cannot share one local Fisher")
  (shape,) = shapes
  if spec.structure == "per_channel":
    ok = spec.out_dim % max(math.prod(shape), 1) == 0
  else:
    ok = shape == spec.stack
  if not ok:
    n = len(shape)
    why = ("The kernel has no bias to show its stack axes" if spec.bias is None else
           "Its bias also fits the kernel's trailing axes unstacked (a stack as long as an "
           "input or output axis), so the params do not tell")
    hint = f" {why}: pass `stacked={{{spec.path!r}: {n}}}` to sngd." if n else ""
    raise ValueError(
        f"sngd: layer {spec.path!r}: its calls are those of a stack of layers of shape "
        f"{shape} (called under a scan or vmap over its params), but its params give a "
        f"stack of shape {spec.stack}.{hint}")


def _per_layer(fn: Callable, spec: LayerSpec, calls: Sequence[Captured]):
  """``fn(one-layer spec, calls)`` for each layer of a stack, stacked over the stack axes.

  A norm layer's channels already count every layer of the stack (its params
  are one ``scale`` per layer and channel), so its result is flattened to
  ``(layers * channels, d, d)``, the order of its ``scale`` leaf.
  """
  check_stack(spec, calls)
  k = calls[0].stack
  shape = stack_shape(calls[0])
  if spec.structure == "per_channel":
    inner = dataclasses.replace(spec, out_dim=spec.out_dim // math.prod(shape))
  else:
    inner = spec.one_layer()

  def one(arrays):
    return fn(inner, [dataclasses.replace(
        c, inputs=x, outputs=z, stack=0, row_mask=m,
        batch_axis=None if c.batch_axis is None else c.batch_axis - k)
        for c, (x, z, m) in zip(calls, arrays, strict=True)])

  for _ in range(k):
    one = jax.vmap(one)
  # A row mask is the same for every layer of the stack (size 1 along its axes), or, with
  # `with_row_mask(..., per_layer=True)`, one per layer (the stack axes in full).
  out = one([(c.inputs, c.outputs,
              None if c.row_mask is None
              else jnp.broadcast_to(c.row_mask, shape + c.row_mask.shape[k:]))
             for c in calls])
  if spec.structure == "per_channel":
    out = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[k + 1:]), out)
  return out


# `batch_factor`'s product of narrow rows (at most this many columns, over more than this
# many rows) is a reduction, not a matmul: see `gram`.
_NARROW_GRAM = 3
_LONG_ROWS = 2**16


def batch_factor(spec: LayerSpec, calls: Sequence[Captured],
                 after: Optional[jax.Array] = None) -> jax.Array:
  """The batch estimate ``G^`` of a layer.

  ``after``: a scalar that a conv layer's patch rows are formed after (see
  ``_sum_over_rows``); it does not change the result.

  Returns:
    ``(d, d)``; ``(O, d, d)`` for rfim and for norm channels; ``(V,)`` for an
    embedding; each after the layer's stack shape.
  """
  if any(c.kind == "embed" and c.config == TRANSPOSED_USE for c in calls):
    raise ValueError(transposed_use_message(spec.source or spec.path))
  if untied_output_use(spec, calls):
    raise ValueError(tied_message(spec.path))
  for call in calls:
    _check_kind(spec, call)
  _needs_outputs(spec, calls)
  if spec.stack or any(c.stack for c in calls):
    return _per_layer(batch_factor, spec, calls)
  if spec.structure == "diagonal":
    return embed_counts(spec, calls, jax.dtypes.canonicalize_dtype(jnp.float64))
  if spec.structure == "per_channel":
    xs, zs = zip(*(norm_rows(c) for c in calls), strict=True)
    dtype = compute_dtype(*(x.dtype for x in xs))
    x = jnp.concatenate(xs).astype(dtype)
    if x.shape[-1] != spec.out_dim:
      raise ValueError(
          f"sngd: layer {spec.path!r}: captured {x.shape[-1]} channels, params have "
          f"{spec.out_dim}")
    # Per channel c, the moments of rows [x_c, 1] (d = 2) or [x_c] (no bias), as
    # reductions over n: stacking the rows first made XLA:CPU transpose (n, C, 2) copies.
    n = x.shape[0]
    m = None
    if any(c.row_mask is not None for c in calls):  # the rows' weights (row mask)
      m = jnp.concatenate([_weights_or_ones(c, a.shape[0], dtype)
                           for c, a in zip(calls, xs, strict=True)])
      n = _positive(jnp.sum(m))
    if spec.fisher == "rfim":
      w = jax.nn.sigmoid(jnp.concatenate(zs).astype(dtype)) ** 2
      if m is not None:
        w = w * m[:, None]
      wx = w * x
      s_xx, s_x, s_1 = (wx * x).sum(0), wx.sum(0), w.sum(0)
    elif m is not None:
      mx = m[:, None] * x
      s_xx, s_x, s_1 = (mx * x).sum(0), mx.sum(0), jnp.broadcast_to(m.sum(), x.shape[1:])
    else:
      s_xx, s_x, s_1 = (x * x).sum(0), x.sum(0), jnp.full(x.shape[1:], n, dtype)
    if spec.bias is None:
      return s_xx[:, None, None] / n
    return jnp.stack([jnp.stack([s_xx, s_x], -1), jnp.stack([s_x, s_1], -1)], -2) / n

  def gram(x, z, m):
    out_sharding = replicated_out_sharding(x)  # rows may be sharded over devices
    if spec.fisher == "rfim":
      assert z is not None  # _check_kind requires the outputs for rfim
      w = jax.nn.sigmoid(z) ** 2
      if m is not None:
        w = w * m[:, None]
      return jnp.einsum("nj,na,nb->jab", w, x, x, out_sharding=out_sharding,
                        precision=dtypes_lib.HIGHEST)
    mx = x if m is None else m[:, None] * x  # sum_r m_r x~_r x~_r^T
    if x.shape[1] <= _NARROW_GRAM and x.shape[0] > _LONG_ROWS and out_sharding is None:
      # XLA:CPU emits the product of a very narrow X~ (1-2 inputs and the bias) as one
      # sequential sum over the rows, which loses float32 precision past ~1e6 rows (3e-4
      # relative at 4M random rows, 6% with constant inputs); its reductions sum in a tree.
      return (mx[:, :, None] * x[:, None, :]).sum(0)
    if split_bias and out_sharding is None:
      return _gram_with_ones_column(x, m)
    # HIGHEST whatever jax_default_matmul_precision says (as the sketch's and the inverses'
    # products): a factor summed in bfloat16 or TF32 is not the Fisher the damping is set for
    return jnp.matmul(mx.T, x, out_sharding=out_sharding, precision=dtypes_lib.HIGHEST)

  # Patch rows: the product of the patches alone, its bias row and column summed (see
  # `_gram_with_ones_column`).
  split_bias = spec.bias is not None and _has_patch_rows(calls)

  total, n = _sum_over_rows(spec, calls, gram, after)
  if spec.fisher == "rfim":
    # A grouped conv's rows are (example, position, group): channel j's block averages
    # the rows of its own group only (the others weigh 0), 1/groups of them.
    n = n // _feature_groups(calls) if isinstance(n, int) else n / _feature_groups(calls)
  return total / (n if isinstance(n, int) else _positive(n))


def _gram_with_ones_column(x: jax.Array, m: Optional[jax.Array]) -> jax.Array:
  """``sum_r m_r x_r x_r^T`` for rows ``x = [p, 1]`` (weights ``m``, or ones), from the
  patches ``p`` alone:
  ``[[(m p)^T p, sum_r m_r p_r], [sum_r m_r p_r^T, sum_r m_r]]``.

  XLA simplifies ``x[:, :-1]`` to the patches before the ones column is appended, so the
  rows with the ones column are never formed: one pass over the rows less
  (``benchmarks/conv_stats_ab.py`` measures it, with ``conv._windows``, against ``mx^T x``
  over the rows ``[p, 1]``: ``benchmarks/results/conv_stats_ab_cnn.json`` and
  ``benchmarks/results/conv_stats_ab_resnet-bn.json``). Equal to ``mx^T x`` up to the order
  of the additions.
  """
  p = x[:, :-1]
  mp = p if m is None else m[:, None] * p
  s = mp.sum(0)
  n = jnp.asarray(x.shape[0], x.dtype) if m is None else m.sum()
  d = p.shape[1]
  # Assembled by padding with zeros and adding (exact), which XLA:CPU fuses into one
  # kernel; the concatenations along the rows' (minor) axis it would run as copies.
  gram = jnp.matmul(mp.T, p, precision=dtypes_lib.HIGHEST)
  return (jnp.pad(gram, ((0, 1), (0, 1))) + jnp.pad(s[:, None], ((0, 1), (d, 0)))
          + jnp.pad(jnp.append(s, n)[None], ((d, 0), (0, 0))))


def _feature_groups(calls: Sequence[Captured]) -> int:
  """The feature groups of a layer's conv calls (1 for other kinds; equal for every call)."""
  groups = {c.config[5] if c.kind == "conv" else 1 for c in calls}
  if len(groups) != 1:
    raise ValueError(f"sngd: one layer's calls have different feature groups {sorted(groups)}")
  return groups.pop()


# A conv layer's rows are its input patches: prod(kernel) entries per input
# entry. Formed for a whole batch they were the largest buffers of a step (the
# ResNet benchmark's four 3x3x16 layers: 14 MB each, all live at once in the
# statistics branch: 87 MB of temporary memory against 28 MB for SGD's step).
# XLA sizes a step's temporary memory for every branch, taken or not, and
# XLA:CPU allocates it on every run; glibc maps anything above 32 MiB afresh,
# so each run faults on every page it touches (docs/performance.md). So the
# rows of conv layers are formed and reduced in chunks of examples of at most
# this size, one chunk after the other: 43 MB of temporary memory on that
# ResNet, its statistics step 9% faster (benchmarks/README.md, "The step's
# temporary memory"). 4 MiB chunks needed no less memory there and twice the
# kernels (compile time). A layer's chunks run in one loop (`_loop_plan`), so that
# their kernels are compiled once. Not for a batch sharded over devices
# (`_holds_whole_batch`).
ROW_CHUNK_BYTES = 8 * 2**20


def _has_patch_rows(calls: Sequence[Captured]) -> bool:
  """Whether some call's rows are patches (conv, transposed conv), larger than its inputs."""
  return any(c.kind in ("conv", "conv_transpose") for c in calls)


def _holds_whole_batch() -> bool:
  """Whether the traced code computes on the whole batch it sees, on one device.

  True with one device in the job, or inside a ``shard_map`` whose every mesh
  axis is manual (the code sees its device's shard). With more devices and
  automatic or explicit axes, the batch is typically sharded over them: a chunk
  of its examples would then live on a subset of the devices (idle devices, or
  a reshard per chunk), so the rows are formed whole and XLA partitions them.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and all(t == AxisType.Manual for t in mesh.axis_types):
    return True
  return jax.device_count() == 1


def _num_chunks(spec: LayerSpec, calls: Sequence[Captured]) -> int:
  """How many chunks of examples the rows are formed in (1: whole; see ``example_chunks``)."""
  if not _has_patch_rows(calls) or not _holds_whole_batch():
    return 1
  if any(c.batch_axis is None or replicated_out_sharding(c.inputs) is not None
         for c in calls):
    return 1
  nbytes = 0
  for c in calls:
    rows = jax.eval_shape(lambda c: ROWS[c.kind](c)[0], c)
    nbytes += math.prod(rows.shape) * max(jnp.dtype(rows.dtype).itemsize, 4)
  return min(-(-nbytes // ROW_CHUNK_BYTES), max(c.num_examples or 1 for c in calls))


def example_chunks(spec: LayerSpec, calls: Sequence[Captured]
                   ) -> Optional[list[list[Captured]]]:
  """The calls split into chunks of examples whose rows fit ``ROW_CHUNK_BYTES``.

  Only for layers with conv or transposed-conv calls (whose rows are patches,
  larger than the captured inputs) whose every call has an example axis, and
  only for code that holds its whole batch (``_holds_whole_batch``). Returns
  None when the rows are formed whole. (A layer of one call is summed in a
  loop over equal chunks instead: ``_loop_plan``.)
  """
  k = _num_chunks(spec, calls)
  if k <= 1:
    return None
  parts = []
  for i in range(k):
    part = []
    for c in calls:
      m = c.num_examples
      assert m is not None  # checked by _num_chunks
      lo, hi = i * m // k, (i + 1) * m // k
      if hi > lo:
        part.append(c.examples(lo, hi))
    if part:
      parts.append(part)
  return parts


def _loop_plan(spec: LayerSpec, calls: Sequence[Captured]
               ) -> Optional[tuple[int, int, int]]:
  """``(chunks, examples per chunk, examples left over)`` for a loop, or None.

  For a layer of one call whose rows are chunked: ``k`` equal chunks of
  ``m // k`` examples in one loop, so that XLA generates code for the body once
  (unrolled, each chunk's patch kernels were compiled anew: the ResNet
  benchmark's step had 709 kernels unrolled, 689 with the loop), and the
  ``m % k < k`` examples left over after it as one more part.
  """
  k = _num_chunks(spec, calls)
  if k <= 1 or len(calls) != 1:
    return None
  m = calls[0].num_examples
  assert m is not None  # checked by _num_chunks
  return k, m // k, m % k


def _after(calls: Sequence[Captured], dep: Optional[jax.Array]) -> list[Captured]:
  """The calls with inputs that depend on the scalar ``dep`` (``x + 0 * dep``).

  Orders work for XLA:CPU, which drops ``lax.optimization_barrier`` before it
  schedules: the rows of these calls can then only be formed after ``dep``.
  Exact for finite ``dep``; a non-finite one makes the rows non-finite, and
  ``dep`` is always part of the same step's estimates, which are then all
  rejected (``in_range``) anyway.
  """
  if dep is None:
    return list(calls)
  def tie(c: Captured) -> Captured:
    if not jnp.issubdtype(c.inputs.dtype, jnp.inexact):
      return c
    return dataclasses.replace(c, inputs=c.inputs + (dep * 0).astype(c.inputs.dtype))
  return [tie(c) for c in calls]


def dependency(estimate: Any) -> jax.Array:
  """A scalar of ``estimate`` to order later work after it (see ``_after``)."""
  return jnp.ravel(jax.tree.leaves(estimate)[0])[0]


def _sum_over_rows(spec: LayerSpec, calls: Sequence[Captured], fn: Callable,
                   after: Optional[jax.Array] = None) -> tuple[Any, Any]:
  """``(sum of fn(X~, Z, m) over example chunks, number of rows)``.

  ``fn`` must be a sum over rows, ``m`` their weights (None without row masks, see
  ``weighted_layer_rows``); with row masks the number of rows is ``sum(m)`` (traced).

  The chunks are formed one after the other,
  in a ``fori_loop`` over equal chunks (``_loop_plan``) or else unrolled
  (``example_chunks``), the first after ``after`` (see ``_after``): left free,
  XLA:CPU formed every chunk's rows, of every layer, first. Layers without
  conv calls ignore ``after``. Either way the chunks' sums are added in order.
  """
  plan = _loop_plan(spec, calls)
  if plan is not None:
    (call,), (k, size, left) = calls, plan
    weighted = call.row_mask is not None

    def chunk(i):
      x, z, m = weighted_layer_rows(spec, [call.examples_at(i * size, size)])
      return fn(x, z, m) if m is None else (fn(x, z, m), jnp.sum(m))

    shapes = jax.eval_shape(chunk, 0)
    # A zero that varies as the data does (inside shard_map a carry must), and that
    # starts the loop only after `after`.
    zero = jnp.ravel(call.inputs)[0] * 0
    if after is not None:
      zero = zero + (after * 0).astype(zero.dtype)
    init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype) + zero.astype(a.dtype), shapes)
    total = jax.lax.fori_loop(0, k, lambda i, t: jax.tree.map(jnp.add, t, chunk(i)), init)
    if weighted:
      total, n = total
    else:
      rows = jax.eval_shape(lambda c: layer_rows(spec, [c.examples(0, size)])[0], call)
      n = k * rows.shape[0]
    if left:
      x, z, m = weighted_layer_rows(spec, _after([call.examples(k * size, k * size + left)],
                                                 dependency(total)))
      total = jax.tree.map(jnp.add, total, fn(x, z, m))
      n += x.shape[0] if m is None else jnp.sum(m)
    return total, n
  parts = example_chunks(spec, calls)
  if parts is None:
    parts = [list(calls)]
    if not _has_patch_rows(calls):
      after = None  # only patch rows are large enough to be worth ordering
  total, n = None, 0
  for part in parts:
    part = _after(part, after if total is None else dependency(total))
    x, z, m = weighted_layer_rows(spec, part)
    out = fn(x, z, m)
    total = out if total is None else jax.tree.map(jnp.add, total, out)
    n += x.shape[0] if m is None else jnp.sum(m)
  assert total is not None  # a layer has at least one call
  return total, n


def batch_sketch(spec: LayerSpec, calls: Sequence[Captured], omega: jax.Array,
                 after: Optional[jax.Array] = None) -> sketch_lib.Sketch:
  """The batch estimate of a sketched layer: ``((1/n) X~^T (X~ Omega), tr G^)``.

  Only for ``fisher="linear"`` dense layers (one ``d x d`` block, or one per layer of
  a stack: then stacked over the stack axes, with the same ``Omega``); the numbers
  are those of ``batch_factor`` sketched, ``G^ Omega``, in ``4 n d r``
  FLOPs instead of ``2 n d^2`` (see ``sngd_jax._src.sketch``).
  """
  for call in calls:
    _check_kind(spec, call)
  if spec.structure == "diagonal" or spec.per_unit:
    raise ValueError(f"sngd: layer {spec.path!r}: only single-block (linear) factors are "
                     "kept as sketches")
  if spec.stack or any(c.stack for c in calls):
    return _per_layer(lambda one, cs: batch_sketch(one, cs, omega, after), spec, calls)
  (y, tr), n = _sum_over_rows(
      spec, calls,
      lambda x, _, m: sketch_lib.row_sums(x, omega, out_sharding=replicated_out_sharding(x),
                                          weights=m),
      after)
  if not isinstance(n, int):
    n = _positive(n)
  return sketch_lib.Sketch(y / n, tr / n, jnp.zeros((), y.dtype))


def prior_of(prior: str, estimate, omega: Optional[jax.Array] = None):
  """The prior ``P(G^)`` for a (stack of) ``d x d`` estimate(s), a diagonal (vector),
  or a ``sngd_jax.Sketch`` (then ``P(G^) Omega`` and ``tr P(G^)``)."""
  if sketch_lib.is_sketch(estimate):
    if omega is None:
      raise ValueError("sngd: the prior of a sketched factor needs its test matrix `omega`")
    d = omega.shape[0]
    unit = sketch_lib.identity(omega, estimate.y.dtype)
    if prior == "identity":
      return unit
    if prior == "scaled_identity":  # per block of a stack: trace (...) against y (..., d, r)
      scale = estimate.trace / d
      return jax.tree.map(lambda a: scale.reshape(scale.shape + (1,) * a.ndim) * a, unit)
    if prior == "none":
      return jax.tree.map(jnp.zeros_like, estimate)
    raise ValueError(f"sngd: unknown prior {prior!r}; expected one of {PRIORS}")
  if estimate.ndim == 1:  # a diagonal factor stored as its diagonal
    if prior == "identity":
      return jnp.ones_like(estimate)
    if prior == "scaled_identity":
      return jnp.full_like(estimate, jnp.mean(estimate))
    if prior == "none":
      return jnp.zeros_like(estimate)
    raise ValueError(f"sngd: unknown prior {prior!r}; expected one of {PRIORS}")
  d = estimate.shape[-1]
  eye = jnp.eye(d, dtype=estimate.dtype)
  if prior == "identity":
    return jnp.broadcast_to(eye, estimate.shape)
  if prior == "scaled_identity":
    scale = checked_block_trace(estimate) / d  # the range check's reduction (one kernel)
    return scale[..., None, None] * eye[(None,) * scale.ndim]
  if prior == "none":
    return jnp.zeros_like(estimate)
  raise ValueError(f"sngd: unknown prior {prior!r}; expected one of {PRIORS}")


def ema_update(factor, weight: jax.Array, estimate, decay, prior: str,
               omega: Optional[jax.Array] = None):
  """One step of the prior-started moving average.

  Args:
    factor: the running sum ``G_{t-1}`` (unnormalized), an array or a
      ``sngd_jax.Sketch`` (the update is linear, so a sketch is
      updated leaf by leaf).
    weight: its weight ``w_{t-1}`` (0 before the first update).
    estimate: the batch estimate ``G^`` (of the same kind as ``factor``).
    decay: the EMA decay in ``[0, 1]``.
    prior: one of ``PRIORS``.
    omega: the test matrix of a sketched factor (for its prior).

  Returns:
    ``(G_t, w_t)``; the factor in use is ``G_t / w_t``.
  """
  estimate = jax.tree.map(lambda e, f: e.astype(f.dtype), estimate, factor)
  new_factor = jax.tree.map(
      lambda f, p, e: decay * (f + (1.0 - weight) * p) + (1.0 - decay) * e,
      factor, prior_of(prior, estimate, omega), estimate)
  if prior == "none":
    new_weight = decay * weight + (1.0 - decay)
  else:
    new_weight = jnp.ones_like(weight)
  return new_factor, new_weight


def normalized(factor, weight: jax.Array):
  """The factor in use, ``G_t / w_t`` (zero while ``w_t = 0``); an array or a sketch."""
  return jax.tree.map(lambda f: f / jnp.maximum(weight, jnp.finfo(f.dtype).tiny), factor)


HEADROOM = 16.0
"""How far below overflow a statistic's trace must stay: ``tr <= finfo(dtype).max / HEADROOM``.

Everything computed from an accepted factor is bounded by a small multiple of
its trace (the entries of a PSD ``G`` by ``tr G``, the moving average and the
prior by the largest trace averaged, ``G + G^T`` and ``G + rho I`` by twice
it), so a factor within this margin cannot overflow downstream.
"""


def checked_block_trace(g: jax.Array) -> jax.Array:
  """``tr(G)`` of each block of a dense ``(..., d, d)`` stack, non-finite if any entry is.

  ``sum_ij [i = j] G_ij + [i != j] 0 * G_ij``: the off-diagonal entries add
  ``0`` when finite and NaN when not (``0 * inf`` is NaN), so one reduction over
  the block gives both its trace and its finiteness. It cannot overflow for
  finite entries unless the trace itself does (then it is infinite, and out of
  range). Shape ``g.shape[:-2]``.

  Up to ``d = 1024`` the mask is a constant of the program (at most 4 MiB in
  float32), and XLA:CPU compiles the product and the sum as one library
  reduction, without generating code for it; above, it is built in the program.
  """
  d = g.shape[-1]
  if d <= _CONSTANT_EYE_MAX_DIM:
    return jnp.sum(g * np.eye(d, dtype=g.dtype)[(None,) * (g.ndim - 2)], axis=(-2, -1))
  eye = jnp.eye(d, dtype=bool)[(None,) * (g.ndim - 2)]
  return jnp.sum(jnp.where(eye, g, 0 * g), axis=(-2, -1))


_CONSTANT_EYE_MAX_DIM = 1024


def total_trace(stat) -> jax.Array:
  """``tr(G)`` summed over blocks, non-finite if any entry of the statistic is.

  For a dense ``(..., d, d)`` stack ``checked_block_trace``; for a diagonal
  ``(V,)`` its sum; for a ``sngd_jax.Sketch`` its recorded trace plus
  ``sum(0 * G Omega)``. One reduction per leaf, so the range check, the
  outlier limit and the scaled-identity prior share it.
  """
  if sketch_lib.is_sketch(stat):
    # 0 * each entry: non-finite if one is, no overflow
    return jnp.sum(sketch_lib.full_trace(stat)) + jnp.sum(0 * stat.y)
  if stat.ndim >= 2:
    return jnp.sum(checked_block_trace(stat))
  return jnp.sum(stat)


def in_range(stat) -> jax.Array:
  """Whether a statistic may enter (or stay in) the moving average: a scalar bool.

  True when every entry is finite and the trace summed over blocks is at most
  ``finfo(dtype).max / HEADROOM``. A batch estimate of finite activations can
  still overflow (``X~^T X~`` past the float32 range at input scale ``~1e19``),
  and a running factor restored from elsewhere may hold anything; either would
  otherwise make every later refresh fail.

  Cost: one reduction per leaf over the small statistic (``d x d``, ``d x r``
  or ``V``), never over the activations: ``total_trace``, which is not finite
  when an entry is not (a NaN fails the comparison).

  Args:
    stat: a (stack of) dense factor(s), a diagonal, or a ``sngd_jax.Sketch``.

  Returns:
    A bool scalar.
  """
  bound = jnp.finfo(jax.tree.leaves(stat)[0].dtype).max / HEADROOM
  return jnp.abs(total_trace(stat)) <= bound


def restart_if_out_of_range(factor, weight: jax.Array):
  """Replaces a running factor that is not ``in_range`` by the empty average.

  The empty average (zero factor, weight 0) is the state before the first
  update: the next batch estimate restarts it from the prior. A running
  factor built by ``ema_update`` from accepted estimates is always in
  range; one that is not (restored from a state written otherwise) would fail
  every refresh forever, since the moving average keeps an Inf or NaN. The
  replacement is an elementwise select, which XLA fuses into the moving
  average's own pass over the factor: a factor in range is used bit for bit,
  and the step has no ``lax.cond`` per layer (each added ~5 instructions to
  the compiled step, mostly copies of its operands, though few compiled
  fusions: ``benchmarks/README.md``, *Compile time*).

  Returns:
    ``(factor, weight, restarted)``, ``restarted`` a bool scalar.
  """
  ok = in_range(factor) & jnp.isfinite(weight) & (weight >= 0)
  factor = jax.tree.map(lambda f: jnp.where(ok, f, jnp.zeros_like(f)), factor)
  return factor, jnp.where(ok, weight, jnp.zeros_like(weight)), ~ok


def limit_outlier(estimate: jax.Array, factor: jax.Array, weight: jax.Array,
                  max_ratio: float) -> jax.Array:
  """Scales down a batch estimate far larger than the running factor.

  With ``T = tr(G_{t-1} / w_{t-1})`` (summed over the blocks of an rfim layer)
  and ``T^ = tr(G^)`` (a diagonal factor's sum, a sketch's recorded trace), the
  estimate is multiplied by ``min(1, max_ratio * T / T^)``.
  One batch ``c`` times out of scale would otherwise put ``(1 - decay) c^2 G``
  into the moving average and freeze the layer for about
  ``2 ln(c) / (1 - decay)`` steps (the inverse scales the gradient down by ``c^2``).
  Before the first update (``w = 0``) or while ``T = 0`` nothing is limited.

  Args:
    estimate: the batch estimate ``G^``, ``(d, d)`` or ``(O, d, d)``.
    factor: the running sum ``G_{t-1}``.
    weight: its weight ``w_{t-1}``.
    max_ratio: the largest allowed ``T^ / T``.

  Returns:
    The (possibly scaled) estimate.
  """
  dtype = jax.tree.leaves(factor)[0].dtype
  estimate = jax.tree.map(lambda e: e.astype(dtype), estimate)
  running = total_trace(factor) / jnp.maximum(weight, jnp.finfo(dtype).tiny)
  new = total_trace(estimate)
  limit = max_ratio * running
  outlier = (weight > 0) & (running > 0) & (new > limit)
  scale = jnp.where(outlier, limit / jnp.where(outlier, new, 1.0), 1.0)
  return jax.tree.map(lambda e: e * scale.astype(dtype), estimate)


def num_rows(spec: LayerSpec, calls: Sequence[Captured]) -> int:
  """The number of rows ``n`` that a layer's batch estimate averages (static).

  Token ids for an embedding, ``(example, position, channel group)`` rows for
  a normalization layer, rows of ``X~`` otherwise: the weight of the batch
  estimate in an average over several batches.
  """
  if spec.structure == "diagonal":
    return sum(c.inputs.size for c in calls)
  rows = norm_rows if spec.structure == "per_channel" else (lambda c: ROWS[c.kind](c))
  return sum(jax.eval_shape(rows, c)[0].shape[0] for c in calls)
