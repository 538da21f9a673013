"""``uncalled="skip"``: a layer a step does not call keeps its factor (multi-task heads)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax


class TwoHeads(nn.Module):
  """A trunk and one head per task; a step calls the trunk and one head (``task`` is static)."""

  @nn.compact
  def __call__(self, x, task, both=False):
    h = nn.tanh(nn.Dense(6, name="trunk")(x))
    heads = {"a": nn.Dense(3, name="head_a"), "b": nn.Dense(2, name="head_b")}
    out = heads[task](h)
    if both:  # every head called, the other task's output weighted by 0
      other = heads["b" if task == "a" else "a"](h)
      return out, 0.0 * jnp.sum(other)
    return out, 0.0


def _problem():
  model = TwoHeads()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(16, 5)), jnp.float32)
  params = model.init(jax.random.key(0), x, "a", both=True)["params"]

  def loss(p, x, task, both):
    out, zero = model.apply({"params": p}, x, task, both)
    return jnp.mean(out ** 2) + zero

  return params, x, loss


def _run(tx, params, x, loss, tasks, both):
  state = tx.init(params)
  for task in tasks:
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
        params, x, task, both)
    updates, state = tx.update(grads, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
  return params, state, updates


def test_uncalled_layers_raise_by_default_with_the_option_named():
  params, x, loss = _problem()
  with pytest.raises(ValueError, match=r"'head_b'.*uncalled=\"skip\""):
    _run(sngd_jax.sngd(), params, x, loss, ["a"], both=False)


def test_one_step_equals_calling_the_other_head_with_zero_weight():
  """Against the same step with both heads called and the other head's output weighted by 0
  (its gradient is 0): every update and the called layers' factors are equal, and the
  uncalled head's factor is the one ``init`` made."""
  params, x, loss = _problem()
  kwargs = dict(factor_every=1, inverse_every=1, decay=0.5)
  tx = sngd_jax.sngd_momentum(0.1, uncalled="skip", **kwargs)
  skipped_p, skipped_s, skipped_u = _run(tx, params, x, loss, ["a"], both=False)
  called_p, called_s, called_u = _run(sngd_jax.sngd_momentum(0.1, **kwargs), params, x, loss,
                                      ["a"], both=True)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-6, atol=1e-7)
  jax.tree.map(close, skipped_u, called_u)
  jax.tree.map(close, skipped_p, called_p)
  fa, fb = skipped_s[0].factors, called_s[0].factors
  close(fa["trunk"], fb["trunk"])
  close(fa["head_a"], fb["head_a"])
  np.testing.assert_array_equal(fa["head_b"], tx.init(params)[0].factors["head_b"])
  assert not np.allclose(fa["head_b"], fb["head_b"])


@pytest.mark.usefixtures("x64")
def test_each_factor_averages_the_steps_that_called_its_layer():
  """Alternating tasks: each layer's factor is the moving average (no prior: the bias-corrected
  average) of the batch estimates of the steps that called it, computed in float64 numpy from
  the layer's inputs."""
  params, x, loss = _problem()
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  x = x.astype(jnp.float64)
  decay, tasks = 0.5, ["a", "b", "a", "a", "b"]
  tx = sngd_jax.sngd_momentum(0.1, uncalled="skip", factor_every=1, inverse_every=1,
                              decay=decay, prior="none")
  state = tx.init(params)
  estimates = {"trunk": [], "head_a": [], "head_b": []}
  for task in tasks:
    k = params["trunk"]
    h = np.tanh(np.asarray(x) @ np.asarray(k["kernel"]) + np.asarray(k["bias"]))
    aug = lambda z: np.concatenate([z, np.ones((z.shape[0], 1))], 1)
    estimates["trunk"].append(aug(np.asarray(x)).T @ aug(np.asarray(x)) / len(x))
    estimates["head_" + task].append(aug(h).T @ aug(h) / len(h))
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
        params, x, task, False)
    updates, state = tx.update(grads, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
  got = sngd_jax.damped_factors(state, damping=0.0, abs_damping=0.0)
  for path, est in estimates.items():
    w = decay ** np.arange(len(est))[::-1]
    expected = sum(wi * e for wi, e in zip(w, est, strict=True)) / w.sum()
    np.testing.assert_allclose(got[path], expected, rtol=1e-10, err_msg=path)


def test_skip_is_not_supported_under_multisteps():
  params, x, loss = _problem()
  tx = sngd_jax.MultiSteps(sngd_jax.sngd_momentum(0.1, uncalled="skip"), every_k_schedule=2)
  with pytest.raises(ValueError, match=r"MultiSteps accumulates.*'head_b'"):
    _run(tx, params, x, loss, ["a"], both=False)


def test_unknown_uncalled_value():
  with pytest.raises(ValueError, match="`uncalled` must be one of"):
    sngd_jax.sngd(uncalled="ignore")
