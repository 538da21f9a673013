"""The trust region ``max_norm``: ``u <- u min(1, max_norm / ||u||_G)`` against float64 numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_mlp import dense_inputs, grads_and_acts, make_problem, reference_update

import sngd_jax

FEATURES = (7, 5, 3)


pytestmark = pytest.mark.usefixtures("x64")


def _reference(params, x, grads, fisher, damping):
  """Per layer the exact preconditioned update, and ``q = sum_l <g_l, u_l>``."""
  xs, zs = dense_inputs(params, x, FEATURES)
  ups, q = {}, 0.0
  for i in range(len(FEATURES)):
    name = f"Dense_{i}"
    gw, gb = np.asarray(grads[name]["kernel"]), np.asarray(grads[name]["bias"])
    uw, ub = reference_update(xs[i], zs[i], gw, gb, fisher, damping)
    ups[name] = (uw, ub)
    q += float(np.sum(gw * uw) + np.sum(gb * ub))
  return ups, q


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
@pytest.mark.parametrize("fraction", [0.1, 0.7, 1.5])
def test_update_is_scaled_into_the_trust_region(fisher, fraction):
  """``max_norm = fraction * ||u||_G``: scaled by ``fraction`` below 1, untouched above."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  damping = 1e-3
  ups, q = _reference(params, x, grads, fisher, damping)
  assert q > 0
  radius = fraction * np.sqrt(q)
  tx = sngd_jax.sngd(fisher=fisher, damping=damping, decay=0.0, max_norm=radius)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  scale = min(1.0, fraction)  # min(1, max_norm / sqrt(q))
  for name, (uw, ub) in ups.items():
    np.testing.assert_allclose(out[name]["kernel"], scale * uw, rtol=1e-8, atol=1e-13)
    np.testing.assert_allclose(out[name]["bias"], scale * ub, rtol=1e-8, atol=1e-13)
  # ||u'||_G^2 = scale^2 q = scale <g, u'>: the radius itself when clipped.
  g_dot_u = sum(float(np.sum(np.asarray(grads[n]["kernel"]) * np.asarray(out[n]["kernel"]))
                      + np.sum(np.asarray(grads[n]["bias"]) * np.asarray(out[n]["bias"])))
                for n in ups)
  np.testing.assert_allclose(np.sqrt(scale * g_dot_u), min(radius, np.sqrt(q)), rtol=1e-8)


def test_schedule_and_none():
  """A schedule is evaluated at the step count; ``None`` is the plain update."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  ups, q = _reference(params, x, grads, "linear", 1e-3)
  plain = sngd_jax.sngd(damping=1e-3, decay=0.0, max_norm=None)
  out, _ = plain.update(grads, plain.init(params), params, activations=acts)
  np.testing.assert_allclose(out["Dense_1"]["kernel"], ups["Dense_1"][0], rtol=1e-9)
  schedule = optax.linear_schedule(0.25 * np.sqrt(q), 100.0, 10)
  tx = sngd_jax.sngd(damping=1e-3, decay=0.0, max_norm=schedule)
  out, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  np.testing.assert_allclose(out["Dense_1"]["kernel"], 0.25 * ups["Dense_1"][0], rtol=1e-8)


def test_pass_through_leaves_are_not_scaled():
  """Only preconditioned layers are scaled (and only they enter ``q``)."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  params = {**params, "temperature": jnp.ones(())}
  grads = {**grads, "temperature": jnp.full((), 123.0)}
  tx = sngd_jax.sngd(damping=1e-3, decay=0.0, max_norm=1e-6)
  out, _ = tx.update(grads, tx.init(params), params, activations=acts)
  assert float(out["temperature"]) == 123.0
  assert float(jnp.max(jnp.abs(out["Dense_0"]["kernel"]))) < 1e-5


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_bad_max_norm_is_refused(bad):
  with pytest.raises(ValueError, match="max_norm"):
    sngd_jax.sngd(max_norm=bad)


@pytest.mark.parametrize("fraction", [0.3, 1.5])
def test_trust_region_scale_diagnostic(fraction):
  """``trust_region_scale`` gives min(1, max_norm / sqrt(q)) with q from float64 numpy, from
  the update's output (inside a chain) and from the state's cached inverses alike."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  _, q = _reference(params, x, grads, "linear", 1e-3)
  radius = fraction * np.sqrt(q)
  pre = sngd_jax.sngd(damping=1e-3, decay=0.0, max_norm=radius)
  tx = optax.chain(pre, optax.sgd(0.1, momentum=0.9))
  state = tx.init(params)
  u, new_pre = pre.update(grads, state[0], params, activations=acts)
  chain_u, new_state = tx.update(grads, state, params, activations=acts)
  want = min(1.0, fraction)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, new_pre, u), want, rtol=1e-8)
  # The chain's own output (after -lr) is not sngd's: NaN, not a plausible 1.
  assert np.isnan(float(sngd_jax.trust_region_scale(grads, new_state, chain_u)))
  # From the chain's state: the inverses are the ones that update used (decay=0: the
  # next update's factor would be the same batch's).
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, new_state), want, rtol=1e-8)
  plain = sngd_jax.sngd(max_norm=None)
  assert float(sngd_jax.trust_region_scale(grads, plain.init(params))) == 1.0
  with pytest.raises(ValueError, match="SNGDState"):
    sngd_jax.trust_region_scale(grads, optax.sgd(0.1).init(params))


def test_state_with_two_sngd_transforms_is_refused():
  """Two ``sngd`` transforms (one per parameter group, ``optax.multi_transform``): the helpers
  that read one state raise and say how many they found (the diagnostic used to read the first
  silently); the group's own state answers, and equals the state of that group alone."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  labels = {k: ("a" if k == "Dense_0" else "b") for k in params}
  tx = optax.multi_transform({"a": sngd_jax.sngd(max_norm=0.1),
                              "b": sngd_jax.sngd(max_norm=0.1)}, labels)
  state = tx.init(params)
  _, state = tx.update(grads, state, params, activations=acts)
  for read in (lambda s: sngd_jax.trust_region_scale(grads, s),
               sngd_jax.damped_factors, sngd_jax.factor_roots):
    with pytest.raises(ValueError, match="holding 2; pass the one you mean"):
      read(state)
  group_b = state.inner_states["b"].inner_state
  assert set(sngd_jax.damped_factors(group_b)) == {"Dense_1", "Dense_2"}
  alone = sngd_jax.sngd(max_norm=0.1)
  mask = {k: k != "Dense_0" for k in params}
  _, alone_state = optax.masked(alone, mask).update(
      grads, optax.masked(alone, mask).init(params), params, activations=acts)
  for path, g in sngd_jax.damped_factors(alone_state).items():
    np.testing.assert_allclose(g, sngd_jax.damped_factors(group_b)[path], rtol=1e-12)


def test_scale_from_the_state_of_a_stacked_model():
  """Bias-free layers scanned over depth (``stacked={"blocks": 1}``, one local Fisher per layer
  of the stack): ``trust_region_scale(grads, state)`` reads the layers as the transform does.
  It used to discover them without ``stacked`` (a ``(3, 4, 4)`` kernel as one layer of 12
  inputs) and raised a shape error. Reference: ``q`` from float64 numpy, each block's inputs
  computed by hand."""
  import flax.linen as nn

  class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
      return jnp.tanh(nn.Dense(4, use_bias=False, param_dtype=jnp.float64)(h)), None

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                       length=3)(name="blocks")
      h, _ = blocks(x, None)
      return nn.Dense(2, param_dtype=jnp.float64)(h)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 4)))
  y = jnp.arange(16) % 2
  net = Net()
  params = net.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
      net.apply({"params": p}, x), y).mean()
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
  damping = 1e-3
  # float64 numpy: q = sum_l <g_l, (G_l + damping tr(G_l) I)^{-1} g_l>
  def solve(inputs, g):
    gm = inputs.T @ inputs / inputs.shape[0]
    return np.linalg.solve(gm + damping * np.trace(gm) * np.eye(len(gm)), g)
  h, q = np.asarray(x), 0.0
  kernels = np.asarray(params["blocks"]["Dense_0"]["kernel"])
  for i in range(3):
    g = np.asarray(grads["blocks"]["Dense_0"]["kernel"][i])
    q += float(np.sum(g * solve(h, g)))
    h = np.tanh(h @ kernels[i])
  head = np.concatenate([h, np.ones((len(h), 1))], axis=1)
  g = np.concatenate([np.asarray(grads["Dense_0"]["kernel"]),
                      np.asarray(grads["Dense_0"]["bias"])[None]], axis=0)
  q += float(np.sum(g * solve(head, g)))
  radius = 0.3 * np.sqrt(q)
  pre = sngd_jax.sngd(stacked={"blocks": 1}, damping=damping, decay=0.0, max_norm=radius)
  u, state = pre.update(grads, pre.init(params), params, activations=acts)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state, u), 0.3, rtol=1e-8)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state), 0.3, rtol=1e-8)



def test_the_injected_max_norm_of_another_transform_is_not_sngds():
  """``trust_region_scale`` reads an injected radius from the ``inject_hyperparams`` state
  around the SNGD state only. An injected ``clip_by_global_norm`` has a ``max_norm`` too: with
  SNGD's trust region off its radius was taken for SNGD's (scale 0.3 for 1), and with SNGD's
  own injected as well the two made the lookup give up (scale 1 for 0.3). Reference: the
  float64 ``q``, radius ``0.3 sqrt(q)``."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  _, q = _reference(params, x, grads, "linear", 1e-3)
  radius = 0.3 * np.sqrt(q)
  clip = lambda r: optax.inject_hyperparams(optax.clip_by_global_norm)(max_norm=r)
  off = optax.chain(clip(radius), sngd_jax.sngd_momentum(0.1, max_norm=None, damping=1e-3,
                                                         decay=0.0))
  _, state = off.update(grads, off.init(params), params, activations=acts)
  assert float(sngd_jax.trust_region_scale(grads, state)) == 1.0
  both = optax.chain(clip(1e3), optax.inject_hyperparams(sngd_jax.sngd_momentum)(
      learning_rate=0.1, max_norm=radius, damping=1e-3, decay=0.0))
  _, state = both.update(grads, both.init(params), params, activations=acts)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state), 0.3, rtol=1e-6)

def test_scale_and_damping_of_an_injected_state():
  """Under ``optax.inject_hyperparams`` the SNGD state records ``max_norm`` and ``damping`` as
  None: ``trust_region_scale`` and ``damped_factors`` read the injected values from the
  whole state (the scale was a silent 1, the damping an error), equal to passing them."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  _, q = _reference(params, x, grads, "linear", 1e-3)
  radius = 0.3 * np.sqrt(q)
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum)(
      learning_rate=0.1, max_norm=radius, damping=1e-3, decay=0.0)
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state), 0.3, rtol=1e-6)
  explicit = sngd_jax.trust_region_scale(grads, state, max_norm=radius)
  np.testing.assert_allclose(sngd_jax.trust_region_scale(grads, state), explicit, rtol=0)
  got = sngd_jax.damped_factors(state)
  want = sngd_jax.damped_factors(state, damping=1e-3)
  for path in want:
    np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]))
