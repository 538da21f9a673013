"""Hand-written dense layers get SNGD through ``sngd_jax.dense`` (linen, NNX, Equinox).

For each framework a model whose hidden layer is written by hand (``sngd_jax.dense`` on its own
params) must get the update of the same model built with the framework's ``Dense``/``Linear``
on the same params (float32, rtol 1e-6), and the float64 damped solve ``(G + rho I)^{-1} g``
with ``G = E[x~ x~^T]`` over every leading position of the layer's input (``np_reference``);
``fisher="rfim"`` reads the recorded output. Without a capture ``dense`` is the plain matmul
(same jaxpr, same loss and gradients); params named or laid out otherwise than discovery reads
them raise an error naming the layer.
"""

import functools
import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from eqx_layers import EqxLinear, EqxNet
from flax import nnx
from helpers_mlp import reference_update
from np_reference import np64

import sngd_jax

RTOL32 = 1e-6


def _batch(dtype, shape=(4, 3, 6), seed=0):
  """Inputs with two leading axes (batch, tokens): every position is a row."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


# ---------------------------------------------------------------------------
# linen


class MyDense(nn.Module):
  """The research-code dense layer of the issue (``@nn.compact``)."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                   x.dtype)
    b = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
    return sngd_jax.dense(x, w, b)


class MySetupDense(nn.Module):
  """The same layer written setup-style."""

  features: int
  in_features: int

  def setup(self):
    self.kernel = self.param("kernel", nn.initializers.lecun_normal(),
                             (self.in_features, self.features))
    self.bias = self.param("bias", nn.initializers.zeros, (self.features,))

  def __call__(self, x):
    return sngd_jax.dense(x, self.kernel, self.bias, dtype=x.dtype)


class PlainDense(nn.Module):
  """The same layer without sngd_jax.dense (what research code writes today)."""

  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                   x.dtype)
    b = self.param("bias", nn.initializers.zeros, (self.features,), x.dtype)
    return x @ w + b


class Net(nn.Module):
  """hidden (hand-written or built-in) -> tanh -> head (built-in Dense)."""

  hidden: str = "custom"

  @nn.compact
  def __call__(self, x):
    if self.hidden == "custom":
      h = MyDense(5, name="hidden")(x)
    elif self.hidden == "setup":
      h = MySetupDense(5, x.shape[-1], name="hidden")(x)
    elif self.hidden == "plain":
      h = PlainDense(5, name="hidden")(x)
    else:
      h = nn.Dense(5, param_dtype=x.dtype, name="hidden")(x)
    return nn.Dense(2, param_dtype=x.dtype, name="head")(jnp.tanh(h))


def _linen_step(model, params, x, tx, outputs=False):
  loss_fn = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=outputs),
                                           has_aux=True)(params, x)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  return loss, grads, acts, updates


@pytest.mark.parametrize("hidden", ["custom", "setup"])
def test_linen_hand_written_dense_matches_builtin_dense(hidden):
  x = _batch(jnp.float32)
  params = Net("dense").init(jax.random.key(0), x)["params"]
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, acts, want = _linen_step(Net("dense"), params, x, tx)
  _, _, got_acts, got = _linen_step(Net(hidden), params, x, tx)
  assert [c.inputs.shape for c in got_acts["hidden"]] == [c.inputs.shape for c in acts["hidden"]]
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got["hidden"][leaf], want["hidden"][leaf], rtol=RTOL32)
  np.testing.assert_allclose(got["head"]["kernel"], want["head"]["kernel"], rtol=RTOL32)


def test_linen_hand_written_dense_against_float64_solve():
  with jax.enable_x64(True):
    x = _batch(jnp.float64)
    model = Net("custom")
    params = model.init(jax.random.key(1), x)["params"]
    _, grads, acts, updates = _linen_step(model, params, x, sngd_jax.sngd(
        **ref.one_step_kwargs()))
    assert len(acts["hidden"]) == 1  # one record per call
    rows = np64(x).reshape(-1, 6)  # every leading position (batch x tokens) is a row
    kernel, bias = ref.dense_update(rows, grads["hidden"]["kernel"], grads["hidden"]["bias"])
    np.testing.assert_allclose(updates["hidden"]["kernel"], kernel, rtol=1e-10)
    np.testing.assert_allclose(updates["hidden"]["bias"], bias, rtol=1e-10)


def test_linen_rfim_reads_the_recorded_output():
  with jax.enable_x64(True):
    x = _batch(jnp.float64)
    model = Net("custom")
    params = model.init(jax.random.key(2), x)["params"]
    tx = sngd_jax.sngd(**{**ref.one_step_kwargs(), "fisher": "rfim"})
    _, grads, acts, updates = _linen_step(model, params, x, tx, outputs=True)
    rows = np64(x).reshape(-1, 6)
    z = rows @ np64(params["hidden"]["kernel"]) + np64(params["hidden"]["bias"])
    np.testing.assert_allclose(acts["hidden"][0].outputs.reshape(-1, 5), z, rtol=1e-12)
    kernel, bias = reference_update(rows, z, np64(grads["hidden"]["kernel"]),
                                    np64(grads["hidden"]["bias"]), "rfim", ref.DAMPING)
    np.testing.assert_allclose(updates["hidden"]["kernel"], kernel, rtol=1e-9)
    np.testing.assert_allclose(updates["hidden"]["bias"], bias, rtol=1e-9)


def test_linen_without_capture_is_the_plain_matmul():
  """No capture: the same jaxpr as ``x @ w + b``, hence the same loss and gradients."""
  x = _batch(jnp.float32)
  params = Net("custom").init(jax.random.key(3), x)["params"]
  loss = lambda model: lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  custom, plain = loss(Net("custom")), loss(Net("plain"))
  assert str(jax.make_jaxpr(jax.grad(custom))(params)) == str(
      jax.make_jaxpr(jax.grad(plain))(params))
  (lc, gc), (lp, gp) = jax.value_and_grad(custom)(params), jax.value_and_grad(plain)(params)
  assert lc == lp
  jax.tree.map(np.testing.assert_array_equal, gc, gp)


class _ScannedBlock(nn.Module):
  custom: bool

  @nn.compact
  def __call__(self, h, _):
    layer = MyDense(6, name="dense") if self.custom else nn.Dense(6, name="dense")
    return jnp.tanh(layer(h)), None


class _Deep(nn.Module):
  custom: bool

  @nn.compact
  def __call__(self, x):
    block = nn.scan(nn.remat(_ScannedBlock), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    h, _ = block(self.custom, name="blocks")(x, None)
    return h


def test_linen_under_scan_and_remat_matches_builtin():
  """Stacked over depth by ``nn.scan`` (one factor per layer) through ``nn.remat``."""
  x = _batch(jnp.float32)
  params = _Deep(False).init(jax.random.key(4), x)["params"]
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, _, want = _linen_step(_Deep(False), params, x, tx)
  _, _, acts, got = _linen_step(_Deep(True), params, x, tx)
  assert acts["blocks/dense"][0].stack == 1
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=RTOL32), got, want)


class _DenseSubclass(nn.Dense):
  """A subclass of a recorded layer computing its product with ``sngd_jax.dense``."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", self.kernel_init, (x.shape[-1], self.features), self.param_dtype)
    b = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
    return sngd_jax.dense(x, w, b)


def test_linen_subclass_of_dense_calling_dense_records_once():
  """Intercepted as an ``nn.Dense`` and recorded by ``sngd_jax.dense``: one record, as for
  ``super().__call__`` (two would pool every row twice)."""
  x = _batch(jnp.float32)
  model = _Wrap(functools.partial(_DenseSubclass, 4))
  params = model.init(jax.random.key(8), x)["params"]
  _, acts = sngd_jax.capture(lambda p: jnp.sum(model.apply({"params": p}, x)))(params)
  assert len(acts["layer"]) == 1


def test_linen_one_unbatched_vector_is_one_example():
  """As ``nn.Dense`` on a ``(D,)`` vector (e.g. per example under ``jax.vmap``): one row."""
  x = _batch(jnp.float32, (6,))
  model = _Wrap(functools.partial(MyDense, 4))
  params = model.init(jax.random.key(8), x)["params"]
  _, acts = sngd_jax.capture(lambda p: jnp.sum(model.apply({"params": p}, x)))(params)
  assert acts["layer"][0].inputs.shape == (1, 6) and acts["layer"][0].batch_axis == 0


class _NamedW(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.lecun_normal(), (3, x.shape[-1]))  # (out, in)
    b = self.param("bias", nn.initializers.zeros, (3,))
    return sngd_jax.dense(x, w, b, layout="out_in")


class _KernelOutIn(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, x.shape[-1]))  # (out, in)
    return sngd_jax.dense(x, w, layout="out_in")


class _CastKernel(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 3))
    return sngd_jax.dense(x, w.astype(jnp.bfloat16).astype(x.dtype))


class _Wrap(nn.Module):
  layer: type

  @nn.compact
  def __call__(self, x):
    return self.layer(name="layer")(x)


@pytest.mark.parametrize("module,match", [
    (_NamedW, r"layer 'layer'.*kernel is the param 'w'.*layout='out_in'"),
    (_KernelOutIn, r"layer 'layer'.*layout='out_in', not 'in_out'.*fisher=\{'layer': None\}"),
    (_CastKernel, r"kernel passed by module 'layer' is not one of its params"),
])
def test_linen_wrong_names_or_layout_raise_naming_the_layer(module, match):
  x = _batch(jnp.float32, (4, 6))
  model = _Wrap(module)
  params = model.init(jax.random.key(5), x)["params"]
  loss_fn = lambda p: jnp.sum(model.apply({"params": p}, x))
  model.apply({"params": params}, x)  # without capture: just the matmul
  with pytest.raises(ValueError, match=match):
    jax.grad(sngd_jax.capture(loss_fn), has_aux=True)(params)


def test_linen_coverage_lists_the_hand_written_layer_and_the_error_names_dense():
  x = _batch(jnp.float32)
  params = Net("custom").init(jax.random.key(6), x)["params"]
  for hidden, status in (("custom", "linear/dense"), ("plain", "MISSING")):
    model = Net(hidden)
    loss_fn = lambda p, x, model=model: jnp.sum(model.apply({"params": p}, x))
    report = sngd_jax.coverage(loss_fn, params, x)
    rows = {p.path: p.fisher for p in report.params}
    assert rows["hidden/kernel"].startswith(status), rows
    if status == "MISSING":
      assert "sngd_jax.dense(x, kernel, bias)" in rows["hidden/kernel"]
  with pytest.raises(ValueError, match=r"'hidden'.*sngd_jax\.dense"):
    _linen_step(Net("plain"), params, x, sngd_jax.sngd())


# ---------------------------------------------------------------------------
# NNX


class MyLinear(nnx.Module):
  """An NNX dense layer holding its own ``nnx.Param``s."""

  def __init__(self, din, dout, *, rngs, as_variable=False, name="kernel",
               param_dtype=jnp.float32):
    init = nnx.initializers.lecun_normal()
    setattr(self, name, nnx.Param(init(rngs.params(), (din, dout), param_dtype)))
    self.bias = nnx.Param(jnp.zeros((dout,), param_dtype))
    self.as_variable, self.name = as_variable, name

  def __call__(self, x):
    kernel = getattr(self, self.name)
    if self.as_variable:
      return sngd_jax.dense(x, kernel, self.bias)
    return sngd_jax.dense(x, kernel[...], self.bias[...])


class NNXNet(nnx.Module):
  def __init__(self, kind, rngs, param_dtype=jnp.float32, **kw):
    if kind == "builtin":
      self.hidden = nnx.Linear(6, 5, rngs=rngs, param_dtype=param_dtype)
    else:
      self.hidden = MyLinear(6, 5, rngs=rngs, as_variable=kind == "variable",
                             param_dtype=param_dtype, **kw)
    self.head = nnx.Linear(5, 2, rngs=rngs, param_dtype=param_dtype)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))


def _nnx_step(model, x, tx, outputs=False):
  loss_fn = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn, outputs=outputs),
                                        has_aux=True)(model, x)
  params = nnx.state(model, nnx.Param)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  return grads, acts, updates


def _nnx_copy(kind, source):
  """An ``NNXNet`` of ``kind`` holding the params of ``source``."""
  model = NNXNet(kind, nnx.Rngs(9))
  for name in ("hidden", "head"):
    for leaf in ("kernel", "bias"):
      getattr(getattr(model, name), leaf)[...] = getattr(getattr(source, name), leaf)[...]
  return model


@pytest.mark.parametrize("kind", ["array", "variable"])
def test_nnx_hand_written_linear_matches_builtin_linear(kind):
  x = _batch(jnp.float32)
  builtin = NNXNet("builtin", nnx.Rngs(0))
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, want = _nnx_step(builtin, x, tx)
  _, acts, got = _nnx_step(_nnx_copy(kind, builtin), x, tx)
  assert len(acts["hidden"]) == 1 and acts["hidden"][0].inputs.shape == (4, 3, 6)
  for name in ("hidden", "head"):
    for leaf in ("kernel", "bias"):
      np.testing.assert_allclose(got[name][leaf][...], want[name][leaf][...], rtol=RTOL32)


def test_nnx_hand_written_linear_against_float64_solve_and_rfim():
  with jax.enable_x64(True):
    x = _batch(jnp.float64)
    model = NNXNet("array", nnx.Rngs(1), param_dtype=jnp.float64)
    model.hidden.bias[...] = jnp.asarray(np.random.default_rng(7).normal(size=5))
    rows = np64(x).reshape(-1, 6)
    grads, _, updates = _nnx_step(model, x, sngd_jax.sngd(**ref.one_step_kwargs()))
    kernel, bias = ref.dense_update(rows, grads["hidden"]["kernel"][...],
                                    grads["hidden"]["bias"][...])
    np.testing.assert_allclose(updates["hidden"]["kernel"][...], kernel, rtol=1e-10)
    np.testing.assert_allclose(updates["hidden"]["bias"][...], bias, rtol=1e-10)
    tx = sngd_jax.sngd(**{**ref.one_step_kwargs(), "fisher": "rfim"})
    grads, acts, updates = _nnx_step(model, x, tx, outputs=True)
    z = rows @ np64(model.hidden.kernel[...]) + np64(model.hidden.bias[...])
    np.testing.assert_allclose(acts["hidden"][0].outputs.reshape(-1, 5), z, rtol=1e-12)
    kernel, bias = reference_update(rows, z, np64(grads["hidden"]["kernel"][...]),
                                    np64(grads["hidden"]["bias"][...]), "rfim", ref.DAMPING)
    np.testing.assert_allclose(updates["hidden"]["kernel"][...], kernel, rtol=1e-9)
    np.testing.assert_allclose(updates["hidden"]["bias"][...], bias, rtol=1e-9)


def test_nnx_without_capture_and_wrong_name():
  x = _batch(jnp.float32)
  model = NNXNet("array", nnx.Rngs(2))
  plain = lambda m: jnp.sum(jnp.sin(m.head(jnp.tanh(
      x @ m.hidden.kernel[...] + m.hidden.bias[...]))))
  custom = lambda m: jnp.sum(jnp.sin(m(x)))
  (lc, gc), (lp, gp) = nnx.value_and_grad(custom)(model), nnx.value_and_grad(plain)(model)
  assert lc == lp
  jax.tree.map(np.testing.assert_array_equal, gc, gp)
  report = sngd_jax.coverage(lambda m, x: jnp.sum(m(x)), model, x)
  assert {p.path: p.fisher for p in report.params}["hidden/kernel"].startswith("linear/dense")
  named_w = NNXNet("array", nnx.Rngs(2), name="w")
  with pytest.raises(ValueError, match=r"layer 'hidden'.*kernel is the param 'w'"):
    nnx.grad(sngd_jax.capture_nnx(lambda m, x: jnp.sum(m(x))), has_aux=True)(named_w, x)


class _NNXBlock(nnx.Module):
  def __init__(self, custom, rngs):
    cls = MyLinear if custom else nnx.Linear
    self.dense = cls(6, 6, rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x))


class _NNXDeep(nnx.Module):
  """Three blocks made by ``nnx.vmap``, applied by ``nnx.scan`` over ``nnx.remat``."""

  def __init__(self, custom, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXBlock(custom, rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, block):
      return block(x)

    return forward(x, self.blocks)


def test_nnx_under_vmap_scan_and_remat_matches_builtin():
  x = _batch(jnp.float32)
  builtin, custom = _NNXDeep(False, nnx.Rngs(0)), _NNXDeep(True, nnx.Rngs(0))
  for leaf in ("kernel", "bias"):
    getattr(custom.blocks.dense, leaf)[...] = getattr(builtin.blocks.dense, leaf)[...]
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, want = _nnx_step(builtin, x, tx)
  _, acts, got = _nnx_step(custom, x, tx)
  assert acts["blocks/dense"][0].stack == 1 and acts["blocks/dense"][0].inputs.shape[0] == 3
  for leaf in ("kernel", "bias"):
    np.testing.assert_allclose(got["blocks"]["dense"][leaf][...],
                               want["blocks"]["dense"][leaf][...], rtol=RTOL32)


# ---------------------------------------------------------------------------
# Equinox


@sngd_jax.dense_layer(weight="kernel", bias="b", layout="in_out")
class EqxInOut(eqx.Module):
  """One declared with other field names and an inputs-first kernel."""

  kernel: jax.Array
  b: jax.Array

  def __call__(self, x):
    return sngd_jax.dense(x, self.kernel, self.b)


class EqxUndeclared(eqx.Module):
  weight: jax.Array
  bias: jax.Array

  def __call__(self, x):
    return sngd_jax.dense(x, self.weight, self.bias, layout="out_in")


def _eqx_nets(dtype):
  k = jax.random.split(jax.random.key(0), 2)
  hidden = eqx.nn.Linear(6, 5, key=k[0], dtype=dtype)
  head = eqx.nn.Linear(5, 2, key=k[1], dtype=dtype)
  return {"builtin": EqxNet(hidden, head),
          "custom": EqxNet(EqxLinear(hidden.weight, hidden.bias), head),
          "in_out": EqxNet(EqxInOut(hidden.weight.T, hidden.bias), head),
          "undeclared": EqxNet(EqxUndeclared(hidden.weight, hidden.bias), head)}


def _eqx_step(model, x, tx, outputs=False):
  # vmapped over batch and tokens: every position is a row
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(jax.vmap(m))(x)))
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss, outputs=outputs),
                                               has_aux=True)(model, x)
  params = eqx.filter(model, eqx.is_inexact_array)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  return grads, acts, updates


def test_eqx_hand_written_linear_matches_builtin_linear():
  x = _batch(jnp.float32)
  nets = _eqx_nets(jnp.float32)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, want = _eqx_step(nets["builtin"], x, tx)
  _, acts, got = _eqx_step(nets["custom"], x, tx)
  assert acts["hidden"][0].inputs.shape == (4, 3, 6)
  np.testing.assert_allclose(got.hidden.weight, want.hidden.weight, rtol=RTOL32)
  np.testing.assert_allclose(got.hidden.bias, want.hidden.bias, rtol=RTOL32)
  np.testing.assert_allclose(got.head.weight, want.head.weight, rtol=RTOL32)


@pytest.mark.parametrize("net", ["custom", "in_out"])
@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_eqx_hand_written_linear_against_float64_solve(fisher, net):
  """The declared layer, stored (out, in) as eqx.nn.Linear or (in, out) with other field
  names (``dense_layer(weight="kernel", bias="b", layout="in_out")``)."""
  with jax.enable_x64(True):
    x = _batch(jnp.float64)
    model = _eqx_nets(jnp.float64)[net]
    tx = sngd_jax.sngd(**{**ref.one_step_kwargs(), "fisher": fisher})
    grads, acts, updates = _eqx_step(model, x, tx, outputs=fisher == "rfim")
    rows = np64(x).reshape(-1, 6)
    kernel, bias = ("weight", "bias") if net == "custom" else ("kernel", "b")
    as_in_out = (lambda a: np64(a).T) if net == "custom" else np64  # (in, out) for numpy
    w_in_out = as_in_out(getattr(model.hidden, kernel))
    z = rows @ w_in_out + np64(getattr(model.hidden, bias))
    if fisher == "rfim":
      np.testing.assert_allclose(acts["hidden"][0].outputs.reshape(-1, 5), z, rtol=1e-12)
    w, b = reference_update(rows, z, as_in_out(getattr(grads.hidden, kernel)),
                            np64(getattr(grads.hidden, bias)), fisher, ref.DAMPING)
    np.testing.assert_allclose(as_in_out(getattr(updates.hidden, kernel)), w, rtol=1e-9)
    np.testing.assert_allclose(getattr(updates.hidden, bias), b, rtol=1e-9)


def test_eqx_without_capture_coverage_and_errors():
  x = _batch(jnp.float32)
  nets = _eqx_nets(jnp.float32)
  model = nets["custom"]
  custom = lambda m: jnp.sum(jnp.sin(jax.vmap(jax.vmap(m))(x)))
  plain = lambda m: jnp.sum(jnp.sin(jax.vmap(jax.vmap(lambda s: m.head(jnp.tanh(
      m.hidden.weight @ s + m.hidden.bias))))(x)))
  (lc, gc), (lp, gp) = (eqx.filter_value_and_grad(custom)(model),
                        eqx.filter_value_and_grad(plain)(model))
  assert lc == lp
  jax.tree.map(np.testing.assert_array_equal, gc, gp)
  loss = lambda m, x: jnp.sum(jax.vmap(jax.vmap(m))(x))
  report = sngd_jax.coverage(loss, model, x)
  assert {p.path: p.fisher for p in report.params}["hidden/weight"].startswith("linear/dense")
  with pytest.raises(ValueError, match=r"layer 'hidden'.*not declared.*sngd_jax.dense_layer"):
    eqx.filter_grad(sngd_jax.capture_eqx(loss), has_aux=True)(nets["undeclared"], x)
  with pytest.raises(TypeError, match="declares Equinox module classes"):
    sngd_jax.dense_layer(MyLinear)


def test_eqx_wrong_layout_raises_naming_the_layer():
  @sngd_jax.dense_layer
  class Transposed(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):  # declared (out, in) but multiplied as (in, out)
      return sngd_jax.dense(x, self.weight.T, self.bias)

  @sngd_jax.dense_layer
  class WrongLayout(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
      return sngd_jax.dense(x, self.weight, self.bias)  # layout 'in_out' on a (in, out) use

  x = _batch(jnp.float32)
  net = _eqx_nets(jnp.float32)["custom"]
  loss = lambda m, x: jnp.sum(jax.vmap(jax.vmap(m))(x))
  square = jnp.zeros((6, 6))
  wrong = EqxNet(WrongLayout(square, jnp.zeros(6)), eqx.nn.Linear(6, 2, key=jax.random.key(1)))
  with pytest.raises(ValueError, match=r"layer 'hidden'.*layout='in_out', not 'out_in'"):
    eqx.filter_grad(sngd_jax.capture_eqx(loss), has_aux=True)(wrong, x)
  transposed = EqxNet(Transposed(net.hidden.weight, net.hidden.bias), net.head)
  with pytest.warns(UserWarning, match=r"sngd_jax.dense \(kernel \(6, 5\)\)"):
    eqx.filter_grad(sngd_jax.capture_eqx(loss), has_aux=True)(transposed, x)


class _EqxStack(eqx.Module):
  """Three 6 -> 6 layers made by ``eqx.filter_vmap``, applied by ``jax.lax.scan``."""

  blocks: eqx.Module
  head: eqx.nn.Linear

  def __call__(self, x):
    params, static = eqx.partition(self.blocks, eqx.is_array)

    def step(h, p):
      return jnp.tanh(eqx.combine(p, static)(h)), None
    return self.head(jax.lax.scan(step, x, params)[0])


def test_eqx_stacked_by_filter_vmap_and_scan_matches_builtin():
  keys = jax.random.split(jax.random.key(3), 4)
  blocks = eqx.filter_vmap(lambda k: eqx.nn.Linear(6, 6, key=k))(keys[:3])
  head = eqx.nn.Linear(6, 2, key=keys[3])
  builtin = _EqxStack(blocks, head)
  custom = _EqxStack(EqxLinear(blocks.weight, blocks.bias), head)
  x = _batch(jnp.float32)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, _, want = _eqx_step(builtin, x, tx)
  _, acts, got = _eqx_step(custom, x, tx)
  assert acts["blocks"][0].stack == 1 and acts["blocks"][0].inputs.shape[0] == 3
  np.testing.assert_allclose(got.blocks.weight, want.blocks.weight, rtol=RTOL32)
  np.testing.assert_allclose(got.blocks.bias, want.blocks.bias, rtol=RTOL32)


class _NNXComputedBias(MyLinear):
  """Passes a computed bias (its own, doubled): no Variable of any module."""

  def __call__(self, x):
    return sngd_jax.dense(x, self.kernel[...], 2 * self.bias[...])


class _EqxComputedBias(EqxLinear):
  """Passes a computed bias (its own, doubled): no field of any module."""

  def __call__(self, x):
    return sngd_jax.dense(x, self.weight, 2 * self.bias, layout="out_in")


def test_nnx_and_eqx_computed_bias_raises_naming_the_layer():
  """A bias that is no param of the kernel's module raises, naming the layer, the kernel and
  what to pass (Haiku's: tests/test_haiku_gaps.py); the module's own bias cast to another
  dtype is its param (`test_kernel_cast_before_dense_is_recorded_from_the_input_rows`)."""
  x = _batch(jnp.float32)
  nnx_model = NNXNet("array", nnx.Rngs(2))
  nnx_model.hidden = _NNXComputedBias(6, 5, rngs=nnx.Rngs(3))
  with pytest.raises(ValueError, match=r"layer 'hidden': the bias is not a Variable of the "
                     r"module that holds the kernel 'hidden/kernel'.*own `nnx.Param`s"):
    nnx.grad(sngd_jax.capture_nnx(lambda m, x: jnp.sum(m(x))), has_aux=True)(nnx_model, x)
  net = _eqx_nets(jnp.float32)["custom"]
  eqx_model = EqxNet(sngd_jax.dense_layer(_EqxComputedBias)(net.hidden.weight, net.hidden.bias),
                     net.head)
  loss = lambda m, x: jnp.sum(jax.vmap(jax.vmap(m))(x))
  with pytest.raises(ValueError, match=r"layer 'hidden': the bias is not a field of the "
                     r"_EqxComputedBias that holds the weight 'hidden/weight'.*own field"):
    eqx.filter_grad(sngd_jax.capture_eqx(loss), has_aux=True)(eqx_model, x)


def test_dense_checks_its_arguments_and_computes_both_layouts():
  x = _batch(jnp.float32, (4, 6))
  w = jnp.asarray(np.random.default_rng(9).normal(size=(6, 5)), jnp.float32)
  b = jnp.arange(5.0)
  np.testing.assert_array_equal(sngd_jax.dense(x, w, b), x @ w + b)
  np.testing.assert_array_equal(sngd_jax.dense(x, w.T, b, layout="out_in"), x @ w + b)
  np.testing.assert_array_equal(sngd_jax.dense(x[0], w.T, layout="out_in"), w.T @ x[0])
  assert sngd_jax.dense(x, w, dtype=jnp.bfloat16).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="must be 2-D"):
    sngd_jax.dense(x, jnp.ones((2, 6, 5)))
  with pytest.raises(ValueError, match=r"bias must have shape \(5,\)"):
    sngd_jax.dense(x, w, jnp.ones(6))
  with pytest.raises(ValueError, match="layout='io'"):
    sngd_jax.dense(x, w, layout="io")
  with pytest.raises(ValueError, match="dense_layer\\(layout='io'\\)"):
    sngd_jax.dense_layer(layout="io")


# ---------------------------------------------------------------------------
# another model passed to the loss (a target network): its sngd_jax.dense calls are left out


class _TwoLayer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(2)(jnp.tanh(MyDense(5)(x)))


def test_linen_dense_of_a_target_network_passed_as_an_argument_is_left_out():
  model = _TwoLayer()
  x, x_next = _batch(jnp.float32, (6, 4)), _batch(jnp.float32, (6, 4), seed=1)
  params = model.init(jax.random.key(0), x)["params"]
  target = jax.tree.map(lambda a: a * 0.5, params)

  def loss(p, t, x, x_next):
    return jnp.mean(model.apply({"params": p}, x) - model.apply({"params": t}, x_next)) ** 2

  _, acts = sngd_jax.capture(loss)(params, target, x, x_next)
  (call,) = acts["MyDense_0"]
  np.testing.assert_array_equal(np.asarray(call.inputs), np.asarray(x))  # online rows only


def test_nnx_dense_of_a_target_network_passed_as_an_argument_is_left_out():
  class Holder(nnx.Module):
    def __init__(self, rngs):
      self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, 5)))
      self.bias = nnx.Param(jnp.zeros((5,)))

    def __call__(self, x):
      return sngd_jax.dense(x, self.kernel, self.bias)

  model, target = Holder(nnx.Rngs(0)), Holder(nnx.Rngs(1))
  x, x_next = _batch(jnp.float32, (6, 4)), _batch(jnp.float32, (6, 4), seed=1)

  def loss(m, t, x, x_next):
    return jnp.mean(m(x) - t(x_next)) ** 2

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "could not name" warning
    _, acts = sngd_jax.capture_nnx(loss)(model, target, x, x_next)
  (call,) = next(iter(acts.values()))
  np.testing.assert_array_equal(np.asarray(call.inputs), np.asarray(x))


# ---------------------------------------------------------------------------
# A kernel cast before `dense` (the bf16 compute pattern), in the three frameworks


BF16 = jnp.bfloat16


class _LinenCast(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], 5))
    b = self.param("bias", nn.initializers.normal(0.5), (5,))
    return sngd_jax.dense(x.astype(BF16), w.astype(BF16), b.astype(BF16))


class _LinenCastNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = _LinenCast(name="hidden")(x)
    return nn.Dense(2, name="head")(jnp.tanh(h.astype(jnp.float32)))


class _NNXCast(nnx.Module):
  def __init__(self, rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (6, 5)))
    self.bias = nnx.Param(0.5 * jax.random.normal(rngs.params(), (5,)))

  def __call__(self, x):
    return sngd_jax.dense(x.astype(BF16), self.kernel[...].astype(BF16),
                          self.bias[...].astype(BF16))


class _NNXCastNet(nnx.Module):
  def __init__(self, rngs):
    self.hidden, self.head = _NNXCast(rngs), nnx.Linear(5, 2, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x).astype(jnp.float32)))


@sngd_jax.dense_layer
class _EqxCast(eqx.Module):
  weight: jax.Array
  bias: jax.Array

  def __call__(self, x):
    return sngd_jax.dense(x.astype(BF16), self.weight.astype(BF16), self.bias.astype(BF16),
                          layout="out_in")


def _cast_step(framework):
  """One update of a model whose hidden layer casts its kernel, bias and input to bfloat16
  before `sngd_jax.dense`: ``(hidden layer's rows, its kernel (in, out) and bias grads,
  updates (in, out), the state)``."""
  x = _batch(jnp.float32)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  if framework == "linen":
    model = _LinenCastNet()
    params = model.init(jax.random.key(3), x)["params"]
    loss = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    get = lambda t, leaf: t["hidden"][leaf]
  elif framework == "nnx":
    model = _NNXCastNet(nnx.Rngs(3))
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model, x)
    params = nnx.state(model, nnx.Param)
    get = lambda t, leaf: t["hidden"][leaf][...]
  else:
    k = jax.random.split(jax.random.key(3), 3)
    model = EqxNet(_EqxCast(0.4 * jax.random.normal(k[0], (5, 6)), jax.random.normal(k[1], (5,))),
                   eqx.nn.Linear(5, 2, key=k[2]))
    loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(jax.vmap(
        lambda xi: m.head(jnp.tanh(m.hidden(xi).astype(jnp.float32)))))(x)))
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
        model, x)
    params = eqx.filter(model, eqx.is_inexact_array)
    get = lambda t, leaf: (t.hidden.weight.T if leaf == "kernel" else t.hidden.bias)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  assert acts["hidden"][0].inputs.dtype == BF16
  rows = np64(acts["hidden"][0].inputs).reshape(-1, 6)  # the bfloat16 rows the kernel multiplies
  np.testing.assert_array_equal(rows, np64(x.astype(BF16)).reshape(-1, 6))
  return rows, (get(grads, "kernel"), get(grads, "bias")), (
      get(updates, "kernel"), get(updates, "bias")), state


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_kernel_cast_before_dense_is_recorded_from_the_input_rows(framework):
  """``dense(x.astype(bf16), kernel.astype(bf16), bias.astype(bf16))``, the way a layer
  computes in bfloat16, as ``nn.Dense(dtype=jnp.bfloat16)`` does inside: the cast kernel is
  read as the layer's own param (linen raised, NNX and Equinox warned and left the layer
  uncaptured). The factor is the float64 ``E[x~ x~^T]`` of the bfloat16 rows, and the
  update the float64 damped solve with it."""
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # no "could not name" warning
    rows, (gk, gb), (uk, ub), state = _cast_step(framework)
  factor = np64(state.factors["hidden"]) / np64(state.weights["hidden"])
  want = ref.linear_factor(rows)
  np.testing.assert_allclose(factor, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
  kernel, bias = ref.dense_update(rows, gk, gb)
  scale = np.abs(kernel).max()
  np.testing.assert_allclose(np64(uk), kernel, rtol=1e-5, atol=1e-6 * scale)  # float32 solve
  np.testing.assert_allclose(np64(ub), bias, rtol=1e-5, atol=1e-6 * scale)


class _LinenCastBlock(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    w = self.param("kernel", nn.initializers.lecun_normal(), (6, 6))
    b = self.param("bias", nn.initializers.normal(0.5), (6,))
    y = sngd_jax.dense(h.astype(BF16), w.astype(BF16), b.astype(BF16))
    return jnp.tanh(y).astype(h.dtype), None


class _LinenCastDeep(nn.Module):
  @nn.compact
  def __call__(self, x):
    block = nn.scan(nn.remat(_LinenCastBlock), variable_axes={"params": 0},
                    split_rngs={"params": True}, length=3)
    return block(name="blocks")(x, None)[0]


class _NNXCastBlock(nnx.Module):
  def __init__(self, rngs):
    self.dense = _NNXCastSquare(rngs)

  def __call__(self, x):
    return jnp.tanh(self.dense(x))


class _NNXCastSquare(_NNXCast):
  def __init__(self, rngs):
    self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (6, 6)))
    self.bias = nnx.Param(0.5 * jax.random.normal(rngs.params(), (6,)))


class _NNXCastDeep(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXCastBlock(rngs)

    self.blocks = make(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, block):
      return block(x).astype(jnp.float32)

    return forward(x, self.blocks)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_cast_kernel_of_layers_scanned_over_depth_gets_one_factor_per_layer(framework):
  """The cast kernel of a layer stacked over depth (``nn.scan``/``nnx.scan`` through
  ``remat``) is the stack's slice: one factor per layer, each the float64 ``E[x~ x~^T]`` of
  that layer's bfloat16 rows (the first layer's are the batch's)."""
  x = _batch(jnp.float32)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    if framework == "linen":
      model, path = _LinenCastDeep(), "blocks"
      params = model.init(jax.random.key(4), x)["params"]
      loss = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    else:
      model, path = _NNXCastDeep(nnx.Rngs(4)), "blocks/dense"
      loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
      (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model, x)
      params = nnx.state(model, nnx.Param)
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
  (call,) = acts[path]
  assert call.stack == 1 and call.inputs.shape == (3, 4, 3, 6) and call.inputs.dtype == BF16
  np.testing.assert_array_equal(np64(call.inputs[0]), np64(x.astype(BF16)))
  factors = np64(state.factors[path]) / np.reshape(np64(state.weights[path]), (-1, 1, 1))
  assert factors.shape == (3, 7, 7)
  for layer in range(3):
    want = ref.linear_factor(np64(call.inputs[layer]).reshape(-1, 6))
    np.testing.assert_allclose(factors[layer], want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
