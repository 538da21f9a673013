"""Gradient accumulation written by hand: a ``jax.lax.scan`` over micro-batches inside one step.

The scan body captures each micro-batch's activations and returns them as scan outputs,
so every record comes back with one more leading axis than capture gave it. ``update``
reads that axis as more rows of the batch: the update equals the one of the concatenated
batch, for a dense layer, a conv, LayerNorm (whose feature axes capture records), a
``DenseGeneral`` over two input axes, an ``nn.RNN`` cell, and layers of ``nn.scan`` over
depth (one factor per layer, whose stack axis capture puts first), in float64.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

K, N = 3, 4  # micro-batches, examples per micro-batch


class Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.tanh(nn.Dense(6, name="mix")(h)), None


class Net(nn.Module):
  @nn.compact
  def __call__(self, x, tokens):
    c = nn.relu(nn.Conv(3, (3,), padding="VALID")(x))              # (n, 4, 3)
    c = nn.LayerNorm()(c)                                           # feature axis -1 of 3
    c = nn.DenseGeneral(6, axis=(-2, -1))(c)                        # contracts (4, 3)
    r = nn.RNN(nn.GRUCell(4))(nn.Embed(5, 3)(tokens))               # (n, 3, 4)
    h = jnp.concatenate([c, r[:, -1]], -1)[:, :6]
    h, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)(name="blocks")(h, None)
    return nn.Dense(2)(h)


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(K * N, 6, 2)))
  tokens = jnp.asarray(rng.integers(0, 5, (K * N, 3)), jnp.int32)
  y = jnp.asarray(rng.normal(size=(K * N, 2)))
  model = Net()
  params = model.init(jax.random.key(0), x[:N], tokens[:N])["params"]

  def loss_fn(p, x, tokens, y):
    return jnp.mean((model.apply({"params": p}, x, tokens) - y) ** 2)

  return params, (x, tokens, y), loss_fn


def _tx():
  return sngd_jax.sngd(damping=1e-3, decay=0.0, inverse="cholesky", max_norm=None,
                       stacked={"blocks": 1})


def test_activations_stacked_by_a_scan_equal_the_big_batch():
  params, batch, loss_fn = _problem()
  grad_fn = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)
  tx = _tx()
  state = tx.init(params)
  g_big, acts_big = grad_fn(params, *batch)
  want, want_state = tx.update(g_big, state, params, activations=acts_big)

  @jax.jit
  def accumulated(params, state, batch):
    micro = jax.tree.map(lambda a: a.reshape((K, N) + a.shape[1:]), batch)

    def body(total, mb):
      g, acts = grad_fn(params, *mb)
      return jax.tree.map(jnp.add, total, g), acts

    total, acts = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), micro)
    assert all(c.inputs.shape[0] == K for calls in acts.values() for c in calls)
    return tx.update(jax.tree.map(lambda t: t / K, total), state, params, activations=acts)

  got, got_state = accumulated(params, state, batch)
  for path, f in want_state.factors.items():
    # The GRU's carry is float32 (Flax's default), so are its hidden gates' factors.
    tol = (1e-11, 1e-13) if f.dtype == jnp.float64 else (1e-5, 1e-7)
    np.testing.assert_allclose(got_state.factors[path], f, rtol=tol[0], atol=tol[1],
                               err_msg=path)
  for path in want:  # the GRU's float32 factors: relative to the leaf's largest entry
    for a, b in zip(jax.tree.leaves(got[path]), jax.tree.leaves(want[path]), strict=True):
      assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)), path
  # The LayerNorm factor against float64 numpy: per channel, the 2x2 block of
  # (xhat, 1) over every position of every example of every micro-batch.
  x = np.asarray(batch[0])
  conv = nn.Conv(3, (3,), padding="VALID").apply({"params": params["Conv_0"]}, batch[0])
  c = np.maximum(np.asarray(conv), 0.0)
  xhat = (c - c.mean(-1, keepdims=True)) / np.sqrt(c.var(-1, keepdims=True) + 1e-6)
  rows = xhat.reshape(-1, 3)
  ref = np.stack([np.array([[np.mean(rows[:, j] ** 2), np.mean(rows[:, j])],
                            [np.mean(rows[:, j]), 1.0]]) for j in range(3)])
  assert x.shape[0] == K * N
  # (Flax's LayerNorm normalizes in float32 here, its params' dtype.)
  np.testing.assert_allclose(got_state.factors["LayerNorm_0"], ref, rtol=1e-6, atol=1e-7)


def test_stacked_activations_through_sngd_momentum_and_multisteps_shapes():
  """The same stacked records through a preset (its jitted step) and the stack of the scanned
  layers: one factor per layer of ``blocks`` (2), not per micro-batch (3)."""
  params, batch, loss_fn = _problem()
  grad_fn = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)
  micro = jax.tree.map(lambda a: a.reshape((K, N) + a.shape[1:]), batch)
  _, acts = jax.lax.scan(lambda c, mb: (c, grad_fn(params, *mb)[1]), 0, micro)
  g, acts_big = grad_fn(params, *batch)
  tx = optax.chain(_tx(), optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  u1, s1 = tx.update(g, state, params, activations=acts)
  u2, s2 = tx.update(g, state, params, activations=acts_big)
  assert s1[0].factors["blocks/mix"].shape[0] == 2
  for a, b in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
    assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b))
