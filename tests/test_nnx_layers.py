"""Flax NNX layers: one update vs the same float64 references as the linen tests
(conv patches by loops, token counts, xhat per channel, numpy MHA, per-time-step LSTM/GRU)."""

import helpers_jaxpr
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd
from flax import nnx
from helpers_train import assert_trains, softmax_loss

import sngd_jax

F64 = dict(param_dtype=jnp.float64)


pytestmark = pytest.mark.usefixtures("x64")


def _one_step(model, *inputs):
  """Grads and one sngd update of ``sum(sin(model(*inputs)))``, under nnx.jit."""
  tx = exact_sngd(**ref.one_step_kwargs())
  loss = lambda m, *a: jnp.sum(jnp.sin(m(*a)))

  @nnx.jit
  def step(model, *inputs):
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(
        model, *inputs)
    params = nnx.state(model, nnx.Param)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates

  with jax.checking_leaks():
    grads, updates = step(model, *inputs)
  pure = lambda s: jax.tree.map(np.asarray, nnx.to_pure_dict(s))
  return pure(grads), pure(updates)


def _value(v):
  return np.asarray(v[...])


class Mixed(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(4, 4, (3, 2), strides=(2, 1), padding=((1, 0), (2, 1)),
                         kernel_dilation=(2, 1), feature_group_count=2, rngs=rngs, **F64)
    self.emb = nnx.Embed(9, 4, rngs=rngs, **F64)
    self.ln = nnx.LayerNorm(4, rngs=rngs, **F64)
    self.lin = nnx.Linear(4, 3, rngs=rngs, **F64)

  def __call__(self, x, tokens):
    h = self.conv(x).mean((1, 2))
    e = self.ln(self.emb(tokens))
    return self.lin(e + h[:, None])


def test_linear_conv_embed_layernorm():
  model = Mixed(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 7, 6, 4), jnp.float64)
  tokens = jnp.array([[1, 4, 4], [0, 4, 2]])
  grads, updates = _one_step(model, x, tokens)
  rows, _ = ref.conv_patches(np.asarray(x), (3, 2), (2, 1), ((1, 0), (2, 1)), (2, 1), (1, 1), 2)
  ref.assert_dense_update(rows, grads["conv"], updates["conv"], "conv")
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=9)
  freq = counts / counts.sum()
  np.testing.assert_allclose(
      updates["emb"]["embedding"],
      grads["emb"]["embedding"] / (freq + ref.DAMPING * freq.sum())[:, None], rtol=1e-10)
  e = _value(model.emb.embedding)[np.asarray(tokens)]
  xhat = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-6)
  scale, bias = ref.channel_update(xhat.reshape(-1, 4), grads["ln"]["scale"],
                                   grads["ln"]["bias"])
  np.testing.assert_allclose(updates["ln"]["scale"], scale, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(updates["ln"]["bias"], bias, rtol=1e-8, atol=1e-12)
  ln_out = xhat * _value(model.ln.scale) + _value(model.ln.bias)
  h = np.asarray(model.conv(x)).mean((1, 2))
  ref.assert_dense_update((ln_out + h[:, None]).reshape(-1, 4), grads["lin"], updates["lin"],
                          "lin")


class Attn(nnx.Module):
  def __init__(self, rngs):
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=4, qkv_features=6,
                                       decode=False, rngs=rngs, **F64)

  def __call__(self, x):
    return self.attn(x)


def test_multi_head_attention():
  model = Attn(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
  grads, updates = _one_step(model, x)
  p = {name: {"kernel": _value(getattr(model.attn, name).kernel),
              "bias": _value(getattr(model.attn, name).bias)}
       for name in ("query", "key", "value", "out")}
  heads = ref.mha_forward(p, x, num_heads=2)
  out = np.einsum("bthk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  # NNX's attention is not exact in float64 (the model differs from numpy by ~1e-7
  # relative), so the `out` rows, which are its per-head outputs, match to 1e-5.
  np.testing.assert_allclose(model(x), out, rtol=1e-5, atol=1e-9)
  for name in ("query", "key", "value"):
    ref.assert_dense_update(np.asarray(x).reshape(-1, 4), grads["attn"][name],
                            updates["attn"][name], name)
  ref.assert_dense_update(heads.reshape(10, -1), grads["attn"]["out"], updates["attn"]["out"],
                          "out", rtol=1e-5)


class Seq(nnx.Module):
  def __init__(self, cell, rngs):
    cells = {"lstm": nnx.LSTMCell, "optimized_lstm": nnx.OptimizedLSTMCell,
             "gru": nnx.GRUCell}
    self.rnn = nnx.RNN(cells[cell](4, 3, rngs=rngs, **F64), rngs=rngs)

  def __call__(self, xs):
    return self.rnn(xs)


def _gru_forward(ki, bi, kh, xs):
  """NNX's GRU: fused [r z n] input (with bias) and hidden (no bias) layers."""
  b, t, _ = xs.shape
  hd = kh.shape[0]
  h, prev, outs = np.zeros((b, hd)), [], []
  for step in range(t):
    prev.append(h)
    xr, xz, xn = np.split(xs[:, step] @ ki + bi, 3, axis=-1)
    hr, hz, hn = np.split(h @ kh, 3, axis=-1)
    r, z = ref.sigmoid(xr + hr), ref.sigmoid(xz + hz)
    h = (1 - z) * np.tanh(xn + r * hn) + z * h
    outs.append(h)
  return np.stack(prev, 1), np.stack(outs, 1)


@pytest.mark.parametrize("cell", ["lstm", "optimized_lstm", "gru"])
def test_rnn_cells_pool_every_time_step(cell):
  model = Seq(cell, nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
  grads, updates = _one_step(model, xs)
  c = model.rnn.cell
  xn = np.asarray(xs)
  if cell == "lstm":
    names = ("ii", "if_", "ig", "io", "hi", "hf", "hg", "ho")
    p = {n: {"kernel": _value(getattr(c, n).kernel)} for n in names}
    for n in names[4:]:
      p[n]["bias"] = _value(getattr(c, n).bias)
    h_prev, outs = ref.lstm_forward(p, xn, names)
    input_layers, hidden_layers = names[:4], names[4:]
  elif cell == "optimized_lstm":
    ki, kh, bh = _value(c.dense_i.kernel), _value(c.dense_h.kernel), _value(c.dense_h.bias)
    gates = lambda k: np.split(k, 4, axis=-1)
    p = {f"i{g}": {"kernel": k} for g, k in zip("ifgo", gates(ki), strict=True)}
    p.update({f"h{g}": {"kernel": k, "bias": b}
              for g, k, b in zip("ifgo", gates(kh), gates(bh), strict=True)})
    h_prev, outs = ref.lstm_forward(p, xn)
    input_layers, hidden_layers = ("dense_i",), ("dense_h",)
  else:
    h_prev, outs = _gru_forward(_value(c.dense_i.kernel), _value(c.dense_i.bias),
                                _value(c.dense_h.kernel), xn)
    input_layers, hidden_layers = ("dense_i",), ("dense_h",)
  np.testing.assert_allclose(model(xs), outs, atol=1e-12)
  g, u = grads["rnn"]["cell"], updates["rnn"]["cell"]
  for name in input_layers:
    ref.assert_dense_update(xn.reshape(-1, 4), g[name], u[name], name)
  for name in hidden_layers:
    ref.assert_dense_update(h_prev.reshape(-1, 3), g[name], u[name], name)


def test_lstm_gates_that_read_one_input_leave_the_scan_once():
  """nnx.LSTMCell's eight gates read x_t and h_{t-1}: the RNN's scan returns two stacked
  record outputs with capture, not eight."""
  model = Seq("lstm", nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
  graphdef, state = nnx.split(model)
  loss = lambda m, xs: jnp.sum(m(xs) ** 2)

  scan_outputs = lambda f: helpers_jaxpr.scan_output_counts(
      jax.make_jaxpr(lambda s: f(nnx.merge(graphdef, s), xs))(state).jaxpr)
  (plain,) = scan_outputs(loss)
  assert scan_outputs(sngd_jax.capture_nnx(loss)) == [plain + 2]


# --- an NNX CNN through nnx.Optimizer ---------------------------------------------

class CNN(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 8, (3, 3), strides=2, rngs=rngs)
    self.bn = nnx.BatchNorm(8, rngs=rngs)
    self.out = nnx.Linear(8, 10, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.bn(self.conv(x))).mean((1, 2)))


def test_nnx_cnn_trains_through_optimizer():
  with jax.enable_x64(False):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 12, 12, 1)).astype(np.float32)
    y = (x[:, :6].mean((1, 2, 3)) > x[:, 6:].mean((1, 2, 3))).astype(np.int32) * 3
    model = CNN(nnx.Rngs(0))
    loss_fn = softmax_loss(lambda m, x: m(x))
    report = sngd_jax.coverage(loss_fn, model, x, y)
    assert report.missing == [] and report.pass_through == []
    assert_trains(loss_fn, model, [(x, y)] * 30, learning_rate=0.05, max_ratio=0.5,
                  inverse_every=5)


def test_nnx_model_and_optimizer_update_equals_tx_update():
  """``nnx.ModelAndOptimizer`` (the optimizer that holds its model) forwards
  ``activations=`` too: three steps equal ``tx.update`` on the model's params by hand."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(32, 6)))
  y = jnp.arange(32) % 3

  class MLP(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.Linear(6, 8, rngs=rngs, **F64)
      self.l2 = nnx.Linear(8, 3, rngs=rngs, **F64)

    def __call__(self, x):
      return self.l2(jnp.tanh(self.l1(x)))

  loss_fn = softmax_loss(lambda m, x: m(x))
  grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)
  tx = sngd_jax.sngd_momentum(0.1, inverse_every=2)
  opt = nnx.ModelAndOptimizer(MLP(nnx.Rngs(0)), tx, wrt=nnx.Param)
  model = MLP(nnx.Rngs(0))
  params = nnx.state(model, nnx.Param)
  state = tx.init(params)

  @nnx.jit
  def step(opt, x, y):
    (_, acts), grads = grad_fn(opt.model, x, y)
    opt.update(grads, activations=acts)

  for _ in range(3):
    step(opt, x, y)
    (_, acts), grads = grad_fn(model, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    params = optax.apply_updates(params, updates)
    nnx.update(model, params)
  got = jax.tree.leaves(nnx.state(opt.model, nnx.Param))
  want = jax.tree.leaves(params)
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(nnx.state(MLP(nnx.Rngs(0)), nnx.Param)), want,
                 strict=True)) > 1e-3   # the steps moved the params
  for a, b in zip(got, want, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_lora_adapters_only_get_the_base_optimizers_update():
  """``nnx.Optimizer(model, sngd_adam(lr), wrt=nnx.LoRAParam)``: the adapters are no layer
  sngd models, the base kernels are frozen; the update equals ``adamw``'s (docs/layer-
  coverage.md). It raised "hold no layer" before: activations of frozen layers are ignored."""
  import optax  # noqa: PLC0415

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.l1 = nnx.LoRALinear(4, 8, lora_rank=2, rngs=rngs)
      self.l2 = nnx.Linear(8, 3, rngs=rngs)

    def __call__(self, x):
      return self.l2(nnx.relu(self.l1(x)))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  x = jax.random.normal(jax.random.key(1), (8, 4))
  y = jnp.arange(8) % 3
  out = []
  out_of_sngd = optax.adamw(1e-2, weight_decay=0.0)
  for tx in (sngd_jax.sngd_adam(1e-2), out_of_sngd):
    model = Net(nnx.Rngs(0))
    if tx is out_of_sngd:
      opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
    else:  # sngd finds no layer among the adapters and says so
      with pytest.warns(UserWarning, match="sngd: found no layer in the params"):
        opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

    @nnx.jit
    def step(model, opt, x, y):
      (loss, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True,
                                               argnums=nnx.DiffState(0, nnx.LoRAParam))(
                                                   model, x, y)
      opt.update(model, grads, activations=acts)
      return loss

    for _ in range(3):
      step(model, opt, x, y)
    out.append(nnx.state(model, nnx.Param))
  # Two compiled programs: equal to float32 rounding.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), *out)


@pytest.mark.parametrize("wrapper", ["LoRALinear", "LoRA"])
def test_rfim_of_a_lora_layer_weighs_rows_by_the_layers_true_output(wrapper):
  """``nnx.LoRALinear`` (or ``nnx.LoRA(base_module=Linear)``) with its base kernel trained and
  ``fisher="rfim"``: unit j's rows are weighted by ``sigmoid(z_j)^2``, ``z = x W + b + x A B``
  the layer's output (float64 reference). It weighed them by the base Linear's ``x W + b``,
  the output its ``Linear.__call__`` returns inside the LoRA call."""
  from helpers_mlp import reference_update  # noqa: PLC0415

  rngs = nnx.Rngs(0)
  if wrapper == "LoRALinear":
    model = nnx.LoRALinear(5, 4, lora_rank=2, rngs=rngs, **F64)
    base = model
  else:
    base = nnx.Linear(5, 4, rngs=rngs, **F64)
    model = nnx.LoRA(5, 2, 4, base_module=base, rngs=rngs, **F64)
  lora = model if wrapper == "LoRA" else model.lora
  # (LoRALinear keeps its adapters in float32 whatever its param_dtype: flax 0.12)
  lora.lora_b[...] = jax.random.normal(jax.random.key(2), (2, 4), lora.lora_b.dtype)
  x = jax.random.normal(jax.random.key(1), (16, 5), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss, outputs=True),
                                        has_aux=True)(model, x)
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(fisher="rfim", **ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  layer = "" if wrapper == "LoRALinear" else "base_module"
  assert list(acts) == [layer] and len(acts[layer]) == 1
  z = np.asarray(model(x))  # the layer's output, adapters included
  np.testing.assert_allclose(acts[layer][0].outputs, z, rtol=1e-12)
  pick = lambda tree: tree if wrapper == "LoRALinear" else tree["base_module"]
  w, b = reference_update(np.asarray(x), z, np.asarray(pick(grads)["kernel"][...]),
                          np.asarray(pick(grads)["bias"][...]), "rfim", ref.DAMPING)
  np.testing.assert_allclose(pick(updates)["kernel"][...], w, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(pick(updates)["bias"][...], b, rtol=1e-8, atol=1e-12)


class _TiedAutoencoder(nnx.Module):
  def __init__(self, rngs):
    self.enc = nnx.Linear(5, 3, use_bias=False, rngs=rngs, **F64)

  def __call__(self, x):
    return jnp.tanh(self.enc(x)) @ self.enc.kernel[...].T  # decoder: the kernel read by hand


def test_kernel_read_outside_its_call_gets_its_calls_factor_only():
  """docs/layer-coverage.md: the decoder's use of a tied kernel (``h @ enc.kernel.T``) is not
  captured: the kernel's update is the encoder rows' damped factor applied to the sum of both
  uses' gradients (float64), and coverage lists an ordinary dense layer."""
  model = _TiedAutoencoder(nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (8, 5), jnp.float64)
  assert "linear/dense 5x5" in str(sngd_jax.coverage(lambda m, x: jnp.sum(m(x)), model, x))
  grads, updates = _one_step(model, x)
  kernel, _ = ref.dense_update(np.asarray(x), grads["enc"]["kernel"][...], None)
  np.testing.assert_allclose(updates["enc"]["kernel"][...], kernel, rtol=1e-10)
