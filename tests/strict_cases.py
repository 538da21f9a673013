"""Models and a two-step training run shared by the strict-configuration tests.

Each case is ``(params, step)``: ``step(params, opt_state, tx, x, y)`` is one training step
(grads by the documented capture of its framework, then ``tx.update`` and the new params).
``run(case, tx)`` runs two steps under ``jax.jit`` (or eagerly) and returns the updates.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import sngd_jax

BATCH, IN, OUT = 8, 5, 3


def data(dtype, shape=(BATCH, IN), seed=0):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=shape), dtype)
  y = jnp.asarray(rng.normal(size=(shape[0], OUT)), dtype)
  return x, y


class LinenMLP(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(7, param_dtype=self.dtype)(x))
    return nn.Dense(OUT, param_dtype=self.dtype)(h)


class LinenCNN(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):  # (B, H, W, C)
    h = nn.relu(nn.Conv(4, (3, 3), param_dtype=self.dtype)(x))
    h = nn.relu(nn.Conv(4, (2, 2), strides=2, padding="VALID", param_dtype=self.dtype)(h))
    return nn.Dense(OUT, param_dtype=self.dtype)(h.reshape(h.shape[0], -1))


class LinenLSTM(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, xs):  # (B, T, F)
    h = nn.RNN(nn.LSTMCell(4, param_dtype=self.dtype), name="rnn")(xs)
    return nn.Dense(OUT, param_dtype=self.dtype)(h[:, -1])


class LinenNorm(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, param_dtype=self.dtype)(x)
    h = nn.relu(nn.LayerNorm(param_dtype=self.dtype)(h))
    return nn.Dense(OUT, param_dtype=self.dtype)(h)


class LinenAttention(nn.Module):
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, xs):  # (B, T, F)
    h = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4,
                                        param_dtype=self.dtype)(xs)
    return nn.Dense(OUT, param_dtype=self.dtype)(h.mean(axis=1))


LINEN = {"mlp": (LinenMLP, (BATCH, IN)), "cnn": (LinenCNN, (BATCH, 6, 6, 2)),
         "lstm": (LinenLSTM, (BATCH, 4, 3)), "norm": (LinenNorm, (BATCH, IN)),
         "attention": (LinenAttention, (BATCH, 4, 4))}


def mse(pred, y):
  return jnp.mean((pred - y) ** 2)


def linen_loss(name, dtype):
  model = LINEN[name][0](dtype)
  return lambda p, x, y: mse(model.apply({"params": p}, x), y)


def linen_case(name, dtype):
  cls, shape = LINEN[name]
  x, y = data(dtype, shape)
  params = cls(dtype).init(jax.random.key(0), x)["params"]
  loss = linen_loss(name, dtype)

  def step(params, opt_state, tx, x, y):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return updates, optax.apply_updates(params, updates), opt_state

  return params, step, x, y


class NnxModel(nnx.Module):
  def __init__(self, dtype, rngs):
    self.l1 = nnx.Linear(IN, 6, param_dtype=dtype, rngs=rngs)
    self.ln = nnx.LayerNorm(6, param_dtype=dtype, rngs=rngs)
    self.l2 = nnx.Linear(6, OUT, param_dtype=dtype, rngs=rngs)

  def __call__(self, x):
    return self.l2(nnx.relu(self.ln(self.l1(x))))


def nnx_case(dtype):
  graphdef, params = nnx.split(NnxModel(dtype, nnx.Rngs(0)), nnx.Param)
  x, y = data(dtype)
  loss = lambda model, x, y: mse(model(x), y)

  def step(params, opt_state, tx, x, y):
    model = nnx.merge(graphdef, params)
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return updates, optax.apply_updates(params, updates), opt_state

  return params, step, x, y


def eqx_case(dtype):
  import equinox as eqx
  keys = jax.random.split(jax.random.key(0), 2)
  model = eqx.nn.Sequential([eqx.nn.Linear(IN, 6, key=keys[0], dtype=dtype),
                             eqx.nn.Lambda(jax.nn.relu),
                             eqx.nn.Linear(6, OUT, key=keys[1], dtype=dtype)])
  params, static = eqx.partition(model, eqx.is_inexact_array)
  x, y = data(dtype)
  loss = lambda model, x, y: mse(jax.vmap(model)(x), y)

  def step(params, opt_state, tx, x, y):
    model = eqx.combine(params, static)
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
        model, x, y)
    grads = eqx.filter(grads, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return updates, eqx.apply_updates(params, updates), opt_state

  return params, step, x, y


def make_case(name, dtype=jnp.float32):
  if name == "nnx":
    return nnx_case(dtype)
  if name == "eqx":
    return eqx_case(dtype)
  return linen_case(name, dtype)


def run(case, tx, steps=2, jit=True):
  """The updates of ``steps`` training steps, as numpy arrays."""
  params, step, x, y = case
  step = jax.jit(step, static_argnums=2) if jit else step
  opt_state = tx.init(params)
  out = []
  for _ in range(steps):
    updates, params, opt_state = step(params, opt_state, tx, x, y)
    out.append(jax.tree.map(np.asarray, updates))
  return out, opt_state
