"""The Flax internals capture patches, each a small named function.

Capture changes nothing in a model. Three things are not reachable through
Flax's public hooks, so they are patched while a captured function runs, and
restored after (also on error):

* ``linen_normalize`` and ``nnx_normalize``: Flax's private
  normalization routine (``flax.linen.normalization._normalize`` and
  ``flax.nnx.nn.normalization._normalize``), so that a normalization layer's
  ``xhat`` (before scale and bias) is recorded; guarded by
  ``tests/test_capture.py`` (linen) and ``tests/test_nnx_layers.py`` (NNX),
  which compare the recorded ``xhat`` with a float64 reference.
* NNX layer classes have no interceptor hook: ``nnx_methods`` swaps the
  ``__call__`` of the recorded NNX classes (and ``Embed.attend``, ``RNN``, the
  cells) for recording wrappers; guarded by ``tests/test_nnx_layers.py`` and
  ``tests/test_recurrent.py``.

Each is swapped for the capturing thread only (``swap.swapped``): another thread's model
runs Flax's own code, and a capture nested in another on one thread wraps the outer one's.
Linen layers need no patch: ``flax.linen.intercept_methods`` is public.
The Flax versions these patches were written against are the range admitted
by ``pyproject.toml``, tested in CI at both ends.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Callable, Iterator

import flax.linen.normalization as linen_norm
import flax.nnx.nn.normalization as nnx_norm
from flax import nnx

from sngd_jax._src.capture import swap, tables
from sngd_jax._src.capture.records import Recorder


def linen_normalize(rec: Recorder) -> contextlib.AbstractContextManager[None]:
  """Records ``xhat`` from linen's ``_normalize`` while a norm layer runs (this thread's)."""
  return swap.swapped(linen_norm, "_normalize", functools.partial(_linen_normalize, rec))


def _linen_normalize(rec: Recorder, original: Callable) -> Callable:
  @functools.wraps(original)
  def normalize(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                epsilon, use_bias, use_scale, *rest, **kwargs):
    if rec.norm_slots:
      xhat = original(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                      epsilon, False, False, *rest, **kwargs)
      rec.normalized(xhat, feature_axes)
    return original(mdl, x, mean, var, reduction_axes, feature_axes, dtype, param_dtype,
                    epsilon, use_bias, use_scale, *rest, **kwargs)

  return normalize


def nnx_normalize(rec: Recorder) -> contextlib.AbstractContextManager[None]:
  """Records ``xhat`` from NNX's ``_normalize`` while a norm layer runs (this thread's)."""
  return swap.swapped(nnx_norm, "_normalize", functools.partial(_nnx_normalize, rec))


def _nnx_normalize(rec: Recorder, original: Callable) -> Callable:
  @functools.wraps(original)
  def normalize(x, mean, var, scale, bias, reduction_axes, feature_axes, *rest, **kw):
    if rec.norm_slots:
      xhat = original(x, mean, var, None, None, reduction_axes, feature_axes, *rest, **kw)
      rec.normalized(xhat, feature_axes)
    return original(x, mean, var, scale, bias, reduction_axes, feature_axes, *rest, **kw)

  return normalize


@contextlib.contextmanager
def nnx_methods(wrappers: dict[tuple[type, str], Callable[[Callable], Callable]]
                ) -> Iterator[None]:
  """Swaps each ``cls.name`` for ``wrap(original)`` on this thread (one context for all)."""
  with contextlib.ExitStack() as stack:
    for (cls, name), wrap in wrappers.items():
      stack.enter_context(swap.swapped(cls, name, wrap))
    yield


NNX_LAYER_CLASSES: tuple[type, ...] = tuple(
    cls for cls in tables.LAYERS if issubclass(cls, nnx.Module))
