"""Low and high precision: bfloat16/float16 params and activations, float64 under x64.

Reference: the float64 formula on the same (already rounded) inputs,
``(G + damping tr(G) I)^{-1} g`` with ``G = X~^T X~ / n`` (linear) or
``G_j = sum_i sigmoid(z_ij)^2 x~_i x~_i^T / n`` (rfim), ``decay=0`` and
``inverse_every=1`` so the state's factor is the current batch's. Statistics are
computed in float32 (float64 under x64), so the error is float32 arithmetic on a
well-conditioned ``G`` plus one final rounding to the parameter dtype:
tolerances are a few units of the parameter dtype's epsilon.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_mlp import sngd_train_step

import sngd_jax
from sngd_jax import Captured
from sngd_jax._src import transform as sngd_transform

# rtol per parameter dtype: a few ulps of the output dtype (bf16 eps 7.8e-3, f16 9.8e-4).
RTOL = {jnp.bfloat16: 2e-2, jnp.float16: 3e-3, jnp.float32: 1e-4, jnp.float64: 1e-10}
DAMPING = 1e-3


def _reference(x, z, gw, fisher, damping=DAMPING):
  """float64 preconditioned gradient of a layer with bias: (d, O) with d = I + 1."""
  x = np.asarray(x, np.float64)
  z = np.asarray(z, np.float64)
  gw = np.asarray(gw, np.float64)
  n = x.shape[0]
  xt = np.concatenate([x, np.ones((n, 1))], axis=1)
  d = xt.shape[1]
  if fisher == "linear":
    g = xt.T @ xt / n
    return np.linalg.solve(g + damping * np.trace(g) * np.eye(d), gw)
  out = np.empty_like(gw)
  s2 = (1.0 / (1.0 + np.exp(-z))) ** 2
  for j in range(gw.shape[1]):
    g = (xt * s2[:, j:j + 1]).T @ xt / n
    out[:, j] = np.linalg.solve(g + damping * np.trace(g) * np.eye(d), gw[:, j])
  return out


def _case(dtype, fisher, seed=0, n=64, d_in=6, d_out=4):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((n, d_in)), dtype)
  k = jnp.asarray(rng.standard_normal((d_in, d_out)) / np.sqrt(d_in), dtype)
  b = jnp.asarray(0.1 * rng.standard_normal(d_out), dtype)
  z = (x @ k + b).astype(dtype)
  params = {"Dense_0": {"kernel": k, "bias": b}}
  grads = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((d_in, d_out)), dtype),
                       "bias": jnp.asarray(rng.standard_normal(d_out), dtype)}}
  acts = {"Dense_0": (Captured(x, z),)}
  tx = exact_sngd(fisher=fisher, damping=DAMPING, decay=0.0, inverse_every=1)
  state = tx.init(params)
  updates, state = jax.jit(tx.update)(grads, state, params, activations=acts)
  gw = np.concatenate([np.asarray(grads["Dense_0"]["kernel"], np.float64),
                       np.asarray(grads["Dense_0"]["bias"], np.float64)[None]])
  want = _reference(x, z, gw, fisher)
  got = np.concatenate([np.asarray(updates["Dense_0"]["kernel"], np.float64),
                        np.asarray(updates["Dense_0"]["bias"], np.float64)[None]])
  return updates, state, got, want


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_low_precision_params_and_activations(dtype, fisher):
  updates, state, got, want = _case(dtype, fisher)
  assert updates["Dense_0"]["kernel"].dtype == dtype
  assert updates["Dense_0"]["bias"].dtype == dtype
  assert state.factors["Dense_0"].dtype == jnp.float32
  assert state.inverses["Dense_0"].dtype == jnp.float32
  assert int(state.num_skipped_steps) == 0 and int(state.num_refresh_failures) == 0
  rtol = RTOL[dtype]
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())
  if dtype != jnp.float32:
    # The tolerance is not loose: float32 rounding of the reference is far inside it ...
    rounded = np.asarray(jnp.asarray(want, jnp.float32), np.float64)
    np.testing.assert_allclose(rounded, want, rtol=1e-6)
    # ... and the low-precision result really is rounded to its dtype (not float32 in disguise).
    assert np.max(np.abs(got - want)) > 1e-7 * np.abs(want).max()


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_float64_under_x64(fisher):
  with jax.enable_x64(True):
    updates, state, got, want = _case(jnp.float64, fisher)
    assert updates["Dense_0"]["kernel"].dtype == jnp.float64
    assert state.factors["Dense_0"].dtype == jnp.float64
    assert state.inverses["Dense_0"].dtype == jnp.float64
    assert state.weights["Dense_0"].dtype == jnp.float64
  np.testing.assert_allclose(got, want, rtol=RTOL[jnp.float64], atol=1e-12)
  assert jnp.ones(1).dtype == jnp.float32  # x64 restored for other tests


def test_mixed_float32_activations_with_bfloat16_params():
  """Activations in float32 (e.g. a float32 model input) and bf16 params: same rule."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.standard_normal((32, 5)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((5, 2)), jnp.bfloat16)
  params = {"Dense_0": {"kernel": k, "bias": jnp.zeros(2, jnp.bfloat16)}}
  acts = {"Dense_0": (Captured(x, (x @ k.astype(jnp.float32))),)}
  tx = exact_sngd(damping=DAMPING, decay=0.0, inverse_every=1)
  updates, state = tx.update(params, tx.init(params), params, activations=acts)
  assert updates["Dense_0"]["kernel"].dtype == jnp.bfloat16
  assert state.factors["Dense_0"].dtype == jnp.float32
  gw = np.concatenate([np.asarray(k, np.float64), np.zeros((1, 2))])
  want = _reference(x, np.zeros((32, 2)), gw, "linear")
  got = np.concatenate([np.asarray(updates["Dense_0"]["kernel"], np.float64),
                        np.asarray(updates["Dense_0"]["bias"], np.float64)[None]])
  np.testing.assert_allclose(got, want, rtol=2e-2, atol=2e-2 * np.abs(want).max())


class BF16MLP(nn.Module):
  dtype: jnp.dtype

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16, dtype=self.dtype, param_dtype=self.dtype)(x))
    return nn.Dense(3, dtype=self.dtype, param_dtype=self.dtype)(x)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_model_trains(dtype):
  """A linen model entirely in bf16/f16 trains with sngd: finite, dtypes kept, loss falls."""
  model = BF16MLP(dtype)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((64, 8)), dtype)
  y = jnp.asarray((rng.standard_normal(64) > 0).astype(np.int32) + (np.asarray(x[:, 0]) > 1))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  tx = optax.chain(exact_sngd(inverse_every=5), optax.sgd(0.05, momentum=0.9))

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x).astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  step = sngd_train_step(tx, loss_fn)

  def train(params):
    state, losses = tx.init(params), []
    for _ in range(20):
      params, state, loss = step(params, state, x, y)
      losses.append(loss)
    return params, state, losses

  new_params, state, losses = train(params)
  for p in jax.tree.leaves(new_params):
    assert p.dtype == dtype and bool(jnp.all(jnp.isfinite(p)))
  assert all(f.dtype == jnp.float32 for f in state[0].factors.values())
  assert int(state[0].num_skipped_steps) == 0
  assert float(losses[-1]) < 0.8 * float(losses[0])


@pytest.mark.parametrize("inputs", ["constant", "random"])
def test_narrow_layer_over_millions_of_rows_keeps_float32_precision(inputs):
  """A layer with one input (X~ = [x, 1], d = 2) over 2^22 rows: XLA:CPU's product of such
  narrow rows summed them one after another (relative error 3e-4 on random inputs, 6e-2 on a
  constant 3); the batch estimate is within float32 rounding of float64's X~^T X~ / n."""
  n = 2**22
  rng = np.random.default_rng(0)
  x = (np.full((n, 1), 3.0) if inputs == "constant"
       else 3.0 + rng.standard_normal((n, 1))).astype(np.float32)
  model = nn.Dense(1)
  params = model.init(jax.random.key(0), jnp.ones((1, 1)))["params"]
  loss = lambda p, x: jnp.mean(model.apply({"params": p}, x))
  grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params, jnp.asarray(x))
  state = sngd_jax.sngd().init(params)
  est, _ = jax.jit(lambda g, a: sngd_transform.local_statistics(g, state, a))(grads, acts)
  rows_aug = np.concatenate([x.astype(np.float64), np.ones((n, 1))], axis=1)
  want = rows_aug.T @ rows_aug / n
  got = np.asarray(next(iter(est.values())), np.float64)
  np.testing.assert_allclose(got, want, rtol=2e-6)
