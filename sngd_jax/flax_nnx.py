"""Activation capture for Flax NNX modules.

NNX modules are plain Python objects with no interceptor hook, so
:func:`capture_nnx` swaps the ``__call__`` of the supported layer classes for a
recording wrapper while the wrapped function runs (and restores it after,
also on error). Layers are named by their path in the model graph
(``'layers/0'``), which is the path of their params in ``nnx.state(model)``.

Supported (:data:`NNX_LAYERS`): ``Linear``, ``LinearGeneral`` (hence the
projections of ``MultiHeadAttention``), ``Einsum``, ``Conv``, ``ConvTranspose``
(as in linen), ``Embed``,
``LayerNorm``, ``BatchNorm``, ``GroupNorm``, ``RMSNorm``, ``InstanceNorm``,
and the ``Linear`` layers inside ``LSTMCell``, ``OptimizedLSTMCell``,
``GRUCell`` and ``SimpleCell``. As in :mod:`sngd_jax.capture`, records made
inside a cell run by ``nnx.RNN`` (under ``nnx.scan``) leave the scan as extra
outputs stacked over time, so every time step is recorded; the layers inside
the scan are copies of the model's, so they are named through the cell's own
graph.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import flax.nnx.nn.normalization as nnx_norm
from flax import nnx

from sngd_jax import conv as conv_lib
from sngd_jax import paths
from sngd_jax.capture import (
  Recorder,
  StepRecords,
  contract_config,
  einsum_config,
  freeze,
  rnn_time_axis,
  untag,
)


def _linear(module, x, args, kwargs, out):
  return x, out, "dense", ()


def _linear_general(module, x, args, kwargs, out):
  if module.batch_axis:
    return None
  return x, out, "dense", contract_config(module.axis, x.ndim)


def _einsum(module, x, args, kwargs, out):
  eq = kwargs.get("einsum_str", args[0] if args else None) or module.einsum_str
  config = einsum_config(eq, x.ndim, module.kernel.ndim)
  return None if config is None else (x, out, "dense", config)


def _conv(module, x, args, kwargs, out):
  return x, out, "conv", conv_lib.conv_config(module)


def _conv_transpose(module, x, args, kwargs, out):
  config = conv_lib.conv_transpose_config(module)
  return None if config is None else (x, out, "conv_transpose", config)


def _embed(module, x, args, kwargs, out):
  return x, out, "embed", ()


NNX_LAYERS: dict[type, Callable[..., Any]] = {
    nnx.Linear: _linear,
    nnx.LinearGeneral: _linear_general,
    nnx.Einsum: _einsum,
    nnx.Conv: _conv,
    nnx.ConvTranspose: _conv_transpose,
    nnx.Embed: _embed,
}
"""Layer class -> recorder ``(module, x, args, kwargs, output) -> (x, z, kind, config)``."""

NNX_NORMS: tuple[type, ...] = (nnx.LayerNorm, nnx.BatchNorm, nnx.GroupNorm, nnx.RMSNorm,
                               nnx.InstanceNorm)
NNX_CELLS: tuple[type, ...] = (nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell,
                               nnx.SimpleCell)
_RECORDED = tuple(NNX_LAYERS) + NNX_NORMS


def _graph_paths(root: Any, prefix: tuple[str, ...] = ()) -> dict[int, str]:
  return {id(node): paths.join(prefix + tuple(str(p) for p in path))
          for path, node in nnx.iter_graph(root)
          if isinstance(node, _RECORDED + (nnx.RNN,))}


class _NNXRecorder(Recorder):
  """Adds object-id naming, with per-cell-call maps for the copies inside a scan."""

  def __init__(self, owner_paths: dict[int, str]):
    super().__init__()
    self.owner_paths = owner_paths
    self.local_paths: list[dict[int, str]] = []

  def path_of(self, module: Any):
    for local in reversed(self.local_paths):
      if id(module) in local:
        return local[id(module)]
    return self.owner_paths.get(id(module))


@contextlib.contextmanager
def _recording(rec: _NNXRecorder, cell_classes: tuple[type, ...]) -> Iterator[None]:
  patched: dict[tuple[type, str], Any] = {}

  def patch(cls, name, make):
    if (cls, name) not in patched:
      patched[(cls, name)] = cls.__dict__[name]
      setattr(cls, name, make(cls.__dict__[name]))

  def make_layer(cls):
    recorder = NNX_LAYERS[cls]

    def make(original):
      @functools.wraps(original)
      def call(self, x, *args, **kwargs):
        out = original(self, x, *args, **kwargs)
        path = rec.path_of(self)
        if path is not None:
          recorded = recorder(self, x, args, kwargs, out)
          if recorded is not None:
            rec.add(path, *recorded)
        return out
      return call
    return make

  def make_attend(original):
    @functools.wraps(original)
    def attend(self, query, *args, **kwargs):
      out = original(self, query, *args, **kwargs)
      path = rec.path_of(self)
      if path is not None:
        rec.add(path, query, out, "embed", ("attend",))
      return out
    return attend

  def make_norm(original):
    @functools.wraps(original)
    def call(self, x, *args, **kwargs):
      with rec.norm() as slot:
        out = original(self, x, *args, **kwargs)
      path = rec.path_of(self)
      if path is not None and slot and self.use_scale:
        xhat, feature_axes = slot[0]
        rec.add(path, xhat, out, "norm", (feature_axes,))
      return out
    return call

  def make_rnn(original):
    @functools.wraps(original)
    def call(self, inputs, *args, **kwargs):
      path = rec.path_of(self)
      frame_paths = {} if path is None else {"cell_prefix": path + "/cell"}
      rec.frames.append(("rnn", frame_paths.get("cell_prefix")))
      try:
        out = original(self, inputs, *args, **kwargs)
      finally:
        rec.frames.pop()
      time_major = kwargs.get("time_major")
      time_major = self.time_major if time_major is None else time_major
      out, found = untag(out, rnn_time_axis(inputs, time_major, self.cell))
      rec.add_all(found)
      return out
    return call

  def make_cell(original):
    @functools.wraps(original)
    def call(self, carry, inputs, *args, **kwargs):
      top = rec.frames[-1] if rec.frames else None
      if not (isinstance(top, tuple) and top[0] == "rnn" and top[1] is not None):
        return original(self, carry, inputs, *args, **kwargs)
      rec.local_paths.append(_graph_paths(self, tuple(top[1].split("/"))))
      try:
        with rec.cell() as frame:
          carry, y = original(self, carry, inputs, *args, **kwargs)
      finally:
        rec.local_paths.pop()
      return (carry, StepRecords(y, frame)) if frame else (carry, y)
    return call

  original_normalize = nnx_norm._normalize

  @functools.wraps(original_normalize)
  def normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, *rest, **kw):
    if rec.norm_slots:
      xhat = original_normalize(x, mean, var, None, None, reduction_axes, feature_axes,
                                *rest, **kw)
      rec.normalized(xhat, feature_axes)
    return original_normalize(x, mean, var, scale, bias, reduction_axes, feature_axes,
                              *rest, **kw)

  try:
    for cls in NNX_LAYERS:
      patch(cls, "__call__", make_layer(cls))
    patch(nnx.Embed, "attend", make_attend)
    for cls in NNX_NORMS:
      patch(cls, "__call__", make_norm)
    patch(nnx.RNN, "__call__", make_rnn)
    for cls in cell_classes:
      if "__call__" in cls.__dict__:
        patch(cls, "__call__", make_cell)
    nnx_norm._normalize = normalize
    yield
  finally:
    nnx_norm._normalize = original_normalize
    for (cls, name), original in patched.items():
      setattr(cls, name, original)


def capture_nnx(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """Wraps ``fn(model, *args)`` so it also returns the activations of ``model``'s layers.

  Example::

    loss_and_acts = sngd_jax.capture_nnx(loss_fn)       # loss_fn(model, x, y)
    (loss, acts), grads = nnx.value_and_grad(loss_and_acts, has_aux=True)(model, x, y)
    optimizer.update(model, grads, activations=acts)

  Args:
    fn: a function whose first argument is an ``nnx.Module``.
    has_aux: as in :func:`sngd_jax.capture`.

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``,
    activations keyed by the layer's path in ``model``.
  """

  @functools.wraps(fn)
  def wrapped(model, *args, **kwargs):
    rec = _NNXRecorder(_graph_paths(model))
    cells = tuple({type(node.cell) for _, node in nnx.iter_graph(model)
                   if isinstance(node, nnx.RNN)} | set(NNX_CELLS))
    with _recording(rec, cells):
      result = fn(model, *args, **kwargs)
    acts = freeze(rec.store)
    if has_aux:
      value, aux = result
      return value, (aux, acts)
    return result, acts

  return wrapped
