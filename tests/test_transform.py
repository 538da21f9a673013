"""sngd(): one update against an independent float64 numpy computation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_mlp import dense_inputs, grads_and_acts, make_problem, reference_update

import sngd_jax

FEATURES = (7, 5, 3)


pytestmark = pytest.mark.usefixtures("x64")


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
@pytest.mark.parametrize("damping", [1e-4, 1e-1])
@pytest.mark.parametrize("jit", [False, True])
def test_one_update_matches_numpy(fisher, damping, jit):
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  tx = exact_sngd(fisher=fisher, damping=damping, decay=0.0)
  state = tx.init(params)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  update = jax.jit(tx.update) if jit else tx.update
  out, state = update(grads, state, params, activations=acts)
  xs, zs = dense_inputs(params, x, FEATURES)
  for i in range(len(FEATURES)):
    name = f"Dense_{i}"
    ref_w, ref_b = reference_update(
        xs[i], zs[i], np.asarray(grads[name]["kernel"]), np.asarray(grads[name]["bias"]),
        fisher, damping)
    np.testing.assert_allclose(out[name]["kernel"], ref_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[name]["bias"], ref_b, rtol=1e-9, atol=1e-12)
  assert state.factors["Dense_0"].dtype == jnp.float64
  assert int(state.count) == 1 and bool(state.has_inverse)


def test_per_layer_fisher_mapping_and_callable():
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  mapping = {"Dense_1": "rfim", "Dense_2": None}
  by_map = exact_sngd(fisher=mapping, decay=0.0)
  by_fn = exact_sngd(fisher=lambda path: mapping.get(path, "linear"), decay=0.0)
  out_map, st = by_map.update(grads, by_map.init(params), params, activations=acts)
  out_fn, _ = by_fn.update(grads, by_fn.init(params), params, activations=acts)
  chex_equal = jax.tree.map(np.testing.assert_array_equal, out_map, out_fn)
  del chex_equal
  assert set(st.factors) == {"Dense_0", "Dense_1"}
  assert st.factors["Dense_1"].shape == (5, 8, 8)        # rfim: O x d x d, d = 7 + 1
  assert st.factors["Dense_0"].shape == (7, 7)           # linear: d = 6 + 1
  # A layer mapped to None passes through unchanged.
  np.testing.assert_array_equal(out_map["Dense_2"]["kernel"], grads["Dense_2"]["kernel"])
  xs, zs = dense_inputs(params, x, FEATURES)
  ref_w, _ = reference_update(xs[1], zs[1], np.asarray(grads["Dense_1"]["kernel"]),
                              np.asarray(grads["Dense_1"]["bias"]), "rfim", 1e-4)
  np.testing.assert_allclose(out_map["Dense_1"]["kernel"], ref_w, rtol=1e-9)


def test_leaves_outside_layers_pass_through():
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  params = {"params": params, "temperature": jnp.ones(()), "extra": {"table": jnp.ones((3,))}}

  def loss2(p, x, y):
    return loss_fn(p["params"], x, y) * p["temperature"] + jnp.sum(p["extra"]["table"] ** 2)

  _, grads, acts = grads_and_acts(loss2, params, x, y)
  tx = exact_sngd()
  out, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(out["temperature"], grads["temperature"])
  np.testing.assert_array_equal(out["extra"]["table"], grads["extra"]["table"])
  assert not np.allclose(out["params"]["Dense_0"]["kernel"], grads["params"]["Dense_0"]["kernel"])


def _run(tx, params, batches, loss_fn):
  state = tx.init(params)
  step = jax.jit(lambda g, s, a: tx.update(g, s, None, activations=a))
  outs = []
  for x, y in batches:
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    out, state = step(grads, state, acts)
    outs.append(out)
  return outs, state


def _batches(n, seed=1, batch=16):
  rng = np.random.default_rng(seed)
  return [(jnp.asarray(rng.normal(size=(batch, 6))), jnp.asarray(rng.normal(size=(batch, 3))))
          for _ in range(n)]


def test_inverse_is_cached_between_refreshes_and_ema_matches_numpy():
  """Factors follow the prior-started EMA; the inverse is refreshed every k steps only."""
  _, params, _, _, loss_fn = make_problem(features=FEATURES)
  batches = _batches(5)
  decay, k = 0.7, 3
  tx = exact_sngd(decay=decay, inverse_every=k, damping=1e-3, prior="identity")
  outs, state = _run(tx, params, batches, loss_fn)
  # Numpy: G_t = decay G_{t-1} + (1 - decay) G^_t from G_0 = I; inverse from G_2 at t=3,4.
  G = np.eye(7)
  history = []
  for x, _ in batches:
    xa = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], 1)
    G = decay * G + (1 - decay) * xa.T @ xa / xa.shape[0]
    history.append(G.copy())
  np.testing.assert_allclose(state.factors["Dense_0"], history[-1], rtol=1e-12)
  for t in range(len(batches)):
    used = history[(t // k) * k]
    _, grads, _ = grads_and_acts(loss_fn, params, *batches[t])
    g = np.concatenate([grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"][None]])
    ref = np.linalg.solve(used + 1e-3 * np.trace(used) * np.eye(7), g)
    np.testing.assert_allclose(outs[t]["Dense_0"]["kernel"], ref[:-1], rtol=1e-9)



@pytest.mark.parametrize("warmup", [False, True])
def test_inverse_warmup_refresh_steps(warmup):
  """With ``inverse_warmup`` the inverse is refreshed at count 0, after the factor updates
  number 1, 2, 4, 8 (counts factor_every * 2^k) below inverse_every, then every
  inverse_every; without it at 0 and every inverse_every. Read from when the cached
  inverse changes, and each refreshed inverse is that of the factor at that step."""
  _, params, _, _, loss_fn = make_problem(features=FEATURES)
  f, k, n = 2, 24, 30
  batches = _batches(n)
  tx = exact_sngd(decay=0.9, factor_every=f, inverse_every=k, inverse_warmup=warmup,
                  inverse="cholesky")
  state = tx.init(params)

  @jax.jit  # one compiled step: eager dispatch of 30 updates took minutes
  def step(state, x, y):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    return tx.update(grads, state, params, activations=acts)[1]

  changed, prev = [], None
  for t, (x, y) in enumerate(batches):
    state = step(state, x, y)
    inv = np.asarray(jax.tree.leaves(state.inverses["Dense_0"])[0])
    if prev is None or not np.array_equal(inv, prev):
      changed.append(t)
      # The refreshed inverse represents (G_t + 1e-4 tr(G_t) I) for the current factor.
      G = np.asarray(state.factors["Dense_0"]) / float(state.weights["Dense_0"])
      A = G + 1e-4 * np.trace(G) * np.eye(7)
      probe = np.linspace(1.0, 2.0, 7)[None, :, None]
      got = sngd_jax.inverse.METHODS["cholesky"].apply(state.inverses["Dense_0"], probe)
      np.testing.assert_allclose(np.asarray(got)[0, :, 0], np.linalg.solve(A, probe[0, :, 0]),
                                 rtol=1e-9)
    prev = inv
  assert changed == ([0, 2, 4, 8, 16, 24] if warmup else [0, 24])

@pytest.mark.parametrize("prior", ["scaled_identity", "none"])
def test_priors_match_numpy(prior):
  _, params, _, _, loss_fn = make_problem(features=FEATURES)
  batches = _batches(3)
  decay = 0.9
  tx = exact_sngd(decay=decay, inverse_every=1, prior=prior)
  _, state = _run(tx, params, batches, loss_fn)
  ests = []
  for x, _ in batches:
    xa = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], 1)
    ests.append(xa.T @ xa / xa.shape[0])
  if prior == "none":
    num = sum(decay ** (2 - t) * (1 - decay) * e for t, e in enumerate(ests))
    ref = num / (1 - decay ** 3)
  else:
    ref = decay * (np.trace(ests[0]) / 7) * np.eye(7) + (1 - decay) * ests[0]
    for e in ests[1:]:
      ref = decay * ref + (1 - decay) * e
  used = np.asarray(state.factors["Dense_0"]) / float(state.weights["Dense_0"])
  np.testing.assert_allclose(used, ref, rtol=1e-10)


def test_factor_every_skips_statistics():
  _, params, _, _, loss_fn = make_problem(features=FEATURES)
  batches = _batches(4)
  tx = exact_sngd(decay=0.0, factor_every=2, inverse_every=1)
  _, state = _run(tx, params, batches, loss_fn)
  x = np.asarray(batches[2][0])      # last factor update at step index 2
  xa = np.concatenate([x, np.ones((x.shape[0], 1))], 1)
  np.testing.assert_allclose(state.factors["Dense_0"], xa.T @ xa / x.shape[0], rtol=1e-12)


def test_sngd_momentum_alias_equals_chain():
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  alias = sngd_jax.sngd_momentum(0.1, momentum=0.9, weight_decay=1e-2, inverse_every=7)
  chain = optax.chain(
      sngd_jax.sngd(inverse_every=7),
      optax.add_decayed_weights(1e-2, mask=jax.tree.map(lambda p: p.ndim >= 2, params)),
      optax.sgd(0.1, momentum=0.9))
  sa, sc = alias.init(params), chain.init(params)
  for _ in range(2):
    ua, sa = alias.update(grads, sa, params, activations=acts)
    uc, sc = chain.update(grads, sc, params, activations=acts)
    jax.tree.map(np.testing.assert_array_equal, ua, uc)
  # Weight decay reaches kernels only.
  plain = optax.chain(sngd_jax.sngd(inverse_every=7), optax.sgd(0.1, momentum=0.9))
  up, _ = plain.update(grads, plain.init(params), params, activations=acts)
  ua, _ = alias.update(grads, alias.init(params), params, activations=acts)
  np.testing.assert_array_equal(up["Dense_0"]["bias"], ua["Dense_0"]["bias"])
  assert not np.array_equal(up["Dense_0"]["kernel"], ua["Dense_0"]["kernel"])


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
@pytest.mark.parametrize("size", [5, 16, 100])
def test_stats_batch_size_uses_first_examples(fisher, size):
  # G^ from the first `size` rows only; the gradient still from the whole batch of 16.
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  tx = exact_sngd(fisher=fisher, damping=1e-3, decay=0.0, stats_batch_size=size)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  xs, zs = dense_inputs(params, x, FEATURES)
  for i in range(len(FEATURES)):
    name = f"Dense_{i}"
    ref_w, ref_b = reference_update(
        xs[i][:size], zs[i][:size], np.asarray(grads[name]["kernel"]),
        np.asarray(grads[name]["bias"]), fisher, 1e-3)
    np.testing.assert_allclose(out[name]["kernel"], ref_w, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(out[name]["bias"], ref_b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("size", [0, -3])
def test_stats_batch_size_rejects_nonpositive(size):
  with pytest.raises(ValueError, match="stats_batch_size"):
    exact_sngd(stats_batch_size=size)
