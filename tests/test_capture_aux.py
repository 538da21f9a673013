"""Losses that return (loss, aux): has_aux=True for linen and NNX, and the error without it."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sngd_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(5)(x)))


class NnxMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(4, 5, rngs=rngs)
    self.out = nnx.Linear(5, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))


X = jax.random.normal(jax.random.key(1), (8, 4))
Y = jnp.arange(8) % 3


def _xent(logits):
  return optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()


def test_linen_tuple_loss_without_has_aux_says_what_to_write():
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]

  def loss_fn(p):
    logits = model.apply({"params": p}, X)
    return _xent(logits), logits

  with pytest.raises(ValueError) as err:
    jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params)
  msg = str(err.value)
  assert msg.startswith("sngd: the function wrapped by `capture` returned a tuple of length 2")
  assert "sngd_jax.capture(loss_fn, has_aux=True)" in msg
  assert "(loss, (aux, acts)), grads = jax.value_and_grad(wrapped, has_aux=True)" in msg


def test_nnx_tuple_loss_without_has_aux_says_what_to_write():
  model = NnxMLP(nnx.Rngs(0))

  def loss_fn(m):
    logits = m(X)
    return _xent(logits), logits

  with pytest.raises(ValueError, match=r"sngd_jax\.capture_nnx\(loss_fn, has_aux=True\)") as err:
    nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model)
  # the NNX transform, not jax.value_and_grad (which an NNX module does not go through)
  assert "(loss, (aux, acts)), grads = nnx.value_and_grad(wrapped, has_aux=True)" in str(err.value)


def test_equinox_tuple_loss_without_has_aux_names_filter_value_and_grad():
  """The fix the message gives is the Equinox one: ``jax.value_and_grad`` on an ``eqx.nn.MLP``
  fails on its activation function (not a JAX type), so the message named a call that does
  not run on the model."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(X.shape[1], 3, 8, 1, key=jax.random.key(0))

  def loss_fn(m):
    logits = jax.vmap(m)(X)
    return _xent(logits), logits

  with pytest.raises(ValueError, match=r"sngd_jax\.capture_eqx\(loss_fn, has_aux=True\)") as err:
    eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss_fn), has_aux=True)(model)
  fix = "eqx.filter_value_and_grad(wrapped, has_aux=True)"
  assert f"(loss, (aux, acts)), grads = {fix}" in str(err.value)
  # and the call it names runs on the model once the loss is wrapped with has_aux=True
  (loss, (logits, acts)), _ = eqx.filter_value_and_grad(
      sngd_jax.capture_eqx(loss_fn, has_aux=True), has_aux=True)(model)
  np.testing.assert_allclose(float(loss), float(_xent(jax.vmap(model)(X))), rtol=1e-6)
  assert set(acts) == {"layers/0", "layers/1"}


def test_nnx_model_not_the_first_argument_says_to_pass_it_first():
  """``loss_fn(x, model)`` differentiated with ``argnums=1``: capture_nnx names layers by
  their path in the first argument, which holds none; the warning says to pass the model first
  (it blamed a transform made before capture, or a layer made inside the loss)."""
  model = NnxMLP(nnx.Rngs(0))
  loss_fn = lambda x, m: _xent(m(x))
  with pytest.warns(UserWarning, match="sngd: capture_nnx could not name 2") as caught:
    (_, acts), _ = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), argnums=1, has_aux=True)(
        X, model)
  assert acts == {}
  (msg,) = [str(w.message) for w in caught if str(w.message).startswith("sngd:")]
  assert "first argument, the model, and that argument holds no layer" in msg
  assert "Pass the model first" in msg and "transform made before capture" not in msg


def test_has_aux_with_a_scalar_loss_is_an_error():
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]
  with pytest.raises(ValueError, match="needs `fn` to return a pair"):
    sngd_jax.capture(lambda p: _xent(model.apply({"params": p}, X)), has_aux=True)(params)


def test_linen_has_aux_gives_the_loss_only_path_and_the_aux():
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]

  def loss_with_logits(p):
    logits = model.apply({"params": p}, X)
    return _xent(logits), logits

  loss_only = lambda p: _xent(model.apply({"params": p}, X))
  (loss, (logits, acts)), grads = jax.value_and_grad(
      sngd_jax.capture(loss_with_logits, has_aux=True), has_aux=True)(params)
  (loss0, acts0), grads0 = jax.value_and_grad(sngd_jax.capture(loss_only), has_aux=True)(params)
  np.testing.assert_array_equal(loss, loss0)
  np.testing.assert_array_equal(logits, model.apply({"params": params}, X))
  jax.tree.map(np.testing.assert_array_equal, grads, grads0)
  jax.tree.map(np.testing.assert_array_equal, acts, acts0)
  tx = sngd_jax.sngd_momentum(0.1)
  u, _ = tx.update(grads, tx.init(params), params, activations=acts)
  u0, _ = tx.update(grads0, tx.init(params), params, activations=acts0)
  jax.tree.map(np.testing.assert_array_equal, u, u0)


def test_nnx_has_aux_gives_the_loss_only_path_and_the_aux():
  def loss_with_logits(m):
    logits = m(X)
    return _xent(logits), logits

  model, model0 = NnxMLP(nnx.Rngs(0)), NnxMLP(nnx.Rngs(0))
  (loss, (logits, acts)), grads = nnx.value_and_grad(
      sngd_jax.capture_nnx(loss_with_logits, has_aux=True), has_aux=True)(model)
  (loss0, acts0), grads0 = nnx.value_and_grad(
      sngd_jax.capture_nnx(lambda m: _xent(m(X))), has_aux=True)(model0)
  np.testing.assert_array_equal(loss, loss0)
  np.testing.assert_array_equal(logits, model(X))
  assert set(acts) == {"hidden", "out"}
  jax.tree.map(np.testing.assert_array_equal, acts, acts0)
  opt, opt0 = (nnx.Optimizer(m, sngd_jax.sngd_momentum(0.1), wrt=nnx.Param)
               for m in (model, model0))
  opt.update(model, grads, activations=acts)
  opt0.update(model0, grads0, activations=acts0)
  jax.tree.map(np.testing.assert_array_equal, nnx.state(model, nnx.Param),
               nnx.state(model0, nnx.Param))
  assert not np.allclose(model.out.kernel[...], NnxMLP(nnx.Rngs(0)).out.kernel[...])


def test_nnx_optimizer_with_multi_transform_gives_a_layer_to_adam():
  """``nnx.Optimizer(model, optax.multi_transform(...))`` with labels per leaf: SNGD on
  ``hidden``, Adam on ``out``. One step: the same as ``sngd_momentum`` told to leave ``out``
  alone (``fisher={"out": None}``) for ``hidden``, and as Adam for ``out`` (after it the
  models differ, and so would their gradients)."""
  def labels(state):
    return jax.tree_util.tree_map_with_path(
        lambda p, _: "adam" if "out" in jax.tree_util.keystr(p) else "sngd", state)

  kw = dict(factor_every=1, inverse_every=1)
  model, ref_model, adam_model = (NnxMLP(nnx.Rngs(0)) for _ in range(3))
  opt = nnx.Optimizer(model, optax.multi_transform(
      {"sngd": sngd_jax.sngd_momentum(0.1, **kw), "adam": optax.adam(0.01)}, labels),
      wrt=nnx.Param)
  ref = nnx.Optimizer(ref_model, sngd_jax.sngd_momentum(0.1, fisher={"out": None}, **kw),
                      wrt=nnx.Param)
  adam = nnx.Optimizer(adam_model, optax.adam(0.01), wrt=nnx.Param)
  grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(lambda m: _xent(m(X))), has_aux=True)
  for m, o in ((model, opt), (ref_model, ref)):
    (_, acts), grads = grad_fn(m)
    o.update(m, grads, activations=acts)
  (_, acts), grads = grad_fn(adam_model)
  adam.update(adam_model, grads)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(getattr(model.hidden, name)[...],
                               getattr(ref_model.hidden, name)[...], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(getattr(model.out, name)[...],
                               getattr(adam_model.out, name)[...], rtol=1e-5, atol=1e-7)
  # the hidden layer moved as SNGD moves it, not as Adam does
  assert not np.allclose(model.hidden.kernel[...], adam_model.hidden.kernel[...], atol=1e-4)


def test_nnx_optimizer_with_a_wrt_filter_trains_the_head_of_a_frozen_body():
  """``nnx.Optimizer(model, tx, wrt=filter)`` with the body frozen (not in ``wrt``): the body's
  captured activations are ignored, the body stays as it was, and the head gets the update of
  ``sngd_momentum`` on the whole model told to leave the body alone (``fisher={"hidden":
  None}``; the trust region measures the layers SNGD preconditions, the head in both)."""
  wrt = nnx.All(nnx.Param, nnx.PathContains("out"))
  model, ref_model = NnxMLP(nnx.Rngs(0)), NnxMLP(nnx.Rngs(0))
  kw = dict(factor_every=1, inverse_every=1)
  opt = nnx.Optimizer(model, sngd_jax.sngd_momentum(0.1, **kw), wrt=wrt)
  ref = nnx.Optimizer(ref_model, sngd_jax.sngd_momentum(0.1, fisher={"hidden": None}, **kw),
                      wrt=nnx.Param)
  loss = sngd_jax.capture_nnx(lambda m: _xent(m(X)))
  (_, acts), grads = nnx.value_and_grad(loss, has_aux=True, argnums=nnx.DiffState(0, wrt))(model)
  assert set(acts) == {"hidden", "out"}
  opt.update(model, grads, activations=acts)
  (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(ref_model)
  ref.update(ref_model, grads, activations=acts)
  hidden0 = NnxMLP(nnx.Rngs(0)).hidden
  for name in ("kernel", "bias"):
    np.testing.assert_array_equal(getattr(model.hidden, name)[...], getattr(hidden0, name)[...])
    np.testing.assert_allclose(getattr(model.out, name)[...], getattr(ref_model.out, name)[...],
                               rtol=1e-5, atol=1e-7)
  assert not np.allclose(model.out.kernel[...], NnxMLP(nnx.Rngs(0)).out.kernel[...])


@pytest.mark.parametrize("grad", [jax.value_and_grad, jax.grad])
def test_outer_grad_without_has_aux_is_jax_error_showing_the_records(grad):
  """docs/known-issues.md: without ``has_aux=True`` on the outer call, the error is JAX's (it
  checks the output after capture's wrapper has returned) and shows the ``Captured`` records,
  the sign that the call needs ``has_aux=True``; with it, the same call runs."""
  model = MLP()
  params = model.init(jax.random.key(0), X)["params"]
  loss_fn = lambda p: _xent(model.apply({"params": p}, X))
  with pytest.raises(TypeError, match=r"(?s)Gradient only defined for scalar-output functions\. "
                                      r"Output was \(.*\{'Dense_0': \(Captured\("):
    grad(sngd_jax.capture(loss_fn))(params)
  out = grad(sngd_jax.capture(loss_fn), has_aux=True)(params)
  grads = out[1] if grad is jax.value_and_grad else out[0]
  want = jax.grad(loss_fn)(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), grads, want)
