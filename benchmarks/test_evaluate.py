"""evaluate.py's timed runs: the trust-region diagnostic is sampled and does not change the
training, and each record holds what the protocol says."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import eval_tasks, evaluate


def _run(task, opt, lr, steps):
  gen = evaluate.run_steps(task, opt, lr, seed=0, max_steps=steps)
  try:
    while True:
      next(gen)
  except StopIteration as stop:
    return stop.value


def test_diagnostic_is_sampled_and_leaves_training_unchanged():
  task = eval_tasks.mlp("mlp-20-20-20", "pixel")
  task.eval_every = 1000
  rec = _run(task, "sngd", 0.03, 25)
  assert rec["scale_every"] == evaluate.DIAG_EVERY == 10
  assert rec["steps"] == 25 and rec["minor_faults_median"] is not None
  assert 0.0 < rec["mean_scale"] <= 1.0 and 0.0 <= rec["clipped_frac"] <= 1.0
  # Steps 1, 11 and 21 ran the diagnostic step, the others the plain one; the trajectory is
  # the one of a run whose every step is the plain step (an independent loop below).
  pre, post = evaluate.OPTIMIZERS["sngd"](0.03)
  post = optax.with_extra_args_support(post)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  params = task.model.init(jax.random.PRNGKey(0), xs[:2])["params"]
  s_pre, s_post = pre.init(params), post.init(params)
  step = evaluate.make_step(task, pre, post)
  sampler = evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0))
  losses, scales = [], []
  diag = evaluate.make_step(task, pre, post, diagnose=True)
  for t in range(1, 26):
    idx = next(sampler)
    if t in (1, 11, 21):  # the diagnostic's scale from a copy of the state, then the real step
      copy = jax.tree.map(jnp.copy, (params, s_pre, s_post))
      scales.append(float(diag(copy[0], {}, copy[1], copy[2], xs, ys, idx)[5]))
    params, _, s_pre, s_post, loss, one = step(params, {}, s_pre, s_post, xs, ys, idx)
    assert float(one) == 1.0
    losses.append(float(loss))
  # (Two compiled programs share the training part; XLA may fuse it differently in each, so
  # to float32 rounding rather than bit for bit.)
  np.testing.assert_allclose(np.asarray(rec["loss_curve"]), np.asarray(losses), rtol=1e-5)
  assert min(scales) < 1.0  # the early steps are clipped: the sampled scales are informative
  np.testing.assert_allclose(rec["mean_scale"], np.mean(scales), rtol=1e-5)


@pytest.mark.parametrize("opt", ["sngd", "adam"])
def test_init_run_matches_the_model_and_optimizers_own_init(opt):
  """``init_run``, shared by evaluate, compile_time, diag_temp and step_anatomy: the
  model's own variables (BatchNorm statistics included) and each optimizer's own ``init``,
  in buffers of their own (the step donates them)."""
  task = eval_tasks.resnet_bn(1.0)
  pre, post = evaluate.OPTIMIZERS[opt](0.01)
  post = optax.with_extra_args_support(post)
  params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, seed=3)
  ref = task.model.init(jax.random.PRNGKey(3), jnp.asarray(task.x_train[:2]), train=True)
  chex.assert_trees_all_equal(params, ref["params"])
  chex.assert_trees_all_equal(extra, {"batch_stats": ref["batch_stats"]})
  assert jax.tree.leaves(extra)  # the ResNet has BatchNorm statistics
  chex.assert_trees_all_equal(s_post, post.init(ref["params"]))
  if pre is None:
    assert s_pre is None
  else:
    chex.assert_trees_all_equal(s_pre, pre.init(ref["params"]))
  states = [a for a in jax.tree.leaves((s_pre, s_post)) if isinstance(a, jax.Array)]
  pointers = {a.unsafe_buffer_pointer() for a in states}
  assert len(pointers) == len(states)  # no buffer shared between leaves


def test_compiler_options_reach_every_steps_jit(monkeypatch):
  """``--compiler-options`` (the GPU runs without Triton GEMMs, benchmarks/README.md *On a
  GPU*) is given to the step's ``jit``: an option XLA does not know makes the compile fail."""
  task = eval_tasks.mlp("mlp-20-20-20", "pixel")
  pre, post = evaluate.OPTIMIZERS["adam"](0.001)
  post = optax.with_extra_args_support(post)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  args = evaluate.init_run(task, pre, post, 0, xs)
  idx = next(evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0)))
  evaluate.make_step(task, pre, post).lower(*args, xs, ys, idx).compile()
  monkeypatch.setitem(evaluate.COMPILER_OPTIONS, "xla_no_such_option_for_this_test", 1)
  with pytest.raises(Exception, match="xla_no_such_option_for_this_test"):
    evaluate.make_step(task, pre, post).lower(*args, xs, ys, idx).compile()
