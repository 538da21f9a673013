"""What capture records, and the recorder that routes records out of JAX transforms.

A ``Captured`` record holds what one call of one layer saw (its input, and its
pre-activation output when asked for; gradients stopped) and how to turn it into rows of the
local Fisher (``kind`` and static ``config``, see ``sngd_jax._src.statistics``).
``Recorder`` collects records by layer path.

**Records leave transforms as outputs.** A value computed inside ``scan``,
``vmap`` or ``checkpoint`` is a tracer of that transform and must not escape
it. While capturing, those transforms run through ``transforms``: each call
opens a ``TransformFrame``, the records made inside are returned as extra
outputs (stacked by ``scan`` and ``vmap`` along a new leading axis) and handed
to the enclosing frame. Each record knows, for every leading axis a transform
added, its *role* (``Recorder.trace``):

* ``stack``: the layer's weight was sliced by that transform (``xs`` of a
  scan, a mapped argument of a vmap): the params hold one layer per index
  (``nn.scan`` over depth, ``nnx.vmap``-made layers), so each index gets its
  own local Fisher;
* ``pool``: the weight was closed over or carried (a scan over time, a vmap
  over the batch): every index is more rows of the same layer's statistics. The
  axis of a ``vmap`` that pools (``'vmap:pool'``), or of a ``jax.lax.map`` that does
  (``'map:pool'``: a model applied per example, ``lax.map(lambda x: model(x), batch)``; not
  a map whose every step sees the whole batch, over noise draws, which is ``'scan:pool'``),
  is the records' example axis (``Captured.batch_axis``, ``_finalized``).

The weight is followed through the frames by object identity: a transform's
wrapper knows which outer leaf each of its inner arguments is.

**Cells under ``nn.RNN`` / ``nnx.RNN``** keep their own route: while a cell
runs inside the RNN's scan, its records go to that cell call's
``CellFrame`` and leave the scan as an extra output (``StepRecords``),
unpacked by ``untag`` when the RNN call returns (time merged into rows).

**Captures nest, one recorder per capture.** The recorders of the captures running on a
thread are a stack (``running``, innermost last; ``transforms.recording`` pushes them): the JAX
transforms open their frames in the innermost one, and each capture's layer hooks wrap those of
the capture it runs in (``swap``), so every capture records its own model's calls. A call of an
outer capture's layer inside a transform that a nested capture opened cannot reach the outer
capture (that transform returns the nested capture's records only): ``Recorder.add`` raises,
naming the layer (``_check_not_nested``), instead of dropping the call.

**What cannot be captured is reported.** A record holding a tracer of a trace
that has ended (a transform that does not return records: ``jax.jit``, a ``while_loop`` or
``fori_loop`` of traced bounds, a transform made before capture started) is dropped with a
warning naming the layer, which is then reported as not captured, never given statistics from a
subset of its calls that the user did not ask for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import flax.struct
import jax
import jax.core
import jax.numpy as jnp

from sngd_jax._src import paths
from sngd_jax._src.frames import caller_stacklevel

Activations = dict[str, tuple["Captured", ...]]
"""What ``capture`` returns: per layer path, the ``Captured`` record of each call of the
layer (in call order), passed to ``update`` as ``activations=``."""
# What a layer recorder returns for one call: (inputs, outputs, kind, config), or None
# when the call is not one sngd can model (then it is not recorded).
Record = Optional[tuple[Any, Any, str, tuple]]


@flax.struct.dataclass
class Captured:
  """What one call of one layer saw.

  Attributes:
    inputs: the layer input: ``x`` (dense, conv), ``xhat`` (norm) or token
      ids (embed).
    outputs: the layer's pre-activation output ``z`` (None when capture was
      asked not to keep outputs).
    kind: how ``inputs`` map to rows of the local Fisher: ``'dense'``,
      ``'conv'``, ``'conv_transpose'``, ``'norm'`` or ``'embed'`` (see
      ``sngd_jax._src.statistics.ROWS``).
    config: static layer configuration that the kind needs, for one layer of
      the stack (``inputs[i]`` when ``stack = 1``).
    stack: how many leading axes index the layers of a stack (a layer applied
      under ``nn.scan`` over depth, ``nnx.scan``, a vmap over its weights):
      each index has its own local Fisher; 0 for an ordinary layer.
    time_steps: how many time steps the example axis holds (static): a cell
      run by ``nn.RNN``/``nnx.RNN`` records every step, merged time-major
      into that axis (``T * B``, a product over nested RNNs); 1 elsewhere.
    batch_axis: the axis of ``inputs`` that indexes the examples of the batch
      (static; after the stack axes): the layer call's leading axis, or the
      axis a user's ``jax.vmap`` or ``jax.lax.map`` over the batch added; None when the
      record holds no example axis (a per-example call outside any vmap).
      Tells ``first_examples`` where the examples are.
    ndim: ``inputs.ndim`` when capture returned the record (None for a record
      built by hand). A record with more axes was stacked after capture (a
      ``jax.lax.scan`` over micro-batches that returns each one's activations):
      ``leading_axes_pooled`` reads those axes as more rows of the batch.
    vmapped: the captured function ran under a ``jax.vmap`` of its caller (its batch
      arguments were batched: per-example gradients, ``jax.vmap(grad_fn, in_axes=(None,
      0))``). The axis that vmap adds to the record is then the example axis, not the
      call's own leading axis (the positions of a ``(T, D)`` sequence):
      ``leading_axes_pooled`` moves ``batch_axis`` to it.
    row_mask: None, or the weight of each row (1 real, 0 padding) that
      ``sngd_jax.with_row_mask`` set: an array of ``inputs.ndim`` axes that
      broadcasts against ``inputs``, full along ``batch_axis`` (and a token
      axis), size 1 elsewhere. Cut, sliced and moved with ``inputs``. A conditional's
      (``[its branch ran]``, ``transforms._conditional``) is size 1 along the examples
      unless its predicate was batched, and full along the axis of a scan over time that
      the conditional ran in (each step's branch); ``with_row_mask`` multiplies into it.
  """

  inputs: jax.Array
  outputs: Optional[jax.Array]
  kind: str = flax.struct.field(pytree_node=False, default="dense")
  config: tuple = flax.struct.field(pytree_node=False, default=())
  stack: int = flax.struct.field(pytree_node=False, default=0)
  time_steps: int = flax.struct.field(pytree_node=False, default=1)
  batch_axis: Optional[int] = flax.struct.field(pytree_node=False, default=0)
  ndim: Optional[int] = flax.struct.field(pytree_node=False, default=None)
  vmapped: bool = flax.struct.field(pytree_node=False, default=False)
  row_mask: Optional[jax.Array] = None

  def first_examples(self, k: int) -> Captured:
    """This record restricted to the first ``k`` examples of the batch.

    The examples are along ``batch_axis``; when that axis holds ``time_steps``
    blocks of the batch, time-major (row ``t * B + b``, a cell under
    ``nn.RNN``), the first ``k`` examples are the first ``k`` rows of every
    block, at every time step. A record with no example axis is returned whole.
    """
    return self.examples(0, k)

  @property
  def num_examples(self) -> Optional[int]:
    """The number of examples along ``batch_axis`` (None without one)."""
    if self.batch_axis is None:
      return None
    return self.inputs.shape[self.batch_axis] // self.time_steps

  def examples(self, start: int, stop: int) -> Captured:
    """This record restricted to examples ``start:stop`` (as ``first_examples``)."""
    return self._cut_examples(lambda a, ax: a[(slice(None),) * ax + (slice(start, stop),)])

  def examples_at(self, start: jax.Array, size: int) -> Captured:
    """``examples(start, start + size)`` for a traced ``start`` (a loop's index)."""
    return self._cut_examples(
        lambda a, ax: jax.lax.dynamic_slice_in_dim(a, start, size, axis=ax))

  def _cut_examples(self, cut) -> Captured:
    """The record with ``cut(array, example_axis)`` applied to inputs, outputs and row mask.

    Time-major rows (``time_steps > 1``) are cut per time step.
    """
    ax = self.batch_axis
    if ax is None:
      return self

    def take(a):
      if a is None:  # not recorded
        return None
      if a.shape[ax] == 1 and self.inputs.shape[ax] != 1:  # a row mask the same for every
        return a  # example (a conditional's: transforms._conditional)
      if self.time_steps == 1:
        return cut(a, ax)
      shape = a.shape[:ax] + (self.time_steps, -1) + a.shape[ax + 1:]
      return cut(a.reshape(shape), ax + 1).reshape(a.shape[:ax] + (-1,) + a.shape[ax + 1:])
    return dataclasses.replace(self, inputs=take(self.inputs), outputs=take(self.outputs),
                               row_mask=take(self.row_mask))


@flax.struct.dataclass
class Pending:
  """A record on its way out of the transforms it was made in.

  ``roles`` has one entry per leading axis that the enclosing transforms add
  (outermost first): ``'scan:stack'``, ``'scan:pool'``, ``'vmap:stack'``,
  ``'vmap:pool'`` or ``'map:pool'`` (the axis of a ``jax.lax.map`` over the batch; see the
  module docstring). ``origin`` says where the weight of the call came from
  (``Recorder.origin``): ``'derived'``, ``'constant'`` or ``'unknown'``.
  """

  captured: Captured
  roles: tuple = flax.struct.field(pytree_node=False, default=())
  origin: str = flax.struct.field(pytree_node=False, default="unknown")


def _is_batched(leaf: Any) -> bool:
  """Whether ``leaf`` is a value that a ``jax.vmap`` batches (JAX's ``BatchTracer``, found by
  its class name: JAX exports no public test)."""
  return isinstance(leaf, jax.core.Tracer) and any(
      cls.__name__ == "BatchTracer" for cls in type(leaf).__mro__)


def vmapped_by_caller(activations: Activations, batch: Any) -> Activations:
  """``activations`` with ``vmapped`` set on every record when an array of ``batch`` (the
  captured function's arguments) is batched by a ``jax.vmap`` around the captured function.

  Transforms made inside the captured function have not started when it is called, so a
  batched argument means a vmap of the caller (per-example gradients); a ``jax.jit`` or a
  ``lax.scan`` between that vmap and the capture traces its arguments unbatched, and the
  records keep their own example axis.
  """
  if not any(_is_batched(leaf) for leaf in jax.tree.leaves(batch)):
    return activations
  return {p: tuple(dataclasses.replace(c, vmapped=True) for c in calls)
          for p, calls in activations.items()}


# ---------------------------------------------------------------------------
# Several models in one captured function (``argnums``).

Argnums = Union[int, tuple[int, ...]]

_MODEL = "\x00"  # the first path part of a record of model ``m``: ``"\x00m"`` (no layer's)


def normalized_argnums(argnums: Any, name: str) -> tuple[int, ...]:
  """The positions of the captured function's models, from ``argnums`` (an int, or a tuple of
  distinct non-negative ints), or a ``TypeError``/``ValueError`` naming ``name``."""
  numbers = (argnums,) if isinstance(argnums, int) else argnums
  if (not isinstance(numbers, tuple) or not numbers
      or not all(isinstance(k, int) and not isinstance(k, bool) for k in numbers)):
    raise TypeError(
        f"sngd: `{name}(fn, argnums=...)` takes an int or a non-empty tuple of ints (the "
        f"positions of the models in `fn`'s arguments, as `jax.grad`'s `argnums`); got "
        f"{argnums!r}.")
  if any(k < 0 for k in numbers) or len(set(numbers)) != len(numbers):
    raise ValueError(
        f"sngd: `{name}(fn, argnums={argnums!r})`: the positions must be distinct and "
        "non-negative.")
  return numbers


def models_and_rest(args: tuple, kwargs: dict, positions: tuple[int, ...], several: bool,
                    argnums: Any, name: str) -> tuple[tuple[Any, ...], tuple[tuple, dict]]:
  """The models a wrapped function was called with (at ``positions``), and its other
  arguments ``(args, kwargs)``; a ``ValueError`` naming ``name`` when a model is missing.

  One model passed by keyword, ``wrapped(model=...)``, is accepted as the one-model signature
  ``wrapped(model, *args)`` accepted it (``capture_nnx``, ``capture_eqx``).
  """
  if not args and not several and positions == (0,) and "model" in kwargs:
    return (kwargs["model"],), ((), {k: v for k, v in kwargs.items() if k != "model"})
  if any(k >= len(args) for k in positions):
    raise ValueError(
        f"sngd: `{name}(fn, argnums={argnums!r})`: `fn` was called with {len(args)} "
        "positional argument(s); the models must be passed positionally.")
  return (tuple(args[k] for k in positions),
          (tuple(a for k, a in enumerate(args) if k not in positions), kwargs))


def model_part(m: int) -> str:
  """The path part that prefixes the records of the ``m``-th model of ``argnums``."""
  return f"{_MODEL}{m}"


def model_path(m: Optional[int], path: str) -> str:
  """``path`` of the ``m``-th model of ``argnums`` (``path`` itself for None: one model)."""
  if m is None:
    return path
  return model_part(m) + ("/" + path if path else "")


def shown(path: str) -> str:
  """A record's path as a message names it: ``'Dense_0'``, or ``'Dense_0' of model 1``."""
  if not path.startswith(_MODEL):
    return repr(path)
  head, _, rest = path.partition("/")
  return f"{rest!r} of model {head[len(_MODEL):]}"


def warn_decoding(decoding: dict[str, None], recorded: Any) -> None:
  """Warns of attention layers run with ``decode=True`` inside the captured function whose
  projections were recorded: each decoding step's tokens became rows of the factors.

  Args:
    decoding: the paths of the attention layers called with ``decode=True`` (linen's
      ``MultiHeadDotProductAttention``, NNX's ``MultiHeadAttention``), in call order.
    recorded: the activations (their paths are read).
  """
  hit = [p for p in decoding if any(r.startswith(p + "/") for r in recorded)]
  if hit:
    warnings.warn(
        f"sngd: attention {shown(hit[0])}"
        + (f" (and {len(hit) - 1} more)" if len(hit) > 1 else "")
        + " ran with decode=True (cached autoregressive decoding) inside the captured "
        "function: every decoding step is recorded as more rows of its projections and of "
        "the layers around it (one token each), pooled into their local Fishers with the "
        "training rows. Decode outside the captured function: after the gradient, in the "
        "same jitted step if you like (docs/training-loops.md, *Encoder-decoder models*).",
        stacklevel=caller_stacklevel())


def split_models(activations: Activations, count: int) -> tuple[Activations, ...]:
  """The activations of each of ``count`` models (records made under ``model_path``), keyed by
  each model's own layer paths."""
  out: list[dict[str, tuple[Captured, ...]]] = [{} for _ in range(count)]
  for path, calls in activations.items():
    head, _, rest = path.partition("/")
    out[int(head[len(_MODEL):])][rest] = calls
  return tuple(out)


def _differentiating(leaf: Any) -> Optional[Any]:
  """The trace of ``leaf`` when it is a tracer of a differentiation (``jax.grad``,
  ``jax.value_and_grad``, ``jax.vjp``, ``jax.linearize``, ``jax.jvp``: JAX's ``LinearizeTrace``
  and ``JVPTrace``, found by class name as JAX exports no public test), else None."""
  trace = getattr(leaf, "_trace", None) if isinstance(leaf, jax.core.Tracer) else None
  names = {cls.__name__ for cls in type(trace).__mro__} if trace is not None else set()
  return trace if names & {"LinearizeTrace", "JVPTrace"} else None


def differentiated_leaves(tree: Any) -> frozenset[int]:
  """``id`` of the leaves of ``tree`` that are tracers of a differentiation
  (``_differentiating``): a captured function's trained arguments."""
  return frozenset(id(leaf) for leaf in jax.tree.leaves(tree)
                   if _differentiating(leaf) is not None)


Derivation = tuple[frozenset[int], frozenset[int], dict[int, Any]]
"""``(differentiation, below, primals)``: the ``id`` of the traces that differentiate the
captured function's arguments, of the traces they nest in (an outer ``jax.jit``, ``jax.vmap``),
and ``id(primal) -> leaf`` of the differentiated leaves (the values a custom rule reads)."""


def derivation_of(tree: Any) -> Optional[Derivation]:
  """The ``Derivation`` of the captured function's arguments ``tree``; None when none of its
  leaves is differentiated (the function runs eagerly, under a ``jax.jit`` or ``eval_shape``
  only), where no weight can be told to come from them (``Recorder.origin``)."""
  traces, primals = {}, {}
  for leaf in jax.tree.leaves(tree):
    trace = _differentiating(leaf)
    if trace is not None:
      traces[id(trace)] = trace
      primal = getattr(leaf, "primal", None)
      if primal is not None:
        primals[id(primal)] = leaf
  if not traces:
    return None
  below: set[int] = set()
  for trace in traces.values():
    parent = getattr(trace, "parent_trace", None)
    while parent is not None and id(parent) not in below:
      below.add(id(parent))
      parent = getattr(parent, "parent_trace", None)
  return frozenset(traces), frozenset(below - set(traces)), primals


def _current_trace() -> Any:
  """JAX's current trace (``jax._src.core.trace_ctx.trace``: JAX exports no public one);
  raises ImportError or AttributeError where this JAX has none there."""
  from jax._src import core  # noqa: PLC0415
  return core.trace_ctx.trace


def _inside(differentiation: frozenset[int]) -> bool:
  """Whether JAX's current trace is one of the traces ``differentiation`` or nested in one (the
  captured function's body, a ``vmap``, ``scan`` or ``checkpoint`` made in it), rather than a
  trace the differentiation runs a custom rule on (a ``jax.custom_vjp``'s ``fwd``, a
  ``jax.custom_jvp``'s rule run on the primals). False where this JAX does not expose its
  current trace (``_current_trace``): ``Recorder.origin`` then says no weight is a constant,
  and a closed-over copy is pooled with a warning, as where nothing is differentiated."""
  try:
    trace = _current_trace()
  except (ImportError, AttributeError):
    return False
  seen: set[int] = set()
  while trace is not None and id(trace) not in seen:
    if id(trace) in differentiation:
      return True
    seen.add(id(trace))
    trace = getattr(trace, "parent_trace", None)
  return False


def trained_with(model_leaves: Iterable[Any],
                 other_leaves: Iterable[tuple[int, Any]]) -> dict[int, int]:
  """``id(leaf) -> position`` of the ``(position, leaf)`` of ``other_leaves`` (the array
  leaves of the captured function's other positional arguments) that are differentiated
  together with the models' leaves ``model_leaves``: tracers of a trace that differentiates a
  model leaf (one ``jax.grad(..., argnums=(0, 1))``).

  A target network, a teacher or the critic an actor's loss runs through is not differentiated
  there (its leaves are arrays, or tracers of a ``jit`` or ``vmap``): it is not in the result.
  """
  traces = {id(t) for t in map(_differentiating, model_leaves) if t is not None}
  out: dict[int, int] = {}
  if not traces:
    return out
  for k, leaf in other_leaves:
    trace = _differentiating(leaf)
    if trace is not None and id(trace) in traces:
      out.setdefault(id(leaf), k)
  return out


def argument_name(fn: Any, k: int) -> str:
  """``argument k (`name`)`` of ``fn`` (the name when its signature says it)."""
  try:
    params = list(inspect.signature(fn).parameters.values())
  except (TypeError, ValueError):
    params = []
  if k < len(params) and params[k].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
    return f"argument {k} (`{params[k].name}`)"
  return f"argument {k}"


def check_no_trained_left_out(left_out: dict[int, str], fn: Any, name: str,
                              positions: tuple[int, ...]) -> None:
  """Raises a ``ValueError`` when a layer of an argument differentiated together with the
  captured models was left out (``left_out``: position -> a layer path), naming the argument,
  the layer and the fix."""
  if not left_out:
    return
  k, path = min(left_out.items())
  what = argument_name(fn, k)
  models = ", ".join(map(str, positions))
  both = tuple(sorted({*positions, *left_out}))
  numbers = ", ".join(map(str, both))
  raise ValueError(
      f"sngd: `{name}` records the layers of argument(s) {models} of the captured function, "
      f"and layer {path!r} of {what} is differentiated together with them (one `jax.grad`/"
      f"`value_and_grad`, `argnums=({numbers})`), but its calls are left out as another "
      "model's (a target network's): its optimizer would get no activations, or, where "
      "its layers have the same paths, another model's. Record each trained model: "
      f"`sngd_jax.{name}(loss_fn, argnums=({numbers}))` returns one activations per model, "
      f"`(loss, ({', '.join(f'acts_{k}' for k in both)}))`, in that order: pass each "
      "optimizer its own (`tx_a.update(..., activations=acts[0])`). Or capture each "
      "optimizer's loss "
      f"separately. Where {what} is trained by an optimizer that reads no activations "
      "(Adam), record it anyway and drop its activations (under `jit` they cost nothing).")


def model_kind(obj: Any) -> Optional[str]:
  """``"linen"``, ``"nnx"``, ``"equinox"`` or ``"haiku"`` for a model of that kind, else None.

  A Haiku model is what ``hk.transform`` (or ``hk.transform_with_state``) returns.

  An Equinox model is an ``eqx.Module`` holding a layer of ``eqx.nn`` (a function wrapped
  by ``eqx.filter_jit``, also an ``eqx.Module``, is not one).
  """
  import flax.linen as nn  # noqa: PLC0415 - loaded with flax
  from flax import nnx  # noqa: PLC0415
  if isinstance(obj, nn.Module):
    return "linen"
  if isinstance(obj, nnx.Module):
    return "nnx"
  hk = sys.modules.get("haiku")  # a Haiku model means Haiku is imported
  if hk is not None and isinstance(obj, (hk.Transformed, hk.TransformedWithState)):
    return "haiku"
  eqx = sys.modules.get("equinox")
  if eqx is not None and isinstance(obj, eqx.Module):
    nodes = jax.tree.leaves(obj, is_leaf=lambda n: isinstance(n, eqx.Module))
    if any(type(n).__module__.startswith("equinox.nn") for n in [obj, *nodes]):
      return "equinox"
  return None


CAPTURE_OF = {"linen": "capture", "nnx": "capture_nnx", "equinox": "capture_eqx",
              "haiku": "capture_hk"}
"""The capture function for each model kind."""

EXAMPLE_LOSS = {
    "linen": "def loss_fn(params, x, y): return jnp.mean((model.apply({'params': params}, x) "
             "- y) ** 2)",
    "nnx": "def loss_fn(model, x, y): return jnp.mean((model(x) - y) ** 2)",
    "equinox": "def loss_fn(model, x, y): return jnp.mean((jax.vmap(model)(x) - y) ** 2)",
    "haiku": "def loss_fn(params, x, y): return jnp.mean((model.apply(params, x) - y) ** 2)",
}
"""A loss function of each model kind, for the messages."""

FIRST_ARGUMENT = {"linen": "params", "nnx": "model", "equinox": "model", "haiku": "params"}

LABEL = {"linen": "linen", "nnx": "NNX", "equinox": "Equinox", "haiku": "Haiku"}
A_LABEL = {"linen": "a linen", "nnx": "an NNX", "equinox": "an Equinox", "haiku": "a Haiku"}


def check_captured_function(fn: Any, name: str) -> None:
  """Raises a ``TypeError`` saying what to write when ``name`` (``"capture"``,
  ``"capture_nnx"``, ``"capture_eqx"``, ``"capture_hk"``) is given a model, or anything that
  is not callable, instead of the loss function that applies the model.

  A linen Module passed to ``capture`` would fail at its first call with Flax's
  ``CallCompactUnboundModuleError``; an NNX or Equinox model passed to ``capture_nnx`` or
  ``capture_eqx`` would run on the batch as the "model" argument and capture nothing.
  """
  kind = model_kind(fn)
  if kind is None and callable(fn):
    return
  what = (f"the {LABEL[kind]} model `{type(fn).__name__}` itself" if kind is not None
          else f"a `{type(fn).__name__}` (not callable)")
  kind = kind or {v: k for k, v in CAPTURE_OF.items()}[name]
  raise TypeError(
      f"sngd: `{name}` takes the loss function that applies the model, "
      f"`loss_fn({FIRST_ARGUMENT[kind]}, *batch)`; it got {what}. For {A_LABEL[kind]} model "
      f"write `sngd_jax.{CAPTURE_OF[kind]}(loss_fn)({FIRST_ARGUMENT[kind]}, x, y)` with e.g. "
      f"`{EXAMPLE_LOSS[kind]}`.")


def check_not_other_models(args: tuple) -> None:
  """Raises a ``TypeError`` naming the capture to use when ``capture`` (linen) recorded
  nothing and is given an NNX or Equinox model (whose layers it does not intercept)."""
  for arg in args:
    kind = model_kind(arg)
    if kind in ("nnx", "equinox"):
      raise TypeError(
          f"sngd: `capture` records linen modules and recorded nothing; it was given the "
          f"{LABEL[kind]} model `{type(arg).__name__}`. Write "
          f"`sngd_jax.{CAPTURE_OF[kind]}(loss_fn)(model, x, y)` with e.g. "
          f"`{EXAMPLE_LOSS[kind]}`.")


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
        f"`(loss, (aux, acts)), grads = {_VALUE_AND_GRAD.get(name, 'jax.value_and_grad')}"
        "(wrapped, has_aux=True)(...)`.")
  return result, None


# The differentiation each capture function is used with (docs/training-loops.md): an Equinox
# model holds non-array leaves (its activation functions) that `jax.value_and_grad` rejects.
_VALUE_AND_GRAD = {"capture": "jax.value_and_grad", "capture_nnx": "nnx.value_and_grad",
                   "capture_eqx": "eqx.filter_value_and_grad"}


def _arity(result: Any) -> str:
  return f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""


def axes_shifted(kind: str, config: tuple, k: int) -> tuple:
  """``config`` for the same call with ``k`` more leading (row) axes."""
  if k == 0 or not config:
    return config
  if kind == "dense":
    axes, out_perm = config
    if out_perm is not None:
      out_perm = tuple(range(k)) + tuple(p + k for p in out_perm)
    return (tuple(a + k for a in axes), out_perm)
  if kind == "norm":
    (feature_axes,) = config
    return (tuple(a + k for a in feature_axes),)
  return config  # conv, conv_transpose, embed: axes counted from the end


def times_mask(c: Captured, w: jax.Array) -> Captured:
  """``c`` with the row weights ``w``, times those it already has (``row_mask``: weights
  compose, none replaces another): a conditional's ``[its branch ran]``
  (``transforms._conditional``), an earlier ``with_row_mask``'s."""
  return dataclasses.replace(c, row_mask=w if c.row_mask is None else w * c.row_mask)


def _finalized(p: Pending) -> Captured:
  """The record with its stack axes first and its config shifted past the pooled axes."""
  c = p.captured
  if not p.roles:
    return dataclasses.replace(c, ndim=c.inputs.ndim)
  stack = [i for i, r in enumerate(p.roles) if r.endswith(":stack")]
  pooled = len(p.roles) - len(stack)

  def order(a):
    if a is None or not stack:
      return a
    return jnp.moveaxis(a, stack, tuple(range(len(stack))))

  # Where the examples are: a vmap or a lax.map that pools (the user's vmap or map over the
  # batch) made them an axis of their own, else they are on the call's own example axis.
  pool_roles = [r for r in p.roles if not r.endswith(":stack")]
  time_steps = c.time_steps
  over_batch = [i for i, r in enumerate(pool_roles) if r in ("vmap:pool", "map:pool")]
  if over_batch:
    batch_axis: Optional[int] = len(stack) + over_batch[0]
    time_steps = 1
  elif c.batch_axis is None:
    batch_axis = None
  else:
    batch_axis = len(stack) + pooled + c.batch_axis
  return Captured(inputs=order(c.inputs), outputs=order(c.outputs), kind=c.kind,
                  config=axes_shifted(c.kind, c.config, pooled), stack=len(stack),
                  time_steps=time_steps, batch_axis=batch_axis, ndim=c.inputs.ndim,
                  row_mask=order(c.row_mask))  # a conditional's (transforms._conditional)


def leading_axes_pooled(c: Captured) -> Captured:
  """``c`` with the leading axes added after capture read as more rows of the batch.

  Activations returned from a ``jax.lax.scan`` (or ``vmap``) over micro-batches come
  with ``k`` more leading axes than capture gave them (``inputs.ndim - ndim``). They
  are moved after the stack axes, where capture puts the rows of a scan that pools,
  and the configuration is shifted past them, so every kind reads them as rows: the
  statistics of one batch holding all the micro-batches. The example axis stays the
  call's own (``stats_batch_size`` takes the first examples of each micro-batch), except
  for a record captured under its caller's ``jax.vmap`` (``vmapped``: per-example calls),
  whose examples are the innermost added axis, the one that vmap stacked (so
  ``stats_batch_size`` takes the first examples, every row of theirs, not the first
  positions of every example).
  """
  if c.ndim is None or c.inputs.ndim <= c.ndim:
    return c
  k = c.inputs.ndim - c.ndim
  if c.vmapped:
    batch_axis, time_steps = c.stack + k - 1, 1
  else:
    batch_axis = None if c.batch_axis is None else c.batch_axis + k
    time_steps = c.time_steps

  def move(a):
    if a is None:
      return None
    return jnp.moveaxis(a, tuple(range(k)), tuple(range(c.stack, c.stack + k)))

  return dataclasses.replace(
      c, inputs=move(c.inputs), outputs=move(c.outputs), row_mask=move(c.row_mask),
      config=axes_shifted(c.kind, c.config, k), batch_axis=batch_axis, time_steps=time_steps,
      ndim=c.inputs.ndim)


def stacked_rows_pooled(activations: Any) -> Any:
  """``leading_axes_pooled`` for every record of ``activations`` (anything else as it is,
  for the checks that name what is wrong)."""
  if not isinstance(activations, dict):
    return activations
  return {p: tuple(leading_axes_pooled(c) if isinstance(c, Captured) else c for c in calls)
          if isinstance(calls, (tuple, list)) else calls for p, calls in activations.items()}


def _weak(x: Any) -> Callable[[], Any]:
  """A weak reference to ``x`` (a strong one for the rare value that has none)."""
  try:
    return weakref.ref(x)
  except TypeError:
    return lambda: x


def current_trace() -> Any:
  """The innermost JAX trace now running (None if JAX does not say)."""
  from jax._src import core  # noqa: PLC0415 (JAX internals: the current trace)
  return getattr(getattr(core, "trace_ctx", None), "trace", None)


def _mapped_by(x: Any, trace: Any) -> bool:
  """Whether ``x`` is batched by the ``vmap`` whose trace is ``trace``."""
  return (isinstance(x, jax.core.Tracer) and getattr(x, "_trace", None) is trace
          and getattr(x, "batch_dim", 0) is not None)


def batched_by(x: Any, trace: Any) -> bool:
  """Whether ``x`` is batched by the ``vmap`` whose trace is ``trace``, also as the value that
  tracers of transforms inside that vmap wrap (an inner vmap's value, a JVP's primal). False
  when that is not known (a tracer of another kind: a ``jit`` inside the vmap)."""
  while isinstance(x, jax.core.Tracer):
    if getattr(x, "_trace", None) is trace:
      return getattr(x, "batch_dim", None) is not None
    inner = next((getattr(x, name) for name in ("val", "primal") if hasattr(x, name)), None)
    if inner is None or inner is x:
      return False
    x = inner
  return False


def _live_traces() -> Optional[set[int]]:
  """Ids of the current trace and the traces it nests in (None if JAX does not say).

  A tracer of any other trace belongs to a transform that has finished: it leaked
  out of it. (JAX's own ``Trace.is_valid`` is not kept up to date for every trace.)
  """
  trace = current_trace()
  if trace is None:
    return None
  live = set()
  while trace is not None:
    live.add(id(trace))
    trace = getattr(trace, "parent_trace", None)
  return live


def _escaped(x: Any, live: Optional[set[int]]) -> bool:
  """Whether ``x`` is a tracer of a trace that has ended (it leaked out of a transform)."""
  trace = getattr(x, "_trace", None) if isinstance(x, jax.core.Tracer) else None
  if trace is None:
    return False
  if hasattr(trace, "is_valid") and not trace.is_valid():
    return True
  return live is not None and id(trace) not in live


def _valid(records: dict[str, list[Pending]], escaped: set[str]) -> dict[str, list[Pending]]:
  """``records`` without the calls that hold leaked tracers (their paths go to ``escaped``)."""
  out = {}
  live = _live_traces()
  for path, calls in records.items():
    if any(_escaped(x, live) for x in jax.tree.leaves(calls)):
      escaped.add(path)
      continue
    out[path] = calls
  return out


def freeze(store: dict[str, list[Pending]], escaped: Optional[set[str]] = None,
           unmodelled: Iterable[str] = ()) -> Activations:
  """Turns a record store into the immutable activations dict.

  A layer with a call whose values could not leave a transform (see the module
  docstring) is dropped with a warning naming it, so ``update`` reports it as
  not captured (and ``fisher={path: None}`` leaves it to the next transform).
  """
  escaped = set(escaped or ())
  store = _valid(store, escaped)
  out = {}
  for path in sorted(set(unmodelled) - escaped):
    warnings.warn(
        f"sngd: layer {shown(path)} is a layer of a stack (its weight sliced by a scan or "
        "vmap over its params: `nn.scan`/`nnx.scan` over depth) called in some branches of a "
        "`cond`/`switch` inside that transform: the branch taken may differ between the "
        "layers of the stack, and the layers that took no branch calling it would get an "
        "estimate of zero, so its calls are not captured. Call it in every branch alike (a "
        "slot every branch fills is modelled), move the conditional outside the stacked "
        "transform, compute both branches and pick one with `jnp.where`, or pass "
        f"`fisher={{{path!r}: None}}`.", stacklevel=caller_stacklevel())
  escaped |= set(unmodelled)
  for path in sorted(escaped - set(unmodelled)):
    warnings.warn(
        f"sngd: layer {shown(path)} was called inside a JAX transform whose values cannot "
        "leave "
        "it (a jit, while_loop or fori_loop of traced bounds inside the "
        "captured function, including `nn.jit`, an `nnx.jit` given `in_shardings` or "
        "`out_shardings` (one without runs inline while capturing), "
        "`nn.while_loop`/`nnx.while_loop`; or a vmap, scan or checkpoint made before capture "
        "started, or called through a name imported from jax, such as `from jax import "
        "vmap`); its calls are not captured. Jit the whole training step instead of a "
        "part; call the layer outside the loop (a "
        "Python `for`, or a loop of a static "
        "number of steps as `jax.lax.fori_loop(0, n, ...)` or `jax.lax.scan(body, carry, "
        "None, length=n)`, whose calls are captured and pooled over its steps), make the "
        "transform "
        "inside the captured function and call it through its module (`jax.vmap`, "
        "`jax.lax.scan`, `jax.lax.map`, `jax.checkpoint`, `jax.remat`: capture replaces those "
        "attributes "
        f"while it runs), or pass `fisher={{{path!r}: None}}`. A loop that runs the model "
        "with no gradient through it (an inference pass inside the loss, such as a "
        "`while_loop` of a data-dependent length on `jax.lax.stop_gradient(params)`) needs "
        "none of these: pass the params it runs on to the captured function as an argument "
        "after the trained params (`loss(params, frozen_params, x)`, called as "
        "`loss(params, params, x)`; NNX: `loss_fn(model, nnx.clone(model), x)`), and capture "
        "leaves out the calls on them.",
        stacklevel=caller_stacklevel())
  for path, calls in store.items():
    if path not in escaped:
      out[path] = tuple(_finalized(c) for c in calls)
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
    return (self.value, Shared(self.records)), None

  @classmethod
  def tree_unflatten(cls, aux, children):
    del aux
    value, records = children
    return cls(value, records.tree if isinstance(records, Shared) else records)


@jax.tree_util.register_pytree_node_class
class Shared:
  """A tree of records whose leaves that are one array leave a transform once.

  Layers that read the same input (the four gates of an LSTM cell, the query, key
  and value projections of attention) record that one array; ``Recorder.add`` hands
  them the same stopped-gradient value. Flattened, the tree lists each distinct leaf
  once (and remembers where the others point), so a ``scan`` or ``vmap`` stacks and
  stores one copy of it, not one per layer: on the char-LSTM of the evaluation set
  the scan's record outputs shrink from eight arrays to two.
  """

  def __init__(self, tree):
    self.tree = tree

  def tree_flatten(self):
    leaves, treedef = jax.tree.flatten(self.tree)
    first: dict[int, int] = {}
    unique, index = [], []
    for leaf in leaves:
      i = first.setdefault(id(leaf), len(unique))
      if i == len(unique):
        unique.append(leaf)
      index.append(i)
    return tuple(unique), (treedef, tuple(index))

  @classmethod
  def tree_unflatten(cls, aux, children):
    treedef, index = aux
    return cls(jax.tree.unflatten(treedef, [children[i] for i in index]))


def untag(out: Any, time_axis: int, batched: bool = True,
          in_order: Optional[Any] = None) -> tuple[Any, dict[str, list[Pending]]]:
  """Strips ``StepRecords`` nodes from an RNN's output; returns the records.

  The records of every time step were stacked by the scan along
  ``time_axis``; the time axis is merged into the leading (batch) axis so each
  record keeps its per-step rank (and its config stays valid). An RNN run on
  one sequence without batch axes (``batched=False``: ``(T, *features)``, e.g.
  per example under a ``jax.vmap``) has no batch axis to merge into: its
  records keep the time axis as a new leading row axis (one example of
  ``T`` steps), and their config is shifted past it.

  ``in_order``: for an RNN run in reverse, the function (``rnn_step_order``) that puts the
  stacked steps back in the order of the input's positions, so that the row of time step
  ``t`` is the one of position ``t`` (what ``sngd_jax.with_row_mask`` reads; the
  statistics, sums over rows, do not depend on their order).
  """
  found: dict[str, list[Pending]] = {}

  def strip(node):
    if isinstance(node, StepRecords):
      for path, calls in node.records.items():
        for p in calls:
          c = p.captured
          c = c.replace(row_mask=_step_mask(c, time_axis, batched))
          if in_order is not None:
            c = c.replace(inputs=in_order(c.inputs), outputs=_maybe(in_order, c.outputs),
                          row_mask=_maybe(in_order, c.row_mask))
          steps = c.inputs.shape[time_axis] * c.time_steps
          if batched:
            merge = lambda a: None if a is None else _merge_time(a, time_axis)
            c = c.replace(inputs=merge(c.inputs), outputs=merge(c.outputs),
                          row_mask=merge(c.row_mask), time_steps=steps)
          else:
            lead = lambda a: None if a is None else jnp.moveaxis(a, time_axis, 0)
            c = c.replace(inputs=lead(c.inputs), outputs=lead(c.outputs),
                          row_mask=lead(c.row_mask), time_steps=steps,
                          config=axes_shifted(c.kind, c.config, 1), batch_axis=0)
          found.setdefault(path, []).append(p.replace(captured=c))
      return node.value
    return node

  out = jax.tree.map(strip, out, is_leaf=lambda n: isinstance(n, StepRecords))
  return out, found


def _maybe(f: Callable[[Any], Any], a: Any) -> Any:
  return None if a is None else f(a)


def _step_mask(c: Captured, time_axis: int, batched: bool) -> Optional[jax.Array]:
  """The row mask of a cell's record stacked over the RNN's steps (a conditional's inside the
  cell, ``transforms._conditional``: one per step, size 1 along the examples unless its
  predicate was batched), broadcast along the time axis and the batch axes before it (or the
  one after it, time-major), so that it is flipped per example and merged with time into
  rows exactly as the inputs are (``untag``). Unbroadcast, a ``(1, T, 1)`` mask met the
  merged ``(T * B, D)`` inputs and ``update`` failed in ``jnp.broadcast_to``."""
  m = c.row_mask
  if m is None:
    return None
  n = max(time_axis, 1) + 1 if batched else time_axis + 1
  return jnp.broadcast_to(m, c.inputs.shape[:n] + m.shape[n:])


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

  records: dict[str, list[Pending]] = dataclasses.field(default_factory=dict)
  stopped: dict[int, tuple[Callable[[], Any], Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class TransformFrame:
  """One call of a ``scan``/``vmap``/``checkpoint``/conditional/jit body while capturing.

  Attributes:
    kind: ``'scan'``, ``'vmap'``, or one whose records get no new axis: ``'checkpoint'``,
      ``'cond'`` (a branch of a conditional), ``'jit'`` (the function of an ``nnx.jit``
      that runs as a jit) and ``'while'`` (a ``while_loop``'s body or condition), whose
      records are dropped.
    inputs: ``id(inner leaf) -> (outer leaf, role)`` for the body's arguments;
      role ``'stack'`` (sliced / mapped), ``'pool'`` (carried / unmapped) or
      ``'none'`` (checkpoint).
    records: the records made inside, returned by the body as outputs.
    stopped: the stopped-gradient inputs of its records (``Recorder._stop_gradient``).
    trace: a ``vmap``'s trace (``current_trace()`` in its body; None elsewhere, or where JAX
      does not say), which tells the values it batches (``batched_by``).
  """

  kind: str
  inputs: dict[int, tuple[Any, str]]
  records: dict[str, list[Pending]] = dataclasses.field(default_factory=dict)
  stopped: dict[int, tuple[Callable[[], Any], Any]] = dataclasses.field(default_factory=dict)
  trace: Any = None

  @property
  def adds_axis(self) -> bool:
    return self.kind in ("scan", "vmap")


@dataclasses.dataclass
class DiscardFrame:
  """A trace whose results are thrown away (Flax's invariance pre-trace of ``nn.scan``)."""


Frame = Union[RNNFrame, CellFrame, TransformFrame, DiscardFrame]


_THREAD = threading.local()  # .recorders: this thread's running captures' recorders


def running() -> list[Recorder]:
  """The recorders of the captures running on this thread, innermost last (the list itself:
  ``transforms.recording`` pushes and pops)."""
  stack = getattr(_THREAD, "recorders", None)
  if stack is None:
    stack = _THREAD.recorders = []
  return stack


class Recorder:
  """Routes records to the output store, or to the innermost frame that returns them.

  Attributes:
    store: the records of calls outside any frame, by layer path.
    frames: the RNN, cell and transform calls in progress, innermost last.
    norm_slots: while a normalization layer runs, a slot per layer that the
      patched normalization routine fills with ``(xhat, feature_axes)``.
    escaped: layers with a call whose values could not leave a transform.
    unmodelled: layers of a stack (a scan over depth) called in some branches of a
      conditional inside it, whose calls are dropped (``transforms._conditional``).
    top: ``id(leaf) -> leaf path parts`` of the captured function's params
      argument, to name layers by their weight (NNX copies, Equinox).
    params: ``id`` of the differentiated leaves of the captured function's arguments where
      ``top`` does not hold the model's (linen: ``differentiated_leaves``): with ``top`` and
      ``looked_up``, the arrays ``transforms._whole_batch_steps`` reads as parameters, not
      the batch.
    derivation: the ``Derivation`` of the captured function's arguments (``derivation_of``;
      None when they are not differentiated), which ``origin`` reads.
    data: ``id`` of the array leaves of the captured function's other arguments (not the
      models', not differentiated, not PRNG keys, of one axis or more: the batch the user
      passed, ``transforms.data_leaves``): where a loop's lane reads both a closed-over array
      and a mapped slice that could each be its examples, the one that derives from these is
      the batch (``transforms._whole_calls``).
    readings, replaying: the draws-or-examples readings of the loops (``lax.map``, ``vmap``)
      nested in a loop's step, in the order a trace of the step makes them, and those that a
      trace of the step again (the probe) replays instead of tracing each nested loop's step
      once more (``transforms._reading``).
    looked_up: None, or ``id(array) -> weak reference to the array`` of every weight a layer
      looked up (``trace``) while it is a dict: ``transforms._whole_batch_steps`` tells a
      step's weights (parameters, whatever their path) from the batch it closes over. Weak: a
      weight made inside the step (a slice of stacked params under a scan) is a tracer of a
      trace that ends before the dict does, which a strong reference would leak
      (``jax.checking_leaks``).
    outputs: whether records keep the layers' outputs (only ``fisher="rfim"``
      reads them).
    custom_dense: what ``sngd_jax.dense`` calls while this recorder is active,
      ``(x, y, kernel, bias, layout) -> None``: names the hand-written layer in the
      capture's own way (linen: the calling module; NNX, Equinox: the kernel's path in
      the model) and records the call; set by each capture.
  """

  def __init__(self, top: Optional[dict[int, tuple[str, ...]]] = None, outputs: bool = False):
    self.outputs = outputs
    self.store: dict[str, list[Pending]] = {}
    self.frames: list[Frame] = []
    self.norm_slots: list[list] = []
    self.escaped: set[str] = set()
    self.unmodelled: dict[str, None] = {}
    self.top = top or {}
    self.custom_dense: Optional[Callable[..., None]] = None
    self.params: frozenset[int] = frozenset()
    self.data: frozenset[int] = frozenset()
    self.looked_up: Optional[dict[int, Callable[[], Any]]] = None
    self.derivation: Optional[Derivation] = None
    # the readings of the loops traced so far in the trace of an enclosing loop's step or lane
    # (``transforms._reading``), and those a trace of it again replays
    self.readings: Optional[list[tuple[Any, dict[str, list[bool]]]]] = None
    self.replaying: Optional[list[tuple[Any, dict[str, list[bool]]]]] = None
    # id(input) -> (weak reference to the input, stopped input) of the calls outside any
    # frame (a frame keeps its own, dropped with it): layers that read one array record one
    # value (``Shared``).
    self.stopped: dict[int, tuple[Callable[[], Any], Any]] = {}

  @property
  def records(self) -> dict[str, list[Pending]]:
    """The records of calls outside any frame (``store``), where a frame has its own."""
    return self.store

  def record_into(self, other: Recorder) -> None:
    """Makes this recorder record into ``other``'s store, frames and norm slots: a capture
    of another framework's layers nested in ``other``'s (the NNX module that an
    ``nnx.bridge.ToLinen`` runs inside a linen model)."""
    self.outputs, self.store, self.frames = other.outputs, other.store, other.frames
    self.norm_slots, self.escaped, self.stopped = other.norm_slots, other.escaped, other.stopped
    self.unmodelled = other.unmodelled

  def _target(self) -> Union[CellFrame, TransformFrame, Recorder, None]:
    """The innermost frame that returns records (or this recorder), None in a discarded
    trace; its ``records`` and ``stopped`` are where a record goes."""
    for frame in reversed(self.frames):
      if isinstance(frame, (CellFrame, TransformFrame)):
        return frame
      if isinstance(frame, DiscardFrame):
        return None
    return self

  def discarding(self) -> bool:
    """Whether a record made now is dropped (a trace of a ``DiscardFrame``: the trace of
    ``nn.scan``'s body outside the scan that Flax makes to check its broadcast variables)."""
    return self._target() is None

  @staticmethod
  def _stop_gradient(target: Union[CellFrame, TransformFrame, Recorder], x: Any) -> Any:
    """``jax.lax.stop_gradient(x)``, one value per array ``x`` in ``target``.

    Layers that read one array (an LSTM cell's gates, attention's q/k/v projections)
    then record the same value, which leaves a transform once (``Shared``). The
    cache holds a weak reference to ``x``, checked on a hit (an id is reused once its
    object is gone), and goes with the frame. It must not hold ``x`` itself: a layer called
    inside a derivative transform of the model's *inputs* (``jax.grad``, ``jax.jvp``,
    ``jax.hessian`` of the model at a point, as a physics-informed loss does) reads a
    tracer of that transform, which would outlive it in the cache (``jax.checking_leaks``
    reports it). The stopped value itself is the primal, a value of the enclosing trace.
    """
    entry = target.stopped.get(id(x))
    if entry is None or entry[0]() is not x:
      entry = target.stopped[id(x)] = (_weak(x), jax.lax.stop_gradient(x))
    return entry[1]

  def trace(self, weight: Any) -> tuple[tuple[str, ...], Optional[tuple[str, ...]]]:
    """Follows a layer's weight out through the transform frames.

    Args:
      weight: the weight array the layer read (kernel, scale or embedding), or None.

    Returns:
      ``(roles, parts)``: the role of each leading axis a record made now will
      get (outermost first), and the leaf path of the weight in the captured
      function's params argument (None when it is not one of its leaves).
    """
    if self.looked_up is not None and weight is not None:
      self.looked_up[id(weight)] = _weak(weight)
    roles, w, bypass = [], weight, False
    for frame in reversed(self.frames):
      if isinstance(frame, CellFrame):
        bypass = True  # the RNN route merges its own scan's axis
      elif isinstance(frame, RNNFrame):
        bypass = False
      elif isinstance(frame, TransformFrame):
        entry = frame.inputs.get(id(w)) if w is not None else None
        role = "pool"
        if entry is not None:
          w, role = entry
        if frame.adds_axis and not bypass:
          roles.append(f"{frame.kind}:{'stack' if role == 'stack' else 'pool'}")
    parts = self.top.get(id(w)) if w is not None else None
    if parts is None and w is not None and self.derivation is not None and self.derivation[2]:
      leaf = self.argument_leaf(w)  # a param's primal, read by a custom rule (``origin``)
      if leaf is not w and not _inside(self.derivation[0]):
        parts = self.top.get(id(leaf))
    return tuple(reversed(roles)), parts

  def origin(self, weight: Any) -> str:
    """Where a layer's weight comes from, with respect to the differentiation of the captured
    function's arguments (``derivation``), followed out through the transform frames:

    * ``'derived'``: a tracer of that differentiation: a leaf of the trained arguments, or an
      array computed from them inside the loss (a cast for mixed precision, ``nn.unbox``,
      ``nnx.merge``, a slice of stacked params, a tied weight); or the primal of a leaf of the
      trained arguments read by a custom rule (``_inside``);
    * ``'constant'``: no gradient reaches it from the arguments: a concrete array (a teacher,
      an EMA or target copy closed over at module level), or a tracer of a trace the
      differentiation nests in (such a copy passed into an outer ``jax.jit`` or ``jax.vmap``
      and closed over by the loss; the arguments under ``jax.lax.stop_gradient``);
    * ``'unknown'``: not differentiated, or a tracer of a transform made inside the loss that
      cannot be followed out (a weight computed inside a ``scan``/``checkpoint`` body), or a
      call JAX runs outside the differentiation, on its primals (a ``jax.custom_vjp``'s
      ``fwd``, a ``jax.custom_jvp``'s rule: ``_inside``) whose weight is not a trained leaf's
      primal (computed there from it, or a copy's), where the gradient may reach the params.

    Tracers of transforms made inside the loss are unwrapped to the value they batch or
    differentiate (a ``vmap``'s, a ``jvp``'s primal).
    """
    if self.derivation is None or weight is None:
      return "unknown"
    differentiation, below, primals = self.derivation
    w = self.outer(weight)
    while isinstance(w, jax.core.Tracer):
      trace = getattr(w, "_trace", None)
      if id(trace) in differentiation:
        return "derived"
      if id(trace) in below:
        break
      inner = next((getattr(w, name) for name in ("val", "primal") if hasattr(w, name)), None)
      if inner is None or inner is w:
        return "unknown"
      w = inner
    if not isinstance(w, (jax.Array, jax.core.Tracer)):
      return "unknown"
    if not _inside(differentiation):
      # a call that JAX runs outside the differentiation, on its primals (a `jax.custom_vjp`'s
      # `fwd`, a `jax.custom_jvp`'s rule): the trained params read there are not tracers of
      # it, yet the gradient reaches them through the rule
      return "derived" if id(w) in primals else "unknown"
    return "constant"

  def argument_leaf(self, weight: Any) -> Any:
    """The differentiated argument leaf whose primal ``weight`` is, or unwraps to as in
    ``origin`` (the param a custom rule, run on the primals, reads), else ``weight``."""
    primals = self.derivation[2] if self.derivation is not None else {}
    w = self.outer(weight)
    while id(w) not in primals:
      inner = next((getattr(w, name) for name in ("val", "primal") if hasattr(w, name)), None)
      if not isinstance(w, jax.core.Tracer) or inner is None or inner is w:
        return weight
      w = inner
    return primals[id(w)]

  def outer(self, x: Any) -> Any:
    """The caller's array that ``x`` (an array a layer reads, such as its weight) comes from,
    followed out through the transform frames: a slice of stacked params under a scan over
    depth is the stack."""
    for frame in reversed(self.frames):
      entry = frame.inputs.get(id(x)) if isinstance(frame, TransformFrame) else None
      if entry is not None:
        x = entry[0]
    return x

  def add(self, path: str, inputs, outputs, kind: str, config: tuple = (),
          weight: Any = None, roles: Optional[tuple[str, ...]] = None,
          batch_axis: Optional[int] = 0, origin: str = "unknown") -> None:
    """Records one call (gradients stopped) in the innermost frame that returns records.

    ``batch_axis``: the axis of ``inputs`` holding the call's examples (None for
    a per-example call, as Equinox layers are). ``origin``: the weight's (``origin``), which
    ``without_copies`` reads.
    """
    self._check_not_nested(path)
    if roles is None:
      roles = self.trace(weight)[0]
    target = self._target()
    if target is None:
      return
    outputs = jax.lax.stop_gradient(outputs) if self.outputs and outputs is not None else None
    target.records.setdefault(path, []).append(Pending(
        Captured(inputs=self._stop_gradient(target, inputs), outputs=outputs, kind=kind,
                 config=config, batch_axis=batch_axis), roles, origin))

  def _check_not_nested(self, path: str) -> None:
    """Raises when this recorder's capture has a capture nested in it on this thread (a
    captured function called inside another) whose transform frame is open: a call of layer
    ``path`` made there holds tracers of that transform, which returns the nested capture's
    records only, so this capture could not record it (it was dropped, or reported leaked as
    if under a ``jax.jit``)."""
    stack = running()
    for i, rec in enumerate(stack):
      if rec is self:
        if any(inner.frames for inner in stack[i + 1:]):
          raise ValueError(
              f"sngd: layer {path!r} of a captured model is called inside a JAX transform "
              "(`jax.vmap`, `jax.lax.scan`, `jax.checkpoint`, a cond, `jax.eval_shape`, an "
              "`nnx`/`eqx` transform) run by a capture nested in its capture (a captured "
              "function called inside another captured function): that transform returns "
              "the nested capture's records only, so this call cannot be recorded. Call the "
              "nested captured function outside the other one, record both models with one "
              "capture (`argnums=(0, 1)`), or call the layer outside the nested capture's "
              "transforms.")
        return

  def add_all(self, records: Union[dict[str, list[Pending]], Shared]) -> None:
    """Adds records that left a frame (their roles were set when they were made)."""
    found: dict[str, list[Pending]] = records.tree if isinstance(records, Shared) else records
    target = self._target()
    if target is None:
      return
    for path, calls in found.items():
      target.records.setdefault(path, []).extend(calls)

  def rnn_frame(self) -> Optional[RNNFrame]:
    """The RNN call whose cell is about to run: the innermost frame, but for the RNN's
    own transforms (its scan, a remat of the cell)."""
    for frame in reversed(self.frames):
      if isinstance(frame, RNNFrame):
        return frame
      if not isinstance(frame, TransformFrame):
        return None
    return None

  @contextlib.contextmanager
  def frame(self, frame: Any) -> Iterator[Any]:
    self.frames.append(frame)
    try:
      yield frame
    finally:
      self.frames.pop()

  @contextlib.contextmanager
  def rnn(self, cell_prefix: Optional[str] = None) -> Iterator[None]:
    with self.frame(RNNFrame(cell_prefix)):
      yield

  @contextlib.contextmanager
  def cell(self) -> Iterator[CellFrame]:
    with self.frame(CellFrame()) as frame:
      yield frame

  def leaving(self, frame: TransformFrame) -> Shared:
    """The records of a transform body, to return as outputs (leaked calls dropped;
    an array that several records hold leaves once, ``Shared``)."""
    return Shared(_valid(frame.records, self.escaped))

  def leaving_vmap(self, frame: TransformFrame, depth: int,
                   trace: Any) -> tuple[Shared, dict[str, list[Pending]]]:
    """The records of a ``vmap`` body, split into those its mapped axis batches and the rest.

    The first are returned as the body's outputs (stacked along the new axis). A record
    that the vmap does not batch, of a layer whose weight it does not map (role
    ``'vmap:pool'``), holds the same value in every lane: a vmap over the directions of
    Hessian-vector products (``jax.vmap(lambda v: jax.jvp(jax.grad(u), (x,), (v,))[1])``)
    or over probe vectors batches the tangents only, and JAX computes the layer's primal
    input once. It leaves the vmap as it is (a value of the enclosing trace, not of the
    vmap's), without the vmap's axis, so that each such input is one row, not one per
    lane, as when ``jax.hessian`` (whose own vmap is JAX's internal one) computes the same
    derivatives. A stacked layer (its weight mapped: an ensemble on one input) keeps the
    axis, one local Fisher per member.

    Args:
      frame: the vmap body's frame.
      depth: the index of this vmap's role in the records' ``roles`` (the number of
        enclosing frames that add an axis).
      trace: the vmap's trace (``current_trace()`` in its body); None keeps every record
        as an output.

    Returns:
      ``(outputs, unmapped)``: the records to return from the body, and the others with
      this vmap's role removed, to add to the enclosing frame after the vmap returns.
    """
    mapped: dict[str, list[Pending]] = {}
    unmapped: dict[str, list[Pending]] = {}
    for path, calls in _valid(frame.records, self.escaped).items():
      for p in calls:
        same = (trace is not None and len(p.roles) > depth and p.roles[depth] == "vmap:pool"
                and not any(_mapped_by(x, trace) for x in jax.tree.leaves(p.captured)))
        if same:
          p = dataclasses.replace(p, roles=p.roles[:depth] + p.roles[depth + 1:])
        (unmapped if same else mapped).setdefault(path, []).append(p)
    return Shared(mapped), unmapped

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

  def freeze(self) -> Activations:
    self.stopped.clear()
    return freeze(without_copies(self.store), self.escaped, self.unmodelled)


def without_copies(store: dict[str, list[Pending]]) -> dict[str, list[Pending]]:
  """``store`` without the calls of another copy of the model: of each layer called with a
  weight derived from the captured function's differentiated arguments (origin
  ``'derived'``), the calls whose weight no gradient of those arguments reaches (``'constant'``:
  a frozen teacher, an EMA or target copy the loss closes over) are left out. A layer called
  with constant weights only (a part frozen with ``jax.lax.stop_gradient``, a loss that is
  not differentiated) keeps them all, as does one with weights of unknown origin."""
  out = {}
  for path, calls in store.items():
    origins = {p.origin for p in calls}
    if "derived" in origins and "constant" in origins:
      calls = [p for p in calls if p.origin != "constant"]
    out[path] = calls
  return out


def leaf_paths(tree: Any, prefix: tuple[str, ...] = ()) -> dict[int, tuple[str, ...]]:
  """``id(array) -> path parts`` of the array leaves of ``tree``."""
  return {id(leaf): prefix + paths.leaf_parts(key_path)
          for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
          if isinstance(leaf, jax.Array)}


class OtherArgs:
  """The array leaves of the captured function's other arguments (``frozen``: ``id``s; the
  frozen half of ``eqx.partition``, a target network; used by the captures that name a layer
  by its weight's path, ``capture_eqx`` and ``capture_hk``), and those of them differentiated
  together with the model(s) (``trained``: ``id -> position``, ``records.trained_with``),
  whose layers' left-out calls are noted in ``left_out`` (position -> a layer)."""

  def __init__(self, frozen: frozenset[int] = frozenset(),
               trained: Optional[dict[int, int]] = None,
               names: Optional[dict[int, tuple[str, ...]]] = None):
    self.frozen = frozen
    self.trained = trained or {}
    self.names = names or {}  # id(array) -> its path parts in its own argument
    self.left_out: dict[int, str] = {}

  @classmethod
  def of(cls, args: tuple, positions: tuple[int, ...], models: Any,
         top: dict[int, tuple[str, ...]], rest: Any) -> OtherArgs:
    """The other arguments of a call ``fn(*args)`` whose models are at ``positions``
    (``top``: the models' ``leaf_paths``, ``rest``: the other arguments)."""
    others = [(k, arg) for k, arg in enumerate(args) if k not in positions]
    return cls(frozenset(leaf_paths(rest)) - frozenset(top),
               trained_with(jax.tree.leaves(models),
                            ((k, leaf) for k, arg in others for leaf in jax.tree.leaves(arg))),
               {i: parts for _, arg in others for i, parts in leaf_paths(arg).items()})

  def left_out_call(self, rec: Recorder, weight: Any, what: str) -> bool:
    """Whether a call whose weight is not the model's is left out: another argument's, or a
    copy the loss closes over whose weight no gradient of the arguments reaches (a frozen
    teacher, an EMA or target network: ``Recorder.origin`` is ``'constant'``)."""
    outer = rec.outer(weight)
    position = self.trained.get(id(outer), self.trained.get(id(weight)))
    if position is not None:
      parts = self.names.get(id(outer), self.names.get(id(weight)))
      name = (paths.join(parts[:-1]) if parts is not None
              else f"{what} (weight {getattr(weight, 'shape', None)})")
      self.left_out.setdefault(position, name)
    return (id(weight) in self.frozen or id(outer) in self.frozen
            or rec.origin(weight) == "constant")


def rnn_time_axis(inputs: Any, time_major: bool, cell: Any) -> int:
  """The time axis ``nn.RNN``/``nnx.RNN`` scans over (same rule as Flax)."""
  ndim = inputs.ndim
  axis = 0 if time_major else ndim - (cell.num_feature_axes + 1)
  return axis % ndim


def rnn_step_order(inputs: Any, cell: Any, time_major: bool, reverse: bool, keep_order: bool,
                   seq_lengths: Any) -> Optional[Any]:
  """For an RNN run in reverse, the map from its stacked steps to the input's positions.

  ``nn.RNN``/``nnx.RNN`` with ``reverse=True`` flip the sequences before the scan
  (``flip_sequences``: the whole time axis, or each example's first ``seq_lengths[b]``
  steps); the flip is its own inverse, so flipping the stacked records again puts step
  ``t``'s rows at position ``t``. With ``keep_order=True`` the RNN flips its outputs back,
  the records among them (they leave the scan as part of the cell's output). None when the
  records are already in the positions' order.
  """
  if not reverse or keep_order:
    return None
  from flax.linen.recurrent import flip_sequences  # noqa: PLC0415 (Flax's own flip)
  num_batch_dims = inputs.ndim - cell.num_feature_axes - 1
  return lambda a: flip_sequences(a, seq_lengths, num_batch_dims=num_batch_dims,
                                  time_major=time_major)


def rnn_batched(inputs: Any, cell: Any) -> bool:
  """Whether ``nn.RNN``/``nnx.RNN`` inputs have batch axes (not one ``(T, *features)``
  sequence)."""
  return inputs.ndim > cell.num_feature_axes + 1


def stack_shape(call: Captured) -> tuple[int, ...]:
  """The stack shape of a record (``()`` for an ordinary layer)."""
  return tuple(call.inputs.shape[:call.stack])

