"""Faults and degenerate inputs: skipped steps, failed refreshes, finite outputs.

References: a skipped step must leave every state leaf bitwise equal to the
input state and emit exact zeros; a rejected refresh must leave the previous
inverse bitwise (or the identity); all outputs on finite inputs are checked
with ``np.isfinite``; the preconditioned update after a clean refresh is
compared with the float64 formula ``(G + (damping tr G + abs) I)^{-1} g``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from exact import exact_sngd
from np_reference import all_finite

import sngd_jax
from sngd_jax import Captured
from sngd_jax import inverse as matfun
from sngd_jax import inverse as methods
from sngd_jax._src import statistics
from sngd_jax._src.inverse import refresh as refresh_lib


class MLP(nn.Module):
  hidden_bias_init: float = 0.0

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(6, bias_init=nn.initializers.constant(self.hidden_bias_init))(x))
    return nn.Dense(3)(x)


def _setup(hidden_bias_init=0.0, **sngd_kwargs):
  model = MLP(hidden_bias_init)
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 4))
  y = jnp.arange(16) % 3
  params = model.init(jax.random.PRNGKey(1), x)["params"]

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y).mean()

  grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)
  kwargs = dict(inverse_every=1)
  kwargs.update(sngd_kwargs)
  tx = exact_sngd(**kwargs)
  return model, params, grad_fn, tx, x, y


def _leaves_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(la) == len(lb)
  return all(np.array_equal(np.asarray(u), np.asarray(v), equal_nan=True)
             for u, v in zip(la, lb, strict=True))


@pytest.mark.parametrize("fault,jit", [("nan_grad", False), ("nan_grad", True),
                                       ("inf_grad", True), ("inf_act", False), ("inf_act", True),
                                       ("nan_output", True)])
def test_nonfinite_step_is_skipped(fault, jit):
  _, params, grad_fn, tx, x, y = _setup()
  state = tx.init(params)
  (_, acts), grads = grad_fn(params, x, y)
  # One clean step first, so the state holds non-trivial factors and inverses.
  _, state = tx.update(grads, state, params, activations=acts)
  if fault == "nan_grad":
    grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  elif fault == "inf_grad":
    grads["Dense_1"]["bias"] = grads["Dense_1"]["bias"].at[0].set(jnp.inf)
  elif fault == "inf_act":
    call = acts["Dense_1"][0]
    acts = {**acts, "Dense_1": (call.replace(inputs=call.inputs.at[3, 2].set(jnp.inf)),)}
  else:
    call = acts["Dense_0"][0]
    acts = {**acts, "Dense_0": (call.replace(outputs=call.outputs.at[0, 0].set(jnp.nan)),)}
  update = jax.jit(tx.update) if jit else tx.update
  updates, new_state = update(grads, state, params, activations=acts)
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(np.asarray(u), 0.0)
  assert int(new_state.num_skipped_steps) == 1
  assert int(new_state.count) == int(state.count) == 1
  assert _leaves_equal(new_state._replace(num_skipped_steps=state.num_skipped_steps), state)


def test_activations_are_checked_on_factor_steps_only():
  """Between factor updates the activations are not read: a non-finite one changes nothing.

  On the factor step the same activations skip the step (statistics untouched).
  """
  _, params, grad_fn, tx, x, y = _setup(factor_every=2)
  (_, acts), grads = grad_fn(params, x, y)
  call = acts["Dense_1"][0]
  bad = {**acts, "Dense_1": (call.replace(inputs=call.inputs.at[3, 2].set(jnp.nan)),)}
  update = jax.jit(tx.update)
  _, state = update(grads, tx.init(params), params, activations=acts)  # count 0: factor step
  want, want_state = update(grads, state, params, activations=acts)  # count 1: no factors
  got, got_state = update(grads, state, params, activations=bad)
  assert int(got_state.num_skipped_steps) == 0 and int(got_state.count) == 2
  assert _leaves_equal(got, want) and _leaves_equal(got_state, want_state)
  skipped, skipped_state = update(grads, got_state, params, activations=bad)  # factor step
  assert int(skipped_state.num_skipped_steps) == 1 and int(skipped_state.count) == 2
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(skipped))
  assert _leaves_equal(skipped_state.factors, got_state.factors)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "inf-inf"])
def test_nonfinite_gradient_of_a_leaf_without_layer_skips_the_step(bad):
  """Leaves that are not preconditioned pass through; a non-finite one still skips the step."""
  _, params, grad_fn, tx, x, y = _setup()
  (_, acts), grads = grad_fn(params, x, y)
  params = {**params, "temperature": jnp.ones((3,))}
  grads = {**grads, "temperature": jnp.array([1.0, np.inf, -np.inf]) if bad == "inf-inf"
           else jnp.array([1.0, bad, 2.0])}
  state = tx.init(params)
  updates, new_state = jax.jit(tx.update)(grads, state, params, activations=acts)
  assert int(new_state.num_skipped_steps) == 1 and int(new_state.count) == 0
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates))
  assert _leaves_equal(new_state._replace(num_skipped_steps=state.num_skipped_steps), state)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_tree_all_finite_matches_numpy(dtype):
  """The sum-based check agrees with np.isfinite on every placement of NaN/inf."""
  from sngd_jax._src.transform import tree_all_finite as _tree_all_finite
  rng = np.random.default_rng(0)
  base = rng.standard_normal((5, 7)).astype(np.float32)
  cases = [base]
  for value in (np.nan, np.inf, -np.inf):
    for idx in ((0, 0), (4, 6), (2, 3)):
      bad = base.copy()
      bad[idx] = value
      cases.append(bad)
  both = base.copy()
  both[0, 0], both[1, 1] = np.inf, -np.inf
  cases.append(both)
  for case in cases:
    tree = {"a": jnp.asarray(case, dtype), "ids": jnp.arange(3), "b": jnp.ones((2,), dtype)}
    assert bool(_tree_all_finite(tree)) == bool(np.all(np.isfinite(case)))
  assert bool(_tree_all_finite({"ids": jnp.arange(3)}))


def test_tree_all_finite_sums_float64_leaves_in_float64():
  from sngd_jax._src.transform import tree_all_finite as _tree_all_finite
  with jax.enable_x64(True):
    huge = jnp.full((4,), 1e300, jnp.float64)  # finite in float64, inf once cast to float32
    assert bool(_tree_all_finite({"a": huge}))
    assert not bool(_tree_all_finite({"a": huge.at[1].set(jnp.nan)}))


def test_tree_all_finite_sums_float16_in_float32_and_complex_in_its_own_dtype():
  """Each leaf is summed in ``dtypes.compute_dtype`` of its dtype: float16 in float32 (two
  6e4 entries overflow float16's 65504, not float32); a complex leaf (a layer left to the
  next transform) in its own dtype, so a NaN in its imaginary part is caught, under strict
  dtype promotion too."""
  from sngd_jax._src.transform import tree_all_finite as _tree_all_finite
  assert bool(_tree_all_finite({"h": jnp.full((2,), 6e4, jnp.float16)}))
  assert not bool(_tree_all_finite({"h": jnp.array([np.inf, 1.0], jnp.float16)}))
  with jax.enable_x64(True), jax.numpy_dtype_promotion("strict"):
    c = jnp.array([1 + 1j, complex(1.0, np.nan)], jnp.complex128)
    assert not bool(_tree_all_finite({"c": c, "ids": jnp.arange(3)}))
    assert bool(_tree_all_finite({"c": c.real.astype(jnp.complex128), "ids": jnp.arange(3)}))


def test_skipped_steps_do_not_shift_the_refresh_schedule():
  _, params, grad_fn, tx, x, y = _setup(inverse_every=2)
  state = tx.init(params)
  (_, acts), grads = grad_fn(params, x, y)
  bad = jax.tree.map(lambda g: g * jnp.nan, grads)
  update = jax.jit(tx.update)
  for _ in range(3):
    _, state = update(bad, state, params, activations=acts)
  assert int(state.count) == 0 and not bool(state.has_inverse)
  _, state = update(grads, state, params, activations=acts)
  assert int(state.count) == 1 and bool(state.has_inverse)
  assert int(state.num_skipped_steps) == 3


def test_composes_with_apply_if_finite():
  """apply_if_finite rejects NaN gradients first; once it gives up, sngd still skips them."""
  _, params, grad_fn, _, x, y = _setup()
  tx = optax.apply_if_finite(
      optax.chain(exact_sngd(inverse_every=1), optax.sgd(0.1, momentum=0.9)),
      max_consecutive_errors=2)
  state = tx.init(params)
  update = jax.jit(tx.update)
  (_, acts), grads = grad_fn(params, x, y)
  updates, state = update(grads, state, params, activations=acts)
  params = optax.apply_updates(params, updates)
  bad = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads)
  for step in range(4):
    inner_before = state.inner_state
    updates, state = update(bad, state, params, activations=acts)
    assert all_finite(updates)
    params = optax.apply_updates(params, updates)
    sngd_state = state.inner_state[0]
    if step < 2:  # rejected by apply_if_finite: the inner state is untouched
      assert _leaves_equal(state.inner_state, inner_before)
      assert int(sngd_state.num_skipped_steps) == 0
    else:  # apply_if_finite gave up: sngd skips the step itself
      assert int(sngd_state.num_skipped_steps) == step - 1
  assert int(state.total_notfinite) == 4
  assert all_finite(params) and all_finite(state)
  # Without sngd, apply_if_finite gives up and writes the NaN into the params.
  plain = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=2)
  plain_state, p = plain.init(params), params
  for _ in range(3):
    u, plain_state = plain.update(bad, plain_state, p)
    p = optax.apply_updates(p, u)
  assert not all_finite(p)



def test_apply_if_finite_does_not_see_a_step_sngd_skips_for_its_activations():
  """``apply_if_finite`` checks the gradients only: on a factor step whose activations hold a
  NaN (gradients finite), SNGD skips and returns zeros, and the momentum after it still moves
  the params by ``-lr * 0.9 * trace`` with ``total_notfinite`` 0 (docs/reliability.md said
  the wrap made every bad step a full no-op). The recipe of docs/reliability.md (keep the old
  params and base state when ``num_skipped_steps`` moves) is a no-op there."""
  _, params, grad_fn, _, x, y = _setup()
  lr = 0.1
  inner = optax.chain(exact_sngd(inverse_every=1, factor_every=1), optax.sgd(lr, momentum=0.9))
  tx = optax.apply_if_finite(inner, 3)
  state = tx.init(params)
  (_, acts), grads = grad_fn(params, x, y)
  updates, state = tx.update(grads, state, params, activations=acts)
  params = optax.apply_updates(params, updates)
  (_, acts), grads = grad_fn(params, x, y)
  bad = {**acts, "Dense_1": tuple(c.replace(inputs=c.inputs.at[0, 0].set(jnp.nan))
                                  for c in acts["Dense_1"])}
  assert all_finite(grads)
  trace = state.inner_state[1][0].trace
  updates, new_state = tx.update(grads, state, params, activations=bad)
  assert int(new_state.total_notfinite) == 0
  assert int(new_state.inner_state[0].num_skipped_steps) == 1
  for u, t in zip(jax.tree.leaves(updates), jax.tree.leaves(trace), strict=True):
    np.testing.assert_allclose(u, -lr * 0.9 * t, rtol=1e-6)
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) > 1e-3

  inner_state = state.inner_state  # the recipe, on the plain chain
  new_updates, new_inner = inner.update(grads, inner_state, params, activations=bad)
  skipped = new_inner[0].num_skipped_steps > inner_state[0].num_skipped_steps
  keep_old = lambda new, old: jax.tree.map(lambda n, o: jnp.where(skipped, o, n), new, old)
  kept = keep_old(optax.apply_updates(params, new_updates), params)
  assert _leaves_equal(kept, params)
  assert _leaves_equal(keep_old(new_inner[1:], inner_state[1:]), inner_state[1:])

def _single_layer_update(x, fisher, prior, bias, zshift=0.0, steps=2, decay=0.995,
                         abs_damping=0.0, jit=False):
  """Runs `steps` updates of one Dense layer (kernel, optional bias) on activations `x`.

  With `bias="both"` the tree holds two layers, `with_bias` and `no_bias`, fed the
  same inputs (one compile covers both).
  """
  d_in = _D if x is None else x.shape[-1]
  k = jax.random.normal(jax.random.PRNGKey(2), (d_in, 3))
  names = {True: ["Dense_0"], False: ["Dense_0"], "both": ["with_bias", "no_bias"]}[bias]
  params = {name: {"kernel": k} for name in names}
  if bias is True or bias == "both":
    params[names[0]]["bias"] = jnp.zeros(3)
  tx = exact_sngd(fisher=fisher, prior=prior, decay=decay, inverse_every=1,
                     abs_damping=abs_damping, damping=1e-4)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)

  def run(x, zshift):
    state = tx.init(params)
    acts = {name: (Captured(x, x @ k + zshift),) for name in names}
    for _ in range(steps):
      updates, state = tx.update(grads, state, params, activations=acts)
    return updates, state

  run = jax.jit(run) if jit else run
  return run(x, zshift) if x is not None else run


_N, _D = 12, 5
_R = np.random.default_rng(0).standard_normal((_N, _D)).astype(np.float32)
DEGENERATE = {
    "zeros": np.zeros((_N, _D), np.float32),
    "constant": np.full((_N, _D), 3.0, np.float32),
    "rank_one": np.outer(np.arange(_N), np.ones(_D)).astype(np.float32),
    "duplicate_column": np.concatenate([_R[:, :3], _R[:, :2]], axis=1),
    "scale_1e6": 1e6 * _R,
    "scale_1e-6": 1e-6 * _R,
    "one_row_repeated": np.repeat(_R[:1], _N, axis=0),
}


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
@pytest.mark.parametrize("prior", ["scaled_identity", "identity", "none"])
def test_finite_inputs_give_finite_outputs(fisher, prior):
  """Degenerate but finite activations never produce a non-finite update or state."""
  run = _single_layer_update(None, fisher, prior, "both", jit=True)
  for name, x in DEGENERATE.items():
    for zshift in ([0.0, -200.0] if fisher == "rfim" else [0.0]):  # -200: dead units
      updates, state = run(jnp.asarray(x), zshift)
      assert all_finite(updates) and all_finite(state), (name, zshift)
      assert int(state.num_skipped_steps) == 0, (name, zshift)
      assert int(state.count) == 2


def test_dead_relu_layer_and_constant_inputs_in_a_model():
  """A hidden layer with all units dead (bias -100) and constant inputs train finitely."""
  model, params, grad_fn, _, x, y = _setup(hidden_bias_init=-100.0)
  x = jnp.ones_like(x) * 2.0
  for fisher, prior in (("linear", "none"), ("rfim", "scaled_identity"), ("rfim", "none")):
    if True:
      tx = optax.chain(exact_sngd(fisher=fisher, prior=prior, inverse_every=2), optax.sgd(0.1))
      @jax.jit
      def train(p, tx=tx):
        state = tx.init(p)
        for _ in range(4):
          (_, acts), grads = grad_fn(p, x, y)
          updates, state = tx.update(grads, state, p, activations=acts)
          p = optax.apply_updates(p, updates)
        return p, state

      p, state = train(params)
      assert all_finite(p) and all_finite(state), (fisher, prior)
      assert int(state[0].num_skipped_steps) == 0


def test_zero_factor_prior_none_fails_cleanly_and_keeps_identity():
  """G = 0, prior none, abs_damping 0: the damped matrix is 0; the refresh fails, I is kept."""
  x = jnp.zeros((8, 4))
  updates, state = _single_layer_update(x, "linear", "none", bias=False, steps=1)
  assert int(state.num_refresh_failures) == 1
  np.testing.assert_array_equal(np.asarray(state.inverses["Dense_0"][0]), np.eye(4))
  np.testing.assert_array_equal(np.asarray(updates["Dense_0"]["kernel"]), 0.5)  # identity
  assert bool(state.has_inverse)


def test_zero_factor_with_abs_damping_is_fine():
  updates, state = _single_layer_update(jnp.zeros((8, 4)), "linear", "none", bias=False,
                                        steps=1, abs_damping=0.5)
  assert int(state.num_refresh_failures) == 0
  np.testing.assert_allclose(np.asarray(updates["Dense_0"]["kernel"]), 1.0, rtol=1e-6)


def _linear_params_and_acts(seed=0, n=16, d_in=4, d_out=3):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d_in)).astype(np.float32)
  k = rng.standard_normal((d_in, d_out)).astype(np.float32)
  params = {"Dense_0": {"kernel": jnp.asarray(k), "bias": jnp.zeros(d_out)}}
  acts = {"Dense_0": (Captured(jnp.asarray(x), jnp.asarray(x @ k)),)}
  grads = {"Dense_0": {"kernel": jnp.asarray(rng.standard_normal((d_in, d_out)), jnp.float32),
                       "bias": jnp.asarray(rng.standard_normal(d_out), jnp.float32)}}
  return params, acts, grads, x


def test_poisoned_factor_keeps_last_good_inverse():
  """A NaN factor (crafted state) makes the refresh fail; the last good inverse stays."""
  params, acts, grads, x = _linear_params_and_acts()
  tx = exact_sngd(inverse_every=1, decay=0.0, factor_every=1000)  # factors only at step 0
  state = tx.init(params)
  _, state = tx.update(grads, state, params, activations=acts)
  good = np.asarray(state.inverses["Dense_0"])
  poisoned = state._replace(factors={"Dense_0": state.factors["Dense_0"].at[1, 1].set(jnp.nan)})
  updates, new_state = tx.update(grads, poisoned, params, activations=acts)
  assert int(new_state.num_refresh_failures) == 1
  np.testing.assert_array_equal(np.asarray(new_state.inverses["Dense_0"]), good)
  # The update used the last good inverse: (G + 1e-4 tr(G) I)^{-1} g in float64.
  xt = np.concatenate([x, np.ones((x.shape[0], 1))], 1).astype(np.float64)
  g = xt.T @ xt / x.shape[0]
  a = g + 1e-4 * np.trace(g) * np.eye(g.shape[0])
  gw = np.concatenate([np.asarray(grads["Dense_0"]["kernel"]),
                       np.asarray(grads["Dense_0"]["bias"])[None]]).astype(np.float64)
  want = np.linalg.solve(a, gw)
  got = np.concatenate([np.asarray(updates["Dense_0"]["kernel"]),
                        np.asarray(updates["Dense_0"]["bias"])[None]])
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


def _method_returning(bad_rep_fn):
  base = methods.METHODS["cholesky"]

  def refresh(g, shift):
    rep, ok = base.refresh(g, shift)
    return bad_rep_fn(rep), ok

  return matfun.InverseMethod(base.identity, refresh, base.apply)


@pytest.mark.parametrize("corruption", ["nan", "huge", "negative", "reported_failure"])
def test_inaccurate_refresh_is_rejected(corruption):
  """A method whose refresh is non-finite, unbounded or indefinite keeps the old inverse."""
  if corruption == "reported_failure":
    base = methods.METHODS["cholesky"]
    method = matfun.InverseMethod(
        base.identity, lambda g, shift: (base.refresh(g, shift)[0], jnp.zeros(g.shape[0], bool)),
        base.apply)
  else:
    bad = {"nan": lambda r: r * jnp.nan, "huge": lambda r: r * 1e12,
           "negative": lambda r: -r}[corruption]
    method = _method_returning(bad)
  params, acts, grads, _ = _linear_params_and_acts()
  tx = exact_sngd(inverse_every=1, inverse=method)
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(3):
    updates, state = update(grads, state, params, activations=acts)
    assert int(state.num_refresh_failures) == step + 1
    np.testing.assert_array_equal(np.asarray(state.inverses["Dense_0"][0]), np.eye(5))
    np.testing.assert_array_equal(np.asarray(updates["Dense_0"]["kernel"]),
                                  np.asarray(grads["Dense_0"]["kernel"]))


def test_refresh_failures_counted_per_block_rfim():
  """rfim: only the dead unit's block fails; live units get their own inverse."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((16, 4)).astype(np.float32)
  z = np.full((16, 3), 5.0, np.float32)
  z[:, 1] = -200.0  # unit 1 is dead: sigmoid(z)^2 underflows to 0, G_1 = 0
  params = {"Dense_0": {"kernel": jnp.ones((4, 3))}}
  tx = exact_sngd(fisher="rfim", inverse_every=1, prior="none")
  state = tx.init(params)
  acts = {"Dense_0": (Captured(jnp.asarray(x), jnp.asarray(z)),)}
  _, state = tx.update(params, state, params, activations=acts)
  assert int(state.num_refresh_failures) == 1
  inv = np.asarray(state.inverses["Dense_0"])
  np.testing.assert_array_equal(inv[1], np.eye(4))
  s2 = (1.0 / (1.0 + np.exp(-5.0))) ** 2
  g = s2 * x.astype(np.float64).T @ x / 16
  want = np.linalg.inv(g + 1e-4 * np.trace(g) * np.eye(4))
  np.testing.assert_allclose(inv[0], want, rtol=1e-3, atol=1e-3 * np.abs(want).max())


def _float16_overflow_step():
  """``(params, grads, acts)``: float16, inputs of scale 1e-3, so ``G^{-1} g ~ 1e6``."""
  x = (1e-3 * _R).astype(np.float16)
  k = jnp.ones((_D, 2), jnp.float16)
  params = {"Dense_0": {"kernel": k}}
  acts = {"Dense_0": (Captured(jnp.asarray(x), jnp.asarray(x) @ k),)}
  grads = {"Dense_0": {"kernel": jnp.full((_D, 2), 100.0, jnp.float16)}}
  return params, grads, acts


def test_overflowing_update_is_skipped():
  """float16 params with inputs of scale 1e-3: G^{-1} g ~ 1e6 overflows float16 -> skipped.

  The update is zero and counted; the statistics of the step were finite and are kept
  (the same as a step with a normal update: checked against a float32 run).
  """
  params, grads, acts = _float16_overflow_step()
  tx = exact_sngd(inverse_every=1)
  state = tx.init(params)
  updates, new_state = tx.update(grads, state, params, activations=acts)
  assert int(new_state.num_skipped_steps) == 1
  np.testing.assert_array_equal(np.asarray(updates["Dense_0"]["kernel"]), 0.0)
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(new_state))
  # The same step in float32 does not overflow; its statistics are the kept ones.
  params32 = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  acts32 = jax.tree.map(lambda a: a.astype(jnp.float32), acts)
  grads32 = jax.tree.map(lambda a: a.astype(jnp.float32), grads)
  updates32, state32 = tx.update(grads32, tx.init(params32), params32, activations=acts32)
  assert bool(jnp.all(jnp.isfinite(updates32["Dense_0"]["kernel"])))
  assert int(state32.num_skipped_steps) == 0
  assert int(new_state.count) == int(state32.count) == 1
  np.testing.assert_allclose(np.asarray(new_state.factors["Dense_0"]),
                             np.asarray(state32.factors["Dense_0"]), rtol=1e-3)


def test_trust_region_keeps_the_overflowing_step_finite():
  """The same float16 step with the default trust region: scaled before the cast, so taken."""
  params, grads, acts = _float16_overflow_step()
  tx = sngd_jax.sngd(inverse_every=1)  # max_norm=1.0
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  u = np.asarray(updates["Dense_0"]["kernel"], np.float32)
  assert int(state.num_skipped_steps) == 0
  assert np.all(np.isfinite(u)) and np.any(u != 0)


def test_accept_refresh_bounds():
  """Direct check of the acceptance rule on hand-made blocks."""
  a = jnp.asarray(np.diag([1.0, 2.0, 4.0]).astype(np.float32))[None].repeat(4, 0)
  inv = jnp.linalg.inv(a)
  shift = jnp.array([0.5, 0.5, 0.0, jnp.inf])
  apply = methods.METHODS["cholesky"].apply
  ok = refresh_lib.accept_refresh(apply, inv, a, shift, jnp.ones(4, bool))
  np.testing.assert_array_equal(np.asarray(ok), [True, True, False, False])
  # ||A^{-1} v|| <= 2 / s is violated once s is large: the inverse is then wrong for A.
  ok = refresh_lib.accept_refresh(apply, inv, a, jnp.full(4, 3.0), jnp.ones(4, bool))
  np.testing.assert_array_equal(np.asarray(ok), [False] * 4)
  ok = refresh_lib.accept_refresh(apply, -inv, a, jnp.full(4, 0.5), jnp.ones(4, bool))
  np.testing.assert_array_equal(np.asarray(ok), [False] * 4)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_accept_refresh_rejects_one_nonfinite_entry(bad):
  """One NaN or Inf anywhere in a representation the method reported fine: that block is
  rejected (the test has no pass over the representation; the probe's product carries it).

  Dense inverses: every position of one block in turn (the others stay accepted); a
  Nystrom model: one entry of ``U``, of ``lam`` and ``tau``.
  """
  d = 4
  a = jnp.asarray(np.diag([1.0, 2.0, 4.0, 8.0]).astype(np.float32))[None].repeat(2, 0)
  inv = jnp.linalg.inv(a)
  apply = methods.METHODS["cholesky"].apply
  shift = jnp.full(2, 0.5)
  for i in range(d):
    for j in range(d):
      ok = refresh_lib.accept_refresh(apply, inv.at[1, i, j].set(bad), a, shift,
                                      jnp.ones(2, bool))
      np.testing.assert_array_equal(np.asarray(ok), [True, False], err_msg=f"{i},{j}")
  method = methods.nystrom(rank=2)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((32, d)).astype(np.float32)
  g = jnp.asarray(x.T @ x / 32)[None].repeat(2, 0)
  rep, reported = method.refresh(g, jnp.full(2, 0.1))
  assert bool(jnp.all(reported))
  assert np.asarray(refresh_lib.accept_refresh(method.apply, rep, g, jnp.full(2, 0.1),
                                               reported)).all()
  leaves, treedef = jax.tree.flatten(rep)
  for k, leaf in enumerate(leaves):
    for index in np.ndindex(leaf.shape[1:]):
      broken = list(leaves)
      broken[k] = leaf.at[(1,) + index].set(bad)
      ok = refresh_lib.accept_refresh(method.apply, jax.tree.unflatten(treedef, broken), g,
                                      jnp.full(2, 0.1), reported)
      np.testing.assert_array_equal(np.asarray(ok), [True, False], err_msg=f"{k},{index}")


def test_limit_outlier_matches_formula():
  rng = np.random.default_rng(3)
  m = rng.standard_normal((5, 5))
  g_run = (m @ m.T).astype(np.float32)
  weight = np.float32(0.5)
  est = (1e6 * g_run).astype(np.float32)
  out = np.asarray(statistics.limit_outlier(jnp.asarray(est), jnp.asarray(g_run),
                                            jnp.asarray(weight), 100.0))
  running_trace = np.trace(g_run.astype(np.float64)) / 0.5
  np.testing.assert_allclose(np.trace(out.astype(np.float64)), 100.0 * running_trace, rtol=1e-5)
  np.testing.assert_allclose(out / np.trace(out), est / np.trace(est), rtol=1e-5, atol=1e-8)
  # In range, before the first update (w = 0), or from a zero factor: unchanged.
  small = 50.0 * g_run
  for factor, w, e in [(g_run, weight, small), (0 * g_run, np.float32(0), est),
                       (0 * g_run, np.float32(1), est)]:
    np.testing.assert_array_equal(
        np.asarray(statistics.limit_outlier(jnp.asarray(e), jnp.asarray(factor),
                                            jnp.asarray(w), 100.0)), e)


def test_max_factor_ratio_guards_the_average_against_an_outlier_batch():
  """One batch of scale 1e6 freezes the layer without the guard, not with it."""
  params, acts, grads, x = _linear_params_and_acts()
  big = {"Dense_0": (Captured(acts["Dense_0"][0].inputs * 1e6, acts["Dense_0"][0].outputs),)}
  norms = {}
  for ratio in (None, 100.0):
    tx = exact_sngd(inverse_every=1, max_factor_ratio=ratio)
    state, update = tx.init(params), jax.jit(tx.update)
    for a in (acts, acts, big, acts):
      updates, state = update(grads, state, params, activations=a)
    assert all_finite(updates) and all_finite(state)
    norms[ratio] = float(jnp.linalg.norm(updates["Dense_0"]["kernel"]))
  tx = exact_sngd(inverse_every=1)
  state, update = tx.init(params), jax.jit(tx.update)
  for a in (acts, acts, acts):
    clean, state = update(grads, state, params, activations=a)
  clean_norm = float(jnp.linalg.norm(clean["Dense_0"]["kernel"]))
  assert norms[None] < 1e-6 * clean_norm  # frozen: the EMA holds 0.005 * 1e12 G
  assert norms[100.0] > 1e-2 * clean_norm


OVERFLOW_CASES = {  # (fisher, inverse): dense, per-unit and sketched factors
    "linear": ("linear", "cholesky"),
    "rfim": ("rfim", "cholesky"),
    "sketch": ("linear", methods.nystrom(rank=3)),  # d = 5 > 3: the factor is a sketch
    "newton_schulz": ("linear", "newton_schulz"),
}


@pytest.mark.parametrize("case", sorted(OVERFLOW_CASES))
def test_overflowing_batch_is_skipped_and_training_resumes(case):
  """Finite inputs of scale 1e20: x~^T x~ overflows float32, so the batch is skipped.

  Reference: the same run without the faulty batch. The skipped step leaves the state bitwise
  (but for the counter) and plain SGD adds a zero update, so every later step, loss and param
  equals the clean run's, bit for bit; training goes on and no refresh fails.
  """
  fisher, inverse = OVERFLOW_CASES[case]
  _, params, grad_fn, _, x, y = _setup()
  tx = optax.chain(sngd_jax.sngd(fisher=fisher, inverse=inverse, inverse_every=2,
                                 factor_every=1), optax.sgd(0.1))

  @jax.jit
  def step(params, state, x):
    (loss, acts), grads = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  def run(fault_at):
    p, state, losses, states = params, tx.init(params), [], []
    for t in range(12):
      p, state, loss = step(p, state, x * 1e20 if t == fault_at else x)
      losses.append(float(loss))
      states.append(state[0])
    return p, losses, states

  clean_params, clean_losses, clean_states = run(fault_at=None)
  params_f, losses, states = run(fault_at=4)
  assert int(states[4].num_skipped_steps) == 1
  assert _leaves_equal(states[4]._replace(num_skipped_steps=states[3].num_skipped_steps),
                       states[3])
  assert all(all_finite(s) for s in states)
  assert int(states[-1].num_refresh_failures) == 0
  # After the fault the run is the clean run one step behind.
  assert losses[5:] == clean_losses[4:-1]
  assert _leaves_equal(states[-1].factors, clean_states[-2].factors)
  assert losses[-1] < losses[3] < losses[0]
  assert all_finite(params_f)


def _training_run(tx, batches, params, grad_fn, y, state=None):
  """Runs ``tx`` (a chain whose first element is sngd) over ``batches``; returns the
  losses and the sngd state after every step."""
  @jax.jit
  def step(params, state, x):
    (loss, acts), grads = grad_fn(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  state = tx.init(params) if state is None else state
  losses, states = [], []
  for x in batches:
    params, state, loss = step(params, state, x)
    losses.append(float(loss))
    states.append(state)
  return losses, states


@pytest.mark.parametrize("fault", ["nan_grads", "inf_activation", "scale_1e20", "zero_batch"])
def test_training_resumes_after_each_fault(fault):
  """After any fault the loss falls again within a few steps, and no refresh fails.

  A skipped fault (the first three) leaves the run one step behind the clean run, bit for
  bit (plain SGD adds nothing on a zero update). An all-zero batch is finite and taken: its
  statistics (only the bias entry) enter the average, and training goes on from there.
  """
  _, params, grad_fn, _, x, y = _setup()
  tx = optax.chain(sngd_jax.sngd(inverse_every=2, factor_every=1), optax.sgd(0.1))
  if fault == "nan_grads":
    def grad_with_fault(p, xb, yb):
      out, grads = grad_fn(p, xb, yb)
      bad = jnp.any(jnp.isnan(xb))  # the faulty batch is marked by a NaN in its last column
      grads = jax.tree.map(lambda g: jnp.where(bad, g.at[(0,) * g.ndim].set(jnp.nan), g), grads)
      return out, grads
    faulty, run_grad = x.at[:, -1].set(jnp.nan), grad_with_fault
    x_clean = x
  elif fault == "inf_activation":
    def grad_with_fault(p, xb, yb):
      (loss, acts), grads = grad_fn(p, xb, yb)
      call = acts["Dense_1"][0]
      bad = jnp.all(xb == 7.0)
      acts = {**acts, "Dense_1": (call.replace(inputs=jnp.where(
          bad, call.inputs.at[0, 0].set(jnp.inf), call.inputs)),)}
      return (loss, acts), grads
    faulty, run_grad, x_clean = jnp.full_like(x, 7.0), grad_with_fault, x
  else:
    faulty = x * 1e20 if fault == "scale_1e20" else jnp.zeros_like(x)
    run_grad, x_clean = grad_fn, x
  batches = [x_clean] * 4 + [faulty] + [x_clean] * 7
  losses, states = _training_run(tx, batches, params, run_grad, y)
  clean_losses, clean_states = _training_run(tx, [x_clean] * 12, params, run_grad, y)
  sngd_states = [s[0] for s in states]
  assert all(all_finite(s) for s in states)
  assert int(sngd_states[-1].num_refresh_failures) == 0
  skipped = int(sngd_states[-1].num_skipped_steps)
  if fault == "zero_batch":
    assert skipped == 0
    assert losses[-1] < losses[5] and losses[-1] < clean_losses[3]
  else:
    assert skipped == 1 and int(sngd_states[4].count) == 4
    assert losses[5:] == clean_losses[4:-1]
  # Falls within a few steps: three steps after the fault it is below the loss before it.
  assert losses[8] < losses[3]


@pytest.mark.parametrize("poison", [np.inf, np.nan])
@pytest.mark.parametrize("fisher,inverse", [("linear", "cholesky"), ("rfim", "cholesky"),
                                            ("linear", methods.nystrom(rank=3))])
def test_poisoned_factor_restarts_from_the_prior(poison, fisher, inverse):
  """A state whose factor is not finite (e.g. restored from a run of an older version, in
  which a 1e20 batch wrote Inf into it) restarts that layer's average from the prior.

  Reference: the restarted factor equals, bit for bit, the first update of a fresh state
  from the same batch; the restart is counted once per block in ``num_refresh_failures``;
  the other layer is untouched; refreshes succeed afterwards and the loss falls.
  """
  _, params, grad_fn, _, x, y = _setup()
  tx = optax.chain(sngd_jax.sngd(fisher=fisher, inverse=inverse, inverse_every=2,
                                 factor_every=1), optax.sgd(0.1))
  _, states = _training_run(tx, [x] * 3, params, grad_fn, y)
  state = states[-1]
  sngd_state = state[0]
  poisoned = jax.tree.map(lambda f: f.at[(0,) * f.ndim].set(poison),
                          sngd_state.factors["Dense_0"])
  sngd_state = sngd_state._replace(factors={**sngd_state.factors, "Dense_0": poisoned})
  state = (sngd_state,) + tuple(state[1:])
  losses, states = _training_run(tx, [x] * 6, params, grad_fn, y, state=state)
  after = [s[0] for s in states]
  blocks = 6 if fisher == "rfim" else 1  # Dense_0 has 6 units
  assert int(after[0].num_refresh_failures) == blocks
  assert int(after[-1].num_refresh_failures) == blocks  # refreshes succeed afterwards
  assert int(after[-1].num_skipped_steps) == 0
  assert all(all_finite(s) for s in states)
  fresh_tx = tx.init(params)[0]
  (_, acts), grads = grad_fn(params, x, y)
  _, fresh = jax.jit(tx.update)(grads, (fresh_tx,) + tuple(tx.init(params)[1:]), params,
                                activations=acts)
  assert _leaves_equal(after[0].factors["Dense_0"], fresh[0].factors["Dense_0"])
  assert _leaves_equal(after[0].weights["Dense_0"], fresh[0].weights["Dense_0"])
  assert not _leaves_equal(after[0].factors["Dense_1"], fresh[0].factors["Dense_1"])
  assert losses[-1] < losses[0]


def test_in_range_matches_numpy():
  """statistics.in_range: finite entries and trace <= max / 16, on every kind of statistic."""
  big = float(np.finfo(np.float32).max)
  rng = np.random.default_rng(0)
  a = rng.standard_normal((4, 4)).astype(np.float32)
  g = a @ a.T
  cases = {
      "dense": (g, True),
      "dense_nan_offdiag": (g.copy(), False),
      "dense_trace_below_bound": (np.diag(np.full(4, big / 80)).astype(np.float32), True),
      "dense_trace_over_bound": (np.diag(np.full(4, big / 40)).astype(np.float32), False),
      "diagonal": (np.array([0.5, 0.25, 0.25], np.float32), True),
      "diagonal_inf": (np.array([0.5, np.inf, 0.25], np.float32), False),
      "stack": (np.stack([g, 2 * g]), True),
  }
  cases["dense_nan_offdiag"][0][0, 1] = np.nan
  for name, (stat, want) in cases.items():
    assert bool(statistics.in_range(jnp.asarray(stat))) == want, name
  y = rng.standard_normal((4, 2)).astype(np.float32)
  zero = jnp.float32(0.0)
  assert bool(statistics.in_range(sngd_jax.Sketch(jnp.asarray(y), jnp.float32(3.0), zero)))
  assert not bool(statistics.in_range(sngd_jax.Sketch(jnp.asarray(y).at[1, 1].set(jnp.inf),
                                                      jnp.float32(3.0), zero)))
  assert not bool(statistics.in_range(sngd_jax.Sketch(jnp.asarray(y), jnp.float32(big), zero)))
  # the identity part counts d times (d = 4): tr(S + c I) = 3 + 4 c
  assert not bool(statistics.in_range(sngd_jax.Sketch(jnp.asarray(y), jnp.float32(3.0),
                                                      jnp.float32(big / 4))))
  assert not bool(statistics.in_range(sngd_jax.Sketch(jnp.asarray(y), jnp.float32(3.0),
                                                      jnp.float32(jnp.nan))))
  # A sketch of finite entries whose plain sum overflows is in range (its trace is 3).
  assert bool(statistics.in_range(sngd_jax.Sketch(jnp.full((64, 8), big / 4, jnp.float32),
                                                  jnp.float32(3.0), zero)))
  # The finiteness sum cannot overflow: finite entries whose plain sum does still pass.
  off_diagonal = np.full((64, 64), big / 4, np.float32) * (1 - np.eye(64, dtype=np.float32))
  assert not np.isfinite(off_diagonal.sum(dtype=np.float32))
  assert bool(statistics.in_range(jnp.asarray(off_diagonal)))


@pytest.mark.parametrize("d", [5, 300, 1100])  # 1100: the mask built in the program
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_checked_trace_is_the_trace_and_the_finiteness(d, dtype):
  """statistics.total_trace (one reduction: the range check, outlier limit and prior share
  it) is each block's trace, and not finite when any entry of any block is not, at sizes
  past XLA:CPU's NaN-dropping reductions (docs/known-issues.md)."""
  rng = np.random.default_rng(d)
  stack = rng.standard_normal((2, d, d)).astype(np.float32)
  stack = np.asarray(jnp.asarray(stack, dtype).astype(jnp.float32))  # exact in `dtype`
  want = np.trace(stack.astype(np.float64), axis1=-2, axis2=-1)
  got = np.asarray(statistics.checked_block_trace(jnp.asarray(stack, dtype)), np.float64)
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  atol = tol * np.abs(stack).sum(axis=(1, 2)).max() / d
  np.testing.assert_allclose(got, want, rtol=tol, atol=atol)
  np.testing.assert_allclose(float(statistics.total_trace(jnp.asarray(stack[0], dtype))), want[0],
                             rtol=tol, atol=tol * np.abs(stack[0]).sum() / d)
  for bad in (np.nan, np.inf, -np.inf):
    broken = stack.copy()
    broken[1, d - 1, d // 2] = bad  # off the diagonal, in the second block
    blocks = np.asarray(statistics.checked_block_trace(jnp.asarray(broken, dtype)), np.float32)
    assert np.isfinite(blocks[0]) and not np.isfinite(blocks[1]), (bad, blocks)
    assert not bool(statistics.in_range(jnp.asarray(broken, dtype)))
    # The prior shares the reduction; a non-finite estimate is rejected before it is used.
    assert bool(statistics.in_range(jnp.asarray(broken[0], dtype)))


@pytest.mark.parametrize("fault", ["nan_grads", "scale_1e20"])
def test_multisteps_cycle_after_a_bad_micro_batch_trains(fault):
  """MultiSteps(k=2): a bad micro-batch skips its step, and the next cycle is untouched.

  Reference: the next cycle's update equals that of a fresh MultiSteps state carrying the
  same sngd state (the accumulators are zeros again, not 0 * NaN).
  """
  _, params, grad_fn, _, x, y = _setup()
  tx = sngd_jax.MultiSteps(exact_sngd(inverse_every=1), every_k_schedule=2)
  update = jax.jit(tx.update)
  (_, acts), grads = grad_fn(params, x, y)
  if fault == "nan_grads":
    bad_grads, bad_acts = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.nan), grads), acts
  else:
    (_, bad_acts), bad_grads = grad_fn(params, x * 1e20, y)
  state = tx.init(params)
  _, state = update(bad_grads, state, params, activations=bad_acts)
  _, state = update(grads, state, params, activations=acts)  # emits: skipped
  assert int(state.inner_opt_state.num_skipped_steps) == 1
  assert all_finite(state)
  fresh = tx.init(params)._replace(inner_opt_state=state.inner_opt_state)
  cycle = lambda s: update(grads, update(grads, s, params, activations=acts)[1], params,
                           activations=acts)
  (u, after), (u_fresh, _) = cycle(state), cycle(fresh)
  assert int(after.inner_opt_state.num_skipped_steps) == 1
  assert any(np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(u))
  assert _leaves_equal(u, u_fresh)
