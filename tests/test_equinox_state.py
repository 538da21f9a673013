"""Equinox models as users write them, beyond ``test_equinox.py``: a stateful model
(``eqx.nn.BatchNorm`` made with ``eqx.nn.make_with_state``, the loss returning
``(loss, new_state)``, the batch ``jax.vmap`` with ``axis_name``), ``eqx.nn.Dropout`` with
keys and ``eqx.nn.inference_mode``, attention with a mask, grouped convolutions, norms
without weight or bias, recurrent cells scanned inside a module and a tied embedding. Every
factor against a float64 Gram sum of the rows each layer saw, from an independent forward
pass; every update against the damped solve SNGD defines."""

import warnings

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd
from np_reference import gram, normalized_factor, np64

import sngd_jax

eqx = pytest.importorskip("equinox")

pytestmark = pytest.mark.usefixtures("x64")

KEYS = jax.random.split(jax.random.key(3), 8)
F64 = dict(dtype=jnp.float64)


def _capture(loss, model, *args, has_aux=False):
  """``(value, acts), grads`` through the documented path, under ``eqx.filter_jit``."""
  @eqx.filter_jit
  def run(model, *args):
    wrapped = sngd_jax.capture_eqx(loss, has_aux=has_aux)
    return eqx.filter_value_and_grad(wrapped, has_aux=True)(model, *args)
  return run(model, *args)


def _params(model):
  return eqx.filter(model, eqx.is_inexact_array)


def _one_step(model, grads, acts, **kwargs):
  """``(updates, state)`` of one jitted exact update from ``init`` (``decay=0``, no prior,
  ``factor_every=1``): the state's factors are this batch's estimates."""
  tx = exact_sngd(**ref.one_step_kwargs(), **kwargs)
  params = _params(model)
  return jax.jit(lambda g, a: tx.update(g, tx.init(params), params, activations=a))(
      grads, acts)


def _updates(model, grads, acts, **kwargs):
  return _one_step(model, grads, acts, **kwargs)[0]


def _assert_linear(rows, g_layer, u_layer, name, weight="weight", bias="bias"):
  """``rows (n, I)``; Equinox weights are ``(O, I)``: the reference works on ``W^T``."""
  g_b = getattr(g_layer, bias) if bias else None
  kernel, b = ref.dense_update(rows, np64(getattr(g_layer, weight)).T,
                               None if g_b is None else np64(g_b))
  np.testing.assert_allclose(np64(getattr(u_layer, weight)), kernel.T, rtol=1e-8,
                             atol=1e-12, err_msg=name)
  if b is not None:
    np.testing.assert_allclose(np64(getattr(u_layer, bias)), b, rtol=1e-8, atol=1e-12,
                               err_msg=name)


# --- a stateful model: BatchNorm with make_with_state, Dropout with keys ---------------------


class ConvBN(eqx.Module):
  """Conv -> BatchNorm -> relu -> Dropout -> Linear, Equinox's stateful example."""
  conv: eqx.nn.Conv2d
  bn: eqx.nn.BatchNorm
  drop: eqx.nn.Dropout
  head: eqx.nn.Linear

  def __init__(self, key, mode, dtype=jnp.float64):
    k = jax.random.split(key, 2)
    self.conv = eqx.nn.Conv2d(2, 3, 3, padding=1, key=k[0], dtype=dtype)
    self.bn = eqx.nn.BatchNorm(3, "batch", mode=mode, dtype=dtype)
    self.drop = eqx.nn.Dropout(0.3)
    self.head = eqx.nn.Linear(3 * 16, 4, key=k[1], dtype=dtype)

  def __call__(self, x, state, key):
    h, state = self.bn(self.conv(x), state)
    h = self.drop(jax.nn.relu(h), key=key)
    return self.head(h.reshape(-1)), state


def _bn_loss(model, state, x, y, key):
  keys = jax.random.split(key, x.shape[0])
  batched = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
  logits, state = batched(x, state, keys)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state


def _bn_rows(model, state, x, key):
  """The rows of conv, bn (``xhat``, channels) and head by an independent forward pass in
  numpy: the batch statistics (training) or the running ones (``model.bn.inference``)."""
  n = x.shape[0]
  conv_rows = ref.conv_patches(np.moveaxis(np64(x), 1, -1), (3, 3), (1, 1), ((1, 1), (1, 1)),
                               (1, 1), (1, 1), 1)[0]
  w = np64(model.conv.weight)  # (O, C, kh, kw) -> (kh, kw, C, O)
  h = conv_rows @ np.transpose(w, (2, 3, 1, 0)).reshape(-1, 3) + np64(model.conv.bias).ravel()
  h = h.reshape(n, 4, 4, 3)  # channels last
  bn = model.bn
  if bn.inference:
    if bn.mode == "batch":
      mean, var = (np64(a) for a in state.get(bn.batch_state_index))
      scale = 1 - bn.momentum ** int(state.get(bn.batch_counter))
      mean, var = mean / scale, var / scale
    else:
      mean, var = (np64(a) for a in state.get(bn.ema_state_index))
  else:
    mean, var = h.mean((0, 1, 2)), h.var((0, 1, 2))
    if bn.mode == "ema" and not bool(state.get(bn.ema_first_time_index)):
      run_mean, run_var = (np64(a) for a in state.get(bn.ema_state_index))
      mean = (1 - bn.momentum) * mean + bn.momentum * run_mean
      var = (1 - bn.momentum) * var + bn.momentum * run_var
  xhat = (h - mean) / np.sqrt(var + bn.eps)
  y = np.maximum(xhat * np64(bn.weight) + np64(bn.bias), 0.0)
  keys = jax.random.split(key, n)
  # Dropout's scaled mask: the layer applied to ones with each example's key
  mask = np64(jax.vmap(lambda k: model.drop(jnp.ones((3, 4, 4), jnp.float64), key=k))(keys))
  head_rows = (np.moveaxis(y, -1, 1) * mask).reshape(n, -1)
  return conv_rows, xhat.reshape(-1, 3), head_rows, (h.mean((0, 1, 2)), h.var((0, 1, 2)))


def _assert_running_statistics(bn, state, new_state, batch_stats):
  """The state after the captured step is one update of the running statistics by the
  batch's (numpy): the layer's state changed once per call, not by capture's second run."""
  close = lambda a, b: np.testing.assert_allclose(np64(a), b, rtol=1e-10, atol=1e-14)
  if bn.inference:
    jax.tree.map(close, new_state, jax.tree.map(np64, state))
  elif bn.mode == "batch":
    assert int(new_state.get(bn.batch_counter)) == int(state.get(bn.batch_counter)) + 1
    for old, new, b in zip(state.get(bn.batch_state_index), new_state.get(bn.batch_state_index),
                           batch_stats, strict=True):
      close(new, np64(old) * bn.momentum + b * (1 - bn.momentum))
  else:
    first = bool(state.get(bn.ema_first_time_index))
    assert not bool(new_state.get(bn.ema_first_time_index))
    for old, new, b in zip(state.get(bn.ema_state_index), new_state.get(bn.ema_state_index),
                           batch_stats, strict=True):
      close(new, b if first else (1 - bn.momentum) * b + bn.momentum * np64(old))


def _check_bn_model(model, state, x, y, key):
  (_, (new_state, acts)), grads = _capture(_bn_loss, model, state, x, y, key, has_aux=True)
  assert set(acts) == {"conv", "bn", "head"}
  conv_rows, xhat, head_rows, batch_stats = _bn_rows(model, state, x, key)
  updates, opt_state = _one_step(model, grads, acts)
  for path, rows in (("conv", conv_rows), ("head", head_rows)):
    np.testing.assert_allclose(normalized_factor(opt_state, path), gram(rows), rtol=1e-10,
                               atol=1e-12, err_msg=path)
  _assert_linear(head_rows, grads.head, updates.head, "head")
  s, b = ref.channel_update(xhat, np64(grads.bn.weight), np64(grads.bn.bias))
  np.testing.assert_allclose(np64(updates.bn.weight), s, rtol=1e-8, err_msg="bn")
  np.testing.assert_allclose(np64(updates.bn.bias), b, rtol=1e-8, err_msg="bn")
  _assert_running_statistics(model.bn, state, new_state, batch_stats)
  return new_state


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_batch_norm_with_state_and_dropout(mode):
  """Training mode (in ``ema`` mode two steps: the second normalizes by the running
  statistics mixed with the batch's), then ``eqx.nn.inference_mode``: BatchNorm normalizes
  by the running statistics and Dropout is the identity, and the factors are those of that
  forward pass. The running statistics the step returns are one update by the batch's."""
  model, state = eqx.nn.make_with_state(ConvBN)(KEYS[0], mode)
  x = jax.random.normal(KEYS[1], (6, 2, 4, 4), jnp.float64) * 1.5 + 0.5
  y = jnp.arange(6) % 4
  state = _check_bn_model(model, state, x, y, KEYS[2])
  if mode == "ema":  # its second step mixes the batch statistics into the running ones
    state = _check_bn_model(model, state, x * 0.7 - 0.2, y, KEYS[3])
  _check_bn_model(eqx.nn.inference_mode(model), state, x, y, KEYS[4])


def test_stateful_training_step_under_filter_jit():
  """The documented Equinox step with the state threaded through, ``optax.chain(sngd(),
  sgd)``: every layer is covered and the loss falls."""
  with jax.enable_x64(False):
    model, state = eqx.nn.make_with_state(ConvBN)(KEYS[0], "batch", jnp.float32)
    x = jax.random.normal(KEYS[1], (32, 2, 4, 4))
    y = (x[:, 0, :2, :2].sum((1, 2)) > 0).astype(jnp.int32) + 2 * (x[:, 1, 0, 0] > 0)
    report = sngd_jax.coverage(_bn_loss, model, state, x, y, KEYS[2])
    assert report.missing == [] and report.pass_through == [], str(report)
    tx = optax.chain(sngd_jax.sngd(), optax.sgd(0.1, momentum=0.9))
    opt_state = tx.init(_params(model))

    @eqx.filter_jit
    def step(model, state, opt_state, key):
      (loss, (state, acts)), grads = eqx.filter_value_and_grad(
          sngd_jax.capture_eqx(_bn_loss, has_aux=True), has_aux=True)(model, state, x, y, key)
      updates, opt_state = tx.update(grads, opt_state, _params(model), activations=acts)
      return eqx.apply_updates(model, updates), state, opt_state, loss

    losses = []
    for key in jax.random.split(KEYS[3], 30):
      model, state, opt_state, loss = step(model, state, opt_state, key)
      losses.append(float(loss))
    assert int(state.get(model.bn.batch_counter)) == 30
    assert losses[-1] < 0.5 * losses[0], losses


# --- attention with a mask, dropout and inference ------------------------------------------


def _attention_rows(mha, x, mask):
  """The input rows of ``output_proj`` by numpy: masked softmax attention per head, heads
  concatenated (Equinox's default projections have no bias)."""
  n, t, _ = x.shape
  h = mha.num_heads
  proj = lambda layer, a: np64(a) @ np64(layer.weight).T
  q, k, v = (proj(p, x).reshape(n, t, h, -1)
             for p in (mha.query_proj, mha.key_proj, mha.value_proj))
  logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
  logits = np.where(np.asarray(mask), logits, np.finfo(np.float64).min)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", w, v).reshape(n * t, -1)


@pytest.mark.parametrize("how", ["call", "inference_mode"])
def test_masked_attention_in_inference(how):
  """A causal mask with ``inference=True`` (attention dropout off), passed to the call or set
  by ``eqx.nn.inference_mode``: the projections' rows are every token, ``output_proj``'s the
  masked attention output of every token, as numpy computes it."""
  mha = eqx.nn.MultiheadAttention(2, 4, dropout_p=0.5, key=KEYS[0], **F64)
  x = jax.random.normal(KEYS[1], (3, 5, 4), jnp.float64)
  mask = jnp.tril(jnp.ones((5, 5), bool))
  if how == "inference_mode":
    mha = eqx.nn.inference_mode(mha)
    call = lambda m, s: m(s, s, s, mask=mask)
  else:
    call = lambda m, s: m(s, s, s, mask=mask, inference=True)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(lambda s: call(m, s))(x)))
  (_, acts), grads = _capture(loss, mha, x)
  assert set(acts) == {"query_proj", "key_proj", "value_proj", "output_proj"}
  rows = {"query_proj": np64(x).reshape(-1, 4), "output_proj": _attention_rows(mha, x, mask)}
  rows["key_proj"] = rows["value_proj"] = rows["query_proj"]
  updates, opt_state = _one_step(mha, grads, acts)
  for name, r in rows.items():
    np.testing.assert_allclose(normalized_factor(opt_state, name), gram(r, bias=False),
                               rtol=1e-10, atol=1e-12, err_msg=name)
    _assert_linear(r, getattr(grads, name), getattr(updates, name), name, bias=None)


def test_attention_dropout_with_keys():
  """Attention dropout in training, one key per example: ``output_proj``'s rows are the
  dropped-out attention output, the same layer's forward with ``output_proj`` replaced by
  the identity and the same keys."""
  mha = eqx.nn.MultiheadAttention(2, 4, dropout_p=0.5, use_output_bias=True, key=KEYS[2],
                                  **F64)
  x = jax.random.normal(KEYS[3], (3, 5, 4), jnp.float64)
  mask = jnp.tril(jnp.ones((5, 5), bool))
  keys = jax.random.split(KEYS[4], 3)
  forward = lambda m: jax.vmap(lambda s, k: m(s, s, s, mask=mask, key=k))(x, keys)
  loss = lambda m, x: jnp.sum(jnp.sin(forward(m)))
  (_, acts), grads = _capture(loss, mha, x)
  rows = np64(forward(eqx.tree_at(lambda m: m.output_proj, mha, eqx.nn.Identity())))
  rows = rows.reshape(-1, 4)
  assert np.mean(rows == 0) > 0.1  # some attention weights were dropped
  updates, opt_state = _one_step(mha, grads, acts)
  np.testing.assert_allclose(normalized_factor(opt_state, "output_proj"), gram(rows),
                             rtol=1e-10, atol=1e-12)
  _assert_linear(rows, grads.output_proj, updates.output_proj, "output_proj")


# --- grouped convolution, norms without weight or bias ------------------------------------


@pytest.mark.parametrize("groups", [2, 4])
def test_grouped_and_depthwise_conv(groups):
  """``groups=2`` and depthwise (``groups`` = input channels, two outputs each): one factor
  over the patches of every group, ``(k, C/g)`` wide."""
  conv = eqx.nn.Conv2d(4, 8, (3, 2), stride=(1, 2), padding="SAME", groups=groups,
                       key=KEYS[5], **F64)
  x = jax.random.normal(KEYS[6], (2, 4, 5, 6), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  (_, acts), grads = _capture(loss, conv, x)
  rows = ref.conv_patches(np.moveaxis(np64(x), 1, -1), (3, 2), (1, 2), "SAME", (1, 1),
                          (1, 1), groups)[0]
  assert rows.shape[1] == 6 * 4 // groups
  u, opt_state = _one_step(conv, grads, acts)
  np.testing.assert_allclose(normalized_factor(opt_state, ""), gram(rows), rtol=1e-10,
                             atol=1e-12)
  to_flax = lambda w: np.transpose(np64(w), (2, 3, 1, 0))  # (O, C/g, kh, kw) -> (kh, kw, C/g, O)
  kernel, bias = ref.dense_update(rows, to_flax(grads.weight).reshape(rows.shape[1], -1),
                                  np64(grads.bias).ravel())
  np.testing.assert_allclose(to_flax(u.weight).reshape(kernel.shape), kernel, rtol=1e-8,
                             atol=1e-12)
  np.testing.assert_allclose(np64(u.bias).ravel(), bias, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("cls", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("use_weight,use_bias", [(True, False), (False, True), (False, False),
                                                 (True, True)])
def test_norms_with_and_without_weight_and_bias(cls, use_weight, use_bias):
  """A weight alone gets the ``1 x 1`` block ``E[xhat^2]`` per channel, weight and bias the
  ``2 x 2`` one; a bias alone passes through (as linen's ``use_scale=False``); no affine
  parameters, nothing. The next layer's rows are the normalized features."""
  norm = getattr(eqx.nn, cls)(4, use_weight=use_weight, use_bias=use_bias, **F64)
  if use_weight:
    norm = eqx.tree_at(lambda m: m.weight, norm, jnp.array([0.5, -1.0, 2.0, 1.5]))
  if use_bias:
    norm = eqx.tree_at(lambda m: m.bias, norm, jnp.array([0.1, 0.0, -0.3, 0.2]))
  model = (norm, eqx.nn.Linear(4, 2, key=KEYS[7], **F64))
  x = jax.random.normal(KEYS[0], (6, 4), jnp.float64) * 2.0 + 1.0
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(lambda v: m[1](m[0](v)))(x)))
  report = sngd_jax.coverage(loss, model, x)
  assert report.missing == []
  assert report.pass_through == (["0/bias"] if use_bias and not use_weight else [])
  (_, acts), grads = _capture(loss, model, x)
  assert set(acts) == ({"0", "1"} if use_weight else {"1"})
  xn = np64(x)
  if cls == "LayerNorm":
    xn = xn - xn.mean(-1, keepdims=True)
    xhat = xn / np.sqrt(xn.var(-1, keepdims=True) + 1e-5)
  else:
    xhat = xn / np.sqrt(np.mean(xn ** 2, -1, keepdims=True) + 1e-5)
  updates = _updates(model, grads, acts)
  if use_weight:
    s, b = ref.channel_update(xhat, np64(grads[0].weight),
                              np64(grads[0].bias) if use_bias else None)
    np.testing.assert_allclose(np64(updates[0].weight), s, rtol=1e-8)
    if use_bias:
      np.testing.assert_allclose(np64(updates[0].bias), b, rtol=1e-8)
  elif use_bias:
    np.testing.assert_array_equal(updates[0].bias, grads[0].bias)
  y = xhat * (np64(norm.weight) if use_weight else 1.0) + (np64(norm.bias) if use_bias else 0.0)
  _assert_linear(y, grads[1], updates[1], "1")


# --- recurrent cells scanned inside a module ------------------------------------------------


class BiRNN(eqx.Module):
  """A GRU forward and a bias-free LSTM backward (``reverse=True``), each under
  ``jax.lax.scan`` in ``__call__``, and a head on both final states."""
  fwd: eqx.nn.GRUCell
  bwd: eqx.nn.LSTMCell
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 3)
    self.fwd = eqx.nn.GRUCell(3, 4, key=k[0], **F64)
    self.bwd = eqx.nn.LSTMCell(3, 4, use_bias=False, key=k[1], **F64)
    self.head = eqx.nn.Linear(8, 2, key=k[2], **F64)

  def __call__(self, xs):
    h0 = jnp.zeros(4, jnp.float64)
    hf, _ = jax.lax.scan(lambda h, x: (self.fwd(x, h), None), h0, xs)
    (hb, _), _ = jax.lax.scan(lambda s, x: (self.bwd(x, s), None), (h0, h0), xs, reverse=True)
    return self.head(jnp.concatenate([hf, hb]))


def _unrolled_states(cell, xs, reverse):
  """Every step's previous hidden state and the final one, by a Python loop."""
  lstm = isinstance(cell, eqx.nn.LSTMCell)
  prev, finals = [], []
  for seq in xs:
    h = jnp.zeros(4, jnp.float64)
    state = (h, h) if lstm else h
    for x in (seq[::-1] if reverse else seq):
      prev.append(np64(state[0] if lstm else state))
      state = cell(x, state)
    finals.append(np64(state[0] if lstm else state))
  return np.stack(prev), np.stack(finals)


def test_cells_scanned_inside_a_module():
  model = BiRNN(KEYS[1])
  xs = jax.random.normal(KEYS[2], (3, 5, 3), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  (_, acts), grads = _capture(loss, model, xs)
  report = sngd_jax.coverage(loss, model, xs)
  assert report.missing == [] and report.pass_through == ["fwd/bias_n"]
  updates, opt_state = _one_step(model, grads, acts)
  h_f, final_f = _unrolled_states(model.fwd, xs, reverse=False)
  h_b, final_b = _unrolled_states(model.bwd, xs, reverse=True)
  x_rows = np64(xs).reshape(-1, 3)
  x_rev = np64(xs)[:, ::-1].reshape(-1, 3)
  cases = [("fwd/weight_ih", x_rows, True), ("fwd/weight_hh", h_f, False),
           ("bwd/weight_ih", x_rev, False), ("bwd/weight_hh", h_b, False)]
  for path, rows, bias in cases:
    np.testing.assert_allclose(normalized_factor(opt_state, path), gram(rows, bias=bias),
                               rtol=1e-10, atol=1e-12, err_msg=path)
    cell, name = path.split("/")
    _assert_linear(rows, getattr(grads, cell), getattr(updates, cell), path, weight=name,
                   bias="bias" if bias else None)
  _assert_linear(np.concatenate([final_f, final_b], 1), grads.head, updates.head, "head")


# --- an embedding tied to the output head ---------------------------------------------------


class HandTied(eqx.Module):
  """The output layer written by hand on the embedding table: ``logits = E h``."""
  emb: eqx.nn.Embedding
  mid: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 2)
    self.emb = eqx.nn.Embedding(7, 3, key=k[0], **F64)
    self.mid = eqx.nn.Linear(3, 3, key=k[1], **F64)

  def __call__(self, token):
    return self.emb.weight @ jnp.tanh(self.mid(self.emb(token)))


class SharedTied(eqx.Module):
  """The same model tied as Equinox documents it: ``eqx.nn.Shared`` of the table and a
  bias-free ``Linear`` readout (with Equinox's own check that both hold one array)."""
  shared: eqx.nn.Shared
  mid: eqx.nn.Linear

  def __init__(self, hand):
    out = eqx.nn.Linear(3, 7, use_bias=False, key=KEYS[0], **F64)
    self.shared = eqx.nn.Shared((hand.emb, out), where=lambda p: p[1].weight,
                                get=lambda p: p[0].weight)
    self.mid = hand.mid

  def __call__(self, token):
    emb, out = self.shared()
    assert emb.weight is out.weight
    return out(jnp.tanh(self.mid(emb(token))))


TOKENS = jnp.array([1, 2, 2, 5, 1, 2])


def test_a_table_read_outside_its_lookup_warns_naming_it_and_the_fixes():
  """``self.emb.weight @ h``: the table's gradient holds the readout's use, which its local
  Fisher ``diag(f)`` does not model; the rows of tokens absent from the batch (0, 3, 4, 6)
  are divided by the damping alone (it was silent: under the one-step settings their steps
  are 1000x their gradient, against 2-6x for the tokens seen). ``capture_eqx`` (and
  ``coverage``) warn, naming the table, ``eqx.nn.Shared`` with ``fisher='tied'``, and
  ``fisher={'emb': None}``; the same model tied by ``eqx.nn.Shared`` does not warn."""
  model = HandTied(KEYS[1])
  loss = lambda m, t: jnp.sum(jnp.sin(jax.vmap(m)(t)))
  match = (r"eqx.nn.Embedding 'emb' is read outside its lookup \(`emb.weight`.*"
           r"`eqx.nn.Shared`.*fisher=\{'emb': 'tied'\}.*fisher=\{'emb': None\}")
  with pytest.warns(UserWarning, match=match):
    (_, acts), grads = _capture(loss, model, TOKENS)
  with pytest.warns(UserWarning, match=match):
    sngd_jax.coverage(loss, model, TOKENS)
  u = _updates(model, grads, acts)
  absent = np.array([0, 3, 4, 6])
  ratio = np.abs(np64(u.emb.weight) / np64(grads.emb.weight))
  assert ratio[absent].min() > 100 * ratio[np.array([1, 2, 5])].max()  # what it warns of
  u = _updates(model, grads, acts, fisher={"emb": None})
  np.testing.assert_array_equal(u.emb.weight, grads.emb.weight)
  # the documented tie: no warning
  tied = SharedTied(model)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    (_, acts), grads = _capture(loss, tied, TOKENS)
  assert set(acts) == {"shared/pytree/0", "mid"}


def test_a_layer_copy_with_a_computed_bias_warns_saying_so():
  """A copy of a layer made in the loss with another bias (``eqx.tree_at`` on the bias): the
  warning said the weight was read by a module with *no* bias, tied by ``eqx.nn.Shared``,
  neither of which is the case. It names the computed bias and the fix; the factor is the
  Gram sum of the rows ``[x; 1]`` the copy saw."""
  lin = eqx.nn.Linear(3, 2, key=KEYS[2], **F64)
  x = jax.random.normal(KEYS[3], (5, 3), jnp.float64)

  def loss(m, x):
    shifted = eqx.tree_at(lambda q: q.bias, m, 2.0 * m.bias)
    return jnp.sum(jnp.sin(jax.vmap(shifted)(x)))

  with pytest.warns(UserWarning) as record:
    (_, acts), grads = _capture(loss, lin, x)
  messages = [str(w.message) for w in record]
  assert not any("no bias" in m or "eqx.nn.Shared" in m for m in messages), messages
  assert any("layer '' is called with a bias that is no param of the model" in m
             and "`fisher={'': None}`" in m for m in messages), messages
  _, opt_state = _one_step(lin, grads, acts)
  np.testing.assert_allclose(normalized_factor(opt_state, ""), gram(np64(x)), rtol=1e-10)


def test_a_model_cast_inside_the_loss_warns_naming_the_cast_and_the_fix():
  """Mixed precision by casting the whole model in the loss: no weight is a leaf of the model,
  so nothing is captured. The warning named a jit, a layer made in the loss, WeightNorm, a
  transposed copy and a cast passed to ``sngd_jax.dense``, none of them this; it names the
  model cast and the way to compute a layer in bfloat16 that is captured."""
  mlp = eqx.nn.MLP(4, 2, 8, 1, key=KEYS[4], **F64)

  def loss(m, x):
    m = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, m)
    return jnp.sum(jax.vmap(m)(x.astype(jnp.bfloat16)).astype(jnp.float32))

  with pytest.warns(UserWarning, match=r"could not name 2 layer call\(s\).*the whole model is "
                    r"cast to another dtype inside the loss.*@sngd_jax.dense_layer"):
    _, acts = sngd_jax.capture_eqx(loss)(mlp, jnp.ones((3, 4), jnp.float64))
  assert not acts


def test_captures_on_two_threads_record_their_own_calls_and_restore_the_classes():
  """Capture swaps ``eqx.nn.Linear.__call__``, ``eqx.nn.Embedding.__getattribute__`` (and
  others) on the class while it runs. Thread A captures and waits inside its loss while
  (1) the main thread, not capturing, calls the same model's layers and reads its table by
  hand, and (2) thread B starts a capture that outlives A's. A records its own calls only
  (one call of ``mid``, no table-read warning), and once both end the classes hold
  Equinox's own methods again. Until 2026-12-06 the swaps were process-wide and each capture
  restored the method it found: A recorded the main thread's call (a tracer of its vmap, so
  A dropped ``mid`` as not captured) and warned of the main thread's table read, B recorded
  nothing, and ``Linear.__call__``, ``Embedding.__call__`` and ``__getattribute__`` were left
  as A's wrappers for good (A's recorder kept every later call)."""
  import threading  # noqa: PLC0415

  model = HandTied(KEYS[1])
  own = {cls: dict(cls.__dict__) for cls in (eqx.nn.Linear, eqx.nn.Embedding)}
  a_inside, b_inside, a_done = threading.Event(), threading.Event(), threading.Event()
  out: dict = {}

  def loss(m, t):
    return jnp.sum(jax.vmap(lambda k: jnp.tanh(m.mid(m.emb(k))))(t))

  def run_a():
    def waiting(m, t):
      a_inside.set()
      assert b_inside.wait(60)
      return loss(m, t)
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      out["a"] = sngd_jax.capture_eqx(waiting)(model, TOKENS)[1]
    out["a_warnings"] = [str(w.message) for w in caught if "sngd" in str(w.message)]

  def run_b():
    def waiting(m, t):
      b_inside.set()
      assert a_done.wait(60)
      return loss(m, t)
    out["b"] = sngd_jax.capture_eqx(waiting)(model, TOKENS)[1]

  a = threading.Thread(target=run_a)
  a.start()
  assert a_inside.wait(60)
  jax.vmap(model.mid)(jnp.ones((2, 3), jnp.float64))  # the main thread, not capturing
  _ = model.emb.weight @ jnp.ones(3, jnp.float64)
  b = threading.Thread(target=run_b)
  b.start()
  a.join(60)
  a_done.set()
  b.join(60)
  assert not a.is_alive() and not b.is_alive()
  assert {p: len(c) for p, c in out["a"].items()} == {"emb": 1, "mid": 1}, out["a"]
  assert {p: len(c) for p, c in out["b"].items()} == {"emb": 1, "mid": 1}, out["b"]
  assert not out["a_warnings"], out["a_warnings"]
  for cls, before in own.items():
    for name in ("__call__", "__getattribute__"):
      assert cls.__dict__.get(name) is before.get(name), (cls, name)
