"""Hypothesis property tests over layer shapes, periods, damping and dtypes.

Properties:
  * with ``decay=0`` and ``inverse_every=1`` (the state's factor is the current
    batch's), the update equals the float64 reference
    ``(G + damping tr(G) I)^{-1} g`` per layer (per unit for rfim), to a
    tolerance set by float32 arithmetic times the damped matrix's condition
    number plus one rounding to the parameter dtype;
  * for any periods, damping, priors and input scales, every update and every
    state leaf is finite, update dtypes equal parameter dtypes, factors are
    float32, and the step/refresh counters follow the schedule.

``max_examples`` is modest and ``deadline=None`` (each new shape compiles).
"""

import jax
import jax.numpy as jnp
import numpy as np
from exact import exact_sngd
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sngd_jax import Captured

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EPS = {"float32": 2.0 ** -23, "bfloat16": 2.0 ** -8, "float16": 2.0 ** -11}
SETTINGS = dict(deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])


def _layer(rng, n, d_in, d_out, bias, dtype, scale):
  x = jnp.asarray(scale * rng.standard_normal((n, d_in)), dtype)
  k = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
  params = {"Dense_0": {"kernel": k}}
  if bias:
    params["Dense_0"]["bias"] = jnp.asarray(0.1 * rng.standard_normal(d_out), dtype)
  z = x.astype(jnp.float32) @ k.astype(jnp.float32)
  if bias:
    z = z + params["Dense_0"]["bias"].astype(jnp.float32)
  grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
  return params, grads, x, z.astype(dtype)


def _stack(tree, bias):
  w = np.asarray(tree["Dense_0"]["kernel"], np.float64)
  if bias:
    w = np.concatenate([w, np.asarray(tree["Dense_0"]["bias"], np.float64)[None]])
  return w


@settings(max_examples=10, **SETTINGS)
@given(n=st.integers(1, 12), d_in=st.integers(1, 6), d_out=st.integers(1, 4),
       bias=st.booleans(), fisher=st.sampled_from(["linear", "rfim"]),
       damping=st.floats(1e-3, 1.0), dtype=st.sampled_from(sorted(DTYPES)),
       prior=st.sampled_from(["scaled_identity", "identity", "none"]),
       scale=st.sampled_from([1e-2, 1.0, 1e2]), seed=st.integers(0, 2 ** 16))
def test_update_matches_float64_reference(n, d_in, d_out, bias, fisher, damping, dtype, prior,
                                          scale, seed):
  rng = np.random.default_rng(seed)
  params, grads, x, z = _layer(rng, n, d_in, d_out, bias, DTYPES[dtype], scale)
  weights = (np.ones((n, d_out)) if fisher == "linear"
             else (1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))) ** 2)
  # A unit dead on every row has G_j = 0 in float32: its refresh fails by design
  # (tested in test_reliability.py); the formula is checked on live units.
  assume(np.all(weights.sum(axis=0) > 1e-30))
  tx = exact_sngd(fisher=fisher, damping=damping, decay=0.0, inverse_every=1, prior=prior)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params,
                                      activations={"Dense_0": (Captured(x, z),)})
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert u.dtype == p.dtype and u.shape == p.shape
  assert int(state.num_skipped_steps) == 0 and int(state.num_refresh_failures) == 0

  xt = np.asarray(x, np.float64)
  if bias:
    xt = np.concatenate([xt, np.ones((n, 1))], axis=1)
  d = xt.shape[1]
  gw = _stack(grads, bias)
  want = np.empty_like(gw)
  cond = 1.0
  for j in range(d_out):
    g = (xt * weights[:, j:j + 1]).T @ xt / n
    a = g + damping * np.trace(g) * np.eye(d)
    want[:, j] = np.linalg.solve(a, gw[:, j])
    cond = max(cond, np.linalg.cond(a))
  got = _stack(updates, bias)
  # float32 statistics and inverse (error ~ eps32 * cond), then one rounding to `dtype`.
  tol = 100 * EPS["float32"] * cond + 2 * EPS[dtype]
  # Results below the dtype's smallest normal (float16: 6e-5) carry an absolute error.
  atol = tol * np.abs(want).max() + float(jnp.finfo(DTYPES[dtype]).smallest_normal) * EPS[dtype]
  np.testing.assert_allclose(got, want, rtol=tol, atol=atol)


@settings(max_examples=8, **SETTINGS)
@given(d_in=st.integers(1, 5), d_out=st.integers(1, 3), bias=st.booleans(),
       fisher=st.sampled_from(["linear", "rfim"]), damping=st.floats(1e-5, 1e-1),
       abs_damping=st.sampled_from([0.0, 1e-3]), dtype=st.sampled_from(sorted(DTYPES)),
       prior=st.sampled_from(["scaled_identity", "identity", "none"]),
       factor_every=st.integers(1, 3), inverse_every=st.integers(1, 4),
       scales=st.lists(st.sampled_from([0.0, 1e-6, 1e-2, 1.0, 1e3, 1e6]), min_size=5,
                       max_size=5),
       seed=st.integers(0, 2 ** 16))
def test_outputs_finite_and_schedule_for_any_periods(d_in, d_out, bias, fisher, damping,
                                                     abs_damping, dtype, prior, factor_every,
                                                     inverse_every, scales, seed):
  rng = np.random.default_rng(seed)
  jdtype = DTYPES[dtype]
  n = 6
  params, grads, _, _ = _layer(rng, n, d_in, d_out, bias, jdtype, 1.0)
  tx = exact_sngd(fisher=fisher, damping=damping, abs_damping=abs_damping, prior=prior,
                     factor_every=factor_every, inverse_every=inverse_every)
  update = jax.jit(tx.update)
  state = tx.init(params)
  k = params["Dense_0"]["kernel"].astype(jnp.float32)
  for scale in scales:
    x32 = jnp.asarray(scale * rng.standard_normal((n, d_in)), jnp.float32)
    x = x32.astype(jdtype)
    if not bool(jnp.all(jnp.isfinite(x))):  # 1e6 overflows float16: that is a non-finite input
      x32 = x.astype(jnp.float32)
    z = (x.astype(jnp.float32) @ k).astype(jdtype)
    before = state
    updates, state = update(grads, state, params, activations={"Dense_0": (Captured(x, z),)})
    skipped = int(state.num_skipped_steps) - int(before.num_skipped_steps)
    for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
      assert u.dtype == p.dtype
      assert bool(jnp.all(jnp.isfinite(u)))
      if skipped:
        assert not bool(jnp.any(u != 0))
    for leaf in jax.tree.leaves(state):
      assert bool(jnp.all(jnp.isfinite(leaf)))
    # Activations are read on factor steps only: there a non-finite input skips the step.
    finite_input = bool(jnp.all(jnp.isfinite(x))) or int(before.count) % factor_every != 0
    if skipped:
      # Only a non-finite input, or a float16 overflow of a finite one, may skip a step.
      assert dtype == "float16" or not finite_input
    # A finite input counts as a step (an overflowing one keeps its statistics); a
    # non-finite one leaves the count.
    assert int(state.count) == int(before.count) + finite_input
  assert state.factors["Dense_0"].dtype == jnp.float32
  assert bool(state.has_inverse) == (int(state.count) > 0)
