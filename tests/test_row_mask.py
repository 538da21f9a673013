"""Row masks (``sngd_jax.with_row_mask``): padding does not enter the statistics.

Every factor is compared with a float64 numpy reference computed from the real rows only
(``np_reference``), and every test also checks that the padded batch without the mask gives
something else, so that it fails without mask support.
"""

import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import factors_after_one_step
from flax import nnx
from np_reference import ONE_STEP, PAD, f64, gram

import sngd_jax
from sngd_jax._src import statistics

pytestmark = pytest.mark.usefixtures("x64")

V, D, H = 11, 5, 6


class LM(nn.Module):
  """Embedding -> Dense -> relu -> Dense, on (B, T) tokens."""

  @nn.compact
  def __call__(self, tokens):
    e = nn.Embed(V, D)(tokens)
    h = nn.relu(nn.Dense(H)(e))
    return nn.Dense(V)(h)


TOKENS = np.array([[3, 4, 5, 0, 0], [6, 7, 0, 0, 0], [1, 2, 3, 4, 9], [8, 0, 0, 0, 0]])


def lm_problem():
  model = LM()
  tokens = jnp.asarray(TOKENS)
  params = f64(model.init(jax.random.key(0), tokens)["params"])
  mask = tokens != PAD

  def loss_fn(params, tokens):
    logits = model.apply({"params": params}, tokens)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return (loss * mask).sum() / mask.sum()

  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
      params, tokens)
  return model, params, tokens, mask, acts, grads


def test_token_mask_dense_factors_are_those_of_the_real_tokens():
  model, params, tokens, mask, acts, grads = lm_problem()
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  real = np.asarray(mask)
  e = np.asarray(params["Embed_0"]["embedding"])[TOKENS]
  h = np.maximum(e @ np.asarray(params["Dense_0"]["kernel"])
                 + np.asarray(params["Dense_0"]["bias"]), 0)
  np.testing.assert_allclose(state.factors["Dense_0"], gram(e[real]), rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(state.factors["Dense_1"], gram(h[real]), rtol=1e-10, atol=1e-12)
  assert int(state.num_skipped_steps) == 0
  unmasked = factors_after_one_step(params, grads, acts)  # padding rows counted
  assert not np.allclose(unmasked.factors["Dense_0"], gram(e[real]), rtol=1e-3)


def test_token_mask_embedding_counts_only_real_tokens():
  _, params, _, mask, acts, grads = lm_problem()
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  real = TOKENS[np.asarray(mask)]
  counts = np.bincount(real, minlength=V) / real.size
  np.testing.assert_allclose(state.factors["Embed_0"], counts, rtol=1e-12, atol=1e-15)
  assert float(state.factors["Embed_0"][PAD]) == 0.0
  unmasked = factors_after_one_step(params, grads, acts)
  assert float(unmasked.factors["Embed_0"][PAD]) > 0


def test_mask_shape_mismatch_names_the_layer_and_shapes():
  _, _, _, _, acts, _ = lm_problem()
  with pytest.raises(ValueError, match=r"layer 'Dense_0'.*\(4, 5, 5\).*\(4, 6\)"):
    sngd_jax.with_row_mask(acts, jnp.ones((4, 6)))
  with pytest.raises(ValueError, match=r"layer 'Dense_0'.*\(4, 5, 5\).*\(3,\).*length 4"):
    sngd_jax.with_row_mask(acts, jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"\(B,\).*\(B, T\).*\(B, T, T'\)"):
    sngd_jax.with_row_mask(acts, jnp.ones((4, 5, 1, 1)))
  # a mask of pairs of tokens (tests/test_gnn.py) on layers of tokens
  with pytest.raises(ValueError, match=r"layer '(Embed|Dense)_\d'.*pairs of tokens.*where="):
    sngd_jax.with_row_mask(acts, jnp.ones((4, 5, 1)))


def test_positions_embedding_without_batch_axis_raises_with_the_fix():
  class Pos(nn.Module):
    @nn.compact
    def __call__(self, tokens):
      x = nn.Embed(V, D)(tokens) + nn.Embed(tokens.shape[1], D)(jnp.arange(tokens.shape[1]))
      return nn.Dense(2)(x).sum()

  tokens = jnp.asarray(TOKENS)
  model = Pos()
  params = model.init(jax.random.key(0), tokens)["params"]
  _, acts = sngd_jax.capture(lambda p: model.apply({"params": p}, tokens))(params)
  with pytest.raises(ValueError, match=r"'Embed_1'.*broadcast_to\(jnp.arange"):
    sngd_jax.with_row_mask(acts, tokens != PAD)


# --- recurrent cells: time-major rows -----------------------------------------

class BiLSTM(nn.Module):
  keep_order: bool = True

  @nn.compact
  def __call__(self, x, seq_lengths=None):
    cell = lambda: nn.LSTMCell(H, param_dtype=jnp.float64, dtype=jnp.float64)
    f = nn.RNN(cell())(x)
    b = nn.RNN(cell(), reverse=True, keep_order=self.keep_order)(x, seq_lengths=seq_lengths)
    return (f ** 2).sum() + (b ** 2).sum()


LENGTHS = np.array([5, 2, 4])


@pytest.mark.parametrize("with_lengths,keep_order", [(False, True), (False, False),
                                                     (True, False)])
def test_lstm_under_rnn_time_major_rows_forward_and_reverse(with_lengths, keep_order):
  """Forward and reverse ``nn.RNN`` (time-major rows; a reverse RNN's steps are mapped back
  to the input's positions, ``keep_order`` or not)."""
  rng = np.random.default_rng(0)
  b, t, i = 3, 5, 2
  x = rng.normal(size=(b, t, i))
  mask = np.arange(t)[None] < LENGTHS[:, None]
  model = BiLSTM(keep_order=keep_order)
  seq = jnp.asarray(LENGTHS) if with_lengths else None
  params = f64(model.init(jax.random.key(1), jnp.asarray(x), seq)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: model.apply({"params": p}, jnp.asarray(x), seq)),
      has_aux=True)(params)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))

  fwd_prev, _ = ref.lstm_forward(params["LSTMCell_0"], x)
  if with_lengths:  # each sequence flipped within its own length (flax's flip_sequences)
    bwd_real = np.concatenate([ref.lstm_forward(params["LSTMCell_1"],
                                                x[k:k + 1, :n][:, ::-1])[0][0]
                               for k, n in enumerate(LENGTHS)])
  else:  # the whole time axis flipped: step s is position t - 1 - s
    bwd_prev, _ = ref.lstm_forward(params["LSTMCell_1"], x[:, ::-1])
    bwd_real = bwd_prev[:, ::-1][mask]
  for cell, h_rows in (("LSTMCell_0", fwd_prev[mask]), ("LSTMCell_1", bwd_real)):
    np.testing.assert_allclose(state.factors[f"{cell}/ii"],
                               ref.linear_factor(x[mask], bias=False), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(state.factors[f"{cell}/hi"], gram(h_rows), rtol=1e-10,
                               atol=1e-12)
  unmasked = factors_after_one_step(params, grads, acts)
  assert not np.allclose(unmasked.factors["LSTMCell_1/hi"], gram(bwd_real), rtol=1e-3)


# --- a batch padded to a fixed size: (B,) mask ---------------------------------

class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.LayerNorm()(x)
    return nn.Dense(3)(nn.tanh(nn.Dense(7)(x)))


def _mlp_update(params, x, y, weight, *, mask=None, rfim=False):
  """One sngd_momentum update through ``sngd_jax.TrainState`` (defaults otherwise)."""
  model = MLP()

  def loss_fn(p, x, y):
    lo = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
    return (lo * weight).sum() / weight.sum()

  fisher = "rfim" if rfim else "linear"
  tx = sngd_jax.sngd_momentum(0.1, momentum=0.9, fisher=fisher)
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

  @jax.jit
  def step(state, x, y):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=rfim),
                                          has_aux=True)(state.params, x, y)
    if mask is not None:
      acts = sngd_jax.with_row_mask(acts, mask)
    return state.apply_gradients(grads=grads, activations=acts)

  for _ in range(2):
    state = step(state, x, y)
  return state.params


@pytest.mark.parametrize("rfim", [False, True])
@pytest.mark.parametrize("dtype,rtol", [(jnp.float64, 1e-10), (jnp.float32, 1e-5)])
def test_example_mask_equals_the_unpadded_batch(dtype, rtol, rfim):
  rng = np.random.default_rng(2)
  real, pad = 6, 4
  x = rng.normal(size=(real + pad, 4)) * np.r_[np.ones(real), 30 * np.ones(pad)][:, None]
  y = rng.integers(0, 3, real + pad)
  mask = np.r_[np.ones(real), np.zeros(pad)]
  params = jax.tree.map(lambda a: a.astype(dtype),
                        MLP().init(jax.random.key(0), jnp.ones((1, 4)))["params"])
  with jax.enable_x64(dtype == jnp.float64):
    want = _mlp_update(params, jnp.asarray(x[:real], dtype), y[:real],
                       jnp.ones(real, dtype), rfim=rfim)
    got = _mlp_update(params, jnp.asarray(x, dtype), y, jnp.asarray(mask, dtype),
                      mask=jnp.asarray(mask > 0), rfim=rfim)
    no_mask = _mlp_update(params, jnp.asarray(x, dtype), y, jnp.asarray(mask, dtype),
                          rfim=rfim)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * 1e-2),
               got, want)
  assert not all(jax.tree.leaves(jax.tree.map(
      lambda a, b: np.allclose(a, b, rtol=1e-3), no_mask, want)))


def test_token_mask_nnx_optimizer_and_layer_norm():
  """NNX: a (B, T) mask through ``nnx.Optimizer.update``; a LayerNorm's per-channel moments
  and a Linear's factor from the real tokens only."""

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.norm = nnx.LayerNorm(4, rngs=rngs, param_dtype=jnp.float64)
      self.lin = nnx.Linear(4, 3, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
      return self.lin(self.norm(x))

  rng = np.random.default_rng(3)
  x = rng.normal(size=(3, 5, 4))
  mask = np.arange(5)[None] < LENGTHS[:, None]
  x[~mask] = 100.0 * rng.normal(size=(int((~mask).sum()), 4))  # padding far out of scale
  model = Net(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sngd_jax.sngd(**ONE_STEP), wrt=nnx.Param)

  def loss_fn(model, x):
    return ((model(x) ** 2).sum(-1) * mask).sum()

  xr = x[mask]
  xhat = (xr - xr.mean(-1, keepdims=True)) / np.sqrt(xr.var(-1, keepdims=True) + 1e-6)
  y = xhat * np.asarray(model.norm.scale[...]) + np.asarray(model.norm.bias[...])
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
      model, jnp.asarray(x))
  opt.update(model, grads, activations=sngd_jax.with_row_mask(acts, jnp.asarray(mask)))
  (state,) = sngd_jax._src.state.sngd_states(opt.opt_state)
  np.testing.assert_allclose(state.factors["lin"], gram(y), rtol=1e-8, atol=1e-10)
  want_norm = np.stack([gram(xhat[:, c:c + 1]) for c in range(4)])
  np.testing.assert_allclose(state.factors["norm"], want_norm, rtol=1e-8, atol=1e-10)


# --- dynamic zero, MultiSteps, sub-batches, Nystrom ------------------------------

class Seq2Seq(nn.Module):
  """An encoder over (B, S) sources and a decoder over (B, T) targets (S != T)."""

  @nn.compact
  def __call__(self, src, tgt):
    enc = nn.Dense(H, name="encoder")(src).mean(1, keepdims=True)
    return nn.Dense(2, name="decoder")(tgt + enc[..., :3])


def test_all_masked_layer_keeps_its_factor_and_the_step_is_taken():
  rng = np.random.default_rng(4)
  src, tgt = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 6, 3))
  model = Seq2Seq()
  params = f64(model.init(jax.random.key(0), src, tgt)["params"])
  loss = sngd_jax.capture(lambda p, s, t: model.apply({"params": p}, s, t).sum())
  tx = sngd_jax.sngd(**ONE_STEP, inverse_every=1)

  @jax.jit
  def step(state, src, tgt, src_mask, tgt_mask):
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params, src, tgt)
    acts = sngd_jax.with_row_mask(acts, src_mask, where=lambda p: p.startswith("encoder"))
    acts = sngd_jax.with_row_mask(acts, tgt_mask, where=lambda p: p.startswith("decoder"))
    return tx.update(grads, state, params, activations=acts)

  ones_s, ones_t = jnp.ones((2, 4)), jnp.ones((2, 6))
  _, s1 = step(tx.init(params), src, tgt, ones_s, ones_t)
  src2, tgt2 = rng.normal(size=(2, 4, 3)), rng.normal(size=(2, 6, 3))
  src_mask = jnp.asarray([[1, 1, 0, 0], [1, 0, 0, 0]])
  updates, s2 = step(s1, src2, tgt2, src_mask, jnp.zeros((2, 6)))
  np.testing.assert_array_equal(s2.factors["decoder"], s1.factors["decoder"])  # kept
  m = np.asarray(src_mask) > 0
  np.testing.assert_allclose(s2.factors["encoder"], gram(src2[m]), rtol=1e-10, atol=1e-12)
  assert int(s2.count) == 2 and int(s2.num_skipped_steps) == 0
  assert all(np.isfinite(u).all() for u in jax.tree.leaves(updates))
  assert np.abs(np.asarray(updates["decoder"]["kernel"])).sum() > 0


def test_multisteps_with_masks_equals_one_big_batch():
  model, params, tokens, mask, _, _ = lm_problem()
  rng = np.random.default_rng(5)
  tok2 = jnp.asarray(rng.integers(1, V, size=TOKENS.shape))
  mask2 = jnp.asarray(np.arange(5)[None] < np.array([5, 5, 1, 3])[:, None])
  capture = sngd_jax.capture(lambda p, t: model.apply({"params": p}, t).sum())

  def acts_grads(t, m):
    (_, acts), grads = jax.value_and_grad(capture, has_aux=True)(params, t)
    return sngd_jax.with_row_mask(acts, m), grads

  inner = sngd_jax.sngd(**ONE_STEP)
  tx = sngd_jax.MultiSteps(inner, every_k_schedule=2)
  state = tx.init(params)
  for t, m in ((tokens, mask), (tok2, mask2)):
    acts, grads = acts_grads(t, m)
    _, state = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
        grads, state, acts)
  got = state.inner_opt_state.factors
  acts, grads = acts_grads(jnp.concatenate([tokens, tok2]), jnp.concatenate([mask, mask2]))
  want = factors_after_one_step(params, grads, acts).factors
  for path in ("Dense_0", "Dense_1", "Embed_0"):
    np.testing.assert_allclose(got[path], want[path], rtol=1e-10, atol=1e-13)
  real = np.concatenate([TOKENS, np.asarray(tok2)])[np.concatenate([mask, mask2])]
  np.testing.assert_allclose(got["Embed_0"], np.bincount(real, minlength=V) / real.size,
                             rtol=1e-12)


def test_stats_batch_size_selects_the_mask_with_the_examples():
  _, params, _, mask, acts, grads = lm_problem()
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask),
                                 stats_batch_size=2)
  e = np.asarray(params["Embed_0"]["embedding"])[TOKENS[:2]]
  np.testing.assert_allclose(state.factors["Dense_0"], gram(e[np.asarray(mask)[:2]]),
                             rtol=1e-10, atol=1e-12)


def test_nystrom_sketch_is_that_of_the_real_rows():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(3, 5, 12))
  mask = np.arange(5)[None] < LENGTHS[:, None]
  x[~mask] *= 50
  model = nn.Dense(4)
  params = f64(model.init(jax.random.key(0), x)["params"])
  method = sngd_jax.inverse.auto(max_dim=8, rank=4)
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: model.apply({"params": p}, jnp.asarray(x)).sum()),
      has_aux=True)(params)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask),
                                 inverse=method)
  sketch = state.factors[""] if "" in state.factors else next(iter(state.factors.values()))
  assert sngd_jax._src.sketch.is_sketch(sketch)
  omega = np.asarray(method.sketch(13, jnp.float64))
  g = gram(x[mask])
  np.testing.assert_allclose(sketch.y, g @ omega, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(sketch.trace, np.trace(g), rtol=1e-12)


# --- convolutions, stacks over depth, data parallelism -----------------------------

@pytest.mark.parametrize("chunk_bytes", [None, 1, 400])
def test_conv1d_token_mask_per_output_position_and_2d_conv_refused(chunk_bytes, monkeypatch):
  """Also with the patch rows formed in chunks of examples (one loop; 400 bytes: a loop of 2
  chunks of 1 example and 1 example left over), each chunk with its examples' mask."""
  if chunk_bytes is not None:
    monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", chunk_bytes)
  rng = np.random.default_rng(7)
  b, t, c = 3, 5, 2
  x = rng.normal(size=(b, t, c))
  mask = np.arange(t)[None] < LENGTHS[:, None]
  conv = nn.Conv(4, kernel_size=(3,), padding="SAME")
  params = f64(conv.init(jax.random.key(0), x)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: conv.apply({"params": p}, jnp.asarray(x)).sum()),
      has_aux=True)(params)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  padded = np.pad(x, ((0, 0), (1, 1), (0, 0)))
  patches = np.stack([padded[:, s:s + 3].reshape(b, -1) for s in range(t)], 1)  # (b, t, 3c)
  (factor,) = state.factors.values()
  np.testing.assert_allclose(factor, gram(patches[mask]), rtol=1e-10, atol=1e-12)

  conv2d = nn.Conv(4, kernel_size=(3, 3), name="image")
  images = jnp.ones((3, 5, 5, 2))
  p2 = conv2d.init(jax.random.key(0), images)["params"]
  _, acts2 = sngd_jax.capture(lambda p: conv2d.apply({"params": p}, images).sum())(p2)
  with pytest.raises(ValueError, match=r"\(3, 5, 5, 2\).*\(3, 5\).*spatial axis"):
    sngd_jax.with_row_mask(acts2, mask)
  sngd_jax.with_row_mask(acts2, mask[:, 0])  # by example: fine


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.tanh(nn.Dense(x.shape[-1])(x)), None


class Deep(nn.Module):
  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
    return stack(name="blocks")(x, None)[0].sum()


@pytest.mark.parametrize("batch", [3, 2])
def test_layers_scanned_over_depth_get_the_mask_in_every_layer(batch):
  """A ``(B, T)`` padding mask on blocks scanned over depth (``L = 2``) is one mask for every
  block: each block's factor is the float64 Gram of its real tokens, without a warning also
  when the batch is as long as the stack (``B == L``: the mask's leading axis then matches the
  stack's, but its ``(T,)`` rest is no per-block mask of ``(B, T)`` rows)."""
  rng = np.random.default_rng(8)
  x = rng.normal(size=(batch, 5, 4))
  mask = np.arange(5)[None] < LENGTHS[:batch, None]
  model = Deep()
  params = f64(model.init(jax.random.key(0), x)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: model.apply({"params": p}, jnp.asarray(x))),
      has_aux=True)(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    masked = sngd_jax.with_row_mask(acts, mask)
  state = factors_after_one_step(params, grads, masked)
  dense = params["blocks"]["Dense_0"]
  h, want = x, []
  for layer in range(2):
    want.append(gram(h[mask]))
    h = np.tanh(h @ np.asarray(dense["kernel"][layer]) + np.asarray(dense["bias"][layer]))
  np.testing.assert_allclose(state.factors["blocks/Dense_0"], np.stack(want), rtol=1e-10,
                             atol=1e-12)


def test_a_padding_mask_as_long_as_the_scanned_stack_both_ways_warns_unless_per_layer_false():
  """``L == B == T``: a ``(B, T)`` padding mask of 2 blocks scanned over depth also reads as a
  ``(B,)`` mask per block, so without ``per_layer`` it warns naming the layer (read as one mask
  for all); ``per_layer=False`` is silent, and both give each block the float64 Gram of its
  real tokens."""
  rng = np.random.default_rng(9)
  x = rng.normal(size=(2, 2, 4))
  mask = np.array([[1.0, 1.0], [1.0, 0.0]])
  model = Deep()
  params = f64(model.init(jax.random.key(0), x)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: model.apply({"params": p}, jnp.asarray(x))),
      has_aux=True)(params)
  with pytest.warns(UserWarning, match=r"layer 'blocks/Dense_0'.*both.*per_layer=False"):
    warned = sngd_jax.with_row_mask(acts, mask)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    silent = sngd_jax.with_row_mask(acts, mask, per_layer=False)
  dense = params["blocks"]["Dense_0"]
  h, want = x, []
  for layer in range(2):
    want.append(gram(h[mask > 0]))
    h = np.tanh(h @ np.asarray(dense["kernel"][layer]) + np.asarray(dense["bias"][layer]))
  for masked in (warned, silent):
    state = factors_after_one_step(params, grads, masked)
    np.testing.assert_allclose(state.factors["blocks/Dense_0"], np.stack(want), rtol=1e-10,
                               atol=1e-12)


def test_axis_name_weighs_each_devices_estimate_by_its_real_rows():
  """Two shards (``jax.vmap`` with an axis name, as ``shard_map`` would split the batch) with
  different numbers of real tokens give the factor of the whole batch's real rows."""
  _, params, tokens, mask, acts, grads = lm_problem()
  tx = sngd_jax.sngd(**ONE_STEP, axis_name="data")
  state = tx.init(params)
  shard = lambda a: a.reshape((2, a.shape[0] // 2) + a.shape[1:])
  sharded_acts = jax.tree.map(shard, sngd_jax.with_row_mask(acts, mask))

  def step(acts):
    return tx.update(grads, state, params, activations=acts)[1]

  got = jax.vmap(step, axis_name="data")(sharded_acts)
  want = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  for path in ("Dense_0", "Dense_1", "Embed_0"):
    np.testing.assert_allclose(got.factors[path][0], want.factors[path], rtol=1e-10,
                               atol=1e-13)
    np.testing.assert_allclose(got.factors[path][1], want.factors[path], rtol=1e-10,
                               atol=1e-13)


def test_equinox_under_vmap_over_batch_and_tokens_and_scan_over_time():
  """Equinox: a Linear called per token under ``jax.vmap`` over the batch and the tokens, and
  a GRU cell under ``jax.lax.scan`` over time inside the vmap over the batch."""
  eqx = pytest.importorskip("equinox")
  rng = np.random.default_rng(9)
  x = rng.normal(size=(3, 5, 2))
  mask = np.arange(5)[None] < LENGTHS[:, None]
  key1, key2 = jax.random.split(jax.random.key(0))

  class Model(eqx.Module):
    lin: Any
    cell: Any

    def __init__(self):
      self.lin = eqx.nn.Linear(2, 3, key=key1, dtype=jnp.float64)
      self.cell = eqx.nn.GRUCell(2, 4, key=key2, dtype=jnp.float64)

    def __call__(self, xs):  # one sequence (T, 2)
      def step(h, x):
        h = self.cell(x, h)
        return h, h
      _, hs = jax.lax.scan(step, jnp.zeros(4), xs)
      return jax.vmap(self.lin)(xs).sum() + hs.sum()

  model = Model()
  params = eqx.filter(model, eqx.is_inexact_array)
  loss = sngd_jax.capture_eqx(lambda m, xs: jax.vmap(m)(xs).sum())
  (_, acts), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, jnp.asarray(x))
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  lin_path = next(p for p in state.factors if p.startswith("lin"))
  np.testing.assert_allclose(state.factors[lin_path], gram(x[mask]), rtol=1e-10, atol=1e-12)
  in_path = next(p for p in state.factors if p.startswith("cell/weight_ih"))
  np.testing.assert_allclose(state.factors[in_path], gram(x[mask]), rtol=1e-10, atol=1e-12)
  unmasked = factors_after_one_step(params, grads, acts)
  assert not np.allclose(unmasked.factors[lin_path], gram(x[mask]), rtol=1e-3)


def test_mask_each_micro_batch_inside_a_scan_over_micro_batches():
  """Accumulating inside one step: each micro-batch's activations masked in the scan body
  give the factors of one batch of all of them; masking after the scan raises."""
  model, params, tokens, mask, _, _ = lm_problem()
  capture = sngd_jax.capture(lambda p, t: model.apply({"params": p}, t).sum())
  grad_fn = jax.grad(capture, has_aux=True)

  def body(total, batch):
    t, m = batch
    grads, acts = grad_fn(params, t)
    return jax.tree.map(jnp.add, total, grads), sngd_jax.with_row_mask(acts, m)

  micro = (tokens.reshape(2, 2, -1), mask.reshape(2, 2, -1))
  grads, acts = jax.lax.scan(body, jax.tree.map(jnp.zeros_like, params), micro)
  got = factors_after_one_step(params, grads, acts).factors
  (_, big), big_grads = jax.value_and_grad(capture, has_aux=True)(params, tokens)
  want = factors_after_one_step(params, big_grads, sngd_jax.with_row_mask(big, mask)).factors
  for path in ("Dense_0", "Dense_1", "Embed_0"):
    np.testing.assert_allclose(got[path], want[path], rtol=1e-10, atol=1e-13)
  _, unmasked = jax.lax.scan(lambda c, b: (c, grad_fn(params, b)[1]), 0, micro[0])
  with pytest.raises(ValueError, match=r"'Dense_0'.*inside the scan"):
    sngd_jax.with_row_mask(unmasked, mask)


def test_token_mask_on_a_layer_after_pooling_counts_examples_with_a_real_token():
  rng = np.random.default_rng(10)
  x = rng.normal(size=(4, 5, 3))
  mask = np.arange(5)[None] < np.array([5, 0, 2, 0])[:, None]  # examples 1 and 3: all padding
  head = nn.Dense(2)
  pooled = x.mean(1)
  params = f64(head.init(jax.random.key(0), pooled)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: head.apply({"params": p}, jnp.asarray(x).mean(1)).sum()),
      has_aux=True)(params)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  (factor,) = state.factors.values()
  np.testing.assert_allclose(factor, gram(pooled[[0, 2]]), rtol=1e-10, atol=1e-12)


def test_time_major_rnn_cell_takes_the_batch_major_mask():
  rng = np.random.default_rng(11)
  x = rng.normal(size=(5, 3, 2))  # (T, B, I)
  mask = np.arange(5)[None] < LENGTHS[:, None]  # (B, T)
  rnn = nn.RNN(nn.SimpleCell(4, param_dtype=jnp.float64, dtype=jnp.float64), time_major=True)
  params = f64(rnn.init(jax.random.key(0), x)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: rnn.apply({"params": p}, jnp.asarray(x)).sum()),
      has_aux=True)(params)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
  inputs = next(p for p in state.factors if p.endswith("/i"))
  real = np.swapaxes(x, 0, 1)[mask]  # the input of example b at time t where it is real
  np.testing.assert_allclose(state.factors[inputs], ref.linear_factor(real, bias=False)
                             if state.factors[inputs].shape[-1] == 2 else gram(real),
                             rtol=1e-10, atol=1e-12)


def test_mask_passes_through_inject_hyperparams_and_chain():
  _, params, _, mask, acts, grads = lm_problem()
  masked = sngd_jax.with_row_mask(acts, mask)
  plain = sngd_jax.sngd_momentum(0.1, momentum=0.9)
  injected = optax.inject_hyperparams(sngd_jax.sngd_momentum)(learning_rate=0.1, momentum=0.9)
  want, _ = plain.update(grads, plain.init(params), params, activations=masked)
  got, _ = injected.update(grads, injected.init(params), params, activations=masked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), got, want)
  unmasked, _ = plain.update(grads, plain.init(params), params, activations=acts)
  assert not np.allclose(unmasked["Dense_0"]["kernel"], want["Dense_0"]["kernel"], rtol=1e-3)


def test_per_head_layers_with_as_many_heads_as_tokens_take_the_token_mask_without_warning():
  """Layers on per-head ``(B, T, H, head_dim)`` inputs with ``H == T`` (the query/key
  LayerNorms of attention with ``normalize_qk=True``, a ``DenseGeneral`` on each head's query)
  are no pairs of tokens: no pair-mask warning, and each head's row weighs its token's mask."""
  heads, hd, t = 4, 3, 4

  class PerHead(nn.Module):
    @nn.compact
    def __call__(self, x):
      q = nn.DenseGeneral((heads, hd), name="q")(x)                       # (B, T, H, hd)
      y = nn.DenseGeneral(2, axis=-1, name="per_head")(q)                  # rows (b, t, h)
      a = nn.MultiHeadDotProductAttention(heads, qkv_features=heads * hd, normalize_qk=True,
                                          name="attn")(x)
      return y.sum() + (a ** 2).sum()

  rng = np.random.default_rng(12)
  x = rng.normal(size=(3, t, 5))
  mask = np.arange(t)[None] < np.array([4, 2, 1])[:, None]
  model = PerHead()
  params = f64(model.init(jax.random.key(0), x)["params"])
  (_, acts), grads = jax.value_and_grad(
      sngd_jax.capture(lambda p: model.apply({"params": p}, jnp.asarray(x))), has_aux=True)(
          params)
  with warnings.catch_warnings():
    warnings.filterwarnings("error", message="sngd:")
    masked = sngd_jax.with_row_mask(acts, mask)
  state = factors_after_one_step(params, grads, masked)
  _, inter = model.apply({"params": params}, jnp.asarray(x), capture_intermediates=True,
                         mutable=["intermediates"])

  def out(*path):
    tree = inter["intermediates"]
    for k in path:
      tree = tree[k]
    return np.asarray(tree["__call__"][0], np.float64)

  q_rows = out("q")[mask].reshape(-1, hd)                                  # real tokens' heads
  np.testing.assert_allclose(state.factors["per_head"], gram(q_rows), rtol=1e-10, atol=1e-12)
  query = out("attn", "query")[mask].reshape(-1, hd)
  xhat = (query - query.mean(-1, keepdims=True)) / np.sqrt(query.var(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(state.factors["attn/query_ln"]).reshape(hd, -1),
                             (xhat ** 2).mean(0)[:, None], rtol=1e-10, atol=1e-12)
  unmasked = factors_after_one_step(params, grads, acts)
  assert not np.allclose(unmasked.factors["per_head"], gram(q_rows), rtol=1e-3)
