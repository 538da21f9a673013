"""Haiku models as kfac-jax users write them, through capture_hk: `hk.nets.ResNet` with
BatchNorm under `transform_with_state` and a loss returning `(loss, (state, logits))`, checked
against float64 references built from the layers' inputs as Haiku itself passes them
(`hk.intercept_methods`), not from the records."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd

import sngd_jax

hk = pytest.importorskip("haiku")  # a guard only: CI installs the `haiku` extra

KEY = jax.random.key(0)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _resnet(x, is_training):
  net = hk.nets.ResNet([1, 1, 1, 1], 3, channels_per_group=(8, 8, 8, 8), bottleneck=True,
                       initial_conv_config={"output_channels": 4, "kernel_shape": 3,
                                            "stride": 1})
  return net(x, is_training=is_training)


def test_resnet_coverage_and_update_are_the_damped_solve(x64):
  model = hk.without_apply_rng(hk.transform_with_state(_resnet))
  x = jax.random.normal(KEY, (4, 8, 8, 3), jnp.float64)
  y = jnp.array([0, 1, 2, 0])
  params, state = model.init(KEY, x, True)
  assert {a.dtype for a in jax.tree.leaves(params)} == {np.dtype(np.float64)}

  def loss(p, s, x, y):
    logits, s = model.apply(p, s, x, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (s, logits)

  report = sngd_jax.coverage(loss, params, state, x, y)
  assert report.missing == [] and report.pass_through == []
  weights = {f"{m}/{n}" for m, leaves in params.items() for n in leaves if n in ("w", "scale")}
  assert len(weights) == 3 + 6 * 4 + 2 * 4  # stem conv, norm, logits; 4 blocks, projections
  assert weights <= set(report.preconditioned)

  tx = exact_sngd(**ref.one_step_kwargs())

  @jax.jit
  def step(params, state, x, y):
    (_, ((state, _), acts)), grads = jax.value_and_grad(
        sngd_jax.capture_hk(loss, has_aux=True), has_aux=True)(params, state, x, y)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, state, acts

  grads, updates, new_state, acts = step(params, state, x, y)
  assert {p.rsplit("/", 1)[0] for p in weights} == set(acts)
  plain_state, _ = loss(params, state, x, y)[1]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12),  # updated once
               new_state, plain_state)

  seen = {}

  def spy(next_f, args, kwargs, context):  # the inputs Haiku passes the layers
    if context.method_name == "__call__":
      seen.setdefault(context.module.module_name, args[0])
    return next_f(*args, **kwargs)

  with hk.intercept_methods(spy):
    model.apply(params, state, x, True)
  stem, bn, head = "res_net/~/initial_conv", "res_net/~/initial_batchnorm", "res_net/~/logits"
  rows, _ = ref.conv_patches(ref.np64(x), (3, 3), (1, 1), "SAME", (1, 1), (1, 1), 1)
  kernel, _ = ref.dense_update(rows, ref.np64(grads[stem]["w"]).reshape(rows.shape[1], -1),
                               None)
  np.testing.assert_allclose(ref.np64(updates[stem]["w"]).reshape(kernel.shape), kernel,
                             rtol=1e-8, atol=1e-12)
  c = ref.np64(seen[bn]).reshape(-1, 4)
  xhat = (c - c.mean(0)) / np.sqrt(c.var(0) + 1e-5)
  s, b = ref.channel_update(xhat, ref.np64(grads[bn]["scale"]).ravel(),
                            ref.np64(grads[bn]["offset"]).ravel())
  np.testing.assert_allclose(ref.np64(updates[bn]["scale"]).ravel(), s, rtol=1e-7)
  np.testing.assert_allclose(ref.np64(updates[bn]["offset"]).ravel(), b, rtol=1e-7)
  kernel, bias = ref.dense_update(ref.np64(seen[head]), grads[head]["w"], grads[head]["b"])
  np.testing.assert_allclose(ref.np64(updates[head]["w"]), kernel, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(ref.np64(updates[head]["b"]), bias, rtol=1e-8, atol=1e-12)


def test_vector_quantizer_codebook_is_named_and_left_out_with_fisher_none():
  """``hk.nets.VectorQuantizer``'s ``(D, K)`` codebook is read as an embedding table that no
  lookup feeds: ``update`` raises naming it, and with ``fisher={path: None}`` its gradient
  passes through unchanged while the linear layers around it are still preconditioned
  (docs/known-issues.md)."""

  def f(x):
    z = hk.Linear(4)(x)
    out = hk.nets.VectorQuantizer(embedding_dim=4, num_embeddings=8,
                                  commitment_cost=0.25)(z, is_training=True)
    return jnp.sum(hk.Linear(3)(out["quantize"]) ** 2) + out["loss"]

  model = hk.without_apply_rng(hk.transform(f))
  x = jax.random.normal(jax.random.key(0), (16, 6))
  params = model.init(jax.random.key(1), x)
  grads, acts = jax.grad(sngd_jax.capture_hk(model.apply), has_aux=True)(params, x)
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="'vector_quantizer'.*fisher=\\{'vector_quantizer': None\\}"):
    tx.update(grads, tx.init(params), params, activations=acts)
  tx = sngd_jax.sngd(fisher={"vector_quantizer": None})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates["vector_quantizer"]["embeddings"],
                                grads["vector_quantizer"]["embeddings"])
  assert not np.allclose(updates["linear"]["w"], grads["linear"]["w"], rtol=1e-3)
