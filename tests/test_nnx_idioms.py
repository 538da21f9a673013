"""Flax NNX code as it is written in flax 0.12: the functional style (``nnx.split`` and a plain
``jax.jit`` step that merges the params) and the linen <-> NNX bridge (``nnx.bridge.ToNNX``,
``nnx.bridge.ToLinen``). Each update is checked against float64 damped solves over the rows
the layer saw, computed by an independent numpy forward pass."""

import ast
import subprocess
import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import bridge

import sngd_jax

F64 = dict(param_dtype=jnp.float64)

pytestmark = pytest.mark.usefixtures("x64")


def _tx():
  return sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1)


def _np(tree):
  return jax.tree.map(np.asarray, nnx.to_pure_dict(tree) if isinstance(tree, nnx.State)
                      else tree)


@nnx.jit
def _optimizer_step(model, optimizer, x):
  """One ``nnx.Optimizer`` step on ``sum(sin(model(x)))``: ``(grads, activations)``."""
  loss_fn = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x)
  optimizer.update(model, grads, activations=acts)
  return grads, acts


def _layer_norm(h, scale, bias, eps):
  xhat = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + eps)
  return xhat, xhat * scale + bias


# --- the functional style: nnx.split, jax.jit, jax.value_and_grad over the params ---------

class _MLP(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(4, 6, rngs=rngs, **F64)
    self.ln = nnx.LayerNorm(6, rngs=rngs, **F64)
    self.l2 = nnx.Linear(6, 3, rngs=rngs, **F64)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.ln(self.l1(x))))


@pytest.mark.parametrize("params_as", ["state", "pure_dict"])
def test_functional_step_over_split_params(params_as):
  """``graphdef, params = nnx.split(model, nnx.Param)`` and a plain ``jax.jit`` step whose loss
  calls ``nnx.merge(graphdef, params)``, differentiated by ``jax.value_and_grad`` and updated
  by ``tx.update`` on the params (an ``nnx.State``, or ``nnx.to_pure_dict`` of it): every
  layer is captured at the path of its params, the updates are the float64 solves. With the
  pure dict, capture named no layer before (it warned "pass the model first") and ``update``
  raised "no activations were captured"."""
  model = _MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  if params_as == "pure_dict":
    params = nnx.to_pure_dict(params)
  x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
  tx = _tx()

  def loss_fn(params, x):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))

  @jax.jit
  def step(params, opt_state, x):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
        params, x)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return grads, updates

  grads, updates = map(_np, step(params, tx.init(params), x))
  p = _np(params)
  x = np.asarray(x)
  ref.assert_dense_update(x, grads["l1"], updates["l1"], "l1")
  h = x @ p["l1"]["kernel"] + p["l1"]["bias"]
  xhat, h = _layer_norm(h, p["ln"]["scale"], p["ln"]["bias"], 1e-6)
  scale, bias = ref.channel_update(xhat, grads["ln"]["scale"], grads["ln"]["bias"])
  np.testing.assert_allclose(updates["ln"]["scale"], scale, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(updates["ln"]["bias"], bias, rtol=1e-8, atol=1e-12)
  ref.assert_dense_update(np.tanh(h), grads["l2"], updates["l2"], "l2")


def test_functional_pure_dict_with_a_closed_over_layer_warns_of_that_layer():
  """Params as a pure dict, and a layer the loss closes over (a frozen teacher's): that layer's
  call cannot be named. Differentiated (``jax.value_and_grad``), its weight is a constant of
  the differentiation and it is left out without a warning (before: the warning below);
  captured without a differentiation, the warning says why (another model the loss closes
  over), not "pass the model first" (it said so, though the model's params came first and
  both of its layers were captured). The model's layers get the float64 solves."""
  model = _MLP(nnx.Rngs(0))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  teacher = nnx.Linear(3, 3, rngs=nnx.Rngs(1), **F64)
  x = jax.random.normal(jax.random.key(1), (7, 4), jnp.float64)
  loss_fn = lambda p, x: jnp.sum(jnp.sin(teacher(nnx.merge(graphdef, p)(x))))
  with pytest.warns(UserWarning, match="capture_nnx could not name") as record:
    sngd_jax.capture_nnx(loss_fn)(params, x)
  text = " ".join(str(w.message) for w in record)
  assert "another model the loss closes over" in text and "Pass the model first" not in text
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
        params, x)
  assert set(acts) == {"l1", "ln", "l2"}
  tx = _tx()
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  ref.assert_dense_update(np.asarray(x), _np(grads)["l1"], _np(updates)["l1"], "l1")


def test_nnx_optimizer_sngd_adam_weight_decay_with_donated_arguments():
  """``nnx.Optimizer(model, sngd_adam(lr, weight_decay=wd), wrt=nnx.Param)`` in an ``nnx.jit``
  step that donates the model and the optimizer: three steps equal ``chain(sngd(),
  adamw(lr, weight_decay=wd, mask=...))`` by hand on the pure-dict params, the mask written
  out (the two kernels decayed, the biases and the LayerNorm's scale and bias not)."""
  import functools  # noqa: PLC0415

  x = jax.random.normal(jax.random.key(1), (16, 4), jnp.float64)
  y = jnp.arange(16) % 3
  kwargs = dict(factor_every=1, inverse_every=1)

  def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  model = _MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, sngd_jax.sngd_adam(0.05, weight_decay=0.1, **kwargs),
                            wrt=nnx.Param)

  @functools.partial(nnx.jit, donate_argnums=(0, 1))
  def step(model, optimizer, x, y):
    (loss, (_, acts)), grads = nnx.value_and_grad(
        sngd_jax.capture_nnx(loss_fn, has_aux=True), has_aux=True)(model, x, y)
    optimizer.update(model, grads, activations=acts)
    return loss

  graphdef, params = nnx.split(_MLP(nnx.Rngs(0)), nnx.Param)
  params = nnx.to_pure_dict(params)
  kernels = {"l1": {"kernel": True, "bias": False}, "ln": {"scale": False, "bias": False},
             "l2": {"kernel": True, "bias": False}}
  tx = optax.chain(sngd_jax.sngd(**kwargs),
                   optax.adamw(0.05, weight_decay=0.1, mask=kernels))
  state = tx.init(params)

  @jax.jit
  def by_hand(params, state, x, y):
    (_, (_, acts)), grads = nnx.value_and_grad(
        sngd_jax.capture_nnx(loss_fn, has_aux=True), has_aux=True)(
            nnx.merge(graphdef, params), x, y)
    updates, state = tx.update(nnx.to_pure_dict(grads), state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  for _ in range(3):
    step(model, optimizer, x, y)
    params, state = by_hand(params, state, x, y)
  got, want = _np(nnx.state(model, nnx.Param)), _np(params)
  assert np.abs(want["l1"]["kernel"] - _np(nnx.state(_MLP(nnx.Rngs(0)), nnx.Param))["l1"][
      "kernel"]).max() > 1e-2  # the steps moved the params
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12),
               got, want)


# --- nnx.bridge.ToNNX: a linen backbone inside an NNX model --------------------------------

class _LinenBackbone(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(6, param_dtype=jnp.float64)(x)
    h = nn.LayerNorm(param_dtype=jnp.float64)(h)
    return nn.Dense(5, param_dtype=jnp.float64)(jnp.tanh(h))


class _Bridged(nnx.Module):
  def __init__(self, rngs):
    self.backbone = bridge.ToNNX(_LinenBackbone(), rngs=rngs)
    self.proj = bridge.ToNNX(nn.Dense(4, param_dtype=jnp.float64), rngs=rngs)
    self.head = nnx.Linear(4, 3, rngs=rngs, **F64)

  def __call__(self, x):
    return self.head(jnp.tanh(self.proj(jnp.tanh(self.backbone(x)))))


def test_to_nnx_linen_layers_are_captured_at_their_nnx_paths():
  """``nnx.bridge.ToNNX`` (with ``nnx.bridge.lazy_init``) runs a linen module inside an NNX
  model; its params are in ``nnx.state(model)`` at the ToNNX's path then the linen path
  (``backbone/Dense_0``; a wrapped ``nn.Dense`` itself: ``proj``). Each linen layer is
  recorded there with the rows it saw, in one ``nnx.Optimizer`` step: the updates are the
  float64 solves. Before, ``capture_nnx`` recorded only the NNX ``head`` and ``update`` raised
  "no activations were captured for layer 'backbone/Dense_0'"."""
  x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
  model = _Bridged(nnx.Rngs(0))
  bridge.lazy_init(model, x)
  p = _np(nnx.state(model, nnx.Param))
  assert set(sngd_jax.discover(nnx.state(model, nnx.Param))) == {
      "backbone/Dense_0", "backbone/LayerNorm_0", "backbone/Dense_1", "proj", "head"}
  optimizer = nnx.Optimizer(model, optax.chain(_tx(), optax.scale(-1.0)), wrt=nnx.Param)
  grads, acts = _optimizer_step(model, optimizer, x)
  assert set(acts) == {"backbone/Dense_0", "backbone/LayerNorm_0", "backbone/Dense_1",
                       "proj", "head"}
  grads = _np(grads)
  updates = jax.tree.map(lambda a, b: a - b, p, _np(nnx.state(model, nnx.Param)))  # steps of -u
  rows = _bridged_rows(p, np.asarray(x))
  for path in ("backbone/Dense_0", "backbone/Dense_1", "proj", "head"):
    g, u = (t[path.split("/")[0]] for t in (grads, updates))
    g, u = (t[path.split("/")[1]] if "/" in path else t for t in (g, u))
    ref.assert_dense_update(rows[path], g, u, path)
  g_ln, u_ln = grads["backbone"]["LayerNorm_0"], updates["backbone"]["LayerNorm_0"]
  scale, bias = ref.channel_update(rows["backbone/LayerNorm_0"], g_ln["scale"], g_ln["bias"])
  np.testing.assert_allclose(u_ln["scale"], scale, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(u_ln["bias"], bias, rtol=1e-8, atol=1e-12)


def _bridged_rows(p, x):
  """The rows each layer of ``_Bridged`` sees, by a float64 numpy forward pass (the
  LayerNorm's: ``xhat``)."""
  bb = p["backbone"]
  rows = {"backbone/Dense_0": x}
  h = x @ bb["Dense_0"]["kernel"] + bb["Dense_0"]["bias"]
  rows["backbone/LayerNorm_0"], h = _layer_norm(h, bb["LayerNorm_0"]["scale"],
                                                bb["LayerNorm_0"]["bias"], 1e-6)
  rows["backbone/Dense_1"] = h = np.tanh(h)
  rows["proj"] = h = np.tanh(h @ bb["Dense_1"]["kernel"] + bb["Dense_1"]["bias"])
  rows["head"] = np.tanh(h @ p["proj"]["kernel"] + p["proj"]["bias"])
  return rows


def test_to_nnx_copy_inside_nnx_remat_is_named_by_its_params():
  """An ``nnx.remat`` in the loss runs a copy of the model: the ToNNX copy is none of the
  model's modules, so its path is the one its Variables are followed out to; every layer gets
  the rows it gets without the remat (a float64 numpy forward pass)."""
  x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
  model = _Bridged(nnx.Rngs(0))
  bridge.lazy_init(model, x)
  plain = lambda m, x: jnp.sum(jnp.sin(m(x)))
  remat = lambda m, x: jnp.sum(jnp.sin(nnx.remat(lambda m, x: m(x))(m, x)))
  acts = [nnx.value_and_grad(sngd_jax.capture_nnx(f), has_aux=True)(model, x)[0][1]
          for f in (plain, remat)]
  assert set(acts[1]) == set(acts[0]) == {
      "backbone/Dense_0", "backbone/LayerNorm_0", "backbone/Dense_1", "proj", "head"}
  rows = _bridged_rows(_np(nnx.state(model, nnx.Param)), np.asarray(x))
  for path, want in rows.items():
    for a in acts:
      assert len(a[path]) == 1, path
      np.testing.assert_allclose(a[path][0].inputs, want, rtol=1e-10, atol=1e-12, err_msg=path)


class _ToNNXRecurrence(nnx.Module):
  """``h_t = tanh(W_i x_t + b + W_h h_{t-1})`` by an ``nnx.scan`` over time, ``W_i`` and ``W_h``
  linen ``nn.Dense`` layers in ``nnx.bridge.ToNNX`` (broadcast into the scan, not stacked)."""

  def __init__(self, rngs):
    self.i = bridge.ToNNX(nn.Dense(4, param_dtype=jnp.float64), rngs=rngs)
    self.h = bridge.ToNNX(nn.Dense(4, use_bias=False, param_dtype=jnp.float64), rngs=rngs)

  def __call__(self, xs):  # xs: (T, B, 3)
    @nnx.scan(in_axes=(None, nnx.Carry, 0), out_axes=(nnx.Carry, 0))
    def step(m, h, x):
      h = jnp.tanh(m.i(x) + m.h(h))
      return h, h
    return step(self, jnp.zeros((xs.shape[1], 4), xs.dtype), xs)[1]


def test_to_nnx_layers_inside_nnx_scan_pool_every_step():
  """ToNNX layers called inside an ``nnx.scan`` over time (the model broadcast, ``in_axes=None``):
  ``i`` gets the rows ``x_t`` and ``h`` the rows ``h_{t-1}`` of every step (``T*B`` rows each),
  the updates the float64 solves, ``h`` from a numpy recurrence."""
  xs = jax.random.normal(jax.random.key(1), (5, 2, 3), jnp.float64)
  model = _ToNNXRecurrence(nnx.Rngs(0))
  model.i.lazy_init(xs[0])
  model.h.lazy_init(jnp.zeros((2, 4), jnp.float64))
  loss_fn = lambda m, xs: jnp.sum(jnp.sin(m(xs)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, xs)
  params = nnx.state(model, nnx.Param)
  tx = _tx()
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  p, g, u = _np(params), _np(grads), _np(updates)
  x = np.asarray(xs)
  h = [np.zeros((2, 4))]
  for t in range(5):
    h.append(np.tanh(x[t] @ p["i"]["kernel"] + p["i"]["bias"] + h[-1] @ p["h"]["kernel"]))
  ref.assert_dense_update(x.reshape(-1, 3), g["i"], u["i"], "i")
  ref.assert_dense_update(np.concatenate(h[:-1]), g["h"], u["h"], "h")


class _DenseBySngd(nn.Dense):
  """A subclass of ``nn.Dense`` whose ``__call__`` computes ``sngd_jax.dense``."""

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", self.kernel_init, (x.shape[-1], self.features),
                        self.param_dtype)
    return sngd_jax.dense(x, kernel, self.param("bias", self.bias_init, (self.features,),
                                                self.param_dtype))


def test_to_nnx_hand_written_linen_layer_is_recorded_once():
  """A linen layer computed by ``sngd_jax.dense`` inside ``nnx.bridge.ToNNX`` (here a
  subclass of ``nn.Dense``) is named by its kernel's path and recorded once per call, as
  ``capture`` records it in a linen model (it was recorded twice, by ``sngd_jax.dense`` and by
  the interceptor); its update is the float64 solve."""
  x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
  model = bridge.ToNNX(_DenseBySngd(4, param_dtype=jnp.float64), rngs=nnx.Rngs(0))
  bridge.lazy_init(model, x)
  loss_fn = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x)
  assert list(acts) == [""] and len(acts[""]) == 1
  params = nnx.state(model, nnx.Param)
  tx = _tx()
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  ref.assert_dense_update(np.asarray(x), _np(grads), _np(updates))


# --- nnx.bridge.ToLinen: an NNX module inside a linen model --------------------------------

class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.layers = nnx.List([nnx.Linear(3, 6, rngs=rngs, **F64),
                            nnx.Linear(6, 5, rngs=rngs, **F64)])
    self.ln = nnx.LayerNorm(5, rngs=rngs, **F64)

  def __call__(self, x):
    return self.ln(self.layers[1](jnp.tanh(self.layers[0](x))))


class _LinenNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = bridge.ToLinen(_NNXBlock, name="block")(x)
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(jnp.tanh(h))


def test_to_linen_nnx_layers_are_captured_at_their_linen_paths():
  """``nnx.bridge.ToLinen`` runs an NNX module inside a linen model; its params are in the linen
  params at the ToLinen's path then the NNX path (``block/layers/0``). ``capture`` records
  each NNX layer there with the rows it saw (a plain ``jax.jit`` step, ``tx.update``): the
  updates are the float64 solves. Before, its layers were not recorded and ``update`` raised
  "no activations were captured for layer 'block/layers/0'"."""
  x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
  params = _LinenNet().init(jax.random.key(0), x)["params"]
  tx = _tx()

  def loss_fn(params, x):
    return jnp.sum(jnp.sin(_LinenNet().apply({"params": params}, x)))

  @jax.jit
  def step(params, opt_state, x):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
    updates, _ = tx.update(grads, opt_state, params, activations=acts)
    return grads, updates, acts

  grads, updates, acts = step(params, tx.init(params), x)
  assert set(acts) == {"block/layers/0", "block/layers/1", "block/ln", "head"}
  grads, updates, p = map(_np, (grads, updates, params))
  g, u, b = grads["block"], updates["block"], p["block"]
  x = np.asarray(x)
  ref.assert_dense_update(x, g["layers"][0], u["layers"][0], "layers/0")
  h = np.tanh(x @ b["layers"][0]["kernel"] + b["layers"][0]["bias"])
  ref.assert_dense_update(h, g["layers"][1], u["layers"][1], "layers/1")
  h = h @ b["layers"][1]["kernel"] + b["layers"][1]["bias"]
  xhat, h = _layer_norm(h, b["ln"]["scale"], b["ln"]["bias"], 1e-6)
  scale, bias = ref.channel_update(xhat, g["ln"]["scale"], g["ln"]["bias"])
  np.testing.assert_allclose(u["ln"]["scale"], scale, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(u["ln"]["bias"], bias, rtol=1e-8, atol=1e-12)
  ref.assert_dense_update(np.tanh(h), grads["head"], updates["head"], "head")


# A linen user's capture, in an interpreter that loads `capture/linen.py` and what it imports,
# not `sngd_jax/__init__.py` (which imports every capture): the package is registered bare, so
# only the modules a `from sngd_jax._src.capture.linen import capture` needs load.
_LINEN_ONLY = """
import sys, types
import jax, jax.numpy as jnp, numpy as np
import flax.linen as nn
from flax import nnx
from flax.nnx import bridge
jax.config.update("jax_enable_x64", True)
package = types.ModuleType("sngd_jax")
package.__path__ = [sys.argv[1]]
sys.modules["sngd_jax"] = package
from sngd_jax._src.capture.linen import capture

class Block(nnx.Module):
  def __init__(self, rngs):
    self.l1 = nnx.Linear(3, 6, rngs=rngs, param_dtype=jnp.float64)
    self.l2 = nnx.Linear(6, 5, rngs=rngs, param_dtype=jnp.float64)
  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))

class Net(nn.Module):
  to_linen: bool
  @nn.compact
  def __call__(self, x):
    if self.to_linen:
      x = bridge.ToLinen(Block, name="block")(x)
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(jnp.tanh(x))

x = jax.random.normal(jax.random.key(1), (7, 3), jnp.float64)
out = {}
for to_linen in (False, True):
  net = Net(to_linen)
  params = net.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.sin(net.apply({"params": p}, x)))
  _, acts = capture(loss)(params, x)
  out[f"{to_linen}/paths"] = sorted(acts)
  for path, calls in acts.items():
    out[f"{to_linen}/{path}"] = [np.asarray(c.inputs).tolist() for c in calls]
  out[f"{to_linen}/params"] = jax.tree.map(lambda a: np.asarray(a).tolist(), params)
out["loaded"] = sorted(m for m in sys.modules if m.startswith("sngd_jax._src.capture."))
print(repr(out))
"""


def test_to_linen_is_captured_when_only_linen_capture_is_loaded():
  """``capture`` (linen) records the NNX layers of an ``nnx.bridge.ToLinen`` in a fresh
  interpreter that loads only ``capture/linen.py`` and what it imports (not ``capture_nnx``'s
  ``capture/nnx_capture.py``): ``linen.py`` imports ``capture/nnx.py`` and calls its
  ``to_linen_call``. Each layer's captured inputs are the rows of an independent float64
  numpy forward pass. Before, ``capture/nnx.py`` (then ``capture_nnx``'s module) filled a hook
  list in ``linen.py`` when it was imported; loaded alone, ``linen.py``'s capture silently left
  the ToLinen's layers out (only ``head`` captured)."""
  package = sngd_jax.__path__[0]
  done = subprocess.run([sys.executable, "-c", _LINEN_ONLY, package], capture_output=True,
                        text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  out = ast.literal_eval(done.stdout.strip().splitlines()[-1])
  assert "sngd_jax._src.capture.nnx_capture" not in out["loaded"], out["loaded"]
  assert out["False/paths"] == ["head"]
  assert out["True/paths"] == ["block/l1", "block/l2", "head"]
  x = np.asarray(jax.random.normal(jax.random.key(1), (7, 3), jnp.float64))
  b = jax.tree.map(np.asarray, out["True/params"]["block"],
                   is_leaf=lambda a: isinstance(a, list))
  h = np.tanh(x @ b["l1"]["kernel"] + b["l1"]["bias"])
  for path, rows in (("block/l1", x), ("block/l2", h),
                     ("head", np.tanh(h @ b["l2"]["kernel"] + b["l2"]["bias"]))):
    (got,) = out[f"True/{path}"]
    np.testing.assert_allclose(np.asarray(got), rows, rtol=1e-12, atol=1e-14, err_msg=path)


class _ToLinenCell(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    lin = bridge.ToLinen(nnx.Linear, args=(4, 4), kwargs=F64, name="lin")
    return jnp.tanh(lin(h)), None


class _ToLinenOverDepth(nn.Module):
  remat: bool

  @nn.compact
  def __call__(self, x):
    cell = nn.remat(_ToLinenCell) if self.remat else _ToLinenCell
    stack = nn.scan(cell, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
    return stack(name="stack")(x, None)[0]


@pytest.mark.parametrize("remat", [False, True], ids=["scan", "scan_remat"])
def test_to_linen_inside_nn_scan_over_depth(remat):
  """An ``nnx.bridge.ToLinen`` in the body of an ``nn.scan`` over depth (and an ``nn.remat``
  inside it): its params are stacked (``stack/lin/kernel`` is ``L x 4 x 4``) and the NNX layer
  reads a slice, which is followed out to the stack; with ``stacked={'stack': 1}`` layer ``l``'s
  update is the float64 solve over the rows ``h_l`` it saw. Before, the slices were looked for
  among the params themselves: nothing was recorded and ``update`` raised "no activations were
  captured for layer 'stack/lin'"."""
  x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
  model = _ToLinenOverDepth(remat)
  params = model.init(jax.random.key(0), x)["params"]
  loss_fn = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
  assert set(acts) == {"stack/lin"}
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1, stacked={"stack": 1})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  g, u, p = (_np(t)["stack"]["lin"] for t in (grads, updates, params))
  h = np.asarray(x)
  for layer in range(3):
    g_l, u_l = ({k: v[layer] for k, v in t.items()} for t in (g, u))
    ref.assert_dense_update(h, g_l, u_l, f"layer {layer}")
    h = np.tanh(h @ p["kernel"][layer] + p["bias"][layer])


class _HandWrittenNNX(nnx.Module):
  """A hand-written NNX layer, ``sngd_jax.dense`` of its own params or of an array computed
  from its kernel (``2 W``, not captured)."""

  def __init__(self, rngs, doubled=False):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 3), jnp.float64))
    self.bias = nnx.Param(jnp.zeros(3, jnp.float64))
    self.doubled = doubled

  def __call__(self, x):
    kernel = self.kernel[...] * 2.0 if self.doubled else self.kernel[...]
    return sngd_jax.dense(x, kernel, self.bias[...])


class _LinenWithHandWritten(nn.Module):
  doubled: bool

  @nn.compact
  def __call__(self, x):
    return bridge.ToLinen(_HandWrittenNNX, kwargs={"doubled": self.doubled}, name="hand")(x)


def test_to_linen_layer_it_cannot_name_warns_with_the_to_linen_path():
  """A ``sngd_jax.dense`` inside an ``nnx.bridge.ToLinen`` given an array computed from a param
  (``2 W``) cannot be named: ``capture`` warns as ``capture_nnx`` does, with the ToLinen's
  path (it was dropped without a word, and only ``update`` raised). Given the param itself it
  is captured at ``hand``: the update is the float64 solve over ``x``."""
  x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
  for doubled in (True, False):
    model = _LinenWithHandWritten(doubled)
    params = model.init(jax.random.key(0), x)["params"]
    loss_fn = lambda p, x, m=model: jnp.sum(jnp.sin(m.apply({"params": p}, x)))
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)
    if doubled:
      with pytest.warns(UserWarning, match=r"capture could not name 1 layer call\(s\) "
                        r"\(sngd_jax.dense \(kernel \(4, 3\)\)\) in the nnx.bridge.ToLinen "
                        r"at 'hand'"):
        (_, acts), _ = grad_fn(params, x)
      assert acts == {}
      continue
    (_, acts), grads = grad_fn(params, x)
    tx = _tx()
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    ref.assert_dense_update(np.asarray(x), _np(grads)["hand"], _np(updates)["hand"], "hand")


class _LinenSharingToLinen(nn.Module):
  @nn.compact
  def __call__(self, x):
    lin = bridge.ToLinen(nnx.Linear, args=(4, 4), kwargs=F64, name="lin")
    return lin(jnp.tanh(lin(x)))


class _ToNNXOfToLinen(nnx.Module):
  def __init__(self, rngs):
    self.body = bridge.ToNNX(_LinenSharingToLinen(), rngs=rngs)
    self.head = nnx.Linear(4, 2, rngs=rngs, **F64)

  def __call__(self, x):
    return self.head(self.body(x))


def test_to_linen_inside_to_nnx_is_recorded_once_per_call():
  """An NNX layer in an ``nnx.bridge.ToLinen`` of a linen module run by an ``nnx.bridge.ToNNX``
  (a half-migrated block), called twice: ``capture_nnx`` records it once per call, at
  ``body/lin``, so ``with_row_mask(..., calls=[1])`` masks the second call's rows ``h``: the
  update is the float64 solve over ``x`` and the real rows of ``h``. Before, each call was
  recorded twice (by the NNX capture and again as the linen ToLinen's), four records, and
  ``calls=[1]`` masked a copy of the first call."""
  x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
  model = _ToNNXOfToLinen(nnx.Rngs(0))
  bridge.lazy_init(model, x)
  loss_fn = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(model, x)
  assert len(acts["body/lin"]) == 2
  mask = jnp.array([1, 1, 0, 1, 0, 1])
  acts = sngd_jax.with_row_mask(acts, mask, where=lambda path: path == "body/lin", calls=[1])
  params = nnx.state(model, nnx.Param)
  tx = _tx()
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  p, g, u = _np(params)["body"]["lin"], _np(grads)["body"]["lin"], _np(updates)["body"]["lin"]
  x = np.asarray(x)
  h = np.tanh(x @ p["kernel"] + p["bias"])
  ref.assert_dense_update(np.concatenate([x, h[np.asarray(mask) == 1]]), g, u, "body/lin")


# --- nnx.Embed.attend: a tied output layer ------------------------------------------------

class _TiedLM(nnx.Module):
  def __init__(self, rngs):
    self.embed = nnx.Embed(9, 3, rngs=rngs, **F64)
    self.hidden = nnx.Linear(3, 3, rngs=rngs, **F64)

  def __call__(self, tokens):
    return self.embed.attend(jnp.tanh(self.hidden(self.embed(tokens))))


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_nnx_embed_attend_is_the_tied_tables_output_layer():
  """``nnx.Embed.attend`` with ``fisher={'embed': 'tied'}`` through ``nnx.Optimizer``:
  ``Delta E = (D + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}``, ``D`` the lookup frequencies,
  ``G_h = E[h h^T]`` over the ``attend`` queries (float64, as tests/test_diag.py for linen)."""
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])
  model = _TiedLM(nnx.Rngs(0))
  p = _np(nnx.state(model, nnx.Param))
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1,
                     fisher={"embed": "tied", "hidden": "linear"})
  optimizer = nnx.Optimizer(model, optax.chain(tx, optax.scale(-1.0)), wrt=nnx.Param)
  grads = _np(_optimizer_step(model, optimizer, tokens)[0])
  updates = jax.tree.map(lambda a, b: a - b, p, _np(nnx.state(model, nnx.Param)))
  e = p["embed"]["embedding"]
  x = e[np.asarray(tokens)].reshape(-1, 3)
  ref.assert_dense_update(x, grads["hidden"], updates["hidden"], "hidden")
  h = np.tanh(x @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=9) / tokens.size
  rows = grads["embed"]["embedding"] / (freq + ref.DAMPING * freq.sum())[:, None]
  expect = ref.damped_solve(ref.linear_factor(h, bias=False), rows.T).T
  np.testing.assert_allclose(updates["embed"]["embedding"], expect, rtol=1e-9)


class _NNXRecurrent(nnx.Module):
  def __init__(self, rngs):
    self.rnn = nnx.RNN(nnx.SimpleCell(3, 5, rngs=rngs, dtype=jnp.float64, **F64), rngs=rngs)

  def __call__(self, x):
    return self.rnn(x)


class _LinenWithNNXRecurrent(nn.Module):
  @nn.compact
  def __call__(self, x):
    return bridge.ToLinen(_NNXRecurrent, name="seq")(x)


def test_to_linen_nnx_rnn_pools_every_time_step():
  """An ``nnx.RNN`` inside ``nnx.bridge.ToLinen``: its cell's ``dense_i`` gets the rows
  ``x_t`` and its ``dense_h`` the rows ``h_{t-1}`` of every step (``B*T`` rows each), as the
  same RNN captured by ``capture_nnx`` (float64 solves; ``h`` from the model's outputs)."""
  x = jax.random.normal(jax.random.key(3), (2, 4, 3), jnp.float64)
  model = _LinenWithNNXRecurrent()
  params = model.init({"params": jax.random.key(0), "carry": jax.random.key(1)}, x)["params"]
  apply = lambda p, x: model.apply({"params": p}, x, rngs={"carry": jax.random.key(2)})
  loss_fn = lambda p, x: jnp.sum(jnp.sin(apply(p, x)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
  assert set(acts) == {"seq/rnn/cell/dense_i", "seq/rnn/cell/dense_h"}
  tx = _tx()
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  g, u = _np(grads)["seq"]["rnn"]["cell"], _np(updates)["seq"]["rnn"]["cell"]
  ref.assert_dense_update(np.asarray(x).reshape(-1, 3), g["dense_i"], u["dense_i"], "dense_i")
  h = np.asarray(apply(params, x))
  h_prev = np.concatenate([np.zeros((2, 1, 5)), h[:, :-1]], axis=1).reshape(-1, 5)
  ref.assert_dense_update(h_prev, g["dense_h"], u["dense_h"], "dense_h")


# --- one walk of each argument's graph ------------------------------------------------------

class _HandWritten(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (5, 4), jnp.float64))

  def __call__(self, x):
    return sngd_jax.dense(x, self.kernel)


class _Walked(nnx.Module):
  """Every kind of node the walk sorts: recorded layers (one shared), a norm, an embedding, an
  ``nnx.RNN`` and its cell, a hand-written module with a ``kernel``."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(11, 3, rngs=rngs, **F64)
    self.l1 = nnx.Linear(3, 5, rngs=rngs, **F64)
    self.again = self.l1  # shared: one node, named at its first path (`again`)
    self.ln = nnx.LayerNorm(5, rngs=rngs, **F64)
    self.rnn = nnx.RNN(nnx.GRUCell(5, 5, rngs=rngs, **F64))
    self.hand = _HandWritten(rngs)

  def __call__(self, tokens):
    h = self.ln(self.again(self.l1(self.embed(tokens)[..., :3]) @ np.eye(5, 3)))
    return self.hand(self.rnn(h))


def test_one_walk_gives_the_maps_the_public_graph_api_gives():
  """``_walk`` sorts one ``nnx.iter_graph`` walk into the maps capture names layers by; each
  equals what flax's public API says of the same model: the recorded layers' paths
  (``nnx.iter_modules``), the Variables' arrays by path (``nnx.state``), the bare arrays of a
  pure dict of the params by key path (``jax.tree_util``), the RNN cells, and the
  hand-written module holding a ``kernel``."""
  from sngd_jax._src.capture import nnx as nnx_record

  model = _Walked(nnx.Rngs(0))
  graph = nnx_record._walk(model, ("m",))
  recorded = (nnx.Linear, nnx.LayerNorm, nnx.Embed, nnx.RNN)
  assert graph.layers == {id(m): "/".join(("m",) + tuple(map(str, p)))
                          for p, m in nnx.iter_modules(model) if isinstance(m, recorded)}
  # the shared layer once, at its first path in flax's (sorted) order
  assert sorted(graph.layers.values()) == ["m/again", "m/embed", "m/ln", "m/rnn",
                                           "m/rnn/cell/dense_h", "m/rnn/cell/dense_i"]
  flat = list(nnx.to_flat_state(nnx.state(model)))
  assert graph.variables == {id(v.get_value()): ("m",) + tuple(map(str, p)) for p, v in flat}
  assert [id(a) for a in graph.arrays] == [id(v.get_value()) for _, v in flat]
  assert graph.bare == {}
  assert list(graph.cells) == [nnx.GRUCell] and list(graph.hand_written) == [_HandWritten]
  pure = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  leaves = jax.tree_util.tree_flatten_with_path(pure)[0]
  assert nnx_record._walk(pure).bare == {
      id(leaf): tuple(str(k.key) for k in p) for p, leaf in leaves}


def test_capture_nnx_walks_each_argument_once(monkeypatch):
  """``capture_nnx`` walks the graph of the model and of each other argument once per call
  (``nnx._walk``), under ``nnx.value_and_grad``, and the capture is unchanged: the model's
  layers get the float64 solves, the other argument's (a target network) are left out. It
  made 10 walks here: the model 6 times (layer paths, Variables, bare arrays, arrays, then
  RNN cells and hand-written modules), the other arguments twice together and once each."""
  walked = []
  iter_graph = nnx.iter_graph

  def counting(root, *args, **kwargs):
    if sys._getframe(1).f_globals["__name__"].startswith("sngd_jax"):
      walked.append(root)
    return iter_graph(root, *args, **kwargs)

  monkeypatch.setattr(nnx, "iter_graph", counting)
  model, target = _MLP(nnx.Rngs(0)), _MLP(nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (7, 4), jnp.float64)
  loss_fn = lambda m, t, x: jnp.sum(jnp.sin(m(x) - t(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
      model, target, x)
  monkeypatch.undo()
  # the model, the target, x, the keyword arguments: each once
  assert len(walked) == 4, [type(r).__name__ for r in walked]
  assert len({id(r) for r in walked}) == 4
  assert set(acts) == {"l1", "ln", "l2"}
  updates, _ = _tx().update(grads, _tx().init(nnx.state(model, nnx.Param)),
                            nnx.state(model, nnx.Param), activations=acts)
  p, g, u = map(_np, (nnx.state(model, nnx.Param), grads, updates))
  x = np.asarray(x)
  ref.assert_dense_update(x, g["l1"], u["l1"], "l1")
  xhat, h = _layer_norm(x @ p["l1"]["kernel"] + p["l1"]["bias"], p["ln"]["scale"],
                        p["ln"]["bias"], 1e-6)
  ref.assert_dense_update(np.tanh(h), g["l2"], u["l2"], "l2")
