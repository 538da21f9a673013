"""Checkpointing the full optimizer state, bit-identical resume, and determinism.

The optimizer is ``chain(sngd(inverse_every=5), sgd(lr, momentum))``; its state
holds SNGD factors, weights, inverses, counters and the momentum trace. The
reference for a resumed run is the uninterrupted run in the same process:
parameters and state must be equal bit for bit on CPU.
"""

import flax.linen as nn
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from helpers_mlp import sngd_train_step

import sngd_jax
from sngd_jax import inverse as methods

TOTAL, STOP = 15, 7  # inverse_every=5: refreshes at counts 0, 5, 10 straddle the stop


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(8)(x))
    return nn.Dense(3)(x)


MODEL = MLP()
# Nystrom above d = 4: Dense_0 (rfim, d = 6) keeps dense blocks, Dense_1 (linear, d = 9)
# keeps its factor as a rank-3 sketch, so the state holds both kinds of factor.
TX = optax.chain(sngd_jax.sngd(inverse_every=5, fisher={"Dense_0": "rfim"},
                               inverse=methods.auto(max_dim=4, rank=3)),
                 optax.sgd(0.05, momentum=0.9))


def _batch(step):
  key = jax.random.fold_in(jax.random.PRNGKey(42), step)
  x = jax.random.normal(key, (16, 5))
  return x, (jnp.sum(x, axis=1) > 0).astype(jnp.int32) + (x[:, 0] > 1).astype(jnp.int32)


def _loss(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


_step = sngd_train_step(TX, _loss)


def _init(seed=0):
  params = MODEL.init(jax.random.PRNGKey(seed), jnp.zeros((1, 5)))["params"]
  return params, TX.init(params)


def _train(params, opt_state, start, stop):
  for step in range(start, stop):
    params, opt_state, _ = _step(params, opt_state, *_batch(step))
  return params, opt_state


def _assert_bitwise_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for u, v in zip(la, lb, strict=True):
    u, v = np.asarray(u), np.asarray(v)
    assert u.dtype == v.dtype and u.shape == v.shape
    # Compare the bytes, so that -0.0 vs 0.0 or NaN payloads would also be caught.
    assert u.tobytes() == v.tobytes()


@pytest.fixture(scope="module")
def uninterrupted():
  return _train(*_init(), 0, TOTAL)


def _save_restore_orbax(tree, directory):
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(directory, tree)
  ckpt.wait_until_finished()
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, _template_like(tree))
  restored = ckpt.restore(directory, template)
  ckpt.close()
  return restored


def _template_like(tree):
  """A fresh tree of the same structure (from init), so nothing is copied from `tree`."""
  params, opt_state = _init(seed=123)
  return {"params": params, "opt_state": opt_state, "step": jnp.zeros((), jnp.int32)}


def test_orbax_round_trip_of_full_state(tmp_path):
  params, opt_state = _train(*_init(), 0, STOP)
  tree = {"params": params, "opt_state": opt_state, "step": jnp.asarray(STOP, jnp.int32)}
  restored = _save_restore_orbax(tree, tmp_path / "ckpt")
  _assert_bitwise_equal(restored, tree)
  assert isinstance(restored["opt_state"][0], sngd_jax.SNGDState)
  assert isinstance(restored["opt_state"][0].factors["Dense_1"], sngd_jax.Sketch)
  assert int(restored["opt_state"][0].count) == STOP


def test_flax_serialization_round_trip(tmp_path):
  params, opt_state = _train(*_init(), 0, STOP)
  tree = {"params": params, "opt_state": opt_state, "step": jnp.asarray(STOP, jnp.int32)}
  path = tmp_path / "state.msgpack"
  path.write_bytes(flax.serialization.to_bytes(tree))
  restored = flax.serialization.from_bytes(_template_like(tree), path.read_bytes())
  _assert_bitwise_equal(restored, tree)


@pytest.mark.parametrize("backend", ["orbax", "flax"])
def test_resume_is_bit_identical(uninterrupted, tmp_path, backend):
  params, opt_state = _train(*_init(), 0, STOP)
  tree = {"params": params, "opt_state": opt_state, "step": jnp.asarray(STOP, jnp.int32)}
  if backend == "orbax":
    restored = _save_restore_orbax(tree, tmp_path / "ckpt")
  else:
    restored = flax.serialization.from_bytes(_template_like(tree),
                                             flax.serialization.to_bytes(tree))
  del params, opt_state, tree
  start = int(restored["step"])
  resumed = _train(restored["params"], restored["opt_state"], start, TOTAL)
  _assert_bitwise_equal(resumed, uninterrupted)
  state = resumed[1][0]
  assert int(state.count) == TOTAL and int(state.num_refresh_failures) == 0


def test_resume_changes_nothing_only_if_state_is_restored(uninterrupted):
  """Sanity: resuming with a *fresh* optimizer state does not reproduce the run."""
  params, _ = _train(*_init(), 0, STOP)
  resumed = _train(params, TX.init(params), STOP, TOTAL)
  assert not np.array_equal(np.asarray(resumed[0]["Dense_1"]["kernel"]),
                            np.asarray(uninterrupted[0]["Dense_1"]["kernel"]))


def test_same_seed_same_result(uninterrupted):
  """Two runs from the same seed in one process agree bit for bit."""
  again = _train(*_init(), 0, TOTAL)
  _assert_bitwise_equal(again, uninterrupted)
  other = _train(*_init(seed=1), 0, TOTAL)
  assert not np.array_equal(np.asarray(other[0]["Dense_0"]["kernel"]),
                            np.asarray(uninterrupted[0]["Dense_0"]["kernel"]))


def test_orbax_round_trip_of_a_tied_table_state(tmp_path):
  """A tied embedding's second factor lives at the path 'Embed_0[attend]': orbax keeps it."""

  class Tied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      emb = nn.Embed(9, 3)
      return emb.attend(jnp.tanh(nn.Dense(3)(emb(tokens))))

  model, tokens = Tied(), jnp.array([[1, 2, 3, 4]])
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = sngd_jax.sngd_adam(1e-2, fisher={"Embed_0": "tied"})
  loss = lambda p, t: jnp.sum(jnp.sin(model.apply({"params": p}, t)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, tokens)
  _, opt_state = tx.update(grads, tx.init(params), params, activations=acts)
  tree = {"params": params, "opt_state": opt_state}
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", tree)
  ckpt.wait_until_finished()
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                          {"params": params, "opt_state": tx.init(params)})
  restored = ckpt.restore(tmp_path / "ckpt", template)
  ckpt.close()
  _assert_bitwise_equal(restored, tree)
  assert set(restored["opt_state"][0].factors) == {"Dense_0", "Embed_0", "Embed_0[attend]"}


def test_resume_without_recompiling_once_the_state_is_strong_and_committed(tmp_path):
  """Flax's ``TrainState.step`` and injected integer hyperparameters start weakly typed, and
  arrays made on the host are uncommitted; orbax restores them strongly typed and committed, so
  the jitted step compiled again after a restore. Made strong and committed once before the
  first step (docs/reliability.md), the restored state reuses the compiled step."""
  import flax.linen as nn  # noqa: PLC0415
  import optax  # noqa: PLC0415

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))

  model = MLP()
  x = jnp.ones((8, 5))
  y = jnp.arange(8) % 3
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum)(0.1)
  state = sngd_jax.TrainState.create(apply_fn=model.apply,
                                     params=model.init(jax.random.key(0), x)["params"], tx=tx)
  weak = lambda a: getattr(a, "weak_type", False) or isinstance(a, int)  # `step=0` is an int
  assert any(weak(a) for a in jax.tree.leaves(state))
  state = jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.asarray(a).dtype), state)
  state = jax.device_put(state, jax.devices()[0])  # committed, as restored arrays are

  def loss(p):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(state):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(state.params)
    return state.apply_gradients(grads=grads, activations=acts)

  state = step(step(state))
  entries = step._cache_size()
  ckpt = ocp.StandardCheckpointer()
  ckpt.save(tmp_path / "ckpt", state)
  ckpt.wait_until_finished()
  template = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  restored = ckpt.restore(tmp_path / "ckpt", template)
  assert not any(weak(a) for a in jax.tree.leaves(restored))
  step(restored)
  assert step._cache_size() == entries
