"""The reconstructed network (W. Liu et al., arXiv:2412.07441).

A local Fisher layer ``x~ -> G^{-1/2} x~`` in front of each layer, weights
``W' = G^{1/2} W~``: the public functions round-trip and compute the same
function, one SGD step on ``W'`` is the transform's update, and (the paper's
theorem) SNGD with a fixed local Fisher ``G`` is gradient descent on the
reconstructed network: both 10-step trajectories, computed independently,
agree to 1e-8 in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_mlp import dense_inputs, make_problem

import sngd_jax
from sngd_jax._src import reconstruct

pytestmark = pytest.mark.usefixtures("x64")

FEATURES = (7, 5, 3)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(FEATURES):
      x = nn.Dense(f, param_dtype=x.dtype)(x)
      if i < len(FEATURES) - 1:
        x = nn.tanh(x)  # smooth: ReLU kinks at exactly 0 break the gradient identity
    return x


def loss_fn(params, x, y):
  return jnp.mean((MLP().apply({"params": params}, x) - y) ** 2)


def reconstructed_loss(params_prime, roots, x, y):
  """The same MLP written with local Fisher layers in front of every Dense layer."""
  h = x
  for i in range(len(FEATURES)):
    p = params_prime[f"Dense_{i}"]
    h = reconstruct.reconstructed_dense(h, p["kernel"], p["bias"], roots[f"Dense_{i}"].inv_sqrt)
    if i < len(FEATURES) - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def setup(fisher, damping=1e-2):
  """A state with non-trivial factors: two steps on two batches."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 6)))
  y = jnp.asarray(rng.normal(size=(20, 3)))
  params = MLP().init(jax.random.key(0), x)["params"]
  tx = exact_sngd(fisher=fisher, damping=damping, inverse_every=1, decay=0.5)
  state = tx.init(params)
  grad_fn = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)
  for i in range(2):
    grads, acts = grad_fn(params, x + i, y)
    updates, state = tx.update(grads, state, params, activations=acts)
  return params, state, tx, x, y, grads, acts, updates


def leaves_rel(a, b):
  """``max |a - b| / max |b|`` over the whole tree."""
  diff = max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  return diff / max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))


@pytest.mark.parametrize("method", ["eigh", "denman_beavers", "newton_schulz"])
@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_round_trip(fisher, method):
  params, state, *_ = setup(fisher)
  kw = {} if method == "eigh" else {"num_iters": 60, "tol": "auto"}
  roots = sngd_jax.factor_roots(state, damping=1e-2, method=method, **kw)
  prime = sngd_jax.to_reconstructed(params, roots)
  assert jax.tree.structure(prime) == jax.tree.structure(params)
  assert leaves_rel(prime, params) > 1e-2  # it did change the weights
  back = sngd_jax.from_reconstructed(prime, roots)
  assert leaves_rel(back, params) < 1e-10


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_same_outputs(fisher):
  """Each reconstructed layer maps the captured inputs to the captured outputs, and the
  reconstructed network computes the same loss."""
  params, state, _, x, y, _, acts, _ = setup(fisher)
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  prime = sngd_jax.to_reconstructed(params, roots)
  for path, calls in acts.items():
    p = prime[path]
    z = sngd_jax.reconstructed_dense(calls[0].inputs, p["kernel"], p["bias"],
                                     roots[path].inv_sqrt)
    np.testing.assert_allclose(z, calls[0].outputs, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(reconstructed_loss(prime, roots, x + 1, y), loss_fn(params, x + 1, y),
                             rtol=1e-12)


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_sgd_on_reconstructed_network_is_sngd(fisher):
  """The paper's theorem: grad_W' = G^{-1/2} grad_W~, so one SGD step on W' mapped back
  is the transform's update ``G_rho^{-1} grad`` (same factors, same damping)."""
  params, state, _, x, y, grads, _, updates = setup(fisher)
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  prime = sngd_jax.to_reconstructed(params, roots)
  g_prime = jax.grad(reconstructed_loss)(prime, roots, x + 1, y)
  lr = 0.1
  stepped = jax.tree.map(lambda p, g: p - lr * g, prime, g_prime)
  back = sngd_jax.from_reconstructed(stepped, roots)
  expected = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  delta_got = jax.tree.map(lambda a, b: a - b, back, params)
  delta_ref = jax.tree.map(lambda a, b: a - b, expected, params)
  assert leaves_rel(delta_got, delta_ref) < 1e-8
  del grads


def test_fisher_layer_shapes_and_no_bias():
  inv = jnp.asarray(np.diag([2.0, 3.0, 4.0]))
  out = sngd_jax.fisher_layer(jnp.ones((5, 2)), inv)
  np.testing.assert_allclose(out, np.tile([2.0, 3.0, 4.0], (5, 1)))
  out = sngd_jax.fisher_layer(jnp.ones((5, 3)), jnp.stack([inv, 2 * inv]), bias=False)
  assert out.shape == (5, 2, 3)
  np.testing.assert_allclose(out[:, 1], np.tile([4.0, 6.0, 8.0], (5, 1)))


def test_missing_layer_error():
  params, state, *_ = setup("linear")
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  with pytest.raises(ValueError, match="no kernel"):
    sngd_jax.to_reconstructed({"Dense_0": params["Dense_0"]}, roots)


# ---------------------------------------------------------------------------
# The theorem over a trajectory: SNGD with fixed factors is gradient descent on the
# reconstructed network (a ReLU MLP from helpers_mlp, float64 numpy roots).

LR = 0.05
DAMPING = 1e-3
STEPS = 10


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
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, x, y)
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
  _, params, x0, _, relu_loss = make_problem(features=FEATURES, batch=32)
  factors = _fixed_factors(params, x0, fisher)
  rng = np.random.default_rng(3)
  batches = [(jnp.asarray(rng.normal(size=(16, 6))), jnp.asarray(rng.normal(size=(16, 3))))
             for _ in range(STEPS)]
  ours = _sngd_trajectory(params, factors, batches, relu_loss, fisher)
  theirs = _reconstructed_trajectory(params, factors, batches, fisher)
  moved = 0.0
  for t in range(STEPS):
    for n in ours[t]:
      np.testing.assert_allclose(ours[t][n], theirs[t][n], rtol=0, atol=1e-8,
                                 err_msg=f"step {t}, layer {n}")
      moved = max(moved, np.abs(ours[t][n] - ours[0][n]).max())
  assert moved > 1e-3  # the trajectory is not trivially constant


class EmbedMLP(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(11, 4, param_dtype=jnp.float64)(tokens)
    return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(h))


def test_embedding_diagonal_factor_reconstructs():
  """An embedding's local Fisher is diagonal (``diag(f)``, token frequencies): its damped
  factor and roots are ``(V,)`` vectors, and one SGD step on the reconstructed table
  ``E' = (f + rho)^{1/2} E`` (lookups scaled by ``(f + rho)^{-1/2}``) mapped back is the
  transform's update, as for a dense layer."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 8, size=(30,)))  # tokens 8-10 never occur: f = 0
  y = jnp.asarray(rng.normal(size=(30, 3)))
  model = EmbedMLP()
  params = model.init(jax.random.key(0), tokens)["params"]

  def loss(p, t, y):
    return jnp.mean((model.apply({"params": p}, t) - y) ** 2)

  tx = exact_sngd(damping=1e-2, inverse_every=1, decay=0.5)
  state = tx.init(params)
  grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params, tokens, y)
  updates, state = tx.update(grads, state, params, activations=acts)
  damped = sngd_jax.damped_factors(state, damping=1e-2)
  f = np.asarray(state.factors["Embed_0"]) / float(state.weights["Embed_0"])
  np.testing.assert_allclose(damped["Embed_0"], f + 1e-2 * f.sum(), rtol=1e-12)
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  np.testing.assert_allclose(roots["Embed_0"].sqrt ** 2, damped["Embed_0"], rtol=1e-12)
  np.testing.assert_allclose(roots["Embed_0"].sqrt * roots["Embed_0"].inv_sqrt, 1.0, rtol=1e-12)
  prime = sngd_jax.to_reconstructed(params, roots)
  np.testing.assert_allclose(
      prime["Embed_0"]["embedding"],
      np.sqrt(damped["Embed_0"])[:, None] * params["Embed_0"]["embedding"], rtol=1e-12)

  def reconstructed(p, t, y):
    h = p["Embed_0"]["embedding"][t] * roots["Embed_0"].inv_sqrt[t][:, None]
    d = p["Dense_0"]
    z = sngd_jax.reconstructed_dense(jnp.tanh(h), d["kernel"], d["bias"],
                                     roots["Dense_0"].inv_sqrt)
    return jnp.mean((z - y) ** 2)

  np.testing.assert_allclose(reconstructed(prime, tokens, y), loss(params, tokens, y),
                             rtol=1e-12)
  lr = 0.1
  g_prime = jax.grad(reconstructed)(prime, tokens, y)
  back = sngd_jax.from_reconstructed(jax.tree.map(lambda p, g: p - lr * g, prime, g_prime),
                                     roots)
  delta_got = jax.tree.map(lambda a, b: a - b, back, params)
  delta_ref = jax.tree.map(lambda u: -lr * u, updates)
  assert leaves_rel(delta_got, delta_ref) < 1e-8


def test_damped_factors_find_the_sngd_state_in_an_optimizer_state():
  """``sngd_momentum``'s state is a chain tuple and ``apply_if_finite`` wraps it: both give the
  factors of the ``SNGDState`` inside (before, the chain tuple raised "does not record
  `damping`" and then an ``AttributeError``)."""
  import optax  # noqa: PLC0415
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 8, size=(30,)))
  y = jnp.asarray(rng.normal(size=(30, 3)))
  model = EmbedMLP()
  params = model.init(jax.random.key(0), tokens)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, tokens) - y) ** 2)
  grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params)
  tx = optax.apply_if_finite(sngd_jax.sngd_momentum(0.1, damping=1e-2), 3)
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  inner = state.inner_state[0]  # the chain's first entry: the SNGDState
  expected = sngd_jax.damped_factors(inner)
  for whole in (state, state.inner_state):
    got = sngd_jax.damped_factors(whole)
    assert set(got) == set(expected) == {"Embed_0", "Dense_0"}
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    jax.tree.map(np.testing.assert_array_equal, sngd_jax.factor_roots(whole),
                 sngd_jax.factor_roots(inner))
  with pytest.raises(ValueError, match="holding 2; pass the one you mean"):
    sngd_jax.damped_factors((inner, inner))


def _one_update(model, params, inputs, tx):
  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, inputs)))
  grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  return grads, updates, state


class Wide(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, param_dtype=x.dtype)(x)


@pytest.mark.parametrize("inverse", ["blocks", "nystrom_seed_tail"])
def test_damped_factors_are_what_the_method_preconditions_with(inverse):
  """Under ``block_diagonal`` the update solves the block-diagonal part of ``G + rho I``,
  under a Nystrom method with its own seed and tail that model: ``damped_factors`` gives
  those (they gave the full ``G + rho I``, and a seed-0 model: NaN for seed 5)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)))
  params = Wide().init(jax.random.key(0), x)["params"]
  if inverse == "blocks":
    method = sngd_jax.inverse.block_diagonal(block_size=4)
  else:
    method = sngd_jax.inverse.nystrom(rank=5, seed=5, tail="zero")
  tx = exact_sngd(inverse=method, damping=1e-2, inverse_every=1, decay=0.5)
  grads, updates, state = _one_update(Wide(), params, x, tx)
  damped = np.asarray(sngd_jax.damped_factors(state)["Dense_0"])
  g = np.concatenate([grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"][None]])
  u = np.concatenate([updates["Dense_0"]["kernel"], updates["Dense_0"]["bias"][None]])
  np.testing.assert_allclose(u, np.linalg.solve(damped, g), rtol=1e-9, atol=1e-12)
  if inverse == "blocks":  # the off-diagonal blocks are zero, the diagonal ones G + rho I
    full = np.asarray(reconstruct.base.damp(
        jnp.asarray(state.factors["Dense_0"] / state.weights["Dense_0"]), 1e-2, 0.0))
    mask = np.kron(np.eye(4), np.ones((4, 4)))[:13, :13]
    np.testing.assert_allclose(damped, full * mask, rtol=1e-12, atol=1e-15)
  roots = sngd_jax.factor_roots(state)
  prime = sngd_jax.to_reconstructed(params, roots)
  assert leaves_rel(sngd_jax.from_reconstructed(prime, roots), params) < 1e-12


@pytest.mark.parametrize("override", [{"nystrom_seed": 0}, {"nystrom_tail": "mean"}])
def test_nystrom_options_leave_block_diagonal_layers_alone(override):
  """``nystrom_seed``/``nystrom_tail`` choose the Nystrom model of sketched layers; a
  ``block_diagonal`` layer still gets the block-diagonal part of ``G + rho I``, the matrix
  its update solves (passing either option gave the full ``G + rho I``). Reference: the
  update's own solve and float64 numpy ``G`` from the inputs, masked to the 4 x 4 blocks."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)))
  params = Wide().init(jax.random.key(0), x)["params"]
  tx = exact_sngd(inverse=sngd_jax.inverse.block_diagonal(block_size=4), damping=1e-2,
                  inverse_every=1, decay=0.0)
  grads, updates, state = _one_update(Wide(), params, x, tx)
  rows = np.concatenate([np.asarray(x), np.ones((40, 1))], axis=1)
  gm = rows.T @ rows / 40
  mask = np.kron(np.eye(4), np.ones((4, 4)))[:13, :13]
  want = (gm + 1e-2 * np.trace(gm) * np.eye(13)) * mask
  damped = np.asarray(sngd_jax.damped_factors(state, **override)["Dense_0"])
  np.testing.assert_allclose(damped, want, rtol=1e-10, atol=1e-12)
  g = np.concatenate([grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"][None]])
  u = np.concatenate([updates["Dense_0"]["kernel"], updates["Dense_0"]["bias"][None]])
  np.testing.assert_allclose(u, np.linalg.solve(damped, g), rtol=1e-9, atol=1e-12)


def test_tail_alone_keeps_the_methods_test_matrix():
  """``nystrom_tail=`` alone on a state sketched with seed 5 gives the seed-5 model with that
  tail: the matrix a ``nystrom(seed=5, tail=...)`` run's update solves with (it fell back to
  seed 0's test matrix, which the sketch was not made with: every entry NaN)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(40, 12)) @ rng.normal(size=(12, 12)))
  params = Wide().init(jax.random.key(0), x)["params"]

  def run(tail):
    tx = exact_sngd(inverse=sngd_jax.inverse.nystrom(rank=5, seed=5, tail=tail),
                    damping=1e-2, inverse_every=1, decay=0.5)
    return _one_update(Wide(), params, x, tx)

  _, _, zero_state = run("zero")
  grads, updates, mean_state = run("mean")
  got = np.asarray(sngd_jax.damped_factors(zero_state, nystrom_tail="mean")["Dense_0"])
  g = np.concatenate([grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"][None]])
  u = np.concatenate([updates["Dense_0"]["kernel"], updates["Dense_0"]["bias"][None]])
  np.testing.assert_allclose(u, np.linalg.solve(got, g), rtol=1e-8, atol=1e-12)
  own = np.asarray(sngd_jax.damped_factors(zero_state)["Dense_0"])
  assert np.abs(own - got).max() > 1e-6  # the tail changed the model


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(4, param_dtype=h.dtype)(h)), None


class Scanned(nn.Module):
  """Three blocks scanned over depth (a stacked kernel (3, 4, 4) with bias (3, 4))."""

  @nn.compact
  def __call__(self, x):
    block = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                    length=3)
    return block()(x, None)[0]


def test_stacked_layers_map_each_layer_with_its_own_root():
  """``W'_l = G_l^{1/2} W~_l`` for every layer of a stack (it raised 'factor of size 5
  does not match the 3 rows')."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(30, 4)))
  params = Scanned().init(jax.random.key(0), x)["params"]
  _, _, state = _one_update(Scanned(), params, x, exact_sngd(damping=1e-2, inverse_every=1))
  (path,) = state.factors
  roots = sngd_jax.factor_roots(state)
  assert roots[path].sqrt.shape == (3, 5, 5)
  prime = sngd_jax.to_reconstructed(params, roots)
  kernel, bias = (params[path.split("/")[0]]["Dense_0"][k] for k in ("kernel", "bias"))
  kprime = prime[path.split("/")[0]]["Dense_0"]["kernel"]
  for layer in range(3):
    w = np.concatenate([kernel[layer], bias[layer][None]])
    expect = np.asarray(roots[path].sqrt[layer]) @ w
    np.testing.assert_allclose(kprime[layer], expect[:4], rtol=1e-12)
  assert leaves_rel(sngd_jax.from_reconstructed(prime, roots), params) < 1e-12


class TiedLM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(7, 4, param_dtype=jnp.float64)
    return emb.attend(jnp.tanh(nn.Dense(4, param_dtype=jnp.float64)(emb(tokens))))


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_tied_table_maps_both_sides():
  """With ``fisher={path: "tied"}``: ``E' = D^{1/2} E G_h^{1/2}`` (it raised 'have factors
  but no kernel'); one SGD step on ``E'`` through both uses, mapped back, is the update."""
  tokens = jnp.asarray([[1, 4, 4, 0, 2], [4, 1, 2, 6, 6]])
  model = TiedLM()
  params = model.init(jax.random.key(0), tokens)["params"]
  fisher = {"Embed_0": "tied"}
  tx = exact_sngd(fisher=fisher, damping=1e-2, inverse_every=1)
  _, updates, state = _one_update(model, params, tokens, tx)
  roots = sngd_jax.factor_roots(state)
  with pytest.raises(ValueError, match=r"Pass the `fisher=` and `stacked=`"):
    sngd_jax.to_reconstructed(params, roots)
  prime = sngd_jax.to_reconstructed(params, roots, fisher=fisher)
  d_half, h_half = roots["Embed_0"].sqrt, roots["Embed_0[attend]"].sqrt
  e = params["Embed_0"]["embedding"]
  np.testing.assert_allclose(prime["Embed_0"]["embedding"], d_half[:, None] * e @ h_half,
                             rtol=1e-12)
  assert leaves_rel(sngd_jax.from_reconstructed(prime, roots, fisher=fisher), params) < 1e-12

  def reconstructed(p):
    ep = p["Embed_0"]["embedding"]
    h = (ep[tokens] * roots["Embed_0"].inv_sqrt[tokens][..., None]) @ roots[
        "Embed_0[attend]"].inv_sqrt  # lookups: D^{-1/2} rows, then G_h^{-1/2} (E = ...)
    d = p["Dense_0"]
    h = jnp.tanh(sngd_jax.reconstructed_dense(h, d["kernel"], d["bias"],
                                              roots["Dense_0"].inv_sqrt))
    # the output layer reads E through its local Fisher layer: h G_h^{-1/2} E'^T D^{-1/2}
    logits = (h @ roots["Embed_0[attend]"].inv_sqrt) @ ep.T * roots["Embed_0"].inv_sqrt
    return jnp.sum(jnp.sin(logits))

  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, tokens)))
  np.testing.assert_allclose(reconstructed(prime), loss(params), rtol=1e-12)
  lr = 0.1
  g_prime = jax.grad(reconstructed)(prime)
  back = sngd_jax.from_reconstructed(jax.tree.map(lambda p, g: p - lr * g, prime, g_prime),
                                     roots, fisher=fisher)
  delta_got = jax.tree.map(lambda a, b: a - b, back, params)
  assert leaves_rel(delta_got, jax.tree.map(lambda u: -lr * u, updates)) < 1e-8


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_a_bias_left_out_of_the_factor_stays_as_it_is(fisher):
  """``sngd`` under ``optax.masked`` with the biases masked out (and a row mask on the
  activations): each factor has no bias row (``d = in_dim``), the bias gets its raw gradient.
  The reconstructed network maps the kernel only, ``W' = G^{1/2} W``, and adds the bias after
  the local Fisher layer, ``z = (G^{-1/2} x)^T W' + b``; one SGD step on it, mapped back, is
  the masked transform's update (it raised 'factor of size 6 does not match the 7 rows')."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 6)))
  y = jnp.asarray(rng.normal(size=(20, 3)))
  params = MLP().init(jax.random.key(0), x)["params"]
  kernels = jax.tree_util.tree_map_with_path(lambda p, _: p[-1].key == "kernel", params)
  tx = optax.masked(exact_sngd(fisher=fisher, damping=1e-2, inverse_every=1, decay=0.5),
                    kernels)
  state = tx.init(params)
  grad_fn = jax.grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)
  real = jnp.arange(20) % 3 != 0
  for i in range(2):
    grads, acts = grad_fn(params, x + i, y)
    acts = sngd_jax.with_row_mask(acts, real)
    updates, state = tx.update(grads, state, params, activations=acts)
  np.testing.assert_array_equal(updates["Dense_0"]["bias"], grads["Dense_0"]["bias"])
  roots = sngd_jax.factor_roots(state)
  assert roots["Dense_0"].sqrt.shape[-1] == 6  # no bias row
  prime = sngd_jax.to_reconstructed(params, roots)
  for i in range(len(FEATURES)):
    p, q = params[f"Dense_{i}"], prime[f"Dense_{i}"]
    np.testing.assert_array_equal(q["bias"], p["bias"])
    root = np.asarray(roots[f"Dense_{i}"].sqrt)
    kernel = np.asarray(p["kernel"])
    want = (root @ kernel if fisher == "linear"
            else np.einsum("jab,bj->aj", root, kernel))  # rfim: G_j^{1/2} w_j per unit
    np.testing.assert_allclose(q["kernel"], want, rtol=1e-12, atol=1e-14)
  assert leaves_rel(sngd_jax.from_reconstructed(prime, roots), params) < 1e-12

  def reconstructed(pp, x):
    h = x
    for i in range(len(FEATURES)):
      p = pp[f"Dense_{i}"]
      h = sngd_jax.reconstructed_dense(h, p["kernel"], None, roots[f"Dense_{i}"].inv_sqrt)
      h = h + p["bias"]
      if i < len(FEATURES) - 1:
        h = jnp.tanh(h)
    return jnp.mean((h - y) ** 2)

  np.testing.assert_allclose(reconstructed(prime, x + 1), loss_fn(params, x + 1, y), rtol=1e-12)
  lr = 0.1
  g_prime = jax.grad(reconstructed)(prime, x + 1)
  back = sngd_jax.from_reconstructed(jax.tree.map(lambda p, g: p - lr * g, prime, g_prime),
                                     roots)
  delta_got = jax.tree.map(lambda a, b: a - b, back, params)
  assert leaves_rel(delta_got, jax.tree.map(lambda u: -lr * u, updates)) < 1e-8
