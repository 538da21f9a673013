"""The XLA refresh's compiled kernels on CPU, and the written-out groups' results.

XLA:CPU generates code for every distinct fused computation once (equal ones are compiled
once), and its compile time follows their number (``benchmarks/README.md``, *Compile
time*). A written-out group (``refresh.UNROLL_MAX``) refreshes each layer's blocks from its
own factor (``refresh._per_block_group``), so equal-size layers run equal kernels: adding
layers of a size already present adds no compiled fusion.
"""

import glob
import gzip
import json
import os
import tempfile
from types import SimpleNamespace
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

import sngd_jax
from sngd_jax._src.inverse import refresh as refresh_lib

CHOLESKY = sngd_jax.inverse.cholesky()
DAMPING, ABS_DAMPING = 1e-3, 1e-6


def _compiled_fusions(fn, *args) -> int:
  """The fusions XLA:CPU generates code for when compiling ``jax.jit(fn)(*args)``: the
  ``FusionCompiler::Compile`` events of a ``jax.profiler`` trace of the compile (JAX's
  in-memory caches cleared first: a cached executable compiles nothing)."""
  jax.clear_caches()
  lowered = jax.jit(fn).lower(*args)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d)
    try:
      lowered.compile()
    finally:
      jax.profiler.stop_trace()
    path = sorted(glob.glob(os.path.join(d, "plugins", "profile", "*", "*.trace.json.gz")))
    events = json.load(gzip.open(path[-1]))["traceEvents"]
  return sum(e.get("ph") == "X" and e["name"].startswith("FusionCompiler::Compile")
             for e in events)


def _layers(kinds, seed=0):
  """specs, float32 factors (weight 2: the factor in use is ``G / 2``), weights and
  recognizable old inverses (3 I) for ``kinds``: ``(path, d, blocks)``."""
  rng = np.random.default_rng(seed)
  specs, factors, weights, old = {}, {}, {}, {}
  for path, d, nb in kinds:
    x = rng.standard_normal((nb, 2 * d, d))
    g = 2.0 * np.swapaxes(x, -1, -2) @ x / (2 * d)
    specs[path] = SimpleNamespace(dim=d, structure="dense")
    factors[path] = jnp.asarray(g if nb > 1 else g[0], jnp.float32)
    weights[path] = jnp.float32(2.0)
    old[path] = jnp.asarray(np.broadcast_to(3.0 * np.eye(d), (nb, d, d)), jnp.float32)
  return specs, factors, weights, old


def _refresh(specs):
  return lambda f, w, o: refresh_lib.refresh_inverses_xla(specs, f, w, o, CHOLESKY, DAMPING,
                                                         ABS_DAMPING)


def test_equal_size_layers_add_no_compiled_refresh_kernels():
  """Two, four, eight and sixteen one-block layers of one size (a written-out group)
  compile the same number of fusions. Stacked and sliced again per block (before), each
  block's offset made kernels of its own: 22, 26 and 35 fusions for 2, 4 and 8 layers;
  now 15 each. Groups of 9-16 one-block layers are written out too
  (``UNROLL_LAYERS_MAX``: 14 fusions; through ``lax.map``, 38 for 12 layers), a
  layer of 12 blocks still goes through the loop (written out, each block's slice is a
  kernel of its own)."""
  assert refresh_lib.UNROLL_MAX == 8 and refresh_lib.UNROLL_LAYERS_MAX == 16
  counts = []
  for n in (2, 4, 8, 12, 16):
    specs, factors, weights, old = _layers([(f"l{i}", 9, 1) for i in range(n)])
    counts.append(_compiled_fusions(_refresh(specs), factors, weights, old))
  assert counts[0] == counts[1] == counts[2] and counts[3] == counts[4] <= counts[0], counts
  specs, factors, weights, old = _layers([("stacked", 9, 12)])
  jaxpr = jax.make_jaxpr(_refresh(specs))(factors, weights, old)
  assert "scan[" in str(jaxpr) or "while[" in str(jaxpr)  # the lax.map of the CPU form
  stacked = _compiled_fusions(_refresh(specs), factors, weights, old)
  with mock.patch.object(refresh_lib, "UNROLL_MAX", 16):  # written out: more kernels
    assert _compiled_fusions(_refresh(specs), factors, weights, old) > stacked


def test_group_of_twelve_layers_matches_the_looped_group():
  """Twelve one-block layers of ``d = 9`` (written out, ``UNROLL_LAYERS_MAX``) give the
  looped group's inverses bit for bit, and float64's."""
  specs, factors, weights, old = _layers([(f"l{i}", 9, 1) for i in range(12)])
  new, failures = jax.jit(_refresh(specs))(factors, weights, old)
  with mock.patch.object(refresh_lib, "UNROLL_LAYERS_MAX", 0):
    looped, looped_failures = jax.jit(_refresh(specs))(factors, weights, old)
  assert int(failures) == int(looped_failures) == 0
  for path in new:
    np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(looped[path]), err_msg=path)
    g = np.asarray(factors[path], np.float64) / 2.0
    want = np.linalg.inv(g + (DAMPING * np.trace(g) + ABS_DAMPING) * np.eye(9))
    np.testing.assert_allclose(np.asarray(new[path])[0], want, rtol=1e-4,
                               atol=1e-4 * np.max(np.abs(want)))


def test_written_out_group_matches_float64_and_the_looped_group():
  """A group of six blocks of ``d = 9`` from four layers (one of three stacked blocks, one
  never fed, one holding a NaN in its second block): the accepted inverses are float64's
  ``(G / w + rho I)^{-1}`` with ``rho = damping tr(G / w) + abs_damping``, the never-fed
  layer and the NaN block keep their old inverses, one failure is counted (the never-fed
  layer is not a failure), and the written-out form equals the looped one (``lax.map``,
  ``UNROLL_MAX = 0``) bit for bit."""
  specs, factors, weights, old = _layers([("a", 9, 1), ("b", 9, 3), ("never", 9, 1),
                                          ("c", 9, 1)])
  weights["never"] = jnp.float32(0.0)
  factors["never"] = jnp.zeros_like(factors["never"])
  factors["b"] = factors["b"].at[1, 4, 2].set(jnp.nan)
  new, failures = jax.jit(_refresh(specs))(factors, weights, old)
  assert int(failures) == 1
  for path in ("a", "b", "c"):
    g = np.asarray(factors[path], np.float64).reshape(-1, 9, 9) / 2.0
    for i, block in enumerate(g):
      got = np.asarray(new[path]).reshape(-1, 9, 9)[i]
      if path == "b" and i == 1:
        np.testing.assert_array_equal(got, 3.0 * np.eye(9))
        continue
      rho = DAMPING * np.trace(block) + ABS_DAMPING
      want = np.linalg.inv(block + rho * np.eye(9))
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.max(np.abs(want)))
  np.testing.assert_array_equal(np.asarray(new["never"]), np.asarray(old["never"]))
  with mock.patch.object(refresh_lib, "UNROLL_MAX", 0):
    looped, looped_failures = jax.jit(_refresh(specs))(factors, weights, old)
  assert int(looped_failures) == 1
  for path in new:
    np.testing.assert_array_equal(np.asarray(new[path]), np.asarray(looped[path]), err_msg=path)


def test_cholesky_identity_is_a_constant_up_to_1024():
  """``cholesky_refresh`` solves ``L X = I`` with ``I`` a constant of the program up to
  ``d = 1024`` (no kernel builds it: one compiled fusion fewer than the identity built in
  the program, ``CONSTANT_EYE_MAX_DIM = 0``); both give float64's inverse, bit for bit
  the same."""
  from sngd_jax._src.inverse import dense as dense_lib
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, 40, 20))
  g = np.swapaxes(x, -1, -2) @ x / 40
  shift = np.array([1e-2])
  args = (jnp.asarray(g, jnp.float32), jnp.asarray(shift, jnp.float32))
  got, ok = jax.jit(dense_lib.cholesky_refresh)(*args)
  constant = _compiled_fusions(dense_lib.cholesky_refresh, *args)
  with mock.patch.object(dense_lib, "CONSTANT_EYE_MAX_DIM", 0):
    built, built_ok = jax.jit(dense_lib.cholesky_refresh)(*args)
    in_program = _compiled_fusions(dense_lib.cholesky_refresh, *args)
  assert constant == in_program - 1, (constant, in_program)
  assert bool(ok[0]) and bool(built_ok[0])
  np.testing.assert_array_equal(np.asarray(got), np.asarray(built))
  want = np.linalg.inv(g[0] + shift[0] * np.eye(20))
  np.testing.assert_allclose(np.asarray(got[0]), want, rtol=1e-4, atol=1e-4 * np.max(want))


def _zero_times_x(x, axis=None):
  """``all_finite``'s form before: ``isfinite(sum(0 * x))``."""
  return jnp.isfinite(jnp.sum(x * jnp.zeros((), x.dtype), axis=axis))


def test_all_finite_is_exact_and_needs_no_broadcast_kernel():
  """``all_finite`` (``isfinite(sum(x - x))``) flags a NaN, ``+inf`` or ``-inf`` at any of
  a few positions of a float32 and a bfloat16 array, per block too, as numpy does; and the
  XLA refresh of a sketched 600-wide Nystrom layer and a 9-wide Cholesky layer compiles
  one fusion fewer than with ``0 * x``, whose zero XLA:CPU broadcast to the basis's shape
  in a kernel of its own (``benchmarks/README.md``, *Compile time*)."""
  from sngd_jax._src.inverse import base
  rng = np.random.default_rng(2)
  for dtype in (jnp.float32, jnp.bfloat16):
    for bad in (np.nan, np.inf, -np.inf, 1e30):
      for pos in (0, 4095, 9999):
        x = rng.standard_normal((5, 2000)).astype(np.float32)
        x.reshape(-1)[pos] = bad
        want = np.isfinite(x.astype(dtype)).all(axis=1)
        xs = jnp.asarray(x, dtype)
        assert bool(jax.jit(base.all_finite)(xs)) == bool(want.all())
        np.testing.assert_array_equal(np.asarray(jax.jit(base.all_finite_per_block)(xs)), want)
  from tests.test_host_refresh import _layers as sketched_layers
  auto = sngd_jax.inverse.auto()
  specs, factors, weights, old = sketched_layers([("wide", 600, 1), ("small", 9, 1)])
  fn = lambda f, w, o: refresh_lib.refresh_inverses_xla(specs, f, w, o, auto, DAMPING,
                                                       ABS_DAMPING)
  now = _compiled_fusions(fn, factors, weights, old)
  with mock.patch.object(base, "all_finite", _zero_times_x):
    before = _compiled_fusions(fn, factors, weights, old)
  assert now == before - 1, (now, before)
