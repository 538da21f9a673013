"""What capture records, and the recorder that routes records through scanned cells.

A ``Captured`` record holds what one call of one layer saw (its input and
pre-activation output, gradients stopped) and how to turn it into rows of the
local Fisher (``kind`` and static ``config``, see ``sngd_jax._src.statistics``).
``Recorder`` collects records by layer path. Its frame stack tells where a
record goes: to the output store, or, while a cell runs inside ``nn.RNN`` /
``nnx.RNN`` (under ``scan``), to that cell call's ``CellFrame``, whose
records leave the scan as an extra output (``StepRecords``), stacked over
time, and are unpacked by ``untag`` when the RNN call returns.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from typing import Any, Iterator, Optional, Union

import flax.struct
import jax
import jax.core
import jax.numpy as jnp

Activations = dict[str, tuple["Captured", ...]]
# What a layer recorder returns for one call: (inputs, outputs, kind, config), or None
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
      ``'conv'``, ``'norm'`` or ``'embed'`` (see ``sngd_jax._src.statistics.ROWS``).
    config: static layer configuration that the kind needs.
    time_steps: how many time steps the leading axis holds (static): a cell
      run by ``nn.RNN``/``nnx.RNN`` records every step, merged time-major
      into the leading axis (``T * B``, a product over nested RNNs); 1
      elsewhere, where the leading axis is the batch. Tells
      ``first_examples`` where the examples are.
  """

  inputs: jax.Array
  outputs: jax.Array
  kind: str = flax.struct.field(pytree_node=False, default="dense")
  config: tuple = flax.struct.field(pytree_node=False, default=())
  time_steps: int = flax.struct.field(pytree_node=False, default=1)

  def first_examples(self, k: int) -> Captured:
    """This record restricted to the first ``k`` examples of the batch.

    The leading axis of ``inputs`` and ``outputs`` holds ``time_steps`` blocks
    of the batch, time-major (row ``t * B + b``; ``time_steps = 1`` outside
    recurrent cells), so the first ``k`` examples are the first ``k`` rows of
    every block, at every time step.
    """
    def take(a):
      if a is None:  # not recorded
        return None
      if self.time_steps == 1:
        return a[:k]
      blocks = a.reshape((self.time_steps, -1) + a.shape[1:])
      return blocks[:, :k].reshape((-1,) + a.shape[1:])
    return dataclasses.replace(self, inputs=take(self.inputs), outputs=take(self.outputs))


def record(store: dict[str, list[Captured]], path: str, inputs: Any, outputs: Any,
           kind: str, config: tuple = (), time_steps: int = 1) -> None:
  """Appends one call's record to ``store`` (gradients stopped)."""
  store.setdefault(path, []).append(
      Captured(inputs=jax.lax.stop_gradient(inputs),
               outputs=jax.lax.stop_gradient(outputs), kind=kind, config=config,
               time_steps=time_steps))


def split_aux(result: Any, has_aux: bool, name: str) -> tuple[Any, Any]:
  """Splits what a captured function returned into ``(value, aux)``.

  Args:
    result: what the wrapped function returned.
    has_aux: whether it returns ``(value, aux)``.
    name: the capture function, for the message (``"capture"``, ...).

  Returns:
    ``(value, aux)``; ``aux`` is None when ``has_aux`` is False.

  Raises:
    ValueError: if ``has_aux`` is False and ``result`` is a tuple (a loss that
      returns ``(loss, aux)``, which ``jax.value_and_grad`` would reject as a
      non-scalar output), saying what to write; or if ``has_aux`` is True and
      ``result`` is not a pair.
  """
  if has_aux:
    if not (isinstance(result, (tuple, list)) and len(result) == 2):
      raise ValueError(
          f"sngd: `{name}(fn, has_aux=True)` needs `fn` to return a pair `(value, aux)`; it "
          f"returned {type(result).__name__}{_arity(result)}. Drop `has_aux=True` if `fn` "
          "returns the loss alone.")
    return result[0], result[1]
  if isinstance(result, (tuple, list)):
    raise ValueError(
        f"sngd: the function wrapped by `{name}` returned a {type(result).__name__}"
        f"{_arity(result)}, not a single value. If it returns `(loss, aux)`, write "
        f"`sngd_jax.{name}(loss_fn, has_aux=True)`: it then returns `(loss, (aux, acts))`, so "
        "`(loss, (aux, acts)), grads = jax.value_and_grad(wrapped, has_aux=True)(...)`.")
  return result, None


def _arity(result: Any) -> str:
  return f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""


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
  """Strips ``StepRecords`` nodes from an RNN's output; returns the records.

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
          steps = c.inputs.shape[time_axis] * c.time_steps
          found.setdefault(path, []).append(
              Captured(inputs=merge(c.inputs), outputs=merge(c.outputs), kind=c.kind,
                       config=c.config, time_steps=steps))
      return node.value
    return node

  out = jax.tree.map(strip, out, is_leaf=lambda n: isinstance(n, StepRecords))
  return out, found


def _merge_time(a: jax.Array, time_axis: int) -> jax.Array:
  a = jnp.moveaxis(a, time_axis, 0)
  if a.ndim < 2:
    return a
  return a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])


@dataclasses.dataclass
class RNNFrame:
  """An ``nn.RNN``/``nnx.RNN`` call in progress.

  Attributes:
    cell_prefix: NNX only: the path of the RNN's cell (``'<rnn path>/cell'``),
      under which the copies of the cell's layers inside the scan are named.
  """

  cell_prefix: Optional[str] = None


@dataclasses.dataclass
class CellFrame:
  """One cell call inside an RNN's scan: its records leave the scan as outputs."""

  records: dict[str, list[Captured]] = dataclasses.field(default_factory=dict)


Frame = Union[RNNFrame, CellFrame]


class Recorder:
  """Routes records to the output store, or to the innermost scanned cell call.

  Attributes:
    store: the records of calls outside any scanned cell, by layer path.
    frames: the RNN and cell calls in progress, innermost last.
    norm_slots: while a normalization layer runs, a slot per layer that the
      patched normalization routine fills with ``(xhat, feature_axes)``.
  """

  def __init__(self):
    self.store: dict[str, list[Captured]] = {}
    self.frames: list[Frame] = []
    self.norm_slots: list[list] = []

  def add(self, path: str, inputs, outputs, kind: str, config: tuple = (),
          time_steps: int = 1) -> None:
    target = self.store
    for frame in reversed(self.frames):
      if isinstance(frame, CellFrame):
        target = frame.records
        break
    record(target, path, inputs, outputs, kind, config, time_steps)

  def add_all(self, records: dict[str, list[Captured]]) -> None:
    for path, calls in records.items():
      for c in calls:
        self.add(path, c.inputs, c.outputs, c.kind, c.config, c.time_steps)

  def rnn_frame(self) -> Optional[RNNFrame]:
    """The RNN call whose cell is about to run, if the innermost frame is one."""
    return self.frames[-1] if self.frames and isinstance(self.frames[-1], RNNFrame) else None

  @contextlib.contextmanager
  def rnn(self, cell_prefix: Optional[str] = None) -> Iterator[None]:
    self.frames.append(RNNFrame(cell_prefix))
    try:
      yield
    finally:
      self.frames.pop()

  @contextlib.contextmanager
  def cell(self) -> Iterator[CellFrame]:
    frame = CellFrame()
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
