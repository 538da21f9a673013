"""Inverse methods inside ``sngd``: equal updates, batching, blocks, the size rule, failures."""

import functools
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_jaxpr import eqns as _eqns
from helpers_mlp import MLP

import sngd_jax
from sngd_jax import inverse as matfun
from sngd_jax import inverse as methods
from sngd_jax._src import statistics as factors_lib
from sngd_jax._src.inverse import dense as dense_lib
from sngd_jax._src.inverse import nystrom
from sngd_jax._src.inverse import refresh as refresh_lib

pytestmark = pytest.mark.usefixtures("x64")


def problem(features=(16, 16, 16, 3), in_dim=15, batch=12, seed=0):
  rng = np.random.default_rng(seed)
  model = MLP(features)
  x = jnp.asarray(rng.normal(size=(batch, in_dim)))
  y = jnp.asarray(rng.normal(size=(batch, features[-1])))
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  return params, x, y, loss_fn


def run(tx, steps=3, fisher_problem=None):
  """Runs ``steps`` updates (new data each step); returns the updates and the state."""
  params, x, y, loss_fn = fisher_problem or problem()
  state = tx.init(params)
  grad_fn = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)

  @jax.jit
  def step(params, state, x, y):
    grads, acts = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates)), \
        state, updates

  out = []
  for i in range(steps):
    params, state, updates = step(params, state, x + 0.1 * i, y)
    out.append(updates)
  return out, state


def tree_rel(a, b):
  pairs = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  num = sum(float(jnp.sum((x - y) ** 2)) for x, y in pairs)
  den = sum(float(jnp.sum(y ** 2)) for y in jax.tree.leaves(b))
  return np.sqrt(num / den)


@functools.lru_cache(maxsize=None)
def _cholesky_updates(fisher):
  return run(exact_sngd(fisher=fisher, inverse="cholesky", inverse_every=1, damping=1e-3),
             steps=2)[0]


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
@pytest.mark.parametrize("name", sorted(set(methods.METHODS) - {"cholesky"}))
def test_every_method_matches_cholesky(name, fisher):
  """On layers of size <= 17 every named method is exact (Nystrom's default rank and the
  block size exceed d), so its updates equal Cholesky's over several refreshes."""
  kw = dict(fisher=fisher, inverse_every=1, damping=1e-3)
  ref = _cholesky_updates(fisher)
  got, state = run(exact_sngd(inverse=name, **kw), steps=2)
  assert int(state.num_refresh_failures) == 0
  for r, g in zip(ref, got, strict=True):
    assert tree_rel(g, r) < 1e-8


def count_primitive(tx, name, fisher_problem=None):
  params, x, y, loss_fn = fisher_problem or problem()
  state = tx.init(params)
  grads, acts = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(params, x, y)
  jaxpr = jax.make_jaxpr(lambda g, s, a: tx.update(g, s, params, activations=a))(
      grads, state, acts)
  return sum(e.primitive.name == name for e in _eqns(jaxpr.jaxpr))


@pytest.mark.parametrize("inverse,primitive", [("cholesky", "cholesky"), ("eigh", "eigh"),
                                               ("newton_schulz", "while")])
@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_equal_sizes_share_one_kernel_call(inverse, primitive, fisher):
  """Four layers with two distinct factor sizes (16 and 17): one kernel call per size.

  The refresh of a group of several blocks is ``lax.platform_dependent``
  (``inverse.refresh.batched_refresh``): the jaxpr holds the batched call for GPU/TPU and
  the CPU form, one block per call: written out for groups of up to ``UNROLL_MAX`` blocks
  (``b`` calls), inside ``lax.map`` for larger ones (one call). A group of one block (the
  16-input layer with ``fisher="linear"``) is one direct call for GPU/TPU and the same call
  for CPU, kept one block per call under a caller's ``vmap``
  (``refresh.one_call_per_member``): two.
  """
  assert refresh_lib.UNROLL_MAX == 8  # the counts below: rfim groups of 16-35 blocks map
  tx = exact_sngd(fisher=fisher, inverse=inverse)
  # linear: d=16 one block (2), d=17 three blocks (1 batched + 3 written out);
  # rfim: a block per unit, 16 and 35 blocks (1 batched + 1 in lax.map each).
  assert count_primitive(tx, primitive) == (2 + (1 + 3) if fisher == "linear" else 2 * 2)
  # Three distinct sizes: three groups (the count follows sizes, not layers); linear: 16 and
  # 21 one block each, 17 two blocks (1 + 2); rfim: 16, 23 and 16 blocks.
  want = 2 + 2 + (1 + 2) if fisher == "linear" else 2 * 3
  assert count_primitive(tx, primitive, problem(features=(16, 20, 16, 3))) == want
  with mock.patch.object(refresh_lib, "UNROLL_MAX", 0), \
      mock.patch.object(refresh_lib, "UNROLL_LAYERS_MAX", 0):  # every CPU group in lax.map
    assert count_primitive(tx, primitive) == (2 + 2 if fisher == "linear" else 2 * 2)


def _spd_blocks(b, d, seed=0):
  x = np.random.default_rng(seed).normal(size=(b, d + 3, d))
  return np.einsum("bnd,bne->bde", x, x) / (d + 3)


@pytest.mark.parametrize("d", [1, 2])
def test_small_inverse_matches_float64_inverse(d):
  """``small_inverse`` (the closed form ``cholesky`` takes for ``d <= 2``) against numpy's
  float64 inverse of ``G + rho I``, in float64 and in float32; the LAPACK path agrees."""
  g = _spd_blocks(7, d)
  g[3] = np.diag(np.arange(1.0, d + 1)) * 1e-3  # badly scaled against the others
  shift = np.linspace(1e-4, 1e-1, 7)
  ref = np.linalg.inv(g + shift[:, None, None] * np.eye(d))
  inverse, ok = dense_lib.small_inverse(jnp.asarray(g), jnp.asarray(shift))
  assert np.all(np.asarray(ok))
  np.testing.assert_allclose(np.asarray(inverse), ref, rtol=1e-12)
  inverse32, _ = dense_lib.small_inverse(jnp.asarray(g, jnp.float32),
                                         jnp.asarray(shift, jnp.float32))
  np.testing.assert_allclose(np.asarray(inverse32), ref, rtol=2e-5)
  with mock.patch.object(dense_lib, "SMALL_DIM", 0):  # Cholesky and two triangular solves
    lapack, lapack_ok = dense_lib.cholesky_refresh(jnp.asarray(g), jnp.asarray(shift))
  assert np.all(np.asarray(lapack_ok))
  np.testing.assert_allclose(np.asarray(lapack), ref, rtol=1e-10)


def test_small_inverse_flags_what_cholesky_rejects():
  """``ok`` is False exactly where Cholesky fails: ``A`` not positive definite (a
  non-positive pivot or determinant) or not finite."""
  a = np.array([[[2.0, 0.5], [0.5, 1.0]],      # positive definite
                [[1.0, 2.0], [2.0, 1.0]],      # indefinite: det < 0
                [[-1.0, 0.0], [0.0, -2.0]],    # negative definite: det > 0, a00 < 0
                [[1.0, 1.0], [1.0, 1.0]],      # singular
                [[np.nan, 0.0], [0.0, 1.0]]])  # not finite
  shift = jnp.zeros(5)
  _, ok = dense_lib.small_inverse(jnp.asarray(a), shift)
  with mock.patch.object(dense_lib, "SMALL_DIM", 0):
    _, lapack_ok = dense_lib.cholesky_refresh(jnp.asarray(a), shift)
  np.testing.assert_array_equal(np.asarray(ok), [True, False, False, False, False])
  np.testing.assert_array_equal(np.asarray(ok), np.asarray(lapack_ok))
  _, ok1 = dense_lib.small_inverse(jnp.asarray([[[2.0]], [[-1.0]], [[0.0]]]), jnp.zeros(3))
  np.testing.assert_array_equal(np.asarray(ok1), [True, False, False])


@pytest.mark.parametrize("b", [3, 12])
def test_cpu_block_by_block_equals_one_batched_call(b):
  """The CPU form of a group refresh, written out (``b <= UNROLL_MAX``) or in ``lax.map``,
  gives the batched call's inverses and flags."""
  g = jnp.asarray(_spd_blocks(b, 6, seed=b))
  shift = jnp.full((b,), 1e-2)
  refresh = dense_lib.cholesky_refresh
  want, want_ok = refresh(g, shift)
  got, got_ok = jax.jit(functools.partial(refresh_lib._block_by_block, refresh))(g, shift)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12)
  np.testing.assert_array_equal(np.asarray(got_ok), np.asarray(want_ok))
  jaxpr = jax.make_jaxpr(functools.partial(refresh_lib._block_by_block, refresh))(g, shift)
  calls = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "cholesky"]
  loops = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name in ("while", "scan")]
  assert len(calls) == (b if b <= refresh_lib.UNROLL_MAX else 1) and len(loops) == (b > 8)
  assert all(e.invars[0].aval.shape[0] == 1 for e in calls)  # one block per LAPACK call


def test_batch_safe_sizes():
  """Which block sizes a method refreshes as a whole group on CPU (``batch_safe``)."""
  assert methods.cholesky().batch_safe(2) and not methods.cholesky().batch_safe(3)
  assert methods.auto().batch_safe(2) and not methods.auto().batch_safe(600)
  assert methods.block_diagonal(2).batch_safe(9)  # sub-blocks of 2
  assert not methods.block_diagonal(4).batch_safe(9)
  assert methods.eigh().batch_safe is None and methods.nystrom().batch_safe is None


class NormMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm(param_dtype=x.dtype)(nn.relu(nn.Dense(6, param_dtype=x.dtype)(x)))
    return nn.Dense(3, param_dtype=x.dtype)(x)


def test_two_by_two_norm_blocks_refresh_in_one_call():
  """A LayerNorm's per-unit ``(scale, bias)`` factors (``d = 2``) are inverted in closed
  form as one group, with no loop and no LAPACK call, and the updates equal those of the
  LAPACK path (``SMALL_DIM = 0``: a Cholesky per block) to float64 rounding."""
  rng = np.random.default_rng(0)
  x, y = jnp.asarray(rng.normal(size=(12, 5))), jnp.asarray(rng.normal(size=(12, 3)))
  model = NormMLP()
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = exact_sngd(inverse_every=1)
  # The Dense layers, one block each: a call for GPU/TPU and one for CPU (`batched_refresh`).
  assert count_primitive(tx, "cholesky", (params, x, y, loss_fn)) == 2 * 2
  assert count_primitive(tx, "while", (params, x, y, loss_fn)) == 0
  got, state = run(tx, steps=2, fisher_problem=(params, x, y, loss_fn))
  assert state.inverses["LayerNorm_0"].shape[-2:] == (2, 2)
  with mock.patch.object(dense_lib, "SMALL_DIM", 0):
    # + the 6 units' blocks: one batched call (GPU/TPU) and one per block (CPU)
    assert count_primitive(tx, "cholesky", (params, x, y, loss_fn)) == 2 * 2 + 1 + 6
    want, _ = run(tx, steps=2, fisher_problem=(params, x, y, loss_fn))
  for g, w in zip(got, want, strict=True):
    assert tree_rel(g, w) < 1e-10


def test_blocks_match_block_diagonal_reference():
  """``block_diagonal(5)``: the update is blockdiag(G_ii + rho I)^{-1} g, rho from all of G."""
  kw = dict(inverse=methods.block_diagonal(5), inverse_every=1, decay=0.0, damping=1e-2,
            prior="none")
  params, x, y, loss_fn = problem()
  updates, state = run(exact_sngd(**kw), steps=1)
  grads, _ = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(params, x, y)
  for path in ("Dense_0", "Dense_2"):
    g = np.asarray(factors_lib.normalized(state.factors[path], state.weights[path]))
    d = g.shape[0]
    rho = 1e-2 * np.trace(g)
    inv = np.zeros_like(g)
    for s in range(0, d, 5):
      sl = slice(s, min(s + 5, d))
      inv[sl, sl] = np.linalg.inv(g[sl, sl] + rho * np.eye(sl.stop - sl.start))
    grad = np.concatenate([grads[path]["kernel"], grads[path]["bias"][None]])
    ref = inv @ grad
    got = np.concatenate([updates[0][path]["kernel"], updates[0][path]["bias"][None]])
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
  assert state.inverses["Dense_0"].shape == (1, 4, 5, 5)  # d=16 -> 4 blocks of 5 (padded)


def test_auto_switches_large_layers():
  """``max_dim`` counts layer inputs: blocks up to ``max_dim + 1`` (with the bias row) are
  exact, larger ones get the Nystrom model."""
  tx = exact_sngd(inverse=methods.auto(max_dim=15, large="nystrom", rank=4),
                     inverse_every=1)
  updates, state = run(tx, steps=2)
  ref, _ = run(exact_sngd(inverse="cholesky", inverse_every=1), steps=2)
  assert state.inverses["Dense_0"].shape == (1, 16, 16)       # 15 inputs + bias: exact
  rep = state.inverses["Dense_1"]                             # 16 inputs + bias: rank 4
  assert isinstance(rep, nystrom.NystromRep) and rep.basis.shape == (1, 17, 4)
  assert int(state.num_refresh_failures) == 0
  # Step 0 sees the same params; later steps differ through the other layers' updates.
  assert tree_rel(updates[0]["Dense_0"], ref[0]["Dense_0"]) < 1e-8
  assert tree_rel(updates[0]["Dense_1"], ref[0]["Dense_1"]) > 1e-6
  assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(updates))
  # A 16-wide layer with its bias (d = 17) stays exact under max_dim=16.
  _, state16 = run(exact_sngd(inverse=methods.auto(max_dim=16, rank=4), inverse_every=1),
                   steps=1)
  assert state16.inverses["Dense_1"].shape == (1, 17, 17)


@pytest.mark.parametrize("fisher,blocks", [("linear", 4), ("rfim", 16 + 16 + 16 + 3)])
def test_failed_refresh_keeps_identity_and_counts(fisher, blocks):
  """A refresh whose error estimate exceeds the bound keeps the previous inverse (here the
  identity: updates are the plain gradients) and counts every failed block."""
  never = matfun.newton_schulz_inverse(num_iters=1, tol=None, error_bound=1e-12)
  updates, state = run(exact_sngd(fisher=fisher, inverse=never, inverse_every=1), steps=2)
  params, x, y, loss_fn = problem()
  grads, _ = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(params, x, y)
  assert tree_rel(updates[0], grads) < 1e-12
  assert int(state.num_refresh_failures) == 2 * blocks


def test_failed_block_keeps_previous_inverse():
  """Blocks that fail at a later refresh keep the inverse of the earlier one."""
  calls = {"n": 0}
  base = matfun.cholesky()

  def refresh(g, shift):
    rep, ok = base.refresh(g, shift)
    calls["n"] += 1
    return rep, ok & (shift < 0)  # ok only where shift < 0, i.e. never

  failing = matfun.InverseMethod(base.identity, refresh, base.apply)
  tx_ok = exact_sngd(inverse="cholesky", inverse_every=1)
  params, x, y, loss_fn = problem()
  state = tx_ok.init(params)
  grads, acts = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(params, x, y)
  _, state = tx_ok.update(grads, state, params, activations=acts)
  tx_fail = exact_sngd(inverse=failing, inverse_every=1)
  _, state2 = tx_fail.update(grads, state, params, activations=acts)
  for path in state.inverses:
    np.testing.assert_array_equal(state2.inverses[path], state.inverses[path])
  # Traced for each group (d=16 one block, d=17 three blocks) once in batched_refresh's
  # default branch and, in its CPU form, once per block.
  assert int(state2.num_refresh_failures) == 4 and calls["n"] == (1 + 1) + (1 + 3)


def test_unknown_method_error():
  with pytest.raises(ValueError, match="unknown inverse method"):
    exact_sngd(inverse="qr")


def test_factories_give_one_method_per_arguments_so_states_share_a_compiled_step():
  """Two optimizers built with equal factory arguments have states of one tree structure: a
  step compiled for the first runs the second's state (a new method object per call made
  them differ, and a compiled step rejected the other state)."""
  for make in (lambda: methods.auto(rank=4), lambda: methods.nystrom(rank=4),
               lambda: methods.block_diagonal(8), lambda: methods.cholesky(),
               lambda: methods.denman_beavers_inverse(num_iters=9)):
    assert make() is make()
  assert methods.auto(rank=4) is not methods.auto(rank=8)
  params, x, y, loss_fn = problem(in_dim=30)
  txs = [sngd_jax.sngd(inverse=methods.auto(max_dim=8, rank=4)) for _ in range(2)]
  grads, acts = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
  step = jax.jit(lambda s: txs[0].update(grads, s, params, activations=acts)).lower(
      txs[0].init(params)).compile()
  u0, _ = step(txs[0].init(params))
  u1, _ = step(txs[1].init(params))  # raised "input pytree does not match" before
  jax.tree.map(np.testing.assert_array_equal, u0, u1)
