"""The reconstructed network: round trip, same function, and SGD on it equals SNGD."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from exact import exact_sngd

import sngd_jax
from sngd_jax._src import reconstruct

pytestmark = pytest.mark.usefixtures("x64")


FEATURES = (7, 5, 3)


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, f in enumerate(FEATURES):
      x = nn.Dense(f, param_dtype=x.dtype)(x)
      if i < len(FEATURES) - 1:
        x = nn.tanh(x)  # smooth: ReLU kinks at exactly 0 break the gradient identity
    return x


def loss_fn(params, x, y):
  return jnp.mean((MLP().apply({"params": params}, x) - y) ** 2)


def reconstructed_loss(params_prime, roots, x, y):
  """The same MLP written with local Fisher layers in front of every Dense layer."""
  h = x
  for i in range(len(FEATURES)):
    p = params_prime[f"Dense_{i}"]
    h = reconstruct.reconstructed_dense(h, p["kernel"], p["bias"], roots[f"Dense_{i}"].inv_sqrt)
    if i < len(FEATURES) - 1:
      h = jnp.tanh(h)
  return jnp.mean((h - y) ** 2)


def setup(fisher, damping=1e-2):
  """A state with non-trivial factors: two steps on two batches."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(20, 6)))
  y = jnp.asarray(rng.normal(size=(20, 3)))
  params = MLP().init(jax.random.key(0), x)["params"]
  tx = exact_sngd(fisher=fisher, damping=damping, inverse_every=1, decay=0.5)
  state = tx.init(params)
  grad_fn = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)
  for i in range(2):
    grads, acts = grad_fn(params, x + i, y)
    updates, state = tx.update(grads, state, params, activations=acts)
  return params, state, tx, x, y, grads, acts, updates


def leaves_rel(a, b):
  """``max |a - b| / max |b|`` over the whole tree."""
  diff = max(float(jnp.max(jnp.abs(u - v)))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
  return diff / max(float(jnp.max(jnp.abs(v))) for v in jax.tree.leaves(b))


@pytest.mark.parametrize("method", ["eigh", "denman_beavers", "newton_schulz"])
@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_round_trip(fisher, method):
  params, state, *_ = setup(fisher)
  kw = {} if method == "eigh" else {"num_iters": 60, "tol": "auto"}
  roots = sngd_jax.factor_roots(state, damping=1e-2, method=method, **kw)
  prime = sngd_jax.to_reconstructed(params, roots)
  assert jax.tree.structure(prime) == jax.tree.structure(params)
  assert leaves_rel(prime, params) > 1e-2  # it did change the weights
  back = sngd_jax.from_reconstructed(prime, roots)
  assert leaves_rel(back, params) < 1e-10


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_same_outputs(fisher):
  """Each reconstructed layer maps the captured inputs to the captured outputs, and the
  reconstructed network computes the same loss."""
  params, state, _, x, y, _, acts, _ = setup(fisher)
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  prime = sngd_jax.to_reconstructed(params, roots)
  for path, calls in acts.items():
    p = prime[path]
    z = sngd_jax.reconstructed_dense(calls[0].inputs, p["kernel"], p["bias"],
                                     roots[path].inv_sqrt)
    np.testing.assert_allclose(z, calls[0].outputs, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(reconstructed_loss(prime, roots, x + 1, y), loss_fn(params, x + 1, y),
                             rtol=1e-12)


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_sgd_on_reconstructed_network_is_sngd(fisher):
  """The paper's theorem: grad_W' = G^{-1/2} grad_W~, so one SGD step on W' mapped back
  is the transform's update ``G_rho^{-1} grad`` (same factors, same damping)."""
  params, state, _, x, y, grads, _, updates = setup(fisher)
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  prime = sngd_jax.to_reconstructed(params, roots)
  g_prime = jax.grad(reconstructed_loss)(prime, roots, x + 1, y)
  lr = 0.1
  stepped = jax.tree.map(lambda p, g: p - lr * g, prime, g_prime)
  back = sngd_jax.from_reconstructed(stepped, roots)
  expected = jax.tree.map(lambda p, u: p - lr * u, params, updates)
  delta_got = jax.tree.map(lambda a, b: a - b, back, params)
  delta_ref = jax.tree.map(lambda a, b: a - b, expected, params)
  assert leaves_rel(delta_got, delta_ref) < 1e-8
  del grads


def test_fisher_layer_shapes_and_no_bias():
  inv = jnp.asarray(np.diag([2.0, 3.0, 4.0]))
  out = sngd_jax.fisher_layer(jnp.ones((5, 2)), inv)
  np.testing.assert_allclose(out, np.tile([2.0, 3.0, 4.0], (5, 1)))
  out = sngd_jax.fisher_layer(jnp.ones((5, 3)), jnp.stack([inv, 2 * inv]), bias=False)
  assert out.shape == (5, 2, 3)
  np.testing.assert_allclose(out[:, 1], np.tile([4.0, 6.0, 8.0], (5, 1)))


def test_missing_layer_error():
  params, state, *_ = setup("linear")
  roots = sngd_jax.factor_roots(state, damping=1e-2)
  with pytest.raises(ValueError, match="no kernel"):
    sngd_jax.to_reconstructed({"Dense_0": params["Dense_0"]}, roots)
