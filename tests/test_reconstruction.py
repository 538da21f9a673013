"""The paper's theorem: SNGD with a fixed local Fisher G is gradient descent on the
reconstructed network (a local Fisher layer x~ -> G^{-1/2} x~ before each layer,
weights W' = G^{1/2} W~). Both trajectories are computed independently and must agree
for 10 steps to 1e-8 in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_mlp import dense_inputs, make_problem

import sngd_jax

FEATURES = (7, 5, 3)
LR = 0.05
DAMPING = 1e-3
STEPS = 10

pytestmark = pytest.mark.usefixtures("x64")


def _sym_pow(a, p):
  w, v = np.linalg.eigh(a)
  return (v * w ** p) @ v.T


def _fixed_factors(params, x, fisher):
  """A fixed SPD local Fisher per layer (the batch statistics at the start)."""
  xs, zs = dense_inputs(params, x, FEATURES)
  out = {}
  for i, (h, z) in enumerate(zip(xs, zs, strict=True)):
    xa = np.concatenate([h, np.ones((h.shape[0], 1))], 1)
    if fisher == "linear":
      out[f"Dense_{i}"] = xa.T @ xa / xa.shape[0]
    else:
      s2 = (1 / (1 + np.exp(-z))) ** 2
      out[f"Dense_{i}"] = np.einsum("nj,na,nb->jab", s2, xa, xa) / xa.shape[0]
  return out


def _damped(g):
  d = g.shape[-1]
  tr = np.trace(g, axis1=-2, axis2=-1)[..., None, None]
  return g + DAMPING * tr * np.eye(d)


def _reconstructed_trajectory(params, factors, batches, fisher):
  """Plain gradient descent on W' of the reconstructed network; returns W~ per step."""
  names = [f"Dense_{i}" for i in range(len(FEATURES))]
  g_half, g_mhalf = {}, {}
  for n in names:
    gd = _damped(factors[n])
    if fisher == "linear":
      g_half[n], g_mhalf[n] = _sym_pow(gd, 0.5), _sym_pow(gd, -0.5)
    else:
      g_half[n] = np.stack([_sym_pow(b, 0.5) for b in gd])
      g_mhalf[n] = np.stack([_sym_pow(b, -0.5) for b in gd])

  def to_prime(n, w_aug):
    if fisher == "linear":
      return g_half[n] @ w_aug
    return np.einsum("jab,bj->aj", g_half[n], w_aug)

  def from_prime(n, w_prime):
    if fisher == "linear":
      return g_mhalf[n] @ w_prime
    return np.einsum("jab,bj->aj", g_mhalf[n], w_prime)

  wp = {n: jnp.asarray(to_prime(n, np.concatenate(
      [params[n]["kernel"], params[n]["bias"][None]]))) for n in names}
  mh = {n: jnp.asarray(g_mhalf[n]) for n in names}

  def forward(wp, x):
    h = x
    for i, n in enumerate(names):
      xa = jnp.concatenate([h, jnp.ones((h.shape[0], 1))], 1)
      if fisher == "linear":
        z = (xa @ mh[n]) @ wp[n]                         # local Fisher layer, then W'
      else:
        z = jnp.einsum("na,jab,bj->nj", xa, mh[n], wp[n])  # one local Fisher layer per unit
      h = jax.nn.relu(z) if i < len(names) - 1 else z
    return h

  loss = lambda wp, x, y: jnp.mean((forward(wp, x) - y) ** 2)
  traj = []
  for x, y in batches:
    g = jax.grad(loss)(wp, x, y)
    wp = {n: wp[n] - LR * g[n] for n in names}
    traj.append({n: from_prime(n, np.asarray(wp[n])) for n in names})
  return traj


def _sngd_trajectory(params, factors, batches, loss_fn, fisher):
  tx = optax.chain(
      exact_sngd(fisher=fisher, damping=DAMPING, factor_every=10**6,
                    inverse_every=10**6),
      optax.sgd(LR))
  state = tx.init(params)
  sngd_state = state[0]._replace(
      count=jnp.ones((), jnp.int32),  # step 0 is past: no factor update within 10 steps
      factors={n: jnp.asarray(f) for n, f in factors.items()},
      weights={n: jnp.ones((), jnp.float64) for n in factors})
  state = (sngd_state,) + tuple(state[1:])

  @jax.jit
  def step(params, state, x, y):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  traj = []
  for x, y in batches:
    params, state = step(params, state, x, y)
    traj.append({n: np.concatenate([params[n]["kernel"], params[n]["bias"][None]])
                 for n in params})
  assert int(state[0].num_refresh_failures) == 0
  return traj


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_sngd_equals_gradient_descent_on_reconstructed_network(fisher):
  _, params, x0, _, loss_fn = make_problem(features=FEATURES, batch=32)
  factors = _fixed_factors(params, x0, fisher)
  rng = np.random.default_rng(3)
  batches = [(jnp.asarray(rng.normal(size=(16, 6))), jnp.asarray(rng.normal(size=(16, 3))))
             for _ in range(STEPS)]
  ours = _sngd_trajectory(params, factors, batches, loss_fn, fisher)
  theirs = _reconstructed_trajectory(params, factors, batches, fisher)
  moved = 0.0
  for t in range(STEPS):
    for n in ours[t]:
      np.testing.assert_allclose(ours[t][n], theirs[t][n], rtol=0, atol=1e-8,
                                 err_msg=f"step {t}, layer {n}")
      moved = max(moved, np.abs(ours[t][n] - ours[0][n]).max())
  assert moved > 1e-3  # the trajectory is not trivially constant
