"""The XLA:CPU thread-pool deadlock of jaxlib 0.10.2 is avoided in the library
(docs/known-issues.md), under JAX's default configuration (``tests/conftest.py``
sets no ``XLA_FLAGS``).

jaxlib's CPU LAPACK kernels split a large enough batch over XLA's thread pool and
block their own pool thread until the parts finish; as many such calls running at
once as the pool has threads deadlock it. The library therefore never issues two
LAPACK calls that XLA may run at once: Denman-Beavers inverts ``Z`` and ``Y`` in one
batched call per step, and ``refresh_inverses`` (and ``factor_roots``) order the
size groups with ``optimization_barrier``. These tests check

* the batched step gives the old two-call iteration's result, and float64 SciPy
  references (``sqrtm``, ``inv``);
* the structure that prevents the deadlock (one ``lu`` per step, the barriers);
* a whole jitted ``sngd`` update with three size groups, for the default
  (``cholesky``) and the iterative methods, finishes in a child process
  (``examples/xla_cpu_hang_repro.py --mode update``): a deadlock fails the test
  by its timeout instead of hanging the suite.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
from helpers_jaxpr import eqns as _eqns

import sngd_jax
from sngd_jax import inverse as matfun
from sngd_jax._src.inverse import roots

ROOT = pathlib.Path(__file__).resolve().parents[1]


def spd(d, cond, seed=0, batch=2, dtype=np.float64):
  rng = np.random.default_rng(seed)
  mats = []
  for _ in range(batch):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mats.append((q * np.logspace(0, -np.log10(cond), d)) @ q.T)
  return np.stack(mats).astype(dtype)


def _old_db_step(y, z):
  """The step before the fix: two independent inverses."""
  return 0.5 * (y + jnp.linalg.inv(z)), 0.5 * (z + jnp.linalg.inv(y))


@pytest.mark.parametrize("use_x64", [True, False])
@pytest.mark.parametrize("tol", [None, "auto"])
def test_batched_step_matches_two_calls(tol, use_x64):
  with jax.enable_x64(use_x64):
    dtype = jnp.float64 if use_x64 else jnp.float32
    a = jnp.asarray(spd(24, 1e4), dtype)
    old = jax.jit(lambda a: roots._coupled_iteration(_old_db_step, a, 30, tol, "frobenius"))(a)
    new = jax.jit(lambda a: matfun.denman_beavers(a, num_iters=30, tol=tol))(a)
    rtol = 1e-12 if use_x64 else 1e-5
    for got, ref in zip(new, old, strict=True):
      np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("method", ["denman_beavers", "newton_schulz"])
def test_refresh_matches_scipy_float64(method):
  """``(G + rho I)^{-1}`` and the roots against SciPy (``sqrtm``, ``inv``) in float64."""
  with jax.enable_x64(True):
    g = spd(40, 1e5)
    rho = np.array([1e-3, 1e-4])
    inv, ok = jax.jit(getattr(matfun, method + "_inverse")().refresh)(
        jnp.asarray(g), jnp.asarray(rho))
    assert np.all(np.asarray(ok))
    r = jax.jit(lambda a: matfun.ROOTS[method](a, num_iters=60, tol="auto"))(jnp.asarray(g))
    for b in range(2):
      ref = scipy.linalg.inv(g[b] + rho[b] * np.eye(40))
      assert np.linalg.norm(np.asarray(inv[b]) - ref) / np.linalg.norm(ref) < 1e-9
      sq = np.real(scipy.linalg.sqrtm(g[b]))
      assert np.linalg.norm(np.asarray(r.sqrt[b]) - sq) / np.linalg.norm(sq) < 1e-9
      isq = scipy.linalg.inv(sq)
      assert np.linalg.norm(np.asarray(r.inv_sqrt[b]) - isq) / np.linalg.norm(isq) < 1e-7


@pytest.mark.parametrize("tol", [None, "auto"])
def test_denman_beavers_one_lu_per_step(tol):
  a = jnp.asarray(spd(8, 1e2, dtype=np.float32))
  jaxpr = jax.make_jaxpr(lambda a: matfun.denman_beavers(a, num_iters=7, tol=tol))(a).jaxpr
  assert sum(e.primitive.name == "lu" for e in _eqns(jaxpr)) == 1  # in the loop body


def _update_jaxpr(inverse):
  import flax.linen as nn
  import optax

  model = nn.Sequential([nn.Dense(9), nn.relu, nn.Dense(7), nn.relu, nn.Dense(3)])
  x = jnp.ones((8, 5), jnp.float32)
  params = model.init(jax.random.PRNGKey(0), x)["params"]

  def loss_fn(p, x):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), jnp.zeros(8, jnp.int32)).mean()

  tx = sngd_jax.sngd_momentum(0.1, inverse=inverse)
  state = tx.init(params)

  def step(params, state, x):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
    return tx.update(grads, state, params, activations=acts)

  return jax.make_jaxpr(step)(params, state, x).jaxpr


@pytest.mark.parametrize("inverse", ["cholesky", "denman_beavers", "newton_schulz"])
def test_size_groups_refresh_one_after_another(inverse):
  """Three layer sizes (6, 10 and 8 inputs with the bias): two barriers order three groups."""
  barriers = [e for e in _eqns(_update_jaxpr(inverse))
              if e.primitive.name == "optimization_barrier"]
  assert len(barriers) == 2


def _repro():
  spec = importlib.util.spec_from_file_location(
      "xla_cpu_hang_repro", ROOT / "examples" / "xla_cpu_hang_repro.py")
  module = importlib.util.module_from_spec(spec)
  assert spec.loader is not None
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("inverse", ["cholesky", "denman_beavers"])
def test_update_with_three_size_groups_finishes_on_cpu(inverse):
  """Default XLA flags, blocks large enough that LAPACK splits the batch over the pool."""
  repro = _repro()
  assert repro.trial(repro.UPDATE_CHILD, [inverse, "2"], "", timeout=240) == "finished"
