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

**Hand-written layers.** ``sngd_jax.dense(x, kernel, bias)`` inside a module's method
records the call as that module's ``Dense`` (``_custom_dense``): the interceptor keeps the
stack of module calls in progress, and the kernel and bias must be that module's params
``kernel`` and ``bias`` (found by identity), or their casts to another dtype
(``custom.cast_of``).

**The linen <-> NNX bridge.** An ``nnx.bridge.ToLinen`` call runs with the layers of its NNX
module recorded by ``nnx``'s wrappers (``nnx.to_linen_call``, imported here as any other
function); the linen module of an ``nnx.bridge.ToNNX`` inside an NNX model runs under this
module's interceptor (``_to_nnx_call``, which ``capture_nnx`` passes to ``nnx._wrappers``).

The result is a dict from layer path (``'Block_0/Dense_1'``, the same string
that names the layer's params) to a tuple of ``sngd_jax.Captured``
records.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
from flax import nnx
from flax.nnx import bridge

from sngd_jax._src import paths
from sngd_jax._src.capture import custom, flax_patches, tables, transforms
from sngd_jax._src.capture import nnx as nnx_record
from sngd_jax._src.capture.records import (
  Argnums,
  Recorder,
  StepRecords,
  check_captured_function,
  check_no_trained_left_out,
  check_not_other_models,
  derivation_of,
  differentiated_leaves,
  model_path,
  normalized_argnums,
  rnn_batched,
  rnn_step_order,
  rnn_time_axis,
  shown,
  split_aux,
  split_models,
  trained_with,
  untag,
  vmapped_by_caller,
  warn_decoding,
)
from sngd_jax._src.frames import caller_stacklevel


def _weight(module: nn.Module) -> Any:
  """The array ``module`` reads as its weight (to follow it through transforms), or None."""
  params = module.variables.get("params", {})
  leaves = jax.tree.leaves(params.get(tables.weight_name(module)))
  return leaves[0] if leaves else None


def _note_weight(rec: Recorder, seen: dict[str, dict[int, tuple[Any, str]]], path: str,
                 weight: Any, origin: str) -> None:
  """Keeps the weight a call outside every transform read, and its ``origin``, by layer path.

  Calls of one layer that read different arrays (a teacher or EMA copy of the model, the
  model applied to other params) are pooled like shared-weight calls, with a warning, unless
  the copy's weights are constants of the differentiation (``records.without_copies``).
  """
  if weight is not None and not rec.frames:
    seen.setdefault(path, {})[id(weight)] = (weight, origin)


def _add(rec: Recorder, seen: dict[str, dict[int, tuple[Any, str]]], path: str,
         weight: Any, *recorded: Any) -> None:
  """Records a call of layer ``path`` whose weight is ``weight`` (``Recorder.add``), with the
  weight's origin (``Recorder.origin``), and notes the weight (``_note_weight``)."""
  origin = rec.origin(weight)
  # (a custom rule's read of a param's primal is that param's call: `Recorder.origin`)
  _note_weight(rec, seen, path, rec.argument_leaf(weight) if origin == "derived" else weight,
               origin)
  rec.add(path, *recorded, weight=weight, origin=origin)


# When a copy's calls are told apart from the model's (`Recorder.origin`), and when not.
_DERIVED_PARAMS = (
    "under a differentiation of the captured function (`jax.grad`/`jax.value_and_grad` of "
    "it), the calls of a layer whose weights no gradient of its arguments reaches (a frozen "
    "teacher, an EMA or target copy, closed over or passed into the jitted step; "
    "`jax.lax.stop_gradient(teacher_params)`, a cast of them) are left out when the layer is "
    "also called with the trained params, without a warning. Here they could not be told "
    "apart: the captured function ran without a differentiation (eagerly, or under `jax.jit` "
    "or `jax.eval_shape` alone), or the copy's params are computed from the trained params "
    "without `jax.lax.stop_gradient`, or inside a transform made in the loss (a `scan` or "
    "`checkpoint` body). Stop the gradient of the other model's output "
    "(`jax.lax.stop_gradient(model.apply({'params': teacher_params}, x))`), or pass its "
    "params as another argument.")


def _warn_other_weights(seen: dict[str, dict[int, tuple[Any, str]]]) -> None:
  pooled: list[tuple[str, int]] = []  # layers called with several weight arrays of one shape
  for path, noted in sorted(seen.items()):
    origins = {origin for _, origin in noted.values()}
    # a copy whose weights are constants of the differentiation is left out, not pooled
    # (`records.without_copies`)
    weights = [w for w, origin in noted.values()
               if not ("derived" in origins and origin == "constant")]
    if len(weights) < 2:
      continue
    shapes = sorted({tuple(getattr(w, "shape", ())) for w in weights})
    if len(shapes) > 1:
      # No copy of one model: layers of two models that have the same path (each `apply`
      # names its layers from its own root).
      warnings.warn(
          f"sngd: layer {shown(path)} was called with weights of different shapes "
          f"({', '.join(map(str, shapes))}) inside the captured function: these are layers of "
          "two different models that have the same path (linen names a layer by its path in "
          "the module passed to `apply`, so a GAN's generator and discriminator, or a frozen "
          "pretrained backbone and the trained head run by their own `apply`, both have a "
          "'Dense_0'). The inputs of all their calls are pooled into one local Fisher, which "
          "is neither layer's (or `update` refuses features of the wrong size). Pass the "
          "other model's params to the captured function as another argument "
          "(`loss(params, other_params, x)`: capture leaves out the calls of a later "
          "argument's weights, applied as they are), give the layers distinct names (`name=`), "
          "or make both "
          "models submodules of one parent "
          "module (freeze a pretrained part with `optax.multi_transform` and "
          "`optax.set_to_zero()`), or apply a frozen module outside the captured function "
          "and pass its outputs in.",
          stacklevel=caller_stacklevel())
      continue
    pooled.append((path, len(weights)))
  if not pooled:
    return
  # One warning for all the layers of one copy (an EMA or teacher copy calls every layer).
  counts = {n for _, n in pooled}
  named = ", ".join(shown(path) if len(counts) == 1 else f"{shown(path)} ({n})"
                    for path, n in pooled)
  warnings.warn(
      f"sngd: layer{'s' if len(pooled) > 1 else ''} {named} "
      f"{'were' if len(pooled) > 1 else 'was'} called with "
      f"{counts.pop() if len(counts) == 1 else 'several'} different weight arrays "
      "inside the captured function (a teacher or EMA copy of the model, the model "
      "applied to other params, or another model whose layers have the same paths); the "
      "inputs of all the calls of a layer are pooled into its local Fisher, as for shared "
      "weights. To count only the trained model's calls, pass the other copy's params to the "
      "captured function as another argument (`loss(params, target_params, x)`: capture leaves out "
      "the calls of a later argument's weights), or apply it outside the captured function "
      f"and pass its outputs in. Note: {_DERIVED_PARAMS}",
      stacklevel=caller_stacklevel())


def _has_layer_weights(tree: Any) -> bool:
  """Whether ``tree`` has a leaf named ``kernel``, ``embedding`` or ``scale`` (layer params)."""
  names = {"kernel", *tables.WEIGHT_NAMES.values()}
  return any(paths.leaf_parts(key_path)[-1:] in {(name,) for name in names}
             for key_path, _ in jax.tree_util.tree_flatten_with_path(tree)[0])


@dataclasses.dataclass
class _Models:
  """Which argument of the captured function each layer call's params come from.

  Attributes:
    owners: ``id(leaf) -> m`` for the array leaves of the ``m``-th model of ``argnums``; empty
      for one model (the default ``argnums=0``), whose records keep their plain paths.
    others: ``id`` of each array leaf of the other arguments (a DQN's target network, a
      teacher, the critic an actor's loss runs through, a frozen backbone): their calls are
      left out.
    trained: ``id(leaf) -> position`` of the leaves of other arguments differentiated
      together with the models (``records.trained_with``): leaving their calls out is an
      error (``left_out``: position -> a layer path).
    unowned: in several models' capture, layer calls whose params are no argument's leaves
      (computed in the loss or closed over): left out, with a warning.
  """

  owners: dict[int, int] = dataclasses.field(default_factory=dict)
  others: frozenset[int] = frozenset()
  trained: dict[int, int] = dataclasses.field(default_factory=dict)
  left_out: dict[int, str] = dataclasses.field(default_factory=dict)
  unowned: dict[str, None] = dataclasses.field(default_factory=dict)

  @classmethod
  def of(cls, args: tuple, kwargs: dict, positions: tuple[int, ...], several: bool) -> _Models:
    """The routing for ``fn(*args, **kwargs)`` whose models are ``args[k]``, ``k`` in
    ``positions`` (``several``: a tuple ``argnums``, one activations per model).

    With one model at position 0, no other argument is left out when the first holds no layer
    weight: the params passed later (``loss(x, params)`` differentiated with ``argnums=1``)
    are the model's, as before ``argnums``.
    """
    if not args and not several and positions == (0,):
      return cls()  # all by keyword: nothing is left out, as before `argnums`
    if any(k >= len(args) for k in positions):
      raise ValueError(
          f"sngd: `capture(fn, argnums={positions if several else positions[0]})`: `fn` was "
          f"called with {len(args)} positional argument(s); the models must be passed "
          "positionally.")
    models = tuple(args[k] for k in positions)
    if not several and positions == (0,) and not _has_layer_weights(models):
      return cls()
    owners = {id(leaf): m for m, model in enumerate(models) for leaf in jax.tree.leaves(model)}
    rest = (tuple(a for k, a in enumerate(args) if k not in positions), kwargs)
    others = frozenset(id(leaf) for leaf in jax.tree.leaves(rest)) - frozenset(owners)
    trained = trained_with(jax.tree.leaves(models),
                           ((k, leaf) for k, arg in enumerate(args) if k not in positions
                            for leaf in jax.tree.leaves(arg)))
    return cls(owners if several else {}, others, trained)

  def route(self, rec: Recorder, module: nn.Module) -> tuple[bool, Optional[int]]:
    """``(recorded, m)`` for a call of ``module``: whether it is recorded, and the number of
    its model (None for one model), its params followed out through the transforms it runs
    in (a slice of stacked params under ``nn.scan`` is the stack's)."""
    leaves = [rec.outer(leaf) for leaf in jax.tree.leaves(module.variables.get("params", {}))]
    for leaf in leaves:
      if id(leaf) in self.owners:
        return True, self.owners[id(leaf)]
    # (in a discarded trace, whose params are not followed out, nothing is recorded anyway)
    noted = not rec.discarding()
    if any(id(leaf) in self.others for leaf in leaves):
      for leaf in leaves:
        if id(leaf) in self.trained and noted:
          self.left_out.setdefault(self.trained[id(leaf)], paths.join(module.path))
      return False, None
    if self.owners and leaves:
      # (a copy no gradient reaches, a teacher the loss closes over, is left out silently)
      if noted and rec.origin(_weight(module)) != "constant":
        self.unowned[paths.join(module.path)] = None
      return False, None
    return True, None

  def warn_unowned(self) -> None:
    if self.unowned:
      warnings.warn(
          f"sngd: capture(fn, argnums=...) left out {len(self.unowned)} layer call(s) "
          f"({', '.join(map(repr, self.unowned))}) whose params are leaves of none of `fn`'s "
          "arguments (params computed inside the loss, or a model the loss closes over), so "
          "they cannot be given to one model; `update` reports their layers as not captured. "
          "Pass each model's params to `fn` as they are and apply them there.",
          stacklevel=caller_stacklevel())


def _rnn_call(rec: Recorder, module: nn.RNN, next_fun, args, kwargs, keep: bool = True):
  """Runs an ``nn.RNN`` and unpacks the records its cells returned through the scan (kept
  unless ``keep`` is False)."""
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
  if keep:
    rec.add_all(found)
  return out


def _cell_call(rec: Recorder, next_fun, args, kwargs):
  """Runs a cell inside an RNN's scan; its records leave the scan with its output."""
  with rec.cell() as frame:
    carry, y = next_fun(*args, **kwargs)
  return (carry, StepRecords(y, frame.records)) if frame.records else (carry, y)


def _norm_call(rec: Recorder, seen, module, next_fun, args, kwargs, keep: bool = True,
               model: Optional[int] = None, prefix: tuple[str, ...] = ()):
  """Runs a normalization layer and records ``xhat`` (from the patched routine) unless
  ``keep`` is False (under the ``model``-th model's paths, ``model_path``, after
  ``prefix``)."""
  with rec.norm() as slot:
    out = next_fun(*args, **kwargs)
  if slot and module.use_scale and keep:
    xhat, feature_axes = slot[0]
    xhat, z, config = tables.norm_record(xhat, out, feature_axes)
    path, weight = model_path(model, paths.join(prefix + module.path)), _weight(module)
    _add(rec, seen, path, weight, xhat, z, "norm", config)
  return out


def _name_in(rec: Recorder, params: Any, array: Any) -> Optional[str]:
  """The name of the param of a module that is ``array`` itself, or None.

  Followed out through the transforms made inside the module (``Recorder.outer``): a
  ``jax.checkpoint`` / ``jax.vmap`` / ``jax.lax.scan`` whose body is passed the param as an
  argument (``jax.checkpoint(lambda x, w, b: sngd_jax.dense(x, w, b))(x, w, b)``) hands the
  body its own tracer, which is the param it was passed.
  """
  for name, value in params.items():
    if value is array:
      return name
  if rec.frames:
    target = rec.outer(array)
    for name, value in params.items():
      if rec.outer(value) is target:
        return name
  return None


@dataclasses.dataclass
class _Calls:
  """The module method calls in progress, as the interceptor sees them.

  Attributes:
    modules: the module of each intercepted call in progress, innermost last: the
      module a ``sngd_jax.dense`` call belongs to is the last.
    open_calls: ``(module id, method) -> one flag per open call of a recorded layer``,
      "a call inside it recorded".
    decoding: the paths of attention layers called with ``decode=True`` (cached
      autoregressive decoding), in call order.
  """

  modules: list[nn.Module] = dataclasses.field(default_factory=list)
  open_calls: dict[tuple[int, str], list[bool]] = dataclasses.field(default_factory=dict)
  decoding: dict[str, None] = dataclasses.field(default_factory=dict)



def _custom_dense(rec: Recorder, seen: dict[str, dict[int, tuple[Any, str]]], calls: _Calls,
                  models: _Models, x, y, kernel, bias, layout: str) -> None:
  """Records a ``sngd_jax.dense`` call as the linen module running it (its ``Dense``).

  Inside a recorded layer's own call (a subclass of ``nn.Dense`` whose ``__call__`` uses
  ``sngd_jax.dense``), this record is the call's: the interceptor then records nothing more
  (``calls.open_calls``, as for ``super().__call__``). A module whose params are another
  argument's is left out, as the interceptor leaves it out (``models``).
  """
  module = calls.modules[-1] if calls.modules else None
  if module is None:
    raise ValueError(
        "sngd_jax.dense was called inside `sngd_jax.capture` but outside the methods of a "
        "linen module, so it cannot be named: call it in the `__call__` (or another method) "
        "of the module whose params are its kernel and bias")
  recorded, model = models.route(rec, module)
  if not recorded:  # a target network, a teacher: left out
    return
  path = paths.join(module.path)
  params = module.variables.get("params", {})
  kernel_name = _name_in(rec, params, kernel)
  own = custom.FLAX_DENSE
  if kernel_name is None and custom.cast_of(kernel, params.get(own.weight)):
    kernel_name, kernel = own.weight, params[own.weight]  # kernel.astype(...): the param
  bias_name = None if bias is None else _name_in(rec, params, bias)
  if (bias is not None and bias_name is None and own.bias is not None
      and custom.cast_of(bias, params.get(own.bias))):
    bias_name = own.bias
  if kernel_name is None or (bias is not None and bias_name is None):
    what = "kernel" if kernel_name is None else "bias"
    raise ValueError(
        f"sngd_jax.dense: the {what} passed by module {path!r} is not one of its params (a "
        "transposed or sliced copy, an array computed from params, or another module's "
        "param; a copy cast to another dtype, of the param's shape, is read as the param), "
        "so capture cannot tell which layer it is: pass the arrays that `self.param(...)` "
        "returned (cast or not), from the module that holds them")
  custom.check(path, "linen", custom.FLAX_DENSE, kernel_name, bias_name, layout)
  x, y = tables.one_example(x, y, 0)
  path = model_path(model, path)
  _add(rec, seen, path, kernel, x, y, "dense", ())
  flags = calls.open_calls.get((id(module), "__call__"))
  if flags:
    flags[-1] = True


def _interceptor(rec: Recorder, seen: dict[str, dict[int, tuple[Any, str]]], calls: _Calls,
                 models: _Models, prefix: tuple[str, ...] = ()):
  """The ``nn.intercept_methods`` hook that records supported layer calls.

  A call whose params are leaves of another argument of the captured function (a target
  network, a teacher) runs unrecorded; with several models, each call is recorded under its
  model's paths (``models``).

  A subclass of a recorded layer whose ``__call__`` (or ``attend``) calls the base
  class's through ``super()`` (``super().__call__(f(x))``) is intercepted twice on the
  same module, the outer call with its own arguments: only the innermost call that
  records is kept (its arguments are what the kernel multiplies), as ``capture_nnx``
  records the base class's ``__call__`` only.

  ``calls``: the calls in progress, shared with ``_custom_dense``. ``prefix``: path parts put
  before each layer's linen path (``capture_nnx``'s path of an ``nnx.bridge.ToNNX`` whose
  linen module runs).
  """
  open_calls = calls.open_calls

  def intercept(next_fun, args, kwargs, context):
    calls.modules.append(context.module)
    try:
      return dispatch(next_fun, args, kwargs, context)
    finally:
      calls.modules.pop()

  def dispatch(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    if (method == "__call__" and isinstance(module, nn.MultiHeadDotProductAttention)
        and module.decode):
      calls.decoding.setdefault(paths.join(prefix + module.path), None)
    if method == "__call__" and isinstance(module, nn.RNN) and args:
      return _rnn_call(rec, module, next_fun, args, kwargs, keep=models.route(rec, module)[0])
    if method == "__call__" and isinstance(module, nn.RNNCellBase) and rec.rnn_frame():
      return _cell_call(rec, next_fun, args, kwargs)
    if (method == "__call__" and isinstance(module, bridge.ToLinen)
        and not module.is_initializing()):
      keep, model = models.route(rec, module)
      if not keep:
        return next_fun(*args, **kwargs)
      path = model_path(model, paths.join(prefix + module.path))
      return nnx_record.to_linen_call(rec, path, module.variables.get("params", {}), next_fun,
                                      args, kwargs, _to_nnx_call)
    if method == "__call__" and isinstance(module, tables.NORMS):
      keep, model = models.route(rec, module)
      return _norm_call(rec, seen, module, next_fun, args, kwargs, keep, model, prefix)
    attend = method == "attend" and isinstance(module, nn.Embed)
    recorder = tables.lookup(module) if method == "__call__" else None
    if not args or not (attend or recorder is not None):
      return next_fun(*args, **kwargs)
    keep, model = models.route(rec, module)
    if not keep:
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
      path, weight = model_path(model, paths.join(prefix + module.path)), _weight(module)
      _add(rec, seen, path, weight, *recorded)
      if flags:
        flags[-1] = True
    return out

  return intercept


def _to_nnx_call(rec: nnx_record._NNXRecorder):
  """Wraps ``nnx.bridge.ToNNX.__call__`` so that the linen layers of the linen module it runs
  are recorded as ``capture`` records them (``_interceptor``), each at the path of its
  params in the NNX model: the ``ToNNX``'s path, then the linen path (``'backbone/Dense_0'``;
  ``ToNNX`` keeps the linen variables under those names). Passed to ``nnx._wrappers`` by
  ``capture_nnx`` and by ``nnx.to_linen_call`` (an NNX module run by a ToLinen may hold a
  ToNNX): ``nnx`` does not import this module, which imports it."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      prefix = _to_nnx_prefix(rec, self)
      if prefix is None:  # another argument's (a target network): left out
        return original(self, *args, **kwargs)
      calls = _Calls()
      interceptor = _interceptor(rec, {}, calls, _Models(), prefix)
      nnx_dense = rec.custom_dense

      def dense(*dense_args):  # named by its kernel's path in the model, as in NNX; inside
        assert nnx_dense is not None  # a recorded layer's own call it is that call's record
        nnx_dense(*dense_args)
        flags = calls.open_calls.get((id(calls.modules[-1]), "__call__")) if calls.modules \
            else None
        if flags:
          flags[-1] = True

      rec.custom_dense = dense
      try:
        with flax_patches.linen_normalize(rec), nn.intercept_methods(interceptor):
          out = original(self, *args, **kwargs)
      finally:
        rec.custom_dense = nnx_dense
      rec.decoding.update(calls.decoding)
      return out
    return call
  return wrap


def _to_nnx_prefix(rec: nnx_record._NNXRecorder, module: Any) -> Optional[tuple[str, ...]]:
  """The path parts of an ``nnx.bridge.ToNNX`` in the model: its graph path, or for a copy
  made by a transform, the path its Variables are followed out to; None when it is none of
  the model's (noted as unnamed unless it is another argument's)."""
  path = rec.path_of(module)
  if path is not None:
    return tuple(path.split("/")) if path else ()
  for local, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Variable):
      parts = rec.trace(transforms.variable_value(node))[1]
      if parts is not None and len(parts) >= len(local):
        return tuple(parts[:len(parts) - len(local)])
      if id(rec.outer(transforms.variable_value(node))) in rec.others:
        return None
  if id(module) not in rec.others:
    rec.unnamed[f"nnx.bridge.ToNNX ({type(module.to_nnx__module).__name__})"] = None
  return None


def capture(fn: Callable[..., Any], *, has_aux: bool = False, outputs: bool = False,
            argnums: Argnums = 0) -> Callable[..., Any]:
  """Wraps a function that applies Flax linen modules so it also returns activations.

  Examples:
    ```python
    loss_and_acts = sngd_jax.capture(loss_fn)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    ```

    Two models, two optimizers (a GAN's ``loss(g_params, d_params, z, x)``):

    ```python
    loss_and_acts = sngd_jax.capture(loss, argnums=(0, 1))
    (loss, (acts_g, acts_d)), (grads_g, grads_d) = jax.value_and_grad(
        loss_and_acts, argnums=(0, 1), has_aux=True)(g_params, d_params, z, x)
    ```

  Args:
    fn: any function; every call of a supported layer made inside it (through
      ``module.apply``) is recorded, including every time step of cells run by
      ``nn.RNN``, except the calls whose params are leaves of an argument after
      the first (another model passed to the loss: a DQN's target network, a
      teacher, the critic an actor's loss runs through) when the first argument
      holds layer weights (a leaf named ``kernel``, ``embedding`` or ``scale``).
      Those are left out, as ``capture_nnx`` and ``capture_eqx`` leave out a model
      passed as another argument. Calls with other weights that ``fn`` closes over (a
      teacher, an EMA or target copy) are left out too where the wrapped function is
      differentiated and the layer is also called with the trained params: no gradient of
      ``fn``'s arguments reaches those weights (``Recorder.origin``). Where that cannot be
      told (no differentiation), they are pooled into the layer's factor, with a warning.
      A left-out argument that is
      differentiated together with the model (one ``jax.grad(..., argnums=(0, 1))``, a
      second trained model) is an error that names it: pass ``argnums``.
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
    argnums: the position of the model's params among ``fn``'s arguments (0), or a tuple
      of positions of several models trained by one loss with one optimizer each (a GAN's
      generator and discriminator, an actor and a critic, differentiated with
      ``jax.grad(..., argnums=(0, 1))``). With a tuple, the wrapped function returns one
      activations per model, in that order, each keyed by that model's own layer paths:
      ``(value, (acts_0, acts_1))`` (``(value, (aux, (acts_0, acts_1)))`` with
      ``has_aux``); pass each optimizer its own. A call is the model's whose params it
      reads; calls with params of no listed argument are left out (with a warning when they
      are no argument's leaves).

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``.

  Raises:
    TypeError: when ``fn`` is a model (a linen Module, which cannot be called unbound; an NNX
      or Equinox model) or not callable, saying what to write.
    ValueError: when the wrapped function is called with an argument left out that is
      differentiated together with the recorded model(s), naming it and ``argnums``.
  """
  check_captured_function(fn, "capture")
  positions = normalized_argnums(argnums, "capture")
  several = isinstance(argnums, tuple)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    rec = Recorder(outputs=outputs)
    rec.params = differentiated_leaves((args, kwargs))  # the params, whatever their position
    rec.derivation = derivation_of((args, kwargs))
    seen: dict[str, dict[int, tuple[Any, str]]] = {}
    rec.data = transforms.data_leaves(
        (tuple(a for k, a in enumerate(args) if k not in positions), kwargs), rec.params)
    calls = _Calls()
    models = _Models.of(args, kwargs, positions, several)
    rec.custom_dense = functools.partial(_custom_dense, rec, seen, calls, models)
    with (transforms.recording(rec), flax_patches.linen_normalize(rec),
          nn.intercept_methods(_interceptor(rec, seen, calls, models))):
      result = fn(*args, **kwargs)
    check_no_trained_left_out(models.left_out, fn, "capture", positions)
    _warn_other_weights(seen)
    models.warn_unowned()
    value, aux = split_aux(result, has_aux, "capture")
    acts = vmapped_by_caller(rec.freeze(), (args, kwargs))
    warn_decoding(calls.decoding, acts)
    if not acts:
      check_not_other_models(args)
    if several:
      acts = split_models(acts, len(positions))
    return (value, (aux, acts)) if has_aux else (value, acts)

  return wrapped
