"""A small real training problem: SNGD reaches a loss target in fewer steps than SGD."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import sngd_jax

TARGET = 0.1
STEPS = 300


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(10)(x)


def _steps_to_target(tx, seed=0):
  xs, ys = load_digits(return_X_y=True)
  xs = jnp.asarray(xs / 16.0, jnp.float32)
  ys = jnp.asarray(ys)
  model = MLP()
  params = model.init(jax.random.key(seed), xs[:1])["params"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, x), y).mean()

  def body(carry, key):
    params, state = carry
    idx = jax.random.randint(key, (64,), 0, xs.shape[0])
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, xs[idx], ys[idx])
    updates, state = tx.update(grads, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
    return (params, state), loss_fn(params, xs, ys)

  keys = jax.random.split(jax.random.key(seed + 1), STEPS)
  _, losses = jax.jit(lambda p, s: jax.lax.scan(body, (p, s), keys))(params, tx.init(params))
  losses = np.asarray(losses)
  assert np.isfinite(losses).all()
  hit = np.nonzero(losses < TARGET)[0]
  return (int(hit[0]) + 1 if hit.size else STEPS + 1), losses


@pytest.mark.parametrize("lr", [0.02, 0.05])
def test_sngd_reaches_target_in_fewer_steps_than_sgd(lr):
  sngd_steps, sngd_losses = _steps_to_target(
      optax.chain(sngd_jax.sngd(inverse_every=10), optax.sgd(lr, momentum=0.9)))
  sgd_steps, _ = _steps_to_target(optax.sgd(lr, momentum=0.9))
  assert sngd_steps <= STEPS, f"SNGD did not reach {TARGET}: last loss {sngd_losses[-1]}"
  assert sngd_steps < 0.8 * sgd_steps, (sngd_steps, sgd_steps)
