"""Flax linen's ImageNet example (``examples/imagenet/train.py`` of google/flax), scaled down to
a tiny ResNet, trained with SNGD following only the docs.

The step is the example's: a ``TrainState`` subclass with ``batch_stats`` (and
``dynamic_scale``), ``loss_fn`` applying the model with ``mutable=['batch_stats']`` and
returning ``(loss, (new_model_state, logits))`` with the example's weight penalty, its gradient
taken by ``jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)`` (or by
``DynamicScale().value_and_grad`` around the same captured loss, in half precision, with the
example's ``jnp.where(is_fin, ...)`` over ``opt_state`` and ``params``), and
``state.apply_gradients(grads=..., activations=..., batch_stats=...)``; under ``jax.pmap`` with
``lax.pmean(grads, 'batch')``, a cross-replica BatchNorm (``axis_name='batch'``, as the
example's ``models.py``) and ``cross_replica_mean`` of the batch statistics.

Every check compares numbers with an independent float64 NumPy forward pass of the ResNet
(conv patches by loops, BatchNorm's ``xhat`` from the batch's mean and variance, max pooling):
each conv's update is the damped solve with the Gram of its patches, each BatchNorm's the
per-channel 2x2 solve over ``[xhat, 1]``, the head's the solve with its pooled features
(``np_reference``), and the running averages are one momentum step from the batch's moments.
"""

import functools
import re
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from flax import traverse_util
from flax.training import dynamic_scale as dynamic_scale_lib
from forced_devices import NUM_DEVICES, run_on_forced_devices
from np_reference import np64

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

LR, MOMENTUM, BN_MOMENTUM, EPS = 0.1, 0.9, 0.9, 1e-5
BATCH, SIZE, CHANNELS, CLASSES = 8, 8, 3, 5
# Every step a factor step whose factor is that batch's estimate, and an update the damped
# solve with it (no decay, no prior, no trust region).
ONE = dict(ref.one_step_kwargs(), factor_every=1)
# (block name, filters, strides): the second block halves the resolution and has a projection.
BLOCKS = (("ResNetBlock_0", 4, (1, 1)), ("ResNetBlock_1", 8, (2, 2)))

multi = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices: run in a subprocess by test_on_8_forced_devices")


# --- the example's model, scaled down (flax/examples/imagenet/models.py) -----------------------

class ResNetBlock(nn.Module):
  filters: int
  conv: Any
  norm: Any
  act: Callable
  strides: tuple = (1, 1)

  @nn.compact
  def __call__(self, x):
    residual = x
    y = self.conv(self.filters, (3, 3), self.strides)(x)
    y = self.norm()(y)
    y = self.act(y)
    y = self.conv(self.filters, (3, 3))(y)
    y = self.norm(scale_init=nn.initializers.zeros_init())(y)
    if residual.shape != y.shape:
      residual = self.conv(self.filters, (1, 1), self.strides, name="conv_proj")(residual)
      residual = self.norm(name="norm_proj")(residual)
    return self.act(residual + y)


class TinyResNet(nn.Module):
  num_classes: int = CLASSES
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  bn_axis: Optional[str] = None  # the example's models pass axis_name='batch' (under pmap)

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=BN_MOMENTUM,
                             epsilon=EPS, dtype=self.dtype, param_dtype=self.param_dtype,
                             axis_name=self.bn_axis)
    x = conv(4, (3, 3), (1, 1), padding=[(1, 1), (1, 1)], name="conv_init")(x)
    x = norm(name="bn_init")(x)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for _, filters, strides in BLOCKS:
      x = ResNetBlock(filters, strides=strides, conv=conv, norm=norm, act=nn.relu)(x)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return jnp.asarray(x, self.dtype)


# --- the example's train step (flax/examples/imagenet/train.py) --------------------------------

class TrainState(sngd_jax.TrainState):
  batch_stats: Any
  dynamic_scale: Any = None  # dynamic_scale_lib.DynamicScale, or None


def cross_entropy_loss(logits, labels):
  one_hot = jax.nn.one_hot(labels, num_classes=CLASSES)
  return optax.softmax_cross_entropy(logits=logits, labels=one_hot).mean()


def example_loss(state, batch):
  def loss_fn(params):
    logits, new_model_state = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"],
        mutable=["batch_stats"])
    loss = cross_entropy_loss(logits, batch["label"])
    weight_l2 = sum(jnp.sum(x ** 2) for x in jax.tree.leaves(params) if x.ndim > 1)
    return loss + 0.0001 * 0.5 * weight_l2, (new_model_state, logits)
  return loss_fn


def train_step(state, batch, axis_name=None, capture=True, evaluate=False):
  """The example's ``train_step`` with SNGD: the loss captured, the activations passed on."""
  loss_fn = example_loss(state, batch)
  wrapped = sngd_jax.capture(loss_fn, has_aux=True) if capture else loss_fn
  dynamic_scale = state.dynamic_scale
  if dynamic_scale:
    grad_fn = dynamic_scale.value_and_grad(wrapped, has_aux=True, axis_name=axis_name)
    dynamic_scale, is_fin, aux, grads = grad_fn(state.params)
  else:
    aux, grads = jax.value_and_grad(wrapped, has_aux=True)(state.params)
    if axis_name is not None:
      grads = jax.lax.pmean(grads, axis_name=axis_name)
  (new_model_state, logits), acts = aux[1] if capture else (aux[1], None)
  new_state = state.apply_gradients(grads=grads, activations=acts,
                                    batch_stats=new_model_state["batch_stats"])
  if dynamic_scale:
    # the example: a step whose gradients are not finite keeps the old opt_state and params
    where = functools.partial(jnp.where, is_fin)
    new_state = new_state.replace(
        opt_state=jax.tree.map(where, new_state.opt_state, state.opt_state),
        params=jax.tree.map(where, new_state.params, state.params),
        dynamic_scale=dynamic_scale)
  out = {"logits": logits, "grads": grads}
  if evaluate:  # the example's eval_step, in the same program, outside the captured loss
    out["eval_logits"] = eval_step(new_state, batch)
  return new_state, out


def eval_step(state, batch):
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return state.apply_fn(variables, batch["image"], train=False, mutable=False)


@functools.lru_cache(maxsize=None)
def _model(dtype, param_dtype, bn_axis=None):
  """One ``TinyResNet`` per configuration: ``apply_fn`` is static in ``jax.jit``, and the
  ``apply`` of another (equal) instance would compile the step again."""
  return TinyResNet(dtype=dtype, param_dtype=param_dtype, bn_axis=bn_axis)


@functools.lru_cache(maxsize=None)
def _variables(seed):
  """The tiny ResNet's initial variables (float32; the same for every compute dtype)."""
  with jax.enable_x64(False):
    return jax.jit(TinyResNet().init)(jax.random.key(seed),
                                      jnp.zeros((1, SIZE, SIZE, CHANNELS), jnp.float32))


def _problem(model, tx, batch=BATCH, dynamic_scale=None, seed=0):
  """A state of ``model`` with ``tx`` and a batch of random images and labels. The params and
  the running averages are cast to ``model.param_dtype`` (Flax makes the running averages
  float32, and a float64 step that returns them as float64 would be compiled again on its
  second call)."""
  rng = np.random.default_rng(seed)
  image = rng.normal(size=(batch, SIZE, SIZE, CHANNELS)) + 0.5
  batch_ = {"image": jnp.asarray(image, model.dtype),
            "label": jnp.asarray(rng.integers(0, CLASSES, size=batch), jnp.int32)}
  cast = lambda t: jax.tree.map(lambda a: jnp.asarray(a, model.param_dtype), t)
  variables = _variables(seed)
  state = TrainState.create(apply_fn=model.apply, params=cast(variables["params"]),
                            batch_stats=cast(variables["batch_stats"]), tx=tx,
                            dynamic_scale=dynamic_scale)
  return state, batch_


def _flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(tree), sep="/")


# --- the float64 NumPy reference ----------------------------------------------------------------

def _np_max_pool(x, window=3, stride=2):
  lo, hi = ref.same_padding(x.shape[1], window, stride, 1)
  xp = np.pad(x, [(0, 0), (lo, hi), (lo, hi), (0, 0)], constant_values=-np.inf)
  out = -(-x.shape[1] // stride)
  pooled = [[xp[:, i * stride:i * stride + window, j * stride:j * stride + window].max((1, 2))
             for j in range(out)] for i in range(out)]
  return np.asarray(pooled).transpose(2, 0, 1, 3)


def np_forward(params, image, running=None):
  """The tiny ResNet in float64 NumPy. Returns ``(rows, moments, logits)``: each layer's rows
  by path (a conv's patches, a BatchNorm's ``xhat``, the head's pooled features) and each
  BatchNorm's batch ``(mean, var)``; ``running``: the batch statistics to normalize with
  (eval mode) instead of the batch's."""
  p = {k: np64(v) for k, v in _flat(params).items()}
  rows, moments = {}, {}

  def conv(path, h, strides, padding="SAME"):
    kernel = p[f"{path}/kernel"]
    r, out = ref.conv_patches(h, kernel.shape[:2], strides, padding, (1, 1), (1, 1), 1)
    rows[path] = r
    return (r @ kernel.reshape(-1, kernel.shape[-1])).reshape(
        (h.shape[0],) + out + (kernel.shape[-1],))

  def bn(path, h):
    if running is None:
      mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    else:
      mean, var = np64(running[f"{path}/mean"]), np64(running[f"{path}/var"])
    moments[path] = (mean, var)
    xhat = (h - mean) / np.sqrt(var + EPS)
    rows[path] = xhat.reshape(-1, xhat.shape[-1])
    return xhat * p[f"{path}/scale"] + p[f"{path}/bias"]

  relu = lambda h: np.maximum(h, 0.0)
  h = conv("conv_init", np64(image), (1, 1), ((1, 1), (1, 1)))
  h = _np_max_pool(relu(bn("bn_init", h)))
  for name, _, strides in BLOCKS:
    y = relu(bn(f"{name}/BatchNorm_0", conv(f"{name}/Conv_0", h, strides)))
    y = bn(f"{name}/BatchNorm_1", conv(f"{name}/Conv_1", y, (1, 1)))
    if h.shape != y.shape:
      h = bn(f"{name}/norm_proj", conv(f"{name}/conv_proj", h, strides))
    h = relu(h + y)
  rows["Dense_0"] = h.mean((1, 2))
  return rows, moments, rows["Dense_0"] @ p["Dense_0/kernel"] + p["Dense_0/bias"]


def reference_preconditioned(params, image, grads, damping=ref.DAMPING):
  """Each layer's damped solve ``(G + damping tr(G) I)^{-1} g`` (flat ``path/name`` keys), with
  ``G`` from the rows of :func:`np_forward` and ``g`` the given gradients."""
  rows, _, _ = np_forward(params, image)
  g = {k: np64(v) for k, v in _flat(grads).items()}
  out = {}
  for path, r in rows.items():
    if f"{path}/scale" in g:  # BatchNorm: per channel, [xhat, 1]
      solve = lambda gm, v: np.linalg.solve(gm + damping * np.trace(gm) * np.eye(2), v)
      s, b = np.zeros(r.shape[1]), np.zeros(r.shape[1])
      for c in range(r.shape[1]):
        col = r[:, c]
        gm = np.array([[np.mean(col * col), np.mean(col)], [np.mean(col), 1.0]])
        s[c], b[c] = solve(gm, np.array([g[f"{path}/scale"][c], g[f"{path}/bias"][c]]))
      out[f"{path}/scale"], out[f"{path}/bias"] = s, b
    else:  # conv (no bias: the Gram of the patches alone) or the Dense head
      bias = g.get(f"{path}/bias")
      kernel = g[f"{path}/kernel"]
      aug = ref.augmented(kernel, bias, r.shape[1])
      gm = ref.linear_factor(r, bias is not None)
      pre = np.linalg.solve(gm + damping * np.trace(gm) * np.eye(gm.shape[0]), aug)
      out[f"{path}/kernel"] = pre[:r.shape[1]].reshape(kernel.shape)
      if bias is not None:
        out[f"{path}/bias"] = pre[r.shape[1]]
  return out


def _assert_close(got, want, rtol, what):
  """``got`` is ``want`` leaf by leaf, to ``rtol`` of the largest entry of the leaf's layer (a
  BatchNorm bias whose gradient is round-off next to its scale's is compared at that scale)."""
  assert set(got) == set(want), (sorted(got), sorted(want))
  for key, w in want.items():
    layer = key.rsplit("/", 1)[0]
    scale = max(np.abs(v).max() for k, v in want.items() if k.rsplit("/", 1)[0] == layer)
    np.testing.assert_allclose(np64(got[key]), w, rtol=rtol, atol=rtol * scale,
                               err_msg=f"{what}: {key}")


# --- 1. the example's step under jax.jit ----------------------------------------------------------

# The optimizers, made once: a state's ``tx`` is static in ``jax.jit``, and a new one each
# test would compile the step again.
TX = sngd_jax.sngd_momentum(LR, momentum=MOMENTUM, **ONE)
SGD = optax.sgd(LR, momentum=MOMENTUM)


def _tx():
  return TX


# One compiled program per variant of the step, shared by the tests.
STEP = jax.jit(train_step)
STEP_WITHOUT_CAPTURE = jax.jit(functools.partial(train_step, capture=False))
STEP_AND_EVAL = jax.jit(functools.partial(train_step, evaluate=True))
EVAL = jax.jit(eval_step)


@functools.lru_cache(maxsize=None)
def _float64_run():
  """The float64 problem and its states after 0, 1 and 2 captured steps (with the outputs)."""
  model = _model(jnp.float64, jnp.float64)
  state, batch = _problem(model, _tx())
  states, outs = [state], []
  for _ in range(2):
    state, out = STEP(state, batch)
    states.append(state)
    outs.append(out)
  return batch, states, outs


def test_two_steps_are_the_float64_damped_solves_of_each_layers_rows():
  """Each step's update of every conv, BatchNorm and the head is ``-LR`` times (momentum
  included) the damped solve with the float64 factor of the rows that layer saw, from an
  independent NumPy forward pass, of the step's gradients (which are those of the loss
  without capture: ``test_batch_stats_are_those_of_the_step_without_capture``)."""
  batch, states, outs = _float64_run()
  trace = None
  for i in range(2):
    state, new, grads = states[i], states[i + 1], outs[i]["grads"]
    pre = reference_preconditioned(state.params, batch["image"], grads)
    trace = pre if trace is None else {k: pre[k] + MOMENTUM * trace[k] for k in pre}
    before, after = _flat(state.params), _flat(new.params)
    got = {k: (np64(after[k]) - np64(before[k])) / -LR for k in before}
    _assert_close(got, trace, 1e-7, f"step {i + 1}: update / -LR")
  assert int(states[-1].step) == 2 and int(states[-1].opt_state[0].num_skipped_steps) == 0
  # the second blocks' zero-initialized BatchNorm scales made their Conv_1 gradients 0 at
  # step 1; at step 2 every layer moved
  assert all(np.abs(v).max() > 0 for v in pre.values())


# float32 compiles two more programs (about 20 s on a loaded 2-core host): slow
@pytest.mark.parametrize("dtype", [pytest.param(jnp.float32, marks=pytest.mark.slow),
                                   jnp.float64])
def test_batch_stats_are_those_of_the_step_without_capture(dtype):
  """The running averages after the captured SNGD step are those of the same step without
  capture and SNGD (``optax.sgd``), bit for bit, and one momentum step from the batch's
  moments (float64 NumPy): capture neither changes nor repeats the BatchNorm update. The
  logits and the gradients are the uncaptured step's as well."""
  if dtype == jnp.float64:
    batch, (state, with_sngd, _), (out, _) = _float64_run()
    model = _model(dtype, dtype)
  else:
    with jax.enable_x64(False):
      model = _model(dtype, dtype)
      state, batch = _problem(model, _tx())
      with_sngd, out = STEP(state, batch)
  plain = state.replace(tx=SGD, opt_state=SGD.init(state.params))
  with jax.enable_x64(dtype == jnp.float64):
    without, out_plain = STEP_WITHOUT_CAPTURE(plain, batch)
  got, want = _flat(with_sngd.batch_stats), _flat(without.batch_stats)
  assert set(got) == set(want) and len(got) == 2 * 6  # 6 BatchNorms: mean and var
  for key in want:
    assert got[key].dtype == dtype, key
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=key)
  for name in ("logits", "grads"):
    for a, b in zip(jax.tree.leaves(out[name]), jax.tree.leaves(out_plain[name]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  _, moments, logits = np_forward(state.params, batch["image"])
  old = _flat(state.batch_stats)
  tol = 1e-10 if dtype == jnp.float64 else 2e-5
  for path, (mean, var) in moments.items():
    for name, batch_value in (("mean", mean), ("var", var)):
      want = BN_MOMENTUM * np64(old[f"{path}/{name}"]) + (1 - BN_MOMENTUM) * batch_value
      np.testing.assert_allclose(np64(got[f"{path}/{name}"]), want, rtol=tol, atol=tol,
                                 err_msg=f"{path}/{name}")
  np.testing.assert_allclose(np64(out["logits"]), logits, rtol=tol, atol=tol)


@pytest.mark.slow  # compiles the step with the eval (about 12 s on a loaded 2-core host)
def test_eval_mode_outside_the_captured_loss_is_unaffected():
  """The example's ``eval_step`` (``train=False``: BatchNorm on the running averages), run in
  the same jitted program after the captured step, changes nothing in the step, and its
  logits are the float64 NumPy eval forward with the new params and running averages."""
  batch, states, _ = _float64_run()
  for i in range(2):
    new, out = STEP_AND_EVAL(states[i], batch)
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(states[i + 1]), strict=True):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, want = np_forward(new.params, batch["image"], running=_flat(new.batch_stats))
    np.testing.assert_allclose(np64(out["eval_logits"]), want, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np64(EVAL(new, batch)), want, rtol=1e-10, atol=1e-10)
  # the eval logits are not the train-mode ones (the running averages are not the batch's)
  _, _, train_logits = np_forward(states[-1].params, batch["image"])
  assert np.abs(want - train_logits).max() > 1e-3


# --- 2. the example's dynamic_scale path, in half precision -------------------------------------

HALF_DAMPING = 0.1  # the float16 rows hold 3 digits: a damping that keeps the solve stable
HALF_TX = sngd_jax.sngd_momentum(LR, momentum=MOMENTUM, **{**ONE, "damping": HALF_DAMPING})


def _half_problem(scale):
  model = _model(jnp.float16, jnp.float32)  # the example's half_precision
  return _problem(model, HALF_TX, dynamic_scale=dynamic_scale_lib.DynamicScale(
      scale=jnp.float32(scale)))


@pytest.mark.slow  # compiles the step with and without the scale (about 35 s, loaded host)
def test_dynamic_scale_step_is_the_damped_solve_of_the_unscaled_gradient():
  """``DynamicScale().value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)``
  in float16: the activations come back in the aux, and the update of every layer is ``-LR``
  times the damped solve of the *unscaled* gradient with the float64 factor of its rows, from
  a float64 forward pass (to the float16 rows' accuracy, a few 1e-2 after the solve; the scale
  is 2^8, so a solve of the scaled gradient would be 256x off, the gradient itself 0.19-6.6
  off). The factors are those of the same step without the scale."""
  state, batch = _half_problem(2.0 ** 8)
  new, out = STEP(state, batch)
  assert float(new.dynamic_scale.scale) == 2.0 ** 8 and int(new.dynamic_scale.fin_steps) == 1
  assert int(new.step) == 1 and int(new.opt_state[0].count) == 1
  grads = out["grads"]
  pre = reference_preconditioned(state.params, batch["image"], grads, damping=HALF_DAMPING)
  before, after = _flat(state.params), _flat(new.params)
  moved = 0
  for key, want in pre.items():
    got = (np64(after[key]) - np64(before[key])) / -LR
    if not np.any(want):  # behind a zero-initialized BatchNorm scale: no gradient at step 1
      assert not np.any(got), key
      continue
    moved += 1
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 5e-2, (key, err)  # at most 2.7e-2 seen; the gradient itself is >= 0.19 off
  assert moved >= 8, moved
  # the same step without the scale (float16 gradients underflow more): the same factors
  unscaled, _ = _half_problem(1.0)
  plain, _ = STEP(unscaled.replace(dynamic_scale=None), batch)
  for a, b in zip(jax.tree.leaves(new.opt_state[0].factors),
                  jax.tree.leaves(plain.opt_state[0].factors), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def test_skipped_non_finite_step_keeps_the_sngd_state_and_params():
  """A scale of 2^40 overflows float16's backward pass: ``is_fin`` is False, and the example's
  ``jax.tree.map(partial(jnp.where, is_fin), new_state.opt_state, state.opt_state)`` keeps
  SNGD's state (factors, inverses, counts) and the params bit for bit, the scale halves, and
  the batch statistics move as the example lets them. The next step from there, at a finite
  scale, is the step from the original state."""
  state, batch = _half_problem(2.0 ** 40)
  step = STEP
  skipped, _ = step(state, batch)
  assert float(skipped.dynamic_scale.scale) == 2.0 ** 39
  assert int(skipped.dynamic_scale.fin_steps) == 0
  for name in ("params", "opt_state"):
    a, b = getattr(skipped, name), getattr(state, name)
    assert jax.tree.structure(a) == jax.tree.structure(b), name
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
      assert x.dtype == y.dtype, name
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  assert int(skipped.step) == 1  # Flax's step counter moves (as in the example)
  assert not np.array_equal(np.asarray(_flat(skipped.batch_stats)["bn_init/mean"]),
                            np.asarray(_flat(state.batch_stats)["bn_init/mean"]))
  scale = dynamic_scale_lib.DynamicScale(scale=jnp.float32(2.0 ** 8))
  resumed, _ = step(skipped.replace(dynamic_scale=scale, batch_stats=state.batch_stats), batch)
  fresh, _ = step(state.replace(dynamic_scale=scale), batch)
  for x, y in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(fresh.opt_state),
                  strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, y in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(fresh.params), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(fresh.opt_state[0].count) == 1 and int(fresh.opt_state[0].num_skipped_steps) == 0


# --- 3. the example's jax.pmap ------------------------------------------------------------------

@pytest.mark.slow  # about 90 s: a child process on 8 forced devices, two pmapped steps
def test_on_8_forced_devices(tmp_path):
  if jax.device_count() >= NUM_DEVICES:
    pytest.skip("this session already has 8 devices; the tests below run directly")
  summary = run_on_forced_devices(__file__, ["-k", "pmap_step or pmap_dynamic_scale"], timeout=600,
                                  log_dir=tmp_path)
  assert re.search(r"^2 passed", summary), summary


@multi
def test_pmap_step_is_the_float64_step_of_the_global_batch():
  """``jax.pmap(train_step, axis_name='batch')`` on 8 devices, 2 examples each, with the
  example's cross-replica BatchNorm (``axis_name='batch'``), ``lax.pmean(grads, 'batch')``
  and ``sngd(axis_name='batch')``: every device's update is ``-LR`` times the float64 damped
  solve with the factors of the global batch's rows, the running averages are one momentum
  step from the global batch's moments, and ``cross_replica_mean`` of them changes nothing."""
  n = NUM_DEVICES
  model = _model(jnp.float64, jnp.float64, "batch")
  tx = sngd_jax.sngd_momentum(LR, momentum=MOMENTUM, axis_name="batch", **ONE)
  state, batch = _problem(model, tx, batch=2 * n)
  p_train_step = jax.pmap(functools.partial(train_step, axis_name="batch"), axis_name="batch")
  cross_replica_mean = jax.pmap(lambda x: jax.lax.pmean(x, "x"), "x")
  shards = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
  new, _ = p_train_step(flax.jax_utils.replicate(state), shards)
  synced = cross_replica_mean(new.batch_stats)

  one_device = _model(jnp.float64, jnp.float64)
  grads = jax.jit(lambda s: jax.grad(lambda p: example_loss(s, batch)(p)[0])(s.params))(
      state.replace(apply_fn=one_device.apply))
  pre = reference_preconditioned(state.params, batch["image"], grads)
  _, moments, _ = np_forward(state.params, batch["image"])
  before = _flat(state.params)
  for d in range(n):
    after = _flat(jax.tree.map(lambda a, d=d: a[d], new.params))
    got = {k: (np64(after[k]) - np64(before[k])) / -LR for k in before}
    _assert_close(got, pre, 1e-7, f"device {d}: update / -LR")
  old = _flat(state.batch_stats)
  stats, synced = _flat(new.batch_stats), _flat(synced)
  for path, (mean, var) in moments.items():
    for name, value in (("mean", mean), ("var", var)):
      want = BN_MOMENTUM * np64(old[f"{path}/{name}"]) + (1 - BN_MOMENTUM) * value
      key = f"{path}/{name}"
      np.testing.assert_allclose(np64(stats[key]), np.broadcast_to(want, stats[key].shape),
                                 rtol=1e-10, atol=1e-12, err_msg=key)
      np.testing.assert_allclose(np64(synced[key]), np64(stats[key]), rtol=1e-12, atol=1e-14)


@multi
def test_pmap_dynamic_scale_step_solves_the_global_unscaled_gradient_and_skips_together():
  """The example's half-precision multi-device path: ``DynamicScale().value_and_grad(...,
  axis_name='batch')`` (which averages the gradients over the devices) around the captured
  loss in float16 under ``jax.pmap``, with ``sngd(axis_name='batch')``. A finite step's update
  on every device is the damped solve of the global unscaled gradient with the float64 factors
  of the global batch's rows (to the float16 rows' accuracy, as on one device); at a scale of
  2^40 every device skips, keeping SNGD's state and the params bit for bit."""
  n = NUM_DEVICES
  model = _model(jnp.float16, jnp.float32, "batch")
  tx = sngd_jax.sngd_momentum(LR, momentum=MOMENTUM, axis_name="batch",
                              **{**ONE, "damping": HALF_DAMPING})
  p_train_step = jax.pmap(functools.partial(train_step, axis_name="batch"), axis_name="batch")
  for scale in (2.0 ** 8, 2.0 ** 40):
    state, batch = _problem(model, tx, batch=2 * n, dynamic_scale=dynamic_scale_lib.DynamicScale(
        scale=jnp.float32(scale)))
    shards = jax.tree.map(lambda a: a.reshape((n, -1) + a.shape[1:]), batch)
    new, out = p_train_step(flax.jax_utils.replicate(state), shards)
    finite = scale < 2.0 ** 20
    np.testing.assert_array_equal(np.asarray(new.dynamic_scale.scale),
                                  np.full(n, scale if finite else scale / 2, np.float32))
    if not finite:
      for name in ("params", "opt_state"):
        for a, b in zip(jax.tree.leaves(getattr(new, name)),
                        jax.tree.leaves(getattr(state, name)), strict=True):
          for d in range(n):
            np.testing.assert_array_equal(np.asarray(a[d]), np.asarray(b), err_msg=name)
      continue
    grads = jax.tree.map(lambda a: a[0], out["grads"])  # averaged over the devices
    pre = reference_preconditioned(state.params, batch["image"], grads, damping=HALF_DAMPING)
    before = _flat(state.params)
    for d in range(n):
      after = _flat(jax.tree.map(lambda a, d=d: a[d], new.params))
      for key, want in pre.items():
        got = (np64(after[key]) - np64(before[key])) / -LR
        if not np.any(want):
          assert not np.any(got), key
          continue
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert err < 5e-2, (d, key, err)


def test_pmap_without_axis_name_warns_naming_pmap():
  """Under ``jax.pmap`` (on the local device), ``sngd`` without ``axis_name`` warns that each
  device estimates from its own shard, naming ``pmap`` (the message named ``shard_map`` only,
  which a user of the example's pmap does not write), and a wrong name is refused so."""
  model = nn.Dense(2)
  params = model.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x) ** 2)
  replicate = lambda t: jax.tree.map(lambda a: a[None], t)

  def run(tx):
    def step(p, s, x):
      (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(p, x)
      return tx.update(g, s, p, activations=acts)[1].count
    return jax.pmap(step, axis_name="batch")(replicate(params), replicate(tx.init(params)),
                                             jnp.ones((1, 4, 3)))

  with pytest.warns(UserWarning, match=r"inside a `shard_map` or `pmap` over the manual axes "
                                       r"\('batch',\).*sngd\(axis_name='batch'\)"):
    run(sngd_jax.sngd())
  with pytest.raises(ValueError, match=r"`axis_name='data'` names an axis that is not bound.*"
                                       r"inside a `shard_map` or `pmap` over the axes "
                                       r"\('batch',\)"):
    run(sngd_jax.sngd(axis_name="data"))
  assert int(run(sngd_jax.sngd(axis_name="batch"))[0]) == 1
