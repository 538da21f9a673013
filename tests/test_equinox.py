"""Equinox models through capture_eqx: one update of an MLP, a CNN (Conv, ConvTranspose),
an LSTM/GRU under the user's lax.scan, embeddings and normalization layers against float64
numpy references; stacked layers scanned over train like the unrolled ones; coverage."""

import re
import warnings

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd, factors_after_one_step
from np_reference import np64

import sngd_jax

eqx = pytest.importorskip("equinox")


pytestmark = pytest.mark.usefixtures("x64")


KEYS = jax.random.split(jax.random.key(0), 8)


def _one_update(loss, model, *args, fisher="linear"):
  """Grads and one exact update under filter_jit, through the documented Equinox API."""
  tx = exact_sngd(**ref.one_step_kwargs(), fisher=fisher)

  @eqx.filter_jit
  def step(model, *args):
    loss_and_acts = sngd_jax.capture_eqx(loss, outputs=True)
    (_, acts), grads = eqx.filter_value_and_grad(loss_and_acts, has_aux=True)(model, *args)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  with jax.checking_leaks():
    return step(model, *args)


def _check_linear(rows, g_layer, u_layer, name, weight="weight", bias="bias"):
  """``rows (n, I)``; Equinox weights are ``(O, I)``: the reference works on ``W^T``."""
  g_b = getattr(g_layer, bias) if bias else None
  kernel, b = ref.dense_update(rows, np64(getattr(g_layer, weight)).T,
                               None if g_b is None else np64(g_b))
  np.testing.assert_allclose(np64(getattr(u_layer, weight)), kernel.T, rtol=1e-8, atol=1e-12,
                             err_msg=name)
  if b is not None:
    np.testing.assert_allclose(np64(getattr(u_layer, bias)), b, rtol=1e-8, atol=1e-12,
                               err_msg=name)


def test_mlp_under_vmap():
  model = eqx.nn.MLP(4, 3, 6, 2, key=KEYS[0], dtype=jnp.float64)
  x = jax.random.normal(KEYS[1], (10, 4), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  grads, updates, acts = _one_update(loss, model, x)
  assert set(acts) == {"layers/0", "layers/1", "layers/2"}
  h = np64(x)
  for i, layer in enumerate(model.layers):
    _check_linear(h, grads.layers[i], updates.layers[i], f"layers/{i}")
    z = h @ np64(layer.weight).T + np64(layer.bias)
    h = np.maximum(z, 0.0)


@pytest.mark.parametrize("batch_size", [None, 4])
def test_lax_map_over_the_batch_pools_every_example(batch_size):
  """``jax.lax.map(model, x)`` in place of ``jax.vmap`` (less memory; with ``batch_size``, a
  scan over vmapped chunks and a vmapped remainder): every example is a row, as under
  ``jax.vmap`` (it used to leave the records inside JAX's own scan: a warning, and ``update``
  raised that no activations were captured)."""
  model = eqx.nn.MLP(4, 3, 6, 2, key=KEYS[0], dtype=jnp.float64)
  x = jax.random.normal(KEYS[1], (10, 4), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.lax.map(m, x, batch_size=batch_size)))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    grads, updates, acts = _one_update(loss, model, x)
  assert set(acts) == {"layers/0", "layers/1", "layers/2"}
  h = np64(x)
  for i, layer in enumerate(model.layers):
    _check_linear(h, grads.layers[i], updates.layers[i], f"layers/{i}")
    h = np.maximum(h @ np64(layer.weight).T + np64(layer.bias), 0.0)


def test_multi_transform_gives_the_last_layer_to_adam():
  """``optax.multi_transform`` over an Equinox MLP: SNGD on the first two layers, Adam on the
  last (its ``weight`` and ``bias`` are ``MaskedNode``s to SNGD, its activations ignored).
  The SNGD layers get the float64 reference update, the last layer Adam's first step."""
  model = eqx.nn.MLP(4, 3, 6, 2, key=KEYS[0], dtype=jnp.float64)
  x = jax.random.normal(KEYS[1], (10, 4), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  params = eqx.filter(model, eqx.is_inexact_array)
  labels = jax.tree_util.tree_map_with_path(
      lambda p, _: "adam" if "layers[2]" in jax.tree_util.keystr(p) else "sngd", params)
  tx = optax.multi_transform(
      {"sngd": exact_sngd(**ref.one_step_kwargs()), "adam": optax.adam(0.1)},
      lambda _: labels)  # a function: an Equinox module is callable, optax would call it

  @eqx.filter_jit
  def step(model):
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
        model, x)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  grads, updates, acts = step(model)
  assert "layers/2" in acts
  h = np64(x)
  for i, layer in enumerate(model.layers[:2]):
    _check_linear(h, grads.layers[i], updates.layers[i], f"layers/{i}")
    h = np.maximum(h @ np64(layer.weight).T + np64(layer.bias), 0.0)
  for name in ("weight", "bias"):  # Adam's first step: -lr * g / (|g| + eps)
    g = np64(getattr(grads.layers[2], name))
    np.testing.assert_allclose(np64(getattr(updates.layers[2], name)),
                               -0.1 * g / (np.abs(g) + 1e-8), rtol=1e-6)


def test_mlp_rfim_reads_outputs():
  model = eqx.nn.Linear(3, 2, key=KEYS[0], dtype=jnp.float64)
  x = jax.random.normal(KEYS[1], (12, 3), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  grads, updates, _ = _one_update(loss, model, x, fisher="rfim")
  from helpers_mlp import reference_update
  z = np64(x) @ np64(model.weight).T + np64(model.bias)
  w, b = reference_update(np64(x), z, np64(grads.weight).T, np64(grads.bias), "rfim",
                          ref.DAMPING)
  np.testing.assert_allclose(np64(updates.weight), w.T, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(np64(updates.bias), b, rtol=1e-8, atol=1e-12)


class CNN(eqx.Module):
  conv: eqx.nn.Conv2d
  reflect: eqx.nn.Conv2d
  up: eqx.nn.ConvTranspose2d
  conv1d: eqx.nn.Conv1d

  def __init__(self, key):
    k = jax.random.split(key, 4)
    f64 = dict(dtype=jnp.float64)
    self.conv = eqx.nn.Conv2d(4, 4, (3, 2), stride=(2, 1), padding=((1, 0), (2, 1)),
                              dilation=(2, 1), groups=2, key=k[0], **f64)
    self.reflect = eqx.nn.Conv2d(4, 3, 3, padding=1, padding_mode="REFLECT", key=k[1], **f64)
    self.up = eqx.nn.ConvTranspose2d(3, 2, (2, 3), stride=2, padding=1, key=k[2], **f64)
    self.conv1d = eqx.nn.Conv1d(2, 2, 3, padding="SAME", use_bias=False, key=k[3], **f64)

  def __call__(self, x):
    h = jnp.tanh(self.conv(x))
    h = jnp.tanh(self.reflect(h))
    h = jnp.tanh(self.up(h))
    return self.conv1d(h.reshape(h.shape[0], -1))


def _patch_rows(x_chw, *args):
  """Reference patches of channels-first per-example inputs ``(B, C, *spatial)``."""
  return ref.conv_patches(np.moveaxis(np64(x_chw), 1, -1), *args)[0]


def test_cnn_conv_reflect_transpose_1d():
  model = CNN(KEYS[2])
  x = jax.random.normal(KEYS[3], (2, 4, 7, 6), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  grads, updates, acts = _one_update(loss, model, x)
  assert set(acts) == {"conv", "reflect", "up", "conv1d"}
  h1 = jax.vmap(lambda v: jnp.tanh(model.conv(v)))(x)
  h2 = jax.vmap(lambda v: jnp.tanh(model.reflect(v)))(h1)
  h3 = jax.vmap(lambda v: jnp.tanh(model.up(v)))(h2)
  padded = np.pad(np64(h1), [(0, 0), (0, 0), (1, 1), (1, 1)], mode="reflect")
  up_padding = tuple(tuple(p) for p in model.up._padding_transpose())
  cases = {
      "conv": _patch_rows(x, (3, 2), (2, 1), ((1, 0), (2, 1)), (2, 1), (1, 1), 2),
      "reflect": _patch_rows(padded, (3, 3), (1, 1), "VALID", (1, 1), (1, 1), 1),
      "up": _patch_rows(h2, (2, 3), (1, 1), up_padding, (1, 1), (2, 2), 1),
      "conv1d": _patch_rows(np64(h3).reshape(2, 2, -1), (3,), (1,), "SAME", (1,), (1,), 1),
  }
  for name, rows in cases.items():
    g, u = getattr(grads, name), getattr(updates, name)
    r = len(g.weight.shape) - 2
    to_flax = lambda w, r=r: np.transpose(np64(w), tuple(range(2, 2 + r)) + (1, 0))
    kernel, bias = ref.dense_update(rows, to_flax(g.weight).reshape(rows.shape[1], -1),
                                    None if g.bias is None else np64(g.bias))
    np.testing.assert_allclose(to_flax(u.weight).reshape(kernel.shape), kernel, rtol=1e-8,
                               atol=1e-12, err_msg=name)
    if bias is not None:
      np.testing.assert_allclose(np64(u.bias), bias, rtol=1e-8, atol=1e-12, err_msg=name)


def _cell_rows(cell, xs):
  """(inputs, previous hidden states) of every step, in numpy float64, ``xs (B, T, I)``."""
  def run(x_seq):
    hidden = jnp.zeros(cell.hidden_size, jnp.float64)
    state = (hidden, hidden) if isinstance(cell, eqx.nn.LSTMCell) else hidden

    def step(state, x):
      h = state[0] if isinstance(state, tuple) else state
      return cell(x, state), h
    return jax.lax.scan(step, state, x_seq)[1]
  return np64(xs).reshape(-1, xs.shape[-1]), np64(jax.vmap(run)(xs)).reshape(-1, cell.hidden_size)


@pytest.mark.parametrize("cell_type", [eqx.nn.LSTMCell, eqx.nn.GRUCell])
def test_recurrent_cell_under_users_scan_pools_every_step(cell_type):
  cell = cell_type(4, 3, key=KEYS[4], dtype=jnp.float64)
  xs = jax.random.normal(KEYS[5], (3, 5, 4), jnp.float64)

  def loss(cell, xs):
    def sequence(x_seq):
      hidden = jnp.zeros(cell.hidden_size, jnp.float64)
      state = (hidden, hidden) if isinstance(cell, eqx.nn.LSTMCell) else hidden
      step = lambda state, x: (cell(x, state), None)
      final, _ = jax.lax.scan(step, state, x_seq)
      return final[0] if isinstance(final, tuple) else final
    return jnp.sum(jnp.sin(jax.vmap(sequence)(xs)))

  grads, updates, acts = _one_update(loss, cell, xs)
  assert set(acts) == {"weight_ih", "weight_hh"}
  x_rows, h_rows = _cell_rows(cell, xs)
  assert x_rows.shape[0] == h_rows.shape[0] == 15
  _check_linear(x_rows, grads, updates, "ih", weight="weight_ih")
  _check_linear(h_rows, grads, updates, "hh", weight="weight_hh", bias=None)
  if cell_type is eqx.nn.GRUCell:  # bias_n is left to the next transform
    np.testing.assert_array_equal(np64(updates.bias_n), np64(grads.bias_n))


def test_layers_called_by_keyword():
  """``cell(input=x, hidden=h)`` and ``linear(x=h)``, the names of Equinox's signatures: the
  same rows as positional calls (the recorders read ``args[0]``, ``args[1]``: IndexError)."""
  cell = eqx.nn.GRUCell(4, 3, key=KEYS[4], dtype=jnp.float64)
  head = eqx.nn.Linear(3, 2, key=KEYS[5], dtype=jnp.float64)
  xs = jax.random.normal(KEYS[6], (3, 5, 4), jnp.float64)

  def loss(model, xs):
    cell, head = model

    def sequence(x_seq):
      step = lambda h, x: (cell(input=x, hidden=h), None)
      final, _ = jax.lax.scan(step, jnp.zeros(cell.hidden_size, jnp.float64), x_seq)
      return head(x=final)
    return jnp.sum(jnp.sin(jax.vmap(sequence)(xs)))

  grads, updates, acts = _one_update(loss, (cell, head), xs)
  assert set(acts) == {"0/weight_ih", "0/weight_hh", "1"}
  x_rows, h_rows = _cell_rows(cell, xs)
  _check_linear(x_rows, grads[0], updates[0], "ih", weight="weight_ih")
  _check_linear(h_rows, grads[0], updates[0], "hh", weight="weight_hh", bias=None)
  finals = jax.vmap(lambda s: jax.lax.scan(lambda h, x: (cell(x, h), None),
                                           jnp.zeros(3, jnp.float64), s)[0])(xs)
  _check_linear(np64(finals), grads[1], updates[1], "head")


class Tokens(eqx.Module):
  emb: eqx.nn.Embedding
  ln: eqx.nn.LayerNorm
  rms: eqx.nn.RMSNorm
  out: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 2)
    self.emb = eqx.nn.Embedding(9, 4, key=k[0], dtype=jnp.float64)
    self.ln = eqx.nn.LayerNorm(4, dtype=jnp.float64)
    self.rms = eqx.nn.RMSNorm(4, use_bias=True, dtype=jnp.float64)
    self.out = eqx.nn.Linear(4, 3, key=k[1], dtype=jnp.float64)

  def __call__(self, token):
    h = self.ln(self.emb(token))
    return self.out(self.rms(jnp.tanh(h) * 2.0 + 0.5))


def test_embedding_and_norms():
  model = Tokens(KEYS[6])
  tokens = jnp.array([[1, 4, 4, 0], [8, 1, 1, 1]])
  loss = lambda m, t: jnp.sum(jnp.sin(jax.vmap(jax.vmap(m))(t)))
  grads, updates, _ = _one_update(loss, model, tokens)
  counts = np.bincount(np.asarray(tokens).ravel(), minlength=9) / tokens.size
  shift = ref.DAMPING * counts.sum()
  np.testing.assert_allclose(np64(updates.emb.weight),
                             np64(grads.emb.weight) / (counts + shift)[:, None], rtol=1e-10)
  e = np64(model.emb.weight)[np.asarray(tokens).ravel()]
  xhat_ln = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-5)
  s, b = ref.channel_update(xhat_ln, np64(grads.ln.weight), np64(grads.ln.bias))
  np.testing.assert_allclose(np64(updates.ln.weight), s, rtol=1e-8)
  np.testing.assert_allclose(np64(updates.ln.bias), b, rtol=1e-8)
  y = np.tanh(xhat_ln * np64(model.ln.weight) + np64(model.ln.bias)) * 2.0 + 0.5
  xhat_rms = y / np.sqrt(np.mean(y ** 2, -1, keepdims=True) + 1e-5)
  s, b = ref.channel_update(xhat_rms, np64(grads.rms.weight), np64(grads.rms.bias))
  np.testing.assert_allclose(np64(updates.rms.weight), s, rtol=1e-8)
  np.testing.assert_allclose(np64(updates.rms.bias), b, rtol=1e-8)


def test_tied_setting_is_refused_for_a_layer_that_is_no_embedding():
  params = eqx.filter(Tokens(KEYS[6]), eqx.is_inexact_array)
  with pytest.raises(ValueError, match=r"Equinox layer 'out', which is not an `Embedding`"):
    sngd_jax.sngd(fisher={"out": "tied"}).init(params)


class SharedTied(eqx.Module):
  """Equinox's tied weights: an Embedding and a bias-free Linear readout joined by Shared."""
  shared: eqx.nn.Shared
  mid: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 3)
    emb = eqx.nn.Embedding(9, 3, key=k[0], dtype=jnp.float64)
    out = eqx.nn.Linear(3, 9, use_bias=False, key=k[1], dtype=jnp.float64)
    self.shared = eqx.nn.Shared((emb, out), where=lambda p: p[1].weight,
                                get=lambda p: p[0].weight)
    self.mid = eqx.nn.Linear(3, 3, key=k[2], dtype=jnp.float64)

  def __call__(self, token):
    emb, out = self.shared()
    return out(jnp.tanh(self.mid(emb(token))))


def _shared_tied_loss(model, tokens):
  return jnp.sum(jnp.sin(jax.vmap(model)(tokens)))


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
def test_shared_tied_table_is_preconditioned_as_both_layers():
  """``eqx.nn.Shared`` table and readout, fisher='tied': as linen's ``attend`` (test_diag),
  ``Delta E = (diag(f) + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}``, ``g_E`` both uses'
  gradients summed, ``G_h = E[h h^T]`` over the readout's inputs."""
  model = SharedTied(KEYS[7])
  tokens = jnp.array([1, 4, 4, 0, 4, 1, 2, 7])
  path = "shared/pytree/0"
  grads, updates, _ = _one_update(_shared_tied_loss, model, tokens, fisher={path: "tied"})
  e = np64(model.shared.pytree[0].weight)
  h = np.tanh(e[np.asarray(tokens)] @ np64(model.mid.weight).T + np64(model.mid.bias))
  g_e = np64(grads.shared.pytree[0].weight)
  freq = np.bincount(np.asarray(tokens), minlength=9) / tokens.size
  rows = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  expect = ref.damped_solve(ref.linear_factor(h, bias=False), rows.T).T
  np.testing.assert_allclose(np64(updates.shared.pytree[0].weight), expect, rtol=1e-9)
  _check_linear(e[np.asarray(tokens)], grads.mid, updates.mid, "mid")
  report = sngd_jax.coverage(_shared_tied_loss, model, tokens, fisher={path: "tied"})
  row = {r.path: r for r in report.params}[path + "/weight"]
  assert row.fisher == "tied: diagonal/embed 9 + linear/attend 3x3"
  # without 'tied' the table's second use is an error that gives the fix
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.sngd()
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(_shared_tied_loss),
                                               has_aux=True)(model, tokens)
  with pytest.raises(ValueError, match=r"fisher=\{'shared/pytree/0': 'tied'\}"):
    tx.update(grads, tx.init(params), params, activations=acts)


class SharedLM(eqx.Module):
  """Equinox's documented tie (``eqx.nn.Shared``'s example): an ``Embedding`` and a bias-free
  output ``Linear(D, V)`` share one ``(V, D)`` table. ``on_table=False`` is the example's
  ``where`` (the Linear's weight replaced by the table: the param is the Embedding's),
  ``on_table=True`` the other way (the table replaced by the Linear's weight)."""
  shared: eqx.nn.Shared
  mid: eqx.nn.Linear

  def __init__(self, key, on_table):
    k = jax.random.split(key, 3)
    emb = eqx.nn.Embedding(9, 3, key=k[0], dtype=jnp.float64)
    out = eqx.nn.Linear(3, 9, use_bias=False, key=k[1], dtype=jnp.float64)
    if on_table:
      where, get = (lambda p: p[0].weight), (lambda p: p[1].weight)
    else:
      where, get = (lambda p: p[1].weight), (lambda p: p[0].weight)
    self.shared = eqx.nn.Shared((emb, out), where=where, get=get)
    self.mid = eqx.nn.Linear(3, 3, key=k[2], dtype=jnp.float64)

  def __call__(self, tokens):  # one sequence (T,) -> next-token log-likelihoods
    emb, out = self.shared()
    h = jnp.tanh(jax.vmap(self.mid)(jax.vmap(emb)(tokens)))
    logp = jax.nn.log_softmax(jax.vmap(out)(h))
    return jnp.take_along_axis(logp[:-1], tokens[1:, None], axis=-1)


def _lm_loss(model, tokens):
  return -jnp.sum(jax.vmap(model)(tokens))


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
@pytest.mark.parametrize("on_table", [False, True])
def test_shared_lm_tie_factors_and_step_against_numpy(on_table):
  """The documented ``eqx.nn.Shared`` language model, ``fisher={path: "tied"}`` at the path of
  the tied param (the Embedding's, or the Linear's when the tie's ``where`` is the table).
  Factors from a numpy forward pass: the lookup's token frequencies ``f`` and the readout's
  ``G_h = H^T H / n`` over its inputs; one step is ``(diag(f) + rho_D I)^{-1} g_E (G_h +
  rho_G I)^{-1}`` of the summed gradient of both uses. ``on_table`` used to be refused
  ('tied' for a Linear) and warned that the table was read outside its lookup (sngd's own
  read of ``where``); without 'tied' ``update`` raised ``KeyError: 'embed'``."""
  model = SharedLM(KEYS[7], on_table)
  tokens = jnp.array([[1, 4, 4, 0, 2], [4, 1, 2, 7, 7]])
  path = "shared/pytree/1" if on_table else "shared/pytree/0"
  leaf = lambda t: t.shared.pytree[1 if on_table else 0].weight
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # before (on_table): sngd's own read of `where` warned
    warnings.filterwarnings("ignore", message="sngd: fisher='tied' with max_norm=None")
    grads, updates, acts = _one_update(_lm_loss, model, tokens, fisher={path: "tied"})
  assert set(acts) == {path, "mid"}
  e, ids = np64(leaf(model)), np.asarray(tokens).ravel()
  x = e[ids]
  h = np.tanh(x @ np64(model.mid.weight).T + np64(model.mid.bias))
  freq = np.bincount(ids, minlength=9) / ids.size
  g_h = np.einsum("ni,nj->ij", h, h) / h.shape[0]
  params = eqx.filter(model, eqx.is_inexact_array)
  state = factors_after_one_step(params, grads, acts, fisher={path: "tied"})
  np.testing.assert_allclose(np64(state.factors[path]), freq, rtol=1e-12)
  np.testing.assert_allclose(np64(state.factors[path + "[attend]"]), g_h, rtol=1e-10)
  g_e = np64(leaf(grads))
  rows = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  expect = np.linalg.solve(g_h + ref.DAMPING * np.trace(g_h) * np.eye(3), rows.T).T
  np.testing.assert_allclose(np64(leaf(updates)), expect, rtol=1e-9)
  _check_linear(x, grads.mid, updates.mid, "mid")
  report = sngd_jax.coverage(_lm_loss, model, tokens, fisher={path: "tied"})
  row = {r.path: r for r in report.params}[path + "/weight"]
  assert row.fisher == "tied: diagonal/embed 9 + linear/attend 3x3"
  # without 'tied': coverage and update name the layer and the fix
  report = sngd_jax.coverage(_lm_loss, model, tokens)
  row = {r.path: r for r in report.params}[path + "/weight"]
  assert row.fisher.startswith("MISSING") and f"fisher={{{path!r}: 'tied'}}" in row.fisher
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match=re.escape(f"fisher={{{path!r}: 'tied'}}")):
    tx.update(grads, tx.init(params), params, activations=acts)


class TransposedTable(eqx.Module):
  """An Embedding table ``E (V, D)`` tied transposed to a ``Linear(V, D)`` (``get`` returns
  ``E^T``, as in the side note of ``eqx.nn.Shared``'s docs): the Linear's inputs index the
  table's rows, as the lookup's ids do."""
  shared: eqx.nn.Shared

  def __init__(self, key):
    k = jax.random.split(key, 2)
    emb = eqx.nn.Embedding(5, 3, key=k[0], dtype=jnp.float64)
    lin = eqx.nn.Linear(5, 3, use_bias=False, key=k[1], dtype=jnp.float64)
    self.shared = eqx.nn.Shared((emb, lin), where=lambda p: p[1].weight,
                                get=lambda p: jnp.transpose(p[0].weight))

  def __call__(self, token):
    emb, lin = self.shared()
    return jnp.sum(jnp.sin(emb(token) + lin(jax.nn.one_hot(token + 1, 5) * 2.0)))


def test_a_transposed_shared_table_is_an_error_that_names_it():
  """``E^T`` read by a Linear: neither ``diag(f)`` nor 'tied' models that use (its factor on
  the table's rows is not diagonal). ``update`` (tied or not) and ``coverage`` name the table
  and the fixes; ``fisher={path: None}`` passes the gradient through. Before: a capture
  warning only, then ``update`` applied the lookup's ``diag(f)`` to the summed gradient, and
  coverage listed the table as 'diagonal/embed 5'."""
  model = TransposedTable(KEYS[2])
  tokens = jnp.array([0, 3, 3, 1])
  loss = lambda m, t: jnp.sum(jax.vmap(m)(t))
  path = "shared/pytree/0"
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
      model, tokens)
  params = eqx.filter(model, eqx.is_inexact_array)
  for fisher in ("linear", {path: "tied"}):
    tx = sngd_jax.sngd(fisher=fisher)
    with pytest.raises(ValueError, match=r"embedding 'shared/pytree/0' is also read "
                       r"transposed by a Linear.*fisher=\{'shared/pytree/0': None\}"):
      tx.update(grads, tx.init(params), params, activations=acts)
    row = {r.path: r for r in sngd_jax.coverage(loss, model, tokens, fisher=fisher).params}[
        path + "/weight"]
    assert row.fisher.startswith("MISSING: also read transposed by a Linear"), row.fisher
    assert f"fisher={{{path!r}: None}}" in row.fisher
  tx = sngd_jax.sngd(fisher={path: None})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates.shared.pytree[0].weight, grads.shared.pytree[0].weight)


def test_a_table_that_is_a_linears_weight_transposed_pools_the_lookups_as_one_hot_rows():
  """``eqx.nn.Shared`` putting a ``Linear(V, D)``'s weight ``W (D, V)`` transposed in an
  ``Embedding`` (``where`` on the table, ``get`` transposing ``W``): a lookup of id ``v`` is
  that Linear's call on the one-hot ``e_v``, so ``W``'s local Fisher pools the Linear's inputs
  and the lookups' one-hot rows, ``G = (X^T X + E^T E) / n``, applied to the summed gradient.
  Before: a warning, and the Linear's inputs alone (``coverage`` said 'linear/dense')."""
  k = jax.random.split(KEYS[2], 2)
  emb = eqx.nn.Embedding(5, 3, key=k[0], dtype=jnp.float64)
  lin = eqx.nn.Linear(5, 3, use_bias=False, key=k[1], dtype=jnp.float64)
  model = eqx.nn.Shared((emb, lin), where=lambda p: p[0].weight,
                        get=lambda p: jnp.transpose(p[1].weight))

  def loss(shared, tokens, x):
    emb, lin = shared()
    return jnp.sum(jnp.sin(jax.vmap(emb)(tokens) * jax.vmap(lin)(x)))

  tokens = jnp.array([0, 3, 3, 1, 4, 3])
  x = jax.random.normal(KEYS[3], (6, 5), jnp.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # before: 'a Embedding reads a copy of param ...'
    grads, updates, acts = _one_update(loss, model, tokens, x)
  assert set(acts) == {"pytree/1"} and len(acts["pytree/1"]) == 2
  rows = np.concatenate([np.eye(5)[np.asarray(tokens)], np64(x)])
  _check_linear(rows, grads.pytree[1], updates.pytree[1], "pytree/1", bias=None)
  params = eqx.filter(model, eqx.is_inexact_array)
  state = factors_after_one_step(params, grads, acts)
  np.testing.assert_allclose(np64(state.factors["pytree/1"]),
                             ref.linear_factor(rows, bias=False), rtol=1e-12)


class SharedLinear(eqx.Module):
  """Two Linear layers with one weight (``eqx.nn.Shared`` ties the weight alone): ``first``
  with ``bias_first`` or bias-free, ``second`` with its own bias."""
  shared: eqx.nn.Shared

  def __init__(self, key, bias_first):
    k = jax.random.split(key, 2)
    first = eqx.nn.Linear(3, 3, use_bias=bias_first, key=k[0], dtype=jnp.float64)
    second = eqx.nn.Linear(3, 3, key=k[1], dtype=jnp.float64)
    self.shared = eqx.nn.Shared((first, second), where=lambda p: p[1].weight,
                                get=lambda p: p[0].weight)

  def __call__(self, x):
    first, second = self.shared()
    return second(jnp.tanh(first(x)))


def _shared_linear_loss(model, x):
  return jnp.sum(jnp.sin(jax.vmap(model)(x)))


def test_a_weight_shared_by_two_linears_pools_both_calls():
  """``eqx.nn.Shared`` tying the weights of two Linear layers, the first bias-free: the
  weight's local Fisher pools the inputs of both calls, ``G = (X_1^T X_1 + X_2^T X_2) / 2n``,
  applied to the sum of both uses' gradients; the second layer's own bias passes through."""
  model = SharedLinear(KEYS[3], bias_first=False)
  x = jax.random.normal(KEYS[4], (7, 3), jnp.float64)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    grads, updates, acts = _one_update(_shared_linear_loss, model, x)
  assert set(acts) == {"shared/pytree/0"} and len(acts["shared/pytree/0"]) == 2
  w = np64(model.shared.pytree[0].weight)
  h = np.tanh(np64(x) @ w.T)
  _check_linear(np.concatenate([np64(x), h]), grads.shared.pytree[0],
                updates.shared.pytree[0], "shared weight", bias=None)
  np.testing.assert_array_equal(np64(updates.shared.pytree[1].bias),
                                np64(grads.shared.pytree[1].bias))


def test_a_shared_weight_read_with_another_bias_warns_with_the_fix():
  """Both Linear layers with a bias: the second call's rows pool into the first layer's
  factor as ``[x; 1]``, though the first layer's bias has no part in that call. Capture
  says so, naming the layer and the fixes (before: silent)."""
  model = SharedLinear(KEYS[3], bias_first=True)
  x = jax.random.normal(KEYS[4], (7, 3), jnp.float64)
  with pytest.warns(UserWarning, match=r"weight of layer 'shared/pytree/0' is also read by a "
                    r"module with its own bias 'shared/pytree/1/bias'.*Tie the biases too.*"
                    r"fisher=\{'shared/pytree/0': None\}"):
    sngd_jax.capture_eqx(_shared_linear_loss)(model, x)


class TiedAutoencoder(eqx.Module):
  """The decoder's weight is the encoder's transposed, through ``eqx.nn.Shared``'s ``get``
  (the transpose Equinox's documentation shows)."""
  shared: eqx.nn.Shared

  def __init__(self, key):
    k = jax.random.split(key, 2)
    enc = eqx.nn.Linear(4, 2, key=k[0], dtype=jnp.float64)
    dec = eqx.nn.Linear(2, 4, use_bias=False, key=k[1], dtype=jnp.float64)
    self.shared = eqx.nn.Shared((enc, dec), where=lambda p: p[1].weight,
                                get=lambda p: jnp.transpose(p[0].weight))

  def __call__(self, x):
    enc, dec = self.shared()
    return dec(jnp.tanh(enc(x)))


def test_a_transposed_shared_weight_warns_naming_the_param_and_the_fix():
  """The decoder's use of the transposed weight is not captured: capture names the param and
  ``fisher={layer: None}`` (it used to say it could not name a ``Linear (weight (4, 2))``
  and that ``update`` would report the layer as not captured, which it did not: the
  encoder's own calls are the factor). The update is that factor's damped solve of both
  uses' summed gradient; with the fix the weight passes through."""
  model = TiedAutoencoder(KEYS[5])
  x = jax.random.normal(KEYS[6], (9, 4), jnp.float64)
  loss = lambda m, x: jnp.sum((jax.vmap(m)(x) - x) ** 2)
  with pytest.warns(UserWarning) as record:
    grads, updates, acts = _one_update(loss, model, x)
  messages = [str(w.message) for w in record]
  assert not any("could not name" in m for m in messages), messages
  assert any("reads a copy of param 'shared/pytree/0/weight' that the `get` of an "
             "`eqx.nn.Shared` computes" in m
             and "`fisher={'shared/pytree/0': None}`" in m for m in messages), messages
  assert set(acts) == {"shared/pytree/0"} and len(acts["shared/pytree/0"]) == 1
  _check_linear(np64(x), grads.shared.pytree[0], updates.shared.pytree[0], "encoder")
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.sngd(fisher={"shared/pytree/0": None})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates.shared.pytree[0].weight, grads.shared.pytree[0].weight)


class Named(eqx.Module):
  lin: eqx.nn.Linear
  name: str

  def __call__(self, x):
    return self.lin(x)


def test_a_transposed_shared_weight_tied_with_a_non_array_field():
  """``Shared`` tying a computed weight together with a field that is no array (a name): the
  param is found from the array leaves of ``get`` (it used to crash in ``make_jaxpr``, which
  returns no string)."""
  k = jax.random.split(KEYS[5], 2)
  pair = (Named(eqx.nn.Linear(4, 2, key=k[0], dtype=jnp.float64), "enc"),
          Named(eqx.nn.Linear(2, 4, use_bias=False, key=k[1], dtype=jnp.float64), "dec"))
  shared = eqx.nn.Shared(pair, where=lambda p: (p[1].lin.weight, p[1].name),
                         get=lambda p: (p[0].lin.weight.T, "dec"))

  def loss(shared, x):
    enc, dec = shared()
    return jnp.sum(jax.vmap(lambda v: dec(jnp.tanh(enc(v))))(x))

  with pytest.warns(UserWarning, match=r"reads a copy of param 'pytree/0/lin/weight'"):
    _, acts = sngd_jax.capture_eqx(loss)(shared, jnp.ones((3, 4), jnp.float64))
  assert set(acts) == {"pytree/0/lin"}


def test_frozen_half_of_eqx_partition_is_left_out_without_a_warning():
  """Equinox's way to freeze layers: ``eqx.partition`` with a filter spec, the trained half
  differentiated, the frozen half passed as the loss's second argument. The frozen layers'
  calls are not the trained model's: they are left out without a warning (it said they were
  not captured and that ``update`` would report them, which it does not), and the trained last
  layer gets the float64 reference update on the frozen layers' features."""
  model = eqx.nn.MLP(4, 3, 6, 2, key=KEYS[0], dtype=jnp.float64)
  x = jax.random.normal(KEYS[1], (10, 4), jnp.float64)
  spec = jax.tree.map(lambda _: False, model)
  spec = eqx.tree_at(lambda m: (m.layers[2].weight, m.layers[2].bias), spec,
                     replace=(True, True))
  trained, frozen = eqx.partition(model, spec)

  def loss(trained, frozen, x):
    return jnp.sum(jnp.sin(jax.vmap(eqx.combine(trained, frozen))(x)))

  tx = exact_sngd(**ref.one_step_kwargs())

  @eqx.filter_jit
  def step(trained, frozen, x):
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
        trained, frozen, x)
    updates, _ = tx.update(grads, tx.init(trained), trained, activations=acts)
    return grads, updates, acts

  with warnings.catch_warnings():
    warnings.simplefilter("error")  # before: "capture_eqx could not name 2 layer call(s)"
    grads, updates, acts = step(trained, frozen, x)
  assert set(acts) == {"layers/2"}
  h = np64(x)
  for layer in model.layers[:2]:
    h = np.maximum(h @ np64(layer.weight).T + np64(layer.bias), 0.0)
  _check_linear(h, grads.layers[2], updates.layers[2], "layers/2")
  assert updates.layers[0].weight is None and updates.layers[1].bias is None
  # the frozen half closed over by the loss: capture cannot tell it apart, and says so
  closed = lambda trained, x: loss(trained, frozen, x)
  with pytest.warns(UserWarning, match=r"could not name 2 layer call\(s\).*frozen half of "
                    r"`eqx.partition` that the loss closes over are harmless"):
    _, acts = sngd_jax.capture_eqx(closed)(trained, x)
  assert set(acts) == {"layers/2"}


def test_a_jit_inside_the_captured_function_warns():
  """A model passed through a jit inside the loss has weights capture cannot name."""
  model = eqx.nn.MLP(3, 2, 4, 1, key=KEYS[1], dtype=jnp.float64)
  forward = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))
  loss = lambda m, x: jnp.sum(forward(m, x))
  with pytest.warns(UserWarning, match=r"could not name 2 layer call\(s\).*eqx.filter_jit"):
    _, acts = sngd_jax.capture_eqx(loss)(model, jnp.ones((5, 3)))
  assert not acts


@pytest.mark.parametrize("wrapper", ["WeightNorm", "SpectralNorm"])
def test_a_reparametrized_weight_warns_naming_the_layer(wrapper):
  """``eqx.nn.WeightNorm`` / ``SpectralNorm`` call the Linear with a weight computed from its
  param: not captured. The warning names the layer by the path of its bias (it said
  ``Linear (weight (4, 3))``), and ``update`` raises naming it until ``fisher={path: None}``,
  which passes its gradient through; the head gets its float64 reference update."""
  inner = eqx.nn.Linear(3, 4, key=KEYS[0], dtype=jnp.float64)
  if wrapper == "WeightNorm":
    layer, state = eqx.nn.WeightNorm(inner), None
  else:
    layer, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(inner, "weight", key=KEYS[2])
  model = (layer, eqx.nn.Linear(4, 2, key=KEYS[1], dtype=jnp.float64))
  x = jax.random.normal(KEYS[3], (5, 3), jnp.float64)

  def hidden(m, v):
    # a fresh copy of the state for each call: an Equinox State is used up by a call
    return m[0](v) if state is None else m[0](v, jax.tree.map(lambda a: a, state))[0]

  def loss(m, x):
    return jnp.sum(jnp.sin(jax.vmap(lambda v: m[1](jnp.tanh(hidden(m, v))))(x)))

  with pytest.warns(UserWarning, match=r"could not name 1 layer call\(s\) \(Linear "
                    r"'0/layer' \(weight \(4, 3\)\)\).*eqx.nn.WeightNorm"):
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
        model, x)
  params = eqx.filter(model, eqx.is_inexact_array)
  with pytest.raises(ValueError, match=r"no activations were captured for layer '0/layer'"):
    sngd_jax.sngd().update(grads, sngd_jax.sngd().init(params), params, activations=acts)
  tx = exact_sngd(**ref.one_step_kwargs(), fisher={"0/layer": None})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates[0].layer.weight, grads[0].layer.weight)
  h = np.tanh(np64(jax.vmap(lambda v: hidden(model, v))(x)))
  _check_linear(h, grads[1], updates[1], "head")


def test_group_norm_and_batch_norm():
  gn = eqx.nn.GroupNorm(2, 4, dtype=jnp.float64)
  bn = eqx.nn.BatchNorm(4, axis_name="batch", mode="batch", dtype=jnp.float64)
  state = eqx.nn.State(bn)
  x = jax.random.normal(KEYS[7], (6, 4, 3), jnp.float64) * 2.0 + 1.0

  def loss(model, x):
    gn, bn = model
    h = jax.vmap(gn)(x)
    out, _ = jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(h, state)
    return jnp.sum(jnp.sin(3.0 * out))

  grads, updates, _ = _one_update(loss, (gn, bn), x)
  xn = np64(x).reshape(6, 2, 6)
  xhat_gn = ((xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-5))
  xhat_gn = xhat_gn.reshape(6, 4, 3)
  rows = lambda a: np.moveaxis(a, 1, -1).reshape(-1, 4)
  for layer, xhat in ((0, xhat_gn), (1, (xhat_gn - xhat_gn.mean((0, 2), keepdims=True))
                                      / np.sqrt(xhat_gn.var((0, 2), keepdims=True) + 1e-5))):
    s, b = ref.channel_update(rows(xhat), np64(grads[layer].weight), np64(grads[layer].bias))
    np.testing.assert_allclose(np64(updates[layer].weight), s, rtol=1e-7, err_msg=str(layer))
    np.testing.assert_allclose(np64(updates[layer].bias), b, rtol=1e-7, err_msg=str(layer))


def test_multihead_attention_projections():
  mha = eqx.nn.MultiheadAttention(2, 4, key=KEYS[0], dtype=jnp.float64, use_query_bias=True,
                                  use_key_bias=True, use_value_bias=True,
                                  use_output_bias=True)
  x = jax.random.normal(KEYS[1], (3, 5, 4), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(lambda s: m(s, s, s))(x)))
  grads, updates, acts = _one_update(loss, mha, x)
  assert set(acts) == {"query_proj", "key_proj", "value_proj", "output_proj"}
  rows = np64(x).reshape(-1, 4)
  for name in ("query_proj", "key_proj", "value_proj"):
    _check_linear(rows, getattr(grads, name), getattr(updates, name), name)
  assert acts["output_proj"][0].inputs.shape == (3, 5, 4)  # (batch, tokens, heads * head dim)


# --- stacked layers: made by filter_vmap, applied by lax.scan ------------------------------

L, D = 3, 4


class Stack(eqx.Module):
  blocks: eqx.nn.Linear
  head: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, L + 1)
    self.blocks = eqx.filter_vmap(lambda k: eqx.nn.Linear(D, D, key=k))(keys[:L])
    self.head = eqx.nn.Linear(D, 2, key=keys[L])

  def __call__(self, x):
    params, static = eqx.partition(self.blocks, eqx.is_array)

    def step(h, p):
      return h + jnp.tanh(eqx.combine(p, static)(h)), None
    return self.head(jax.lax.scan(step, x, params)[0])


class Unrolled(eqx.Module):
  blocks: tuple
  head: eqx.nn.Linear

  def __init__(self, stack):
    params, static = eqx.partition(stack.blocks, eqx.is_array)
    self.blocks = tuple(eqx.combine(jax.tree.map(lambda a, i=i: a[i], params), static)
                        for i in range(L))
    self.head = stack.head

  def __call__(self, x):
    for block in self.blocks:
      x = x + jnp.tanh(block(x))
    return self.head(x)


def _train(model, steps=10):
  x = jax.random.normal(KEYS[2], (8, D), jnp.float32)
  y = jax.random.normal(KEYS[3], (8, 2), jnp.float32)
  loss = lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)
  tx = sngd_jax.sngd_momentum(0.05, factor_every=2, inverse_every=3)
  state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def step(model, state):
    loss_and_acts = sngd_jax.capture_eqx(loss, outputs=True)
    (value, acts), grads = eqx.filter_value_and_grad(loss_and_acts, has_aux=True)(model, x, y)
    updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array),
                               activations=acts)
    return eqx.apply_updates(model, updates), state, value

  losses = []
  for _ in range(steps):
    model, state, value = step(model, state)
    losses.append(value)
  return model, np.asarray(losses)


def test_stacked_layers_scanned_over_train_like_unrolled():
  with jax.enable_x64(False):
    stack = Stack(KEYS[4])
    assert stack.blocks.weight.shape == (L, D, D)
    spec = sngd_jax.discover(eqx.filter(stack, eqx.is_inexact_array))["blocks"]
    assert spec.stack == (L,) and spec.factor_shape == (L, D + 1, D + 1)
    trained, l_stack = _train(stack)
    unrolled, l_unrolled = _train(Unrolled(stack))
  np.testing.assert_allclose(l_stack, l_unrolled, rtol=2e-5)
  assert l_stack[-1] < 0.7 * l_stack[0]
  for i in range(L):
    np.testing.assert_allclose(trained.blocks.weight[i], unrolled.blocks[i].weight, rtol=2e-5,
                               atol=1e-6)


def test_coverage_lists_every_layer():
  model = Tokens(KEYS[6])
  tokens = jnp.array([[1, 4], [8, 1]])
  report = sngd_jax.coverage(lambda m, t: jnp.sum(jax.vmap(jax.vmap(m))(t)), model, tokens)
  assert report.missing == [] and report.pass_through == []
  assert "emb/weight" in report.preconditioned and "out/weight" in report.preconditioned
  assert "diagonal/embed 9" in str(report) and "per-channel/norm 4x2x2" in str(report)


def test_sgd_momentum_training_loss_falls():
  """The documented loop: filter_value_and_grad, init on the inexact arrays, apply_updates."""
  with jax.enable_x64(False):
    model = eqx.nn.MLP(4, 2, 16, 2, key=KEYS[0])
    x = jax.random.normal(KEYS[1], (64, 4))
    y = jnp.sin(x[:, :2] * 2.0)
    loss = lambda m, x, y: jnp.mean((jax.vmap(m)(x) - y) ** 2)
    tx = optax.chain(sngd_jax.sngd(), optax.sgd(0.05, momentum=0.9))
    state = tx.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
      (value, acts), grads = eqx.filter_value_and_grad(
          sngd_jax.capture_eqx(loss, outputs=True), has_aux=True)(model, x, y)
      updates, state = tx.update(grads, state, eqx.filter(model, eqx.is_inexact_array),
                                 activations=acts)
      return eqx.apply_updates(model, updates), state, value

    first = None
    for _ in range(40):
      model, state, value = step(model, state)
      first = value if first is None else first
    assert float(value) < 0.3 * float(first)


def test_a_stacked_embedding_table_is_refused_with_the_fix():
  """Tables made by filter_vmap (an ensemble) are not modelled: init raises, coverage says
  MISSING, both naming the path and the fix (they used to pass through silently)."""
  tables = eqx.filter_vmap(lambda k: eqx.nn.Embedding(5, 3, key=k, dtype=jnp.float64))(
      jax.random.split(KEYS[2], 2))
  model = (tables, eqx.nn.Linear(3, 2, key=KEYS[3], dtype=jnp.float64))
  params = eqx.filter(model, eqx.is_inexact_array)
  with pytest.raises(ValueError, match=r"layer '0': an embedding table of shape \(2, 5, 3\) "
                                       r"has 1 leading stack axis.*fisher=\{'0': None\}"):
    sngd_jax.sngd().init(params)

  def loss(model, tokens):
    tables, head = model
    h = eqx.filter_vmap(lambda t, tok: jax.vmap(t)(tok))(tables, tokens)
    return jnp.sum(jax.vmap(jax.vmap(head))(h))

  tokens = jnp.array([[0, 1, 1], [4, 4, 2]])
  report = sngd_jax.coverage(loss, model, tokens)
  row = {r.path: r.fisher for r in report.params}["0/weight"]
  assert row.startswith("MISSING: an embedding table") and "fisher={'0': None}" in row
  tx = sngd_jax.sngd(fisher={"0": None})   # the fix: the table passes through
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
      model, tokens)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates[0].weight, grads[0].weight)
