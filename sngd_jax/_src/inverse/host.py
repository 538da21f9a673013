"""The inverse refresh on the host, for XLA:CPU: NumPy/LAPACK twins of the built-in methods.

On a CPU backend the factors already live in host memory, and a refresh runs
only every ``inverse_every`` steps, so its cost is not in running it but in
compiling it: XLA:CPU compiles every fused kernel of a program on its own (an
MLIR pipeline and LLVM, a median of 3-32 ms each by profiled run), and the refresh's glue
(stacking, damping, the factorization's masks and solves, the acceptance test and the
per-layer selection, for every group of equal-size blocks) was 43-63% of the
fusions SNGD adds to a training step at ``36df037``, 40-60% at ``beb8fdc``
(``benchmarks/README.md``, *Compile time*). Here the whole refresh of every layer
is one ``jax.pure_callback`` into NumPy and SciPy's LAPACK (the library jaxlib's
own CPU kernels call): one instruction to compile instead of dozens.

The twins compute what the XLA path (``refresh.refresh_inverses``) computes,
in the factors' own precision and with the same acceptance rule, so the two
agree to floating-point rounding (``tests/test_host_refresh.py`` checks every
layer kind, rejected blocks and non-finite factors against it and against
float64 references). A method takes part through the optional
``InverseMethod.host(d)`` field, which ``cholesky``, ``nystrom`` and ``auto``
set, and is used only after ``host_refresh(method)``; a refresh that involves
any other method (a custom one, ``eigh``, the iterative roots,
``shard_refresh``), or factors other than float32, runs in XLA as before, and
so does every refresh on GPU and TPU (``jax.lax.platform_dependent``).

The callback makes no XLA call and so cannot meet the XLA:CPU thread-pool
deadlock of batched LAPACK kernels (``docs/known-issues.md``). A program with
a callback cannot be serialized by ``jax.export``, and XLA:CPU runs it
synchronously (no asynchronous dispatch), so the host refresh is opt-in:
``host_refresh(method)``; ``xla_only(method)`` keeps the refresh in XLA even
then.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse.base import check_method, layer_groups


class HostMethod(NamedTuple):
  """NumPy twin of an ``InverseMethod`` for blocks of one size.

  Attributes:
    refresh: ``refresh(G, rho)`` on host arrays: ``G`` of shape ``(b, d, d)``
      (symmetrized) or a stacked ``Sketch`` of NumPy arrays, ``rho`` of shape
      ``(b,)`` -> ``(rep, ok)`` as the method's own ``refresh``.
    apply: ``apply(rep, g)`` for ``g`` of shape ``(b, d, k)``.
  """

  refresh: Callable[[Any, np.ndarray], tuple[Any, np.ndarray]]
  apply: Callable[[Any, np.ndarray], np.ndarray]


def _finite_per_block(x: np.ndarray) -> np.ndarray:
  return np.all(np.isfinite(x.reshape(x.shape[0], -1)), axis=1)


def _symmetrize(g: np.ndarray) -> np.ndarray:
  return (0.5 * (g + np.swapaxes(g, -1, -2))).astype(g.dtype)


def _add_shift(g: np.ndarray, shift: np.ndarray) -> np.ndarray:
  return g + shift.astype(g.dtype)[:, None, None] * np.eye(g.shape[-1], dtype=g.dtype)


# ------------------------------------------------------------------------------------------
# Cholesky (dense.cholesky_refresh, dense.small_inverse)


def _small_inverse(g: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  a = _add_shift(g, shift)
  if g.shape[-1] == 1:
    inverse = (1.0 / a).astype(g.dtype)
    return inverse, _finite_per_block(inverse) & (a[:, 0, 0] > 0)
  a00, a11 = a[:, 0, 0], a[:, 1, 1]
  a01 = (0.5 * (a[:, 0, 1] + a[:, 1, 0])).astype(g.dtype)
  det = a00 * a11 - a01 * a01
  inverse = np.stack([np.stack([a11, -a01], -1), np.stack([-a01, a00], -1)], -2)
  inverse = (inverse / det[:, None, None]).astype(g.dtype)
  return inverse, _finite_per_block(inverse) & (a00 > 0) & (det > 0)


def cholesky_refresh(g: np.ndarray, shift: np.ndarray, small_dim: int) -> tuple[np.ndarray,
                                                                               np.ndarray]:
  """``(G + rho I)^{-1}`` by LAPACK ``potrf`` and ``potri``, block by block.

  A block whose factorization fails (not positive definite, or non-finite)
  gets NaN, as ``jnp.linalg.cholesky`` gives it, so that ``ok`` is False there.
  """
  if g.shape[-1] <= small_dim:
    return _small_inverse(g, shift)
  a = _add_shift(g, shift)
  inverse = np.full_like(a, np.nan)
  potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (a,))
  for i in range(a.shape[0]):
    if not np.all(np.isfinite(a[i])):
      continue
    chol, info = potrf(a[i], lower=True, clean=False)
    if info != 0:
      continue
    inv, info = potri(chol, lower=True)
    if info != 0:
      continue
    lower = np.tril(inv)
    inverse[i] = lower + np.tril(inv, -1).T
  inverse = _symmetrize(inverse)
  return inverse, _finite_per_block(inverse)


def dense_apply(inverse: np.ndarray, g: np.ndarray) -> np.ndarray:
  return np.matmul(inverse, g.astype(inverse.dtype))


def cholesky(small_dim: int) -> HostMethod:
  return HostMethod(functools.partial(cholesky_refresh, small_dim=small_dim), dense_apply)


# ------------------------------------------------------------------------------------------
# Nystrom (nystrom.from_sketch, nystrom.approximate, nystrom.power_apply)


def nystrom_from_sketch(y: np.ndarray, trace: np.ndarray, omega: np.ndarray,
                        tail: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """``nystrom.from_sketch`` on host arrays, block by block for the factorizations."""
  work = y.dtype
  d, rank = y.shape[-2:]
  eps = np.finfo(work).eps
  # as ``nystrom.from_sketch``: ``||Y||_F`` scaled by the trace, 1 for a zero factor
  scale = np.where(trace > 0, trace, 1.0).astype(work)
  unit = y / scale[:, None, None]
  norm = np.sqrt(np.einsum("bdr,bdr->b", unit, unit))
  nu = (math.sqrt(d) * eps * scale * np.where(trace > 0, norm, 1.0)).astype(work)
  y_nu = y + nu[:, None, None] * omega
  core = _symmetrize(np.einsum("dr,bds->brs", omega, y_nu))
  b_count = y.shape[0]
  u = np.full((b_count, d, rank), np.nan, work)
  lam = np.full((b_count, rank), np.nan, work)
  tau = np.full((b_count,), np.nan, work)
  for i in range(b_count):
    if not (np.all(np.isfinite(core[i])) and np.all(np.isfinite(y_nu[i]))):
      continue
    (potrf,) = scipy.linalg.lapack.get_lapack_funcs(("potrf",), (core[i],))
    chol, info = potrf(core[i], lower=True, clean=True)
    if info != 0:
      continue
    b = scipy.linalg.solve_triangular(chol, y_nu[i].T, lower=True, check_finite=False).T
    gram = _symmetrize(b.T @ b)
    if not np.all(np.isfinite(gram)):
      continue
    s2, w = np.linalg.eigh(gram)
    reliable = s2 > 100 * eps * np.max(s2)
    s2_safe = np.where(reliable, s2, 1.0).astype(work)
    u_i = (b @ w) / np.sqrt(s2_safe)[None, :]
    u[i] = np.where(reliable[None, :], u_i, 0.0)
    lam[i] = np.where(reliable, np.maximum(s2 - nu[i], 0.0), 0.0)
    kept = int(np.sum(reliable))
    if tail == "mean":
      rest = trace[i] - np.sum(lam[i])
      tau[i] = max(rest, 0.0) / max(d - kept, 1) if kept < d else 0.0
    else:
      tau[i] = 0.0
  return u, lam, tau


def nystrom(rank: int, seed: int, tail: str, test_matrix: Callable[[int, int, int], np.ndarray],
            rep_type: Any) -> HostMethod:
  """The twin of ``nystrom.nystrom(rank, seed, tail)`` (``test_matrix``: its ``Omega``;
  ``rep_type``: ``NystromRep``, passed in so that this module imports no method)."""

  def refresh(g, shift):
    if sketch_lib.is_sketch(g):
      y, trace, eye = g.y, g.trace, g.eye
      finite_input = _finite_per_block(y) & np.isfinite(trace) & np.isfinite(eye)
    else:
      finite_input = _finite_per_block(g)
      omega = test_matrix(g.shape[-1], min(rank, g.shape[-1]), seed).astype(g.dtype)
      y = np.matmul(g, omega)
      trace = np.trace(g, axis1=-2, axis2=-1).astype(g.dtype)
      eye = np.zeros_like(trace)
    dtype = y.dtype
    work = np.promote_types(dtype, np.float32)
    omega = test_matrix(y.shape[-2], y.shape[-1], seed).astype(work)
    with np.errstate(all="ignore"):
      u, lam, tau = nystrom_from_sketch(y.astype(work), trace.astype(work), omega, tail)
      lam, tau = lam + eye.astype(work)[:, None], tau + eye.astype(work)  # the identity part
    u, lam, tau = u.astype(dtype), lam.astype(dtype), tau.astype(dtype)
    rep = rep_type._make((u, lam, tau, shift.astype(dtype)))  # host arrays
    ok = (finite_input & _finite_per_block(u) & np.all(np.isfinite(lam), axis=-1)
          & np.isfinite(tau) & (tau + shift > 0))
    return rep, ok

  def apply(rep, v):
    lam = (rep.eigenvalues + rep.shift[:, None]) ** -1.0
    rest = (rep.tail + rep.shift) ** -1.0
    v = v.astype(rep.basis.dtype)
    coeff = np.einsum("bdr,bdk->brk", rep.basis, v) * (lam - rest[:, None])[:, :, None]
    return np.einsum("bdr,brk->bdk", rep.basis, coeff) + rest[:, None, None] * v

  return HostMethod(refresh, apply)


# ------------------------------------------------------------------------------------------
# The whole refresh (refresh.refresh_inverses) in one callback


def probe(d: int, dtype) -> np.ndarray:
  """``refresh.accept_refresh``'s probe ``v`` (``||v|| = 1``, every entry positive)."""
  v = np.cos(np.arange(1, d + 1, dtype=np.float64) * 1.3) + 1.5
  return (v / np.linalg.norm(v)).astype(dtype)


def accept(host: HostMethod, rep: Any, d: int, dtype, shift: np.ndarray,
           ok: np.ndarray) -> np.ndarray:
  """``refresh.accept_refresh`` on host arrays (the same rule, see its docstring)."""
  b = shift.shape[0]
  v = np.broadcast_to(probe(d, dtype)[None, :, None], (b, d, 1))
  y = host.apply(rep, v)[..., 0].astype(dtype)
  inv_shift = (1.0 / shift.astype(dtype)).astype(dtype)
  positive = np.einsum("bd,bd->b", v[..., 0], y) > 0
  bounded = np.sqrt(np.sum(y * y, axis=-1)) <= 2.0 * inv_shift
  good_shift = (shift > 0) & np.isfinite(inv_shift)
  small = [_finite_per_block(leaf) for leaf in jax.tree.leaves(rep) if leaf.ndim <= 2]
  finite_small = np.all(np.stack(small), axis=0) if small else True
  return ok & positive & bounded & good_shift & finite_small


def _normalized(factor, weight):
  return jax.tree.map(
      lambda f: (f / np.maximum(weight, np.finfo(f.dtype).tiny).astype(f.dtype)).astype(f.dtype),
      factor)


def _block_trace(g: np.ndarray) -> np.ndarray:
  return np.trace(g, axis1=-2, axis2=-1).astype(g.dtype)


class Plan(NamedTuple):
  """The static part of a host refresh: the layers by group, each group's twin."""

  diagonal: tuple[str, ...]
  groups: tuple[tuple[int, Any, bool, tuple[str, ...], HostMethod], ...]


def plan(specs, factors, method) -> Optional[Plan]:
  """The groups of ``refresh_inverses`` with their host twins, or None where any group
  has none (then the refresh stays in XLA) or a factor is not float32.

  float32 only: ``jax.pure_callback`` checks the callback's results against the
  dtypes canonicalized by the calling thread's configuration, which need not be
  the tracing thread's (``with jax.enable_x64():`` is thread-local), so float64
  results could be refused at run time. float64 training keeps the XLA path.
  """
  if method.host is None or not method.use_host:
    return None
  if any(jax.tree.leaves(factors[path])[0].dtype != jnp.float32 for path in specs):
    return None
  diagonal, groups = layer_groups(specs, factors)
  out = []
  for (d, dtype, sketched), paths in groups.items():
    host = method.host(d)
    if host is None:
      return None
    out.append((d, dtype, sketched, tuple(paths), host))
  return Plan(tuple(diagonal), tuple(out))


def refresh_all(the_plan: Plan, factors, weights, old_inverses, damping, abs_damping):
  """Every layer's refresh on host arrays: ``refresh.refresh_inverses``'s results."""
  new, failures = {}, 0
  with np.errstate(all="ignore"):
    for path in the_plan.diagonal:
      f = _normalized(factors[path], weights[path])
      dt = f.dtype.type
      shift = dt(dt(damping) * np.sum(f) + dt(abs_damping))
      inverse = (1.0 / (f + shift)).astype(f.dtype)
      ok = bool(np.all(np.isfinite(inverse)) and np.isfinite(shift))
      fed = bool(np.asarray(weights[path]) > 0)  # never fed: keeps its identity, uncounted
      new[path] = inverse if ok and fed else old_inverses[path]
      failures += int(fed and not ok)
    for d, dtype, sketched, paths, host in the_plan.groups:
      dtype = np.dtype(dtype)
      if sketched:
        blocks = [sketch_lib.flat_blocks(_normalized(factors[p], weights[p])) for p in paths]
        stacked = sketch_lib.Sketch._make(
            tuple(np.concatenate(leaves) for leaves in zip(*blocks, strict=True)))
        sizes = [b.trace.shape[0] for b in blocks]
        trace = sketch_lib.full_trace(stacked)  # tr(S + c I)
      else:
        blocks = [_normalized(factors[p], weights[p]).reshape((-1, d, d)) for p in paths]
        sizes = [b.shape[0] for b in blocks]
        stacked = _symmetrize(np.concatenate(blocks))
        trace = _block_trace(stacked)
      shift = (dtype.type(damping) * trace + dtype.type(abs_damping)).astype(dtype)
      rep, ok = host.refresh(stacked, shift)
      ok = accept(host, rep, d, dtype, shift, ok)
      fed = np.concatenate([np.broadcast_to(np.asarray(weights[p]) > 0, (n,))
                            for p, n in zip(paths, sizes, strict=True)])
      failures += int(np.sum(~ok & fed))  # never fed: keeps its identity, uncounted
      ok = ok & fed
      start = 0
      for p, size in zip(paths, sizes, strict=True):
        keep = ok[start:start + size]
        new[p] = jax.tree.map(
            lambda r, o, keep=keep, start=start, size=size: np.where(
                keep.reshape((-1,) + (1,) * (r.ndim - 1)), r[start:start + size], o),
            rep, old_inverses[p])
        start += size
  return new, failures


def refresh_inverses(the_plan: Plan, factors, weights, old_inverses, damping, abs_damping):
  """``refresh.refresh_inverses`` as one ``jax.pure_callback`` (see the module docstring)."""
  shapes = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), old_inverses),
            jax.ShapeDtypeStruct((), jnp.int32))

  def callback(factors, weights, old_inverses, damping, abs_damping):
    # NumPy from here on: outside `jit` (an eager `update`) the callback receives
    # `jax.Array`s, and a JAX operation dispatched from inside a running XLA:CPU
    # program can wait forever for the executor that runs this callback.
    factors, weights, old_inverses = jax.tree.map(np.asarray, (factors, weights, old_inverses))
    new, failures = refresh_all(the_plan, factors, weights, old_inverses,
                                float(np.asarray(damping)), float(np.asarray(abs_damping)))
    new = jax.tree.map(lambda n, s: np.asarray(n, s.dtype).reshape(s.shape), new, shapes[0])
    return new, np.asarray(failures, np.int32)

  return jax.pure_callback(callback, shapes, factors, weights, old_inverses,
                           jnp.asarray(damping, jnp.float32),  # `plan`: float32 factors
                           jnp.asarray(abs_damping, jnp.float32),
                           vmap_method="sequential")


@functools.cache  # one method per argument: states of equal methods share a compiled step
def host_refresh(method):
  """``method`` whose refresh runs on the host on the CPU backend (opt-in).

  The whole refresh of every layer becomes one ``jax.pure_callback`` into NumPy
  and SciPy's LAPACK, which compiles to one instruction instead of dozens of
  kernels: the SNGD step compiled in 20-52% less time on the benchmark models in
  the two latest runs (``benchmarks/results/compile_time_72913ab.json``,
  ``benchmarks/results/compile_time_6468097.json``; ``benchmarks/README.md``,
  *Compile time*). The cost: XLA:CPU runs a program
  that holds a host callback synchronously, so ``jit`` returns only when the
  step has finished (no asynchronous dispatch, even on steps that do not
  refresh), which cost up to 4 ms (7%) a step on the evaluation transformer,
  whose step has ~700 arguments. Worth it for short runs where the compile dominates. GPU
  and TPU always compile the refresh to XLA. Example:
  ``sngd_jax.sngd(inverse=sngd_jax.inverse.host_refresh(sngd_jax.inverse.auto()))``.

  Raises:
    ValueError: for a method without NumPy twins (only ``cholesky``,
      ``nystrom`` and ``auto`` have them).
  """
  check_method("host_refresh", method)
  if method.host is None:
    raise ValueError("sngd: host_refresh needs a method with NumPy twins (cholesky, nystrom "
                     "or auto); this one has none (InverseMethod.host is None)")
  return method._replace(use_host=True)


@functools.cache  # one method per argument: states of equal methods share a compiled step
def xla_only(method):
  """``method`` without its NumPy twin: its refresh compiles to XLA kernels on CPU too.

  For programs that must not contain a host callback (``jax.export``, an
  ahead-of-time compile that is serialized). Example:
  ``sngd_jax.sngd(inverse=sngd_jax.inverse.xla_only(sngd_jax.inverse.auto()))``.
  """
  check_method("xla_only", method)
  return method._replace(host=None, use_host=False)
