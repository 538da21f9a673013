"""Per-thread swaps of a class's method, a module's function or an object's while capturing.

Some layers have no interceptor hook (NNX and Equinox layer classes, Flax's private
``_normalize``), so capture replaces the attribute that the layer's code looks up: a class's
``__call__`` (found on the class, by ``type(self)``) or a module-level function (found as a
global of the module that calls it, as ``flax.linen.normalization._normalize`` is by linen's
norm layers), or an object's (the function that an ``nnx.jit`` given shardings calls, as
``self.f``: ``transforms._nnx_jit``, so that another thread's call of the same ``nnx.jit``
traces NNX's function, not this capture's wrapper). ``swapped(owner, name, make)`` runs its
body with ``owner.<name>`` being ``make(original)`` on the calling thread only.

The attribute is replaced once, process-wide, by a dispatcher (reference counted;
``transforms.recording`` swaps the JAX transforms this way too) that calls the calling thread's
innermost hook, else the original. So a capture on one thread neither records nor changes
another thread's calls (each used to set the attribute process-wide: a thread running a model
while another captured ran the capture's recording wrappers, which noted its calls and filled
the capturing thread's norm slots with its ``xhat``), and two captures on two threads that
end out of order leave the original in place (each used to restore the attribute it found,
which could be the other capture's wrapper: its recorder then recorded every later call). On
one thread, a nested capture's hook wraps the outer one's: ``make`` is given the outer hook
as ``original``.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable, Iterator

_LOCK = threading.Lock()
# (owner, attribute) -> [its own entry in the owner's dict (None: inherited), the function it
# resolved to before the swap, how many captures use the swap]
_SWAPPED: dict[tuple[Any, str], list[Any]] = {}
_HOOKS = threading.local()  # .stacks: (owner, attribute) -> this thread's hooks, innermost last


def _dispatcher(key: tuple[Any, str], base: Callable) -> Callable:
  """What a swapped attribute is while any capture uses it: the innermost hook of a capture
  running on this thread, else ``base`` (a thread that is not capturing runs the original).
  As a class attribute it is a method (``self`` comes first in ``args``); as a module's
  global or an object's attribute, a plain function."""
  def swapped(*args, **kwargs):
    stack = getattr(_HOOKS, "stacks", {}).get(key)
    return (stack[-1] if stack else base)(*args, **kwargs)
  return swapped


DISPATCH_CODE = _dispatcher((object, ""), object).__code__
"""The code of every dispatcher: a hook that inspects its caller's frame skips these."""


def unswapped(owner: Any, name: str) -> Any:
  """``owner``'s attribute ``name`` as its library defines it (not a capture's swap)."""
  with _LOCK:
    entry = _SWAPPED.get((owner, name))
  return entry[1] if entry is not None else getattr(owner, name)


@contextlib.contextmanager
def swapped(owner: Any, name: str, make: Callable[[Callable], Callable]) -> Iterator[None]:
  """Runs the body with ``owner.<name>`` replaced, on this thread only, by ``make(original)``.

  Args:
    owner: a class (its method ``name``, its own or inherited), a module (its function
      ``name``, looked up as a global by the module's code) or a hashable object (its
      attribute ``name``, a function it calls as ``self.<name>(...)``).
    name: the attribute.
    make: maps the function to wrap (the original, or the hook of a capture running on this
      thread that this one is nested in) to this capture's hook.
  """
  key = (owner, name)
  with _LOCK:
    entry = _SWAPPED.get(key)
    if entry is None:
      own = owner.__dict__.get(name)
      base = own if own is not None else getattr(owner, name)
      entry = _SWAPPED[key] = [own, base, 0]
      setattr(owner, name, functools.wraps(base)(_dispatcher(key, base)))
    entry[2] += 1
  stacks = _HOOKS.__dict__.setdefault("stacks", {})
  stack = stacks.setdefault(key, [])
  depth = len(stack)
  try:
    stack.append(make(stack[-1] if stack else entry[1]))
    yield
  finally:
    del stack[depth:]
    with _LOCK:
      entry[2] -= 1
      if entry[2] == 0:
        del _SWAPPED[key]
        if entry[0] is None:
          delattr(owner, name)
        else:
          setattr(owner, name, entry[0])
