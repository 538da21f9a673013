"""Activation capture: keys, values, shared weights, gradients, and Flax NNX."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
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


class _ShiftedDense(nn.Dense):
  """A layer subclass whose ``__call__`` feeds the base class a transformed input."""

  @nn.compact
  def __call__(self, x):
    return super().__call__(2.0 * x + 1.0)


class _ShiftedConv(nn.Conv):
  @nn.compact
  def __call__(self, x):
    return super().__call__(x * x)


class _ShiftedEmbed(nn.Embed):
  def __call__(self, ids):
    return super().__call__((ids + 1) % self.num_embeddings)


class _Subclassed(nn.Module):
  @nn.compact
  def __call__(self, x, img, ids):
    dense = _ShiftedDense(3, param_dtype=jnp.float64, name="dense")
    h = dense(x) + dense(-x)  # shared weights: two calls, two records
    c = _ShiftedConv(2, (2, 2), param_dtype=jnp.float64, name="conv")(img)
    e = _ShiftedEmbed(6, 3, param_dtype=jnp.float64, name="emb")(ids)
    return jnp.sum(jnp.sin(h)) + jnp.sum(jnp.cos(c)) + jnp.sum(e ** 2)


def test_layer_subclass_calling_super_records_the_kernels_input():
  """A linen subclass of a recorded layer that calls ``super().__call__(f(x))`` is
  intercepted twice on one module (its own ``__call__`` and the base class's): only the
  base class's call, whose argument the kernel multiplies, is recorded. Both were
  recorded and pooled, so the factor mixed ``x`` into the rows of ``f(x)``: the Dense's
  update was 52% off the float64 reference, the Embed's token counts doubled."""
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(6, 4)))
  img = jnp.asarray(rng.normal(size=(2, 4, 4, 1)))
  ids = jnp.array([[0, 1, 5], [3, 3, 2]])
  model = _Subclassed()
  params = model.init(jax.random.key(0), x, img, ids)["params"]
  loss_fn = lambda p, x, img, ids: model.apply({"params": p}, x, img, ids)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
      params, x, img, ids)
  assert [len(acts[k]) for k in ("dense", "conv", "emb")] == [2, 1, 1]
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows = np.concatenate([2.0 * np.asarray(x) + 1.0, -2.0 * np.asarray(x) + 1.0])
  kernel, bias = ref.dense_update(rows, grads["dense"]["kernel"], grads["dense"]["bias"])
  np.testing.assert_allclose(updates["dense"]["kernel"], kernel, rtol=1e-10)
  np.testing.assert_allclose(updates["dense"]["bias"], bias, rtol=1e-10)
  patches, _ = ref.conv_patches(np.asarray(img) ** 2, (2, 2), (1, 1), "SAME", (1, 1), (1, 1), 1)
  kernel, bias = ref.dense_update(patches, grads["conv"]["kernel"], grads["conv"]["bias"])
  np.testing.assert_allclose(updates["conv"]["kernel"], kernel, rtol=1e-10)
  np.testing.assert_allclose(updates["conv"]["bias"], bias, rtol=1e-10)
  freq = np.bincount((np.asarray(ids).ravel() + 1) % 6, minlength=6) / ids.size
  expect = np.asarray(grads["emb"]["embedding"]) / (freq + ref.DAMPING * freq.sum())[:, None]
  np.testing.assert_allclose(updates["emb"]["embedding"], expect, rtol=1e-10)


class _ShiftedLinear(nnx.Linear):
  def __call__(self, x):
    return super().__call__(2.0 * x + 1.0)


def test_nnx_layer_subclass_calling_super_records_the_kernels_input():
  """``capture_nnx`` wraps the base class's ``__call__``: the subclass's layer records the
  input its kernel multiplies, as in linen (``test_layer_subclass_calling_super_...``)."""
  x = jnp.asarray(np.random.default_rng(4).normal(size=(6, 4)))
  model = _ShiftedLinear(4, 3, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
  loss_fn = lambda m, x: jnp.sum(jnp.sin(m(x)) + jnp.sin(m(-x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x)
  assert len(acts[""]) == 2
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows = np.concatenate([2.0 * np.asarray(x) + 1.0, -2.0 * np.asarray(x) + 1.0])
  kernel, bias = ref.dense_update(rows, grads["kernel"][...], grads["bias"][...])
  np.testing.assert_allclose(updates["kernel"][...], kernel, rtol=1e-10)
  np.testing.assert_allclose(updates["bias"][...], bias, rtol=1e-10)
