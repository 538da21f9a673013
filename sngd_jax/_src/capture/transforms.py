"""The JAX transforms that return records while capturing: scan, vmap, checkpoint, cond.

Also ``jax.lax.fori_loop`` of static bounds, run as JAX runs it, a ``scan`` (so ``nnx.fori_loop``
and ``hk.fori_loop`` too), and ``jax.eval_shape``, whose trace records nothing.

Values made inside a transform are its tracers and must not escape it. While a
captured function runs, ``jax.lax.scan``, ``jax.lax.map`` (made of the ``scan`` and
``vmap`` below), ``jax.vmap``, ``jax.checkpoint`` and ``jax.remat`` are replaced by the
wrappers below, each a small function: the
body runs under a ``records.TransformFrame`` that maps its arguments to
the caller's, and returns the records made inside as extra outputs (``scan``
and ``vmap`` stack them along a new leading axis, ``checkpoint`` returns them
as they are). The records then join the enclosing frame (see ``records``
for the roles of the new axes; ``jax.lax.map``'s axis over the batch holds the examples, as
``vmap``'s does, its axis over steps that each see the whole batch does not, ``lax_map``; nor
does a ``vmap``'s over noise draws of the whole batch, ``_whole_batch_lanes``). A
record that a ``vmap`` does not batch (every lane read the same input, as under a vmap over
the directions of Hessian-vector products) leaves it without the new axis, once
(``Recorder.leaving_vmap``). The transforms of Flax (``nn.scan``, ``nn.vmap``, ``nn.remat``,
``nnx.scan``, ``nnx.vmap``, ``nnx.remat``) and of Equinox (``filter_vmap``,
``filter_checkpoint``) call these functions when they run, so they are covered
too.

The replacement is a per-thread swap (``swap.swapped``): while any capture runs, each name
is a dispatcher that runs the wrapper on a thread that captures and, elsewhere, the function
that was in place when the first capture began, which the last one to end puts back. That
function, not the one seen when sngd_jax was imported, is also what a wrapper calls: a patch a
user or another library made later (``jax.vmap = my_vmap``) runs inside a capture and stays
in place after it. Transforms that do not go through these names (a function
made by ``jax.vmap`` before capture started, ``jax.jit``, ``while_loop``) keep
their records inside, which are then detected as leaked and reported (never
used).

``jax.lax.cond`` and ``jax.lax.switch`` (so ``nn.cond``, ``nn.switch``, ``nnx.cond``,
``nnx.switch``, ``hk.cond``, ``hk.switch``, which call them) return the records of every
branch, the rows of the branches not taken weighing 0 (``_conditional``).

The function that ``nnx.jit`` returns runs its function inline while capturing (its
``__call__`` is replaced, ``_nnx_jit``), so that layers under an ``nnx.jit`` inside the
captured function are captured; one given shardings runs as a jit, its layers named by path.

One Flax internal is patched too: ``flax.core.axes_scan.scan`` traces the body
of ``nn.scan`` once outside the scan to check its broadcast variables; records
made in that trace are discarded (``records.DiscardFrame``).

Guarded by ``tests/test_transforms.py`` (every transform, nested, against the
unrolled model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import warnings
from typing import Any, Callable, Iterator, Optional

import flax.core.axes_scan as flax_axes_scan
import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from flax.nnx.transforms import compilation as nnx_compilation

from sngd_jax._src.capture import swap
from sngd_jax._src.capture.records import (
    DiscardFrame,
    Pending,
    Recorder,
    TransformFrame,
    batched_by,
    current_trace,
    differentiated_leaves,
    running,
    shown,
    times_mask,
)
from sngd_jax._src.frames import caller_stacklevel

# (owner, attribute, key of its wrapper in _WRAPPERS)
_TARGETS = ((jax.lax, "scan", "scan"), (jax.lax, "fori_loop", "fori_loop"),
            (jax.lax, "while_loop", "while_loop"),
            (jax.lax, "cond", "cond"), (jax.lax, "switch", "switch"),
            (jax.lax, "map", "map"), (jax, "vmap", "vmap"), (jax, "eval_shape", "eval_shape"),
            (jax, "checkpoint", "checkpoint"), (jax, "remat", "remat"),
            (flax_axes_scan, "scan", "axes_scan"),
            (nnx_compilation.JitWrapped, "__call__", "nnx_jit"),
            (nnx_compilation.SimpleJitWrapped, "__call__", "nnx_simple_jit"))
_OWNERS = {key: (owner, name) for owner, name, key in _TARGETS}


class _Originals:
  """``_ORIGINAL[key]``: the function a wrapper runs, the one in place when the first capture
  running began (``swap.unswapped``), not the one seen at import: a patch a user (or another
  library) made after importing sngd_jax (``jax.vmap = my_vmap``) is what a capture's wrapper
  calls, what another thread runs meanwhile, and what is in place after the capture."""

  def __getitem__(self, key: str) -> Callable:
    return swap.unswapped(*_OWNERS[key])


_ORIGINAL = _Originals()


def _active() -> Optional[Recorder]:
  """The recorder of the innermost capture running on this thread, if any."""
  stack = running()
  return stack[-1] if stack else None


def active() -> Optional[Recorder]:
  """The recorder of the innermost capture running on this thread (None outside capture)."""
  return _active()


def _leaves(tree: Any) -> list[Any]:
  return jax.tree.leaves(tree, is_leaf=lambda x: x is None)


def _inputs(inner: Any, outer: Any, roles: list[str]) -> dict[int, tuple[Any, str]]:
  """``id(inner leaf) -> (outer leaf, role)`` for matching trees of body arguments."""
  inner_leaves = _leaves(inner)
  outer_leaves = _leaves(outer)
  if len(inner_leaves) != len(outer_leaves):
    return {}
  return {id(i): (o, r) for i, o, r in zip(inner_leaves, outer_leaves, roles, strict=True)
          if i is not None}


def scan(f: Callable, init: Any, xs: Any = None, length: Optional[int] = None, *args,
         **kwargs) -> Any:
  """``jax.lax.scan`` whose body also returns its records (stacked over iterations).
  ``args``: ``reverse``, ``unroll`` passed by position (as Haiku's ``hk.scan`` does)."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["scan"](f, init, xs, length, *args, **kwargs)
  n_carry = len(_leaves(init))
  n_xs = len(_leaves(xs))
  roles = ["pool"] * n_carry + ["stack"] * n_xs

  def body(carry, x):
    frame = TransformFrame("scan", _inputs((carry, x), (init, xs), roles))
    with rec.frame(frame):
      carry, y = f(carry, x)
    return carry, (y, rec.leaving(frame))

  carry, (ys, records) = _ORIGINAL["scan"](body, init, xs, length, *args, **kwargs)
  rec.add_all(records)
  return carry, ys


def lax_map(f: Callable, xs: Any, *, batch_size: Optional[int] = None) -> Any:
  """``jax.lax.map`` made of this module's ``scan`` and ``vmap``, as JAX makes it of its own
  (whose inner names capture does not replace): ``f`` over the leading axis of ``xs``, with
  ``batch_size`` in chunks of that many under a ``vmap``, the remainder under one more.

  The records are those of ``batch_size=None`` (one axis of all ``n`` iterations), whatever
  ``batch_size``: each chunked record's (scan, vmap) axes are merged into one and the
  remainder's record is appended along it (``_merged``), so that a map over stacked params (an
  ensemble, ``lax.map(lambda p: model.apply(p, x), stacked)``) has one stack axis of ``n``
  layers, not calls of ``(chunks, batch_size)`` and ``(rest,)`` stacks. Where the map does not
  slice the layer's weight (a map over the batch, ``lax.map(lambda x: model.apply(params, x),
  batch)``), its axis holds the examples, as a ``jax.vmap``'s over the batch does (role
  ``'map:pool'``, ``_over_examples``): a ``(B,)`` row mask and ``stats_batch_size`` index it,
  not the call's own leading axis (a sequence's positions); unless every step's call reads the
  whole batch, closed over (a map over noise draws, ``lax.map(lambda k: model(x + noise(k)),
  keys)``: ``_whole_batch_steps``), whose axis is then a scan's, more rows of each example."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["map"](f, xs, batch_size=batch_size)
  leaves = jax.tree.leaves(xs)
  depth = len(rec.trace(None)[0])  # the index of this map's role in the records' roles
  if batch_size is None or not leaves:
    with _nested(rec) as nested, rec.frame(TransformFrame("checkpoint", {})) as frame:
      ys = scan(lambda _, x: ((), f(x)), (), xs)[1]  # the checkpoint frame adds no axis
    rec.add_all(_over_examples(frame.records, depth,
                               _whole(rec, f, xs, depth, frame.records, nested)))
    return ys
  n = leaves[0].shape[0]
  chunks, rest = divmod(n, batch_size) if batch_size else (0, n)
  ys, parts = [], []
  with _nested(rec) as nested:
    _chunked(rec, f, xs, batch_size, chunks, rest, ys, parts)
  records = _merged(parts, depth)
  rec.add_all(_over_examples(records, depth, _whole(rec, f, xs, depth, records, nested)))
  if len(ys) == 1:
    return ys[0]
  return jax.tree.map(lambda a, b: jax.lax.concatenate([a, b], 0), *ys)


def _chunked(rec: Recorder, f: Callable, xs: Any, batch_size: int, chunks: int, rest: int,
             ys: list[Any], parts: list[tuple[dict[str, list[Pending]], int]]) -> None:
  """``lax_map``'s chunks (a scan over vmaps of ``batch_size``) and remainder (a vmap): their
  outputs appended to ``ys``, their records (with the number of axes they add) to ``parts``."""
  cut = chunks * batch_size
  if chunks:
    chunked = jax.tree.map(lambda a: a[:cut].reshape(chunks, batch_size, *a.shape[1:]), xs)
    with rec.frame(TransformFrame("checkpoint", {})) as frame:  # collects, adds no axis
      _, out = scan(lambda _, x: ((), _vmap(f, 0, 0, (), {}, False)(x)), (), chunked)
    ys.append(jax.tree.map(lambda a: a.reshape(cut, *a.shape[2:]), out))
    parts.append((frame.records, 2))
  if rest:
    with rec.frame(TransformFrame("checkpoint", {})) as frame:
      ys.append(_vmap(f, 0, 0, (), {}, False)(jax.tree.map(lambda a: a[cut:], xs)))
    parts.append((frame.records, 1))


def _whole(rec: Recorder, f: Callable, xs: Any, depth: int, records: dict[str, list[Pending]],
           nested: list[tuple[Any, dict[str, list[bool]]]]) -> dict[str, list[bool]]:
  """``_whole_batch_steps`` of a ``lax_map`` whose records are ``records``, where one of them
  pools the map's axis (``'scan:pool'`` at ``depth``: the only role ``_over_examples``
  renames); else ``{}`` without tracing the step again (a map over stacked params, one whose
  step calls no layer: one trace of the step, as JAX's own ``lax.map`` makes)."""
  if not jax.tree.leaves(xs) or not any(
      len(p.roles) > depth and p.roles[depth] == "scan:pool"
      for calls in records.values() for p in calls):
    _passed_on(rec, nested)
    return {}
  return _reading(rec, _signature_of(records, depth), nested,
                  lambda: _whole_batch_steps(rec, f, xs, depth))


@contextlib.contextmanager
def _nested(rec: Recorder) -> Iterator[list[tuple[Any, dict[str, list[bool]]]]]:
  """Collects the readings (``_reading``) of the loops nested in the trace of a loop's step or
  lanes (as many as the trace makes, innermost first); in a trace that replays them, none."""
  outer, log = rec.readings, []
  rec.readings = None if rec.replaying is not None else log
  try:
    yield log
  finally:
    rec.readings = outer


def _signature_of(records: Any, depth: int) -> tuple:
  """What a loop's records are, from its own axis in (roles from ``depth``, inputs' shapes):
  a reading replayed must be of a loop whose records are alike."""
  return tuple((path, tuple((p.roles[depth:], tuple(p.captured.inputs.shape)) for p in ps))
               for path, ps in records.items())


def _reading(rec: Recorder, signature: tuple, nested: list[tuple[Any, dict[str, list[bool]]]],
             probe: Callable[[], dict[str, list[bool]]]) -> dict[str, list[bool]]:
  """A loop's reading (``_whole_batch_steps``, ``_whole_batch_lanes``): ``probe()``, a trace
  of its step or lane again in which the loops nested in it replay the readings they made in
  its own trace (``nested``), else each would trace its own step again too, doubling the
  traces of the innermost step at each level of nesting (2 ** depth; depth + 1 now). In a trace
  that replays (the probe of an enclosing loop, the same program traced again), the reading it
  made there, where the records are alike (else ``probe()``, replaying no more). The reading is
  logged, after those of the loops nested in it, for an enclosing loop's probe."""
  found = None
  if rec.replaying is not None:
    if rec.replaying and rec.replaying[0][0] == signature:
      found = rec.replaying.pop(0)[1]
    else:
      rec.replaying.clear()  # out of step: every later loop decides for itself
  if found is None:
    outer = rec.replaying, rec.readings
    rec.replaying, rec.readings = list(nested), None
    try:
      found = probe()
    finally:
      rec.replaying, rec.readings = outer
  _passed_on(rec, nested)
  if rec.readings is not None:
    rec.readings.append((signature, found))
  return found


def _passed_on(rec: Recorder, nested: list[tuple[Any, dict[str, list[bool]]]]) -> None:
  """The readings of the loops nested in a loop's step logged for an enclosing loop's probe,
  whose trace of that step replays them (``_reading``)."""
  if rec.readings is not None:
    rec.readings.extend(nested)


def _merged(parts: list[tuple[dict[str, list[Pending]], int]],
            depth: int) -> dict[str, list[Pending]]:
  """The records of ``lax_map``'s chunks (``k = 2`` axes: scan, vmap) and remainder
  (``k = 1``: vmap) as one record per call with one ``scan`` axis at ``depth`` (the index of
  the map's role). Records that do not pair up (a record that the vmap left without its axis,
  a layer called in one part only) are kept as they are."""
  def one_axis(p: Pending, k: int) -> Optional[Pending]:
    roles = p.roles[depth:depth + k]
    kinds = {r.split(":")[1] for r in roles}
    if len(roles) != k or len(kinds) != 1 or [r.split(":")[0] for r in roles] != (
        ["scan", "vmap"][2 - k:]):
      return None
    merge = lambda a: None if a is None else a.reshape(-1, *a.shape[k:])
    c = p.captured
    return Pending(dataclasses.replace(c, inputs=merge(c.inputs), outputs=merge(c.outputs)),
                   p.roles[:depth] + (f"scan:{kinds.pop()}",) + p.roles[depth + k:], p.origin)

  out: dict[str, list[Pending]] = {}
  paths = dict.fromkeys(path for records, _ in parts for path in records)
  for path in paths:
    calls = [records.get(path, []) for records, _ in parts]
    merged = [[one_axis(p, k) for p in c] for c, (_, k) in zip(calls, parts, strict=True)]
    if len({len(c) for c in calls}) != 1 or any(p is None for c in merged for p in c) or any(
        len({p.roles for p in ps}) != 1 for ps in zip(*merged, strict=True)):
      out[path] = [p for c in calls for p in c]
      continue
    out[path] = [ps[0] if len(ps) == 1 else Pending(dataclasses.replace(
        ps[0].captured, inputs=_cat([p.captured.inputs for p in ps]),
        outputs=_cat([p.captured.outputs for p in ps])), ps[0].roles, ps[0].origin)
        for ps in zip(*merged, strict=True)]
  return out


def _over_examples(records: dict[str, list[Pending]], depth: int,
                   whole: dict[str, list[bool]]) -> dict[str, list[Pending]]:
  """``records`` of a ``lax_map`` (its axis at ``depth`` of their roles) with the map's axis,
  where it pools (the weight is not mapped: a map over the batch), given role ``'map:pool'``:
  the axis holds the examples, as a ``jax.vmap`` over the batch's does (``records._finalized``
  makes it the example axis), so that a ``(B,)`` row mask weighs them and
  ``stats_batch_size=k`` takes the first ``k`` of them, every row of theirs. A map over
  stacked params (``'scan:stack'``) keeps its role: one local Fisher per index; so does a call
  whose every step saw the whole batch (``whole[path][j]``, ``_whole_batch_steps``: a map over
  noise draws), whose axis is then a scan's, more rows of each example."""
  def renamed(p: Pending, flag: bool) -> Pending:
    if flag or len(p.roles) <= depth or p.roles[depth] != "scan:pool":
      return p
    return dataclasses.replace(p, roles=p.roles[:depth] + ("map:pool",) + p.roles[depth + 1:])

  out = {}
  for path, calls in records.items():
    flags = whole.get(path, [])
    if len(flags) != len(calls):  # calls that did not pair up across the chunks (`_merged`):
      flags = [len(set(flags)) == 1 and flags[0]] * len(calls)  # their path's, if one
    out[path] = [renamed(p, flag) for p, flag in zip(calls, flags, strict=True)]
  return out


def _whole_batch_steps(rec: Recorder, f: Callable, xs: Any, depth: int) -> dict[str, list[bool]]:
  """Per layer path, per call of ``f`` (one step of a ``jax.lax.map`` over ``xs``): whether
  the call already holds the examples of the batch on an axis of its own, so that the map's
  axis is *not* the examples (noise draws, Monte Carlo samples, augmentations, diffusion times:
  every step sees the whole batch, ``lax.map(lambda k: model(x + noise(k)), keys)``).

  Decided from the program, by one extra trace of a step (``jax.make_jaxpr``, its records kept
  apart; the maps and vmaps nested in the step replay there the readings they made in the map's own
  trace, ``_reading``, so that nested loops add one trace each): a call's example axis within the
  step is the axis of a ``jax.vmap`` or ``lax.map`` over the examples inside it, else the call's own
  (``Captured.batch_axis``); of size ``b`` (per time step of a cell). The step *sees the whole
  batch* when the call's input depends, in the step's jaxpr, on an array the step closes over (not
  one of the mapped operands ``xs``) whose leading axis is ``b`` long and that is not a parameter (a
  leaf of the captured function's params, ``Recorder.top`` and ``Recorder.params``, or a weight that
  a layer of the step reads, ``Recorder.looked_up``) nor PRNG keys (``_keys``): the batch the caller
  closed over (``lax.map(lambda k: model(x + noise(k)), keys)``), also as activations computed from
  it outside the map (``h = trunk(x); lax.map(lambda k: head(dropout(h, k)), keys)``), which are
  differentiated as parameters are. Then each step's call has its own examples, and the map's axis
  is pooled, a scan's (``stats_batch_size=k`` takes the first ``k`` examples of every step, as under
  ``jax.lax.scan``). Otherwise (the call's rows come from the mapped operand alone: one example, a
  micro-batch; or it has no example axis) the map's axis holds the examples, ``'map:pool'``.

  Where the call also depends on a mapped operand whose step slice has ``b`` rows, or the shape
  of one row of that closed-over array, the program does not tell: noise draws of a
  closed-over ``(B, D)`` batch mapped over ``(S, B, D)`` noise, and single ``(T, D)`` examples
  mapped over a ``(B, T, D)`` batch with a closed-over ``(T, D)`` table of positions, have the
  same shapes and data flow; so have ``(D,)`` examples mapped around a vmap over a closed-over
  ``(S, D)`` noise array and ``(D,)`` noise vectors mapped around a vmap over a closed-over
  ``(B, D)`` batch (``_whole_calls``), unless exactly one of the two derives from the captured
  function's arguments (the batch the user passed). Such a call is read as over the
  examples (the documented default, as a ``jax.vmap``'s), with a warning naming the layer and
  how to say otherwise: ``jax.lax.scan``, whose axis is never the examples, or keys mapped and
  the noise drawn inside; ``jax.vmap`` for the examples. So is every call of a step that cannot
  be traced again."""
  found: list[list[tuple[str, Optional[int]]]] = []  # (path, step's examples) per call

  weights: dict[int, Callable[[], Any]] = {}  # the step's layers' weights (`Recorder.looked_up`)

  def step(x):
    frame = TransformFrame("scan", _inputs(x, xs, ["stack"] * len(_leaves(xs))))
    return _probed_calls(rec, frame, lambda: f(x), weights, found, depth)

  one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
  try:
    closed = jax.make_jaxpr(step)(one)
  except Exception as e:  # noqa: BLE001 - the map itself will raise what is wrong with it
    warnings.warn(
        "sngd: could not trace one step of a `jax.lax.map` again to tell whether its steps "
        f"are examples or each sees the whole batch ({type(e).__name__}: {e}); its axis is "
        "read as the examples (as a `jax.vmap` over the batch). If every step sees the whole "
        "batch (noise draws, Monte Carlo samples), write the loop as `jax.lax.scan`, whose "
        "axis is more rows of each example.", stacklevel=caller_stacklevel())
    return {}
  outer = jax.tree.leaves(xs)  # the mapped arrays, one per invar of the step
  if len(outer) != len(closed.jaxpr.invars):
    outer = [None] * len(closed.jaxpr.invars)
  return _whole_calls(
      rec, closed, found[0] if found else [], weights,
      [(v, tuple(v.aval.shape), x) for v, x in zip(closed.jaxpr.invars, outer, strict=True)
       if hasattr(v.aval, "shape")],
      "a `jax.lax.map` reads, in each step,", "step sees",
      "`jax.lax.scan` (its axis is more rows of each example) or map over keys and draw the "
      "noise inside; if the map is over the examples, write it as `jax.vmap`")


def _probed_calls(rec: Recorder, frame: TransformFrame, run: Callable[[], Any],
                  weights: dict[int, Callable[[], Any]],
                  found: list[list[tuple[str, Optional[int]]]], depth: int) -> list[Any]:
  """One step of a ``lax.map`` or lane of a ``vmap`` traced again (``_whole_batch_steps``,
  ``_whole_batch_lanes``): ``run()`` in ``frame``, the weights its layers look up noted in
  ``weights`` (``Recorder.looked_up``; also in an enclosing probe's, as a map inside another's
  step reads the outer step's weights too), each call's path and examples in ``found`` (no
  tracer kept); returns the calls' inputs, the outputs of the traced jaxpr."""
  outer, rec.looked_up = rec.looked_up, weights
  try:
    with rec.frame(frame):
      run()
  finally:
    rec.looked_up = outer
    if outer is not None:
      outer.update(weights)
  calls = [(path, p) for path, ps in frame.records.items() for p in ps]
  found[:] = [[(path, _step_examples(p, depth)) for path, p in calls]]
  return [p.captured.inputs for _, p in calls]


def _whole_calls(rec: Recorder, closed: Any, found: list[tuple[str, Optional[int]]],
                 weights: dict[int, Callable[[], Any]], lanes: list[tuple[Any, tuple, Any]],
                 where: str, sees: str, advice: str) -> dict[str, list[bool]]:
  """Per layer path, per call: whether the call's input (an output of ``closed``, the jaxpr of
  one step or lane, in the order of ``found``: each call's path and examples ``b``) depends on
  a closed-over array of ``b`` leading rows that is not a parameter (``Recorder.top``,
  ``Recorder.params``, or in ``weights``: those the step's layers looked up) nor PRNG keys (the
  whole batch), and not on a mapped operand (``lanes``: each invar of ``closed`` with its shape
  in one step) that could be the examples: one whose slice has ``b`` rows, or has the shape of
  one row of such a closed-over array (a single example of a batch mapped by an outer loop,
  ``jax.vmap(lambda xi: jax.vmap(lambda n: model(xi + n))(noise))(x)``: the closed-over
  ``(S, D)`` noise and the ``(D,)`` example ``xi`` are the mirror of ``(D,)`` noise vectors
  mapped around a vmap over a closed-over ``(B, D)`` batch). Keys mapped are never the
  examples. Where the call depends on both, the batch the user passed tells them apart
  (``_from_data``, ``Recorder.data``: the captured function's other arguments than the
  models): the closed-over array is the batch (True) where one that the call reads derives from
  those arguments and no such mapped operand does, as Equinox's ``jax.vmap(lambda n:
  jax.vmap(model)(x + n))(noise)`` over noise made in the loss; the mapped operand is (False)
  in the mirror case, the examples ``x`` passed and the noise made in the loss. Where both
  derive from them (the noise passed too) or neither (the batch closed over, or computed from
  the argument outside the loop without ``jit``, where an array keeps no trail), False with a
  warning (``_whole_batch_steps``).

  A NumPy array of ``b`` rows closed over is the batch only where the call reads no such
  mapped operand (an eager loss over draws of a NumPy batch, not under ``jit``, where the
  batch is not a tracer); where it does, it is a table the model computes with NumPy
  (positions, masks, inside the step or outside it), and the examples reading is kept
  without a warning (a map over ``(S, B, D)`` noise arrays of an eager NumPy batch is then
  read as over the examples without one: map over keys and draw the noise inside)."""
  wants: dict[str, list[tuple[Any, Optional[int]]]] = {}
  for (path, b), v in zip(found, closed.jaxpr.outvars, strict=True):
    wants.setdefault(path, []).append((v, b))
  sizes = {b for calls in wants.values() for _, b in calls}
  jaxpr = closed.jaxpr
  leading = lambda a, b: len(getattr(a, "shape", ())) >= 1 and a.shape[0] == b
  whole, ambiguous = {}, []
  for b in (b for b in sizes if b is not None):
    held = [(v, c) for v, c in zip(jaxpr.constvars, closed.consts, strict=True)
            if leading(c, b) and id(c) not in rec.top and id(c) not in rec.params
            and not _looked_up(weights, c) and not _keys(c)]
    batch = _depending(jaxpr, [v for v, c in held if not isinstance(c, np.ndarray)])
    tables = _depending(jaxpr, [v for v, c in held if isinstance(c, np.ndarray)])
    rows = {tuple(c.shape[1:]) for _, c in held}
    could = [(v, x) for v, sh, x in lanes if sh and not _keys(v.aval)
             and (sh[0] == b or sh in rows)]
    mapped = _depending(jaxpr, [v for v, _ in could])
    # which of the two could be the examples derives from the batch the user passed
    given = _depending(jaxpr, [v for v, c in held if mapped and _from_data(rec, c)])
    passed = _depending(jaxpr, [v for v, x in could if held and _from_data(rec, x)])
    for path, calls in wants.items():
      for j, (v, vb) in enumerate(calls):
        if vb != b or hasattr(v, "val") or (v not in batch and v not in tables):
          continue
        if v not in mapped or (v in given and v not in passed):
          whole[(path, j)] = True
        elif v in batch and (v in passed) == (v in given):
          ambiguous.append(path)
  if ambiguous:
    warnings.warn(
        f"sngd: layer {', '.join(map(shown, dict.fromkeys(ambiguous)))} under {where} "
        "both an array it closes over and a slice of the mapped operand that could be its "
        "examples (as many rows, or one row of that array): a map over the batch's examples "
        "(with a closed-over table of positions, or a closed-over array of draws of each "
        "example) and a map over noise draws of a closed-over batch look alike. Its axis is "
        f"read as the examples (as a `jax.vmap` over the batch); if every {sees} the whole "
        f"batch (noise draws, Monte Carlo samples), write the loop as {advice}. Or pass the "
        "batch to the captured function as an argument and make the noise in it (not an "
        "argument): of the two, the array computed from the arguments is the batch.",
        stacklevel=caller_stacklevel())
  return {path: [whole.get((path, j), False) for j in range(len(calls))]
          for path, calls in wants.items()}


def _looked_up(weights: dict[int, Callable[[], Any]], c: Any) -> bool:
  """Whether ``c`` is a weight in ``weights`` (``Recorder.looked_up``'s weak references: an id
  whose weight is gone may be ``c``'s now)."""
  ref = weights.get(id(c))
  return ref is not None and ref() is c


def data_leaves(rest: Any, exclude: frozenset[int] = frozenset()) -> frozenset[int]:
  """``Recorder.data``: ``id`` of the array leaves of ``rest``, a captured function's other
  arguments than its models (the batch the user passed, ``capture(loss)(params, x, y)``), of one
  axis or more and not PRNG keys (typed, or raw uint32 ones of a last axis of 2, a single key
  among them: noise drawn from a key argument is not the batch) nor in ``exclude`` (the
  models' leaves, the differentiated ones)."""
  exclude = exclude | differentiated_leaves(rest)
  raw_key = lambda a: a.dtype == np.uint32 and a.shape[-1] == 2
  return frozenset(id(a) for a in jax.tree.leaves(rest)
                   if isinstance(a, (jax.Array, np.ndarray)) and id(a) not in exclude
                   and len(a.shape) >= 1 and not _keys(a) and not raw_key(a))


def _from_data(rec: Recorder, value: Any, limit: int = 20000) -> bool:
  """Whether ``value`` (an array the loop closes over, or one it maps) is, or is computed
  from, a leaf of ``rec.data``: followed back through the tracers it is made of (the equation
  that made a ``jit`` trace's tracer, a ``vmap``'s batched value, a differentiation's primal),
  ``limit`` values at most. An array computed outside any trace (a loss run without ``jit``)
  keeps no trail: only the argument itself is found."""
  if not rec.data:
    return False
  todo, seen = [value], set()
  while todo and len(seen) < limit:
    a = todo.pop()
    if id(a) in seen:
      continue
    seen.add(id(a))
    if id(a) in rec.data:
      return True
    if not isinstance(a, jax.core.Tracer):
      continue
    parent = getattr(a, "parent", None)  # a `jit` trace's tracer: the equation making it
    todo.extend(getattr(parent, "in_tracers", None) or ())
    for name in ("primal", "val"):  # differentiation, `vmap` (a `jit` tracer's is a variable)
      inner = getattr(a, name, None)
      if isinstance(inner, (jax.core.Tracer, jax.Array, np.ndarray)):
        todo.append(inner)
  return False


def _keys(a: Any) -> bool:
  """Whether ``a`` is an array of PRNG keys (typed, or raw ``(n, 2)`` uint32 ones): never the
  batch, but the draws of a vmap over draws inside a vmap over the examples
  (``jax.vmap(lambda xi: jax.vmap(lambda k: model(xi + noise(k)))(keys))(x)``, ``keys``
  closed over), whose axis is then the examples of the inner calls."""
  dtype = getattr(a, "dtype", None)
  if dtype is None:
    return False
  if jnp.issubdtype(dtype, jax.dtypes.prng_key):
    return True
  return dtype == jnp.uint32 and len(a.shape) == 2 and a.shape[-1] == 2


def _step_examples(p: Pending, depth: int) -> Optional[int]:
  """The number of examples a record made in one step of a ``lax_map`` or lane of a ``vmap``
  (its role at ``depth``) holds on an axis of its own: that of the first ``vmap``/``lax.map``
  over the examples inside the step, else its own ``batch_axis`` (per time step); None without
  one."""
  inner = p.roles[depth + 1:]
  shape = p.captured.inputs.shape
  for i, r in enumerate(inner):
    if r in ("vmap:pool", "map:pool"):
      return shape[i]
  c = p.captured
  own = len(shape) - len(inner)  # the call's own axes (a single vector: no example axis)
  if c.batch_axis is None or c.batch_axis >= own or (own == 1 and c.kind != "embed"):
    return None
  return shape[len(inner) + c.batch_axis] // c.time_steps


def _depending(jaxpr: Any, sources: list[Any]) -> set:
  """The variables of ``jaxpr`` that depend on one of ``sources`` (its variables), through any
  equation: every output of an equation depends on all its inputs, sub-jaxprs included."""
  hit = set(sources)
  for eqn in jaxpr.eqns:
    if any(not hasattr(v, "val") and v in hit for v in eqn.invars):
      hit.update(eqn.outvars)
  return hit


def _cat(arrays: list[Any]) -> Any:
  return None if arrays[0] is None else jax.lax.concatenate(arrays, 0)


def fori_loop(lower: Any, upper: Any, body_fun: Callable, init_val: Any, **kwargs) -> Any:
  """``jax.lax.fori_loop`` whose body's records leave it: with static bounds, as JAX itself
  runs it, this module's ``scan`` over ``(i, val)`` for ``upper - lower`` steps (the calls
  pooled over the steps, as the unrolled loop's); with traced bounds (a ``while_loop``, which
  has no reverse-mode gradient) JAX's own, its body's calls named through the carry and dropped
  as not captured (reported), as ``while_loop``'s."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["fori_loop"](lower, upper, body_fun, init_val, **kwargs)
  try:
    start, stop = int(lower), int(upper)
  except (TypeError, jax.errors.ConcretizationTypeError):
    named = _named_loop_fn(rec, body_fun, init_val, carry_arg=1)
    return _ORIGINAL["fori_loop"](lower, upper, named, init_val, **kwargs)
  if stop <= start:
    return init_val
  unroll = kwargs.pop("unroll", None)

  def body(carry, _):
    i, val = carry
    return (i + 1, body_fun(i, val)), None

  return scan(body, (jnp.asarray(lower), init_val), None, stop - start,
              unroll=False if unroll is None else unroll, **kwargs)[0][1]


def while_loop(cond_fun: Callable, body_fun: Callable, init_val: Any) -> Any:
  """``jax.lax.while_loop`` whose calls are named, not captured: a ``while_loop`` has no
  captured form (its number of steps is not known when tracing, and no reverse-mode gradient),
  so the records made in ``cond_fun`` or ``body_fun`` are dropped as not captured
  (``Recorder.escaped``: capture warns, naming the layers, and ``update`` raises naming them),
  as a jit's are (``_jit_body``). The loop's carry is followed out to ``init_val``, so that a
  weight that the loop threads through its carry (Haiku's ``hk.while_loop`` carries the params,
  as do ``nn.while_loop`` and ``nnx.while_loop`` their variables) is named by its path: a layer
  of the trained params, or one of a later argument's (an inference pass's params, left out of
  the statistics without a warning)."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["while_loop"](cond_fun, body_fun, init_val)
  return _ORIGINAL["while_loop"](_named_loop_fn(rec, cond_fun, init_val),
                                 _named_loop_fn(rec, body_fun, init_val), init_val)


def _named_loop_fn(rec: Recorder, f: Callable, init_val: Any, carry_arg: int = 0) -> Callable:
  """``f`` (a loop's body or condition, its carry the positional argument ``carry_arg``) run
  in a ``'while'`` frame whose inputs are followed out to ``init_val``: the calls it makes are
  named by their weights' paths and dropped as not captured (``Recorder.escaped``)."""
  n_carry = len(_leaves(init_val))

  @functools.wraps(f)
  def run(*args):
    frame = TransformFrame("while", _inputs(args[carry_arg], init_val, ["none"] * n_carry))
    with rec.frame(frame):
      out = f(*args)
    rec.escaped.update(frame.records)
    return out
  return run


def _cond_index(pred: Any) -> Any:
  """The branch a ``cond`` takes as ``switch`` numbers them: 1 (``true_fun``) where ``pred`` is
  nonzero, else 0 (JAX's ``cond`` is ``switch(pred, [false_fun, true_fun])``)."""
  return (jnp.asarray(pred) != 0).astype(jnp.int32)


def _switch_index(index: Any, n: int) -> Any:
  """The branch a ``switch`` of ``n`` branches takes: ``index`` clamped to ``[0, n - 1]``, as
  JAX clamps it."""
  return jnp.clip(jnp.asarray(index).astype(jnp.int32), 0, n - 1)


def _signature(p: Pending) -> tuple:
  """What a record's slot in a conditional's outputs is: its tree (static fields, roles) and
  its arrays' shapes and dtypes."""
  leaves, treedef = jax.tree.flatten(p)
  return treedef, tuple((tuple(x.shape), jnp.result_type(x)) for x in leaves)


def _batched_everywhere(rec: Recorder, index: Any) -> bool:
  """Whether every ``vmap`` the conditional runs in batches its ``index`` (a branch per
  example): JAX then runs it as a select of every branch, and each of its outputs is batched,
  whatever the branches return. A ``vmap`` whose trace is not known keeps every record's axis
  (``Recorder.leaving_vmap``) and counts as batching it."""
  return all(batched_by(index, f.trace) for f in rec.frames
             if isinstance(f, TransformFrame) and f.kind == "vmap" and f.trace is not None)


def _buffers(slots: dict[str, list[tuple[tuple, Pending, set[int]]]],
             members: dict[tuple[str, int], dict[int, Pending]],
             share: bool) -> tuple[list[tuple[tuple, Any]], dict[tuple[str, int], list[int]]]:
  """The arrays a conditional returns for its records, and which of them each slot's
  leaves read: ``(buffers, where)``, ``buffers[b] = (shape, dtype)``, ``where[slot]`` a buffer
  per leaf of the slot's record (in ``jax.tree.leaves`` order).

  Only one branch runs, so the leaves of slots that no branch fills both can hold one buffer:
  each branch writes its own leaves, and a slot that the branch taken does not fill reads
  another's rows, weighed 0 by its mask ``[its branch ran]``. A buffer holds, per branch, at
  most one array (two slots' leaves share it where they hold the same array in every branch
  that fills both: layers that read one input, ``records.Shared``). Across slots (``share``)
  only floating-point leaves are shared (token ids keep their own: those of one table are
  not another's); with ``share`` False (a ``vmap`` around the conditional that does not batch
  its index, where an output is batched when any branch's array is, and a record that the
  vmap does not batch leaves it without its axis, ``Recorder.leaving_vmap``) only the arrays
  that one slot's leaves hold in every branch alike are one buffer.

  ``members[slot]``: per branch that fills the slot, its record (of the traced shapes; the
  records that hold one array hold one object, as ``records.Shared`` rebuilds them).
  """
  buffers: list[tuple[tuple, Any]] = []
  held: list[dict[int, int]] = []  # per buffer: branch -> id of the array it holds there
  where: dict[tuple[str, int], list[int]] = {}
  for path, row in slots.items():
    for k, (sig, _, takers) in enumerate(row):
      slot = (path, k)
      if slot not in members:  # dropped (a layer of a stack in some branches only)
        continue
      leaves = {i: jax.tree.leaves(p) for i, p in members[slot].items()}
      where[slot] = []
      for q, kind in enumerate(sig[1]):
        ids = {i: id(leaves[i][q]) for i in takers}
        across = share and jnp.issubdtype(kind[1], jnp.inexact)
        b = next((b for b, (other, h) in enumerate(zip(buffers, held, strict=True))
                  if other == kind and all(h.get(i, u) == u for i, u in ids.items())
                  and (across or set(h) == set(ids))), None)
        if b is None:
          b = len(buffers)
          buffers.append(kind)
          held.append({})
        held[b].update(ids)
        where[slot].append(b)
  return buffers, where


def _conditional(rec: Recorder, index: Any, branches: list[Callable],
                 operands: tuple) -> Any:
  """``switch(index, branches, *operands)`` whose branches' records leave it, each call's
  rows weighted by whether its branch ran.

  A branch's values cannot leave it, but the conditional's outputs can, and every branch must
  return outputs of one structure. So each branch is traced once, to a jaxpr (as
  ``jax.lax.switch`` itself traces it), with its records as extra outputs; the records of all
  branches are laid out in slots (per layer path, the ``j``-th call of a branch joins the
  ``j``-th slot when its shapes and static fields are the slot's, else a slot of its own);
  and the conditional runs the jaxprs, each filling its own slots. A slot that every branch
  fills (a layer called alike in each branch) is a plain record: it holds the rows of the
  branch taken. A slot filled by some branches only gets a row mask (``Captured.row_mask``,
  size 1 along every axis) of ``[index in those branches]``: the rows of a branch not taken
  weigh 0, and a layer with no rows of weight > 0 in a step keeps its factor
  (``statistics.weighted_rows``), as one outside the batch would. Under a ``jax.vmap`` whose
  predicate is batched (a branch per example, which JAX runs as a select of both branches),
  the mask is per example: each example's rows count for the branch it took.

  The slots' arrays are laid out in buffers (``_buffers``): slots that no branch fills both
  share a buffer of their shape and dtype, which holds the rows of the branch taken (another
  layer's, weighed 0, in a slot whose branch did not run). So a ``switch`` of ``n`` branches
  of one layer each returns one array, not ``n`` (a scan around it stacks one); the rows each
  layer's statistics weigh are those of its own branch, as before, provided the branch taken
  computes finite values (``0 * inf`` is not 0). Around a ``vmap`` that does not batch the
  index, buffers are not shared across slots (see ``_buffers``).

  A slot that some branches leave empty, of a layer whose weight a transform outside the
  conditional stacks (an ``nn.scan`` over depth whose body holds the conditional), is not
  modelled: the predicate may differ between the layers of the stack, and a layer of the
  stack with no rows would get an estimate of zero. Its path is reported
  (``Recorder.unmodelled``) and its calls dropped (the conditional does not return them).
  """
  depth = len(rec.trace(None)[0])  # the axes of transforms outside the conditional
  n_ops = len(_leaves(operands))
  traced = []
  for f in branches:
    def body(*inner, f=f):
      frame = TransformFrame("cond", _inputs(inner, operands, ["none"] * n_ops))
      with rec.frame(frame):
        out = f(*inner)
      return out, rec.leaving(frame)
    closed, shape = jax.make_jaxpr(body, return_shape=True)(*operands)
    traced.append((closed, jax.tree.structure(shape), shape[1].tree))
  # slots[path]: [(signature, template record, branches that fill it)]
  slots: dict[str, list[tuple[tuple, Pending, set[int]]]] = {}
  placed: list[dict[str, list[int]]] = []  # per branch: its calls' slot numbers
  for i, (_, _, records) in enumerate(traced):
    placed.append({})
    for path, calls in records.items():
      row = slots.setdefault(path, [])
      for j, p in enumerate(calls):
        sig = _signature(p)
        if j < len(row) and row[j][0] == sig and i not in row[j][2]:
          k = j
        else:
          k = len(row)
          row.append((sig, p, set()))
        row[k][2].add(i)
        placed[i].setdefault(path, []).append(k)
  partial_stacked = {path for path, row in slots.items()
                     if any(len(s[2]) < len(branches) for s in row)
                     and any(r.endswith(":stack") for s in row for r in s[1].roles[:depth])}
  members: dict[tuple[str, int], dict[int, Pending]] = {}
  for i, (_, _, records) in enumerate(traced):
    for path, ks in placed[i].items():
      if path not in partial_stacked:
        for p, k in zip(records[path], ks, strict=True):
          members.setdefault((path, k), {})[i] = p
  buffers, where = _buffers(slots, members, _batched_everywhere(rec, index))

  def run(i: int) -> Callable:
    closed, out_tree, _ = traced[i]

    def branch(*ops):
      flat = jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *jax.tree.leaves(ops))
      out, shared = jax.tree.unflatten(out_tree, flat)
      found = shared.tree
      written: list[Any] = [None] * len(buffers)
      for path, ks in placed[i].items():
        for p, k in zip(found[path], ks, strict=True):
          if (path, k) not in where:  # dropped (a layer of a stack in some branches only)
            continue
          for leaf, b in zip(jax.tree.leaves(p), where[(path, k)], strict=True):
            assert written[b] is None or written[b] is leaf, (path, k)  # one array a buffer
            written[b] = leaf
      return out, [jnp.zeros(s, d) if a is None else a
                   for a, (s, d) in zip(written, buffers, strict=True)]

    return branch

  out, arrays = _ORIGINAL["switch"](index, [run(i) for i in range(len(branches))], *operands)
  records: dict[str, list[Pending]] = {}
  masks: dict[tuple[frozenset[int], int], Any] = {}  # one array per mask (a scan stacks it once)
  for path, row in slots.items():
    if path in partial_stacked:
      continue
    for k, (sig, _, takers) in enumerate(row):
      p = jax.tree.unflatten(sig[0], [arrays[b] for b in where[(path, k)]])
      if len(takers) < len(branches):
        c = p.captured
        key = (frozenset(takers), c.inputs.ndim)
        if key not in masks:
          ran = functools.reduce(jnp.logical_or, [index == i for i in sorted(takers)])
          masks[key] = ran.astype(jnp.float32).reshape((1,) * c.inputs.ndim)
        mask = masks[key]
        # times a conditional's inside a branch of this one (read from a shared buffer, its
        # value when this slot's branch did not run is another's: weighed 0 all the same)
        p = dataclasses.replace(p, captured=times_mask(c, mask))
      records.setdefault(path, []).append(p)
  rec.unmodelled.update(dict.fromkeys(sorted(partial_stacked)))
  rec.add_all(records)
  return out


def _cond_arguments(args: tuple, kwargs: dict) -> Optional[tuple[Any, Callable, Callable,
                                                                   tuple]]:
  """``(pred, true_fun, false_fun, operands)`` of a ``jax.lax.cond`` call, also one that
  passes them by keyword (``hk.cond`` calls ``cond(pred, true_fun=..., false_fun=...,
  operand=...)``) or in JAX's deprecated order ``cond(pred, true_operand, true_fun,
  false_operand, false_fun)``; None for a call this module leaves to JAX (other keywords)."""
  kwargs = dict(kwargs)
  names = ("pred", "true_fun", "false_fun")
  head = list(args[:3])
  for name in names[len(head):]:
    if name not in kwargs:
      return None
    head.append(kwargs.pop(name))
  operands = tuple(args[3:])
  if "operand" in kwargs:
    if operands:
      return None
    operands = (kwargs.pop("operand"),)
  if kwargs:
    return None
  pred, true_fun, false_fun = head
  if not callable(true_fun) and callable(false_fun) and len(operands) == 2 and callable(
      operands[1]):  # JAX's deprecated `cond(pred, x_true, f_true, x_false, f_false)`, which
    # JAX still runs as below (it failed here with the operand called as the branch)
    (x_true, f_true), (x_false, f_false) = (true_fun, false_fun), operands
    return (pred, lambda x, _: f_true(x), lambda _, x: f_false(x), (x_true, x_false))
  return pred, true_fun, false_fun, operands


def cond(*args, **kwargs) -> Any:
  """``jax.lax.cond`` whose branches' records leave it (``_conditional``): the layers of the
  branch taken get this step's rows, those of the others none."""
  rec = _active()
  found = None if rec is None else _cond_arguments(args, kwargs)
  if rec is None or found is None:
    return _ORIGINAL["cond"](*args, **kwargs)
  pred, true_fun, false_fun, operands = found
  return _conditional(rec, _cond_index(pred), [false_fun, true_fun], operands)


def switch(index: Any, branches: Any, *operands, **kwargs) -> Any:
  """``jax.lax.switch`` whose branches' records leave it (``_conditional``)."""
  rec = _active()
  if rec is not None and set(kwargs) == {"operand"} and not operands:
    operands, kwargs = (kwargs["operand"],), {}  # `switch(i, branches, operand=x)`
  if rec is None or kwargs:
    return _ORIGINAL["switch"](index, branches, *operands, **kwargs)
  branches = list(branches)
  return _conditional(rec, _switch_index(index, len(branches)), branches, operands)


def eval_shape(fun: Callable, *args, **kwargs) -> Any:
  """``jax.eval_shape`` whose trace records nothing (``records.DiscardFrame``): its values are
  abstract and thrown away (``nnx.fori_loop`` traces its body once so, before the loop)."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["eval_shape"](fun, *args, **kwargs)

  @functools.wraps(fun)
  def body(*a, **kw):
    with rec.frame(DiscardFrame()):
      return fun(*a, **kw)

  return _ORIGINAL["eval_shape"](body, *args, **kwargs)


def _leaf_axes(in_axes: Any, args: tuple, kwargs: dict) -> list[Optional[int]]:
  """Per argument leaf (as ``_leaves`` orders ``(args, kwargs)``): the axis vmap maps, or
  None (keyword arguments are mapped along 0, as ``jax.vmap`` does)."""
  if not isinstance(in_axes, (list, tuple)):
    in_axes = (in_axes,) * len(args)
  axes = jax.tree.map(lambda ax, sub: jax.tree.map(lambda _: ax, sub,
                                                   is_leaf=lambda x: x is None),
                      tuple(in_axes), args, is_leaf=lambda x: x is None)
  return list(_leaves(axes)) + [0] * len(_leaves(kwargs))


def _mapped_roles(in_axes: Any, args: tuple, kwargs: dict) -> list[str]:
  """Per argument leaf: ``'stack'`` if vmap maps it, else ``'pool'`` (as ``_leaves`` orders)."""
  return ["pool" if ax is None else "stack" for ax in _leaf_axes(in_axes, args, kwargs)]


def _whole_batch_lanes(rec: Recorder, fun: Callable, in_axes: Any, a: tuple, kw: dict,
                       options: tuple[tuple, dict], depth: int) -> dict[str, list[bool]]:
  """``_whole_batch_steps`` for a ``jax.vmap`` of ``fun`` over ``(a, kw)``: per layer path, per
  call of ``fun`` (one lane), whether the call holds the whole batch on its own example axis,
  read from an array the lane closes over or gets unmapped (``in_axes`` None), so that the
  vmap's axis is noise draws, Monte Carlo samples, dropout masks, not the examples
  (``jax.vmap(lambda k: loss(model(x + s * jax.random.normal(k, x.shape))))(keys)``).

  Decided as for ``jax.lax.map``, from one extra trace (``jax.make_jaxpr``) of the vmap
  (``options``: its other arguments, an ``axis_name`` included) of the mapped arguments, the
  unmapped ones closed over, its records kept apart (a call's examples in its lane: those of
  a vmap over the examples inside it, as ``jax.vmap(model)(x + noise(k))`` of Equinox, else
  its own, ``_step_examples``). A lane that cannot be traced again is read as over the
  examples, with a warning."""
  leaves, tree = jax.tree.flatten((a, kw), is_leaf=lambda x: x is None)
  axes = _leaf_axes(in_axes, a, kw)
  taken = [(i, ax) for i, (x, ax) in enumerate(zip(leaves, axes, strict=True))
           if ax is not None and hasattr(x, "shape")]
  roles = _mapped_roles(in_axes, a, kw)
  found: list[list[tuple[str, Optional[int]]]] = []
  weights: dict[int, Callable[[], Any]] = {}  # the lane's layers' weights (`Recorder.looked_up`)

  def lanes(*mapped):
    full = list(leaves)
    for (i, _), x in zip(taken, mapped, strict=True):
      full[i] = x
    outer_a, outer_kw = jax.tree.unflatten(tree, full)

    def lane(*inner_a, **inner_kw):
      frame = TransformFrame("vmap", _inputs((inner_a, inner_kw), (a, kw), roles))
      return _probed_calls(rec, frame, lambda: fun(*inner_a, **inner_kw), weights, found, depth)

    return _ORIGINAL["vmap"](lane, in_axes, 0, *options[0], **options[1])(*outer_a, **outer_kw)

  try:
    closed = jax.make_jaxpr(lanes)(*[leaves[i] for i, _ in taken])
  except Exception as e:  # noqa: BLE001 - the vmap itself will raise what is wrong with it
    warnings.warn(
        "sngd: could not trace one lane of a `jax.vmap` again to tell whether its lanes are "
        f"examples or each sees the whole batch ({type(e).__name__}: {e}); its axis is read "
        "as the examples. If every lane sees the whole batch (noise draws, Monte Carlo "
        "samples), write the loop as `jax.lax.scan`, whose axis is more rows of each example.",
        stacklevel=caller_stacklevel())
    return {}
  lane_shapes = [tuple(d for k, d in enumerate(leaves[i].shape)
                       if k != ax % len(leaves[i].shape)) for i, ax in taken]
  return _whole_calls(
      rec, closed, found[0] if found else [], weights,
      list(zip(closed.jaxpr.invars, lane_shapes, [leaves[i] for i, _ in taken], strict=True)),
      "a `jax.vmap` reads, in each lane,", "lane sees",
      "`jax.lax.scan` (its axis is more rows of each example) or vmap over keys and draw the "
      "noise inside")


def vmap(fun: Callable, in_axes: Any = 0, out_axes: Any = 0, *args, **kwargs) -> Callable:
  """``jax.vmap`` whose function also returns its records (stacked over the mapped axis).

  The vmap's axis, where it pools (the weight is not mapped), holds the examples (role
  ``'vmap:pool'``: a vmap over the batch, per-example functions), unless a call in every lane
  holds the whole batch on an axis of its own, read from an array the lane closes over (a
  vmap over noise draws, Monte Carlo samples, dropout masks of a closed-over batch,
  ``_whole_batch_lanes``): then the axis is more rows of each example, as a scan's
  (``'scan:pool'``), and ``stats_batch_size=k`` takes the first ``k`` examples of every
  lane."""
  return _vmap(fun, in_axes, out_axes, args, kwargs, decide=True)


def _vmap(fun: Callable, in_axes: Any, out_axes: Any, args: tuple, kwargs: dict,
          decide: bool) -> Callable:
  """``vmap``; with ``decide`` False (``lax_map``'s chunks, which it decides itself) its
  pooled axis is always the examples'."""
  plain = _ORIGINAL["vmap"](fun, in_axes, out_axes, *args, **kwargs)

  @functools.wraps(fun)
  def call(*a, **kw):
    rec = _active()
    if rec is None:
      return plain(*a, **kw)
    try:
      roles = _mapped_roles(in_axes, a, kw)
    except ValueError:  # an in_axes JAX will reject: let it say so
      return plain(*a, **kw)
    depth = len(rec.trace(None)[0])  # this vmap's role in the roles of records made inside
    unmapped: list[dict] = []
    index: dict[str, list[int]] = {}  # per path, each mapped record's call of the lane
    own = []  # whether a mapped record pools and holds examples of its own in its lane

    def body(*inner_a, **inner_kw):
      trace = current_trace()
      frame = TransformFrame("vmap", _inputs((inner_a, inner_kw), (a, kw), roles), trace=trace)
      with rec.frame(frame):
        out = fun(*inner_a, **inner_kw)
      mapped, same = rec.leaving_vmap(frame, depth, trace)
      unmapped[:] = [same]
      index.clear()
      own.clear()
      for path, ps in mapped.tree.items():
        index[path] = [j for j, q in enumerate(frame.records[path]) if any(q is p for p in ps)]
        own.extend(len(p.roles) > depth and p.roles[depth] == "vmap:pool"
                   and _step_examples(p, depth) is not None for p in ps)
      return out, mapped

    if not decide:  # a chunk of `lax_map`, whose readings are the map's
      out, records = _ORIGINAL["vmap"](body, in_axes, (out_axes, 0), *args, **kwargs)(*a, **kw)
    else:
      with _nested(rec) as nested:
        out, records = _ORIGINAL["vmap"](body, in_axes, (out_axes, 0), *args, **kwargs)(
            *a, **kw)
      if not any(own):
        _passed_on(rec, nested)
    if decide and any(own):
      whole = _reading(rec, _signature_of(records.tree, depth), nested,
                       lambda: _whole_batch_lanes(rec, fun, in_axes, a, kw, (args, kwargs),
                                                  depth))
      records = {path: [_pooled_at(p, depth) if j < len(whole.get(path, [])) and
                        whole[path][j] else p for p, j in zip(ps, index[path], strict=True)]
                 for path, ps in records.tree.items()}
    rec.add_all(records)
    for same in unmapped:  # the same value in every lane: one record, no vmap axis
      rec.add_all(same)
    return out

  return call


def _pooled_at(p: Pending, depth: int) -> Pending:
  """``p`` with its ``'vmap:pool'`` role at ``depth`` read as a scan's (more rows of each
  example, not the examples: ``_whole_batch_lanes``)."""
  if len(p.roles) <= depth or p.roles[depth] != "vmap:pool":
    return p
  return dataclasses.replace(p, roles=p.roles[:depth] + ("scan:pool",) + p.roles[depth + 1:])


def _checkpoint(name: str) -> Callable:
  def checkpoint(fun: Callable, **options) -> Callable:
    plain = _ORIGINAL[name](fun, **options)
    static = options.get("static_argnums", ())
    static = (static,) if isinstance(static, int) else tuple(static)

    @functools.wraps(fun)
    def call(*a, **kw):
      rec = _active()
      if rec is None:
        return plain(*a, **kw)
      dynamic = lambda args: tuple(x for i, x in enumerate(args) if i not in static)
      # The recorder, the function and the caller's arguments, held only while the
      # checkpoint traces ``body``: with ``static_argnums`` JAX caches the function it traces
      # (``_dyn_args_fun_cached``), which would keep the tracers they hold alive after their
      # trace (``jax.checking_leaks``; a linen module's function holds its scope's params).
      held = [(rec, fun, (dynamic(a), kw))]

      def body(*inner_a, **inner_kw):
        rec, fun, outer = held[0]
        frame = TransformFrame("checkpoint", _inputs(
            (dynamic(inner_a), inner_kw), outer, ["none"] * len(_leaves(outer))))
        with rec.frame(frame):
          out = fun(*inner_a, **inner_kw)
        return out, rec.leaving(frame)

      try:
        out, records = _ORIGINAL[name](body, **options)(*a, **kw)
      finally:
        held.clear()
      rec.add_all(records)
      return out

    return call

  checkpoint.__doc__ = f"``jax.{name}`` whose function also returns its records."
  return checkpoint


def axes_scan(fn: Callable, *args, **kwargs) -> Callable:
  """Flax's ``axes_scan.scan``: records of its invariance pre-trace are discarded."""
  rec = _active()
  if rec is None:
    return _ORIGINAL["axes_scan"](fn, *args, **kwargs)
  depth: list[int] = []

  @functools.wraps(fn)
  def body(*a, **kw):
    inside_scan = depth and len(rec.frames) > depth[-1] and isinstance(
        rec.frames[-1], TransformFrame) and rec.frames[-1].kind == "scan"
    if inside_scan:
      return fn(*a, **kw)
    with rec.frame(DiscardFrame()):
      return fn(*a, **kw)

  scan_fn = _ORIGINAL["axes_scan"](body, *args, **kwargs)

  def call(*a, **kw):
    depth.append(len(rec.frames))
    try:
      return scan_fn(*a, **kw)
    finally:
      depth.pop()

  return call


def _nnx_jit(key: str) -> Callable:
  """The ``__call__`` of the function ``nnx.jit`` returns (``JitWrapped``, or
  ``SimpleJitWrapped`` in tree mode) while capturing: the function itself, run inline in the
  enclosing trace, so that its layers are the model's own modules (named by their path) and
  their records join the caller's like any other call's.

  A ``jax.jit`` inside a trace computes what its function computes (XLA inlines a nested jit),
  but its values cannot leave it: its records would be dropped (warned, reported as not
  captured). Donation means nothing inside a trace, and NNX's state updates (a ``BatchNorm``'s
  statistics, an RNG count) are made on the modules directly, as ``nnx.jit`` would copy them
  back. An ``nnx.jit`` given ``in_shardings``/``out_shardings`` (constraints a plain call
  would drop) or bound arguments (``nnx.jit_partial``) runs as it is: its layers are named by
  their path in the warning (``_jit_body``)."""
  def call(self, *args, **kwargs):
    rec = _active()
    if rec is None:
      return _ORIGINAL[key](self, *args, **kwargs)
    if (getattr(self, "in_shardings", None) is None
        and getattr(self, "out_shardings", None) is None and not getattr(self, "partial_args", ())):
      return self.fun(*args, **kwargs)
    body: Any = getattr(getattr(self, "jitted_fn", None), "__wrapped__", None)
    if body is None or getattr(body, "f", None) is None:
      return _ORIGINAL[key](self, *args, **kwargs)
    # swapped for this thread only: another thread's call of the same nnx.jit (a trace of its
    # own) runs NNX's function, or its own capture's wrapper, never this capture's
    with swap.swapped(body, "f", lambda inner: _jit_body(rec, inner, (args, kwargs))):
      return _ORIGINAL[key](self, *args, **kwargs)
  call.__name__ = call.__qualname__ = "__call__"
  return call


def variable_value(variable: Any) -> Any:
  """The array an ``nnx.Variable`` holds (without the deprecated ``.value``)."""
  return variable.get_value() if hasattr(variable, "get_value") else variable.value


def _graph_arrays(tree: Any) -> list[Any]:
  """The arrays of ``tree`` in a fixed order: each NNX graph node's Variables (as
  ``nnx.iter_graph`` lists them), each other leaf as it is."""
  from flax import nnx  # noqa: PLC0415 - loaded with flax
  out = []
  for node in jax.tree.leaves(tree, is_leaf=lambda n: isinstance(n, (nnx.Module, nnx.Variable))):
    if isinstance(node, nnx.Module):
      out += [variable_value(v) for _, v in nnx.iter_graph(node) if isinstance(v, nnx.Variable)]
    elif isinstance(node, nnx.Variable):
      out.append(variable_value(node))
    else:
      out.append(node)
  return out


def _jit_body(rec: Recorder, f: Callable, outer: Any) -> Callable:
  """``f``, the function of an ``nnx.jit`` that runs as a jit (``_nnx_jit``), run under a
  frame that follows its arguments' arrays to the caller's ``outer`` ones (the modules that
  NNX passes in are copies of the caller's, with the jit's tracers), so that its layers are
  named by their path; their records are dropped as not captured (``Recorder.escaped``:
  capture warns, naming them), as a jit's values cannot leave it."""
  @functools.wraps(f)
  def body(*inner_args, **inner_kwargs):
    inner, out = _graph_arrays((inner_args, inner_kwargs)), _graph_arrays(outer)
    inputs = ({id(i): (o, "none") for i, o in zip(inner, out, strict=True)}
              if len(inner) == len(out) else {})
    frame = TransformFrame("jit", inputs)
    with rec.frame(frame):
      result = f(*inner_args, **inner_kwargs)
    rec.escaped.update(frame.records)
    return result
  return body


_WRAPPERS = {"scan": scan, "fori_loop": fori_loop, "while_loop": while_loop, "cond": cond,
             "switch": switch, "eval_shape": eval_shape, "map": lax_map,
             "vmap": vmap, "checkpoint": _checkpoint("checkpoint"),
             "remat": _checkpoint("remat"), "axes_scan": axes_scan,
             "nnx_jit": _nnx_jit("nnx_jit"), "nnx_simple_jit": _nnx_jit("nnx_simple_jit")}


@contextlib.contextmanager
def recording(rec: Recorder) -> Iterator[None]:
  """Makes ``rec`` this thread's active recorder and the transforms return records.

  The transforms are swapped per thread (``swap.swapped``): the wrappers run on this thread
  only, another thread runs what was in place, and the last capture to end puts back what was
  there when the first began (a user's own patch of ``jax.vmap`` included)."""
  with contextlib.ExitStack() as swaps:
    for owner, name, key in _TARGETS:
      swaps.enter_context(swap.swapped(owner, name, lambda _, key=key: _WRAPPERS[key]))
    stack = running()
    stack.append(rec)
    try:
      yield
    finally:
      stack.pop()
