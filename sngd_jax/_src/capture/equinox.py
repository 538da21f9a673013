"""Activation capture for Equinox models.

Equinox layers are plain pytrees called per example (the batch comes from the
user's ``jax.vmap``), with no interceptor hook: ``capture_eqx`` swaps the
``__call__`` of the layer classes of ``recorders`` for a recording wrapper
while the wrapped function runs, and restores it after, also on error. The
records leave the user's ``jax.vmap``, ``jax.lax.scan`` and ``jax.checkpoint``
(and Equinox's ``filter_vmap``, ``filter_checkpoint``) as outputs of those
transforms (``transforms``): the batch and time axes become rows, a scan
or vmap over stacked layers gives one local Fisher per layer.

A layer is named by the path of its weight in the model, the first argument of
the captured function: ``'layers/0'`` for ``model.layers[0].weight``, and
``'<cell>/weight_ih'``, ``'<cell>/weight_hh'`` for the two dense layers of a
recurrent cell (as ``sngd_jax._src.equinox_layers`` names them). A call
whose weight is not a leaf of that argument (a layer built inside the loss, a
weight computed from params) cannot be named and is not recorded, so its layer
is reported as not captured; ``capture_eqx`` warns. A call whose weight is a leaf
of another argument (the frozen half of ``eqx.partition``, passed next to the
trained half as Equinox's examples do) is a frozen layer: it is left out without
a warning, as ``update`` never sees its parameters.

A weight tied by ``eqx.nn.Shared`` is the same array in both layers, so both layers' calls
are recorded under its path (pooled). Two uses it cannot model are named in a warning: a
weight that ``Shared``'s ``get`` computes (a transpose; its param is found from the jaxpr of
``get``), whose use is not recorded, and a call that adds another bias (or none) than the
bias of the weight's own layer, whose rows ``[x; 1]`` count that bias.

An ``eqx.nn.Embedding`` table tied to a ``Linear`` (whichever of the two holds the param) is
one table: the ``Linear``'s calls are recorded as its output-layer use (linen's ``attend``,
preconditioned with ``fisher="tied"``; ``_tables`` finds the weights ``Shared`` puts in an
``Embedding``). A table that a ``Linear`` reads transposed (``get`` computes ``E^T``) is
marked with an empty ``layer_spec.TRANSPOSED_USE`` record, on which ``update`` and
``coverage`` name the table and the fix: neither ``diag(f)`` nor ``"tied"`` models that use.
Held the other way (a ``Linear``'s weight ``W`` put transposed in an ``Embedding``), a lookup
of id ``v`` is recorded as that ``Linear``'s call on the one-hot ``e_v``: its dense local
Fisher pools both uses, exactly.

An ``eqx.nn.Embedding`` table read by the user's code outside its lookup
(``self.emb.weight @ h``, a tied output layer written by hand) has a second use that no call
records: its local Fisher ``diag(f)`` models the lookup only, and the rows of tokens absent
from the batch would be divided by the damping alone. ``Embedding.__getattribute__`` is
swapped while capturing to note such reads (``_TableReads``), and ``capture_eqx`` warns,
naming the table and the fixes.

A hand-written module whose class ``sngd_jax.dense_layer`` declared records its
``sngd_jax.dense`` calls as an ``eqx.nn.Linear`` call (``_custom_dense``), named by the
path of its declared weight.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
import warnings
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core

from sngd_jax._src import layer_spec, paths
from sngd_jax._src.capture import custom, swap, transforms
from sngd_jax._src.capture.records import (
    Argnums,
    OtherArgs,
    Recorder,
    check_captured_function,
    check_no_trained_left_out,
    derivation_of,
    leaf_paths,
    model_part,
    models_and_rest,
    normalized_argnums,
    split_aux,
    split_models,
    vmapped_by_caller,
)
from sngd_jax._src.frames import _is_library, caller_stacklevel

# A record of one call: (name suffix, weight, inputs, outputs, kind, config).
_COMPUTED = "<computed>"  # a call's bias that is an array computed in the loss, not a param
_Call = tuple[Optional[str], Any, Any, Any, str, tuple]


def _equinox() -> Any:
  """The ``equinox`` module (an optional dependency: ``pip install "sngd_jax[equinox]"``)."""
  try:
    return importlib.import_module("equinox")
  except ImportError as e:
    raise ImportError("sngd: capture_eqx needs Equinox: pip install \"sngd_jax[equinox]\"") from e


def _first(out: Any) -> Any:
  """A layer's output array (norm layers called with a state return ``(out, state)``)."""
  return out[0] if isinstance(out, tuple) else out


def _arg(args: tuple, kwargs: dict, i: int, name: str) -> Any:
  """Argument ``i`` of a layer call, passed by position or by its name ``name``."""
  return args[i] if len(args) > i else kwargs[name]


def _linear(module, args, kwargs, out) -> list[_Call]:
  x, z = _arg(args, kwargs, 0, "x"), out
  if module.in_features == "scalar":
    x = jnp.reshape(x, (1,))
  if module.out_features == "scalar":
    z = jnp.reshape(z, (1,))
  return [(None, module.weight, x, z, "dense", ())]


def _channels_last(a: jax.Array) -> jax.Array:
  return jnp.moveaxis(a, 0, -1)


def _conv(module, args, kwargs, out) -> list[_Call]:
  x = _arg(args, kwargs, 0, "x")
  r = module.num_spatial_dims
  if module.padding_mode != "ZEROS":
    x, padding = module._nonzero_pad(x), "VALID"
  else:
    padding = module.padding
  config = (tuple(module.kernel_size), tuple(module.stride), padding, (1,) * r,
            tuple(module.dilation), int(module.groups))
  return [(None, module.weight, _channels_last(x), _channels_last(out), "conv", config)]


def _conv_transpose(module, args, kwargs, out) -> list[_Call]:
  # A transposed convolution is the convolution of the stride-dilated input.
  x = _arg(args, kwargs, 0, "x")
  r = module.num_spatial_dims
  padding = module._padding_transpose()
  if module.padding_mode == "CIRCULAR":
    x, padding = module._circular_pad(x, padding)
  config = (tuple(module.kernel_size), (1,) * r, tuple(padding), tuple(module.stride),
            tuple(module.dilation), int(module.groups))
  return [(None, module.weight, _channels_last(x), _channels_last(out), "conv", config)]


def _embedding(module, args, kwargs, out) -> list[_Call]:
  return [(None, module.weight, _arg(args, kwargs, 0, "x"), out, "embed", ())]


def _norm(call: Callable) -> Callable:
  """Records ``xhat``: the layer's own output with unit weight and zero bias."""
  def recorder(module, args, kwargs, out) -> list[_Call]:
    eqx = _equinox()
    if module.weight is None:
      return []
    plain = eqx.tree_at(lambda m: m.weight, module, jnp.ones_like(module.weight))
    if getattr(module, "bias", None) is not None:
      plain = eqx.tree_at(lambda m: m.bias, plain, jnp.zeros_like(module.bias))
    xhat = _first(call(plain, *args, **kwargs))
    if isinstance(module, (eqx.nn.LayerNorm, eqx.nn.RMSNorm)):
      axes = tuple(range(xhat.ndim))  # normalized over the whole (per-example) shape
    else:
      axes = (0,)  # channels first
    return [(None, module.weight, xhat, _first(out), "norm", (axes,))]
  return recorder


def _cell(module, args, kwargs, out) -> list[_Call]:
  x, hidden = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "hidden")
  h = hidden[0] if isinstance(hidden, tuple) else hidden
  z_ih = module.weight_ih @ x
  if module.bias is not None:
    z_ih = z_ih + module.bias
  return [("weight_ih", module.weight_ih, x, z_ih, "dense", ()),
          ("weight_hh", module.weight_hh, h, module.weight_hh @ h, "dense", ())]


@functools.lru_cache(maxsize=None)
def recorders() -> dict[type, Any]:
  """Equinox layer class -> recorder ``(module, args, kwargs, out) -> calls`` (``'norm'``:
  recorded from ``xhat``)."""
  nn = _equinox().nn
  return {nn.Linear: _linear, nn.Conv: _conv, nn.ConvTranspose: _conv_transpose,
          nn.Embedding: _embedding, nn.LayerNorm: "norm", nn.RMSNorm: "norm",
          nn.GroupNorm: "norm", nn.BatchNorm: "norm", nn.LSTMCell: _cell, nn.GRUCell: _cell}


class _SharedUses:
  """The uses of a param by another layer (``eqx.nn.Shared``) that its local Fisher cannot
  model, noted while capturing to be named after it.

  Attributes:
    paths: the path parts of the model's array leaves.
    computed: ``id`` of an array that ``eqx.nn.Shared``'s ``get`` computed from a param (a
      transposed weight) -> (that array, the param's path parts).
    computed_uses: the path of a param whose computed copy a layer read -> that layer's class.
    transposed: ``id`` of the arrays of ``computed`` that are exactly their param's transpose.
    foreign_bias: the path of a layer with a bias whose weight a module with another bias
      (or none) read -> that module's bias path (None for none, ``_COMPUTED`` for a bias
      computed in the loss, not a param).
  """

  def __init__(self, paths_of_leaves: frozenset[tuple[str, ...]]):
    self.paths = paths_of_leaves
    self.computed: dict[int, tuple[Any, tuple[str, ...]]] = {}
    self.computed_uses: dict[tuple[str, ...], str] = {}
    self.transposed: set[int] = set()
    self.foreign_bias: dict[str, Optional[str]] = {}

  def note(self, rec: Recorder, shared: Any, out: Any) -> None:
    """Notes the arrays that ``shared.get`` computed (``out``: what ``shared()`` returned)
    with the param each one depends on, found from the jaxpr of ``get``."""
    eqx = _equinox()
    targets = [t for t in jax.tree.leaves(shared.where(out)) if eqx.is_array(t)]
    if all(rec.trace(t)[1] is not None for t in targets):
      return  # every tied array is a param itself: its calls are named by its path
    dynamic, static = eqx.partition(shared.pytree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dynamic)

    def get(*values):
      tied = shared.get(eqx.combine(jax.tree.unflatten(treedef, values), static))
      return [t for t in jax.tree.leaves(tied) if eqx.is_array(t)]

    jaxpr = jax.make_jaxpr(get)(*leaves).jaxpr
    deps: dict[Any, set[int]] = {v: {i} for i, v in enumerate(jaxpr.invars)}
    producer = {v: eqn for eqn in jaxpr.eqns for v in eqn.outvars}
    for eqn in jaxpr.eqns:
      d = set().union(*(deps.get(v, set()) for v in eqn.invars
                        if not isinstance(v, jex_core.Literal)))
      deps.update((v, d) for v in eqn.outvars)
    for target, var in zip(targets, jaxpr.outvars, strict=True):
      if rec.trace(target)[1] is not None or isinstance(var, jex_core.Literal):
        continue
      sources = [rec.trace(leaves[i])[1] for i in sorted(deps.get(var, ()))]
      sources = [parts for parts in sources if parts is not None]
      if sources:
        self.computed[id(target)] = (target, sources[0])
        eqn = producer.get(var)
        if (eqn is not None and eqn.primitive.name == "transpose"
            and tuple(eqn.params.get("permutation", ())) == (1, 0)
            and eqn.invars[0] in jaxpr.invars):
          self.transposed.add(id(target))  # exactly the param's transpose

  def source_of(self, rec: Recorder, weight: Any) -> Optional[tuple[str, ...]]:
    """The path parts of the param that ``weight`` was computed from by ``eqx.nn.Shared``."""
    for w in (weight, rec.outer(weight)):
      entry = self.computed.get(id(w))
      if entry is not None and entry[0] is w:
        return entry[1]
    return None

  def is_transpose(self, rec: Recorder, weight: Any) -> bool:
    """Whether ``weight`` is exactly the transpose of its param (``source_of``)."""
    return any(id(w) in self.transposed and self.computed[id(w)][0] is w
               for w in (weight, rec.outer(weight)) if id(w) in self.computed)

  def check_bias(self, rec: Recorder, path: str, bias_parts: tuple[str, ...],
                 bias: Any) -> None:
    """Notes a call of layer ``path`` (which has the bias ``bias_parts`` when that is a
    param) made by a module whose own bias ``bias`` is another array or None."""
    if bias_parts not in self.paths:
      return
    own = None if bias is None else rec.trace(bias)[1]
    if own != bias_parts:
      self.foreign_bias[path] = (None if bias is None else _COMPUTED if own is None
                                 else paths.join(own))

  def warn(self) -> None:
    for parts, user in self.computed_uses.items():
      param = paths.join(parts)
      layer = paths.join(parts[:-1] if parts[-1] == "weight" else parts)
      warnings.warn(
          f"sngd: capture_eqx: a {user} reads a copy of param {param!r} that the `get` of an "
          "`eqx.nn.Shared` computes (a transpose, a reshape): that use is not captured (its "
          "rows would index another axis of the weight than its own layer's). The local "
          f"Fisher of layer {layer!r} models its own calls only, while its gradient holds "
          f"both uses'. Pass `fisher={{{layer!r}: None}}` to leave the weight to the next "
          "transform, or untie the two layers (no `eqx.nn.Shared`) so that each has its own "
          "local Fisher.", stacklevel=caller_stacklevel())
    for path, other in self.foreign_bias.items():
      if other == _COMPUTED:
        warnings.warn(
            f"sngd: capture_eqx: layer {path!r} is called with a bias that is no param of the "
            f"model, but an array computed in the loss (a copy of the layer made by "
            f"`eqx.tree_at` with another bias, such as a function of '{path}/bias'): the "
            f"call's rows are pooled into the local Fisher of {path!r} as [x; 1], whose 1 "
            "stands for the bias the call used, while the update is applied to the param it "
            f"was computed from, so it is not SNGD's on '{path}/bias' (as for any "
            "reparametrized weight). Call the layer as it is in the model (change its bias "
            f"there), or pass `fisher={{{path!r}: None}}` to leave it to the next transform.",
            stacklevel=caller_stacklevel())
        continue
      what = "no bias" if other is None else f"its own bias {other!r}"
      warnings.warn(
          f"sngd: capture_eqx: the weight of layer {path!r} is also read by a module with "
          f"{what} (`eqx.nn.Shared` tying the weight alone): that call's rows are pooled into "
          f"the local Fisher of {path!r} as [x; 1], though its 1 stands for the bias "
          f"'{path}/bias', which has no part in that call. Tie the biases too "
          "(`where=lambda p: (p[1].weight, p[1].bias)`, "
          "`get=lambda p: (p[0].weight, p[0].bias)`), make the layer at "
          f"{path!r} bias-free (`use_bias=False`; the other bias then passes through), or "
          f"pass `fisher={{{path!r}: None}}`.", stacklevel=caller_stacklevel())


class _TableReads:
  """The ``eqx.nn.Embedding`` tables of the model that the user's code reads outside their
  lookup (``self.emb.weight @ h``: a tied output layer written by hand), noted while
  capturing by a swapped ``Embedding.__getattribute__``.

  A read counts when the frame that reads ``weight`` is not library code (Equinox's own
  lookup, its flattening, sngd's recorders) and runs outside ``eqx.nn.Shared.__call__``
  (whose ``get`` reads the table to tie it to a ``Linear``, a use that is recorded). A table
  that a ``Linear`` also reads through ``eqx.nn.Shared`` is not named: its output-layer use
  is recorded (``fisher="tied"``), and a read beside it is most likely Equinox's own check
  ``embedding.weight is linear.weight``.

  Attributes:
    read: the path parts of each table read outside its lookup.
    attended: the path parts of each table that a ``Linear`` read as its weight.
  """

  def __init__(self, rec: Recorder):
    self.rec = rec
    self.read: dict[tuple[str, ...], None] = {}
    self.attended: set[tuple[str, ...]] = set()

  def note(self, weight: Any, frame: Any) -> None:
    """Notes a read of the table ``weight`` by the code of ``frame``."""
    if weight is None or _is_library(frame.f_globals.get("__name__", "")):
      return
    shared_call = swap.unswapped(_equinox().nn.Shared, "__call__")
    shared_code = getattr(shared_call, "__code__", None)
    f = frame
    while f is not None:
      if f.f_code is shared_code or f.f_code is _SharedUses.note.__code__:
        return  # the `get` of an eqx.nn.Shared: the tie to a Linear, which is recorded
      f = f.f_back
    parts = self.rec.trace(weight)[1]
    if parts is not None:
      self.read[parts] = None

  def warn(self) -> None:
    tables = [paths.join(parts[:-1]) for parts in self.read if parts not in self.attended]
    if not tables:
      return
    names = ", ".join(repr(t) for t in tables)
    t = tables[0]
    warnings.warn(
        f"sngd: capture_eqx: the table of eqx.nn.Embedding {names} is read outside its "
        f"lookup (`{t.replace('/', '.') or 'model'}.weight`, as a tied output layer "
        "`emb.weight @ h`): that use is not captured. Its local Fisher `diag(f)` models the "
        "lookup only, while its gradient holds the other use's too: the rows of tokens "
        "absent from the batch (f = 0) get that gradient divided by the damping alone (or "
        "by what is left of the `prior`), far larger steps than the other rows'. Tie the "
        "table to a bias-free `eqx.nn.Linear` readout with `eqx.nn.Shared` "
        "(`where=lambda p: p[1].weight`, `get=lambda p: p[0].weight`) and pass `fisher={"
        + ", ".join(f"{k!r}: 'tied'" for k in tables)
        + "}`, which preconditions it as both layers; or pass `fisher={"
        + ", ".join(f"{k!r}: None" for k in tables)
        + "}` to leave it to the next transform. (A read that adds nothing to the loss, a "
        "`stop_gradient` or a logged norm, is harmless.)", stacklevel=caller_stacklevel())


@contextlib.contextmanager
def _table_reads(reads: _TableReads, tables: frozenset[int]) -> Iterator[None]:
  """Swaps ``eqx.nn.Embedding.__getattribute__`` (when the model holds a table: ``tables``,
  the ``id`` of each) for one that notes the reads of a table by the user's code
  (``_TableReads.note``), restoring it after."""
  cls = _equinox().nn.Embedding
  if not tables:
    yield
    return

  def make(original):
    def getattribute(self, name):
      out = original(self, name)
      if name == "weight":
        frame = sys._getframe(1)
        while frame is not None and frame.f_code is swap.DISPATCH_CODE:
          frame = frame.f_back
        if frame is not None:
          reads.note(out, frame)
      return out
    return getattribute

  with swap.swapped(cls, "__getattribute__", make):
    yield


@contextlib.contextmanager
def _shared_calls(rec: Recorder, models: Any, shared: _SharedUses) -> Iterator[None]:
  """Swaps ``eqx.nn.Shared.__call__`` (when ``models`` hold one) for one that notes the
  arrays its ``get`` computes (``_SharedUses.note``), restoring it after."""
  cls = _equinox().nn.Shared
  is_shared = lambda n: isinstance(n, cls)
  if not any(is_shared(n) for n in jax.tree.leaves(models, is_leaf=is_shared)):
    yield
    return

  def make(original):
    @functools.wraps(original)
    def call(self):
      out = original(self)
      shared.note(rec, self, out)
      return out
    return call

  with swap.swapped(cls, "__call__", make):
    yield


def _module_path(rec: Recorder, module: Any, weight: Any) -> Optional[str]:
  """The path of ``module`` in the model, from another array field of it that is a param (the
  bias of a layer whose weight ``eqx.nn.WeightNorm`` or ``SpectralNorm`` computes), or None."""
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(module)[0]:
    if leaf is weight or not isinstance(leaf, jax.Array):
      continue
    parts = rec.trace(leaf)[1]
    own = paths.leaf_parts(key_path)
    if parts is not None and parts[len(parts) - len(own):] == own:
      return paths.join(parts[:len(parts) - len(own)])
  return None


def _wrap(rec: Recorder, original: Callable, recorder: Any, unnamed: dict[str, None],
          tables: frozenset[int], frozen: OtherArgs, shared: _SharedUses,
          reads: _TableReads) -> Callable:
  if recorder == "norm":
    recorder = _norm(original)

  @functools.wraps(original)
  def call(self, *args, **kwargs):
    # A fresh copy of the arguments for the recorder: an Equinox State is used up by a call.
    fresh = jax.tree.map(lambda a: a, (args, kwargs))
    out = original(self, *args, **kwargs)
    for suffix, weight, x, z, kind, config in recorder(self, *fresh, out):
      roles, parts = rec.trace(weight)
      if parts is None:  # not a weight of the captured model: cannot be named
        if frozen.left_out_call(rec, weight, type(self).__name__):
          continue  # a leaf of another argument (eqx.partition's frozen half): not trained
        source = shared.source_of(rec, weight)
        if source is not None and kind == "dense" and source in tables_parts(rec, tables):
          # an Embedding's table read transposed by a Linear (`get` computes E^T): marked on
          # the table (no ids), so that update and coverage name it and the fix
          rec.add(paths.join(source[:-1]), jnp.zeros((0,), jnp.int32), None, "embed",
                  layer_spec.TRANSPOSED_USE, roles=roles, batch_axis=None)
          continue
        if (source is not None and kind == "embed" and getattr(weight, "ndim", 0) == 2
            and shared.is_transpose(rec, weight)):
          # an Embedding whose table is a Linear's weight W transposed: a lookup of id v is
          # that Linear's call on the one-hot e_v (W e_v), so its rows join the Linear's
          layer = paths.join(source[:-1])
          rec.add(layer, jax.nn.one_hot(x, weight.shape[0], dtype=weight.dtype), z, "dense",
                  (), roles=roles, batch_axis=None)
          shared.check_bias(rec, layer, source[:-1] + ("bias",), None)
          continue
        if source is not None:  # computed from a param by eqx.nn.Shared's `get`
          shared.computed_uses[source] = type(self).__name__
          continue
        where = _module_path(rec, self, weight)
        unnamed[f"{type(self).__name__}{'' if where is None else f' {where!r}'} (weight "
                f"{getattr(weight, 'shape', None)})"] = None
        continue
      if kind == "dense" and id(weight) in tables:
        # an Embedding's table read by a Linear (eqx.nn.Shared): the output layer h E^T,
        # recorded as linen's `attend` (fisher="tied" preconditions it; otherwise an error)
        kind, config = "embed", ("attend",)
        reads.attended.add(parts)
      path = paths.join(parts if suffix else parts[:-1])
      if kind in ("dense", "conv") and not suffix:
        shared.check_bias(rec, path, parts[:-1] + ("bias",), getattr(self, "bias", None))
      rec.add(path, x, z, kind, config, roles=roles, batch_axis=None)  # per example
    return out

  return call


def _declared(model: Any, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple[str, Any]]:
  """``weight path parts -> (class name, DenseDeclaration)`` of the modules of ``model``
  whose class ``sngd_jax.dense_layer`` declared."""
  eqx = _equinox()
  is_declared = lambda n: isinstance(n, eqx.Module) and layer_spec.declared(type(n)) is not None
  out = {}
  for key_path, node in jax.tree_util.tree_flatten_with_path(model, is_leaf=is_declared)[0]:
    if is_declared(node):
      decl = layer_spec.declared(type(node))
      assert decl is not None
      out[prefix + paths.leaf_parts(key_path) + (decl.weight,)] = (type(node).__name__, decl)
  return out


def _custom_dense(rec: Recorder, unnamed: dict[str, None], frozen: OtherArgs,
                  declared: dict[tuple[str, ...], tuple[str, Any]], calls: list[Any], x, y,
                  kernel, bias, layout: str) -> None:
  """Records a ``sngd_jax.dense`` call as the declared module whose weight is ``kernel``
  (named by the weight's path in the model, one example per call as ``eqx.nn.Linear``)."""
  roles, parts = rec.trace(kernel)
  running = calls[-1] if calls else None  # the declared module whose __call__ runs
  running_decl = None if running is None else layer_spec.declared(type(running))

  def own(field: Optional[str], passed: Any) -> Any:
    """The running module's field ``field`` if ``passed`` is it cast, else None."""
    value = getattr(running, field, None) if field else None
    return value if custom.cast_of(passed, value) else None

  if parts is None and running_decl is not None:
    weight = own(running_decl.weight, kernel)  # self.weight.astype(...): the field
    if weight is not None:
      roles, parts = rec.trace(weight)
  if parts is None:
    if not frozen.left_out_call(rec, kernel, "sngd_jax.dense"):
      unnamed[f"sngd_jax.dense (kernel {getattr(kernel, 'shape', None)})"] = None
    return
  path = paths.join(parts[:-1])
  if parts not in declared:
    raise ValueError(
        f"sngd_jax.dense: layer {path!r}: its weight {paths.join(parts)!r} is a field of a "
        "module whose class is not declared as a dense layer. Equinox layers are found by "
        "their type, so declare the class: `@sngd_jax.dense_layer` above it (a `weight` "
        "field stored (out, in) and a `bias`, as eqx.nn.Linear) or "
        "`@sngd_jax.dense_layer(weight=..., bias=..., layout=...)`")
  name, decl = declared[parts]
  bias_name = custom.bias_name(
      rec.trace, bias, lambda: None if running_decl is None else own(running_decl.bias, bias),
      parts, path,
      f"a field of the {name} that holds the weight {paths.join(parts)!r} (a computed array, "
      "another module's, or a cast made outside its `__call__`): pass its own field, or its "
      "cast")
  custom.check(path, name, decl, parts[-1], bias_name, layout)
  rec.add(path, x, y, "dense", (), roles=roles, batch_axis=None)  # per example


@contextlib.contextmanager
def _layer_calls(rec: Recorder, unnamed: dict[str, None], tables: frozenset[int],
                 frozen: OtherArgs, shared: _SharedUses, reads: _TableReads) -> Iterator[None]:
  """Swaps each recorded class's ``__call__`` for a recording one, restoring it after.

  ``unnamed`` collects the calls whose weight is not a leaf of the captured model, except
  those whose weight is a leaf of the captured function's other arguments (``frozen``: the
  frozen half of ``eqx.partition``), which are left out silently; ``tables`` holds the
  ``id`` of each ``Embedding`` table of the model.
  """
  with contextlib.ExitStack() as stack:
    for cls, recorder in recorders().items():
      stack.enter_context(swap.swapped(cls, "__call__", functools.partial(
          lambda original, recorder: _wrap(rec, original, recorder, unnamed, tables, frozen,
                                           shared, reads), recorder=recorder)))
    yield


@contextlib.contextmanager
def _declared_calls(model: Any, calls: list[Any]) -> Iterator[None]:
  """Keeps in ``calls`` the modules of a ``dense_layer``-declared class of ``model`` whose
  ``__call__`` is running (innermost last), by swapping the ``__call__`` of the classes that
  define it, restored after: a ``sngd_jax.dense`` given a cast of the weight
  (``self.weight.astype(jnp.bfloat16)``) is the running module's layer."""
  eqx = _equinox()
  is_declared = lambda n: isinstance(n, eqx.Module) and layer_spec.declared(type(n)) is not None
  owners = {}
  for node in jax.tree.leaves(model, is_leaf=is_declared):
    if is_declared(node):
      owner = next((c for c in type(node).__mro__ if "__call__" in c.__dict__), None)
      if owner is not None and owner not in recorders():
        owners[owner] = owner.__dict__["__call__"]

  def wrap(original):
    @functools.wraps(original)
    def call(self, *args, **kwargs):
      calls.append(self)
      try:
        return original(self, *args, **kwargs)
      finally:
        calls.pop()
    return call

  with contextlib.ExitStack() as stack:
    for cls in owners:
      stack.enter_context(swap.swapped(cls, "__call__", wrap))
    yield


def tables_parts(rec: Recorder, tables: frozenset[int]) -> set[tuple[str, ...]]:
  """The path parts of the ``eqx.nn.Embedding`` tables ``tables`` (their ``id``)."""
  return {parts for i, parts in rec.top.items() if i in tables}


def _tables(model: Any) -> frozenset[int]:
  """``id`` of the weight of each ``eqx.nn.Embedding`` in ``model``, and of each weight that
  an ``eqx.nn.Shared`` of ``model`` puts in an ``Embedding`` as its table (a ``Linear``'s:
  the tie written with ``where`` on the table), which a ``Linear`` call then reads as the
  table's output-layer use."""
  eqx = _equinox()
  embedding, shared = eqx.nn.Embedding, eqx.nn.Shared
  embeddings = lambda tree: [n for n in jax.tree.leaves(
      tree, is_leaf=lambda n: isinstance(n, embedding)) if isinstance(n, embedding)]
  out = {id(node.weight) for node in embeddings(model)}
  for node in jax.tree.leaves(model, is_leaf=lambda n: isinstance(n, shared)):
    if not isinstance(node, shared) or not embeddings(node.pytree):
      continue
    try:
      tied = node()
    except Exception:  # noqa: BLE001 - a `get` that needs a transform's context (stacked
      continue  # ties under a vmap): no tie is found, the calls are recorded as they are
    tied_leaves = set(map(id, jax.tree.leaves(node.pytree)))
    out.update(id(e.weight) for e in embeddings(tied) if id(e.weight) in tied_leaves)
  return frozenset(out)


def capture_eqx(fn: Callable[..., Any], *, has_aux: bool = False, outputs: bool = False,
                argnums: Argnums = 0) -> Callable[..., Any]:
  """Wraps ``fn(model, *args)`` so it also returns the activations of ``model``'s layers.

  Examples:
    ```python
    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    loss_and_acts = sngd_jax.capture_eqx(loss_fn)           # loss_fn(model, x, y)
    (loss, acts), grads = eqx.filter_value_and_grad(loss_and_acts, has_aux=True)(
        model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    model = eqx.apply_updates(model, updates)
    ```

  Layers
  called per example under the user's ``jax.vmap`` (the Equinox way), under
  ``jax.lax.scan`` (recurrent cells, stacked layers) or ``jax.checkpoint`` are
  recorded with every row.

  Two models, two optimizers (``loss_fn(generator, discriminator, z, x)``): differentiate
  the pair, as ``eqx.filter_value_and_grad`` differentiates its first argument only:

  ```python
  loss_and_acts = sngd_jax.capture_eqx(loss_fn, argnums=(0, 1))
  (loss, (acts_g, acts_d)), (grads_g, grads_d) = eqx.filter_value_and_grad(
      lambda pair, z, x: loss_and_acts(*pair, z, x), has_aux=True)((generator, discriminator), z, x)
  ```

  Args:
    fn: a function whose first argument is the Equinox model (any pytree
      holding the layers). The layers of a model passed as another argument (the frozen
      half of ``eqx.partition``, a target network) are left out; one differentiated together
      with the model is an error that names it.
    has_aux: as in ``sngd_jax.capture``.
    outputs: as in ``sngd_jax.capture``.
    argnums: the position of the model (0), or a tuple of positions of several models
      trained by one loss with one optimizer each: the wrapped function then returns one
      activations per model, in that order, keyed by each model's own paths, as
      ``sngd_jax.capture(fn, argnums=...)``.

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``,
    activations keyed by the layer's path in ``model``.

  Raises:
    TypeError: when ``fn`` is a model or not callable, saying what to write.
    ValueError: when the wrapped function is called with an argument left out that is
      differentiated together with the recorded model(s), naming it and ``argnums``.
  """

  _equinox()
  check_captured_function(fn, "capture_eqx")
  positions = normalized_argnums(argnums, "capture_eqx")
  several = isinstance(argnums, tuple)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    models, rest = models_and_rest(args, kwargs, positions, several, argnums, "capture_eqx")
    top: dict[int, tuple[str, ...]] = {}
    declared: dict[tuple[str, ...], tuple[str, Any]] = {}
    for m, model in enumerate(models):  # several models: each one's paths under its part
      prefix = (model_part(m),) if several else ()
      top.update(leaf_paths(model, prefix))
      declared.update(_declared(model, prefix))
    rec = Recorder(top, outputs)
    rec.derivation = derivation_of((args, kwargs))
    rec.data = transforms.data_leaves(rest, frozenset(top))
    unnamed: dict[str, None] = {}
    frozen = OtherArgs.of(args, positions, models, top, rest)
    calls: list[Any] = []
    rec.custom_dense = functools.partial(_custom_dense, rec, unnamed, frozen, declared, calls)
    shared = _SharedUses(frozenset(top.values()))
    reads, tables = _TableReads(rec), _tables(models)
    with (transforms.recording(rec),
          _layer_calls(rec, unnamed, tables, frozen, shared, reads),
          _declared_calls(models, calls), _shared_calls(rec, models, shared),
          _table_reads(reads, tables)):
      result = fn(*args, **kwargs)
    check_no_trained_left_out(frozen.left_out, fn, "capture_eqx", positions)
    value, aux = split_aux(result, has_aux, "capture_eqx")
    shared.warn()
    reads.warn()
    if unnamed:
      warnings.warn(
          f"sngd: capture_eqx could not name {len(unnamed)} layer call(s) "
          f"({', '.join(unnamed)}): their weight is not a leaf of the model passed as the "
          "captured function's first argument, as when the model goes through a `jax.jit` "
          "or `eqx.filter_jit` inside the captured function (jit the whole training step "
          "instead), or the layer is made inside the loss or its weight computed from the "
          "params (by `eqx.nn.WeightNorm` or `eqx.nn.SpectralNorm`, a transposed copy, or a "
          "cast made outside the declared module's `__call__`, "
          "passed to `sngd_jax.dense`: pass the field or its cast there), or the whole model "
          "is cast to another dtype inside the loss (mixed precision, "
          "`jax.tree.map(lambda a: a.astype(jnp.bfloat16), model)`: a cast weight is no leaf "
          "of the model; cast inside the layer instead, in a `@sngd_jax.dense_layer` module "
          "computing `sngd_jax.dense(x.astype(dt), self.weight.astype(dt), ...)`, whose cast "
          "is read as its param). They are not captured, and `update` reports their "
          "layers as not captured; pass `fisher={path: None}` to leave such a layer to the next "
          "transform. (Layers of a frozen half of `eqx.partition` that the loss closes over "
          "are harmless here, `update` never sees them: pass that half to the loss as an "
          "argument, `loss(trained, frozen, x)`, or differentiate the captured function "
          "(`eqx.filter_value_and_grad`), and capture leaves them out silently.)",
          stacklevel=caller_stacklevel())
    acts = vmapped_by_caller(rec.freeze(), rest)
    if several:
      acts = split_models(acts, len(positions))
    return (value, (aux, acts)) if has_aux else (value, acts)

  return wrapped
