"""Activation capture for Flax linen, by method interception.

``capture(loss_fn)`` runs ``loss_fn`` under :func:`flax.linen.intercept_methods`
and records, for every supported layer call, the input ``x`` it saw and its
pre-activation output ``z``, with gradients stopped. Nothing in the model
changes. A layer called several times (shared weights, a layer applied at
every time step) records one entry per call; their statistics are pooled.

The result is a dict from layer path (``'Block_0/Dense_1'``, the same string
that :mod:`sngd_jax.paths` gives the layer's params) to a tuple of
:class:`Captured` records.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax
import flax.linen as nn
import jax

from sngd_jax import paths

# The layer types whose calls are recorded, and the kind of input each one has.
LINEN_LAYERS: dict[type, str] = {nn.Dense: "dense"}

Activations = dict[str, tuple["Captured", ...]]


@flax.struct.dataclass
class Captured:
  """What one call of one layer saw.

  Attributes:
    inputs: the layer input ``x``, shape ``(..., I)`` for a dense layer.
    outputs: the layer's pre-activation output ``z``, shape ``(..., O)``.
    kind: how ``inputs`` map to rows of the local Fisher (``'dense'``).
    config: static layer configuration that the kind needs (empty for dense).
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


def freeze(store: dict[str, list[Captured]]) -> Activations:
  """Turns a record store into the immutable activations dict."""
  return {path: tuple(calls) for path, calls in store.items()}


def capture(fn: Callable[..., Any], *, has_aux: bool = False) -> Callable[..., Any]:
  """Wraps a function that applies Flax linen modules so it also returns activations.

  Example::

    loss_and_acts = sngd_jax.capture(loss_fn)
    (loss, acts), grads = jax.value_and_grad(loss_and_acts, has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)

  Args:
    fn: any function; every ``nn.Dense`` call made inside it (through
      ``module.apply``) is recorded.
    has_aux: set when ``fn`` already returns ``(value, aux)``; the wrapped
      function then returns ``(value, (aux, activations))`` so that it still
      fits ``jax.value_and_grad(..., has_aux=True)``.

  Returns:
    A function with ``fn``'s signature returning ``(fn(...), activations)``.
  """

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    store: dict[str, list[Captured]] = {}

    def interceptor(next_fun, call_args, call_kwargs, context):
      out = next_fun(*call_args, **call_kwargs)
      module = context.module
      kind = LINEN_LAYERS.get(type(module))
      if context.method_name == "__call__" and kind is not None and call_args:
        record(store, paths.join(module.path), call_args[0], out, kind)
      return out

    with nn.intercept_methods(interceptor):
      result = fn(*args, **kwargs)
    acts = freeze(store)
    if has_aux:
      value, aux = result
      return value, (aux, acts)
    return result, acts

  return wrapped
