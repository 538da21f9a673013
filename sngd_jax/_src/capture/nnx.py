"""Activation capture for Flax NNX modules: the recording of their layer calls.

NNX modules are plain Python objects with no interceptor hook, so capture swaps
the ``__call__`` of the recorded layer classes for a recording wrapper
(``_wrappers``) while the wrapped function runs, and restores it after, also on
error (``flax_patches``). Layers are named by their path in the model graph
(``'layers/0'``), which is the path of their params in ``nnx.state(model)``;
one ``nnx.iter_graph`` walk of each argument (``_walk``) gives the paths.

Recorded: the NNX classes of ``tables.LAYERS`` and ``tables.NORMS``,
``Embed.attend``, and the ``Linear`` layers inside ``LSTMCell``,
``OptimizedLSTMCell``, ``GRUCell`` and ``SimpleCell``; the base layer of an
``nnx.LoRALinear`` or ``nnx.LoRA`` is recorded with the whole layer's output
(adapters included). As in linen capture,
records made inside a cell run by ``nnx.RNN`` (under ``nnx.scan``) leave the
scan as extra outputs stacked over time, so every time step is recorded; the
layers inside the scan are copies of the model's, so they are named through the
cell's own graph.

Two captures use these wrappers: ``capture_nnx`` (``nnx_capture``), for an NNX model, and
``capture`` (``linen``) for the NNX module an ``nnx.bridge.ToLinen`` runs inside a linen model
(``to_linen_call``, which ``linen`` imports), its layers named by their weights, the
ToLinen's params. The linen layers of the linen module that an ``nnx.bridge.ToNNX`` runs are
recorded by ``linen``'s interceptor (``linen._to_nnx_call``, which both captures pass to
``_wrappers``: this module does not import ``linen``, which imports it), at the ToNNX's path
then their linen path.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import Any, Callable, Optional

import jax
from flax import nnx
from flax.nnx import bridge

from sngd_jax._src import paths
from sngd_jax._src.capture import custom, flax_patches, tables, transforms
from sngd_jax._src.capture.records import (
  Recorder,
  StepRecords,
  leaf_paths,
  rnn_batched,
  rnn_step_order,
  rnn_time_axis,
  untag,
)
from sngd_jax._src.frames import caller_stacklevel

# A wrapper factory: ``wrapper(rec)`` maps a method to its recording version (the
# ``nnx.bridge.ToNNX`` one is ``linen._to_nnx_call``).
Wrapper = Callable[[Any], Callable[..., Any]]

_NAMED = flax_patches.NNX_LAYER_CLASSES + tuple(
    c for c in tables.NORMS if issubclass(c, nnx.Module)) + (nnx.RNN, bridge.ToNNX)


@dataclasses.dataclass
class _Graph:
  """What capture reads from one walk of an NNX graph (``nnx.iter_graph``), ids by object.

  Attributes:
    layers: ``id(layer) -> path`` of every recorded layer (and RNN, and ToNNX).
    variables: ``id(array) -> path parts`` of the array of every Variable.
    bare: ``id(array) -> path parts`` of every array no Variable holds: the params as a pure
      dict (``nnx.to_pure_dict``) that the loss merges into the model,
      ``nnx.merge(graphdef, params)``, which keeps the arrays (layers are named by them).
    arrays: the array of every Variable, in graph order.
    cells: the classes of the cells of the ``nnx.RNN``s.
    hand_written: the classes defining the ``__call__`` of the modules that hold a ``kernel``
      Variable and are no recorded layer: those that may compute it with ``sngd_jax.dense``
      (an ordered set).
  """

  layers: dict[int, str] = dataclasses.field(default_factory=dict)
  variables: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  bare: dict[int, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  arrays: list[Any] = dataclasses.field(default_factory=list)
  cells: dict[type, None] = dataclasses.field(default_factory=dict)
  hand_written: dict[type, None] = dataclasses.field(default_factory=dict)


def _walk(root: Any, prefix: tuple[str, ...] = ()) -> _Graph:
  """Everything capture reads from ``root``'s graph (``_Graph``), from one ``nnx.iter_graph``
  walk, the paths under ``prefix``."""
  graph = _Graph()
  for path, node in nnx.iter_graph(root):
    if isinstance(node, nnx.Variable):
      array = transforms.variable_value(node)
      graph.variables[id(array)] = prefix + tuple(str(p) for p in path)
      graph.arrays.append(array)
    elif isinstance(node, jax.Array):
      graph.bare[id(node)] = prefix + tuple(str(p) for p in path)
    elif isinstance(node, _NAMED):
      graph.layers[id(node)] = paths.join(prefix + tuple(str(p) for p in path))
      if isinstance(node, nnx.RNN):
        graph.cells[type(node.cell)] = None
    elif (isinstance(node, nnx.Module)
          and isinstance(getattr(node, custom.FLAX_DENSE.weight, None), nnx.Variable)):
      owner = next((c for c in type(node).__mro__ if "__call__" in c.__dict__), None)
      if owner is not None and owner is not object:
        graph.hand_written[owner] = None
  return graph


def _weight(module: Any) -> Any:
  """The array ``module`` reads as its weight (to follow it through transforms), or None."""
  variable = getattr(module, tables.weight_name(module), None)
  return None if variable is None else transforms.variable_value(variable)


class _NNXRecorder(Recorder):
  """Names layers by object id, by per-cell-call maps for the copies inside an RNN's scan,
  or by their weight (the copies made by ``nnx.scan``, ``nnx.vmap``, ``nnx.remat``)."""

  def __init__(self, owner_paths: dict[int, str], top: dict[int, tuple[str, ...]],
               outputs: bool = False, others: frozenset[int] = frozenset(),
               trained: Optional[dict[int, int]] = None,
               other_paths: Optional[dict[int, str]] = None,
               bare: Optional[dict[int, tuple[str, ...]]] = None):
    # `top`: the model's Variables, by which it is found; `bare`: its arrays held by no
    # Variable (params passed as a pure dict), which name the layers that merge them too
    super().__init__({**(bare or {}), **top}, outputs)
    self.has_model = bool(owner_paths or top)
    self.owner_paths = owner_paths
    # ids of the layers, and of their arrays, of the captured function's other arguments (a
    # DQN's target network, a teacher, a critic the actor's loss runs through): not trained
    # by the optimizer of the model, left out without a warning
    self.others = others
    # id(array) -> position of the other arguments' arrays differentiated together with the
    # model(s) (`records.trained_with`): leaving their layers out is an error (`left_out`:
    # position -> a layer)
    self.trained = trained or {}
    self.other_paths = other_paths or {}  # id(layer) -> its path in its own argument
    self.left_out: dict[int, str] = {}
    self.local_paths: list[dict[int, str]] = []
    self.unnamed: dict[str, None] = {}  # layer calls that could not be named (ordered set)
    # id(base layer) -> its calls inside a LoRA call, recorded by the LoRA wrapper (`_lora_call`)
    self.held: dict[int, list[tuple[tuple, dict, Any]]] = {}
    # the hand-written modules (a `kernel` Variable) whose `__call__` is running, innermost
    # last: a `sngd_jax.dense` given a cast of its kernel is that module's layer
    self.modules: list[Any] = []
    # the paths of the attention layers called with decode=True (`records.warn_decoding`)
    self.decoding: dict[str, None] = {}

  def path_of(self, module: Any):
    for local in reversed(self.local_paths):
      if id(module) in local:
        return local[id(module)]
    return self.owner_paths.get(id(module))

  def locate(self, module: Any) -> tuple[Any, tuple[str, ...]]:
    """``(path or None, roles)`` of a layer call about to be recorded."""
    weight = _weight(module)
    roles, parts = self.trace(weight)
    path = self.path_of(module)
    if path is None and parts is not None:
      path = paths.join(parts[:-1])
    if path is None and self.discarding():  # a trace thrown away (`jax.eval_shape`)
      return path, roles
    if path is None:
      self.note_left_out(weight, self.other_paths.get(
          id(module), f"{type(module).__name__} (weight {getattr(weight, 'shape', None)})"))
    if (path is None and id(module) not in self.others
        and id(self.outer(weight)) not in self.others and self.origin(weight) != "constant"):
      self.unnamed[f"{type(module).__name__} (weight {getattr(weight, 'shape', None)})"] = None
    return path, roles

  def _own(self, name: Optional[str], passed: Any) -> Any:
    """The array of the Variable ``name`` of the innermost hand-written module whose
    ``__call__`` is running, if ``passed`` is it cast to another dtype; else None."""
    if not self.modules or name is None:
      return None
    variable = getattr(self.modules[-1], name, None)
    if not isinstance(variable, nnx.Variable):
      return None
    array = transforms.variable_value(variable)
    return array if custom.cast_of(passed, array) else None

  def note_left_out(self, weight: Any, layer: str) -> None:
    """Notes a left-out call of ``layer`` whose weight is differentiated together with the
    model(s)."""
    position = self.trained.get(id(self.outer(weight)))
    if position is not None:
      self.left_out.setdefault(position, layer)

  def record_dense(self, x, y, kernel, bias, layout: str) -> None:
    """Records a ``sngd_jax.dense`` call as the layer whose Variables its kernel and bias
    are (its path in the model, followed out through the transforms)."""
    roles, parts = self.trace(kernel)
    array = transforms.variable_value(kernel) if isinstance(kernel, nnx.Variable) else kernel
    if parts is None and id(self.outer(array)) in self.others:
      self.note_left_out(array, f"sngd_jax.dense (kernel {getattr(array, 'shape', None)})")
      return  # another argument's layer (a target network, a teacher): left out
    if parts is None:  # kernel.astype(...): the kernel of the module whose call runs
      own = self._own(custom.FLAX_DENSE.weight, kernel)
      if own is not None:
        roles, parts = self.trace(own)
    if parts is None:
      if self.origin(array) != "constant":  # a copy no gradient reaches (a teacher): left out
        self.unnamed[f"sngd_jax.dense (kernel {getattr(kernel, 'shape', None)})"] = None
      return
    path = paths.join(parts[:-1])
    bias_name = custom.bias_name(
        self.trace, bias, lambda: self._own(custom.FLAX_DENSE.bias, bias), parts, path,
        f"a Variable of the module that holds the kernel {paths.join(parts)!r} (a computed "
        "array, another module's, or a cast made outside that module's `__call__`): pass that "
        "module's own `nnx.Param`s, or their casts (`self.bias[...].astype(jnp.bfloat16)`)")
    custom.check(path, "NNX", custom.FLAX_DENSE, parts[-1], bias_name, layout)
    x, y = tables.one_example(x, y, 0)
    self.add(path, x, y, "dense", (), roles=roles)

  def freeze(self):
    """The activations; warns about layer calls that could not be named (not captured)."""
    # no model found, or params passed as a pure dict (`bare`) that named none of the layers
    if self.unnamed and not self.has_model and not self.store:
      warnings.warn(
          f"sngd: capture_nnx could not name {len(self.unnamed)} layer call(s) "
          f"({', '.join(self.unnamed)}): it names layers by their path in the captured "
          "function's first argument, the model, and that argument holds no layer it "
          "records. Pass the model first: `loss_fn(model, x, y)` with "
          "`nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x, y)` "
          "(differentiating a later argument, `argnums=1`, does not tell capture where the "
          "model is). `update` reports the layers as not captured.",
          stacklevel=caller_stacklevel())
    elif self.unnamed:
      _warn_unnamed(self.unnamed, "capture_nnx")
    return super().freeze()


def _warn_unnamed(unnamed: dict[str, None], capture: str, where: str = "") -> None:
  """Warns that the layer calls ``unnamed`` (made ``where``) were not captured, and why."""
  warnings.warn(
      f"sngd: {capture} could not name {len(unnamed)} layer call(s) "
      f"({', '.join(unnamed)}){where}: their module is a copy whose weight is not one of "
      "the model's, as inside a transform made before capture started (`nnx.remat` or "
      "`nnx.vmap` applied as a decorator at class definition: apply it inside the "
      "captured function), an `nnx.jit_partial` inside the captured function (jit the "
      "whole training step instead; an `nnx.jit` there runs inline while capturing), a "
      "layer made inside the "
      "loss, a `sngd_jax.dense` given an array computed from a param (a transposed or "
      "sliced copy, or a cast made outside the `__call__` of the module holding the "
      "`kernel`: pass the `nnx.Param` or its cast there), or another "
      "model the loss closes over (a target network, a teacher: differentiate the captured "
      "function, `nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)`, or pass "
      "it to the loss as an argument, `loss_fn(model, target, x)`, and its calls are left out "
      "without this warning). They are not captured, and `update` reports their layers as not "
      "captured (docs/layer-coverage.md, *Not captured*); pass `fisher={path: None}` for "
      "those layers to leave them to the next transform.", stacklevel=caller_stacklevel())


def _record(rec: _NNXRecorder, recorder: tables.LayerRecorder, module, args, kwargs, out):
  """Records one call of ``module`` (its inputs ``args``/``kwargs``, its output ``out``)."""
  path, roles = rec.locate(module)
  if path is not None:
    recorded = recorder(module, args, kwargs, out)
    if recorded is not None:
      rec.add(path, *recorded, roles=roles)


def _layer_call(rec: _NNXRecorder, recorder: tables.LayerRecorder):
  """Wraps a layer's ``__call__`` to record it with ``recorder``."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      out = original(self, *args, **kwargs)
      if id(self) in rec.held:  # the base of a LoRA call: recorded with the LoRA's output
        rec.held[id(self)].append((args, kwargs, out))
      else:
        _record(rec, recorder, self, args, kwargs, out)
      return out
    return call
  return wrap


def _lora_call(rec: _NNXRecorder):
  """Wraps ``nnx.LoRALinear.__call__`` / ``nnx.LoRA.__call__`` so that the base layer's call is
  recorded with the output of the whole layer, ``x W + b + x A B``: the unit's pre-activation,
  which ``fisher="rfim"`` weighs rows by (the base ``Linear`` returns ``x W + b`` only)."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, x, *args, **kwargs):
      base = self if isinstance(self, nnx.LoRALinear) else self.base_module
      recorder = None if base is None else tables.lookup(base)
      if recorder is None or id(base) in rec.held:
        return original(self, x, *args, **kwargs)
      rec.held[id(base)] = held = []
      try:
        out = original(self, x, *args, **kwargs)
      finally:
        del rec.held[id(base)]
      for base_args, base_kwargs, base_out in held:
        whole = out if getattr(out, "shape", None) == getattr(base_out, "shape", ()) else base_out
        _record(rec, recorder, base, base_args, base_kwargs, whole)
      return out
    return call
  return wrap


def _attend(rec: _NNXRecorder):
  """Wraps ``Embed.attend`` (tied output weights) to record its queries."""
  def wrap(original):
    @functools.wraps(original)
    def attend(self, query, *args, **kwargs):
      out = original(self, query, *args, **kwargs)
      path, roles = rec.locate(self)
      if path is not None:
        rec.add(path, query, out, "embed", ("attend",), roles=roles)
      return out
    return attend
  return wrap


def _norm_call(rec: _NNXRecorder):
  """Wraps a normalization layer's ``__call__`` to record ``xhat``."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, x, *args, **kwargs):
      with rec.norm() as slot:
        out = original(self, x, *args, **kwargs)
      path, roles = rec.locate(self)
      if path is not None and slot and self.use_scale:
        xhat, feature_axes = slot[0]
        xhat, z, config = tables.norm_record(xhat, out, feature_axes)
        rec.add(path, xhat, z, "norm", config, roles=roles)
      return out
    return call
  return wrap


def _rnn_call(rec: _NNXRecorder):
  """Wraps ``nnx.RNN.__call__`` to unpack the records its cells return through the scan."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, inputs, *args, **kwargs):
      path = rec.path_of(self)
      with rec.rnn(None if path is None else paths.join([p for p in (path, "cell") if p])):
        out = original(self, inputs, *args, **kwargs)
      time_major = kwargs.get("time_major")
      time_major = self.time_major if time_major is None else time_major
      reverse = kwargs.get("reverse")
      reverse = self.reverse if reverse is None else reverse
      keep_order = kwargs.get("keep_order")
      keep_order = self.keep_order if keep_order is None else keep_order
      out, found = untag(out, rnn_time_axis(inputs, time_major, self.cell),
                         rnn_batched(inputs, self.cell),
                         rnn_step_order(inputs, self.cell, time_major, reverse, keep_order,
                                        kwargs.get("seq_lengths")))
      rec.add_all(found)
      return out
    return call
  return wrap


def _cell_call(rec: _NNXRecorder):
  """Wraps a cell's ``__call__``: inside an RNN, names its layer copies and returns records."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, carry, inputs, *args, **kwargs):
      frame = rec.rnn_frame()
      if frame is None or frame.cell_prefix is None:
        return original(self, carry, inputs, *args, **kwargs)
      rec.local_paths.append(_walk(self, tuple(frame.cell_prefix.split("/"))).layers)
      try:
        with rec.cell() as cell:
          carry, y = original(self, carry, inputs, *args, **kwargs)
      finally:
        rec.local_paths.pop()
      return (carry, StepRecords(y, cell.records)) if cell.records else (carry, y)
    return call
  return wrap


def _module_call(rec: _NNXRecorder):
  """Wraps a hand-written module's ``__call__`` to keep the stack of those running."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      rec.modules.append(self)
      try:
        return original(self, *args, **kwargs)
      finally:
        rec.modules.pop()
    return call
  return wrap


def _attention_call(rec: _NNXRecorder):
  """Wraps ``nnx.MultiHeadAttention.__call__`` to note a call with ``decode=True`` (cached
  autoregressive decoding: the argument, else the attribute), for ``records.warn_decoding``."""
  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      decode = kwargs.get("decode")
      if decode is None:
        decode = getattr(self, "decode", None)
      query = getattr(self, "query", None) if decode else None
      if query is not None:  # named by its query projection's path, the recorded layer
        layer = rec.path_of(query)
        if layer is None:
          parts = rec.trace(_weight(query))[1]
          layer = paths.join(parts[:-1]) if parts else None
        if layer and "/" in layer:
          rec.decoding.setdefault(layer.rpartition("/")[0], None)
      return original(self, *args, **kwargs)
    return call
  return wrap


def to_linen_call(rec: Recorder, path: str, params: Any, next_fun: Callable[..., Any],
                  args: tuple, kwargs: dict, to_nnx: Wrapper) -> Any:
  """Runs an ``nnx.bridge.ToLinen`` call inside ``capture`` (linen) with the layers of the NNX
  module it builds recorded into ``rec``: each is named by its weight, one of the ToLinen's
  params (``ToLinen`` puts the linen variables into the module's Variables as they are), at
  ``path`` (the ToLinen's) then the layer's path in the NNX module (``'ToLinen_0/layers/0'``,
  the path of its params in the linen params). Inside ``capture_nnx`` (a linen module run by
  an ``nnx.bridge.ToNNX`` holds the ToLinen) ``rec`` is the NNX capture's, whose wrappers
  already record these layers by their weights, the model's Variables: recording them here
  too would record each call twice. ``to_nnx`` records an ``nnx.bridge.ToNNX`` inside the NNX
  module (``linen._to_nnx_call``, passed by ``linen``)."""
  if isinstance(rec, _NNXRecorder):
    return next_fun(*args, **kwargs)
  # the params' leaves followed out through the transforms the ToLinen runs in (the slices
  # of an ``nn.scan`` over depth are the stack's), as ``trace`` follows a layer's weight
  tops = leaf_paths(params, tuple(path.split("/")) if path else ())
  sub = _NNXRecorder({}, {id(rec.outer(leaf)): tops[id(leaf)]
                          for leaf in jax.tree.leaves(params) if id(leaf) in tops})
  sub.record_into(rec)
  sub.custom_dense, linen_dense = sub.record_dense, rec.custom_dense
  rec.custom_dense = sub.record_dense
  try:
    with (flax_patches.nnx_normalize(sub),
          flax_patches.nnx_methods(_wrappers(sub, tables.NNX_CELLS, to_nnx))):
      out = next_fun(*args, **kwargs)
  finally:
    rec.custom_dense = linen_dense
  if sub.unnamed:
    _warn_unnamed(sub.unnamed, "capture", f" in the nnx.bridge.ToLinen at {path!r}")
  return out



def _wrappers(rec: _NNXRecorder, cells: tuple[type, ...], to_nnx: Wrapper,
              hand_written: tuple[type, ...] = ()) -> dict:
  """The ``(class, method) -> wrapper`` that record the NNX layers into ``rec`` while they
  are swapped in (``flax_patches.nnx_methods``): the layers', the cells' in ``cells``, the
  hand-written modules' of ``hand_written``, and ``to_nnx(rec)`` for ``nnx.bridge.ToNNX``
  (``linen._to_nnx_call``: it runs linen's interceptor, which this module cannot import)."""
  wrappers: dict[tuple[type, str], Callable[..., Any]] = {
      (cls, "__call__"): _layer_call(rec, tables.LAYERS[cls])
      for cls in flax_patches.NNX_LAYER_CLASSES}
  wrappers[(nnx.Embed, "attend")] = _attend(rec)
  for cls in (nnx.LoRA, nnx.LoRALinear):
    wrappers[(cls, "__call__")] = _lora_call(rec)
  for cls in tables.NORMS:
    if issubclass(cls, nnx.Module):
      wrappers[(cls, "__call__")] = _norm_call(rec)
  wrappers[(nnx.RNN, "__call__")] = _rnn_call(rec)
  wrappers[(nnx.MultiHeadAttention, "__call__")] = _attention_call(rec)
  wrappers[(bridge.ToNNX, "__call__")] = to_nnx(rec)
  for cls in cells:
    if "__call__" in cls.__dict__:
      wrappers[(cls, "__call__")] = _cell_call(rec)
  for cls in hand_written:
    wrappers.setdefault((cls, "__call__"), _module_call(rec))
  return wrappers
