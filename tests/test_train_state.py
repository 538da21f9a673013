"""sngd_jax.TrainState: apply_gradients(grads=, activations=) is the manual tx.update path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from helpers_mlp import grads_and_acts, make_problem

import sngd_jax

TXS = {
    "sngd_momentum": lambda: sngd_jax.sngd_momentum(0.05, factor_every=2, inverse_every=2),
    "chain_sngd_adam": lambda: optax.chain(sngd_jax.sngd(inverse_every=2), optax.adam(1e-2)),
    # a MultiSteps object is not a GradientTransformation: apply_gradients unwraps it
    "multisteps": lambda: sngd_jax.MultiSteps(
        sngd_jax.sngd_momentum(0.05, factor_every=2, inverse_every=2), every_k_schedule=2),
}


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("name", sorted(TXS))
def test_apply_gradients_equals_the_manual_update_bit_for_bit(name):
  model, params, x, y, loss_fn = make_problem(dtype=jnp.float32)
  tx = TXS[name]()
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def train_step(state):
    _, grads, acts = grads_and_acts(loss_fn, state.params, x, y)
    return state.apply_gradients(grads=grads, activations=acts)

  @jax.jit
  def manual_step(params, opt_state):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for _ in range(3):
    state = train_step(state)
    params, opt_state = manual_step(params, opt_state)
  assert int(state.step) == 3
  _assert_trees_equal(state.params, params)
  _assert_trees_equal(state.opt_state, opt_state)
  assert not np.allclose(state.params["Dense_0"]["kernel"],
                         make_problem(dtype=jnp.float32)[1]["Dense_0"]["kernel"])


def test_any_optax_transform_without_activations_is_flax_trainstate():
  model, params, x, y, loss_fn = make_problem(dtype=jnp.float32)
  ours = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=optax.adam(1e-2))
  flax_state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                             tx=optax.adam(1e-2))
  for _ in range(2):
    grads = jax.grad(loss_fn)(ours.params, x, y)
    ours = ours.apply_gradients(grads=grads, activations=None)
    flax_state = flax_state.apply_gradients(grads=jax.grad(loss_fn)(flax_state.params, x, y))
  _assert_trees_equal(ours.params, flax_state.params)
  _assert_trees_equal(ours.opt_state, flax_state.opt_state)


def test_activations_reach_optimizers_without_extra_args_and_sngd_needs_them():
  model, params, x, y, loss_fn = make_problem(dtype=jnp.float32)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  plain = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
  stepped = plain.apply_gradients(grads=grads, activations=acts)  # ignored by plain sgd
  ref = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
  jax.tree.map(np.testing.assert_allclose, stepped.params, ref)
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=sngd_jax.sngd_momentum(0.1))
  with pytest.raises(ValueError, match="needs `activations=`"):
    state.apply_gradients(grads=grads)


class _Dropout(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(4)(x)
    return nn.Dense(2)(nn.Dropout(0.5, deterministic=not train)(nn.relu(x)))


def test_extra_fields_are_replaced_as_in_flax():
  class State(sngd_jax.TrainState):
    key: jax.Array

  model = _Dropout()
  x = jnp.ones((3, 5))
  params = model.init(jax.random.key(0), x, False)["params"]
  state = State.create(apply_fn=model.apply, params=params, tx=sngd_jax.sngd_momentum(0.1),
                       key=jax.random.key(1))
  loss = lambda p, key: jnp.sum(model.apply({"params": p}, x, True, rngs={"dropout": key}))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
      state.params, state.key)
  new_key = jax.random.key(2)
  state = state.apply_gradients(grads=grads, activations=acts, key=new_key)
  assert int(state.step) == 1
  assert jax.random.key_data(state.key).tolist() == jax.random.key_data(new_key).tolist()


def test_extra_args_reach_a_transform_that_needs_them():
  """``extra_args={"value": loss}`` reaches ``optax.contrib.reduce_on_plateau`` in the chain
  (Flax's ``apply_gradients`` cannot pass it): equal to the manual ``tx.update(...,
  activations=, value=)`` bit for bit, with the plateau's scale reduced on the way."""
  model, params, x, y, loss_fn = make_problem(dtype=jnp.float32)
  tx = optax.chain(sngd_jax.sngd_momentum(0.05, inverse_every=2),
                   optax.contrib.reduce_on_plateau(factor=0.5, patience=0, accumulation_size=1))
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  with pytest.raises(TypeError, match="value"):  # what Flax's way gives
    jax.jit(lambda s: s.apply_gradients(grads=grads_and_acts(loss_fn, s.params, x, y)[1],
                                        activations=grads_and_acts(loss_fn, s.params, x, y)[2]))(
        state)

  @jax.jit
  def train_step(state, bump):
    loss, grads, acts = grads_and_acts(loss_fn, state.params, x, y)
    return state.apply_gradients(grads=grads, activations=acts,
                                 extra_args={"value": loss + bump})

  @jax.jit
  def manual_step(params, opt_state, bump):
    loss, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts,
                                   value=loss + bump)
    return optax.apply_updates(params, updates), opt_state

  opt_state = tx.init(params)
  for bump in (0.0, 10.0, 20.0):  # a rising loss: the plateau halves the scale
    state = train_step(state, bump)
    params, opt_state = manual_step(params, opt_state, bump)
  _assert_trees_equal(state.params, params)
  _assert_trees_equal(state.opt_state, opt_state)
  assert float(opt_state[1].scale) < 1.0
  with pytest.raises(TypeError, match="activations twice"):
    state.apply_gradients(grads=params, activations={}, extra_args={"activations": {}})
