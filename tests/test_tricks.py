"""Training tricks of real code through the documented Flax linen path (``sngd_jax.capture``,
``sngd_jax.TrainState``, ``sngd_momentum``): knowledge distillation with a frozen teacher, a
parameter EMA evaluated in the same jitted step, dynamic loss scaling with skipped steps,
drop-path with mixup, cutmix and label smoothing, and ``jax.export`` of a training step.

Each factor is checked against ``E[x~ x~^T]`` over the rows the layer saw, recomputed in
float64 NumPy from an independent forward pass (``np_reference.gram``), and each update
against the float64 damped solve (``np_reference.dense_update``).
"""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from np_reference import assert_factor, dense_update, np64, one_step_kwargs

import sngd_jax

LR = 0.05
# Every step a factor step whose factor is that batch's estimate, and an update the damped
# solve with it (no decay, no prior, no trust region).
ONE = dict(one_step_kwargs(), factor_every=1)


class MLP(nn.Module):
  hidden: int = 8

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(self.hidden, name="hidden")(x)))


def _problem(batch=16):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, 5)), jnp.float32)
  y = jnp.asarray(np.arange(batch) % 3)
  params = MLP().init(jax.random.key(0), x)["params"]
  return params, x, y


def _mlp_rows(p, x):
  """The float64 input rows of the ``hidden`` and ``out`` layers of ``MLP`` at params ``p``."""
  x = np64(x)
  return {"hidden": x,
          "out": np.maximum(x @ np64(p["hidden"]["kernel"]) + np64(p["hidden"]["bias"]), 0)}


def _assert_step(rows, grads, params, new_params, rtol=2e-4):
  """One momentum step from zero trace is ``-LR`` times each layer's damped solve over
  ``rows``."""
  for path, r in rows.items():
    kernel, bias = dense_update(r, grads[path]["kernel"], grads[path]["bias"])
    for name, want in (("kernel", kernel), ("bias", bias)):
      got = (np64(new_params[path][name]) - np64(params[path][name])) / -LR
      np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max(),
                                 err_msg=f"{path}/{name}")


def _sngd_messages(record):
  return [str(w.message) for w in record if str(w.message).startswith("sngd")]


# --- knowledge distillation ------------------------------------------------------------------


class DistillState(sngd_jax.TrainState):
  teacher_params: Any


def _distill_loss(apply_fn, teacher_apply, x, y):
  def loss_fn(params, teacher_params):
    logits = apply_fn({"params": params}, x)
    t_logits = jax.lax.stop_gradient(teacher_apply({"params": teacher_params}, x))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    kd = optax.softmax_cross_entropy(logits / 2.0, jax.nn.softmax(t_logits / 2.0)).mean()
    return 0.5 * ce + 0.5 * 4.0 * kd, logits
  return loss_fn


@pytest.mark.parametrize("teacher", ["same_class", "wider"])
def test_distillation_teacher_in_the_train_state_is_left_out(teacher):
  """A frozen teacher kept in a ``TrainState`` field and passed to the captured loss after the
  student's params: its layers have the student's paths (``hidden``, ``out``; the same
  class with other params, or a wider one), yet each factor is the Gram matrix of the
  student's rows only, the update the float64 damped solve, nothing warns, and the teacher is
  neither in the optimizer state nor changed. (Closed over instead, the teacher's rows pooled
  into the student's factors until 2026-12-06, with a warning: entries of ``hidden``'s factor
  were then off by up to 64 relative, and the wider teacher's rows made ``update`` raise; they
  are now left out too, ``tests/test_closed_over_copies.py``.)"""
  params, x, y = _problem()
  t_model = MLP(hidden=8 if teacher == "same_class" else 16)
  t_params = t_model.init(jax.random.key(1), x)["params"]
  tx = sngd_jax.sngd_momentum(LR, **ONE)
  state = DistillState.create(apply_fn=MLP().apply, params=params, tx=tx,
                              teacher_params=t_params)

  @jax.jit
  def train_step(state, x, y):
    loss_fn = _distill_loss(state.apply_fn, t_model.apply, x, y)
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
    (loss, (_, acts)), grads = grad_fn(state.params, state.teacher_params)
    return state.apply_gradients(grads=grads, activations=acts), grads, acts

  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    new, grads, acts = train_step(state, x, y)
  assert not _sngd_messages(record)
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  rows = _mlp_rows(params, x)
  for path, r in rows.items():
    assert_factor(new.opt_state[0], path, r)
  _assert_step(rows, grads, params, new.params)
  assert jax.tree.structure(new.opt_state) == jax.tree.structure(tx.init(params))
  for a, b in zip(jax.tree.leaves(new.teacher_params), jax.tree.leaves(t_params), strict=True):
    np.testing.assert_array_equal(a, b)


def test_teacher_params_computed_on_in_the_loss_are_left_out():
  """``jax.lax.stop_gradient(teacher_params)`` inside the jitted loss makes new arrays, which
  capture cannot trace back to the later argument by identity; but no gradient of the captured
  function's arguments reaches them, so they are constants of its differentiation and the
  teacher's calls are left out, without a warning, as when the gradient of the teacher's
  output is stopped; the student's rows are the float64 ones. (Until 2026-12-06 they were
  pooled into the student's factors, with a warning.) Captured without a differentiation, the
  warning still names the computed params as a cause it cannot tell apart, and the fix."""
  params, x, y = _problem()
  model = MLP()
  t_params = model.init(jax.random.key(1), x)["params"]
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def on_params(p, t):
    t_logits = model.apply({"params": jax.lax.stop_gradient(t)}, x)
    return ce(model.apply({"params": p}, x)) + jnp.mean(jax.nn.log_softmax(t_logits))

  def on_logits(p, t):
    t_logits = jax.lax.stop_gradient(model.apply({"params": t}, x))
    return ce(model.apply({"params": p}, x)) + jnp.mean(jax.nn.log_softmax(t_logits))

  for loss in (on_params, on_logits):
    with warnings.catch_warnings(record=True) as record:
      warnings.simplefilter("always")
      _, acts = jax.jit(jax.grad(sngd_jax.capture(loss), has_aux=True))(params, t_params)
    assert not _sngd_messages(record)
    assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
    for path, r in _mlp_rows(params, x).items():
      np.testing.assert_allclose(np.asarray(acts[path][0].inputs, np.float64), r,
                                 rtol=1e-5, atol=1e-6)
  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    _, acts = jax.jit(sngd_jax.capture(on_params))(params, t_params)
  messages = _sngd_messages(record)
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 2, "out": 2}
  assert len(messages) == 1 and "jax.lax.stop_gradient(teacher_params)" in messages[0]
  assert "without a differentiation" in messages[0]
  assert "Stop the gradient of the other model's output" in messages[0]


# --- parameter EMA ---------------------------------------------------------------------------


class EmaState(sngd_jax.TrainState):
  ema_params: Any


@pytest.mark.parametrize("where", ["argument", "outside"])
def test_ema_evaluated_in_the_jitted_step_adds_no_rows(where):
  """``ema_params = optax.incremental_update(params, ema_params, 1e-3)`` kept in a
  ``TrainState`` field and evaluated in the same jitted step, inside the captured loss as a
  later argument or after the captured gradient: the second forward pass (other params, the
  same layer paths) adds no rows, so each factor is the Gram matrix of the trained model's
  rows, the update the damped solve, and the EMA and its loss are the float64 ones."""
  params, x, y = _problem()
  ema0 = jax.tree.map(lambda a: a + 0.1, params)
  model = MLP()
  tx = sngd_jax.sngd_momentum(LR, **ONE)
  state = EmaState.create(apply_fn=model.apply, params=params, tx=tx, ema_params=ema0)
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params, ema_params):
      loss = ce(state.apply_fn({"params": params}, x))
      ema_loss = ce(state.apply_fn({"params": ema_params}, x)) if where == "argument" else 0.0
      return loss, ema_loss

    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
    (_, (ema_loss, acts)), grads = grad_fn(state.params, state.ema_params)
    state = state.apply_gradients(grads=grads, activations=acts)
    ema = optax.incremental_update(state.params, state.ema_params, step_size=1e-3)
    if where == "outside":
      ema_loss = ce(state.apply_fn({"params": ema}, x))
    return state.replace(ema_params=ema), grads, acts, ema_loss

  with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    new, grads, acts, ema_loss = train_step(state, x, y)
  assert not _sngd_messages(record)
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  rows = _mlp_rows(params, x)
  for path, r in rows.items():
    assert_factor(new.opt_state[0], path, r)
  _assert_step(rows, grads, params, new.params)
  want_ema = jax.tree.map(lambda n, e: 1e-3 * np64(n) + (1 - 1e-3) * np64(e), new.params, ema0)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               new.ema_params, want_ema)
  evaluated = ema0 if where == "argument" else new.ema_params
  h = _mlp_rows(evaluated, x)["out"]
  logits = h @ np64(evaluated["out"]["kernel"]) + np64(evaluated["out"]["bias"])
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  np.testing.assert_allclose(ema_loss, -logp[np.arange(len(y)), np64(y).astype(int)].mean(),
                             rtol=1e-5)


# --- dynamic loss scaling --------------------------------------------------------------------


class HalfMLP(nn.Module):
  """float32 params, float16 compute: a large loss scale overflows the float16 backward."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8, dtype=jnp.float16, name="hidden")(x))
    return nn.Dense(3, dtype=jnp.float16, name="out")(h).astype(jnp.float32)


class ScaledState(sngd_jax.TrainState):
  scale: jax.Array
  good_steps: jax.Array


def _sngd_state(opt_state):
  (state,) = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(
      s, sngd_jax.SNGDState)) if isinstance(s, sngd_jax.SNGDState)]
  return state


def _scaled_step(period=2):
  """The dynamic loss scaling of mixed-precision code (``jmp.DynamicLossScale``): the loss
  times ``scale``, the gradients divided by it; a step whose gradients are not finite halves
  the scale, ``period`` finite steps in a row double it. The step itself is the ``tx``'s."""

  @jax.jit
  def train_step(state, x, y):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean() * state.scale

    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)
    (_, acts), grads = grad_fn(state.params)
    grads = jax.tree.map(lambda g: g / state.scale, grads)
    finite = jnp.all(jnp.asarray([jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(grads)]))
    good = jnp.where(finite, state.good_steps + 1, 0)
    scale = jnp.where(finite, jnp.where(good == period, state.scale * 2, state.scale),
                      state.scale / 2)
    new = state.apply_gradients(grads=grads, activations=acts)
    return new.replace(scale=scale, good_steps=jnp.where(good == period, 0, good)), finite

  return train_step


@pytest.mark.parametrize("order", ["around_the_chain", "around_sngd", "sngd_alone"])
def test_dynamic_loss_scaling_skipped_steps_leave_the_sngd_state(order):
  """float16 compute with a loss scale that starts at ``2**20``: the first steps' gradients
  overflow and are skipped (the scale halves) until they are finite, then the scale grows
  again until a step overflows. Whichever wrapper skips, a skipped step leaves SNGD's state
  (factors, weights, inverses, step count) as it was, bit for bit, with no NaN, and an
  applied step advances the count and sets the factor to the Gram matrix of that step's rows:
  ``optax.apply_if_finite`` around the whole chain (a full no-op: the run is the one that
  applies only the finite steps with the same scales), around ``sngd()`` inside the chain (a
  later momentum still moves the params by its trace), or none (SNGD's own check, which
  counts the skip in ``num_skipped_steps``)."""
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(16, 5)), jnp.float16).astype(jnp.float32)
        for _ in range(12)]
  y = jnp.asarray(np.arange(16) % 3)
  model = HalfMLP()
  params = model.init(jax.random.key(0), xs[0])["params"]
  kw = dict(ONE, inverse_every=2)

  def make_tx(wrap):
    if wrap == "around_the_chain":
      return optax.apply_if_finite(sngd_jax.sngd_momentum(LR, **kw), 100)
    if wrap == "around_sngd":
      return optax.chain(optax.apply_if_finite(sngd_jax.sngd(**kw), 100),
                         optax.sgd(LR, momentum=0.9))
    return sngd_jax.sngd_momentum(LR, **kw)

  def create(tx):
    return ScaledState.create(apply_fn=model.apply, params=params, tx=tx,
                              scale=jnp.float32(2.0**20), good_steps=jnp.int32(0))

  step = _scaled_step()
  state, finite, scales = create(make_tx(order)), [], []
  for x in xs:
    scales.append(state.scale)
    before = _sngd_state(state.opt_state)
    state, ok = step(state, x, y)
    finite.append(bool(ok))
    after = _sngd_state(state.opt_state)
    assert int(after.count) == int(before.count) + ok
    own_skip = order == "sngd_alone" and not ok
    assert int(after.num_skipped_steps) == int(before.num_skipped_steps) + own_skip
    if ok:
      assert_factor(after, "hidden", np64(x))  # float16 rows: x is float16 already
    else:
      for a, b in zip(jax.tree.leaves(after.replace(num_skipped_steps=before.num_skipped_steps)),
                      jax.tree.leaves(before), strict=True):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(np.asarray(a, np.float64))) for a in jax.tree.leaves(after))
    assert all(np.all(np.isfinite(np.asarray(p))) for p in jax.tree.leaves(state.params))
  assert finite[:2] == [False] * 2 and sum(finite) >= 6, finite
  assert not all(finite[2:]), finite  # the scale grew until a step overflowed again

  if order == "around_the_chain":  # a full no-op: the run of the finite steps only
    ref = create(make_tx("sngd_alone"))
    for x, ok, scale in zip(xs, finite, scales, strict=True):
      if ok:
        ref, _ = step(ref.replace(scale=scale), x, y)
    for a, b in zip(jax.tree.leaves(_sngd_state(state.opt_state)),
                    jax.tree.leaves(_sngd_state(ref.opt_state)), strict=True):
      np.testing.assert_array_equal(a, b)
    # another compiled program: float32 rounding, of the order of eps times the params' scale
    # (an entry of 2.5e-3 in a kernel of entries near 1 was 1.4e-8 off under load)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=1e-6, atol=1e-6 * float(np.max(np.abs(b)))), state.params, ref.params)


# --- drop-path, mixup, cutmix, label smoothing -----------------------------------------------


class DropPath(nn.Module):
  """Stochastic depth as timm and big_vision write it: the residual branch of each example
  kept with probability ``1 - rate`` and scaled by ``1 / (1 - rate)``."""

  rate: float

  @nn.compact
  def __call__(self, branch):
    keep = jax.random.bernoulli(self.make_rng("drop_path"), 1 - self.rate, (branch.shape[0],))
    self.sow("intermediates", "keep", keep)
    return branch * keep[:, None].astype(branch.dtype) / (1 - self.rate)


class ResMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8, name="stem")(x)
    h = h + DropPath(0.5)(nn.Dense(8, name="branch")(nn.relu(h)))
    return nn.Dense(3, name="out")(nn.relu(h))


def _res_rows(p, x, keep):
  """The float64 input rows of ``stem``, ``branch`` and ``out`` of ``ResMLP``."""
  affine = lambda name, a: a @ np64(p[name]["kernel"]) + np64(p[name]["bias"])
  h = affine("stem", x)
  branch_in = np.maximum(h, 0)
  h = h + affine("branch", branch_in) * keep[:, None] / 0.5
  return {"stem": x, "branch": branch_in, "out": np.maximum(h, 0)}


@pytest.mark.parametrize("mix", ["mixup", "cutmix"])
def test_drop_path_with_mixed_inputs_and_smoothed_labels(mix):
  """Per-example drop-path on a residual branch, mixup (``lam x + (1 - lam) x[perm]``) or
  cutmix (a block of features from ``x[perm]``) on the inputs, and label smoothing on the
  mixed targets: each layer's factor is the Gram matrix of the rows it saw (the mixed inputs;
  the branch's input for every example, dropped or not; the sum after the masked branch),
  recomputed in float64 from the drawn mask, and the update the damped solve."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(16, 6))
  y = np.arange(16) % 3
  perm = rng.permutation(16)
  if mix == "mixup":
    lam = 0.7
    x_mix = lam * x + (1 - lam) * x[perm]
  else:
    cut = np.zeros(6)
    cut[2:4] = 1  # features 2 and 3 from the other example: lam = 4 / 6
    lam = 1 - cut.mean()
    x_mix = (1 - cut) * x + cut * x[perm]
  onehot = np.eye(3)[y]
  targets = optax.smooth_labels(jnp.asarray(lam * onehot + (1 - lam) * onehot[perm],
                                            jnp.float32), 0.1)
  model = ResMLP()
  xs = jnp.asarray(x, jnp.float32)
  params = model.init({"params": jax.random.key(0), "drop_path": jax.random.key(1)},
                      xs)["params"]
  tx = sngd_jax.sngd_momentum(LR, **ONE)
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  key = jax.random.key(2)

  @jax.jit
  def train_step(state, x, perm, targets, key):
    if mix == "mixup":
      x = lam * x + (1 - lam) * x[perm]
    else:
      x = jnp.asarray(1 - cut, x.dtype) * x + jnp.asarray(cut, x.dtype) * x[perm]

    def loss_fn(params):
      logits = state.apply_fn({"params": params}, x, rngs={"drop_path": key})
      return optax.softmax_cross_entropy(logits, targets).mean()

    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)
    (_, acts), grads = grad_fn(state.params)
    return state.apply_gradients(grads=grads, activations=acts), grads

  new, grads = train_step(state, xs, jnp.asarray(perm), targets, key)
  _, inter = model.apply({"params": params}, jnp.asarray(x_mix, jnp.float32),
                         rngs={"drop_path": key}, mutable=["intermediates"])
  keep = np.asarray(inter["intermediates"]["DropPath_0"]["keep"][0], np.float64)
  assert 0 < keep.sum() < len(keep)  # some branches dropped, some kept
  rows = _res_rows(params, x_mix, keep)
  for path, r in rows.items():
    assert_factor(new.opt_state[0], path, r)
  _assert_step(rows, grads, params, new.params)


# --- jax.export of a training step -----------------------------------------------------------


def _export_problem(inverse):
  params, x, y = _problem()
  model = MLP()
  kw = dict(ONE, inverse_every=2)
  if inverse == "xla_only":
    kw["inverse"] = sngd_jax.inverse.xla_only(sngd_jax.inverse.auto())
  elif inverse == "host_refresh":
    kw["inverse"] = sngd_jax.inverse.host_refresh(sngd_jax.inverse.auto())
  tx = sngd_jax.sngd_momentum(LR, **kw)

  def step(params, opt_state, x, y):
    def loss_fn(p):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, x), y).mean()

    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  return step, params, tx.init(params), x, y


def _flat(step, treedef):
  """``step`` over the leaves of ``(params, opt_state)``: what ``jax.export`` serializes
  whatever the state's classes (``SNGDState``, optax's named tuples)."""

  def flat_step(leaves, x, y):
    params, opt_state = jax.tree.unflatten(treedef, leaves)
    params, opt_state, loss = step(params, opt_state, x, y)
    return jax.tree.leaves((params, opt_state)), loss

  return flat_step


@pytest.mark.parametrize("inverse", ["default", "xla_only"])
def test_exported_training_step_round_trips(inverse):
  """A jitted training step with ``sngd_momentum``, exported with ``jax.export`` over the
  leaves of ``(params, opt_state)``, serialized, deserialized and called for three steps (two
  refreshes): its params and state are the jitted step's, bit for bit, and its first factors
  the float64 Gram matrices; the default also lowers for ``("cpu", "cuda", "tpu")`` at once.
  (``export`` of the step over the trees themselves compiles too,
  but ``serialize`` refuses their classes, ``SNGDState`` and optax's states alike.)"""
  from jax import export

  step, params, opt_state, x, y = _export_problem(inverse)
  leaves, treedef = jax.tree.flatten((params, opt_state))
  exported = export.export(jax.jit(_flat(step, treedef)))(leaves, x, y)
  assert "callback" not in exported.mlir_module()
  try:
    import flatbuffers  # noqa: F401  (jax.export's serialization needs it)
  except ImportError:
    loaded = exported
  else:
    loaded = export.deserialize(exported.serialize())
    with pytest.raises(ValueError, match="SNGDState"):
      export.export(jax.jit(step))(params, opt_state, x, y).serialize()
  if inverse == "default":  # lowered for GPU and TPU too, on this CPU machine (not run there)
    several = export.export(jax.jit(_flat(step, treedef)), platforms=("cpu", "cuda", "tpu"))
    assert several(leaves, x, y).platforms == ("cpu", "cuda", "tpu")
  jitted = jax.jit(step)
  want = (params, opt_state)
  for i in range(3):
    leaves, loss = loaded.call(leaves, x, y)
    *want, want_loss = jitted(*want, x, y)
    assert float(loss) == float(want_loss)
    for a, b in zip(leaves, jax.tree.leaves(want), strict=True):
      np.testing.assert_array_equal(a, b)
    if i == 0:
      state = jax.tree.unflatten(treedef, leaves)[1][0]
      for path, r in _mlp_rows(params, x).items():
        assert_factor(state, path, r)


def test_exported_step_with_a_host_refresh_is_refused_by_jax():
  """``inverse.host_refresh`` puts a host callback in the step on CPU, which ``jax.export``
  cannot serialize (JAX's own error); ``xla_only`` (above) and the default have none."""
  from jax import export

  step, params, opt_state, x, y = _export_problem("host_refresh")
  leaves, treedef = jax.tree.flatten((params, opt_state))
  with pytest.raises(NotImplementedError, match="host_callbacks"):
    export.export(jax.jit(_flat(step, treedef)))(leaves, x, y)
