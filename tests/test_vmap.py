"""A caller's ``jax.vmap`` over the training step (an ensemble, seeds in one program).

Two things a vmapped SNGD step must not do, both found by vmapping a whole step: batch the
refresh's one-block LAPACK calls again (two batched calls at once deadlock XLA:CPU's pool:
``examples/xla_cpu_hang_repro.py --mode vmap`` hung in 2 of 2 trials before the fix), and run
the statistics and the refresh on every step (``lax.cond`` with a batched predicate is a
``select`` of both branches). ``control.schedule_cond`` and
``inverse.refresh.one_call_per_member`` are checked here against plain ``lax.cond``, a
member trained alone, and their derivatives.
"""

import importlib.util
import os
import re

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax
from sngd_jax._src import control


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = jnp.tanh(nn.Dense(16)(x))  # factors: 9 (one block), 17, 17 (a group of two blocks)
    x = jnp.tanh(nn.Dense(16)(x))
    return nn.Dense(3)(x)


MODEL = MLP()
X = jax.random.normal(jax.random.key(0), (32, 8))
Y = jnp.arange(32) % 3


def _loss(p):
  return optax.softmax_cross_entropy_with_integer_labels(MODEL.apply({"params": p}, X), Y).mean()


def _tx():
  return sngd_jax.sngd_momentum(0.05, factor_every=2, inverse_every=4)


def _step(tx):
  def step(p, s):
    (loss, acts), g = jax.value_and_grad(sngd_jax.capture(_loss), has_aux=True)(p)
    u, s = tx.update(g, s, p, activations=acts)
    return optax.apply_updates(p, u), s, loss
  return step


def _stack(*trees):
  return jax.tree.map(lambda *a: jnp.stack(a), *trees)


def test_vmapped_steps_match_members_trained_alone():
  """Three members, one of them a step ahead (so statistics and refreshes are due for some
  members and not others on most steps: the mixed case), trained 9 steps under ``vmap``,
  equal each member's own training."""
  tx = _tx()
  step = jax.jit(_step(tx))
  members = []
  for seed, ahead in ((1, 0), (2, 1), (3, 0)):
    p = MODEL.init(jax.random.key(seed), X)["params"]
    s = tx.init(p)
    for _ in range(ahead):
      p, s, _ = step(p, s)
    members.append((p, s))
  p, s = _stack(*[m[0] for m in members]), _stack(*[m[1] for m in members])
  vstep = jax.jit(jax.vmap(_step(tx)))
  alone = list(members)
  for _ in range(9):
    p, s, losses = vstep(p, s)
    for i, (pi, si) in enumerate(alone):
      pi, si, loss = step(pi, si)
      alone[i] = (pi, si)
      np.testing.assert_allclose(losses[i], loss, rtol=2e-5)
  for i, (pi, si) in enumerate(alone):
    for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(pi), strict=True):
      np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=1e-6)
    sngd_state, sngd_alone = s[0], si[0]  # sngd_momentum = chain(sngd(), ...)
    assert isinstance(sngd_state, sngd_jax.SNGDState)
    assert int(sngd_state.count[i]) == int(sngd_alone.count)
    for a, b in zip(jax.tree.leaves(sngd_state.inverses), jax.tree.leaves(sngd_alone.inverses),
                    strict=True):
      np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=1e-6)


def test_vmapped_refresh_makes_one_block_lapack_calls():
  """In the compiled vmapped step every LAPACK call factors one block (no leading batch of
  members), and the refresh's Cholesky stays inside a conditional."""
  tx = _tx()
  ps = jax.vmap(lambda k: MODEL.init(k, X)["params"])(jax.random.split(jax.random.key(0), 4))
  ss = jax.vmap(tx.init)(ps)
  text = jax.jit(jax.vmap(_step(tx))).lower(ps, ss).compile().as_text()
  calls = [ln for ln in text.splitlines() if 'custom_call_target="lapack' in ln]
  assert calls
  for line in calls:
    shape = re.search(r"= \(?\w+\[([\d,]*)\]", line).group(1).split(",")
    assert np.prod([int(n) for n in shape[:-2]]) == 1, line
  jaxpr = str(jax.make_jaxpr(jax.vmap(_step(tx)))(ps, ss))
  assert jaxpr.count("cond[") >= 2 and "custom_vmap_call" not in jaxpr.split("cond[")[0]


def _repro():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(
      "xla_cpu_hang_repro", os.path.join(root, "examples", "xla_cpu_hang_repro.py"))
  module = importlib.util.module_from_spec(spec)
  assert spec.loader is not None
  spec.loader.exec_module(module)
  return module


def test_vmapped_update_finishes_on_cpu():
  """Default XLA flags, 4 members of a 784-256-256-10 MLP refreshing every step: it hung
  before the refresh kept one block per call under a caller's vmap."""
  repro = _repro()
  assert repro.trial(repro.VMAP_CHILD, ["cholesky", "1"], "", timeout=240) == "finished"


# --- control.schedule_cond on its own -----------------------------------------------------

W = jnp.array([0.5, -1.0, 2.0])


def _branches(x, c):
  on_true = lambda op: (jnp.sin(op[0] * W) * c, op[1] + 1)
  on_false = lambda op: (op[0] * 2.0, op[1])
  return on_true, on_false


def _ours(pred, x, n, c):
  return control.schedule_cond(pred, *_branches(x, c), (x, n))


def _plain(pred, x, n, c):
  return jax.lax.cond(pred, *_branches(x, c), (x, n))


@pytest.mark.parametrize("preds", [[True, False, True], [True, True, True],
                                   [False, False, False]])
def test_schedule_cond_equals_lax_cond_per_member(preds):
  preds = jnp.array(preds)
  x = jnp.arange(9.0).reshape(3, 3) / 4
  n = jnp.arange(3)
  c = jnp.array([1.0, -2.0, 3.0])
  want = jax.vmap(_plain)(preds, x, n, c)
  got = jax.vmap(_ours)(preds, x, n, c)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  # An unbatched predicate over batched operands, and no vmap at all.
  got = jax.vmap(_ours, in_axes=(None, 0, 0, 0))(preds[0], x, n, c)
  want = jax.vmap(_plain, in_axes=(None, 0, 0, 0))(preds[0], x, n, c)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, want)
  for i in range(3):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 _ours(preds[i], x[i], n[i], c[i]), _plain(preds[i], x[i], n[i], c[i]))


def test_schedule_cond_stays_a_conditional_under_vmap():
  """The vmapped jaxpr of ``lax.cond`` computes the true branch (``sin``) outside any
  conditional; ``schedule_cond``'s only inside one."""
  args = (jnp.array([True, False]), jnp.ones((2, 3)), jnp.arange(2), jnp.ones(2))

  def sin_outside_cond(fn):
    eqns = jax.make_jaxpr(jax.vmap(fn))(*args).jaxpr.eqns
    seen = []

    def walk(eqns, inside):
      for e in eqns:
        if e.primitive.name == "sin":
          seen.append(inside)
        for sub in jax.extend.core.jaxprs_in_params(e.params):
          walk(sub.eqns, inside or e.primitive.name == "cond")
    walk(eqns, False)
    assert seen
    return any(not inside for inside in seen)

  assert sin_outside_cond(_plain)
  assert not sin_outside_cond(_ours)


def test_schedule_cond_derivatives_are_lax_conds():
  x, n, c = jnp.array([0.3, -0.2, 0.9]), jnp.array(2), jnp.array(1.5)
  for pred in (True, False):
    f_ours = lambda x, c, pred=pred: jnp.sum(_ours(jnp.array(pred), x, n, c)[0] ** 2)
    f_plain = lambda x, c, pred=pred: jnp.sum(_plain(jnp.array(pred), x, n, c)[0] ** 2)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 jax.grad(f_ours, argnums=(0, 1))(x, c), jax.grad(f_plain, argnums=(0, 1))(x, c))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 jax.jvp(f_ours, (x, c), (jnp.ones(3), 1.0)),
                 jax.jvp(f_plain, (x, c), (jnp.ones(3), 1.0)))
  # vmap of a derivative: both branches, as lax.cond; still the same numbers.
  preds, xs = jnp.array([True, False]), jnp.stack([x, -x])
  g = lambda fn: jax.vmap(jax.grad(lambda x, p: jnp.sum(fn(p, x, n, c)[0] ** 2)))(xs, preds)
  np.testing.assert_allclose(g(_ours), g(_plain), rtol=1e-6)


def test_update_is_differentiable_through_the_refresh():
  """A hypergradient through ``update`` (a refresh is due at step 0): the same with the
  library's conditionals as with ``lax.cond`` everywhere, forward and reverse mode."""
  tx = sngd_jax.sngd()
  p = MODEL.init(jax.random.key(1), X)["params"]
  s = tx.init(p)

  def meta(scale):
    (_, acts), g = jax.value_and_grad(sngd_jax.capture(_loss), has_aux=True)(p)
    u, _ = tx.update(g, s, p, activations=acts)
    return _loss(optax.apply_updates(p, jax.tree.map(lambda t: -scale * t, u)))

  grad = jax.grad(meta)(0.1)
  value, tangent = jax.jvp(meta, (0.1,), (1.0,))
  eps = 1e-3
  fd = (meta(0.1 + eps) - meta(0.1 - eps)) / (2 * eps)
  np.testing.assert_allclose(grad, tangent, rtol=1e-4)
  np.testing.assert_allclose(grad, fd, rtol=2e-2)


def test_named_vmap_emulating_data_parallelism_matches_one_batch():
  """``jax.vmap(..., axis_name="data")`` over 4 shards of a batch with
  ``sngd(axis_name="data")`` (data parallelism emulated on one device): the update is that of
  ``sngd()`` on the whole batch. The schedule keeps a plain ``lax.cond`` there, whose branches
  hold the axis's collectives (``transform._schedule_cond``)."""
  p = MODEL.init(jax.random.key(1), X)["params"]
  xs, ys = X.reshape(4, 8, 8), Y.reshape(4, 8)

  def loss_on(x, y):
    return lambda p: optax.softmax_cross_entropy_with_integer_labels(
        MODEL.apply({"params": p}, x), y).mean()

  tx = sngd_jax.sngd(axis_name="data")

  def shard_update(x, y):
    (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss_on(x, y)), has_aux=True)(p)
    return tx.update(jax.lax.pmean(g, "data"), tx.init(p), p, activations=acts)[0]

  got = jax.jit(jax.vmap(shard_update, axis_name="data"))(xs, ys)
  whole = sngd_jax.sngd()
  (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss_on(X, Y)), has_aux=True)(p)
  want = whole.update(g, whole.init(p), p, activations=acts)[0]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    for i in range(4):
      np.testing.assert_allclose(a[i], b, rtol=2e-4, atol=1e-6)


def test_no_tracer_leaks_with_or_without_vmap():
  """The conditionals keep the traced branches' closed-over values out of what outlives the
  trace (a ``custom_vmap`` rule is kept in the program's equations)."""
  tx = _tx()
  p = MODEL.init(jax.random.key(0), X)["params"]
  ps = jax.vmap(lambda k: MODEL.init(k, X)["params"])(jax.random.split(jax.random.key(0), 2))
  with jax.checking_leaks():
    jax.jit(_step(tx)).lower(p, tx.init(p))
    jax.jit(jax.vmap(_step(tx))).lower(ps, jax.vmap(tx.init)(ps))
