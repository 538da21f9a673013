"""Activation capture for Flax linen, by method interception.

``capture(loss_fn)`` runs ``loss_fn`` under ``flax.linen.intercept_methods``
and records, for every supported layer call (``tables.LAYERS``), what its
local Fisher needs (the input ``x``, and with ``outputs=True`` the
pre-activation output ``z`` that ``fisher="rfim"`` reads; gradients stopped).
Nothing in the model changes. A layer called several times (shared weights, a
layer applied at every time step) records one entry per call; their statistics
are pooled.

**Scanned cells.** ``nn.RNN`` runs its cell under ``nn.scan``: the Dense layers
inside the cell see tracers of the scan body, which must not escape it. While
an ``nn.RNN`` runs, the records made inside one cell call are returned by the
cell as an extra scan output (stacked over time by the scan), and unpacked
when the ``nn.RNN`` call returns (``records``). Every time step is
therefore recorded, and the cell's weights get statistics pooled over all
steps.

The result is a dict from layer path (``'Block_0/Dense_1'``, the same string
that names the layer's params) to a tuple of ``sngd_jax.Captured``
records.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable

import flax.linen as nn
import jax

from sngd_jax._src import paths
from sngd_jax._src.capture import flax_patches, tables, transforms
from sngd_jax._src.capture.records import (
    Recorder,
    StepRecords,
    rnn_batched,
    rnn_step_order,
    rnn_time_axis,
    split_aux,
    untag,
)
from sngd_jax._src.frames import caller_stacklevel


def _weight(module: nn.Module) -> Any:
  """The array ``module`` reads as its weight (to follow it through transforms), or None."""
  params = module.variables.get("params", {})
  leaves = jax.tree.leaves(params.get(tables.weight_name(module)))
  return leaves[0] if leaves else None


def _note_weight(rec: Recorder, seen: dict[str, dict[int, Any]], path: str,
                 weight: Any) -> None:
  """Keeps the weight a call outside every transform read, by layer path.

  Calls of one layer that read different arrays (a teacher or EMA copy of the model, the
  model applied to other params) are pooled like shared-weight calls: ``capture`` warns.
  """
  if weight is not None and not rec.frames:
    seen.setdefault(path, {})[id(weight)] = weight


def _warn_other_weights(seen: dict[str, dict[int, Any]]) -> None:
  for path, weights in sorted(seen.items()):
    if len(weights) < 2:
      continue
    shapes = sorted({tuple(getattr(w, "shape", ())) for w in weights.values()})
    if len(shapes) > 1:
      # No copy of one model: layers of two models that have the same path (each `apply`
      # names its layers from its own root).
      warnings.warn(
          f"sngd: layer {path!r} was called with weights of different shapes "
          f"({', '.join(map(str, shapes))}) inside the captured function: these are layers of "
          "two different models that have the same path (linen names a layer by its path in "
          "the module passed to `apply`, so a GAN's generator and discriminator, or a frozen "
          "pretrained backbone and the trained head run by their own `apply`, both have a "
          "'Dense_0'). The inputs of all their calls are pooled into one local Fisher, which "
          "is neither layer's (or `update` refuses features of the wrong size). Give the "
          "layers distinct names (`name=`), or make both models submodules of one parent "
          "module (freeze a pretrained part with `optax.multi_transform` and "
          "`optax.set_to_zero()`), or apply a frozen module outside the captured function "
          "and pass its outputs in.",
          stacklevel=caller_stacklevel())
      continue
    warnings.warn(
        f"sngd: layer {path!r} was called with {len(weights)} different weight arrays "
        "inside the captured function (a teacher or EMA copy of the model, the model "
        "applied to other params, or another model whose layers have the same paths); the "
        "inputs of all its calls are pooled into its local Fisher, as for shared weights. To "
        "count only the trained model's calls, apply the other copy outside the captured "
        "function and pass its outputs in (another model: give its layers distinct names).",
        stacklevel=caller_stacklevel())


def _rnn_call(rec: Recorder, module: nn.RNN, next_fun, args, kwargs):
  """Runs an ``nn.RNN`` and unpacks the records its cells returned through the scan."""
  with rec.rnn():
    out = next_fun(*args, **kwargs)
  time_major = kwargs.get("time_major")
  time_major = module.time_major if time_major is None else time_major
  reverse = kwargs.get("reverse")
  reverse = module.reverse if reverse is None else reverse
  keep_order = kwargs.get("keep_order")
  keep_order = module.keep_order if keep_order is None else keep_order
  out, found = untag(out, rnn_time_axis(args[0], time_major, module.cell),
                     rnn_batched(args[0], module.cell),
                     rnn_step_order(args[0], module.cell, time_major, reverse, keep_order,
                                    kwargs.get("seq_lengths")))
  rec.add_all(found)
  return out


def _cell_call(rec: Recorder, next_fun, args, kwargs):
  """Runs a cell inside an RNN's scan; its records leave the scan with its output."""
  with rec.cell() as frame:
    carry, y = next_fun(*args, **kwargs)
  return (carry, StepRecords(y, frame.records)) if frame.records else (carry, y)


def _norm_call(rec: Recorder, seen, module, next_fun, args, kwargs):
  """Runs a normalization layer and records ``xhat`` (from the patched routine)."""
  with rec.norm() as slot:
    out = next_fun(*args, **kwargs)
  if slot and module.use_scale:
    xhat, feature_axes = slot[0]
    xhat, z, config = tables.norm_record(xhat, out, feature_axes)
    path, weight = paths.join(module.path), _weight(module)
    _note_weight(rec, seen, path, weight)
    rec.add(path, xhat, z, "norm", config, weight=weight)
  return out


def _interceptor(rec: Recorder, seen: dict[str, dict[int, Any]]):
  """The ``nn.intercept_methods`` hook that records supported layer calls.

  A subclass of a recorded layer whose ``__call__`` (or ``attend``) calls the base
  class's through ``super()`` (``super().__call__(f(x))``) is intercepted twice on the
  same module, the outer call with its own arguments: only the innermost call that
  records is kept (its arguments are what the kernel multiplies), as ``capture_nnx``
  records the base class's ``__call__`` only.
  """
  # (module id, method) -> one flag per open call: "a call inside it recorded".
  open_calls: dict[tuple[int, str], list[bool]] = {}

  def intercept(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if method == "__call__" and isinstance(module, nn.RNN) and args:
      return _rnn_call(rec, module, next_fun, args, kwargs)
    if method == "__call__" and isinstance(module, nn.RNNCellBase) and rec.rnn_frame():
      return _cell_call(rec, next_fun, args, kwargs)
    if method == "__call__" and isinstance(module, tables.NORMS):
      return _norm_call(rec, seen, module, next_fun, args, kwargs)
    attend = method == "attend" and isinstance(module, nn.Embed)
    recorder = tables.lookup(module) if method == "__call__" else None
    if not args or not (attend or recorder is not None):
      return next_fun(*args, **kwargs)
    flags = open_calls.setdefault((id(module), method), [])
    flags.append(False)
    try:
      out = next_fun(*args, **kwargs)
    finally:
      inner_recorded = flags.pop()
    if inner_recorded:  # super().__call__ inside recorded the kernel's own input
      if flags:
        flags[-1] = True
      return out
    if attend:
      recorded = (args[0], out, "embed", ("attend",))
    else:
      assert recorder is not None
      recorded = recorder(module, args, kwargs, out)
    if recorded is not None:
      path, weight = paths.join(module.path), _weight(module)
      _note_weight(rec, seen, path, weight)
      rec.add(path, *recorded, weight=weight)
      if flags:
        flags[-1] = True
    return out

  return intercept


def capture(fn: Callable[..., Any], *, has_aux: bool = False,
            outputs: bool = False) -> Callable[..., Any]:
  """Wraps a function that applies Flax linen modules so it also returns activations.

  Examples:
    ```python
    loss_and_acts = sngd_jax.capture(loss_fn)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    ```

  Args:
    fn: any function; every call of a supported layer made inside it (through
      ``module.apply``) is recorded, including every time step of cells run by
      ``nn.RNN``.
    has_aux: set when ``fn`` already returns ``(value, aux)``; the wrapped
      function then returns ``(value, (aux, activations))`` so that it still
      fits ``jax.value_and_grad(..., has_aux=True)``.
    outputs: also keep each layer's output ``z`` in the activations. Only
      ``fisher="rfim"`` reads it (the paper preset's hidden layers); the
      update raises an error naming the layer when it is needed and missing.
      Off by default, so that activations handed across a ``jit`` boundary
      (gradients and the update jitted separately) carry the layer inputs
      only; in one jitted step it makes no difference either way (what the
      update does not read is not computed).

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    rec = Recorder(outputs=outputs)
    seen: dict[str, dict[int, Any]] = {}
    with (transforms.recording(rec), flax_patches.linen_normalize(rec),
          nn.intercept_methods(_interceptor(rec, seen))):
      result = fn(*args, **kwargs)
    _warn_other_weights(seen)
    value, aux = split_aux(result, has_aux, "capture")
    acts = rec.freeze()
    return (value, (aux, acts)) if has_aux else (value, acts)

  return wrapped
