"""Haiku models through capture_hk: discovery of Haiku params, the captured records against
the layers' explicit inputs, one update of an MLP, a CNN, embeddings, norms and BatchNorm
(under transform_with_state) against float64 numpy references and against the same model
written in linen; LSTM under dynamic_unroll, layer_stack, remat; warnings."""

import sys
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_warnings import no_sngd_warnings

import sngd_jax

hk = pytest.importorskip("haiku")  # a guard only: CI installs the `haiku` extra

KEY = jax.random.key(0)


def _np(a):
  return np.asarray(a, np.float64)


def _one_update(loss, params, *args, has_aux=False, fisher="linear"):
  """Grads, one exact update and the activations, under jit (the documented loop)."""
  tx = exact_sngd(**ref.one_step_kwargs(), fisher=fisher)

  @jax.jit
  def step(params, *args):
    (_, aux), grads = jax.value_and_grad(
        sngd_jax.capture_hk(loss, has_aux=has_aux), has_aux=True)(params, *args)
    acts = aux[1] if has_aux else aux
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  with jax.checking_leaks():
    return step(params, *args)


def _check_dense(rows, g, u, name):
  kernel, bias = ref.dense_update(rows, _np(g["w"]), None if "b" not in g else _np(g["b"]))
  np.testing.assert_allclose(_np(u["w"]), kernel, rtol=1e-8, atol=1e-12, err_msg=name)
  if bias is not None:
    np.testing.assert_allclose(_np(u["b"]), bias, rtol=1e-8, atol=1e-12, err_msg=name)


# --- discovery -----------------------------------------------------------------------

def _zoo(x, is_training=True):
  h = hk.nets.MLP([5, 3])(x)
  c = hk.Conv2D(4, 3)(jnp.reshape(x[:, :4], (-1, 2, 2, 1)))
  c = hk.BatchNorm(True, True, 0.9)(c, is_training=is_training)
  e = hk.Embed(7, 3)(jnp.array([1, 2, 2]))
  n = hk.LayerNorm(-1, True, True)(h) + hk.RMSNorm(-1)(h)
  return jnp.sum(n) + jnp.sum(c) + jnp.sum(e)


def test_discover_reads_haiku_params():
  model = hk.transform_with_state(_zoo)
  params, state = model.init(KEY, jnp.ones((2, 6)))
  specs = sngd_jax.discover(params)
  got = {p: (s.kernel[-1], s.bias and s.bias[-1], s.structure, s.in_dim, s.out_dim)
         for p, s in specs.items()}
  assert got == {
      "mlp/~/linear_0": ("w", "b", "dense", 6, 5),
      "mlp/~/linear_1": ("w", "b", "dense", 5, 3),
      "conv2_d": ("w", "b", "dense", 9, 4),
      "batch_norm": ("scale", "offset", "per_channel", 1, 4),  # scale (1, 1, 1, 4)
      "embed": ("embeddings", None, "diagonal", 7, 3),
      "layer_norm": ("scale", "offset", "per_channel", 1, 3),
      "rms_norm": ("scale", None, "per_channel", 1, 3),
  }
  assert sngd_jax.discover(state) == {}  # the moving averages are no layer


def test_haiku_names_are_not_read_in_other_trees(monkeypatch):
  """A tree with linen's names anywhere is read with linen's only; without Haiku imported no
  tree is read with Haiku's."""
  mixed = {"Dense_0": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)},
           "Custom_0": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}}
  assert list(sngd_jax.discover(mixed)) == ["Dense_0"]
  haiku_tree = {"linear": {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}}
  assert list(sngd_jax.discover(haiku_tree)) == ["linear"]
  monkeypatch.delitem(sys.modules, "haiku")
  assert sngd_jax.discover(haiku_tree) == {}


# --- capture -------------------------------------------------------------------------

def test_records_are_the_layers_inputs():
  def fn(x):
    h = jax.nn.relu(hk.Linear(5)(x))
    return hk.Linear(2, name="head")(h)
  model = hk.transform(fn)  # with an rng argument
  x = jax.random.normal(KEY, (4, 3))
  params = model.init(KEY, x)
  loss = lambda p, x: jnp.sum(model.apply(p, None, x))
  value, acts = sngd_jax.capture_hk(loss, outputs=True)(params, x)
  assert value == loss(params, x)
  h = jax.nn.relu(x @ params["linear"]["w"] + params["linear"]["b"])
  assert set(acts) == {"linear", "head"}
  np.testing.assert_array_equal(acts["linear"][0].inputs, x)
  np.testing.assert_allclose(acts["head"][0].inputs, h, rtol=1e-6)
  np.testing.assert_allclose(acts["head"][0].outputs, model.apply(params, None, x), rtol=1e-6)


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def test_mlp_update_is_the_damped_solve(x64):
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([6, 4, 3], activation=jnp.tanh)(x)))
  x = jax.random.normal(KEY, (16, 5), jnp.float64)
  params = model.init(KEY, x)
  loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))
  grads, updates, acts = _one_update(loss, params, x)
  h = _np(x)
  for i in range(3):
    name = f"mlp/~/linear_{i}"
    _check_dense(h, grads[name], updates[name], name)
    h = np.tanh(h @ _np(params[name]["w"]) + _np(params[name]["b"]))


class LinenMLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i, width in enumerate((6, 4, 3)):
      x = nn.Dense(width, name=f"Dense_{i}")(x)
      x = jnp.tanh(x) if i < 2 else x
    return x


def _assert_update_equals_linen(model, linen_model, linen_path, x):
  """One update of the Haiku ``model`` equals that of ``linen_model`` given the same weights
  (Haiku layer path -> linen layer name: ``linen_path``), to float32 rounding."""
  params = model.init(KEY, x)
  names = {"w": "kernel", "b": "bias"}
  to_linen = {"params": {linen_path(layer): {names[k]: v for k, v in leaves.items()}
                         for layer, leaves in params.items()}}
  _, hk_updates, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, x)
  tx = exact_sngd(**ref.one_step_kwargs())
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(
      lambda p, x: jnp.sum(jnp.sin(linen_model.apply(p, x)))), has_aux=True)(to_linen, x)
  linen_updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, to_linen, activations=a))(
      grads, tx.init(to_linen), acts)
  assert set(hk_updates) == set(params)
  for layer, leaves in hk_updates.items():
    for k, u in leaves.items():
      # float32 rounding of two compiled solves, of the order of eps times the update's scale
      # (an entry of 0.05 in a kernel's update of entries up to 4.5 was 3.1e-6 off under load)
      want = linen_updates["params"][linen_path(layer)][names[k]]
      np.testing.assert_allclose(u, want, rtol=2e-5, atol=2e-6 * float(np.max(np.abs(want))),
                                 err_msg=f"{layer}/{k}")


def test_mlp_update_equals_linen_with_the_same_weights():
  model = hk.without_apply_rng(hk.transform(
      lambda x: hk.nets.MLP([6, 4, 3], activation=jnp.tanh)(x)))
  _assert_update_equals_linen(model, LinenMLP(), lambda p: p.replace("mlp/~/linear_", "Dense_"),
                              jax.random.normal(KEY, (16, 5)))


def _cnn(x):
  h = jnp.tanh(hk.Conv2D(4, (3, 2), stride=(2, 1), padding="SAME")(x))
  h = jnp.tanh(hk.Conv2D(3, 3, padding="VALID", with_bias=False, name="valid")(h))
  return hk.Linear(2)(jnp.reshape(h, (h.shape[0], -1)))


def test_cnn_update_is_the_damped_solve(x64):
  model = hk.without_apply_rng(hk.transform(_cnn))
  x = jax.random.normal(KEY, (3, 7, 6, 2), jnp.float64)
  params = model.init(KEY, x)
  loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))
  grads, updates, acts = _one_update(loss, params, x)
  assert set(acts) == {"conv2_d", "valid", "linear"}
  rows, _ = ref.conv_patches(_np(x), (3, 2), (2, 1), "SAME", (1, 1), (1, 1), 1)
  g = grads["conv2_d"]
  kernel, bias = ref.dense_update(rows, _np(g["w"]).reshape(rows.shape[1], -1), _np(g["b"]))
  np.testing.assert_allclose(_np(updates["conv2_d"]["w"]).reshape(kernel.shape), kernel,
                             rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(_np(updates["conv2_d"]["b"]), bias, rtol=1e-8, atol=1e-12)
  h1 = jnp.tanh(jax.lax.conv_general_dilated(
      x, params["conv2_d"]["w"], (2, 1), "SAME",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["conv2_d"]["b"])
  rows, _ = ref.conv_patches(_np(h1), (3, 3), (1, 1), "VALID", (1, 1), (1, 1), 1)
  kernel, _ = ref.dense_update(rows, _np(grads["valid"]["w"]).reshape(rows.shape[1], -1), None)
  np.testing.assert_allclose(_np(updates["valid"]["w"]).reshape(kernel.shape), kernel,
                             rtol=1e-8, atol=1e-12)


def test_channels_first_conv_with_padding_pairs(x64):
  def fn(x):  # (N, C, W)
    return hk.Conv1D(3, 3, stride=2, padding=[(2, 1)], with_bias=False, data_format="NCW")(x)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(KEY, (2, 4, 9), jnp.float64)
  params = model.init(KEY, x)
  grads, updates, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, x)
  rows, _ = ref.conv_patches(np.moveaxis(_np(x), 1, -1), (3,), (2,), ((2, 1),), (1,), (1,), 1)
  kernel, _ = ref.dense_update(rows, _np(grads["conv1_d"]["w"]).reshape(rows.shape[1], -1),
                               None)
  np.testing.assert_allclose(_np(updates["conv1_d"]["w"]).reshape(kernel.shape), kernel,
                             rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("padding", ["SAME", "VALID"])
def test_conv_transpose_update_is_the_damped_solve(x64, padding, with_bias):
  """An hk.Conv2DTranspose (stride 2, kernel (*k, O, C)) is the conv of the stride-dilated
  input with the kernel read (*k, C, O): its update is the damped solve over those patches,
  built here by loops (checked against Haiku's own output first)."""
  k, s = (3, 2), (2, 2)
  model = hk.without_apply_rng(hk.transform(lambda x: hk.Conv2DTranspose(
      3, k, stride=s, padding=padding, with_bias=with_bias)(x)))
  x = jax.random.normal(KEY, (2, 3, 4, 2), jnp.float64)
  params = model.init(KEY, x)
  grads, updates, acts = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params,
                                     x)
  assert set(acts) == {"conv2_d_transpose"}
  pads = [ref.transpose_pads(k[i], s[i], padding) for i in range(2)]
  rows, _ = ref.conv_patches(_np(x), k, (1, 1), pads, (1, 1), s, 1)
  w = np.swapaxes(_np(params["conv2_d_transpose"]["w"]), -1, -2)  # (*k, C, O)
  y = rows @ w.reshape(rows.shape[1], -1)
  if with_bias:
    y = y + _np(params["conv2_d_transpose"]["b"])
  np.testing.assert_allclose(_np(model.apply(params, x)).reshape(-1, 3), y, atol=1e-12)
  g, u = grads["conv2_d_transpose"], updates["conv2_d_transpose"]
  g_w = np.swapaxes(_np(g["w"]), -1, -2)
  kernel, bias = ref.dense_update(rows, g_w.reshape(rows.shape[1], -1),
                                  _np(g["b"]) if with_bias else None)
  np.testing.assert_allclose(np.swapaxes(_np(u["w"]), -1, -2), kernel.reshape(g_w.shape),
                             rtol=1e-8, atol=1e-12)
  if with_bias:
    np.testing.assert_allclose(_np(u["b"]), bias, rtol=1e-8, atol=1e-12)


def _decoder(x):
  h = jnp.tanh(hk.Conv2DTranspose(4, 3, stride=2)(x))  # SAME
  return hk.Conv2DTranspose(2, (2, 3), stride=2, padding="VALID", with_bias=False)(h)


class LinenDecoder(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.ConvTranspose(4, (3, 3), strides=(2, 2), padding="SAME", name="a")(x))
    return nn.ConvTranspose(2, (2, 3), strides=(2, 2), padding="VALID", use_bias=False,
                            name="b")(h)


def test_conv_transpose_update_equals_linen_with_the_same_weights(x64):
  """Haiku's transposed convs equal linen's ConvTranspose given the kernel with its last two
  axes swapped; so do their updates."""
  model = hk.without_apply_rng(hk.transform(_decoder))
  x = jax.random.normal(KEY, (3, 3, 4, 5), jnp.float64)
  params = model.init(KEY, x)
  names = {"conv2_d_transpose": "a", "conv2_d_transpose_1": "b"}
  to_linen = {"params": {names[layer]: {"kernel": jnp.swapaxes(leaves["w"], -1, -2),
                                        **({"bias": leaves["b"]} if "b" in leaves else {})}
                         for layer, leaves in params.items()}}
  np.testing.assert_allclose(model.apply(params, x), LinenDecoder().apply(to_linen, x),
                             rtol=1e-12, atol=1e-12)
  _, hk_updates, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, x)
  tx = exact_sngd(**ref.one_step_kwargs())
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(
      lambda p, x: jnp.sum(jnp.sin(LinenDecoder().apply(p, x)))), has_aux=True)(to_linen, x)
  linen_updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, to_linen, activations=a))(
      grads, tx.init(to_linen), acts)
  assert set(hk_updates) == set(names)
  for layer, leaves in hk_updates.items():
    linen = linen_updates["params"][names[layer]]
    np.testing.assert_allclose(jnp.swapaxes(leaves["w"], -1, -2), linen["kernel"], rtol=1e-8,
                               atol=1e-12, err_msg=layer)
    if "b" in leaves:
      np.testing.assert_allclose(leaves["b"], linen["bias"], rtol=1e-8, atol=1e-12,
                                 err_msg=layer)


def test_conv_decoder_training_lowers_the_loss():
  """A small Haiku decoder (a linear layer, then two stride-2 transposed convs) trained
  with sngd_momentum in a jitted loop."""
  def fn(z):
    h = jnp.tanh(hk.Linear(2 * 2 * 4)(z)).reshape(-1, 2, 2, 4)
    return _decoder(h)

  model = hk.without_apply_rng(hk.transform(fn))
  z = jax.random.normal(KEY, (32, 3))
  target = jnp.sin(jnp.arange(8 * 9 * 2).reshape(1, 8, 9, 2) * 0.3 + z[:, :1, None, None])
  params = model.init(KEY, z)
  loss = lambda p, z: jnp.mean((model.apply(p, z) - target) ** 2)
  tx = sngd_jax.sngd_momentum(0.1, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    (value, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(
        params, z)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, value

  _, acts = sngd_jax.capture_hk(loss)(params, z)
  assert set(acts) == {"linear", "conv2_d_transpose", "conv2_d_transpose_1"}
  values = []
  for _ in range(40):
    params, opt_state, value = step(params, opt_state)
    values.append(float(value))
  assert values[-1] < 0.5 * values[0]


def test_depthwise_and_separable_convs(x64):
  """A depthwise conv is a conv with one group per input channel (one factor shared by the
  groups, as linen's grouped conv); Haiku's separable conv is two depthwise convs."""
  def fn(x):
    h = jnp.tanh(hk.DepthwiseConv2D(2, 3, stride=2, name="depthwise")(x))
    return hk.SeparableDepthwiseConv2D(2, 2, name="separable")(h)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(KEY, (2, 6, 5, 3), jnp.float64)
  params = model.init(KEY, x)
  grads, updates, acts = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, x)
  first, second = "separable/~/depthwise_conv2_d", "separable/~/depthwise_conv2_d_1"
  assert set(acts) == set(params) == {"depthwise", first, second}
  conv = lambda h, w, stride, groups: _np(jax.lax.conv_general_dilated(
      h, w, stride, "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=groups))
  h = np.tanh(conv(x, params["depthwise"]["w"], (2, 2), 3) + _np(params["depthwise"]["b"]))
  h2 = conv(h, params[first]["w"], (1, 1), 6)  # (2, 1) kernel, 12 channels, no bias
  cases = {"depthwise": ref.conv_patches(_np(x), (3, 3), (2, 2), "SAME", (1, 1), (1, 1), 3)[0],
           first: ref.conv_patches(h, (2, 1), (1, 1), "SAME", (1, 1), (1, 1), 6)[0],
           second: ref.conv_patches(h2, (1, 2), (1, 1), "SAME", (1, 1), (1, 1), 12)[0]}
  for name, rows in cases.items():
    g = grads[name]
    kernel, bias = ref.dense_update(rows, _np(g["w"]).reshape(rows.shape[1], -1),
                                    _np(g["b"]) if "b" in g else None)
    np.testing.assert_allclose(_np(updates[name]["w"]).reshape(kernel.shape), kernel,
                               rtol=1e-8, atol=1e-12, err_msg=name)
    if bias is not None:
      np.testing.assert_allclose(_np(updates[name]["b"]), bias, rtol=1e-8, atol=1e-12,
                                 err_msg=name)


class LinenCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Conv(4, (3, 2), strides=(2, 1), padding="SAME", name="conv2_d")(x))
    h = jnp.tanh(nn.Conv(3, (3, 3), padding="VALID", use_bias=False, name="valid")(h))
    return nn.Dense(2, name="linear")(jnp.reshape(h, (h.shape[0], -1)))


def test_cnn_update_equals_linen_with_the_same_weights():
  _assert_update_equals_linen(hk.without_apply_rng(hk.transform(_cnn)), LinenCNN(),
                              lambda p: p, jax.random.normal(KEY, (3, 7, 6, 2)))


def test_embedding_and_norms(x64):
  def fn(tokens):
    h = hk.LayerNorm(-1, True, True)(hk.Embed(9, 4)(tokens))
    return hk.Linear(3)(hk.RMSNorm(-1)(jnp.tanh(h) * 2.0 + 0.5))
  model = hk.without_apply_rng(hk.transform(fn))
  tokens = jnp.array([[1, 4, 4, 0], [8, 1, 1, 1]])
  params = ref.f64(model.init(KEY, tokens))  # hk.Embed's table is float32
  loss = lambda p, t: jnp.sum(jnp.sin(model.apply(p, t)))
  grads, updates, _ = _one_update(loss, params, tokens)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=9) / tokens.size
  np.testing.assert_allclose(
      _np(updates["embed"]["embeddings"]),
      _np(grads["embed"]["embeddings"]) / (counts + ref.DAMPING * counts.sum())[:, None],
      rtol=1e-10)
  e = _np(params["embed"]["embeddings"])[np.asarray(tokens).ravel()]
  xhat_ln = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
  s, b = ref.channel_update(xhat_ln, _np(grads["layer_norm"]["scale"]),
                            _np(grads["layer_norm"]["offset"]))
  np.testing.assert_allclose(_np(updates["layer_norm"]["scale"]), s, rtol=1e-8)
  np.testing.assert_allclose(_np(updates["layer_norm"]["offset"]), b, rtol=1e-8)
  ln = params["layer_norm"]
  y = np.tanh(xhat_ln * _np(ln["scale"]) + _np(ln["offset"])) * 2.0 + 0.5
  xhat_rms = y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5)
  s, _ = ref.channel_update(xhat_rms, _np(grads["rms_norm"]["scale"]), None)
  np.testing.assert_allclose(_np(updates["rms_norm"]["scale"]), s, rtol=1e-8)


def test_batch_norm_under_transform_with_state(x64):
  """The update from the batch statistics' xhat; the state is the uncaptured call's (the
  xhat call updates no moving average)."""
  def fn(x, is_training):
    return jnp.sin(3.0 * hk.BatchNorm(True, True, 0.9)(x, is_training=is_training))
  model = hk.without_apply_rng(hk.transform_with_state(fn))
  x = jax.random.normal(KEY, (6, 3, 4), jnp.float64) * 2.0 + 1.0
  params, state = model.init(KEY, x, True)

  def loss(p, state, x):
    out, state = model.apply(p, state, x, True)
    return jnp.sum(out), state

  grads, updates, _ = _one_update(loss, params, state, x, has_aux=True)
  (value, (new_state, _)) = sngd_jax.capture_hk(loss, has_aux=True)(params, state, x)
  plain_value, plain_state = loss(params, state, x)
  assert value == plain_value
  jax.tree.map(np.testing.assert_array_equal, new_state, plain_state)
  xn = _np(x)
  xhat = (xn - xn.mean((0, 1), keepdims=True)) / np.sqrt(xn.var((0, 1), keepdims=True) + 1e-5)
  g = grads["batch_norm"]
  s, b = ref.channel_update(xhat.reshape(-1, 4), _np(g["scale"]).ravel(),
                            _np(g["offset"]).ravel())
  np.testing.assert_allclose(_np(updates["batch_norm"]["scale"]).ravel(), s, rtol=1e-7)
  np.testing.assert_allclose(_np(updates["batch_norm"]["offset"]).ravel(), b, rtol=1e-7)


def test_group_norm(x64):
  model = hk.without_apply_rng(hk.transform(
      lambda x: jnp.sin(3.0 * hk.GroupNorm(2, create_scale=True, create_offset=True)(x))))
  x = jax.random.normal(KEY, (5, 3, 4), jnp.float64) * 2.0 + 1.0  # (N, W, C), 2 groups of 2
  params = model.init(KEY, x)
  grads, updates, _ = _one_update(lambda p, x: jnp.sum(model.apply(p, x)), params, x)
  xg = _np(x).reshape(5, 3, 2, 2)
  xhat = (xg - xg.mean((1, 3), keepdims=True)) / np.sqrt(xg.var((1, 3), keepdims=True) + 1e-5)
  g = grads["group_norm"]
  s, b = ref.channel_update(xhat.reshape(-1, 4), _np(g["scale"]), _np(g["offset"]))
  np.testing.assert_allclose(_np(updates["group_norm"]["scale"]), s, rtol=1e-7)
  np.testing.assert_allclose(_np(updates["group_norm"]["offset"]), b, rtol=1e-7)


class DoubledLinear(hk.Linear):
  def __call__(self, x):
    return super().__call__(2.0 * x)


class ShiftedRMSNorm(hk.RMSNorm):
  def __call__(self, x):
    return super().__call__(x + 1.0)


def test_a_subclass_calling_the_base_call_records_its_input_once(x64):
  """Haiku intercepts both `__call__`s of a subclass whose `__call__` calls the base class's:
  one record per call, the input the base class's call receives (as for linen)."""
  def fn(x):
    return DoubledLinear(3)(ShiftedRMSNorm(-1)(x))
  model = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(KEY, (6, 4), jnp.float64)
  params = model.init(KEY, x)
  grads, updates, acts = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))),
                                     params, x)
  assert {k: len(v) for k, v in acts.items()} == {"doubled_linear": 1, "shifted_rms_norm": 1}
  y = _np(x) + 1.0
  xhat = y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5)
  s, _ = ref.channel_update(xhat, _np(grads["shifted_rms_norm"]["scale"]), None)
  np.testing.assert_allclose(_np(updates["shifted_rms_norm"]["scale"]), s, rtol=1e-8)
  h = 2.0 * xhat * _np(params["shifted_rms_norm"]["scale"])
  _check_dense(h, grads["doubled_linear"], updates["doubled_linear"], "doubled_linear")


def test_attention_projections_record_their_inputs():
  def fn(q, kv):
    mha = hk.MultiHeadAttention(num_heads=2, key_size=3,
                                w_init=hk.initializers.VarianceScaling(1.0))
    return mha(q, kv, kv)
  model = hk.without_apply_rng(hk.transform(fn))
  q, kv = jax.random.normal(KEY, (2, 5, 4)), jax.random.normal(jax.random.key(1), (2, 7, 4))
  params = model.init(KEY, q, kv)
  _, acts = sngd_jax.capture_hk(lambda p, q, kv: jnp.sum(model.apply(p, q, kv)))(params, q, kv)
  prefix = "multi_head_attention/"
  assert set(acts) == set(params) == {prefix + n for n in ("query", "key", "value", "linear")}
  np.testing.assert_array_equal(acts[prefix + "query"][0].inputs, q)
  np.testing.assert_array_equal(acts[prefix + "key"][0].inputs, kv)
  np.testing.assert_array_equal(acts[prefix + "value"][0].inputs, kv)
  assert acts[prefix + "linear"][0].inputs.shape == (2, 5, 6)  # the heads, concatenated


def test_target_network_params_are_left_out():
  model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([3, 2])(x)))
  x = jnp.ones((4, 3))
  params = model.init(KEY, x)
  target = jax.tree.map(lambda a: a + 1.0, params)
  loss = lambda p, t, x: jnp.sum((model.apply(p, x) - model.apply(t, x)) ** 2)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _, acts = sngd_jax.capture_hk(loss)(params, target, x)
  assert [len(acts[k]) for k in sorted(acts)] == [1, 1]  # the trained params' calls only
  np.testing.assert_array_equal(acts["mlp/~/linear_0"][0].inputs, x)


def test_lstm_under_dynamic_unroll_pools_every_step(x64):
  def fn(xs):  # time major (T, B, I)
    core = hk.LSTM(3)
    out, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]))
    return out
  model = hk.without_apply_rng(hk.transform(fn))
  xs = jax.random.normal(KEY, (5, 2, 4), jnp.float64)
  params = model.init(KEY, xs)
  grads, updates, acts = _one_update(lambda p, xs: jnp.sum(jnp.sin(model.apply(p, xs))),
                                     params, xs)
  hs = _np(model.apply(params, xs))  # (T, B, H): the hidden state after each step
  previous = np.concatenate([np.zeros((1, 2, 3)), hs[:-1]])
  rows = np.concatenate([_np(xs), previous], -1).reshape(-1, 7)  # the gates read [x_t, h_t-1]
  _check_dense(rows, grads["lstm/linear"], updates["lstm/linear"], "lstm/linear")


def test_layer_stack_gets_one_factor_per_layer(x64):
  def fn(x):
    return hk.layer_stack(3)(lambda h: jnp.tanh(hk.Linear(4)(h)))(x)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jax.random.normal(KEY, (8, 4), jnp.float64)
  params = model.init(KEY, x)
  (path,) = params
  assert sngd_jax.discover(params)[path].stack == (3,)
  grads, updates, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, x)
  h = _np(x)
  for i in range(3):
    w, b = (_np(params[path][k][i]) for k in ("w", "b"))
    _check_dense(h, {k: grads[path][k][i] for k in ("w", "b")},
                 {k: updates[path][k][i] for k in ("w", "b")}, f"layer {i}")
    h = np.tanh(h @ w + b)


def test_conv_transpose_under_layer_stack_equals_the_unstacked_layers(x64):
  """hk.layer_stack of transposed convs: one local Fisher per layer, the update of each the
  same as that of the same layers written one after the other (their own default names)."""
  conv = lambda h: jnp.tanh(hk.Conv2DTranspose(3, (3, 2), padding="SAME")(h))
  stacked = hk.without_apply_rng(hk.transform(lambda x: hk.layer_stack(2)(conv)(x)))
  unrolled = hk.without_apply_rng(hk.transform(lambda x: conv(conv(x))))
  x = jax.random.normal(KEY, (2, 4, 5, 3), jnp.float64)
  params = stacked.init(KEY, x)
  (path,) = params
  assert sngd_jax.discover(params)[path].stack == (2,)
  names = ("conv2_d_transpose", "conv2_d_transpose_1")
  layers = {name: {k: v[i] for k, v in params[path].items()} for i, name in enumerate(names)}
  np.testing.assert_allclose(stacked.apply(params, x), unrolled.apply(layers, x), atol=1e-12)
  _, updates, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(stacked.apply(p, x))), params, x)
  _, expected, _ = _one_update(lambda p, x: jnp.sum(jnp.sin(unrolled.apply(p, x))), layers, x)
  for i, name in enumerate(names):
    for k in ("w", "b"):
      np.testing.assert_allclose(updates[path][k][i], expected[name][k], rtol=1e-8,
                                 atol=1e-12, err_msg=f"{name}/{k}")


def test_remat_records_as_without(x64):
  inner = lambda h: hk.Linear(3, name="out")(jnp.tanh(hk.Linear(4, name="hidden")(h)))
  x = jax.random.normal(KEY, (8, 5), jnp.float64)
  plain = hk.without_apply_rng(hk.transform(inner))
  remat = hk.without_apply_rng(hk.transform(lambda x: hk.remat(inner)(x)))
  params = plain.init(KEY, x)
  loss = lambda m: lambda p, x: jnp.sum(jnp.sin(m.apply(p, x)))
  _, want, _ = _one_update(loss(plain), params, x)
  _, got, acts = _one_update(loss(remat), params, x)
  assert set(acts) == {"hidden", "out"}
  jax.tree.map(np.testing.assert_array_equal, got, want)


def test_training_loop_lowers_the_loss():
  model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([16, 2])(x)))
  x = jax.random.normal(KEY, (64, 4))
  y = jnp.sin(x[:, :2] * 2.0)
  params = model.init(KEY, x)
  loss = lambda p, x, y: jnp.mean((model.apply(p, x) - y) ** 2)
  tx = sngd_jax.sngd_momentum(0.05, momentum=0.9)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state):
    (value, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, value

  values = []
  for _ in range(40):
    params, opt_state, value = step(params, opt_state)
    values.append(float(value))
  assert values[-1] < 0.5 * values[0]


def test_coverage_lists_haiku_layers():
  model = hk.transform_with_state(_zoo)
  x = jnp.ones((2, 6))
  params, state = model.init(KEY, x)
  loss = lambda p, s, x: jnp.sum(model.apply(p, s, None, x)[0])
  report = sngd_jax.coverage(loss, params, state, x)
  assert report.missing == [] and report.pass_through == []
  text = str(report)
  for leaf in ("mlp/~/linear_0/w", "conv2_d/w", "embed/embeddings", "batch_norm/scale",
               "rms_norm/scale"):
    assert leaf in report.preconditioned, leaf
  assert "diagonal/embed 7" in text and "per-channel/norm 4x2x2" in text


def test_two_trained_models_with_argnums():
  gen = hk.without_apply_rng(hk.transform(lambda z: hk.Linear(3, name="g")(z)))
  disc = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(1, name="d")(jnp.tanh(x))))
  z = jax.random.normal(KEY, (4, 2))
  g_params, d_params = gen.init(KEY, z), disc.init(KEY, jnp.ones((4, 3)))
  loss = lambda g, d, z: jnp.sum(disc.apply(d, gen.apply(g, z)))
  _, (acts_g, acts_d) = sngd_jax.capture_hk(loss, argnums=(0, 1))(g_params, d_params, z)
  assert set(acts_g) == {"g"} and set(acts_d) == {"d"}
  np.testing.assert_array_equal(acts_g["g"][0].inputs, z)
  np.testing.assert_allclose(acts_d["d"][0].inputs, jnp.tanh(gen.apply(g_params, z)),
                             rtol=1e-6)
  with pytest.raises(ValueError, match="argnums"):  # the second trained model, left out
    jax.grad(lambda pair: sngd_jax.capture_hk(loss)(*pair, z)[0])((g_params, d_params))


class MixedNet(hk.Module):
  def __call__(self, x, is_training):
    h = hk.BatchNorm(True, True, 0.9)(hk.Linear(5)(x), is_training)
    return hk.Linear(3)(jnp.tanh(h))


def test_mixed_precision_policies_capture_every_layer():
  """Haiku's ImageNet example's policies (bf16 compute, f32 params; BatchNorm computing in f32
  with bf16 output): every layer is recorded, with the inputs its weight multiplies, and its
  update is the float64 damped solve over them. The policies cast what a module method returns,
  also ``params_dict``: read through it, the BatchNorm's scale was a bf16 copy, no leaf."""
  jmp = pytest.importorskip("jmp")
  mp = hk.mixed_precision
  net_policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  bn_policy = jmp.get_policy("params=float32,compute=float32,output=bfloat16")
  with mp.push_policy(MixedNet, net_policy), mp.push_policy(hk.BatchNorm, bn_policy):
    model = hk.without_apply_rng(hk.transform_with_state(lambda x: MixedNet()(x, True)))
    x = jax.random.normal(KEY, (16, 4)) * 2.0 + 0.5
    params, state = model.init(KEY, x)
    assert jax.tree.leaves(jax.tree.map(lambda a: a.dtype, params)) == [jnp.float32] * 6

    def loss(p, state, x):
      out, state = model.apply(p, state, x)
      return jnp.sum(jnp.sin(out.astype(jnp.float32))), state

    with warnings.catch_warnings():
      warnings.simplefilter("error")
      grads, updates, acts = _one_update(loss, params, state, x, has_aux=True)
  assert set(acts) == {"mixed_net/linear", "mixed_net/batch_norm", "mixed_net/linear_1"}
  assert acts["mixed_net/linear"][0].inputs.dtype == jnp.bfloat16
  np.testing.assert_array_equal(acts["mixed_net/linear"][0].inputs, x.astype(jnp.bfloat16))
  for name in ("mixed_net/linear", "mixed_net/linear_1"):  # the rows in float64
    kernel, bias = ref.dense_update(_np(acts[name][0].inputs), _np(grads[name]["w"]),
                                    _np(grads[name]["b"]))
    np.testing.assert_allclose(_np(updates[name]["w"]), kernel, rtol=2e-3, atol=1e-6)
    np.testing.assert_allclose(_np(updates[name]["b"]), bias, rtol=2e-3, atol=1e-6)
  # the BatchNorm's xhat, from its bf16 input in float64
  h = _np(x.astype(jnp.bfloat16).astype(jnp.float32) @ params["mixed_net/linear"]["w"].astype(
      jnp.bfloat16).astype(jnp.float32))
  h = _np((h + _np(params["mixed_net/linear"]["b"])).astype(jnp.bfloat16))
  xhat = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)
  g = grads["mixed_net/batch_norm"]
  s, b = ref.channel_update(xhat, _np(g["scale"]).ravel(), _np(g["offset"]).ravel())
  u = updates["mixed_net/batch_norm"]
  np.testing.assert_allclose(_np(u["scale"]).ravel(), s, rtol=2e-2, atol=1e-5)
  np.testing.assert_allclose(_np(u["offset"]).ravel(), b, rtol=2e-2, atol=1e-5)


def test_a_gru_subclass_with_its_own_call_is_not_recorded_and_is_named():
  """A subclass of hk.GRU that computes its own ``__call__`` (here ``r`` applied after the
  candidate's hidden product) is not recorded as hk.GRU's three products (its candidate
  columns do not read ``r * h``): coverage lists its three layers as MISSING and ``update``
  raises naming one. Recorded as hk.GRU, its candidate block got rows it never multiplied."""
  class AfterReset(hk.GRU):
    def __call__(self, inputs, state):
      h = self.hidden_size
      w_i = hk.get_parameter("w_i", [inputs.shape[-1], 3 * h], inputs.dtype, jnp.ones)
      w_h = hk.get_parameter("w_h", [h, 3 * h], inputs.dtype, jnp.ones)
      b = hk.get_parameter("b", [3 * h], inputs.dtype, jnp.zeros)
      gates, hidden = inputs @ w_i + b, state @ w_h
      z, r = jnp.split(jax.nn.sigmoid(gates[..., :2 * h] + hidden[..., :2 * h]), 2, axis=-1)
      a = jnp.tanh(gates[..., 2 * h:] + r * hidden[..., 2 * h:])
      state = (1 - z) * state + z * a
      return state, state

  def fn(xs):
    cell = AfterReset(3, name="gru")
    return hk.dynamic_unroll(cell, xs, cell.initial_state(2))[0]
  model = hk.without_apply_rng(hk.transform(fn))
  xs = jax.random.normal(KEY, (4, 2, 5))
  params = model.init(KEY, xs)
  loss = lambda p, xs: jnp.sum(model.apply(p, xs))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(params, xs)
  assert acts == {}
  report = sngd_jax.coverage(loss, params, xs)
  assert sorted(report.missing) == ["gru/b", "gru/w_h[..., 0:6]", "gru/w_h[..., 6:9]",
                                    "gru/w_i"]
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="gru/w_"):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_gru_under_a_mixed_precision_policy_records_its_compute_dtype_rows():
  """An hk.GRU under a bf16-compute policy: its three layers record bf16 rows, and the
  candidate's ``r_t * h_{t-1}`` is the one the cell computed from its bf16 params (float64
  forward pass of the bf16-cast params and inputs, to bf16 rounding). Recomputed from the
  float32 params instead, ``r`` was float32 (and the rows float32)."""
  jmp = pytest.importorskip("jmp")
  t, b, d, h = 4, 3, 4, 3
  policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")

  def fn(xs):
    cell = hk.GRU(h, name="gru")
    return hk.dynamic_unroll(cell, xs, cell.initial_state(xs.shape[1]))[0]
  with hk.mixed_precision.push_policy(hk.GRU, policy):
    model = hk.without_apply_rng(hk.transform(fn))
    xs = jax.random.normal(KEY, (t, b, d))
    params = model.init(KEY, xs)
    params["gru"]["b"] = 0.3 * jax.random.normal(jax.random.key(2), (3 * h,))
    loss = lambda p, xs: jnp.sum(model.apply(p, xs).astype(jnp.float32))
    with no_sngd_warnings():
      _, acts = jax.jit(sngd_jax.capture_hk(loss))(params, xs)
  assert {k: v[0].inputs.dtype for k, v in acts.items()} == dict.fromkeys(
      ("gru/w_i", "gru/w_h[zr]", "gru/w_h[a]"), jnp.bfloat16)
  bf16 = lambda a: _np(jnp.asarray(a).astype(jnp.bfloat16))
  w_i, w_h, bias = (bf16(params["gru"][k]) for k in ("w_i", "w_h", "b"))
  state, gated = np.zeros((b, h)), []
  for x in bf16(xs):
    gates = x @ w_i
    zr = ref.sigmoid(gates[:, :2 * h] + state @ w_h[:, :2 * h] + bias[:2 * h])
    z, r = zr[:, :h], zr[:, h:]
    gated.append(r * state)
    a = np.tanh(gates[:, 2 * h:] + (r * state) @ w_h[:, 2 * h:] + bias[2 * h:])
    state = (1 - z) * state + z * a
  np.testing.assert_allclose(_np(acts["gru/w_h[a]"][0].inputs).reshape(-1, h),
                             np.concatenate(gated), atol=1e-2)


# --- errors and warnings -------------------------------------------------------------

@pytest.mark.parametrize("kwargs", [dict(name="up"), dict(data_format="NCHW", with_bias=False),
                                    dict(output_shape=(8, 8))], ids=["named", "nchw", "shape"])
def test_unmodelled_conv_transpose_is_named(kwargs):
  """A transposed conv under another name than Haiku's default (its params alone do not tell
  its (*k, O, C) kernel from a conv's), channels first or with an output_shape is not
  recorded: capture warns, naming it and what is modelled, and update names it."""
  def fn(x):
    return hk.Conv2DTranspose(2, 3, stride=2, **kwargs)(x)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jnp.ones((1, 4, 4, 2))
  params = model.init(KEY, x)
  (path,) = params
  loss = lambda p, x: jnp.sum(model.apply(p, x))
  match = rf"capture_hk does not model Conv2DTranspose '{path}'.*default module name"
  with pytest.warns(UserWarning, match=match):
    _, acts = sngd_jax.capture_hk(loss)(params, x)
  assert acts == {}
  tx = sngd_jax.sngd()
  grads = jax.grad(loss)(params, x)
  with pytest.raises(ValueError, match=path):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_conv_transpose_is_discovered_by_its_default_name():
  """Only Haiku's default names mark the (*k, O, C) kernel of a transposed conv."""
  model = hk.without_apply_rng(hk.transform(lambda x: hk.Conv2DTranspose(
      2, (3, 2), stride=2, with_bias=False, name="up")(hk.Conv2DTranspose(5, (3, 2))(x))))
  specs = sngd_jax.discover(model.init(KEY, jnp.ones((1, 4, 4, 3))))
  default, named = specs["conv2_d_transpose"], specs["up"]
  assert (default.in_dim, default.out_dim, default.kernel_perm) == (3 * 2 * 3, 5, (0, 1, 3, 2))
  assert (named.in_dim, named.out_dim, named.kernel_perm) == (3 * 2 * 2, 5, None)


def test_gru_is_three_layers_and_one_column_block_can_be_left_out():
  """hk.GRU beside an hk.LSTM: discover finds its three layers (``w_h`` as two column blocks
  of one leaf), capture records them with no warning, and ``fisher={'gru/w_h[a]': None}``
  leaves the candidate columns of ``w_h`` to the next transform (their update is the raw
  gradient, coverage says so for that block) while the update/reset columns are preconditioned
  (they differ from the gradient). Before, the GRU warned and all of its leaves passed."""
  def fn(xs):
    gru, lstm = hk.GRU(3), hk.LSTM(2)
    h, _ = hk.dynamic_unroll(gru, xs, gru.initial_state(2))
    h, _ = hk.dynamic_unroll(lstm, h, lstm.initial_state(2))
    return h
  model = hk.without_apply_rng(hk.transform(fn))
  xs = jax.random.normal(KEY, (4, 2, 5))  # (T, B, I)
  params = model.init(KEY, xs)
  specs = sngd_jax.discover(params)
  assert {p: (s.kernel, s.bias, s.in_dim, s.out_dim, s.columns) for p, s in specs.items()
          if p.startswith("gru")} == {
      "gru/w_i": (("gru", "w_i"), ("gru", "b"), 5, 9, None),
      "gru/w_h[zr]": (("gru", "w_h"), None, 3, 6, (0, 6)),
      "gru/w_h[a]": (("gru", "w_h"), None, 3, 3, (6, 9))}
  loss = lambda p, xs: jnp.sum(jnp.sin(model.apply(p, xs)))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(params, xs)
    fisher = {"gru/w_h[a]": None}
    report = sngd_jax.coverage(loss, params, xs, fisher=fisher)
  assert set(acts) == {"gru/w_i", "gru/w_h[zr]", "gru/w_h[a]", "lstm/linear"}
  assert report.pass_through == ["gru/w_h[..., 6:9]"] and report.missing == []
  tx = sngd_jax.sngd(fisher=fisher, max_norm=None)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates["gru"]["w_h"][:, 6:], grads["gru"]["w_h"][:, 6:])
  assert not np.allclose(updates["gru"]["w_h"][:, :6], grads["gru"]["w_h"][:, :6])


def test_a_tied_embedding_table_is_named():
  """`h @ embed.embeddings.T` (a tied output layer, read outside the lookup): the lookup's
  diag(f) does not model it, and capture says so, naming the layer and the fix; an untied
  model does not warn, and with the fix the table's update is its gradient."""
  def fn(tokens, tied):
    embed = hk.Embed(7, 4)
    h = jnp.tanh(hk.Linear(4)(embed(tokens)))
    return h @ embed.embeddings.T if tied else hk.Linear(7)(h)
  tokens = jnp.array([[1, 2, 2], [3, 1, 0]])
  warning = r"the table of hk.Embed 'embed' is read outside its lookup.*`fisher=\{'embed': None\}`"
  for tied in (True, False):
    model = hk.without_apply_rng(hk.transform(lambda t, tied=tied: fn(t, tied)))
    params = model.init(KEY, tokens)
    loss = lambda p, t: jnp.sum(jax.nn.log_softmax(model.apply(p, t))[..., 0])  # noqa: B023
    if tied:
      with pytest.warns(UserWarning, match=warning):
        (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(
            params, tokens)
      jmp = pytest.importorskip("jmp")  # under a policy, the table is read as a bf16 copy
      with hk.mixed_precision.push_policy(hk.Embed, jmp.get_policy("p=f32,c=bf16,o=f32")):
        with pytest.warns(UserWarning, match=warning):
          sngd_jax.capture_hk(loss)(params, tokens)
      tx = sngd_jax.sngd(fisher={"embed": None})
      updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
      np.testing.assert_array_equal(updates["embed"]["embeddings"],
                                    grads["embed"]["embeddings"])
    else:
      with warnings.catch_warnings():
        warnings.simplefilter("error")
        sngd_jax.capture_hk(loss)(params, tokens)


def test_immutable_params_are_refused_naming_the_conversion():
  """`hk.data_structures.to_immutable_dict` params (a FlatMap, whose leaves flatten by
  position): init, capture and coverage name the conversion to plain dicts, instead of
  recording both layers under one nameless path."""
  model = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([4, 2])(x)))
  x = jnp.ones((3, 5))
  params = model.init(KEY, x)
  frozen = hk.data_structures.to_immutable_dict(params)
  loss = lambda p, x: jnp.sum(model.apply(p, x))
  fix = r"FlatMap.*hk.data_structures.to_mutable_dict\(params\)"
  with pytest.warns(UserWarning, match=r"found no layer.*" + fix):
    sngd_jax.sngd().init(frozen)
  with pytest.raises(TypeError, match="capture_hk: .*" + fix):
    sngd_jax.capture_hk(loss)(frozen, x)
  with pytest.raises(TypeError, match="coverage: .*" + fix):
    sngd_jax.coverage(loss, frozen, x)
  plain = hk.data_structures.to_mutable_dict(frozen)  # the fix
  _, acts = sngd_jax.capture_hk(loss)(plain, x)
  assert set(acts) == set(sngd_jax.discover(plain)) == {"mlp/~/linear_0", "mlp/~/linear_1"}


def test_a_jit_inside_the_captured_function_warns():
  model = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x)))
  x = jnp.ones((3, 4))
  params = model.init(KEY, x)
  apply = jax.jit(model.apply)
  with pytest.warns(UserWarning, match=r"could not name 1 layer call\(s\) \(Linear 'linear'\)"):
    _, acts = sngd_jax.capture_hk(lambda p, x: jnp.sum(apply(p, x)))(params, x)
  assert acts == {}


def test_a_layer_under_hk_cond_is_captured_with_the_taken_branch_rows():
  """A layer called in both branches of ``hk.cond`` records the rows of the branch taken
  (``x``, or ``-x``); until 2026-12-06 capture warned that it could not name it and left it
  out (tests/test_cond.py checks every framework's cond/switch against float64)."""
  def fn(x):
    linear = hk.Linear(2)
    return hk.cond(jnp.sum(x) > 0, linear, lambda x: linear(-x), x)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jnp.arange(12.0).reshape(3, 4) - 3.0
  params = model.init(KEY, x)
  for sign in (1.0, -1.0):
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      _, acts = sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, sign * x)
    (call,) = acts["linear"]
    assert call.row_mask is None  # called in every branch: the rows of the one taken
    np.testing.assert_array_equal(call.inputs, x)  # sum(sign * x) > 0 iff sign > 0


def test_a_fisher_key_naming_a_haiku_leaf_gets_the_layer_path():
  params = hk.without_apply_rng(hk.transform(lambda x: hk.nets.MLP([2])(x))).init(
      KEY, jnp.ones((1, 3)))
  with pytest.warns(UserWarning, match=r"key 'mlp/~/linear_0/w' names no layer.*Did you mean "
                                       r"'mlp/~/linear_0' \(the layer, not its 'w' leaf\)"):
    sngd_jax.sngd(fisher={"mlp/~/linear_0/w": None}).init(params)


def test_init_warns_when_it_finds_no_layer(monkeypatch):
  params = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2)(x))).init(
      KEY, jnp.ones((1, 3)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sngd_jax.sngd().init(params)  # Haiku's names: found, no warning
    sngd_jax.sngd(fisher=lambda path: None).init(params)  # left out on purpose: no warning
  monkeypatch.delitem(sys.modules, "haiku")  # params restored without Haiku imported
  with pytest.warns(UserWarning, match=r"found no layer in the params \(2 array\(s\): "
                    r"'linear/b', 'linear/w'\).*Haiku `w` \(\+ `b`\).*sngd_jax.coverage"):
    sngd_jax.sngd().init(params)
  with pytest.warns(UserWarning, match=r"found no layer.*'gru/w_i'"):
    sngd_jax.sngd().init({"gru": {"w_i": jnp.ones((3, 6)), "w_h": jnp.ones((2, 6))}})
  with warnings.catch_warnings():  # a layer that fits no model is one: coverage reports it
    warnings.simplefilter("error")
    report = sngd_jax.coverage(lambda p, t: jnp.sum(p["E"]["embedding"][:, t]),
                               {"E": {"embedding": jnp.ones((2, 9, 3))}}, jnp.array([1, 2]))
  assert report.params[0].fisher.startswith("MISSING: an embedding table")
