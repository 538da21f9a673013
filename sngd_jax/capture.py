"""Activation capture for Flax linen, by method interception.

``capture(loss_fn)`` runs ``loss_fn`` under :func:`flax.linen.intercept_methods`
and records, for every supported layer call, what its local Fisher needs (the
input ``x`` and the pre-activation output ``z``, with gradients stopped).
Nothing in the model changes. A layer called several times (shared weights, a
layer applied at every time step) records one entry per call; their
statistics are pooled.

Supported layers (:data:`LINEN_LAYERS`): ``Dense``, ``DenseGeneral`` (hence
the q/k/v/out projections of ``MultiHeadDotProductAttention``), ``Einsum``
(kernels laid out as contracted axes then output axes), ``Conv`` (1-3-D),
``ConvTranspose`` (``transpose_kernel=False``, not ``'CIRCULAR'``),
``Embed``, the ``DenseParams`` of ``OptimizedLSTMCell``, and the
normalization layers (``LayerNorm``, ``BatchNorm``, ``GroupNorm``,
``RMSNorm``, ``InstanceNorm``), whose normalized input ``xhat`` is taken from
Flax's own normalization routine.

**Scanned cells.** ``nn.RNN`` runs its cell under ``nn.scan``: the Dense layers
inside the cell see tracers of the scan body, which must not escape it. While
an ``nn.RNN`` runs, the records made inside one cell call are returned by the
cell as an extra scan output (stacked over time by the scan), and unpacked
when the ``nn.RNN`` call returns. Every time step is therefore recorded, and
the cell's weights get statistics pooled over all steps. (Other lifted
transforms, e.g. a hand-written ``nn.scan`` or ``nn.remat``, are not
unpacked this way.)

The result is a dict from layer path (``'Block_0/Dense_1'``, the same string
that :mod:`sngd_jax.paths` gives the layer's params) to a tuple of
:class:`Captured` records.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import flax.linen.normalization as linen_norm
import jax
import jax.numpy as jnp

from sngd_jax import conv as conv_lib
from sngd_jax import paths

Activations = dict[str, tuple["Captured", ...]]
# What a recorder returns for one call: (inputs, outputs, kind, config), or None
# when the call is not one sngd can model (then it is not recorded).
Record = Optional[tuple[Any, Any, str, tuple]]


@flax.struct.dataclass
class Captured:
  """What one call of one layer saw.

  Attributes:
    inputs: the layer input: ``x`` (dense, conv), ``xhat`` (norm) or token
      ids (embed).
    outputs: the layer's pre-activation output ``z``.
    kind: how ``inputs`` map to rows of the local Fisher: ``'dense'``,
      ``'conv'``, ``'norm'`` or ``'embed'`` (see :data:`sngd_jax.factors.ROWS`).
    config: static layer configuration that the kind needs.
  """

  inputs: jax.Array
  outputs: jax.Array
  kind: str = flax.struct.field(pytree_node=False, default="dense")
  config: tuple = flax.struct.field(pytree_node=False, default=())


def record(store: dict[str, list[Captured]], path: str, inputs: Any, outputs: Any,
           kind: str, config: tuple = ()) -> None:
  """Appends one call's record to ``store`` (gradients stopped)."""
  store.setdefault(path, []).append(
      Captured(inputs=jax.lax.stop_gradient(inputs),
               outputs=jax.lax.stop_gradient(outputs), kind=kind, config=config))


def _escaped(x: Any) -> bool:
  """Whether ``x`` is a tracer of a trace that has ended (it leaked out of a transform)."""
  trace = getattr(x, "_trace", None) if isinstance(x, jax.core.Tracer) else None
  return trace is not None and hasattr(trace, "is_valid") and not trace.is_valid()


def freeze(store: dict[str, list[Captured]]) -> Activations:
  """Turns a record store into the immutable activations dict.

  A record holding a tracer of a transform that has already finished (the
  layer ran inside ``nn.scan``/``nnx.scan`` other than ``nn.RNN``/``nnx.RNN``,
  ``nn.remat``, ``nn.vmap``, ...) cannot be used: it is dropped with a
  warning naming the layer, so ``update`` reports the layer as not captured
  (and ``fisher={path: None}`` leaves it to the next transform) instead of
  failing later on a leaked tracer.
  """
  out = {}
  for path, calls in store.items():
    if any(_escaped(x) for x in jax.tree.leaves(calls)):
      warnings.warn(
          f"sngd: layer {path!r} was called inside a JAX transform (a scan, remat or vmap "
          "other than nn.RNN / nnx.RNN) whose values cannot leave it; its calls are not "
          "captured. Run the cell with nn.RNN / nnx.RNN, or pass "
          f"`fisher={{{path!r}: None}}`.", stacklevel=3)
      continue
    out[path] = tuple(calls)
  return out


# ---------------------------------------------------------------------------
# Configs shared by linen and NNX recorders.

def contract_config(axes: Any, ndim: int) -> tuple:
  """Dense config for a kernel contracting input ``axes`` (kernel order = sorted)."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  axes = tuple(sorted(a % ndim for a in axes))
  if axes == (ndim - 1,):
    return ()
  return (axes, None)


def einsum_config(einsum_str: str, x_ndim: int, kernel_ndim: int) -> Optional[tuple]:
  """Dense config of an einsum layer, or None if its layout is not a dense layer's.

  Supported: ``lhs,rhs->out`` where the kernel ``rhs`` is the contracted
  letters followed by output letters, every other ``lhs`` letter is a row
  (batch/position) letter kept in ``out``, and no letter is shared by all three.
  (Without a bias and with several output letters the params do not say where
  the kernel's input axes end: :func:`sngd_jax.coverage` then gives the
  ``fisher={path: (kind, n_input_axes)}`` to pass.)

  Args:
    einsum_str: the equation (explicit, two operands).
    x_ndim: rank of the input.
    kernel_ndim: rank of the kernel.

  Returns:
    ``(contract_axes, out_perm)`` for :func:`sngd_jax.factors.dense_rows`.
  """
  eq = einsum_str.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    return None
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  if "..." in lhs:
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    fill = "".join(free[:x_ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  if "." in rhs or len(lhs) != x_ndim or len(rhs) != kernel_ndim:
    return None
  contracted = [c for c in rhs if c in lhs and c not in out]
  kernel_out = [c for c in rhs if c in out and c not in lhs]
  rows = [c for c in lhs if c not in rhs]
  if (list(rhs) != contracted + kernel_out or not contracted or not kernel_out
      or any(c not in out for c in rows) or sorted(out) != sorted(rows + kernel_out)):
    return None
  axes = tuple(lhs.index(c) for c in contracted)  # in kernel order
  out_perm = tuple(out.index(c) for c in rows + kernel_out)
  return (axes, None if out_perm == tuple(range(len(out))) else out_perm)


# ---------------------------------------------------------------------------
# Linen recorders: (module, call_args, call_kwargs, output) -> Record.

def _dense(module, args, kwargs, out) -> Record:
  return args[0], out, "dense", ()


def _dense_general(module, args, kwargs, out) -> Record:
  if module.batch_dims:
    return None  # kernel with batch axes: not one dense layer
  x = args[0]
  return x, out, "dense", contract_config(module.axis, x.ndim)


def _einsum(module, args, kwargs, out) -> Record:
  x = args[0]
  eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
  config = einsum_config(eq, x.ndim, len(module.shape))
  return None if config is None else (x, out, "dense", config)


def _conv(module, args, kwargs, out) -> Record:
  return args[0], out, "conv", conv_lib.conv_config(module)


def _conv_transpose(module, args, kwargs, out) -> Record:
  config = conv_lib.conv_transpose_config(module)
  return None if config is None else (args[0], out, "conv_transpose", config)


def _dense_params(module, args, kwargs, out) -> Record:
  # OptimizedLSTMCell's DenseParams returns (kernel, bias); the cell fuses the
  # matmuls, so the pre-activation is recomputed here (used by rfim only).
  x = args[0]
  kernel, bias = out
  z = jnp.dot(x, kernel.astype(x.dtype))
  if bias is not None:
    z = z + bias.astype(z.dtype)
  return x, z, "dense", ()


LINEN_LAYERS: dict[type, Callable[..., Record]] = {
    nn.Dense: _dense,
    nn.DenseGeneral: _dense_general,
    nn.Einsum: _einsum,
    nn.Conv: _conv,
    nn.ConvTranspose: _conv_transpose,
    nn.recurrent.DenseParams: _dense_params,
}
"""Layer class -> recorder ``(module, args, kwargs, output) -> (x, z, kind, config)``.

Subclasses are matched through their MRO. Embeddings and normalization layers
are handled separately (:data:`LINEN_NORMS`, ``nn.Embed``).
"""

LINEN_NORMS: tuple[type, ...] = (nn.LayerNorm, nn.BatchNorm, nn.GroupNorm, nn.RMSNorm,
                                 nn.InstanceNorm)


def _lookup(registry: dict, module: Any):
  for cls in type(module).__mro__:
    if cls in registry:
      return registry[cls]
  return None


# ---------------------------------------------------------------------------
# Scanned cells: records made inside a cell call leave the scan as outputs.

@jax.tree_util.register_pytree_node_class
class StepRecords:
  """A cell output carrying the records of one time step through ``scan``."""

  def __init__(self, value, records):
    self.value = value
    self.records = records

  def tree_flatten(self):
    return (self.value, self.records), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    return cls(*children)


def untag(out: Any, time_axis: int) -> tuple[Any, dict[str, list[Captured]]]:
  """Strips :class:`StepRecords` nodes from an RNN's output; returns the records.

  The records of every time step were stacked by the scan along
  ``time_axis``; the time axis is merged into the leading (batch) axis so each
  record keeps its per-step rank (and its config stays valid).
  """
  found: dict[str, list[Captured]] = {}

  def strip(node):
    if isinstance(node, StepRecords):
      for path, calls in node.records.items():
        for c in calls:
          merge = lambda a: _merge_time(a, time_axis)
          found.setdefault(path, []).append(
              Captured(inputs=merge(c.inputs), outputs=merge(c.outputs), kind=c.kind,
                       config=c.config))
      return node.value
    return node

  out = jax.tree.map(strip, out, is_leaf=lambda n: isinstance(n, StepRecords))
  return out, found


def _merge_time(a: jax.Array, time_axis: int) -> jax.Array:
  a = jnp.moveaxis(a, time_axis, 0)
  if a.ndim < 2:
    return a
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


class Recorder:
  """Routes records to the output store, or to the innermost scanned cell call."""

  def __init__(self):
    self.store: dict[str, list[Captured]] = {}
    self.frames: list[Any] = []  # "rnn" markers and per-cell-call record dicts
    self.norm_slots: list[list] = []

  def add(self, path: str, inputs, outputs, kind: str, config: tuple = ()) -> None:
    target = self.store
    for frame in reversed(self.frames):
      if isinstance(frame, dict):
        target = frame
        break
    record(target, path, inputs, outputs, kind, config)

  def add_all(self, records: dict[str, list[Captured]]) -> None:
    for path, calls in records.items():
      for c in calls:
        self.add(path, c.inputs, c.outputs, c.kind, c.config)

  def in_rnn(self) -> bool:
    return bool(self.frames) and self.frames[-1] == "rnn"

  @contextlib.contextmanager
  def rnn(self) -> Iterator[None]:
    self.frames.append("rnn")
    try:
      yield
    finally:
      self.frames.pop()

  @contextlib.contextmanager
  def cell(self) -> Iterator[dict]:
    frame: dict[str, list[Captured]] = {}
    self.frames.append(frame)
    try:
      yield frame
    finally:
      self.frames.pop()

  @contextlib.contextmanager
  def norm(self) -> Iterator[list]:
    slot: list = []
    self.norm_slots.append(slot)
    try:
      yield slot
    finally:
      self.norm_slots.pop()

  def normalized(self, xhat: Any, feature_axes: Any) -> None:
    """Called by the patched normalization routine with ``xhat``."""
    if self.norm_slots:
      ndim = xhat.ndim
      axes = (feature_axes,) if isinstance(feature_axes, int) else tuple(feature_axes)
      self.norm_slots[-1].append((xhat, tuple(sorted(a % ndim for a in axes))))


def rnn_time_axis(inputs: Any, time_major: bool, cell: Any) -> int:
  """The time axis ``nn.RNN``/``nnx.RNN`` scans over (same rule as Flax)."""
  ndim = inputs.ndim
  axis = 0 if time_major else ndim - (cell.num_feature_axes + 1)
  return axis % ndim


@contextlib.contextmanager
def _patched_linen_normalize(recorder: Recorder) -> Iterator[None]:
  original = linen_norm._normalize

  @functools.wraps(original)
  def normalize(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                epsilon, use_bias, use_scale, *rest, **kwargs):
    if recorder.norm_slots:
      xhat = original(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                      epsilon, False, False, *rest, **kwargs)
      recorder.normalized(xhat, feature_axes)
    return original(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                    epsilon, use_bias, use_scale, *rest, **kwargs)

  linen_norm._normalize = normalize
  try:
    yield
  finally:
    linen_norm._normalize = original


def capture(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """Wraps a function that applies Flax linen modules so it also returns activations.

  Example::

    loss_and_acts = sngd_jax.capture(loss_fn)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)

  Args:
    fn: any function; every call of a supported layer (see the module
      docstring) made inside it (through ``module.apply``) is recorded,
      including every time step of cells run by ``nn.RNN``.
    has_aux: set when ``fn`` already returns ``(value, aux)``; the wrapped
      function then returns ``(value, (aux, activations))`` so that it still
      fits ``jax.value_and_grad(..., has_aux=True)``.

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    rec = Recorder()

    def interceptor(next_fun, call_args, call_kwargs, context):
      module = context.module
      method = context.method_name
      if method == "__call__" and isinstance(module, nn.RNN) and call_args:
        with rec.rnn():
          out = next_fun(*call_args, **call_kwargs)
        time_major = call_kwargs.get("time_major")
        time_major = module.time_major if time_major is None else time_major
        out, found = untag(out, rnn_time_axis(call_args[0], time_major, module.cell))
        rec.add_all(found)
        return out
      if method == "__call__" and isinstance(module, nn.RNNCellBase) and rec.in_rnn():
        with rec.cell() as frame:
          carry, y = next_fun(*call_args, **call_kwargs)
        return (carry, StepRecords(y, frame)) if frame else (carry, y)
      if isinstance(module, LINEN_NORMS) and method == "__call__":
        with rec.norm() as slot:
          out = next_fun(*call_args, **call_kwargs)
        if slot and module.use_scale:
          xhat, feature_axes = slot[0]
          rec.add(paths.join(module.path), xhat, out, "norm", (feature_axes,))
        return out
      out = next_fun(*call_args, **call_kwargs)
      if isinstance(module, nn.Embed) and call_args:
        if method == "__call__":
          rec.add(paths.join(module.path), call_args[0], out, "embed")
        elif method == "attend":
          rec.add(paths.join(module.path), call_args[0], out, "embed", ("attend",))
        return out
      recorder = _lookup(LINEN_LAYERS, module)
      if method == "__call__" and recorder is not None and call_args:
        if isinstance(recorder, str):  # a plain kind, as in earlier versions
          recorded = (call_args[0], out, recorder, ())
        else:
          recorded = recorder(module, call_args, call_kwargs, out)
        if recorded is not None:
          rec.add(paths.join(module.path), *recorded)
      return out

    with _patched_linen_normalize(rec), nn.intercept_methods(interceptor):
      result = fn(*args, **kwargs)
    acts = freeze(rec.store)
    if has_aux:
      value, aux = result
      return value, (aux, acts)
    return result, acts

  return wrapped

