"""Large layers' factors kept as a Nystrom sketch ``(S Omega, tr S, c)`` of ``G = S + c I``.

References: the sketch of a batch against ``X~^T X~ Omega / n`` in float64; the
running sketch against the sketch of the dense running factor (the update is
linear); a whole training run with sketched state against the same method with
the dense state (``InverseMethod.sketch=None``), which sketches ``G_t Omega`` at
each refresh instead; the reconstructed network of a sketched layer against the
update it must reproduce.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd

import sngd_jax
from sngd_jax import Captured
from sngd_jax import inverse as methods
from sngd_jax._src import layers as layers_lib
from sngd_jax._src import reconstruct
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src import statistics as factors_lib
from sngd_jax._src.inverse import nystrom

RANK = 6
METHOD = methods.auto(max_dim=16, rank=RANK)  # d = 31 below: sketched; d = 9: dense


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Dense(8)(x))
    return nn.Dense(3)(x)


def _problem(seed=0, n=32, d_in=30, rank=None):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d_in)) * rng.uniform(0.2, 3.0, d_in)
  if rank is not None:  # inputs of this rank: S of rank <= rank + 1 (the bias)
    x = rng.standard_normal((n, rank)) @ rng.standard_normal((rank, d_in))
  x = jnp.asarray(x, jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, n))
  model = MLP()
  params = model.init(jax.random.PRNGKey(seed), x)["params"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  return params, x, y, jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)


def test_batch_sketch_matches_float64():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((40, 30))
  params = {"Dense_0": {"kernel": jnp.zeros((30, 4)), "bias": jnp.zeros(4)}}
  spec = layers_lib.discover(params, "linear")["Dense_0"]
  omega = nystrom.test_matrix(31, RANK, 0, jnp.float32)
  call = Captured(inputs=jnp.asarray(x, jnp.float32), outputs=jnp.zeros((40, 4)))
  got = factors_lib.batch_sketch(spec, [call], omega)
  xt = np.concatenate([x, np.ones((40, 1))], axis=1)
  g = xt.T @ xt / 40
  want_y = g @ np.asarray(omega, np.float64)
  np.testing.assert_allclose(np.asarray(got.y), want_y, rtol=1e-5, atol=1e-5 * np.abs(want_y).max())
  np.testing.assert_allclose(float(got.trace), np.trace(g), rtol=1e-6)
  # The same numbers as sketching batch_factor's dense estimate.
  dense = sketch_lib.of_dense(factors_lib.batch_factor(spec, [call]), omega)
  np.testing.assert_allclose(np.asarray(got.y), np.asarray(dense.y), rtol=1e-5,
                             atol=1e-5 * np.abs(want_y).max())


@pytest.mark.parametrize("prior", sngd_jax.PRIORS)
def test_running_sketch_is_the_sketch_of_the_running_factor(prior):
  rng = np.random.default_rng(1)
  d = 12
  with jax.enable_x64(True):
    omega = nystrom.test_matrix(d, 4, 0, jnp.float64)
    factor, weight = jnp.zeros((d, d), jnp.float64), jnp.zeros((), jnp.float64)
    sk, sk_weight = sketch_lib.zeros(d, 4, jnp.float64), jnp.zeros((), jnp.float64)
    traces = []
    for _ in range(4):
      a = rng.standard_normal((20, d)) * rng.uniform(0.1, 5.0)
      est = jnp.asarray(a.T @ a / 20)
      traces.append(float(np.trace(est)))
      factor, weight = factors_lib.ema_update(factor, weight, est, 0.7, prior)
      sk, sk_weight = factors_lib.ema_update(sk, sk_weight, sketch_lib.of_dense(est, omega),
                                             0.7, prior, omega)
    want = sketch_lib.of_dense(factors_lib.normalized(factor, weight), omega)
    got = factors_lib.normalized(sk, sk_weight)
    # the same factor S + c I: (S + c I) Omega and tr(S) + c d
    np.testing.assert_allclose(np.asarray(got.y + got.eye * omega), np.asarray(want.y),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(sketch_lib.full_trace(got)), float(want.trace), rtol=1e-12)
    # the prior's identity part is kept apart, never in S: c = decay^k P's coefficient
    unit = {"none": 0.0, "identity": 1.0, "scaled_identity": traces[0] / d}[prior]
    np.testing.assert_allclose(float(got.eye), 0.7 ** 4 * unit, rtol=1e-12)
  with pytest.raises(ValueError, match="test matrix"):
    factors_lib.prior_of(prior, sk)


@pytest.mark.parametrize("kwargs", [
    {},  # shipped defaults: factors every 5 steps, trust region, scaled_identity prior
    {"prior": "identity", "factor_every": 2, "inverse_every": 3, "decay": 0.8},
    {"prior": "none", "max_factor_ratio": 1.5, "inverse_every": 2, "stats_batch_size": 16},
])
def test_training_with_sketched_state_matches_dense_state(kwargs):
  """Without a prior, against the dense state sketched at each refresh (the same rank-r
  model of the same G). With one, the dense state's model would be of ``S + c I`` as a
  whole, which is not the sketch's (``S``'s, plus ``c I`` exactly): the reference is the
  exact inverse instead, on inputs of rank 3 (``S`` of rank <= 4 < r = 6), for which the
  sketched model is exact."""
  prior = kwargs.get("prior", "scaled_identity") != "none"
  params, x, y, grad_fn = _problem(rank=3 if prior else None)
  reference = methods.cholesky() if prior else METHOD._replace(sketch=None)
  # float32 rounding of the rank-r model, amplified as c decays against S's largest
  # eigenvalue (the exact inverse's condition number): up to 4e-4 a step
  tol = 3e-3 if prior else 2e-4
  runs = {}
  for name, method in (("sketch", METHOD), ("dense", reference)):
    tx = sngd_jax.sngd(inverse=method, **kwargs)
    state, p, upd = tx.init(params), params, []
    update = jax.jit(tx.update)
    for step in range(12):
      scale = 4.0 if step == 7 else 1.0  # one outlier batch for max_factor_ratio
      (_, acts), grads = grad_fn(p, x * scale, y)
      u, state = update(grads, state, p, activations=acts)
      p = optax.apply_updates(p, jax.tree.map(lambda v: -0.05 * v, u))
      upd.append(u)
    runs[name] = (state, upd)
  state, upd = runs["sketch"]
  dense_state, dense_upd = runs["dense"]
  d = 31
  assert isinstance(state.factors["Dense_0"], sngd_jax.Sketch)
  assert state.factors["Dense_0"].y.shape == (d, RANK)  # O(d r), not (d, d)
  assert dense_state.factors["Dense_0"].shape == (d, d)
  assert state.factors["Dense_1"].shape == (9, 9)  # below max_dim: dense, exact
  assert int(state.num_refresh_failures) == int(dense_state.num_refresh_failures) == 0
  for u, v in zip(upd, dense_upd, strict=True):
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(v), strict=True):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tol,
                                 atol=tol * float(jnp.max(jnp.abs(b))))
  omega = nystrom.test_matrix(d, RANK, 0, jnp.float32)
  want = sketch_lib.of_dense(factors_lib.normalized(dense_state.factors["Dense_0"],
                                                    dense_state.weights["Dense_0"]), omega)
  got = factors_lib.normalized(state.factors["Dense_0"], state.weights["Dense_0"])
  got_y = got.y + got.eye * omega
  np.testing.assert_allclose(np.asarray(got_y), np.asarray(want.y), rtol=1e-4,
                             atol=1e-5 * float(jnp.max(jnp.abs(want.y))))


def test_reconstructed_sketched_layer_reproduces_the_update():
  """damped_factors of a sketched layer is the Nystrom model M + rho I that preconditions."""
  params, x, y, grad_fn = _problem(seed=2)
  tx = exact_sngd(inverse=METHOD, inverse_every=1, damping=1e-2)
  state = tx.init(params)
  (_, acts), grads = grad_fn(params, x, y)
  updates, state = tx.update(grads, state, params, activations=acts)
  damped = reconstruct.damped_factors(state, damping=1e-2)
  g = np.concatenate([grads["Dense_0"]["kernel"], grads["Dense_0"]["bias"][None]])
  g = g.astype(np.float64)
  want = np.linalg.solve(np.asarray(damped["Dense_0"], np.float64), g)
  got = np.concatenate([updates["Dense_0"]["kernel"], updates["Dense_0"]["bias"][None]])
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())
  # The model is symmetric positive definite and keeps the trace of G (tail="mean").
  m = np.asarray(damped["Dense_0"], np.float64)
  assert np.allclose(m, m.T, atol=1e-6 * np.abs(m).max()) and np.linalg.eigvalsh(m).min() > 0
  sk = factors_lib.normalized(state.factors["Dense_0"], state.weights["Dense_0"])
  np.testing.assert_allclose(np.trace(m), float(sketch_lib.full_trace(sk)) * (1 + 1e-2 * 31),
                             rtol=1e-4)


def test_state_of_another_method_is_rejected_with_the_layer_path():
  params, x, y, grad_fn = _problem()
  state = sngd_jax.sngd(inverse=METHOD).init(params)
  (_, acts), grads = grad_fn(params, x, y)
  with pytest.raises(ValueError, match=r"'Dense_0'.*\('sketch', 31, 6\).*\(31, 31\)"):
    sngd_jax.sngd(inverse="cholesky").update(grads, state, params, activations=acts)


def test_default_method_sketches_only_wide_linear_layers():
  params = {"wide": {"kernel": jnp.zeros((600, 4)), "bias": jnp.zeros(4)},
            "narrow": {"kernel": jnp.zeros((100, 4)), "bias": jnp.zeros(4)},
            "wide_rfim": {"kernel": jnp.zeros((600, 2)), "bias": jnp.zeros(2)}}
  state = sngd_jax.sngd(fisher={"wide_rfim": "rfim"}).init(params)
  assert state.factors["wide"].y.shape == (601, 128)
  assert state.factors["narrow"].shape == (101, 101)
  assert state.factors["wide_rfim"].shape == (2, 601, 601)  # per-unit blocks stay dense
  assert sngd_jax.sngd(inverse="cholesky").init(params).factors["wide"].shape == (601, 601)


@pytest.mark.parametrize("host", [False, True])
def test_scanned_wide_layers_keep_a_sketch_each_and_equal_the_unrolled_model(host):
  """A layer scanned over depth and wider than ``auto``'s dense limit keeps one sketch per
  layer of the stack (``L x d x r``, not ``L x d x d``: it was dense), with the same ``Omega``
  as the unrolled layers: three steps of the scanned model equal the unrolled model's, the
  damped factors (the Nystrom models) agree per layer, and ``cost_estimate`` counts the
  state's bytes. Also through the opt-in host refresh."""
  width, depth = 20, 3
  method = methods.auto(max_dim=8, rank=6)
  if host:
    method = methods.host_refresh(method)

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return h + 0.3 * jnp.tanh(nn.Dense(width, name="mix")(h)), None

  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, x):
      h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=depth)(name="blocks")(x, None)
      return nn.Dense(3)(h)

  class Unrolled(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = x
      for i in range(depth):
        h, _ = Block(name=f"b{i}")(h, None)
      return nn.Dense(3)(h)

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, width)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  scanned = Scanned().init(jax.random.key(0), x)["params"]
  unrolled = {f"b{i}": {"mix": jax.tree.map(lambda a, i=i: a[i], scanned["blocks"]["mix"])}
              for i in range(depth)}
  unrolled["Dense_0"] = scanned["Dense_0"]
  results = []
  for model, params in ((Scanned(), scanned), (Unrolled(), unrolled)):
    def loss_fn(p, x, y, model=model):
      return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

    tx = optax.chain(sngd_jax.sngd(inverse=method), optax.sgd(0.1, momentum=0.9))
    state = tx.init(params)

    @jax.jit
    def step(params, state, loss_fn=loss_fn, tx=tx):
      g, acts = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
      u, state = tx.update(g, state, params, activations=acts)
      return optax.apply_updates(params, u), state

    for _ in range(3):
      params, state = step(params, state)
    results.append((params, state[0]))
  (ps, ss), (pu, su) = results
  assert ss.factors["blocks/mix"].y.shape == (depth, width + 1, 6)
  damped_s, damped_u = sngd_jax.damped_factors(ss), sngd_jax.damped_factors(su)
  assert damped_s["blocks/mix"].shape == (depth, width + 1, width + 1)
  for i in range(depth):
    for k in ("kernel", "bias"):
      np.testing.assert_allclose(ps["blocks"]["mix"][k][i], pu[f"b{i}"]["mix"][k],
                                 rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(damped_s["blocks/mix"][i], damped_u[f"b{i}/mix"], rtol=1e-5,
                               atol=1e-6)
  cost = sngd_jax.cost_estimate(scanned, batch_rows=16, inverse=method)["blocks/mix"]
  assert cost.factor_bytes == sum(a.nbytes for a in jax.tree.leaves(ss.factors["blocks/mix"]))
  assert cost.inverse_bytes == sum(a.nbytes for a in jax.tree.leaves(ss.inverses["blocks/mix"]))
  # The sketch's batch estimate per layer, X~ Omega and X~^T (.) and the trace, times depth.
  assert cost.factor_flops == depth * (4.0 * 16 * (width + 1) * 6 + 2.0 * 16 * (width + 1))
