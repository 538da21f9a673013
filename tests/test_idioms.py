"""Training-loop idioms around capture: transforms imported by name."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import vmap as imported_vmap  # bound at import: capture cannot replace it

import sngd_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  model = MLP()
  return model, model.init(jax.random.key(0), x)["params"], x, y


def _sngd_warnings(fn, *args):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
  return out, [str(w.message) for w in caught if str(w.message).startswith("sngd:")]


def test_vmap_imported_by_name_is_named_in_the_warning():
  model, params, x, y = _problem()
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  by_module = lambda p: ce(jax.vmap(lambda xi: model.apply({"params": p}, xi))(x))
  by_name = lambda p: ce(imported_vmap(lambda xi: model.apply({"params": p}, xi))(x))
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(by_module), params)
  assert not messages
  # the per-example calls under jax.vmap are the batch's rows: the hidden layer saw x
  np.testing.assert_array_equal(acts["hidden"][0].inputs.reshape(x.shape), x)
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(by_name), params)
  assert "hidden" not in acts and "out" not in acts
  assert messages and all("from jax import" in m and "`jax.vmap`" in m for m in messages)
