"""A second copy of the model that the captured loss closes over (a frozen distillation teacher,
an EMA / target network): its weights are constants of the differentiation of the captured
function, so its calls are left out of the trained model's factors, without a warning, in
linen, NNX, Equinox and Haiku. Weights computed from the trained params inside the loss (a
cast, ``nn.Partitioned`` boxes, a slice of params stacked by ``nn.scan``) are still the model's.

Each case is checked against the float64 rows that the student's layers saw, computed by a
numpy forward pass. Before, linen pooled the copy's rows into the student's factors (with a
warning), and NNX, Equinox and Haiku warned that they could not name the copy's calls.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sngd_jax

X = np.random.default_rng(0).normal(size=(16, 6)).astype(np.float32)
Y = np.arange(16) % 3



class Net(nnx.Module):
  """The NNX student and its copies: ``hidden`` 6 -> 8, relu, ``out`` 8 -> 3."""

  def __init__(self, rngs):
    self.hidden = nnx.Linear(6, 8, rngs=rngs)
    self.out = nnx.Linear(8, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.hidden(x)))

def _sngd_warnings(fn, *args):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out = fn(*args)
  return out, [str(w.message) for w in caught if str(w.message).startswith("sngd")]


def _np(a):
  return np.asarray(a, np.float64)


def _hidden(x, kernel, bias):
  """The rows the output layer saw: ``relu(x W + b)`` in float64."""
  return np.maximum(_np(x) @ _np(kernel) + _np(bias), 0)


def _assert_rows(call, want):
  np.testing.assert_allclose(_np(call.inputs).reshape(want.shape), want, rtol=1e-5, atol=1e-5)


def _kd(logits, t_logits):
  return (optax.softmax_cross_entropy_with_integer_labels(logits, Y).mean()
          + optax.softmax_cross_entropy(logits, jax.nn.softmax(t_logits)).mean())


# --- linen -----------------------------------------------------------------------------------


class MLP(nn.Module):
  boxed: bool = False

  @nn.compact
  def __call__(self, x):
    init = (nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model"))
            if self.boxed else nn.initializers.lecun_normal())
    return nn.Dense(3, name="out")(nn.relu(nn.Dense(8, kernel_init=init, name="hidden")(x)))


_MODEL = MLP()
_PARAMS = _MODEL.init(jax.random.key(0), X)["params"]
_TEACHER = _MODEL.init(jax.random.key(1), X)["params"]  # closed over at module level


def _apply(p, x=X):
  return _MODEL.apply({"params": p}, x)


def _distill(p, t):
  return _kd(_apply(p), jax.lax.stop_gradient(_apply(t)))


def _linen_case(case):
  """``(step, args)``: a training step whose captured loss closes over the teacher."""
  grad = lambda loss: jax.grad(sngd_jax.capture(loss), has_aux=True)
  if case == "eager":
    return grad(lambda p: _distill(p, _TEACHER)), (_PARAMS,)
  if case == "jit, module level":
    return jax.jit(grad(lambda p: _distill(p, _TEACHER))), (_PARAMS,)
  if case == "jit, passed in":  # the teacher an argument of the step, closed over by the loss
    return jax.jit(lambda p, t: grad(lambda p: _distill(p, t))(p)), (_PARAMS, _TEACHER)
  if case == "ema in the state":  # a train state's EMA params, closed over by the loss
    state = {"params": _PARAMS, "ema": _TEACHER}
    return jax.jit(lambda s: grad(lambda p: _distill(p, s["ema"]))(s["params"])), (state,)
  if case == "teacher params stopped":  # jax.lax.stop_gradient(teacher_params), a cast
    def loss(p):
      t = jax.tree.map(lambda a: jax.lax.stop_gradient(a).astype(jnp.bfloat16), _TEACHER)
      return _kd(_apply(p), _apply(t))
    return jax.jit(grad(loss)), (_PARAMS,)
  assert case == "per example, vmap"
  per_example = lambda p: jax.vmap(lambda xi: _apply(p, xi))(X)
  loss = lambda p: _kd(per_example(p), jax.lax.stop_gradient(per_example(_TEACHER)))
  return jax.jit(grad(loss)), (_PARAMS,)


@pytest.mark.parametrize("case", ["eager", "jit, module level", "jit, passed in",
                                  "ema in the state", "teacher params stopped",
                                  "per example, vmap"])
def test_linen_copy_closed_over_is_left_out(case):
  step, args = _linen_case(case)
  (_, acts), messages = _sngd_warnings(step, *args)
  assert not messages
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  p = _PARAMS
  _assert_rows(acts["hidden"][0], _np(X))
  _assert_rows(acts["out"][0], _hidden(X, p["hidden"]["kernel"], p["hidden"]["bias"]))


def test_linen_weights_computed_from_the_params_are_still_recorded():
  """The student cast to bfloat16 (mixed precision) or boxed in ``nn.Partitioned``
  (``nn.unbox``), next to a teacher the loss closes over: the cast and unboxed weights are
  tracers of the differentiation, so the student's calls are recorded (the teacher's left
  out), each with the rows of its own forward pass."""
  cast = lambda p: jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
  loss = lambda p: _distill(cast(p), _TEACHER)
  (_, acts), messages = _sngd_warnings(jax.jit(jax.grad(sngd_jax.capture(loss), has_aux=True)),
                                       _PARAMS)
  assert not messages and {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  p16 = jax.tree.map(lambda a: _np(a.astype(jnp.bfloat16)), _PARAMS)
  want = _hidden(X, p16["hidden"]["kernel"], p16["hidden"]["bias"])
  np.testing.assert_allclose(_np(acts["out"][0].inputs), want, rtol=1e-2, atol=1e-2)

  boxed = MLP(boxed=True)
  params = boxed.init(jax.random.key(0), X)["params"]
  assert isinstance(params["hidden"]["kernel"], nn.Partitioned)
  teacher = boxed.init(jax.random.key(1), X)["params"]
  loss = lambda p: _kd(boxed.apply({"params": nn.unbox(p)}, X),
                       jax.lax.stop_gradient(boxed.apply({"params": teacher}, X)))
  (_, acts), messages = _sngd_warnings(jax.grad(sngd_jax.capture(loss), has_aux=True), params)
  assert not messages and {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  p = nn.unbox(params)
  _assert_rows(acts["out"][0], _hidden(X, p["hidden"]["kernel"], p["hidden"]["bias"]))


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6)(h)), None


class Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=2)
    return nn.Dense(3, name="out")(blocks(name="blocks")(x, None)[0])


def test_linen_scan_stacked_copy_is_left_out_and_the_slices_recorded():
  """Blocks under ``nn.scan`` over depth read a slice of the stacked params (a tracer of the
  scan, followed out to the stack): the student's slices are recorded, one local Fisher per
  block, and the teacher's stack, closed over, is left out."""
  model = Scanned()
  params = model.init(jax.random.key(0), X)["params"]
  teacher = model.init(jax.random.key(1), X)["params"]
  apply = lambda p: model.apply({"params": p}, X)
  loss = lambda p: _kd(apply(p), jax.lax.stop_gradient(apply(teacher)))
  (_, acts), messages = _sngd_warnings(jax.jit(jax.grad(sngd_jax.capture(loss), has_aux=True)),
                                       params)
  assert not messages
  assert {k: len(v) for k, v in acts.items()} == {"blocks/Dense_0": 1, "out": 1}
  (stacked,) = acts["blocks/Dense_0"]
  assert stacked.stack == 1
  w = params["blocks"]["Dense_0"]
  h, rows = _np(X), []
  for i in range(2):
    rows.append(h)
    h = np.tanh(h @ _np(w["kernel"][i]) + _np(w["bias"][i]))
  np.testing.assert_allclose(_np(stacked.inputs), np.stack(rows), rtol=1e-5, atol=1e-5)
  _assert_rows(acts["out"][0], h)


def test_linen_copy_closed_over_with_several_models_is_left_out_silently():
  """``capture(loss, argnums=(0, 1))``, two trained copies and a teacher the loss closes over:
  each model gets its own rows, and the teacher's calls, which belong to neither, are left out
  without the warning about params computed inside the loss (which it gave before)."""
  other = _MODEL.init(jax.random.key(2), X)["params"]
  loss = lambda p, q: _distill(p, _TEACHER) + _distill(q, _TEACHER)
  (_, (acts_p, acts_q)), messages = _sngd_warnings(
      jax.jit(jax.grad(sngd_jax.capture(loss, argnums=(0, 1)), argnums=(0, 1), has_aux=True)),
      _PARAMS, other)
  assert not messages
  for acts, p in ((acts_p, _PARAMS), (acts_q, other)):
    assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
    _assert_rows(acts["out"][0], _hidden(X, p["hidden"]["kernel"], p["hidden"]["bias"]))


def test_linen_copy_not_told_apart_without_a_differentiation_warns_and_pools():
  """Captured without ``jax.grad`` around it (here under ``jax.jit`` alone) nothing tells the
  teacher's weights from the model's: its calls are pooled, with the warning, as before."""
  (_, acts), messages = _sngd_warnings(jax.jit(sngd_jax.capture(lambda p: _distill(p, _TEACHER))),
                                       _PARAMS)
  assert any("'hidden', 'out'" in m and "2 different weight arrays" in m for m in messages)
  assert any("without a differentiation" in m for m in messages)
  rows = np.concatenate([_np(c.inputs) for c in acts["out"]])
  want = [_hidden(X, q["hidden"]["kernel"], q["hidden"]["bias"]) for q in (_PARAMS, _TEACHER)]
  np.testing.assert_allclose(rows, np.concatenate(want), rtol=1e-5, atol=1e-5)


# --- NNX -------------------------------------------------------------------------------------


def test_nnx_copy_closed_over_is_left_out():
  """An NNX teacher (a clone with other weights) and an EMA copy made by ``nnx.merge`` of the
  graph with other state, closed over by the loss differentiated by ``nnx.value_and_grad``
  (eagerly and inside an ``nnx.jit`` step that is passed the teacher): left out, no warning
  (before: "could not name 2 layer call(s)")."""

  model, teacher = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
  graphdef, ema_state = nnx.split(Net(nnx.Rngs(2)))
  x = jnp.asarray(X)
  want = _hidden(X, model.hidden.kernel[...], model.hidden.bias[...])

  def check(acts, messages):
    assert not messages
    assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
    _assert_rows(acts["hidden"][0], _np(X))
    _assert_rows(acts["out"][0], want)

  loss = lambda m: _kd(m(x), jax.lax.stop_gradient(teacher(x)))
  ((_, acts), _), messages = _sngd_warnings(
      nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True), model)
  check(acts, messages)

  @nnx.jit
  def step(model, ema_state):
    ema = nnx.merge(graphdef, ema_state)
    loss = lambda m: _kd(m(x), jax.lax.stop_gradient(ema(x)))
    return nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model)[0][1]

  acts, messages = _sngd_warnings(step, model, ema_state)
  check(acts, messages)


# --- Equinox ---------------------------------------------------------------------------------


def test_equinox_copy_closed_over_is_left_out():
  """An Equinox teacher closed over by the loss differentiated by
  ``eqx.filter_value_and_grad``, at module level and passed into an ``eqx.filter_jit`` step:
  left out, no warning (before: "capture_eqx could not name 2 layer call(s)")."""
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.key(0), 2)
  model = eqx.nn.MLP(6, 3, 8, 1, activation=jax.nn.relu, key=keys[0])
  teacher = eqx.nn.MLP(6, 3, 8, 1, activation=jax.nn.relu, key=keys[1])
  x = jnp.asarray(X)
  distill = lambda m, t: _kd(jax.vmap(m)(x), jax.lax.stop_gradient(jax.vmap(t)(x)))
  want = _hidden(X, _np(model.layers[0].weight).T, model.layers[0].bias)

  def check(acts, messages):
    assert not messages
    assert {k: len(v) for k, v in acts.items()} == {"layers/0": 1, "layers/1": 1}
    _assert_rows(acts["layers/0"][0], _np(X))
    _assert_rows(acts["layers/1"][0], want)

  grad = lambda loss: eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)
  ((_, acts), _), messages = _sngd_warnings(grad(lambda m: distill(m, teacher)), model)
  check(acts, messages)
  step = eqx.filter_jit(lambda m, t: grad(lambda m: distill(m, t))(m)[0][1])
  acts, messages = _sngd_warnings(step, model, teacher)
  check(acts, messages)


# --- Haiku -----------------------------------------------------------------------------------


def test_haiku_copy_closed_over_is_left_out():
  """A Haiku teacher's params closed over by the loss: left out, no warning (before:
  "capture_hk could not name 2 layer call(s)")."""
  hk = pytest.importorskip("haiku")
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(3, name="out")(jax.nn.relu(hk.Linear(8, name="hidden")(x)))))
  x = jnp.asarray(X)
  params, teacher = net.init(jax.random.key(0), x), net.init(jax.random.key(1), x)
  loss = lambda p: _kd(net.apply(p, x), jax.lax.stop_gradient(net.apply(teacher, x)))
  (_, acts), messages = _sngd_warnings(
      jax.jit(jax.grad(sngd_jax.capture_hk(loss), has_aux=True)), params)
  assert not messages
  assert {k: len(v) for k, v in acts.items()} == {"hidden": 1, "out": 1}
  _assert_rows(acts["hidden"][0], _np(X))
  _assert_rows(acts["out"][0], _hidden(X, params["hidden"]["w"], params["hidden"]["b"]))


# --- calls a custom differentiation rule runs ------------------------------------------------


X2 = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)


@jax.custom_vjp
def _apply_custom_vjp(p, x):
  return _apply(p, x)


def _apply_fwd(p, x):
  return jax.vjp(_apply, p, x)


_apply_custom_vjp.defvjp(_apply_fwd, lambda vjp, g: vjp(g))


@jax.custom_jvp
def _apply_custom_jvp(p, x):
  return _apply(p, x)


_apply_custom_jvp.defjvp(lambda primals, tangents: jax.jvp(_apply, primals, tangents))


@pytest.mark.parametrize("custom", [_apply_custom_vjp, _apply_custom_jvp],
                         ids=["custom_vjp", "custom_jvp"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_linen_calls_in_a_custom_rule_are_not_left_out(custom, jit):
  """The model applied once directly and once through a ``jax.custom_vjp`` (its ``fwd``) or a
  ``jax.custom_jvp`` (its rule): JAX runs the rule on the primals, concrete arrays or tracers
  of the trace the differentiation nests in, yet the gradient reaches the params through the
  rule. Those calls are the model's, not a copy's: both batches' rows are recorded, without a
  warning, and a teacher the loss closes over is still left out (before: the rule's calls were
  taken for a teacher's and left out silently, 4 of the 20 rows; before that, pooled with the
  warning about a teacher or EMA copy)."""
  loss = lambda p: (_distill(p, _TEACHER) + jnp.mean(custom(p, X2) ** 2))
  step = jax.grad(sngd_jax.capture(loss), has_aux=True)
  (_, acts), messages = _sngd_warnings(jax.jit(step) if jit else step, _PARAMS)
  assert not messages
  p = _PARAMS
  for path, want in (("hidden", np.concatenate([_np(X), _np(X2)])),
                     ("out", np.concatenate([_hidden(x, p["hidden"]["kernel"], p["hidden"]["bias"])
                                             for x in (X, X2)]))):
    rows = np.concatenate([_np(c.inputs) for c in acts[path]])
    assert rows.shape == want.shape, path
    np.testing.assert_allclose(_np(rows).T @ _np(rows), want.T @ want, rtol=1e-5, atol=1e-5)


def test_equinox_calls_in_a_custom_vjp_are_recorded_as_the_models():
  """An Equinox model applied once directly and once through an ``eqx.filter_custom_vjp``
  whose ``fwd`` applies it to the primals, next to a teacher the loss closes over: the rule's
  calls are named as the model's layers and recorded, the teacher's left out, no warning
  (before: the rule's calls were taken for a copy's and left out silently; before that,
  'capture_eqx could not name 2 layer call(s)')."""
  eqx = pytest.importorskip("equinox")
  keys = jax.random.split(jax.random.key(0), 2)
  model = eqx.nn.MLP(6, 3, 8, 1, activation=jax.nn.relu, key=keys[0])
  teacher = eqx.nn.MLP(6, 3, 8, 1, activation=jax.nn.relu, key=keys[1])

  @eqx.filter_custom_vjp
  def custom(m, x):
    return jax.vmap(m)(x)

  @custom.def_fwd
  def _(perturbed, m, x):
    return jax.vmap(m)(x), None

  @custom.def_bwd
  def _(res, g, perturbed, m, x):
    return eqx.filter_grad(lambda m: jnp.sum(jax.vmap(m)(x) * g))(m)

  x, x2 = jnp.asarray(X), jnp.asarray(X2)
  loss = lambda m: (_kd(jax.vmap(m)(x), jax.lax.stop_gradient(jax.vmap(teacher)(x)))
                    + jnp.mean(custom(m, x2) ** 2))
  step = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)
  for jit in (False, True):
    ((_, acts), _), messages = _sngd_warnings(eqx.filter_jit(step) if jit else step, model)
    assert not messages
    w, b = _np(model.layers[0].weight).T, model.layers[0].bias
    for path, want in (("layers/0", np.concatenate([_np(X), _np(X2)])),
                       ("layers/1", np.concatenate([_hidden(a, w, b) for a in (X, X2)]))):
      rows = np.concatenate([_np(c.inputs) for c in acts[path]])
      assert rows.shape == want.shape, path
      np.testing.assert_allclose(rows.T @ rows, want.T @ want, rtol=1e-5, atol=1e-5)


def _check_two_batches(acts, kernel, bias):
  """The rows of both batches ``X`` and ``X2``, as a numpy forward pass of the model sees them
  (``kernel``: ``(6, 8)``), at paths 'hidden' and 'out'."""
  for path, want in (("hidden", np.concatenate([_np(X), _np(X2)])),
                     ("out", np.concatenate([_hidden(a, kernel, bias) for a in (X, X2)]))):
    rows = np.concatenate([_np(c.inputs) for c in acts[path]])
    assert rows.shape == want.shape, path
    np.testing.assert_allclose(rows.T @ rows, want.T @ want, rtol=1e-5, atol=1e-5)


def test_haiku_and_nnx_calls_in_a_custom_vjp_are_recorded_as_the_models():
  """Haiku and NNX, the model applied directly and through a ``jax.custom_vjp`` whose ``fwd``
  applies it to the primals (NNX: to the model's ``nnx.state``, merged there), a teacher closed
  over: the rule's calls are named and recorded, the teacher's left out, no warning (before:
  left out silently; before that, 'could not name 2 layer call(s)')."""
  hk = pytest.importorskip("haiku")

  x, x2 = jnp.asarray(X), jnp.asarray(X2)
  net = hk.without_apply_rng(hk.transform(
      lambda x: hk.Linear(3, name="out")(jax.nn.relu(hk.Linear(8, name="hidden")(x)))))
  params, teacher = net.init(jax.random.key(0), x), net.init(jax.random.key(1), x)
  apply = jax.custom_vjp(net.apply)
  apply.defvjp(lambda p, x: jax.vjp(net.apply, p, x), lambda vjp, g: vjp(g))
  loss = lambda p: (_kd(net.apply(p, x), jax.lax.stop_gradient(net.apply(teacher, x)))
                    + jnp.mean(apply(p, x2) ** 2))
  (_, acts), messages = _sngd_warnings(
      jax.jit(jax.grad(sngd_jax.capture_hk(loss), has_aux=True)), params)
  assert not messages
  _check_two_batches(acts, params["hidden"]["w"], params["hidden"]["b"])

  model, teacher_model = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))
  graphdef = nnx.graphdef(model)
  run = lambda state, x: nnx.merge(graphdef, state)(x)
  run_custom = jax.custom_vjp(run)
  run_custom.defvjp(lambda s, x: jax.vjp(run, s, x), lambda vjp, g: vjp(g))
  loss = lambda m: (_kd(m(x), jax.lax.stop_gradient(teacher_model(x)))
                    + jnp.mean(run_custom(nnx.state(m), x2) ** 2))
  ((_, acts), _), messages = _sngd_warnings(
      nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True), model)
  assert not messages
  _check_two_batches(acts, model.hidden.kernel[...], model.hidden.bias[...])


def test_without_jax_current_trace_a_copy_is_pooled_with_the_warning(monkeypatch):
  """Where JAX does not expose its current trace (a private attribute capture reads to tell a
  custom rule's calls from the loss's), no weight is taken for a copy's: the teacher's calls
  are pooled with the warning, as without a differentiation, rather than a custom rule's
  calls of the model left out silently."""
  from sngd_jax._src.capture import records  # noqa: PLC0415

  def missing():
    raise AttributeError("trace_ctx")

  monkeypatch.setattr(records, "_current_trace", missing)
  (_, acts), messages = _sngd_warnings(
      jax.jit(jax.grad(sngd_jax.capture(lambda p: _distill(p, _TEACHER)), has_aux=True)),
      _PARAMS)
  assert any("2 different weight arrays" in m for m in messages)
  rows = np.concatenate([_np(c.inputs) for c in acts["out"]])
  want = [_hidden(X, q["hidden"]["kernel"], q["hidden"]["bias"]) for q in (_PARAMS, _TEACHER)]
  np.testing.assert_allclose(np.sort(rows, axis=0), np.sort(np.concatenate(want), axis=0),
                             rtol=1e-5, atol=1e-5)
