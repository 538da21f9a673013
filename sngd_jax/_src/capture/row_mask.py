"""Row masks: which examples, or tokens, of a batch are real (padding excluded).

``with_row_mask(activations, mask)`` attaches to every captured record the weight of each
of its rows, so that each layer's batch estimate becomes the mask-weighted average over its
rows (``sngd_jax._src.statistics``):

```
G^ = sum_r m_r x~_r x~_r^T / sum_r m_r.
```

The mask travels with the activations (a field of each ``Captured`` record), so it reaches
``update`` through every wrapper that passes ``activations=`` on (``optax.chain``,
``optax.inject_hyperparams``, ``sngd_jax.MultiSteps``, ``sngd_jax.TrainState``,
``nnx.Optimizer``).

How a mask of shape ``(B,)`` (examples) or ``(B, T)`` (tokens) reaches a record's rows: the
record's example axis (``Captured.batch_axis``) holds the ``B`` examples; a cell run by
``nn.RNN``/``nnx.RNN`` holds them at every time step, time-major (row ``t * B + b``,
``Captured.time_steps = T``); otherwise the axis right after the examples is the tokens'
(length ``T``) when it is an axis of rows (not one the layer contracts or normalizes over):
a 1-D conv's output positions when the output has the input's length. A record whose rows
have no token axis (a layer after pooling over the tokens) counts an example when any of
its tokens is real (``max`` over the tokens, for weights); where such a layer has as many
calls as the mask has tokens (a cell called once per step, ``hk.static_unroll``), that would
count padded steps, and a warning names the per-step mask (``calls=[t]``). A mask of shape
``(B, T, T')`` (pairs of tokens: a dense graph's edges, pairwise features) reaches the two row
axes after the examples. Any other layout raises, naming the layer: the mask is never
silently dropped.

Several ``(B, T_k)`` masks of different lengths (an encoder-decoder's source and target
masks) are matched to each call by the length of its token axis (``_pick``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp

from sngd_jax._src import conv as conv_lib
from sngd_jax._src.capture.records import (
    Activations,
    Captured,
    leading_axes_pooled,
    times_mask,
)
from sngd_jax._src.frames import caller_stacklevel


def with_row_mask(activations: Activations, mask: Any, *more_masks: Any,
                  where: Optional[Callable[[str], bool]] = None,
                  calls: Optional[Sequence[int]] = None,
                  per_layer: Optional[bool] = None) -> Activations:
  """The activations with a row mask: padding does not enter the local Fisher statistics.

  Each layer's batch estimate becomes the average over its real rows only,
  ``G^ = sum_r m_r x~_r x~_r^T / sum_r m_r`` (per output unit ``j`` with ``sigmoid(z_rj)^2``
  for ``fisher="rfim"``; an embedding counts only the real tokens' lookups; a normalization
  layer's per-channel moments likewise). A layer whose every row is masked in a step keeps
  its factor. ``sngd_jax.MultiSteps`` weighs each micro-batch by its real rows, and under
  ``axis_name`` the devices' estimates are weighted by theirs, so the result is that of one
  batch of the real rows.

  Args:
    activations: from ``sngd_jax.capture`` / ``capture_nnx`` / ``capture_eqx`` /
      ``capture_hk``.
    mask: ``(B,)``: which examples are real (a batch padded to a fixed size), or ``(B, T)``:
      which tokens are real, batch-major as the model's inputs (also for the cells of a
      time-major ``nn.RNN``, whose rows are mapped to it), or ``(B, T, T')`` for a layer
      whose rows are pairs of tokens (``(B, T, T', D)`` inputs: the edges of a dense
      graph batch, ``mask[:, :, None] & mask[:, None, :]``; with ``where=``). Bool, or
      integer (nonzero = real: packed sequences' segment ids, 0 for padding, as they are),
      or nonnegative float weights. An integer mask is never a weight: an entry of 3
      weighs 1, like any nonzero one (there is no warning: under ``jit`` its values are
      not known); pass counts or other weights as floats (``counts.astype(jnp.float32)``).
    *more_masks: further ``(B, T_k)`` token masks of other lengths, for a model whose
      layers run over sequences of different lengths (an encoder-decoder: the source's
      ``(B, S)`` and the target's ``(B, T)`` masks, `with_row_mask(acts, src_mask,
      tgt_mask)`). Each call of each layer then gets the mask whose length is that of its
      token axis (its time steps, for a cell under ``nn.RNN``): the encoder's layers and
      cross-attention's ``key``/``value`` projections the source's, the decoder's other
      layers the target's, and each lookup of a shared embedding table (and its ``attend``
      queries) the mask of the sequence it reads. The masks must share ``B`` and have
      different lengths (with ``S == T`` nothing tells the two apart: mask in two calls
      with ``where=`` and ``calls=`` instead, ``docs/training-loops.md``).
    where: if given, only the layers whose path it accepts get the mask (the others are
      returned as they are). An encoder-decoder whose source and target have one length
      is masked in several calls: the layers that read the source (the encoder's, and
      cross-attention's ``key``/``value``) with its mask, the others with the target's,
      and a shared table's lookups by ``calls=``. A graph network's edge, node and graph
      layers, whose rows are edges, nodes and graphs, likewise take a mask each.
    calls: if given, only these calls of each layer get the mask (indices into the layer's
      records, in the order the loss made the calls; negative from the end); its other
      calls are returned as they are, each of their rows weighing 1. For a model called on
      batches of different sizes in one loss, of which one is padded: a PINN's interior
      points (call 0) and boundary points (call 1), ``calls=[0]``.
    per_layer: the mask's leading axes are the stack axes of the layers it is for (a stack
      of layers made by ``nn.vmap``/``nnx.vmap``/``eqx.filter_vmap`` over their params,
      ``jax.vmap(sngd_jax.dense)`` over a stacked kernel): one mask per layer of the stack,
      ``(E, B)`` or ``(E, B, T)`` for ``E`` layers, each layer's rows weighed by its own.
      For the experts of a mixture of experts, whose rows are capacity slots: an
      ``(E, G, C)`` mask of the slots that hold a routed token (from the dispatch tensor,
      ``dispatch.sum(axis=1).transpose(1, 0, 2) > 0`` for a ``(G, S, E, C)`` one), so that
      each expert's factor averages over the tokens routed to it only,
      ``G_e = sum_r m_er x~_r x~_r^T / sum_r m_er``, and an expert that received none keeps
      its factor (``docs/training-loops.md``, *Mixture of experts*). Use it with ``where=``
      naming the stacked layers; a layer without those stack axes raises. Without it (None,
      the default, or False) a mask is one for every layer of a stack alike, the same rows
      weighed the same in each (right for blocks scanned over depth, which read the same
      tokens; for experts, whose slot ``(g, c)`` holds another token in each, a ``(G, C)``
      mask weighs the slots, not the tokens). A mask whose leading axes are a stack's and
      that cannot be one mask for all its layers raises, naming the layer and pointing
      here; one that fits both ways (an ``(E, B)`` mask of experts over ``B == E`` rows, or
      a ``(B, T)`` padding mask of ``L`` blocks scanned over depth with ``L == B == T``; not
      with ``L == B`` alone) is read as one for all and warns, unless ``per_layer=False``
      says so.

  Returns:
    The activations, each record carrying its rows' weights (``Captured.row_mask``); pass
    them as ``activations=`` as before. A record that already carries weights (from an
    earlier ``with_row_mask``, or a conditional's ``[its branch ran]``, see
    ``docs/layer-coverage.md``) gets their product: masks compose, none replaces another.

  Raises:
    ValueError: for a record whose rows cannot be matched to the mask (naming the layer
      path, the record's input shape and the mask's shape): with ``per_layer``, a layer
      whose stack shape is not the mask's leading axes; an example axis of another
      length, a ``(B, T)`` mask on a layer whose axis after the examples is a 2-D conv's
      positions, a per-example Equinox call outside a ``jax.vmap`` over the batch. With
      several masks: masks that are not all ``(B, T_k)`` with one ``B`` and different
      lengths, or a call whose rows have no token axis or one of a length no mask has.

  Examples:
    ```python
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, tokens, labels)
    acts = sngd_jax.with_row_mask(acts, tokens != PAD)   # (B, T)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    ```
  """
  first = _as_mask(mask, bool(per_layer))
  masks = (first, *(_as_mask(m) for m in more_masks))
  if per_layer and more_masks:
    raise ValueError(
        "sngd: with_row_mask(per_layer=True) takes one mask (the stack's axes, then each "
        "layer's (B,) or (B, T)); mask the layers of each length in a call of their own, "
        "with `where=`")
  if len(masks) > 1:
    shapes = [tuple(m.shape) for m in masks]
    lengths = [s[1] if len(s) == 2 else None for s in shapes]
    if (any(len(s) != 2 for s in shapes) or len({s[0] for s in shapes}) > 1
        or len(set(lengths)) < len(lengths)):
      raise ValueError(
          f"sngd: with_row_mask: several masks, of shapes {shapes}: each call of a layer "
          "gets the one whose length is that of its token axis, so they must all be (B, T_k) "
          "token masks with one B and different lengths T_k. Masks of one length (a source "
          "and a target padded to the same length) cannot be told apart by their rows: mask "
          "in two calls instead, `with_row_mask(acts, src_mask, where=...)` for the layers "
          "(and `calls=[...]` for the lookups of a shared table) that read the source, then "
          "the same with the target's mask for the others")
  if not isinstance(activations, dict):
    raise TypeError(f"sngd: with_row_mask takes the activations dict that capture returns, "
                    f"not a {type(activations).__name__}")
  if calls is not None:
    if isinstance(calls, (int, str)) or not all(
        isinstance(i, int) and not isinstance(i, bool) for i in calls):
      raise TypeError(f"sngd: with_row_mask: calls={calls!r}; expected a sequence of call "
                      "indices, e.g. `calls=[0]`")
    calls = tuple(calls)
  heads = _attention_heads(activations)
  out = {}
  for path, records in activations.items():
    if not isinstance(records, (tuple, list)) or not all(
        isinstance(c, Captured) for c in records):
      raise TypeError(f"sngd: with_row_mask: activations[{path!r}] is not a tuple of "
                      "`Captured` records (pass what capture returned)")
    if where is not None and not where(path):
      out[path] = tuple(records)
      continue
    n = len(records)
    chosen = range(n) if calls is None else {i % n for i in calls if -n <= i < n}
    new = []
    for i, c in enumerate(records):
      if i in chosen:
        c = leading_axes_pooled(c)  # once, for both `_pick` and `_masked`
        if per_layer:
          c = _masked_per_layer(path, i, c, first, n, calls is not None, where is not None,
                                heads)
        else:
          c = _masked_for_all(path, i, c, _pick(path, i, c, masks), n, calls is not None,
                              where is not None, heads, per_layer is None)
      new.append(c)
    out[path] = tuple(new)
  return out


def _as_mask(mask: Any, per_layer: bool = False) -> jax.Array:
  """A mask as a float array without gradient: bool and integer masks as float32 0/1, an
  integer mask's nonzero entries being the real rows (segment ids of packed sequences,
  ``1, 2, ...`` per document and 0 for padding, weigh each real token 1, not its document's
  number; integer counts are not weights: pass them as floats); a float mask as its
  weights."""
  if callable(mask):
    raise TypeError(
        f"sngd: with_row_mask: got a function ({getattr(mask, '__name__', mask)!r}) where a "
        "mask goes: the arguments after the activations are masks; pass the layer filter "
        "as `where=`, `with_row_mask(acts, mask, where=lambda path: ...)`")
  mask = jnp.asarray(mask)
  if not per_layer and mask.ndim not in (1, 2, 3):
    raise ValueError(
        f"sngd: with_row_mask: the mask has shape {mask.shape}; expected (B,) (which examples "
        "are real), (B, T) (which tokens are real) or (B, T, T') (which pairs of tokens are: "
        "a layer on (B, T, T', D) pairwise features)")
  if not jnp.issubdtype(mask.dtype, jnp.floating):
    mask = mask != 0
  dtype = mask.dtype if jnp.issubdtype(mask.dtype, jnp.floating) else jnp.float32
  return jax.lax.stop_gradient(mask.astype(dtype))


def _pick(path: str, i: int, c: Captured, masks: tuple[jax.Array, ...]) -> jax.Array:
  """The mask of ``masks`` (several ``(B, T_k)`` masks of different lengths) whose length is
  that of the record's token axis: its time steps under ``nn.RNN``, else the row axis right
  after its examples. One mask is returned as it is (``_masked`` checks it). ``c``: the
  record with its leading axes pooled (``leading_axes_pooled``)."""
  if len(masks) == 1:
    return masks[0]
  x, ax = c.inputs, c.batch_axis
  if ax is None or ax != c.stack or x.shape[ax] != masks[0].shape[0] * c.time_steps:
    return masks[0]  # `_masked` raises, naming why the rows cannot be matched
  if c.time_steps > 1:
    length = c.time_steps
  elif _axis_role(c, ax + 1) == "row":
    length = x.shape[ax + 1]
  else:
    length = None
  for m in masks:
    if m.shape[1] == length:
      return m
  lengths = [m.shape[1] for m in masks]
  why = (f"its token axis has length {length}, and the masks have {lengths} tokens"
         if length is not None else
         "its rows have no token axis (a layer after pooling over the tokens), so no mask's "
         "length says which sequence they come from")
  raise ValueError(
      f"sngd: with_row_mask: layer {path!r} (call {i}, {c.kind}): its captured inputs of "
      f"shape {tuple(x.shape)} match none of the masks of lengths {lengths}: {why}. Mask this "
      "layer in a call of its own, `with_row_mask(acts, mask, where=lambda p: p == "
      f"{path!r})`, and leave it out of this one with `where=`")


def _masked_per_layer(path: str, i: int, c: Captured, mask: jax.Array, n_calls: int,
                      selected: bool, filtered: bool,
                      heads: frozenset[tuple[int, ...]]) -> Captured:
  """``_masked`` for a mask with the record's stack axes first (``per_layer=True``): each
  layer of the stack gets the rows' weights of its own slice of the mask, so the row mask
  has the stack axes in full (``statistics.weighted_rows`` then counts each layer's rows)."""
  k = c.stack
  shape = tuple(c.inputs.shape[:k])
  if not k or tuple(mask.shape[:k]) != shape or mask.ndim - k not in (1, 2, 3):
    what = (f"a stack of layers of shape {shape}" if k else
            "one layer, not a stack (no transform over its params)")
    raise ValueError(
        f"sngd: with_row_mask(per_layer=True): layer {path!r} (call {i}, {c.kind}), inputs "
        f"of shape {tuple(c.inputs.shape)}, is {what}; the mask of shape {tuple(mask.shape)} "
        "must be its stack shape followed by each layer's (B,) or (B, T) mask. Pass "
        "`where=lambda path: ...` naming the stacked layers (the experts) only, and mask the "
        "others in a call of their own")
  if c.kind not in ("dense", "conv", "conv_transpose"):
    raise ValueError(
        f"sngd: with_row_mask(per_layer=True): layer {path!r} (call {i}) is a {c.kind} "
        "layer; one mask per layer of a stack is for dense and conv layers. Leave it out "
        "with `where=`")
  ax = c.batch_axis
  one = dataclasses.replace(
      c, inputs=c.inputs[(0,) * k], outputs=None, stack=0, row_mask=None,
      batch_axis=None if ax is None else ax - k)

  def weights(m):
    w = _masked(path, i, one, m, n_calls, selected, filtered, heads).row_mask
    assert w is not None
    return w

  fn = weights
  for _ in range(k):
    fn = jax.vmap(fn)
  return times_mask(c, fn(mask))


def _masked_for_all(path: str, i: int, c: Captured, mask: jax.Array, n_calls: int,
                    selected: bool, filtered: bool, heads: frozenset[tuple[int, ...]],
                    warn: bool) -> Captured:
  """``_masked`` (one mask for every layer of a stack), for a mask given without
  ``per_layer=True``. When the record is a stack of layers and the mask's leading axes are
  its stack shape with a mask that ``_masked_per_layer`` reads after them (a mask per expert
  given without ``per_layer``): where ``_masked`` cannot read it, its error says to pass
  ``per_layer=True``; where it can (both readings fit: the stack as long as the example axis,
  an ``(E, B)`` mask with ``E == B``), it is read as one mask for all, with a warning
  (``warn``: ``per_layer`` was not given; ``per_layer=False`` silences it)."""
  try:
    out = _masked(path, i, c, mask, n_calls, selected, filtered, heads)
  except ValueError as err:
    if _fits_per_layer(path, i, c, mask, n_calls, selected, filtered, heads):
      raise ValueError(
          f"{err}. The mask's leading axes {tuple(mask.shape[:c.stack])} are this layer's "
          f"stack of layers (inputs of shape {tuple(c.inputs.shape)}): for a mask per layer "
          "of the stack (the experts of a mixture of experts: its (E, G, C) slots) pass "
          "`with_row_mask(acts, mask, per_layer=True, where=...)`; without `per_layer` a "
          "mask is one for every layer of the stack alike") from None
    raise
  if warn and _fits_per_layer(path, i, c, mask, n_calls, selected, filtered, heads):
    warnings.warn(
        f"sngd: with_row_mask: layer {path!r} (call {i}, {c.kind}) is a stack of layers of "
        f"shape {tuple(c.inputs.shape[:c.stack])} (inputs of shape {tuple(c.inputs.shape)}), "
        f"and the mask of shape {tuple(mask.shape)} fits it both as one mask for every layer "
        "of the stack (read so: its leading axis the examples') and as a mask per layer (its "
        "leading axes the stack's). Pass `per_layer=True` for a mask per layer (the experts "
        "of a mixture of experts), or `per_layer=False` for one mask for all (which silences "
        "this warning).", stacklevel=caller_stacklevel())
  return out


def _fits_per_layer(path: str, i: int, c: Captured, mask: jax.Array, n_calls: int,
                    selected: bool, filtered: bool,
                    heads: frozenset[tuple[int, ...]]) -> bool:
  """Whether ``mask`` reads as a mask per layer of the record's stack
  (``_masked_per_layer`` accepts it; a few elementwise ops on the mask, only for a mask whose
  leading axes are the stack's)."""
  k = c.stack
  if not k or tuple(mask.shape[:k]) != tuple(c.inputs.shape[:k]):
    return False
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      _masked_per_layer(path, i, c, mask, n_calls, selected, filtered, heads)
  except ValueError:
    return False
  return True


def _attention_heads(activations: Activations) -> frozenset[tuple[int, ...]]:
  """The ``(H, head_dim)`` of every multi-head attention output projection among the records:
  a dense layer contracting its inputs' last two axes (``(B, T, H, head_dim)``: Flax's and
  NNX's attention ``out``, a ``DenseGeneral(axis=(-2, -1))``)."""
  heads = set()
  for records in activations.values():
    for c in records if isinstance(records, (tuple, list)) else ():
      if (isinstance(c, Captured) and c.kind == "dense" and c.config and c.inputs.ndim >= 3
          and {a % c.inputs.ndim for a in c.config[0]}
          == {c.inputs.ndim - 2, c.inputs.ndim - 1}):
        heads.add(tuple(c.inputs.shape[-2:]))
  return frozenset(heads)


def _masked(path: str, i: int, c: Captured, mask: jax.Array, n_calls: int = 1,
            selected: bool = False, filtered: bool = False,
            heads: frozenset[tuple[int, ...]] = frozenset()) -> Captured:
  """The record ``c`` (its leading axes pooled, ``leading_axes_pooled``) with the weights of
  its rows (``Captured.row_mask``); ``n_calls``: the layer's number of calls, ``selected``:
  whether ``calls=`` chose this one, ``filtered``: whether ``where=`` chose the layer (for the
  hints); ``heads``: the ``(H, head_dim)`` of the model's attention (``_attention_heads``),
  whose per-head layers on ``(B, T, H, head_dim)`` have no pairs of tokens even when
  ``H == T``."""
  x, ax = c.inputs, c.batch_axis

  def fail(why: str):
    raise ValueError(
        f"sngd: with_row_mask: layer {path!r} (call {i}, {c.kind}): its captured inputs of "
        f"shape {tuple(x.shape)} cannot be matched to the row mask of shape "
        f"{tuple(mask.shape)}: {why}")

  if ax is None:
    fail("the record has no example axis (an Equinox layer called on one example outside "
         "a `jax.vmap` over the batch): call the model under `jax.vmap` inside the captured "
         "function")
  assert ax is not None
  if ax != c.stack:
    fail(f"axes {tuple(x.shape[c.stack:ax])} before its example axis are more rows of the "
         "layer (a scan over time or micro-batches, or a vmap, that capture pooled), which "
         "the mask does not index. Call the layer on the batch (B, T, ...), or mask each "
         "micro-batch's activations inside the scan; for a recurrent cell scanned over time "
         "on a batch (`hk.dynamic_unroll`, your own `jax.lax.scan`) apply the model to one "
         "sequence under `jax.vmap` over the batch inside the captured function, whose axis "
         "is the examples' (a (B,) or (B, T) mask then weighs them; `nn.RNN` and `nnx.RNN` "
         "take the mask as they are)")
  b, steps = mask.shape[0], c.time_steps
  shape = [1] * x.ndim
  if x.shape[ax] != b * steps:
    hint = (" An embedding looked up without the batch axis (learned positions, "
            "`embed(jnp.arange(T))`): look up `jnp.broadcast_to(jnp.arange(T), (B, T))`."
            if c.kind == "embed" else "")
    if not filtered:
      hint += (" Mask only the layers this mask is for: `with_row_mask(acts, mask, "
               "where=lambda path: ...)` (e.g. a graph network's node, edge and graph layers, "
               "whose rows are nodes, edges and graphs, each take a mask of their own).")
    if n_calls > 1 and not selected:
      hint += (f" The layer has {n_calls} calls (a model called on batches of different "
               "sizes in one loss, e.g. a PINN's interior and boundary points): mask only "
               "the calls this mask is for, `with_row_mask(acts, mask, calls=[...])` (call "
               "indices in the order the loss made them).")
    fail(f"its example axis {ax} has length {x.shape[ax]}, not the mask's {b} examples"
         + (f" at each of its {steps} time steps (time-major rows of a recurrent cell)"
            if steps > 1 else "") + "." + hint)
  if steps > 1:  # a cell under nn.RNN: row t * B + b is example b at time step t
    if mask.ndim == 3:
      fail(f"its rows are {steps} time steps of {b} examples, which a mask of pairs of tokens "
           "does not index: mask it by example (B,) or by token (B, T)")
    if mask.ndim == 2 and mask.shape[1] != steps:
      fail(f"its rows are {steps} time steps of {b} examples, the mask has "
           f"{mask.shape[1]} tokens")
    w = mask.T.reshape(-1) if mask.ndim == 2 else jnp.tile(mask, steps)
    shape[ax] = b * steps
    return times_mask(c, w.reshape(shape))
  if mask.ndim == 1:
    shape[ax] = b
    return times_mask(c, mask.reshape(shape))
  role = _axis_role(c, ax + 1)
  if role == "row":
    if x.shape[ax + 1] != mask.shape[1]:
      fail(f"its axis {ax + 1} after the examples has length {x.shape[ax + 1]}, not the "
           f"mask's {mask.shape[1]} tokens")
    if mask.ndim == 3 and (_axis_role(c, ax + 2) != "row" or x.shape[ax + 2] != mask.shape[2]):
      fail(f"the mask is one of pairs of tokens, and the layer's axis {ax + 2} is not a row "
           f"axis of {mask.shape[2]} tokens (a layer on (B, T, D) tokens takes a (B, T) mask; "
           "mask each kind of layer with its own mask, `where=`)")
    if (mask.ndim == 2 and _axis_role(c, ax + 2) == "row" and x.shape[ax + 2] == mask.shape[1]
        and tuple(x.shape[ax + 2:]) not in heads):
      warnings.warn(
          f"sngd: with_row_mask: layer {path!r} (call {i}): its inputs of shape "
          f"{tuple(x.shape)} have two row axes of the mask's {mask.shape[1]} tokens after the "
          "examples (pairwise features, the edges of a dense graph batch?); the (B, T) mask "
          f"weighs row (b, i, j) by mask[b, i] alone, so pairs with a padding token j count. "
          "For pairs of real tokens give this layer the (B, T, T) mask "
          "`mask[:, :, None] * mask[:, None, :]` (`where=lambda path: path == "
          f"{path!r}`). (A head axis of as many heads as tokens is no pair: (B, T, H, ...) "
          "inputs are weighed right, by their token; (B, H, T, ...) ones are not, by their "
          "head: keep the tokens right after the examples.)", stacklevel=caller_stacklevel())
    shape[ax:ax + mask.ndim] = mask.shape
    return times_mask(c, mask.reshape(shape))
  if role == "positions":
    fail("the axis after the examples is a convolution's spatial axis whose output "
         "positions are not the input's tokens (a 2-D or 3-D conv, or a 1-D conv whose "
         "output length differs): mask it by example, `(B,)`")
  # No token axis among the rows (after pooling): an example counts if any token is real.
  if mask.ndim == 2 and n_calls == mask.shape[1] > 1 and not selected and i == 0:
    warnings.warn(
        f"sngd: with_row_mask: layer {path!r} has {n_calls} calls on inputs without a token "
        f"axis (shape {tuple(x.shape)}), as many as the (B, T) mask's {mask.shape[1]} tokens: "
        "if each call is one step of a sequence (a cell called once per step: "
        "`hk.static_unroll`, a Python loop over the steps), the whole mask counts a sequence "
        "at every step where any of its steps is real, padded steps included. Mask it step by "
        "step, `with_row_mask(acts, mask[:, t], calls=[t], where=lambda p: p == "
        f"{path!r})` for each step t; a layer after pooling called {n_calls} times on whole "
        "sequences is weighed right (mask it with `calls=` to silence this).",
        stacklevel=caller_stacklevel())
  shape[ax] = b
  return times_mask(c, jnp.max(mask.reshape(b, -1), axis=1).reshape(shape))


def _axis_role(c: Captured, axis: int) -> Optional[str]:
  """What axis ``axis`` of a record's inputs is: ``'row'`` (each index is rows of its own,
  aligned with the input), ``'feature'`` (contracted or normalized over), ``'positions'``
  (a conv's spatial axis whose output positions are not the input's), or None (absent)."""
  x = c.inputs
  if axis >= x.ndim:
    return None
  if c.kind == "dense" or (c.kind == "embed" and c.config == ("attend",)):
    axes = c.config[0] if c.config and c.kind == "dense" else (x.ndim - 1,)
    return "feature" if axis in {a % x.ndim for a in axes} else "row"
  if c.kind == "norm":
    (feature_axes,) = c.config
    return "feature" if axis in {a % x.ndim for a in feature_axes} else "row"
  if c.kind == "embed":
    return "row"
  if c.kind in ("conv", "conv_transpose"):
    rank = len(c.config[0])
    if axis < x.ndim - rank - 1:
      return "row"  # a batch axis of the conv
    if axis == x.ndim - 1:
      return "feature"
    if rank == 1 and conv_positions(c) == x.shape[axis]:
      return "row"
    return "positions"
  return "positions"


def conv_positions(c: Captured) -> int:
  """The output positions per example (and group) of a conv or transposed-conv record."""
  x = c.inputs
  rank = len(c.config[0])
  examples = math.prod(x.shape[:x.ndim - rank - 1])
  if c.kind == "conv":
    rows = jax.eval_shape(lambda a: conv_lib.patches(a, c.config), x).shape[0]
    return rows // max(examples * c.config[5], 1)
  rows = jax.eval_shape(lambda a: conv_lib.transpose_patches(a, c.config), x).shape[0]
  return rows // max(examples, 1)
