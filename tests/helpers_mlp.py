"""Small models and a numpy float64 reference shared by the core tests."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax


class MLP(nn.Module):
  """A 3-layer ReLU MLP."""

  features: tuple = (7, 5, 3)

  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(self.features):
      x = nn.Dense(f, param_dtype=x.dtype)(x)
      if i < len(self.features) - 1:
        x = nn.relu(x)
    return x


def make_problem(seed=0, batch=16, in_dim=6, features=(7, 5, 3), dtype=jnp.float64):
  """Returns (model, params, x, y, loss_fn) for a random regression problem."""
  rng = np.random.default_rng(seed)
  model = MLP(features)
  x = jnp.asarray(rng.normal(size=(batch, in_dim)), dtype)
  y = jnp.asarray(rng.normal(size=(batch, features[-1])), dtype)
  params = model.init(jax.random.key(seed), x)["params"]

  def loss_fn(p, x, y):
    return jnp.mean((model.apply({"params": p}, x) - y) ** 2)

  return model, params, x, y, loss_fn


def dense_inputs(params, x, features):
  """Inputs and pre-activations of each Dense layer, in numpy float64."""
  xs, zs = [], []
  h = np.asarray(x, np.float64)
  for i in range(len(features)):
    p = params[f"Dense_{i}"]
    w, b = np.asarray(p["kernel"], np.float64), np.asarray(p["bias"], np.float64)
    z = h @ w + b
    xs.append(h)
    zs.append(z)
    h = np.maximum(z, 0.0)
  return xs, zs


def reference_update(x_rows, z_rows, grad_w, grad_b, fisher, damping):
  """(G + damping tr(G) I)^{-1} [gW; gb^T] in float64, G from the rows."""
  n = x_rows.shape[0]
  xa = np.concatenate([x_rows, np.ones((n, 1))], axis=1)
  g = np.concatenate([grad_w, grad_b[None]], axis=0)
  d = xa.shape[1]
  if fisher == "linear":
    G = xa.T @ xa / n
    out = np.linalg.solve(G + damping * np.trace(G) * np.eye(d), g)
  else:
    s2 = (1.0 / (1.0 + np.exp(-z_rows))) ** 2
    out = np.empty_like(g)
    for j in range(g.shape[1]):
      Gj = (xa * s2[:, j:j + 1]).T @ xa / n
      out[:, j] = np.linalg.solve(Gj + damping * np.trace(Gj) * np.eye(d), g[:, j])
  return out[:-1], out[-1]


def grads_and_acts(loss_fn, params, x, y):
  import sngd_jax
  (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
      params, x, y)
  return loss, grads, acts


def sgd_chain(lr, **kw):
  import sngd_jax
  return optax.chain(sngd_jax.sngd(**kw), optax.sgd(lr))


def sngd_train_step(tx, loss_fn):
  """A jitted step ``(params, state, x, y) -> (params, state, loss)`` with captured activations."""
  import sngd_jax

  @jax.jit
  def step(params, state, x, y):
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  return step
