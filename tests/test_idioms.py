"""Training-loop idioms around capture: transforms imported by name, other model copies."""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from jax import vmap as imported_vmap  # bound at import: capture cannot replace it

import sngd_jax


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, name="hidden")(x)))


def _problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  model = MLP()
  return model, model.init(jax.random.key(0), x)["params"], x, y


def _sngd_warnings(fn, *args):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
  return out, [str(w.message) for w in caught if str(w.message).startswith("sngd:")]


def test_vmap_imported_by_name_is_named_in_the_warning():
  model, params, x, y = _problem()
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  by_module = lambda p: ce(jax.vmap(lambda xi: model.apply({"params": p}, xi))(x))
  by_name = lambda p: ce(imported_vmap(lambda xi: model.apply({"params": p}, xi))(x))
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(by_module), params)
  assert not messages
  # the per-example calls under jax.vmap are the batch's rows: the hidden layer saw x
  np.testing.assert_array_equal(acts["hidden"][0].inputs.reshape(x.shape), x)
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(by_name), params)
  assert "hidden" not in acts and "out" not in acts
  assert messages and all("from jax import" in m and "`jax.vmap`" in m for m in messages)


def _distill(model, x, y):
  def distill(p, t):
    logits = model.apply({"params": p}, x)
    t_logits = jax.lax.stop_gradient(model.apply({"params": t}, x))
    return (optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            + optax.softmax_cross_entropy(logits, jax.nn.softmax(t_logits)).mean())
  return distill


def test_teacher_passed_as_another_argument_is_left_out_without_a_warning():
  """``distill(params, teacher)``: the teacher's params are a leaf of the captured function's
  second argument, so its calls are left out (as ``capture_nnx`` and ``capture_eqx`` leave out
  a model passed as another argument): each layer has the student's call only, whose rows are
  the float64 inputs of the student's layers. Before, they were pooled, with a warning."""
  model, params, x, y = _problem()
  teacher = model.init(jax.random.key(1), x)["params"]
  step = jax.jit(jax.grad(sngd_jax.capture(_distill(model, x, y)), has_aux=True))
  (_, acts), messages = _sngd_warnings(step, params, teacher)
  assert not messages
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  h = np.maximum(np.asarray(x, np.float64) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0)
  np.testing.assert_allclose(np.asarray(acts["out"][0].inputs, np.float64), h, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(acts["hidden"][0].inputs, x)


@pytest.mark.parametrize("first", ["x", "params"])
def test_params_passed_after_the_batch_are_still_the_models(first):
  """``loss(x, params)`` differentiated with ``argnums=1``: the first argument holds no layer
  weight, so the params of a later argument are the model's (recorded, as before); only when
  the first argument holds them are the other arguments' weights left out."""
  model, params, x, y = _problem()
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  if first == "x":
    loss, args, argnums = (lambda x, p: ce(model.apply({"params": p}, x))), (x, params), 1
  else:
    loss, args, argnums = (lambda p, x: ce(model.apply({"params": p}, x))), (params, x), 0
  (_, acts), messages = _sngd_warnings(
      jax.grad(sngd_jax.capture(loss), argnums=argnums, has_aux=True), *args)
  assert not messages and sorted(acts) == ["hidden", "out"]
  np.testing.assert_array_equal(acts["hidden"][0].inputs, x)


def test_teacher_copy_closed_over_by_the_capture_warns_and_is_pooled():
  """Captured without a differentiation (the wrapped loss called as it is), nothing tells the
  teacher's weights from the student's: its calls are pooled, with the warning. (Differentiated,
  as in a training step, they are left out: ``tests/test_closed_over_copies.py``.)"""
  model, params, x, y = _problem()
  teacher = model.init(jax.random.key(1), x)["params"]
  distill = _distill(model, x, y)
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(lambda p: distill(p, teacher)), params)
  assert any("'out'" in m and "2 different weight arrays" in m for m in messages)
  assert any("'hidden'" in m for m in messages)
  # pooled, as documented: the out layer's rows are the student's then the teacher's hidden
  h = lambda q: np.maximum(np.asarray(x, np.float64) @ np.asarray(q["hidden"]["kernel"], np.float64)
                           + np.asarray(q["hidden"]["bias"], np.float64), 0)
  rows = np.concatenate([np.asarray(c.inputs, np.float64) for c in acts["out"]])
  np.testing.assert_allclose(rows, np.concatenate([h(params), h(teacher)]), rtol=1e-5, atol=1e-5)


def test_two_models_with_the_same_layer_paths_are_named_in_the_warning():
  """A GAN's generator step: the discriminator runs inside the captured loss, and both
  models' first layer is 'Dense_0' (8x6 and 8x1 kernels, the same 8 inputs). In the
  generator's step (the captured loss differentiated) the discriminator's params are constants
  of that differentiation: its calls are left out, as when it is passed as an argument. Captured
  without a differentiation nothing tells them apart: their calls pool into one factor, and the
  warning says these are two models, not a copy, and the fix."""

  class Gen(nn.Module):
    @nn.compact
    def __call__(self, z):
      return nn.Dense(6)(jnp.tanh(nn.Dense(8)(z)))  # Dense_0 is the output layer

  class Disc(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(1)(jnp.tanh(nn.Dense(8)(x)))[..., 0]

  z = jnp.asarray(np.random.default_rng(0).normal(size=(16, 6)), jnp.float32)
  gen, disc = Gen(), Disc()
  pg = gen.init(jax.random.key(0), z)["params"]
  pd = disc.init(jax.random.key(1), z)["params"]
  gen_loss = lambda pg, pd: -jnp.mean(disc.apply({"params": pd}, gen.apply({"params": pg}, z)))
  # the discriminator closed over by the differentiated loss: left out, the generator's rows
  (_, acts), messages = _sngd_warnings(
      jax.grad(sngd_jax.capture(lambda pg: gen_loss(pg, pd)), has_aux=True), pg)
  assert not messages and {k: len(v) for k, v in acts.items()} == {"Dense_0": 1, "Dense_1": 1}
  q = jax.tree.map(lambda a: np.asarray(a, np.float64), pg)
  np.testing.assert_allclose(np.asarray(acts["Dense_0"][0].inputs, np.float64),
                             np.tanh(np.asarray(z, np.float64) @ q["Dense_1"]["kernel"]
                                     + q["Dense_1"]["bias"]), rtol=1e-5, atol=1e-6)
  # captured without a differentiation: pooled, with the warning
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(lambda pg: gen_loss(pg, pd)), pg)
  assert len(acts["Dense_0"]) == 2  # the generator's output layer and the discriminator's
  (message,) = [m for m in messages if "'Dense_0'" in m]
  assert "different shapes ((8, 1), (8, 6))" in message
  assert "two different models" in message and "distinct names" in message
  # passed as another argument: left out, the generator's layers only (its own inputs)
  (_, acts), messages = _sngd_warnings(
      jax.grad(sngd_jax.capture(gen_loss), has_aux=True), pg, pd)
  assert not messages and {k: len(v) for k, v in acts.items()} == {"Dense_0": 1, "Dense_1": 1}
  np.testing.assert_array_equal(acts["Dense_1"][0].inputs, z)


@pytest.mark.parametrize("twice", ["shared layer", "two applies, same params"])
def test_calls_with_the_same_weights_do_not_warn(twice):
  model, params, x, y = _problem()

  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
      d = nn.Dense(6)
      return d(nn.relu(d(x)))

  if twice == "shared layer":
    m = Shared()
    p = m.init(jax.random.key(0), x)["params"]
    loss = lambda p: jnp.sum(m.apply({"params": p}, x) ** 2)
  else:
    p = params
    loss = lambda p: jnp.sum(model.apply({"params": p}, x) ** 2 + model.apply({"params": p}, 2 * x))
  (_, acts), messages = _sngd_warnings(jax.grad(sngd_jax.capture(loss), has_aux=True), p)
  assert not messages
  assert all(len(calls) == 2 for calls in acts.values())


@pytest.mark.parametrize("rule", ["custom_vjp", "custom_jvp"])
def test_layers_inside_a_users_custom_rule_are_captured_when_the_loss_is_differentiated(rule):
  """A ``jax.custom_vjp`` (or ``custom_jvp``) around the model that halves its gradient: in
  the training step, which differentiates the loss, JAX runs ``fwd`` (the jvp rule) in the
  enclosing trace and the layer calls are captured; the update is the float64 solve against
  the layers' inputs.
  ``coverage`` traces the loss as the training step does (under ``jax.vjp``) and lists the
  layers with their factors, without a warning. Where the loss is only evaluated (``jax.jit``
  without a gradient) the calls are inside the custom rule's own trace: not captured, with
  the warning."""
  with jax.enable_x64(True):
    model, _, x, _ = _problem()
    x = x.astype(jnp.float64)
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), x)[
        "params"])
    apply = lambda p, x: model.apply({"params": p}, x)

    if rule == "custom_vjp":
      scaled = jax.custom_vjp(apply)
      scaled.defvjp(lambda p, x: jax.vjp(apply, p, x), lambda vjp, g: vjp(0.5 * g))
    else:
      scaled = jax.custom_jvp(apply)

      @scaled.defjvp
      def _(primals, tangents):
        y, t = jax.jvp(apply, primals, tangents)
        return y, 0.5 * t
    loss = lambda p: jnp.sum(jnp.sin(scaled(p, x)))
    step = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))
    ((_, acts), grads), messages = _sngd_warnings(step, params)
    assert not messages
    plain = jax.grad(lambda p: jnp.sum(jnp.sin(apply(p, x))))(params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 0.5 * b, rtol=1e-12), grads, plain)
    tx = sngd_jax.sngd(**ref.one_step_kwargs())
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    p = jax.tree.map(np.asarray, params)
    hidden = np.maximum(np.asarray(x) @ p["hidden"]["kernel"] + p["hidden"]["bias"], 0.0)
    for name, rows in (("hidden", np.asarray(x)), ("out", hidden)):
      kernel, bias = ref.dense_update(rows, grads[name]["kernel"], grads[name]["bias"])
      np.testing.assert_allclose(updates[name]["kernel"], kernel, rtol=1e-8, atol=1e-12)
      np.testing.assert_allclose(updates[name]["bias"], bias, rtol=1e-8, atol=1e-12)
    (_, acts), messages = _sngd_warnings(jax.jit(sngd_jax.capture(loss)), params)
    assert acts == {} and any("'hidden'" in m for m in messages)
    report, messages = _sngd_warnings(sngd_jax.coverage, loss, params)
    assert not messages and report.missing == []
    fisher = {p.path: p.fisher for p in report.params}
    assert fisher["hidden/kernel"] == f"linear/dense {x.shape[1] + 1}x{x.shape[1] + 1}"
    assert fisher["out/kernel"] == f"linear/dense {hidden.shape[1] + 1}x{hidden.shape[1] + 1}"


class _Backbone(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.Dense(8)(x))  # 'Dense_0', reading the images
    return nn.relu(nn.Dense(8)(h))


class _Probe(nn.Module):
  @nn.compact
  def __call__(self, h):
    return nn.Dense(3)(h)  # 'Dense_0' too: a new head applied by its own `apply`


@pytest.mark.parametrize("in_features", [6, 8])
def test_frozen_backbone_applied_in_the_capture_is_named_as_the_cause(in_features):
  """A linear probe written as two applies in one loss: a frozen pretrained backbone
  (``backbone.apply(frozen, x)``) and the trained head (``head.apply(p, h)``). Both name
  their first layer 'Dense_0'. In the training step (the captured loss differentiated) the
  backbone's params are constants of that differentiation: its calls are left out of the
  head's 'Dense_0', which gets the float64 factor of the features, as when the backbone is
  applied outside the captured function; ``coverage`` (which differentiates too) finds
  nothing missing. Captured without a differentiation, the backbone's first layer is
  captured at the head's path: the capture warning names that cause (it blamed a teacher or
  EMA copy) and, where the widths differ, so does ``update`` (it suggested
  ``fisher={'Dense_0': ('linear', 1)}``, a wrong fix)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, in_features)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  backbone, probe = _Backbone(), _Probe()
  frozen = backbone.init(jax.random.key(0), x)["params"]
  feats = backbone.apply({"params": frozen}, x)
  params = probe.init(jax.random.key(1), feats)["params"]
  ce = lambda logits, y: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def loss(p, x, y):
    return ce(probe.apply({"params": p}, backbone.apply({"params": frozen}, x)), y)

  tx = sngd_jax.sngd(decay=0.0, prior="none")
  h = np.concatenate([np.asarray(feats, np.float64), np.ones((16, 1))], axis=1)
  head_loss = lambda p, h, y: ce(probe.apply({"params": p}, h), y)
  # the training step, and the backbone outside the captured function with its features passed
  # in: the head's factor is that of the features
  for fn, args in ((loss, (x, y)), (head_loss, (feats, y))):
    (grads, acts), messages = _sngd_warnings(
        jax.grad(sngd_jax.capture(fn), has_aux=True), params, *args)
    assert not messages and len(acts["Dense_0"]) == 1
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
    np.testing.assert_allclose(np.asarray(state.factors["Dense_0"]), h.T @ h / 16, rtol=1e-5,
                               atol=1e-6)
  report, messages = _sngd_warnings(sngd_jax.coverage, loss, params, x, y)
  assert not messages and report.missing == []
  # captured without a differentiation: the backbone's first layer at the head's path
  (_, acts), messages = _sngd_warnings(sngd_jax.capture(loss), params, x, y)
  assert any("'Dense_0'" in m and "different shapes" in m for m in messages), messages
  if in_features != 8:
    with pytest.raises(ValueError, match=r"frozen pretrained backbone") as err:
      tx.update(grads, tx.init(params), params, activations=acts)
    assert "('linear', 1)" not in str(err.value)


class _Finetuned(nn.Module):
  def setup(self):
    self.body = _Backbone()
    self.head = nn.Dense(3)

  def __call__(self, x):
    return self.head(self.body(x))


def test_a_part_applied_on_a_subtree_of_the_params_is_named_in_the_error():
  """A frozen body and a trained head applied each by its own ``apply`` on a subtree of one
  params tree (``_Backbone().apply({'params': p['body']}, x)``): capture names their layers
  from those roots ('Dense_0', ''), not 'body/Dense_0', 'head'. The error for the missing
  layer says so and gives the fix (it only listed the captured paths); the fix, the parts
  called through the model with ``method=``, gives the head the float64 factor of the body's
  features and the body (zero gradients under ``stop_gradient``) a zero update."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, size=16))
  model = _Finetuned()
  params = model.init(jax.random.key(0), x)["params"]
  ce = lambda logits: optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  def by_subtree(p):
    h = jax.lax.stop_gradient(_Backbone().apply({"params": p["body"]}, x))
    return ce(nn.Dense(3).apply({"params": p["head"]}, h))

  def by_method(p):
    h = jax.lax.stop_gradient(model.apply({"params": p}, x, method=lambda m, x: m.body(x)))
    return ce(model.apply({"params": p}, h, method=lambda m, h: m.head(h)))

  tx = sngd_jax.sngd(decay=0.0, prior="none")
  grads, acts = jax.grad(sngd_jax.capture(by_subtree), has_aux=True)(params)
  with pytest.raises(ValueError, match=r"captured as 'Dense_0' may be this layer's: a module "
                     r"applied by its own `apply` on the subtree 'body'.*method="):
    tx.update(grads, tx.init(params), params, activations=acts)
  grads, acts = jax.grad(sngd_jax.capture(by_method), has_aux=True)(params)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  h = np.asarray(model.apply({"params": params}, x, method=lambda m, x: m.body(x)), np.float64)
  h = np.concatenate([h, np.ones((16, 1))], axis=1)
  np.testing.assert_allclose(np.asarray(state.factors["head"]), h.T @ h / 16, rtol=1e-5,
                             atol=1e-6)
  assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(updates["body"]))
  assert all(np.all(np.isfinite(np.asarray(u))) for u in jax.tree.leaves(updates))


class MoE(nn.Module):
  """Top-1 routing with a static capacity: each expert's tokens are gathered into a
  ``(capacity, D)`` buffer whose unused slots are zero rows (padding)."""

  experts: int = 3
  capacity: int = 4

  @nn.compact
  def __call__(self, x):
    logits = nn.Dense(self.experts, name="router")(x)
    onehot = jax.nn.one_hot(jnp.argmax(logits, -1), self.experts, dtype=jnp.int32)
    pos = (jnp.cumsum(onehot, 0) - 1) * onehot  # each token's slot in its expert's buffer
    keep = (onehot * (pos < self.capacity)).astype(x.dtype)  # tokens past capacity dropped
    dispatch = keep[..., None] * jax.nn.one_hot(pos, self.capacity, dtype=x.dtype)
    buffers = jnp.einsum("tec,td->ecd", dispatch, x)
    experts = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True})
    out = experts(6, name="experts")(buffers)
    y = jnp.einsum("tec,ech->th", dispatch, out)
    return jnp.sum(y ** 2) + 1e-3 * jnp.sum(logits ** 2), buffers


def test_moe_padding_rows_enter_each_experts_factor():
  """docs/layer-coverage.md: the experts (one ``nn.vmap``-ed ``Dense``) get one factor each
  over their capacity's rows, the zero rows of unused slots included (they are ``[0; 1]``):
  each factor equals float64 ``E[x~ x~^T]`` over the whole buffer, not over its tokens only."""
  with jax.enable_x64(True):
    model = MoE()
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 5)))
    params = model.init(jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: a.astype(jnp.float64), params)
    loss = lambda p, x: model.apply({"params": p}, x)[0]
    tx = sngd_jax.sngd(**ref.one_step_kwargs())
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    state = tx.init(params)
    _, state = tx.update(grads, state, params, activations=acts)
    assert int(state.num_skipped_steps) == 0
    got = np.asarray(sngd_jax.damped_factors(state, damping=0.0, abs_damping=0.0)["experts"])
    buffers = np.asarray(model.apply({"params": params}, x)[1])
    padded = 0
    for e, rows in enumerate(buffers):
      np.testing.assert_allclose(got[e], ref.linear_factor(rows), rtol=1e-12, atol=1e-15)
      padded += int(np.sum(~np.any(rows != 0, axis=1)))
    assert padded > 0  # the check above covers padding rows


# --- weight reparametrizations: nn.map_variables, nn.WeightNorm -----------------------------

_C = 3.0


class _Scaled(nn.Module):
  """A Dense run with ``W = c V`` (``nn.map_variables``): its bias scaled too (``"all"``), not
  scaled (``"kernel"``), or no bias (``"no_bias"``)."""

  mode: str

  @nn.compact
  def __call__(self, x):
    scale = lambda k, a: _C * a if (self.mode != "kernel" or k == "kernel") else a
    fn = lambda v: {"params": {k: scale(k, a) for k, a in v["params"].items()}}
    layer = nn.map_variables(nn.Dense, "params", trans_in_fn=fn, init=True)
    return layer(2, name="lin", use_bias=self.mode != "no_bias", param_dtype=jnp.float64)(x)


class _Plain(nn.Module):
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    return nn.Dense(2, name="lin", use_bias=self.use_bias, param_dtype=jnp.float64)(x)


def _sin_loss(model):
  return lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))


def _one_update(loss, params, x):
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  return grads, tx.update(grads, tx.init(params), params, activations=acts)[0]


@pytest.mark.usefixtures("x64")
@pytest.mark.parametrize("mode", ["all", "no_bias", "kernel"])
def test_map_variables_scaling_gives_c_squared_times_the_plain_layers_step(mode):
  """docs/layer-coverage.md: the stored params ``V`` are preconditioned with the layer's input
  factor as if they were the weights, ``(G + rho I)^{-1} g_V``. With every weight scaled,
  ``W = c V`` and ``b = c b_V`` (or no bias), the step on the weights is ``c^2`` times SNGD's
  on a plain layer holding them (float64 damped solve); with the kernel alone scaled and a bias
  left as it is, it is no multiple of it."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)))
  model = _Scaled(mode)
  v = model.init(jax.random.key(0), x)["params"]
  grads_v, u = _one_update(_sin_loss(model), v, x)
  c_b = 1.0 if mode == "kernel" else _C
  w = {"lin": {k: (_C if k == "kernel" else c_b) * a for k, a in v["lin"].items()}}
  plain = _Plain(use_bias=mode != "no_bias")
  g_w = jax.grad(_sin_loss(plain))(w, x)["lin"]  # the plain layer's gradient, no sngd
  np.testing.assert_allclose(grads_v["lin"]["kernel"], _C * g_w["kernel"], rtol=1e-12)
  xs = np.asarray(x)
  ref.assert_dense_update(xs, grads_v["lin"], u["lin"], rtol=1e-10)  # the raw-gradient solve
  kernel, bias = ref.dense_update(xs, g_w["kernel"], g_w.get("bias"))  # SNGD on the weights
  step_w = _C * np.asarray(u["lin"]["kernel"])
  if mode == "kernel":
    ratio = step_w / kernel
    assert np.ptp(ratio) > 1.0, ratio  # no single factor, c^2 or other
    return
  np.testing.assert_allclose(step_w, _C ** 2 * kernel, rtol=1e-10)
  if mode == "all":
    np.testing.assert_allclose(c_b * np.asarray(u["lin"]["bias"]), _C ** 2 * bias, rtol=1e-10)


@pytest.mark.usefixtures("x64")
def test_weight_norm_preconditions_the_raw_gradient_of_v():
  """docs/layer-coverage.md: under ``nn.WeightNorm`` (``W_j = s_j V_j / ||V_j||`` per output
  column) the stored kernel ``V`` gets ``(G + rho I)^{-1} g_V``, its scale passes through, and
  ``g_V`` is ``g_W`` projected off ``V_j`` and scaled by ``s_j / ||V_j||``: the step that makes
  on ``W`` is not parallel to SNGD's on a plain layer holding ``W`` (float64 numpy)."""
  class WN(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.WeightNorm(nn.Dense(2, name="lin", param_dtype=jnp.float64), name="wn")(x)

  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4)))
  model = WN()
  params = model.init(jax.random.key(0), x)["params"]
  params["wn"]["lin/kernel/scale"] = jnp.array([0.7, 1.9])
  grads, u = _one_update(_sin_loss(model), params, x)
  xs = np.asarray(x)
  ref.assert_dense_update(xs, grads["lin"], u["lin"], rtol=1e-10)
  np.testing.assert_array_equal(u["wn"]["lin/kernel/scale"], grads["wn"]["lin/kernel/scale"])
  vk = np.asarray(params["lin"]["kernel"])
  s, n = np.asarray(params["wn"]["lin/kernel/scale"]), np.linalg.norm(vk, axis=0)
  w = {"lin": {"kernel": jnp.asarray(s * vk / n), "bias": params["lin"]["bias"]}}
  g_w = np.asarray(jax.grad(_sin_loss(_Plain()))(w, x)["lin"]["kernel"])
  dw_of_dv, g_v = np.zeros_like(vk), np.zeros_like(vk)
  for j in range(vk.shape[1]):
    vhat = vk[:, j] / n[j]
    proj = (s[j] / n[j]) * (np.eye(vk.shape[0]) - np.outer(vhat, vhat))  # dW_j / dV_j
    g_v[:, j] = proj @ g_w[:, j]
    dw_of_dv[:, j] = proj @ np.asarray(u["lin"]["kernel"])[:, j]
  np.testing.assert_allclose(grads["lin"]["kernel"], g_v, rtol=1e-10, atol=1e-14)
  kernel, _ = ref.dense_update(xs, g_w, np.asarray(grads["lin"]["bias"]))  # SNGD on W
  cos = np.sum(dw_of_dv * kernel) / (np.linalg.norm(dw_of_dv) * np.linalg.norm(kernel))
  assert cos < 0.99, cos


class _Encoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    return jnp.tanh(nn.Dense(3, use_bias=False, name="enc", param_dtype=jnp.float64)(x))


@pytest.mark.usefixtures("x64")
def test_linen_kernel_taken_from_the_params_gets_its_calls_factor_only():
  """docs/layer-coverage.md: a tied autoencoder decoding with the linen kernel taken from the
  params (``h @ params['enc']['kernel'].T`` in the loss) is not seen: the kernel's update is the
  encoder rows' damped factor applied to the sum of both uses' gradients (float64), as NNX's
  ``h @ enc.kernel.T`` (tests/test_nnx_layers.py)."""
  model = _Encoder()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 5)))
  params = model.init(jax.random.key(0), x)["params"]
  decoded = lambda p, x: model.apply({"params": p}, x) @ p["enc"]["kernel"].T
  loss = lambda p, x: jnp.sum(jnp.sin(decoded(p, x)))
  assert "linear/dense 5x5" in str(sngd_jax.coverage(loss, params, x))
  grads, u = _one_update(loss, params, x)
  k0 = params["enc"]["kernel"]
  enc_use = jax.grad(lambda k: jnp.sum(jnp.sin(
      model.apply({"params": {"enc": {"kernel": k}}}, x) @ k0.T)))(k0)
  assert np.max(np.abs(np.asarray(grads["enc"]["kernel"] - enc_use))) > 1e-2  # both uses
  kernel, _ = ref.dense_update(np.asarray(x), grads["enc"]["kernel"], None)
  np.testing.assert_allclose(u["enc"]["kernel"], kernel, rtol=1e-10)
