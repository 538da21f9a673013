"""The inverse-method protocol and the damping rule shared by every method.

Every method works on a stack of symmetric positive semi-definite blocks
``G`` of shape ``(b, d, d)`` and a per-block shift ``rho`` (the damping,
``damping_shift``):

```
rho = damping * tr(G) + abs_damping,     G_rho = G + rho I,
```

the reference code's relative rule. An ``InverseMethod`` caches a
representation of ``G_rho^{-1}`` at a refresh and applies it to gradient blocks
at every step. The dense methods (``dense``, ``roots``) cache the
explicit inverse; Nystrom (``nystrom``) caches a rank-``r``
eigendecomposition; block-diagonal (``blocks``) and size-dependent
(``registry.auto``) methods wrap others.

A refresh returns the new representation and an ``ok`` flag per block: False
when the result is not finite or an error estimate exceeds its bound. The
transform then keeps the previous representation of such a block and counts
the event (``refresh``).
"""

from __future__ import annotations

import functools
import inspect
import numbers
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from sngd_jax._src import sketch as sketch_lib

Rep = Any


class MethodInfo(NamedTuple):
  """What a method does for blocks of one size ``d``: for reports and cost estimates.

  Attributes:
    name: e.g. ``"cholesky"`` or ``"nystrom(rank=128)"``.
    refresh_flops: FLOPs of one refresh of one ``d x d`` block from the dense
      ``G``, or None where no formula is known (iterative methods).
    apply_flops: FLOPs of applying one block's representation to one gradient
      column (multiply by the number of columns), or None.
  """

  name: str
  refresh_flops: Optional[float] = None
  apply_flops: Optional[float] = None


class InverseMethod(NamedTuple):
  """A way to represent and apply ``(G + rho I)^{-1}`` for stacks of blocks.

  The functions receive static shapes, so a method may choose what to do by
  the block size ``d`` (see ``auto``).

  Attributes:
    identity: ``identity(b, d, dtype)`` -> the representation of ``I``, used
      before the first refresh.
    refresh: ``refresh(G, rho)`` with ``G`` symmetric, shape ``(b, d, d)``,
      undamped, and ``rho`` of shape ``(b,)`` -> ``(rep, ok)``, ``rep`` a
      pytree with leading axis ``b`` and ``ok`` a bool array of shape ``(b,)``.
    apply: ``apply(rep, g)`` with ``g`` of shape ``(b, d, k)`` ->
      ``(G + rho I)^{-1} g`` (or the method's approximation of it).
    sketch: optional; ``sketch(d, dtype)`` -> a ``d x r`` test matrix
      ``Omega`` for blocks of size ``d`` whose statistics the method reads only
      through ``(S Omega, tr S, c)`` for ``G = S + c I``, or None. For such blocks the
      transform keeps the running factor as a ``sngd_jax.Sketch`` and ``refresh``
      receives a stacked ``Sketch`` (``y = S Omega`` of shape ``(b, d, r)``, ``trace``
      and ``eye`` of shape ``(b,)``) instead of ``G``.
    info: optional; ``info(d)`` -> ``MethodInfo`` for blocks of size ``d``.
    batch_safe: optional; ``batch_safe(d)`` -> True where ``refresh`` of blocks
      of size ``d`` calls no library kernel that splits a batch over XLA:CPU's
      thread pool (LAPACK), so that a whole group may go to one call on CPU too
      (``refresh.batched_refresh``). Absent: False for every ``d``.
    host: optional; ``host(d)`` -> a ``HostMethod`` (``inverse/host.py``): the
      NumPy twin of ``refresh`` and ``apply`` for blocks of size ``d``, or None.
    use_host: whether the CPU refresh uses the twins (``host_refresh(method)``
      sets it; False by default): a refresh whose every group has a twin then
      runs on the host in one ``jax.pure_callback`` instead of compiling to XLA
      kernels. Off by default because XLA:CPU runs a program that holds a host
      callback synchronously (``docs/performance.md``, *Compile time*).

  A method is part of the optimizer state's tree structure (the static
  configuration), compared by identity. The factories of ``sngd_jax.inverse``
  are cached, so equal arguments give the same method: two optimizers built
  with ``inverse=auto(rank=64)`` have states of one structure, and a step
  compiled for one accepts the other's state.
  """

  identity: Callable[[int, int, Any], Rep]
  refresh: Callable[[jax.Array, jax.Array], tuple[Rep, jax.Array]]
  apply: Callable[[Rep, jax.Array], jax.Array]
  sketch: Optional[Callable[[int, Any], Optional[jax.Array]]] = None
  info: Optional[Callable[[int], MethodInfo]] = None
  batch_safe: Optional[Callable[[int], bool]] = None
  host: Optional[Callable[[int], Any]] = None
  use_host: bool = False


def is_batch_safe(method: InverseMethod, d: int) -> bool:
  """``method.batch_safe(d)``, False for a method without it."""
  return bool(method.batch_safe(d)) if method.batch_safe is not None else False


def host_of(method: InverseMethod, d: int) -> Any:
  """``method.host(d)`` (a ``host.HostMethod``), None for a method without it."""
  return method.host(d) if method.host is not None else None


def describe(method: InverseMethod, d: int) -> MethodInfo:
  """``method.info(d)``, or an anonymous ``MethodInfo`` when it has none."""
  return method.info(d) if method.info is not None else MethodInfo("custom")


def is_nystrom(method: InverseMethod, d: int) -> bool:
  """Whether ``method`` gives blocks of size ``d`` a low-rank Nystrom model (by the name
  its ``info`` reports: ``"nystrom(rank=...)"``), not their exact inverse."""
  return describe(method, d).name.startswith("nystrom")


def dense_apply_flops(d: int) -> float:
  """One column of an explicit-inverse product: ``2 d^2``."""
  return 2.0 * d * d


def layer_groups(specs, factors) -> tuple[list[str], dict[tuple[int, Any, bool], list[str]]]:
  """How a refresh batches the layers: ``(diagonal, groups)``.

  ``diagonal`` lists the layers whose factor is a diagonal (embeddings, refreshed
  elementwise); ``groups`` maps ``(d, dtype, sketched)`` to the layers refreshed
  together in one batched method call, in the order of ``specs``. The XLA refresh
  (``refresh.refresh_inverses_xla``) and the host refresh (``host.plan``) batch
  by this one rule.
  """
  diagonal, groups = [], {}
  for path, spec in specs.items():
    if spec.structure == "diagonal":
      diagonal.append(path)
      continue
    key = (spec.dim, jax.tree.leaves(factors[path])[0].dtype,
           sketch_lib.is_sketch(factors[path]))
    groups.setdefault(key, []).append(path)
  return diagonal, groups


def symmetrize(g: jax.Array) -> jax.Array:
  """``(G + G^T) / 2`` over the last two axes."""
  return 0.5 * (g + jnp.swapaxes(g, -1, -2))


def damping_shift(g, damping, abs_damping) -> jax.Array:
  """``rho = damping * tr(G) + abs_damping`` per block, shape ``g.shape[:-2]``.

  ``g`` may also be a (stacked) ``sngd_jax.Sketch`` of ``G = S + c I``
  (``tr G = tr S + c d`` per block).
  """
  if sketch_lib.is_sketch(g):
    trace, dtype = sketch_lib.full_trace(g), g.trace.dtype
  else:
    trace, dtype = sketch_lib.block_trace(g), g.dtype
  return jnp.asarray(damping * trace + abs_damping).astype(dtype)


def add_shift(g: jax.Array, shift: jax.Array) -> jax.Array:
  """``G + rho I`` for a stack of blocks and a shift of shape ``g.shape[:-2]``."""
  eye = jnp.eye(g.shape[-1], dtype=g.dtype)
  eye = jnp.expand_dims(eye, tuple(range(g.ndim - 2)))  # explicit ranks: see docs/reliability.md
  return g + jnp.asarray(shift, g.dtype)[..., None, None] * eye


def damp(g: jax.Array, damping, abs_damping) -> jax.Array:
  """Symmetrizes a stack of blocks and adds ``(damping * tr(G) + abs_damping) I``.

  Args:
    g: blocks of shape ``(..., d, d)``.
    damping: relative damping (scalar).
    abs_damping: absolute damping (scalar).

  Returns:
    The damped blocks, same shape and dtype.
  """
  g = symmetrize(g)
  return add_shift(g, damping_shift(g, damping, abs_damping))


def frobenius_norm(a: jax.Array) -> jax.Array:
  """``||A||_F`` over the last two axes, without overflow for finite entries.

  The plain ``sqrt(sum a_ij^2)`` overflows once the entries pass the square
  root of the largest float (``~1e19`` in float32) although the norm itself
  is representable; there the norm is computed as ``m ||A / m||_F`` with
  ``m = max |a_ij|``. Elsewhere the plain value is returned unchanged.
  """
  plain = jnp.linalg.norm(a, axis=(-2, -1))
  m = jnp.max(jnp.abs(a), axis=(-2, -1))
  unit = jnp.where(m > 0, m, jnp.ones_like(m))[..., None, None]
  scaled = m * jnp.linalg.norm(a / unit, axis=(-2, -1))
  return jnp.where(jnp.isfinite(plain), plain, scaled)


def all_finite(x: jax.Array, axis=None) -> jax.Array:
  """``all(isfinite(x))`` along ``axis``, as one float reduction: ``isfinite(sum(x - x))``.

  ``x - x`` is 0 for a finite entry and NaN for a NaN or an infinity, and a sum
  propagates NaN, so the flags are exact (no overflow: every term is 0), from
  one reduction kernel: XLA:CPU splits a predicate reduction into several
  kernels, and every kernel adds to the compile time of the step. Not ``0 * x``,
  whose zero XLA:CPU broadcast to ``x``'s shape in a kernel of its own for the
  library reduction (one compiled fusion per shape). Not a
  ``max``: XLA:CPU (jaxlib 0.10.2) drops NaN from ``max`` reductions over 4096
  or more entries (``jnp.max`` of a ``600 x 128`` array holding one NaN is
  finite; ``docs/known-issues.md``).
  """
  return jnp.isfinite(jnp.sum(x - x, axis=axis))  # empty: True


def all_finite_per_block(x: jax.Array) -> jax.Array:
  """``(b,)`` flags: every entry of block ``i`` is finite."""
  return all_finite(x.reshape(x.shape[0], -1), axis=1)


def method_factory(fn: Callable[..., Any]) -> Callable[..., Any]:
  """Caches a method factory on its arguments as bound to its signature (defaults filled
  in): ``nystrom(64)``, ``nystrom(rank=64)`` and, for the default rank, ``nystrom()``
  return the same ``InverseMethod`` object (``functools.cache`` tells them apart), so
  states made with them have one tree structure and share a compiled step."""
  signature = inspect.signature(fn)
  made: dict[tuple, Any] = {}

  @functools.wraps(fn)
  def factory(*args, **kwargs):
    bound = signature.bind(*args, **kwargs)
    bound.apply_defaults()
    key = tuple(bound.arguments.items())
    if key not in made:
      made[key] = fn(*bound.args, **bound.kwargs)
    return made[key]

  return factory


def check_count(name: str, value: Any) -> None:
  """Requires an int option of a method factory to be at least 1."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
    raise ValueError(f"sngd: `{name}` must be an int >= 1, got {value!r}")


def check_method(name: str, method: Any) -> None:
  """Requires ``method`` to be an ``InverseMethod`` (a wrapper given a name, say)."""
  if not isinstance(method, InverseMethod):
    raise ValueError(
        f"sngd: {name} wraps an InverseMethod, got {method!r}; make one with a factory of "
        f"sngd_jax.inverse, e.g. {name}(sngd_jax.inverse.auto())")
