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


class Gathered(nn.Module):
  """``a`` on every node, ``b`` on the rows ``idx`` selects (a GNN's edges, an expert's tokens):
  a static ``idx`` of length 0 calls ``b`` on a ``(0, 3)`` input."""

  @nn.compact
  def __call__(self, x, idx):
    h = nn.tanh(nn.Dense(3, name="a")(x))
    return jnp.mean(h ** 2) + jnp.sum(nn.Dense(2, name="b")(h[idx]) ** 2)


def _gathered():
  model = Gathered()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 4)), jnp.float64)
  params = model.init(jax.random.key(0), x, jnp.arange(3))["params"]
  params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
  loss = lambda p, x, idx: model.apply({"params": p}, x, idx)
  return params, x, loss


def _step(tx, state, params, x, loss, idx):
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x, idx)
  updates, state = tx.update(grads, state, params, activations=acts)
  return grads, updates, state


def _aug(rows):
  rows = np.asarray(rows, np.float64)
  return np.concatenate([rows, np.ones((rows.shape[0], 1))], 1)


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("uncalled", ["error", "skip"])
def test_a_layer_called_on_zero_rows_keeps_its_factor_and_the_others_update(uncalled):
  """A layer called on a ``(0, D)`` input (no edges, an expert without tokens) has no batch
  estimate (``0/0``): it keeps its factor and weight, and every other layer updates as usual,
  its factor and update equal to float64 numpy (the step is not skipped)."""
  params, x, loss = _gathered()
  decay = 0.5
  tx = sngd_jax.sngd(decay=decay, prior="none", damping=1e-3, factor_every=1, inverse_every=1,
                     max_norm=None, uncalled=uncalled)
  state = tx.init(params)
  _, _, state = _step(tx, state, params, x, loss, jnp.arange(3))
  before = state
  grads, updates, state = _step(tx, state, params, x, loss, jnp.zeros((0,), jnp.int32))
  assert int(state.num_skipped_steps) == 0 and int(state.count) == 2
  assert int(state.num_refresh_failures) == 0
  np.testing.assert_array_equal(state.factors["b"], before.factors["b"])
  np.testing.assert_array_equal(state.weights["b"], before.weights["b"])
  est = _aug(x).T @ _aug(x) / len(x)
  expected = (decay * est + est) / (decay + 1)  # two equal batch estimates of `a`
  got = sngd_jax.damped_factors(state, damping=0.0, abs_damping=0.0)
  np.testing.assert_allclose(got["a"], expected, rtol=1e-12)
  g = np.concatenate([np.asarray(grads["a"]["kernel"]), np.asarray(grads["a"]["bias"])[None]])
  pre = np.linalg.solve(expected + 1e-3 * np.trace(expected) * np.eye(5), g)
  np.testing.assert_allclose(updates["a"]["kernel"], pre[:4], rtol=1e-9)
  np.testing.assert_allclose(updates["a"]["bias"], pre[4], rtol=1e-9)
  assert np.all(np.isfinite(np.asarray(updates["b"]["kernel"])))


@pytest.mark.usefixtures("x64")
def test_multisteps_micro_batches_with_zero_rows_add_no_rows():
  """Under ``MultiSteps``, a micro-batch that calls ``b`` on 0 rows adds nothing to ``b``'s
  row-weighted estimate: ``b``'s factor is the float64 estimate over the other micro-batches'
  rows (``a``'s over all of them); a cycle with no rows of ``b`` keeps ``b``'s factor."""
  params, x, loss = _gathered()
  tx = sngd_jax.MultiSteps(
      sngd_jax.sngd(decay=0.0, prior="none", damping=1e-3, factor_every=1, inverse_every=1,
                    max_norm=None), every_k_schedule=3)
  state = tx.init(params)
  idxs = [jnp.arange(3), jnp.zeros((0,), jnp.int32), jnp.array([5, 6, 7, 0, 2])]
  h = np.tanh(_aug(x) @ np.concatenate([np.asarray(params["a"]["kernel"]),
                                          np.asarray(params["a"]["bias"])[None]]))
  for idx in idxs:
    _, _, state = _step(tx, state, params, x, loss, idx)
  inner = state.inner_opt_state
  assert int(inner.num_skipped_steps) == 0 and int(inner.count) == 1
  rows_b = np.concatenate([h[np.asarray(i)] for i in idxs])
  got = sngd_jax.damped_factors(inner, damping=0.0, abs_damping=0.0)
  np.testing.assert_allclose(got["b"], _aug(rows_b).T @ _aug(rows_b) / len(rows_b), rtol=1e-12)
  np.testing.assert_allclose(got["a"], _aug(x).T @ _aug(x) / len(x), rtol=1e-12)
  before = inner
  for _ in range(3):
    _, _, state = _step(tx, state, params, x, loss, jnp.zeros((0,), jnp.int32))
  inner = state.inner_opt_state
  assert int(inner.num_skipped_steps) == 0 and int(inner.count) == 2
  np.testing.assert_array_equal(inner.factors["b"], before.factors["b"])
  np.testing.assert_array_equal(inner.weights["b"], before.weights["b"])
  np.testing.assert_allclose(sngd_jax.damped_factors(inner, damping=0.0, abs_damping=0.0)["a"],
                             _aug(x).T @ _aug(x) / len(x), rtol=1e-12)


class LateHead(nn.Module):
  """A trunk and head ``a`` on every step; head ``b`` and the embedding ``emb`` only on the steps
  of task ``b`` (``task`` is static)."""

  @nn.compact
  def __call__(self, x, tokens, task):
    h = nn.tanh(nn.Dense(6, name="trunk")(x))
    out = jnp.mean(nn.Dense(3, name="head_a")(h) ** 2)
    if task == "b":
      emb = nn.Embed(7, 6, name="emb")(tokens)
      out = out + jnp.mean(nn.Dense(2, name="head_b")(h + emb) ** 2)
    return out


@pytest.mark.parametrize(("inverse", "abs_damping"),
                         [("cholesky", 0.0), ("cholesky", 1e-2), ("host", 0.0), ("host", 1e-2)])
def test_a_layer_never_fed_keeps_the_identity_and_counts_no_refresh_failure(inverse,
                                                                           abs_damping):
  """Head ``b`` and the embedding are not called on the first two steps (``uncalled="skip"``):
  their factors are still empty (weight 0) at the refreshes of those steps, which must count no
  refresh failure and keep the identity inverse (their update is their gradient, here from an
  L2 penalty; not ``g / abs_damping``, nor a failed refresh of an empty factor for
  ``abs_damping=0``). The refresh of the step that first calls them inverts
  their factors: the updates equal float64 numpy's damped solves."""
  model = LateHead()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(16, 5)), jnp.float32)
  tokens = jnp.asarray(rng.integers(0, 7, size=16), jnp.int32)
  params = model.init(jax.random.key(0), x, tokens, "b")["params"]

  def loss(p, x, tokens, task):  # the penalty gives every layer a gradient on every step
    l2 = sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(p))
    return model.apply({"params": p}, x, tokens, task) + 1e-2 * l2

  damping = 1e-3
  method = (sngd_jax.inverse.host_refresh(sngd_jax.inverse.cholesky()) if inverse == "host"
            else inverse)
  tx = sngd_jax.sngd(uncalled="skip", prior="none", decay=0.0, damping=damping,
                     abs_damping=abs_damping, factor_every=1, inverse_every=1, inverse=method,
                     max_norm=None)
  state = tx.init(params)
  for task in ["a", "a", "b"]:
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
        params, x, tokens, task)
    updates, state = tx.update(grads, state, params, activations=acts)
    assert int(state.num_refresh_failures) == 0, task
    assert int(state.num_skipped_steps) == 0, task
    if task == "a":  # never fed: the identity inverse, the gradient unchanged
      for name in ("head_b", "emb"):
        jax.tree.map(np.testing.assert_array_equal, updates[name], grads[name])
  # the step that calls them: float64 numpy from the layers' inputs (decay 0: this batch's)
  k = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.tanh(np.asarray(x, np.float64) @ k["trunk"]["kernel"] + k["trunk"]["bias"])
  rows = _aug(h + k["emb"]["embedding"][np.asarray(tokens)])
  g_head = rows.T @ rows / len(rows)
  gb = np.concatenate([np.asarray(grads["head_b"]["kernel"], np.float64),
                       np.asarray(grads["head_b"]["bias"], np.float64)[None]])
  expected = np.linalg.solve(
      g_head + (damping * np.trace(g_head) + abs_damping) * np.eye(len(g_head)), gb)
  np.testing.assert_allclose(updates["head_b"]["kernel"], expected[:-1], rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(updates["head_b"]["bias"], expected[-1], rtol=2e-4, atol=1e-7)
  freq = np.bincount(np.asarray(tokens), minlength=7) / len(tokens)
  ge = np.asarray(grads["emb"]["embedding"], np.float64)
  np.testing.assert_allclose(
      updates["emb"]["embedding"], ge / (freq + damping * freq.sum() + abs_damping)[:, None],
      rtol=2e-5)


@pytest.mark.usefixtures("x64")
def test_a_layer_called_on_zero_rows_from_the_first_step_counts_no_refresh_failure():
  """``b`` called on a ``(0, D)`` input from the first step on: its factor is never fed, so
  its refreshes keep the identity (its update is its gradient) and count no failure (one was
  counted at the first refresh before); the step is not skipped."""
  params, x, loss = _gathered()
  tx = sngd_jax.sngd(damping=1e-3, factor_every=1, inverse_every=1, max_norm=None)
  state = tx.init(params)
  for _ in range(2):
    grads, updates, state = _step(tx, state, params, x, loss, jnp.zeros((0,), jnp.int32))
    assert int(state.num_refresh_failures) == 0
    assert int(state.num_skipped_steps) == 0
    jax.tree.map(np.testing.assert_array_equal, updates["b"], grads["b"])
