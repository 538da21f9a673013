"""The optax contrib common-test properties that apply to sngd()."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers_mlp import dense_inputs, grads_and_acts, make_problem

import sngd_jax


def _problem(dtype=jnp.float32):
  return make_problem(dtype=dtype)


def test_unknown_extra_kwargs_are_ignored():
  _, params, x, y, loss_fn = _problem()
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  tx = optax.chain(sngd_jax.sngd(), optax.sgd(0.1))
  state = tx.init(params)
  a, _ = tx.update(grads, state, params, activations=acts)
  b, _ = tx.update(grads, state, params, activations=acts, value=1.0, grad=grads, foo="bar")
  jax.tree.map(np.testing.assert_array_equal, a, b)


def test_no_recompilation_on_second_call():
  _, params, x, y, loss_fn = _problem()
  tx = optax.chain(sngd_jax.sngd(inverse_every=2), optax.sgd(0.1, momentum=0.9))
  traces = []

  @jax.jit
  def step(params, state, x, y):
    traces.append(1)
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(4):  # crosses refresh and no-refresh steps
    params, state = step(params, state, x, y)
  assert len(traces) == 1


def test_inject_hyperparams_gives_identical_results():
  _, params, x, y, loss_fn = _problem()
  sched = optax.linear_schedule(1e-2, 1e-4, 5)
  plain = optax.chain(sngd_jax.sngd(damping=sched, decay=0.9, inverse_every=2),
                      optax.sgd(0.1))
  injected = optax.chain(
      optax.inject_hyperparams(sngd_jax.sngd, static_args=("fisher",))(
          damping=sched, decay=0.9, inverse_every=2),
      optax.inject_hyperparams(optax.sgd)(learning_rate=0.1))
  sp, si = plain.init(params), injected.init(params)
  pp = pi = params
  for _ in range(5):
    _, gp, ap = grads_and_acts(loss_fn, pp, x, y)
    up, sp = plain.update(gp, sp, pp, activations=ap)
    pp = optax.apply_updates(pp, up)
    _, gi, ai = grads_and_acts(loss_fn, pi, x, y)
    ui, si = injected.update(gi, si, pi, activations=ai)
    pi = optax.apply_updates(pi, ui)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), pp, pi)
  assert float(si[0].hyperparams["damping"]) == pytest.approx(float(sched(4)), rel=1e-6)


def test_learning_rate_and_damping_schedules_are_accepted():
  _, params, x, y, loss_fn = _problem()
  tx = sngd_jax.sngd_momentum(optax.cosine_decay_schedule(0.1, 10),
                              damping=optax.exponential_decay(1e-2, 5, 0.5))
  state = tx.init(params)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  for _ in range(3):
    updates, state = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
        grads, state, acts)
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))


def test_multisteps_accumulates_then_preconditions():
  """``optax.MultiSteps`` (not ours): the mean gradient with the last micro-batch's statistics,
  which is why its ``init`` warns and names ``sngd_jax.MultiSteps``."""
  _, params, x, y, loss_fn = _problem()
  x1, x2, y1, y2 = x[:8], x[8:], y[:8], y[8:]
  inner = lambda: optax.chain(sngd_jax.sngd(decay=0.0), optax.sgd(0.1))
  ms = optax.MultiSteps(inner(), every_k_schedule=2)
  with pytest.warns(UserWarning, match="sngd_jax.MultiSteps"):  # what this test shows
    state = ms.init(params)
  _, g1, a1 = grads_and_acts(loss_fn, params, x1, y1)
  _, g2, a2 = grads_and_acts(loss_fn, params, x2, y2)
  u1, state = ms.update(g1, state, params, activations=a1)
  assert all(np.all(u == 0) for u in jax.tree.leaves(u1))
  u2, state = ms.update(g2, state, params, activations=a2)
  # Same as one inner update on the mean gradient, with the last micro-batch's statistics.
  ref_tx = inner()
  mean_g = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  ref, _ = ref_tx.update(mean_g, ref_tx.init(params), params, activations=a2)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u2, ref)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_are_preserved(dtype):
  _, params, x, y, loss_fn = _problem(dtype)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  tx = sngd_jax.sngd()
  state = tx.init(params)
  updates, new_state = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
      grads, state, acts)
  for u, p in zip(jax.tree.leaves(updates), jax.tree.leaves(params), strict=True):
    assert u.dtype == p.dtype
  assert all(f.dtype == jnp.float32 for f in jax.tree.leaves(state.factors))
  chex.assert_trees_all_equal_shapes_and_dtypes(state, new_state)


def test_state_is_stable_under_lax_cond_and_scan():
  _, params, x, y, loss_fn = _problem()
  tx = optax.chain(sngd_jax.sngd(inverse_every=3), optax.sgd(0.05, momentum=0.9))
  state = tx.init(params)

  def body(carry, i):
    params, state = carry
    loss, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, new_state = tx.update(grads, state, params, activations=acts)
    # Skipping an update under lax.cond needs identical state structure and dtypes.
    state = jax.lax.cond(i % 2 == 0, lambda: new_state, lambda: state)
    return (optax.apply_updates(params, updates), state), loss

  (params2, state2), losses = jax.jit(
      lambda p, s: jax.lax.scan(body, (p, s), jnp.arange(30)))(params, state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, state2)
  assert float(losses[-1]) < 0.7 * float(losses[0])
  assert int(state2[0].count) == 15


def test_state_can_be_donated_to_a_jitted_step():
  _, params, x, y, loss_fn = _problem()
  tx = optax.chain(sngd_jax.sngd(), optax.sgd(0.1, momentum=0.9))

  @functools.partial(jax.jit, donate_argnums=(1,))
  def step(params, state):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  state = tx.init(params)
  for _ in range(2):
    params, state = step(params, state)
  assert int(state[0].count) == 2


class _Runner:
  """Jitted steps of one optimizer on the problem (compiled once)."""

  def __init__(self, tx, x, y, loss_fn):
    self.tx = tx

    def step(params, state):
      _, grads, acts = grads_and_acts(loss_fn, params, x, y)
      updates, state = tx.update(grads, state, params, activations=acts)
      return optax.apply_updates(params, updates), state, updates

    self.step = jax.jit(step)

  def __call__(self, params, steps, state=None, change=None):
    """`steps` steps; `change(state)` (if given) edits the state before each."""
    state = self.tx.init(params) if state is None else state
    updates = None
    for _ in range(steps):
      if change is not None:
        state = change(state)
      params, state, updates = self.step(params, state)
    return params, state, updates


def _run(tx, params, x, y, loss_fn, steps):
  return _Runner(tx, x, y, loss_fn)(params, steps)


INJECTABLE = dict(learning_rate=0.03, momentum=0.8, weight_decay=1e-3, damping=1e-3,
                  max_norm=0.5)


ADAM_INJECTABLE = dict(learning_rate=3e-3, b1=0.8, weight_decay=1e-3, damping=1e-3,
                       max_norm=0.5)


# sngd_adam: float32 params of order 1 after 4 steps; Adam's normalization carries the
# rounding differences of the array hyperparams (a few ulps of the params).
@pytest.mark.parametrize("alias,hyper,rtol,atol", [
    (sngd_jax.sngd_momentum, INJECTABLE, 1e-6, 1e-8),
    (sngd_jax.sngd_adam, ADAM_INJECTABLE, 1e-5, 1e-6)], ids=["sngd_momentum", "sngd_adam"])
def test_inject_hyperparams_of_an_alias_is_the_plain_optimizer(alias, hyper, rtol, atol):
  _, params, x, y, loss_fn = _problem(jnp.float32)
  kw = dict(factor_every=2, inverse_every=2)
  plain, _, _ = _run(alias(**hyper, **kw), params, x, y, loss_fn, 4)
  tx = optax.inject_hyperparams(alias)(**hyper, **kw)
  injected, state, _ = _run(tx, params, x, y, loss_fn, 4)
  assert set(hyper) <= set(state.hyperparams)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=atol),
               injected, plain)
  # the recorded static configuration leaves the injected (array) options out
  (sngd_state,) = [s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(
      s, sngd_jax.SNGDState)) if isinstance(s, sngd_jax.SNGDState)]
  assert sngd_state.config.damping is None and sngd_state.config.max_norm is None
  assert sngd_state.config.inverse == "auto"


def test_inject_hyperparams_changed_between_steps_change_the_step():
  """Each injectable option, changed after two steps, gives the step of the new values."""
  _, params, x, y, loss_fn = _problem(jnp.float32)
  kw = dict(factor_every=1, inverse_every=1)  # damping acts at every step
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum)(**INJECTABLE, **kw)
  run = _Runner(tx, x, y, loss_fn)
  params2, state2, _ = run(params, 2)
  _, _, unchanged = run(params2, 1, state=state2)
  _, grads, acts = grads_and_acts(loss_fn, params2, x, y)
  new = dict(learning_rate=0.06, momentum=0.5, weight_decay=1e-1, damping=1e-1, max_norm=0.05)
  for name, value in new.items():
    def change(state, name=name, value=value):
      hyper = dict(state.hyperparams)
      hyper[name] = jnp.asarray(value, hyper[name].dtype)
      return state._replace(hyperparams=hyper)

    _, _, updates = run(params2, 1, state=state2, change=change)
    # the reference: the plain optimizer with the new value, from the same inner state
    ref_tx = sngd_jax.sngd_momentum(**{**INJECTABLE, name: value}, **kw)
    ref, _ = ref_tx.update(grads, state2.inner_state, params2, activations=acts)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7),
                 updates, ref)
    diff = max(float(jnp.max(jnp.abs(a - b)))
               for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(unchanged),
                               strict=True))
    assert diff > 1e-5, name


def test_inject_hyperparams_learning_rate_scales_the_first_step():
  _, params, x, y, loss_fn = _problem(jnp.float32)
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum)(learning_rate=0.03)
  run = _Runner(tx, x, y, loss_fn)
  state = tx.init(params)
  _, _, u1 = run(params, 1, state=state)
  state = state._replace(hyperparams={**state.hyperparams, "learning_rate": jnp.asarray(0.09)})
  _, _, u3 = run(params, 1, state=state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 3 * b, rtol=1e-5, atol=1e-9), u3, u1)


def test_injected_hyperparameters_set_with_full_like_keep_the_compiled_step():
  """docs/training-loops.md sets an injected value with ``jnp.full_like(old, new)``: optax
  makes the floats strong float32 arrays and ``factor_every``/``inverse_every`` weak int32
  ones, and ``jnp.asarray(0.09)`` (weak) compiled the step again. The new learning rate acts
  on the next step (a first step is linear in it) and the step compiled once."""
  _, params, x, y, loss_fn = _problem(jnp.float32)
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum)(learning_rate=0.03, inverse_every=3)
  run = _Runner(tx, x, y, loss_fn)
  _, _, u1 = run(params, 1)
  state = tx.init(params)
  hp = state.hyperparams
  for name, value in [("learning_rate", 0.09), ("damping", float(hp["damping"])),
                      ("inverse_every", 3), ("factor_every", 1)]:
    hp[name] = jnp.full_like(hp[name], value)
  _, _, u3 = run(params, 1, state=state)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 3 * b, rtol=1e-5, atol=1e-9), u3, u1)
  hp = state.hyperparams
  hp["inverse_every"], hp["damping"] = jnp.full_like(hp["inverse_every"], 1), jnp.full_like(
      hp["damping"], 1e-2)
  run(params, 2, state=state)
  assert run.step._cache_size() == 1


def test_inject_hyperparams_of_sngd_without_a_learning_rate():
  _, params, x, y, loss_fn = _problem(jnp.float32)
  plain = optax.chain(sngd_jax.sngd(damping=1e-3), optax.sgd(0.1))
  injected = optax.chain(optax.inject_hyperparams(sngd_jax.sngd)(damping=1e-3), optax.sgd(0.1))
  p1, _, _ = _run(plain, params, x, y, loss_fn, 3)
  p2, state, _ = _run(injected, params, x, y, loss_fn, 3)
  assert float(state[0].hyperparams["damping"]) == pytest.approx(1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), p1, p2)


def test_inject_hyperparams_static_args_for_fisher_inverse_prior_and_stats_batch_size():
  _, params, x, y, loss_fn = _problem(jnp.float32)
  kw = dict(fisher=lambda path: "rfim" if path == "Dense_2" else "linear",
            inverse=sngd_jax.inverse.auto(max_dim=5, rank=4), prior="identity",
            stats_batch_size=8, factor_every=1)
  plain, _, _ = _run(sngd_jax.sngd_momentum(0.05, **kw), params, x, y, loss_fn, 3)
  tx = optax.inject_hyperparams(sngd_jax.sngd_momentum,
                                static_args=("fisher", "stats_batch_size"))(0.05, **kw)
  injected, state, _ = _run(tx, params, x, y, loss_fn, 3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8),
               injected, plain)
  factors = state.inner_state[0].factors
  assert factors["Dense_2"].shape == (3, 6, 6)        # rfim: one block per output
  assert isinstance(factors["Dense_0"], sngd_jax.Sketch)  # 6 inputs > 5: Nystrom sketch


def test_inject_hyperparams_stats_batch_size_must_be_static():
  with pytest.raises(TypeError, match=r"static_args=\(\"stats_batch_size\",\)"):
    optax.inject_hyperparams(sngd_jax.sngd_momentum)(0.05, stats_batch_size=8).init(
        _problem()[1])


def test_sngd_adam_is_adamw_on_the_preconditioned_gradient():
  """Each step of ``sngd_adam`` against AdamW written in numpy on ``sngd()``'s output
  (bias-corrected moments, decoupled weight decay on kernels only)."""
  _, params, x, y, loss_fn = _problem(jnp.float32)
  kw = dict(factor_every=1, inverse_every=1)
  lr, b1, b2, eps, wd = 1e-2, 0.8, 0.99, 1e-6, 1e-2
  tx = sngd_jax.sngd_adam(lr, b1, b2, eps, weight_decay=wd, **kw)
  pre = sngd_jax.sngd(**kw)
  state, pre_state = tx.init(params), pre.init(params)
  m = jax.tree.map(lambda p: np.zeros(p.shape), params)
  v = jax.tree.map(lambda p: np.zeros(p.shape), params)
  p = params
  tx_update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))
  pre_update = jax.jit(lambda g, s, p, a: pre.update(g, s, p, activations=a))
  for t in range(1, 4):
    _, grads, acts = grads_and_acts(loss_fn, p, x, y)
    updates, state = tx_update(grads, state, p, acts)
    u, pre_state = pre_update(grads, pre_state, p, acts)
    u = jax.tree.map(lambda a: np.asarray(a, np.float64), u)
    m = jax.tree.map(lambda m, u: b1 * m + (1 - b1) * u, m, u)
    v = jax.tree.map(lambda v, u: b2 * v + (1 - b2) * u * u, v, u)
    want = jax.tree.map(
        lambda m, v, w, t=t: -lr * ((m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
                               + (wd * np.asarray(w) if w.ndim >= 2 else 0.0)), m, v, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 updates, want)
    p = optax.apply_updates(p, updates)


def test_multi_transform_runs_sngd_on_part_of_the_model():
  """``optax.multi_transform`` (labels as a prefix of the params): SNGD on two layers, Adam on
  the last. Every step, the SNGD part equals ``sngd_momentum`` told to leave the last layer
  alone (``fisher={"Dense_2": None}``) and the Adam part equals ``optax.adam``, on the same
  gradients; the last layer's captured activations are ignored, not an error."""
  _, params, x, y, loss_fn = _problem(jnp.float32)
  labels = {"Dense_0": "sngd", "Dense_1": "sngd", "Dense_2": "adam"}
  tx = optax.multi_transform(
      {"sngd": sngd_jax.sngd_momentum(0.05, factor_every=1, inverse_every=2),
       "adam": optax.adam(1e-2)}, labels)
  ref_sngd = sngd_jax.sngd_momentum(0.05, factor_every=1, inverse_every=2,
                                    fisher={"Dense_2": None})
  ref_adam = optax.adam(1e-2)
  state, s_sngd, s_adam = tx.init(params), ref_sngd.init(params), ref_adam.init(params)
  update = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))
  ref_update = jax.jit(lambda g, s, p, a: ref_sngd.update(g, s, p, activations=a))
  p = params
  for _ in range(4):
    _, grads, acts = grads_and_acts(loss_fn, p, x, y)
    updates, state = update(grads, state, p, acts)
    want_sngd, s_sngd = ref_update(grads, s_sngd, p, acts)
    want_adam, s_adam = ref_adam.update(grads, s_adam, p)
    for layer in ("Dense_0", "Dense_1"):
      chex.assert_trees_all_close(updates[layer], want_sngd[layer], rtol=1e-5, atol=1e-7)
    chex.assert_trees_all_close(updates["Dense_2"], want_adam["Dense_2"], rtol=1e-5, atol=1e-7)
    # not the plain gradient step: the SNGD part is preconditioned
    assert not np.allclose(updates["Dense_0"]["kernel"], -0.05 * grads["Dense_0"]["kernel"],
                           rtol=1e-2)
    p = optax.apply_updates(p, updates)


def test_masked_bias_leaves_a_layer_without_bias_to_sngd():
  """``optax.masked(sngd(), mask)`` with every ``bias`` masked out: SNGD sees each layer as a
  layer without a bias, ``G = E[x x^T]`` (no row of ones), and preconditions its kernel by
  ``(G + damping tr(G) I)^{-1}`` (float64 reference); the biases' gradients pass unchanged."""
  _, params, x, y, loss_fn = _problem(jnp.float32)
  mask = jax.tree.map(lambda _: True, params)
  for layer in mask:
    mask[layer]["bias"] = False
  damping = 1e-3
  tx = optax.masked(sngd_jax.sngd(decay=0.0, max_norm=None, damping=damping), mask)
  state = tx.init(params)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  updates, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
      grads, state, params, acts)
  xs, _ = dense_inputs(params, x, (7, 5, 3))
  for i, h in enumerate(xs):
    layer = f"Dense_{i}"
    g = h.T @ h / h.shape[0]
    want = np.linalg.solve(g + damping * np.trace(g) * np.eye(g.shape[0]),
                           np.asarray(grads[layer]["kernel"], np.float64))
    np.testing.assert_allclose(np.asarray(updates[layer]["kernel"]), want, rtol=2e-4,
                               atol=2e-5 * np.abs(want).max(), err_msg=layer)
    np.testing.assert_array_equal(np.asarray(updates[layer]["bias"]),
                                  np.asarray(grads[layer]["bias"]))


def test_with_activations_under_optax_lookahead_matches_the_written_out_lookahead():
  """``optax.lookahead`` calls its fast optimizer without keyword arguments; built in the step
  around ``with_activations`` it runs SNGD, step for step equal to lookahead written out with
  ``tx.update(..., activations=...)`` (fast steps, then ``slow += a (fast - slow)``,
  ``fast = slow`` every ``k`` steps)."""
  _, params, x, y, loss_fn = _problem()
  tx = sngd_jax.sngd_momentum(0.05, inverse_every=2)
  k, alpha = 3, 0.5
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  look, synced = optax.lookahead(tx, k, alpha), optax.LookaheadParams.init_synced(params)
  with pytest.raises(TypeError, match="activations"):   # optax's wrapper takes no kwargs
    look.update(grads, look.init(synced), synced, activations=acts)
  with pytest.raises(ValueError, match="with_activations"):   # sngd's error says what to do
    look.update(grads, look.init(synced), synced)

  @jax.jit
  def step(lp, state):
    _, grads, acts = grads_and_acts(loss_fn, lp.fast, x, y)
    look = optax.lookahead(sngd_jax.with_activations(tx, acts), k, alpha)
    updates, state = look.update(grads, state, lp)
    return optax.apply_updates(lp, updates), state

  lp = optax.LookaheadParams.init_synced(params)
  state = optax.lookahead(tx, k, alpha).init(lp)
  fast, slow, s = params, params, tx.init(params)
  for t in range(7):
    lp, state = step(lp, state)
    _, grads, acts = grads_and_acts(loss_fn, fast, x, y)
    u, s = tx.update(grads, s, fast, activations=acts)
    fast = optax.apply_updates(fast, u)
    if t % k == k - 1:
      slow = jax.tree.map(lambda a, b: a + alpha * (b - a), slow, fast)
      fast = slow
    for got, want in ((lp.fast, fast), (lp.slow, slow)):
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)   # float32 rounding
  assert int(state.fast_state[0].count) == 7   # SNGD's own step counter: it ran every step


def test_with_activations_under_optax_sam():
  """``optax.contrib.sam`` (transparent mode, ``sync_period=2``): an adversarial step from
  ``p0`` to ``p1``, then the outer step lands on ``p0 + u`` with ``u`` SNGD's update for the
  gradient and activations at ``p1``, evaluated with the state and params of ``p0``."""
  _, params, x, y, loss_fn = _problem()
  tx = sngd_jax.sngd_momentum(0.05)
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(0.1))

  @jax.jit
  def step(p, state):
    _, grads, acts = grads_and_acts(loss_fn, p, x, y)
    updates, state = optax.contrib.sam(sngd_jax.with_activations(tx, acts), adv).update(
        grads, state, p)
    return optax.apply_updates(p, updates), state

  state = optax.contrib.sam(tx, adv).init(params)
  p1, state = step(params, state)
  p2, state = step(p1, state)
  _, grads, acts = grads_and_acts(loss_fn, p1, x, y)
  u, _ = tx.update(grads, tx.init(params), params, activations=acts)
  want = optax.apply_updates(params, u)
  assert not np.allclose(jax.tree.leaves(p1)[0], jax.tree.leaves(params)[0])
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)
  p3, state = step(p2, state)   # the next adversarial step runs on the outer state
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(p3))


def test_with_activations_under_optax_sam_opaque_mode():
  """``optax.contrib.sam(..., opaque_mode=True)`` takes the adversarial gradient from its
  ``grad_fn`` inside ``update``: the step is SNGD's update of the gradient at the adversarial
  point ``p1`` with the activations bound (those at ``p0``), as the docs say."""
  _, params, x, y, loss_fn = _problem()
  tx = sngd_jax.sngd_momentum(0.05)
  adv = optax.chain(optax.contrib.normalize(), optax.sgd(0.1))
  grad_fn = lambda p, _: grads_and_acts(loss_fn, p, x, y)[1]
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  sam = optax.contrib.sam(sngd_jax.with_activations(tx, acts), adv, opaque_mode=True)
  state = optax.contrib.sam(tx, adv, opaque_mode=True).init(params)
  updates, _ = sam.update(grads, state, params, grad_fn=grad_fn)
  adv_step, _ = adv.update(grads, adv.init(params), params)
  p1 = jax.tree.map(lambda p, a: p - a, params, adv_step)
  want, _ = tx.update(grad_fn(p1, 0), tx.init(params), params, activations=acts)
  assert not np.allclose(jax.tree.leaves(grad_fn(p1, 0))[0], jax.tree.leaves(grads)[0])
  for a, b in zip(jax.tree.leaves(updates), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-7)

def test_with_activations_forwards_the_wrappers_keyword_arguments():
  _, params, x, y, loss_fn = _problem()
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  seen = {}

  def update(updates, state, params=None, **kw):
    seen.update(kw)
    return updates, state

  inner = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), update)
  bound = sngd_jax.with_activations(inner, acts, value=1.0)
  bound.update(grads, bound.init(params), params, value=2.0, other=3)
  assert seen["activations"] is acts and seen["value"] == 1.0 and seen["other"] == 3


@pytest.mark.parametrize("make", [
    lambda: sngd_jax.sngd_momentum(0.05),
    lambda: optax.masked(sngd_jax.sngd(), {"Dense_0": True, "Dense_1": True, "Dense_2": False}),
    lambda: optax.inject_hyperparams(sngd_jax.sngd_adam)(1e-3),
], ids=["sngd_momentum", "masked", "inject_hyperparams"])
def test_tree_map_params_names_the_way_to_map_an_sngd_state(make):
  """``optax.tree_utils.tree_map_params`` calls ``init`` on a placeholder to find the
  params-shaped leaves; SNGD's per-layer factors cannot come from it. It failed in
  ``jax.tree.map`` with a pytree structure error at ``factors``; sngd now says what to write,
  and the recipe in its message maps the base optimizer's trace like the params."""
  params = _problem()[1]
  tx = make()
  with pytest.raises(TypeError, match=r"sngd: `optax.tree_utils.tree_map_params`.*jax.tree.map"):
    optax.tree_utils.tree_map_params(tx, lambda p: p, tx.init(params))
  base = optax.sgd(0.1, momentum=0.9)
  state = optax.chain(sngd_jax.sngd(), base).init(params)
  state = state[:1] + (jax.tree.map(lambda t: t + 1.0, state[1]),)
  mapped = (jax.tree.map(lambda v: v, state[0]),
            optax.tree_utils.tree_map_params(base, lambda p: 2 * p, state[1]))
  assert jax.tree.structure(mapped) == jax.tree.structure(state)
  for a, b in zip(jax.tree.leaves(mapped[1]), jax.tree.leaves(state[1]), strict=True):
    np.testing.assert_array_equal(a, 2 * b)


@pytest.mark.parametrize("make", [
    lambda base: optax.contrib.galore(0.1, rank=2, base_optimizer=base),
    lambda base: optax.contrib.scale_by_galore(rank=2, base_optimizer=base),
], ids=["galore", "scale_by_galore"])
@pytest.mark.parametrize("base", [sngd_jax.sngd, lambda: sngd_jax.sngd_momentum(0.1)],
                         ids=["sngd", "sngd_momentum"])
def test_sngd_as_galores_base_optimizer_names_the_projection(make, base):
  """GaLore hands its base optimizer low-rank projected gradients: the error says so and what
  to write, instead of blaming a kernel's layout (a projected ``(m, r)`` kernel no longer
  matches its bias) or the training loop (a bias-free kernel: no activations)."""
  _, params, _, _, _ = _problem()
  bias_free = {k: {"kernel": v["kernel"]} for k, v in params.items()}
  for p in (params, bias_free):
    with pytest.raises(TypeError, match=r"base_optimizer.*galore.*low-rank.*"
                       r"optax\.chain\(sngd_jax\.sngd\(\), optax\.contrib\.galore"):
      make(base()).init(p)


def test_galore_after_sngd_projects_the_preconditioned_update():
  """``chain(sngd(), galore(...))``, the composition the error above recommends: GaLore's
  update of SNGD's preconditioned gradient, as the two transforms called one after the other."""
  _, params, x, y, loss_fn = _problem()
  tx = optax.chain(sngd_jax.sngd(), optax.contrib.galore(0.1, rank=2))
  first, second = sngd_jax.sngd(), optax.contrib.galore(0.1, rank=2)
  state, s1, s2 = tx.init(params), first.init(params), second.init(params)
  for _ in range(2):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    pre, s1 = first.update(grads, s1, params, activations=acts)
    expected, s2 = second.update(pre, s2, params)
    jax.tree.map(np.testing.assert_array_equal, updates, expected)
    assert not np.allclose(updates["Dense_0"]["kernel"], 0.0)
    params = optax.apply_updates(params, updates)
