"""Activation capture for Flax NNX modules.

NNX modules are plain Python objects with no interceptor hook, so
:func:`capture_nnx` swaps the ``__call__`` of the supported layer classes for a
recording wrapper while the wrapped function runs (and restores it after,
also on error). Layers are named by their path in the model graph
(``'layers/0'``), which is the path of their params in ``nnx.state(model)``.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

from flax import nnx

from sngd_jax import paths
from sngd_jax.capture import freeze, record

NNX_LAYERS: dict[type, str] = {nnx.Linear: "dense"}


@contextlib.contextmanager
def _recording(owner_paths: dict[int, str], store: dict) -> Iterator[None]:
  originals = {cls: cls.__call__ for cls in NNX_LAYERS}

  def make(cls, original):
    kind = NNX_LAYERS[cls]

    @functools.wraps(original)
    def call(self, x, *args, **kwargs):
      out = original(self, x, *args, **kwargs)
      path = owner_paths.get(id(self))
      if path is not None:
        record(store, path, x, out, kind)
      return out

    return call

  try:
    for cls, original in originals.items():
      cls.__call__ = make(cls, original)
    yield
  finally:
    for cls, original in originals.items():
      cls.__call__ = original


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
    owner_paths = {
        id(node): paths.join(tuple(str(p) for p in path))
        for path, node in nnx.iter_graph(model)
        if type(node) in NNX_LAYERS
    }
    store: dict = {}
    with _recording(owner_paths, store):
      result = fn(model, *args, **kwargs)
    acts = freeze(store)
    if has_aux:
      value, aux = result
      return value, (aux, acts)
    return result, acts

  return wrapped
