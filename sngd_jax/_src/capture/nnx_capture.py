"""``capture_nnx``: activation capture for a Flax NNX model.

It walks the graph of each argument once (``nnx._walk``): the model's layers are named by
their path in it, its Variables' arrays (and, for params passed as a pure dict and merged in
the loss, its bare arrays) by their path; the other arguments' layers (a target network, a
teacher) are left out, and an error names one that is differentiated together with the
model. The layer calls are recorded by ``nnx``'s wrappers while ``fn`` runs, an
``nnx.bridge.ToNNX``'s linen module by ``linen``'s interceptor (``linen._to_nnx_call``).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from sngd_jax._src.capture import flax_patches, linen, tables, transforms
from sngd_jax._src.capture import nnx as nnx_record
from sngd_jax._src.capture.records import (
  Argnums,
  check_captured_function,
  check_no_trained_left_out,
  derivation_of,
  model_part,
  models_and_rest,
  normalized_argnums,
  split_aux,
  split_models,
  trained_with,
  vmapped_by_caller,
  warn_decoding,
)


def capture_nnx(fn: Callable[..., Any], *, has_aux: bool = False, outputs: bool = False,
                argnums: Argnums = 0) -> Callable[..., Any]:
  """Wraps ``fn(model, *args)`` so it also returns the activations of ``model``'s layers.

  Examples:
    ```python
    loss_and_acts = sngd_jax.capture_nnx(loss_fn)       # loss_fn(model, x, y)
    (loss, acts), grads = nnx.value_and_grad(loss_and_acts, has_aux=True)(model, x, y)
    optimizer.update(model, grads, activations=acts)
    ```

    Two models, two ``nnx.Optimizer``s (``loss_fn(generator, discriminator, z, x)``):

    ```python
    loss_and_acts = sngd_jax.capture_nnx(loss_fn, argnums=(0, 1))
    (loss, (acts_g, acts_d)), (grads_g, grads_d) = nnx.value_and_grad(
        loss_and_acts, argnums=(0, 1), has_aux=True)(generator, discriminator, z, x)
    ```

  Args:
    fn: a function whose first argument is an ``nnx.Module``, or its params (the
      ``nnx.State`` of ``nnx.split``, or its ``nnx.to_pure_dict``) that ``fn`` merges into the
      model with ``nnx.merge``. The layers of a module passed
      as another argument (a target network, a teacher) are left out; one differentiated
      together with the model (``nnx.grad(..., argnums=(0, 1))``) is an error that names it.
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
  check_captured_function(fn, "capture_nnx")
  positions = normalized_argnums(argnums, "capture_nnx")
  several = isinstance(argnums, tuple)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    models, rest = models_and_rest(args, kwargs, positions, several, argnums, "capture_nnx")
    owner: dict[int, str] = {}
    top: dict[int, tuple[str, ...]] = {}
    bare: dict[int, tuple[str, ...]] = {}
    arrays: list[Any] = []
    cells: dict[type, None] = dict.fromkeys(tables.NNX_CELLS)
    hand_written: dict[type, None] = {}
    for m, model in enumerate(models):  # several models: each one's paths under its part
      graph = nnx_record._walk(model, (model_part(m),) if several else ())
      owner.update(graph.layers)
      top.update(graph.variables)
      bare.update(graph.bare)
      arrays += graph.arrays
      cells.update(graph.cells)
      hand_written.update(graph.hand_written)
    others, trained, other_paths = frozenset(), {}, {}
    if owner or top:  # (a model passed later, `argnums=1`, is the mistake the warning names)
      # the other arguments, one walk each (the positional ones by position, for `trained`)
      graphs = {k: nnx_record._walk(args[k]) for k in range(len(args)) if k not in positions}
      known = [*graphs.values(), nnx_record._walk(rest[1])]
      others = (frozenset(i for g in known for i in g.layers)
                | frozenset(i for g in known for i in g.variables)
                ) - frozenset(owner) - frozenset(top)
      trained = trained_with(arrays, ((k, a) for k, g in graphs.items() for a in g.arrays))
      if trained:
        other_paths = {i: path for g in graphs.values() for i, path in g.layers.items()}
    rec = nnx_record._NNXRecorder(owner, top, outputs, others, trained, other_paths, bare)
    rec.custom_dense = rec.record_dense
    rec.derivation = derivation_of((arrays, args, kwargs))
    rec.data = transforms.data_leaves(rest, frozenset(top))
    with (transforms.recording(rec), flax_patches.nnx_normalize(rec),
          flax_patches.nnx_methods(nnx_record._wrappers(
              rec, tuple(cells), linen._to_nnx_call, tuple(hand_written)))):
      result = fn(*args, **kwargs)
    check_no_trained_left_out(rec.left_out, fn, "capture_nnx", positions)
    value, aux = split_aux(result, has_aux, "capture_nnx")
    acts = vmapped_by_caller(rec.freeze(), rest)
    warn_decoding(rec.decoding, acts)
    if several:
      acts = split_models(acts, len(positions))
    return (value, (aux, acts)) if has_aux else (value, acts)

  return wrapped
