"""Activation capture: keys, values, shared weights, gradients, and Flax NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from flax import nnx
from helpers_mlp import make_problem, reference_update

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")


class Block(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(5, param_dtype=jnp.float64)(nn.relu(nn.Dense(4, param_dtype=jnp.float64)(x)))


class Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    shared = nn.Dense(5, param_dtype=jnp.float64, name="shared")
    h = nn.relu(shared(x))
    h = Block()(h[:, :3] @ jnp.ones((3, 5)))   # a nested module
    return shared(h)                            # shared weights, called twice


def _setup():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(8, 5)))
  y = jnp.asarray(rng.normal(size=(8, 5)))
  model = Net()
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return model, params, x, y, loss_fn


def test_keys_match_params_and_shared_layers_keep_every_call():
  model, params, x, y, loss_fn = _setup()
  _, acts = sngd_jax.capture(loss_fn, outputs=True)(params, x, y)
  assert set(acts) == {"shared", "Block_0/Dense_0", "Block_0/Dense_1"}
  assert set(sngd_jax.discover(params)) == set(acts)
  assert len(acts["shared"]) == 2 and len(acts["Block_0/Dense_0"]) == 1
  # The first call of `shared` saw x and produced x W + b.
  w, b = params["shared"]["kernel"], params["shared"]["bias"]
  np.testing.assert_allclose(acts["shared"][0].inputs, x)
  np.testing.assert_allclose(acts["shared"][0].outputs, x @ w + b, rtol=1e-12)


def test_outputs_are_kept_only_when_asked_and_rfim_says_so():
  """By default the records hold the inputs only (all that fisher="linear" reads), with the
  same update as with outputs; a rfim layer without outputs is an error naming the fix."""
  _, params, x, y, loss_fn = _setup()
  grad_fn = lambda **kw: jax.value_and_grad(sngd_jax.capture(loss_fn, **kw), has_aux=True)
  (_, acts), grads = grad_fn()(params, x, y)
  (_, acts_z), _ = grad_fn(outputs=True)(params, x, y)
  assert all(c.outputs is None for calls in acts.values() for c in calls)
  assert all(c.outputs is not None for calls in acts_z.values() for c in calls)
  tx = exact_sngd()
  state = tx.init(params)
  got, _ = tx.update(grads, state, params, activations=acts)
  want, _ = tx.update(grads, state, params, activations=acts_z)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), got, want)
  assert sngd_jax.coverage(loss_fn, params, x, y).output_bytes == 0
  assert sngd_jax.coverage(loss_fn, params, x, y, outputs=True).output_bytes == sum(
      c.outputs.nbytes for calls in acts_z.values() for c in calls)
  rfim = exact_sngd(fisher={"Block_0/Dense_1": "rfim"})
  with pytest.raises(ValueError, match=r"'Block_0/Dense_1' has fisher='rfim'.*"
                                       r"capture\(loss_fn, outputs=True\)"):
    rfim.update(grads, rfim.init(params), params, activations=acts)
  rfim.update(grads, rfim.init(params), params, activations=acts_z)  # with outputs: fine


def test_capture_does_not_change_values_or_gradients():
  _, params, x, y, loss_fn = _setup()
  loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
  (loss2, _), grads2 = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
  assert float(loss) == float(loss2)
  jax.tree.map(np.testing.assert_array_equal, grads, grads2)


def test_has_aux_nests_activations():
  _, params, x, y, loss_fn = _setup()
  fn = lambda p, x, y: (loss_fn(p, x, y), {"note": 1.0})
  (loss, (aux, acts)), _ = jax.value_and_grad(
      sngd_jax.capture(fn, has_aux=True, outputs=True), has_aux=True)(params, x, y)
  assert aux == {"note": 1.0} and "shared" in acts


def test_shared_layer_statistics_pool_all_calls():
  model, params, x, y, loss_fn = _setup()
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
      params, x, y)
  tx = exact_sngd(decay=0.0)
  out, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows = np.concatenate([np.asarray(c.inputs) for c in acts["shared"]])
  zs = np.concatenate([np.asarray(c.outputs) for c in acts["shared"]])
  ref_w, ref_b = reference_update(rows, zs, np.asarray(grads["shared"]["kernel"]),
                                  np.asarray(grads["shared"]["bias"]), "linear", 1e-4)
  np.testing.assert_allclose(out["shared"]["kernel"], ref_w, rtol=1e-9)
  np.testing.assert_allclose(out["shared"]["bias"], ref_b, rtol=1e-9)


def test_params_under_variables_collection_match_activation_keys():
  _, params, x, y, loss_fn = _setup()
  variables = {"params": params}
  fn = lambda v, x, y: loss_fn(v["params"], x, y)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(fn, outputs=True), has_aux=True)(
      variables, x, y)
  tx = sngd_jax.sngd(decay=0.0)
  out, _ = tx.update(grads, tx.init(variables), variables, activations=acts)
  ref, _ = tx.update(grads["params"], tx.init(params), params, activations=acts)
  jax.tree.map(np.testing.assert_array_equal, out["params"], ref)


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(6, 7, rngs=rngs, param_dtype=jnp.float64),
                            nnx.Linear(7, 3, rngs=rngs, param_dtype=jnp.float64)])

  def __call__(self, x):
    return self.layers[1](nnx.relu(self.layers[0](x)))


def test_nnx_capture_and_optimizer_update_match_numpy():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(12, 6)))
  y = jnp.asarray(rng.normal(size=(12, 3)))
  model = NnxMLP(nnx.Rngs(0))
  loss_fn = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x, y)
  assert set(acts) == {"layers/0", "layers/1"}
  assert all(c.outputs is None for calls in acts.values() for c in calls)  # inputs only
  opt = nnx.Optimizer(model, optax.chain(sngd_jax.sngd(decay=0.0), optax.sgd(1.0)),
                      wrt=nnx.Param)
  opt.update(model, grads, activations=acts)
  after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  g = nnx.to_pure_dict(grads)
  h = np.asarray(x)
  for i in range(2):
    w, b = before["layers"][i]["kernel"], before["layers"][i]["bias"]
    z = h @ w + b
    ref_w, ref_b = reference_update(h, z, np.asarray(g["layers"][i]["kernel"]),
                                    np.asarray(g["layers"][i]["bias"]), "linear", 1e-4)
    np.testing.assert_allclose(w - np.asarray(after["layers"][i]["kernel"]), ref_w, rtol=1e-8)
    np.testing.assert_allclose(b - np.asarray(after["layers"][i]["bias"]), ref_b, rtol=1e-8)
    h = np.maximum(z, 0)


def test_nnx_call_is_restored_even_on_error():
  original = nnx.Linear.__call__

  def bad(m, x):
    raise RuntimeError("boom")

  with pytest.raises(RuntimeError):
    sngd_jax.capture_nnx(bad)(NnxMLP(nnx.Rngs(0)), jnp.ones((1, 6)))
  assert nnx.Linear.__call__ is original


def test_discover_reads_input_size_from_bias_shape():
  params = {
      "dense": {"kernel": jnp.zeros((4, 3)), "bias": jnp.zeros((3,))},
      "conv": {"kernel": jnp.zeros((3, 3, 2, 8)), "bias": jnp.zeros((8,))},
      "general": {"kernel": jnp.zeros((6, 2, 5)), "bias": jnp.zeros((2, 5))},
      "nobias": {"kernel": jnp.zeros((4, 3))},
      "scale": {"scale": jnp.zeros((4,))},
  }
  specs = sngd_jax.discover(params)
  assert (specs["dense"].in_dim, specs["dense"].out_dim, specs["dense"].dim) == (4, 3, 5)
  assert (specs["conv"].in_dim, specs["conv"].out_dim) == (18, 8)
  assert (specs["general"].in_dim, specs["general"].out_dim) == (6, 10)
  assert specs["nobias"].dim == 4
  # A lone `scale` is a normalization layer: one 1x1 block per channel.
  assert (specs["scale"].structure, specs["scale"].in_dim, specs["scale"].out_dim) == (
      "per_channel", 1, 4)


def test_make_problem_is_usable():
  _, params, x, y, loss_fn = make_problem()
  assert np.isfinite(float(loss_fn(params, x, y)))
