"""sngd_jax.MultiSteps against optax.MultiSteps on identical inputs (no sngd inside).

Reference: ``optax.MultiSteps`` itself, fed the same sequence of gradients. Every field the two
states share is compared on every call: the counters, the accumulated gradients and the skip
state exactly, the inner state and the updates exactly for SGD with momentum and to float32
rounding for Adam, whose update XLA compiles as the branch of a ``lax.cond`` here (the inner
optimizer runs on the emitting calls only) and as straight-line code in optax (it runs on every
call and the result is selected): the same arithmetic, fused differently (docs/usage.md).
Then the two intended differences after a non-finite micro-batch that is not skipped.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import sngd_jax

K, CALLS = 3, 7


def _params():
  rng = np.random.default_rng(0)
  return {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
          "b": jnp.asarray(rng.normal(size=4), jnp.float32)}


def _grads(n, seed=1, bad=()):
  """``n`` random gradients; those at the indices ``bad`` hold a NaN and an inf."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    g = {"a": rng.normal(size=(3, 4)), "b": rng.normal(size=4)}
    if i in bad:
      g["a"][0, 1], g["b"][2] = np.nan, np.inf
    out.append(jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), g))
  return out


INNERS = {"sgd_momentum": lambda: optax.sgd(0.1, momentum=0.9),
          "adam": lambda: optax.adam(1e-2),
          "sgd": lambda: optax.sgd(0.1)}  # no state: a NaN update leaves no trace in it


def _run(cls, inner, grads, **kwargs):
  tx = cls(INNERS[inner](), **kwargs)
  update = jax.jit(tx.update)
  params, state, trace = _params(), tx.init(_params()), []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    trace.append((updates, state, bool(tx.has_updated(state))))
  return trace


def _assert_like_optax(ours, theirs, inner):
  """Each call: every field of ``optax.MultiStepsState`` and the updates."""
  exact = np.testing.assert_array_equal
  close = exact if inner == "sgd_momentum" else (
      lambda a, b, **kw: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, **kw))
  for i, ((u1, s1, h1), (u2, s2, h2)) in enumerate(zip(ours, theirs, strict=True)):
    assert h1 == h2, i
    for field in optax.MultiStepsState._fields:
      a, b = getattr(s1, field), getattr(s2, field)
      assert jax.tree.structure(a) == jax.tree.structure(b), (i, field)
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert x.dtype == y.dtype, (i, field)
        (close if field == "inner_opt_state" else exact)(x, y, err_msg=f"call {i}: {field}")
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u2), strict=True):
      assert x.dtype == y.dtype
      close(x, y, err_msg=f"call {i}: updates")


def _k_schedule(step):
  return jnp.where(step < 1, 2, K)  # 2 micro-batches for the first update, then 3


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("schedule", ["int", "callable"])
@pytest.mark.parametrize("use_grad_mean", [True, False])
def test_every_shared_field_equals_optax_multisteps(inner, schedule, use_grad_mean):
  every_k = K if schedule == "int" else _k_schedule
  kwargs = dict(every_k_schedule=every_k, use_grad_mean=use_grad_mean)
  ours = _run(sngd_jax.MultiSteps, inner, _grads(CALLS), **kwargs)
  theirs = _run(optax.MultiSteps, inner, _grads(CALLS), **kwargs)
  _assert_like_optax(ours, theirs, inner)
  emits = [i for i, (_, s, _) in enumerate(ours) if int(s.mini_step) == 0]
  assert emits == ([2, 5] if schedule == "int" else [1, 4])
  for i, (u, _, _) in enumerate(ours):
    assert all(bool(jnp.any(x != 0)) == (i in emits) for x in jax.tree.leaves(u)), i


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam"])
@pytest.mark.parametrize("bad", [(1,), (3, 4)])  # the first cycle's last call; two in a row
def test_skip_not_finite_equals_optax_multisteps(inner, bad):
  """``should_skip_update_fn=optax.skip_not_finite``: the micro-batch is not counted (a
  skipped last one postpones the update to the next call), ``skip_state`` records it."""
  kwargs = dict(every_k_schedule=_k_schedule, should_skip_update_fn=optax.skip_not_finite)
  ours = _run(sngd_jax.MultiSteps, inner, _grads(CALLS + 2, bad=bad), **kwargs)
  theirs = _run(optax.MultiSteps, inner, _grads(CALLS + 2, bad=bad), **kwargs)
  _assert_like_optax(ours, theirs, inner)
  skipped = [i for i, (_, s, _) in enumerate(ours) if bool(s.skip_state["should_skip"])]
  assert skipped == list(bad)
  assert [int(s.skip_state["num_not_finite"]) for _, s, _ in ours] == [
      2 if i in bad else 0 for i in range(CALLS + 2)]
  good = CALLS + 2 - len(bad)  # the updates take 2, 3, 3 good calls
  assert int(ours[-1][1].gradient_step) == (good >= 2) + (good >= 5) + (good >= 8)


def test_a_non_finite_micro_batch_without_skip_leaves_the_next_cycles_clean():
  """The intended difference (docs/usage.md): ``optax.MultiSteps`` zeroes its accumulator by
  ``(1 - emit) * acc``, which keeps a NaN (``0 * NaN``), and returns ``emit * update``, NaN on the
  non-emitting calls too. ``sngd_jax.MultiSteps`` returns zeros on the non-emitting calls and
  starts each cycle from zeros: the bad cycle's update is NaN in both, the later ones (of a
  stateless SGD) only in optax's. Reference: optax.MultiSteps on the gradients without the bad
  cycle."""
  grads = _grads(3 * K, bad=(1,))
  ours = _run(sngd_jax.MultiSteps, "sgd", grads, every_k_schedule=K)
  theirs = _run(optax.MultiSteps, "sgd", grads, every_k_schedule=K)
  nan = lambda tree: any(bool(jnp.any(jnp.isnan(x))) for x in jax.tree.leaves(tree))
  assert [nan(u) for u, _, _ in ours] == [False, False, True] + [False] * 6
  assert [nan(u) for u, _, _ in theirs] == [False] + [True] * 8
  assert [nan(s.acc_grads) for _, s, _ in ours] == [False, True] + [False] * 7
  assert [nan(s.acc_grads) for _, s, _ in theirs] == [False] + [True] * 8
  # past the bad cycle, our accumulated gradients are those of a run without it
  clean = _run(optax.MultiSteps, "sgd", grads[K:], every_k_schedule=K)
  for (u, s, _), (v, c, _) in zip(ours[K:], clean, strict=True):
    jax.tree.map(np.testing.assert_array_equal, (u, s.acc_grads), (v, c.acc_grads))


def test_apply_if_finite_inside_rejects_one_cycle_not_every_later_one():
  """``MultiSteps(optax.apply_if_finite(tx, 3))`` with a NaN micro-batch: the inner
  ``apply_if_finite`` rejects that cycle's update. ``optax.MultiSteps`` keeps the NaN in its
  accumulator, so it rejects the next cycles too, until the fourth non-finite one in a row,
  which ``apply_if_finite`` lets through: NaN in the params;
  ``sngd_jax.MultiSteps`` rejects the one cycle and trains on, as optax.MultiSteps does on the
  gradients without the bad cycle (reference, exact: that cycle's update was zero)."""
  grads = _grads(5 * K, bad=(1,))

  def run(cls, grads):
    tx = cls(optax.apply_if_finite(optax.sgd(0.1, momentum=0.9), 3), every_k_schedule=K)
    update, params = jax.jit(tx.update), _params()
    state = tx.init(params)
    for g in grads:
      updates, state = update(g, state, params)
      params = optax.apply_updates(params, updates)
    return params, state

  (ours, ours_state), (theirs, theirs_state) = (run(sngd_jax.MultiSteps, grads),
                                                run(optax.MultiSteps, grads))
  assert int(ours_state.inner_opt_state.total_notfinite) == 1
  assert int(theirs_state.inner_opt_state.total_notfinite) == 5  # every cycle
  assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(theirs))
  clean, _ = run(optax.MultiSteps, grads[K:])
  jax.tree.map(np.testing.assert_array_equal, ours, clean)
  assert not np.allclose(ours["b"], _params()["b"])


class _MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(5)(x)))


@pytest.mark.parametrize("inner", ["sgd_momentum", "adam"])
def test_train_state_counts_micro_batches_like_flax_with_optax_multisteps(inner):
  """``sngd_jax.TrainState`` with ``sngd_jax.MultiSteps`` (or an ``optax.MultiSteps`` object,
  or its ``gradient_transformation()``) against Flax's ``TrainState`` with
  ``optax.MultiSteps(...).gradient_transformation()``: ``step`` counts calls (micro-batches),
  ``opt_state.gradient_step`` updates, and the params and shared state fields agree (to
  float32 rounding, bit for bit for the same ``optax.MultiSteps``)."""
  model = _MLP()
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(4 * CALLS, 6)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(4 * CALLS, 3)), jnp.float32)
  params = model.init(jax.random.key(0), x[:1])["params"]

  @jax.jit
  def step(state, x, y):
    loss = lambda p: jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)
    return state.apply_gradients(grads=jax.grad(loss)(state.params))

  def run(cls, tx):
    state = cls.create(apply_fn=model.apply, params=params, tx=tx)
    for i in range(CALLS):
      state = step(state, x[4 * i:4 * i + 4], y[4 * i:4 * i + 4])
    return state

  make = lambda cls: cls(INNERS[inner](), every_k_schedule=_k_schedule)
  theirs = run(train_state.TrainState, make(optax.MultiSteps).gradient_transformation())
  exact = np.testing.assert_array_equal
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  for cls, tx, same in [(sngd_jax.TrainState, make(optax.MultiSteps), exact),  # optax's own
                        (sngd_jax.TrainState, make(sngd_jax.MultiSteps), close),
                        (sngd_jax.TrainState, make(sngd_jax.MultiSteps).gradient_transformation(),
                         close),
                        (train_state.TrainState, make(sngd_jax.MultiSteps), close)]:
    ours = run(cls, tx)
    assert int(ours.step) == int(theirs.step) == CALLS
    assert int(ours.opt_state.gradient_step) == int(theirs.opt_state.gradient_step) == 2
    assert int(ours.opt_state.mini_step) == int(theirs.opt_state.mini_step) == 2
    jax.tree.map(same, ours.params, theirs.params)
    jax.tree.map(same, ours.opt_state.inner_opt_state, theirs.opt_state.inner_opt_state)
    jax.tree.map(same, ours.opt_state.acc_grads, theirs.opt_state.acc_grads)
  assert not np.allclose(theirs.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
