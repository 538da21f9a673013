"""Which local Fisher every parameter gets: a report for a model and a batch.

``coverage`` traces one call of the loss (shapes only, nothing is
computed; differentiated with respect to the params, as a training step does),
matches the captured layer calls to the layers found in the params, and lists
every parameter leaf with

* the local Fisher it gets, e.g. ``linear/conv 28x28`` (structure, the kind of
  rows it is built from, the factor shape), ``per-channel/norm 6x2x2``,
  ``diagonal/embed 11``;
* ``pass-through`` for leaves that are part of no layer (they reach the next
  transform unchanged), or ``pass-through (fisher=None)`` for a layer left
  alone on purpose;
* ``MISSING`` for a layer whose calls were not captured, or whose captured
  feature sizes do not fit its params: ``update`` would raise for it (pass
  ``fisher={path: None}`` or use a supported layer);

and the bytes of optimizer state its factor takes (running factor or sketch, plus
the cached inverse, read from ``jax.eval_shape`` of ``sngd(...).init``), on the
layer's weight leaf. The report also gives the bytes of the captured
activations of one batch (``activation_bytes``): what crosses a ``jit``
boundary when gradients and the update are jitted separately (in one jitted
step, arrays the update does not read cost nothing).

Stacked layers (``nn.scan`` over depth, ``nnx.vmap``-made, Equinox layers
scanned over) show their factor shape with the stack first, e.g.
``linear/dense 4x17x17``.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import textwrap
import warnings
from collections.abc import Mapping
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from sngd_jax._src import layers as layers_lib
from sngd_jax._src import paths, validation
from sngd_jax._src import statistics as factors_lib
from sngd_jax._src.capture.equinox import capture_eqx
from sngd_jax._src.capture.haiku import capture_hk
from sngd_jax._src.capture.linen import capture
from sngd_jax._src.capture.nnx_capture import capture_nnx
from sngd_jax._src.capture.records import A_LABEL, LABEL, model_kind, stack_shape
from sngd_jax._src.cost import nbytes
from sngd_jax._src.inverse.base import describe
from sngd_jax._src.transform import _method_of, sngd

PASS_THROUGH = "pass-through"
MISSING = "MISSING"
DESCRIPTION_WIDTH = 64
"""Longer descriptions of a parameter's local Fisher wrap onto lines of their own."""


@dataclasses.dataclass(frozen=True)
class ParamCoverage:
  """One parameter leaf.

  Attributes:
    path: the leaf path, e.g. ``'Conv_0/kernel'``.
    shape: the leaf shape.
    layer: the layer path it belongs to, or None.
    fisher: the local Fisher it gets (see the module docstring).
    factor_bytes: state bytes of the layer's factor and inverse (on the weight
      leaf of a preconditioned layer; 0 elsewhere).
    inverse: how the layer's blocks are inverted, e.g. ``"cholesky"`` or
      ``"nystrom(rank=128)"`` (on the weight leaf of a preconditioned layer).
  """

  path: str
  shape: tuple[int, ...]
  layer: Optional[str]
  fisher: str
  factor_bytes: int
  inverse: str = ""


@dataclasses.dataclass(frozen=True)
class CoverageReport:
  """The coverage of a params tree; ``str()`` gives a table.

  Attributes:
    params: one ``ParamCoverage`` per params leaf, in tree order.
    unmatched: paths of captured layers that match no params (frozen, or
      another transform's); ``update`` ignores their activations.
    activation_bytes: bytes of the captured activations of one batch.
    output_bytes: of those, the bytes of the layers' outputs (captured with
      ``outputs=True``; read by ``fisher="rfim"`` only).
  """

  params: tuple[ParamCoverage, ...]
  unmatched: tuple[str, ...] = ()
  activation_bytes: int = 0
  output_bytes: int = 0

  @property
  def preconditioned(self) -> list[str]:
    """Paths of leaves that get a local Fisher."""
    return [p.path for p in self.params if p.layer is not None and
            not p.fisher.startswith((PASS_THROUGH, MISSING))]

  @property
  def pass_through(self) -> list[str]:
    """Paths of leaves that reach the next transform unchanged."""
    return [p.path for p in self.params if p.fisher.startswith(PASS_THROUGH)]

  @property
  def missing(self) -> list[str]:
    """Paths of leaves of layers with no captured calls (``update`` raises)."""
    return [p.path for p in self.params if p.fisher.startswith(MISSING)]

  @property
  def total_factor_bytes(self) -> int:
    """The optimizer-state bytes of every layer's factor and inverse together."""
    return sum(p.factor_bytes for p in self.params)

  def __str__(self) -> str:
    head = ("parameter", "shape", "local Fisher", "inverse", "state bytes")
    rows = [(p.path, "x".join(map(str, p.shape)) or "()", p.fisher, p.inverse,
             f"{p.factor_bytes:,}" if p.factor_bytes else "") for p in self.params]
    rows.append(("total", "", "", "", f"{self.total_factor_bytes:,}"))
    # a long description (a MISSING reason with its fix) continues on lines of its own
    wrapped = []
    for r in rows:
      first, *more = textwrap.wrap(r[2], DESCRIPTION_WIDTH, break_on_hyphens=False) or [""]
      wrapped += [(r[0], r[1], first, r[3], r[4])] + [("", "", m, "", "") for m in more]
    rows = wrapped
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(5)]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
    lines.append(f"captured activations per batch: {self.activation_bytes:,} bytes "
                 f"(of which layer outputs {self.output_bytes:,}, read by fisher='rfim' only)")
    if self.unmatched:
      lines.append("captured but matching no params (frozen, or another transform's: update "
                   f"ignores them): {list(self.unmatched)}")
    return "\n".join(lines)


def _describe(spec: layers_lib.LayerSpec, kinds: set[str]) -> str:
  source = "+".join(sorted(kinds))
  if spec.structure == "diagonal":
    name = "diagonal"
  elif spec.structure == "per_channel":
    name = "per-channel" + ("/rfim" if spec.fisher == "rfim" else "")
  else:
    name = spec.fisher
  return f"{name}/{source} " + "x".join(map(str, spec.factor_shape))


def _rows_of_one_layer(call):
  """The rows of one layer's call (the first layer of a stack)."""
  first = (0,) * call.stack
  return factors_lib.ROWS[call.kind](
      jax.tree.map(lambda a: a[first], call.replace(stack=0)))


def _mismatch(spec: layers_lib.LayerSpec, calls) -> Optional[str]:
  """Why ``update`` would reject these calls for this layer, or None."""
  if any(c.kind == "embed" and c.config == factors_lib.TRANSPOSED_USE for c in calls):
    return (f"also read transposed by a Linear (`eqx.nn.Shared` whose `get` transposes the "
            f"table): its local Fisher is neither diag(f) nor 'tied'; tie the Linear "
            f"untransposed (an output layer `Linear(features, vocabulary)`) with "
            f"fisher={{{(spec.source or spec.path)!r}: 'tied'}}, hold the param in the "
            f"Linear (`where` on the table, `get` transposing the Linear's weight: one dense "
            f"layer), or pass fisher={{{(spec.source or spec.path)!r}: None}}")
  if factors_lib.untied_output_use(spec, calls):
    return (f"also the output layer (`attend`, tied weights); pass "
            f"fisher={{{spec.path!r}: 'tied'}} (or None)")
  try:
    calls = factors_lib.layer_calls(spec, calls)
    factors_lib.check_stack(spec, calls)
  except ValueError as e:
    return str(e).split(": ", 2)[-1]
  if spec.fisher == "rfim" and any(c.outputs is None for c in calls):
    return ("fisher='rfim' weighs rows by the layer's outputs, which were not captured: "
            "pass outputs=True (here and to the capture)")
  n_layers = math.prod(stack_shape(calls[0]))
  for call in calls:
    if call.kind not in factors_lib.STRUCTURE_KINDS[spec.structure]:
      return f"{call.kind} calls for a {spec.structure} layer"
  rows = [None if c.kind == "embed" else jax.eval_shape(_rows_of_one_layer, c) for c in calls]
  widths = [r[0].shape[-1] for r in rows if r is not None]
  for call, row in zip(calls, rows, strict=True):
    if row is None:
      continue
    x, z = row
    out_dim = spec.out_dim // n_layers if spec.structure == "per_channel" else spec.out_dim
    want_in = out_dim if spec.structure == "per_channel" else spec.in_dim
    if x.shape[-1] != want_in or (z is not None and z.shape[-1] != out_dim):
      hint = (factors_lib.other_layer_hint(spec, widths) if spec.structure == "dense" else "") \
          or factors_lib.input_axes_hint(spec, call)
      return (f"calls give {x.shape[-1]} input / {'?' if z is None else z.shape[-1]} output "
              f"features, params {spec.in_dim} / {spec.out_dim}{hint}")
  return None


def _without(fisher: layers_lib.FisherSpec, excluded: set[str]) -> layers_lib.FisherSpec:
  """``fisher`` with the layers at ``excluded`` given None (left unpreconditioned)."""
  if not excluded:
    return fisher
  if isinstance(fisher, str):
    return lambda path: None if path in excluded else fisher
  if isinstance(fisher, Mapping):
    return {**fisher, **{path: None for path in excluded}}
  return lambda path: None if path in excluded else fisher(path)


def _nbytes(tree: Any) -> int:
  return sum(math.prod(a.shape) * jax.numpy.dtype(a.dtype).itemsize
             for a in jax.tree.leaves(tree))


def report(params: Any, activations: dict, fisher: layers_lib.FisherSpec = "linear",
           inverse: Any = "auto", stacked: layers_lib.StackSpec = None) -> CoverageReport:
  """Builds the report from params and (possibly abstract) captured activations.

  Args:
    params: the params tree given to ``tx.init``.
    activations: what ``sngd_jax.capture`` returned (arrays or shapes).
    fisher: the ``fisher`` argument of ``sngd_jax.sngd``.
    inverse: its ``inverse`` argument (the state's size depends on it).
    stacked: its ``stacked`` argument.

  Returns:
    A ``CoverageReport``.

  Note: a kernel without bias is split as inputs = all axes but the last; for
  one with several output axes (bias-free attention projections) the report
  says ``MISSING`` and gives the ``fisher={path: (kind, n_input_axes)}`` fix.
  """
  unmodelled: dict[str, layers_lib.UnmodelledLayer] = {}
  all_layers = layers_lib.discover(params, "linear", stacked, errors=unmodelled)
  # not modelled, and not left out by the user (fisher=None: a pass-through like any other)
  missing = {p: e for p, e in unmodelled.items()
             if layers_lib.resolve_fisher(fisher, p) is not None}
  fisher = _without(fisher, set(missing))
  specs = layers_lib.discover(params, fisher, stacked)
  with warnings.catch_warnings():  # params without a layer: this report is what init's
    # warning points to (every leaf a pass-through), so that warning is not given again here
    warnings.filterwarnings("ignore", message=validation.NO_LAYERS)
    state = jax.eval_shape(sngd(fisher=fisher, inverse=inverse, stacked=stacked).init, params)
  method = _method_of(state.config)
  owner: dict[tuple[str, ...], str] = {}
  columns: dict[tuple[str, ...], list[layers_lib.LayerSpec]] = {}  # kernel -> its column layers
  for spec in all_layers.values():
    owner[spec.kernel] = spec.path
    if spec.bias is not None:
      owner[spec.bias] = spec.path
    if spec.columns is not None:
      columns.setdefault(spec.kernel, []).append(spec)
  for path, error in unmodelled.items():
    owner.update({leaf: path for leaf in error.leaves})

  def row(parts: tuple[str, ...], layer: Optional[str], name: str,
          shape: tuple[int, ...]) -> ParamCoverage:
    size, how = 0, ""
    if layer is None:
      desc = PASS_THROUGH
    elif layer in missing:
      desc = f"{MISSING}: {missing[layer].reason}; {missing[layer].fix}"
    elif layer not in specs:
      desc = f"{PASS_THROUGH} (fisher=None)"
    elif not activations.get(layer):
      desc = (f"{MISSING}: no calls captured (not called in the captured function, or a "
              f"layout sngd does not record: ConvLocal, DenseGeneral(batch_dims=...), "
              f"ConvTranspose(transpose_kernel=True or CIRCULAR), a Conv with mask=, "
              f"an Einsum of another layout; a hand-written layer: compute it with "
              f"`sngd_jax.dense(x, kernel, bias)`); "
              f"pass fisher={{{layer!r}: None}}")
      spec = specs[layer]
      if note := layers_lib.raw_param_note(layer, spec.kernel, spec.structure):
        desc = f"{desc}. {note}"
      if note := layers_lib.stacked_kernel_note(layer, spec.structure, spec.stack):
        desc = f"{desc}. {note}"
    elif (why := _mismatch(specs[layer], activations[layer]) or (
        specs[layer].tied
        and _mismatch(specs[layers_lib.tied_path(layer)], activations[layer]))):
      desc = f"{MISSING}: {why}"
    else:
      spec = specs[layer]
      desc = _describe(spec, {c.kind for c in factors_lib.layer_calls(spec, activations[layer])})
      if parts == spec.kernel:
        size = nbytes(state.factors[layer]) + nbytes(state.inverses[layer])
        how = "diagonal" if spec.structure == "diagonal" else describe(method, spec.dim).name
        if spec.tied:  # the table is also the output layer: both local Fishers
          head = specs[layers_lib.tied_path(layer)]
          desc = f"tied: {desc} + " + _describe(head, {"attend"})
          size += nbytes(state.factors[head.path]) + nbytes(state.inverses[head.path])
          how = f"{how} + {describe(method, head.dim).name}"
      else:
        desc = f"(with {paths.join(spec.kernel)})"
    return ParamCoverage(name, shape, layer, desc, size, how)

  out = []
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = paths.leaf_parts(key_path)
    if parts in columns and owner.get(parts) not in missing:
      # a kernel whose columns are layers of their own (`LayerSpec.columns`): a row each
      for spec in columns[parts]:
        lo, hi = spec.columns or (0, 0)
        out.append(row(parts, spec.path, f"{paths.join(parts)}[..., {lo}:{hi}]",
                       tuple(leaf.shape[:-1]) + (hi - lo,)))
      continue
    out.append(row(parts, owner.get(parts), paths.join(parts), tuple(leaf.shape)))
  unmatched = tuple(sorted(set(activations) - set(all_layers)))
  outputs = [c.outputs for calls in activations.values() for c in calls]
  return CoverageReport(tuple(out), unmatched, _nbytes(activations), _nbytes(outputs))


def _trace_as_trained(trace: Callable[[bool], Any]) -> Any:
  """``trace(True)``: the activations as the training step sees them, the loss traced under
  ``jax.vjp`` w.r.t. the params (JAX then runs a user ``custom_vjp``'s ``fwd``, or a
  ``custom_jvp``'s rule, in the enclosing trace, where its layer calls are captured). A loss
  that cannot be differentiated (reverse mode through a ``while_loop``, say) is traced as it
  is evaluated, ``trace(False)`` (which raises the loss's own error, if any). sngd's warnings
  are given once, by the trace that is kept."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    try:
      acts = trace(True)
    except Exception:  # noqa: BLE001 - the loss is traced again as evaluated, below
      acts = None
  if acts is None:
    return trace(False)
  for w in caught:
    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
  return acts


COVERAGE_CALL = {
    "linen": "sngd_jax.coverage(lambda params, x: model.apply({'params': params}, x), "
             "params, x)",
    "nnx": "sngd_jax.coverage(lambda model, x: model(x), model, x)",
    "equinox": "sngd_jax.coverage(lambda model, x: jax.vmap(model)(x), model, x)",
    "haiku": "sngd_jax.coverage(lambda params, x: model.apply(params, x), params, x)",
}
"""The call of ``coverage`` to write for each model kind (the loss's value is not read)."""


def _check_loss_fn(loss_fn: Any, params_or_model: Any) -> None:
  """Raises a ``TypeError`` with the call to write when ``loss_fn`` is a model or not callable."""
  kind = model_kind(loss_fn)
  if kind is None and callable(loss_fn):
    return
  what = (f"the {LABEL[kind]} model `{type(loss_fn).__name__}`" if kind is not None
          else f"a `{type(loss_fn).__name__}` (not callable)")
  kind = kind or model_kind(params_or_model) or "linen"
  first = "params" if kind == "linen" else "model"
  raise TypeError(
      f"sngd: `coverage` takes the loss function first, `coverage(loss_fn, {first}, *batch)` "
      f"with `loss_fn({first}, *batch)` applying the model (its value is not read); it got "
      f"{what} in place of `loss_fn`. For {A_LABEL[kind]} model write "
      f"`{COVERAGE_CALL[kind]}`.")


def coverage(loss_fn: Callable[..., Any], params_or_model: Any, *args: Any,
             fisher: layers_lib.FisherSpec = "linear", inverse: Any = "auto",
             stacked: layers_lib.StackSpec = None, outputs: bool = False,
             **kwargs: Any) -> CoverageReport:
  """Lists every parameter with the local Fisher it gets and its factor memory.

  Traces ``loss_fn`` with abstract values (``jax.eval_shape``: no FLOPs,
  and an NNX model's state, e.g. batch statistics, is not changed), differentiated
  with respect to the params (``jax.vjp``) as in a training step, so layers inside a
  user's ``jax.custom_vjp`` or ``custom_jvp`` are seen as the step sees them; a
  loss that cannot be differentiated is traced as evaluated.

  Examples:
    ```python
    print(sngd_jax.coverage(loss_fn, params, x, y))        # linen or Haiku params
    print(sngd_jax.coverage(loss_fn, model, x, y))         # NNX or Equinox model
    ```

  Args:
    loss_fn: ``loss_fn(params, *args)`` applying linen modules or a Haiku model, or
      ``loss_fn(model, *args)`` for an NNX or Equinox model (what it returns
      is not read: a loss with ``aux`` needs no ``has_aux``).
    params_or_model: the params tree given to ``tx.init``, an ``nnx.Module``
      (its ``nnx.Param`` state is reported), or an Equinox model (its
      floating-point arrays are reported).
    *args: a batch, as passed to ``loss_fn``.
    fisher: the ``fisher`` argument of ``sngd_jax.sngd``.
    inverse: its ``inverse`` argument (for the state bytes).
    stacked: its ``stacked`` argument.
    outputs: the ``outputs`` argument of the capture (for the activation bytes).
    **kwargs: keyword arguments for ``loss_fn``.

  Returns:
    A ``CoverageReport``; ``print`` it for a table.

  Raises:
    TypeError: when ``loss_fn`` is a model (``coverage(model, params, x)``: a linen
      Module cannot be called unbound) or not callable (arguments swapped), saying the call
      to write.
  """
  _check_loss_fn(loss_fn, params_or_model)
  eqx = sys.modules.get("equinox")

  def no_output(*a):  # the report reads the activations only: the loss's value is dropped
    loss_fn(*a, **kwargs)
    return jnp.zeros(()), None

  # Per model kind: `run(params, *other, *args)`, the captured loss of the trained leaves
  # `params` (`other`: the model's other state, passed as traced values), and the
  # `eval_shape` to trace it with.
  other: tuple = ()
  eval_shape: Callable[..., Any] = jax.eval_shape
  if isinstance(params_or_model, nnx.Module):
    graphdef, params, rest = nnx.split(params_or_model, nnx.Param, ...)
    other = (rest,)

    def run_nnx(params, rest, *args):
      return capture_nnx(no_output, has_aux=True, outputs=outputs)(
          nnx.merge(graphdef, params, rest), *args)
    run = run_nnx
  elif eqx is not None and any(isinstance(n, eqx.Module) for n in jax.tree.leaves(
      params_or_model, is_leaf=lambda n: isinstance(n, eqx.Module))):
    params, static = eqx.partition(params_or_model, eqx.is_inexact_array)
    eval_shape = eqx.filter_eval_shape

    def run_eqx(params, *args):
      return capture_eqx(no_output, has_aux=True, outputs=outputs)(
          eqx.combine(params, static), *args)
    run = run_eqx
  else:
    params = params_or_model
    if paths.holds_flat_map(params):
      raise TypeError(f"sngd: coverage: {paths.FLAT_MAP_FIX}.")
    # Haiku params (read with Haiku's names, or holding Haiku layers whose names a
    # linen-named leaf keeps unread: capture_hk warns naming it) are captured by capture_hk
    capture_fn = capture_hk if layers_lib.haiku_model(params) else capture
    run = capture_fn(no_output, has_aux=True, outputs=outputs)

  def trace(grad: bool):
    def activations(p, *rest):  # differentiated w.r.t. `p` only, as in a training step
      if grad:
        return jax.vjp(lambda w: run(w, *rest), p, has_aux=True)[2][1]
      return run(p, *rest)[1][1]
    return eval_shape(activations, params, *other, *args)

  acts = _trace_as_trained(trace)
  return report(params, acts, fisher, inverse, stacked)
