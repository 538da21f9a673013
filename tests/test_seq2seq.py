"""An encoder-decoder transformer (Flax's ``examples/wmt`` in miniature), as users write it.

One token table shared by the source lookup, the target lookup and the output logits
(``embed.attend``, ``fisher={path: "tied"}``), encoder self-attention, decoder causal
self-attention, cross-attention over a source of another length
(``MultiHeadDotProductAttention(inputs_q, inputs_k, inputs_v)``: flax 0.12 deprecates
``inputs_kv``), padding id 0 on both sides, a label-smoothed loss returning
``(loss, logits)``, dropout, ``sngd_jax.TrainState`` and cached autoregressive decoding
(``decode=True``, ``mutable=["cache"]``) in the jitted step. Factors and updates are checked
against float64 NumPy references over the real (unpadded) rows, which are read from Flax's
own ``capture_intermediates``, not from the capture.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import factors_after_one_step
from flax import nnx
from helpers_warnings import no_sngd_warnings
from np_reference import PAD, f64, gram

import sngd_jax

pytestmark = [pytest.mark.usefixtures("x64"),
              pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")]

V, D, HEADS, MLP, LAYERS = 13, 8, 2, 16, 1
TIED = {"shared_embedding": "tied"}
SRC = np.array([[3, 4, 5, 6, 0, 0, 0], [7, 8, 9, 10, 11, 12, 2], [5, 6, 0, 0, 0, 0, 0],
                [4, 4, 9, 3, 2, 0, 0]])
TGT = np.array([[1, 3, 4, 2, 0, 0], [1, 5, 6, 7, 11, 2], [1, 9, 2, 0, 0, 0], [1, 8, 8, 2, 0, 0]])


def sinusoid(length):
  pos, i = np.arange(length)[:, None], np.arange(D // 2)[None]
  angle = pos / 10000 ** (2 * i / D)
  return jnp.asarray(np.concatenate([np.sin(angle), np.cos(angle)], -1))


class EncoderLayer(nn.Module):
  @nn.compact
  def __call__(self, x, mask, deterministic):
    y = nn.MultiHeadDotProductAttention(HEADS, dropout_rate=0.1, name="self_attn")(
        nn.LayerNorm()(x), mask=mask, deterministic=deterministic)
    x = x + nn.Dropout(0.1)(y, deterministic=deterministic)
    return x + nn.Dense(D)(nn.relu(nn.Dense(MLP)(nn.LayerNorm()(x))))


class DecoderLayer(nn.Module):
  decode: bool = False

  @nn.compact
  def __call__(self, y, enc, self_mask, cross_mask, deterministic):
    y = y + nn.MultiHeadDotProductAttention(HEADS, decode=self.decode, name="self_attn")(
        nn.LayerNorm()(y), mask=self_mask, deterministic=deterministic)
    z = nn.LayerNorm()(y)
    y = y + nn.MultiHeadDotProductAttention(HEADS, name="cross_attn")(
        inputs_q=z, inputs_k=enc, inputs_v=enc, mask=cross_mask, deterministic=deterministic)
    return y + nn.Dense(D)(nn.relu(nn.Dense(MLP)(nn.LayerNorm()(y))))


class Seq2Seq(nn.Module):
  decode: bool = False

  def setup(self):
    self.shared_embedding = nn.Embed(V, D)
    self.encoder = [EncoderLayer(name=f"encoder_{i}") for i in range(LAYERS)]
    self.decoder = [DecoderLayer(self.decode, name=f"decoder_{i}") for i in range(LAYERS)]
    self.encoder_norm = nn.LayerNorm()
    self.decoder_norm = nn.LayerNorm()

  def encode(self, src, deterministic=True):
    x = self.shared_embedding(src) + sinusoid(src.shape[1])
    mask = nn.make_attention_mask(src != PAD, src != PAD)
    for layer in self.encoder:
      x = layer(x, mask, deterministic)
    return self.encoder_norm(x)

  def decode_logits(self, enc, src, tgt_in, deterministic=True):
    y = self.shared_embedding(tgt_in)  # positions from the causal attention alone
    if self.decode:  # one position at a time, its place kept by the cache
      self_mask, cross_mask = None, nn.make_attention_mask(jnp.ones_like(tgt_in), src != PAD)
    else:
      self_mask = nn.combine_masks(nn.make_attention_mask(tgt_in != PAD, tgt_in != PAD),
                                   nn.make_causal_mask(tgt_in))
      cross_mask = nn.make_attention_mask(tgt_in != PAD, src != PAD)
    for layer in self.decoder:
      y = layer(y, enc, self_mask, cross_mask, deterministic)
    return self.shared_embedding.attend(self.decoder_norm(y)) / np.sqrt(D)

  def __call__(self, src, tgt_in, deterministic=True):
    return self.decode_logits(self.encode(src, deterministic), src, tgt_in, deterministic)


MODEL = Seq2Seq()


def smoothed_loss(params, src, tgt, rng=None):
  """Label-smoothed cross-entropy over the real target tokens; returns ``(loss, logits)``."""
  rngs = None if rng is None else {"dropout": rng}
  logits = MODEL.apply({"params": params}, src, tgt[:, :-1], deterministic=rng is None,
                       rngs=rngs)
  labels = optax.smooth_labels(jax.nn.one_hot(tgt[:, 1:], V), 0.1)
  real = tgt[:, 1:] != PAD
  return (optax.softmax_cross_entropy(logits, labels) * real).sum() / real.sum(), logits


def problem(src=SRC, tgt=TGT):
  src, tgt = jnp.asarray(src), jnp.asarray(tgt)
  params = f64(MODEL.init(jax.random.key(0), src, tgt[:, :-1])["params"])
  (_, (_, acts)), grads = jax.value_and_grad(
      sngd_jax.capture(smoothed_loss, has_aux=True), has_aux=True)(params, src, tgt)
  return params, src, tgt, acts, grads


def intermediates(params, src, tgt_in):
  """Each module's outputs in the deterministic forward pass, from Flax (not the capture)."""
  _, state = MODEL.apply({"params": params}, src, tgt_in, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]
  return lambda *path: np.asarray(leaf(inter, "/".join(path))["__call__"][0], np.float64)


def leaf(tree, path):
  """``tree[a][b]...`` for ``path = "a/b/..."``."""
  return functools.reduce(lambda t, k: t[k], path.split("/"), tree)


def reference_rows(params, src, tgt_in, examples=None):
  """Float64 rows of the checked layers over the real tokens of the first ``examples``."""
  out = intermediates(params, src, tgt_in)
  keep = slice(None, examples)
  src_real = np.asarray(src != PAD)[keep]
  tgt_real = np.asarray(tgt_in != PAD)[keep]
  enc_hidden = out("encoder_0", "Dense_1")        # MLP's first Dense: relu of it feeds Dense_0
  return {
      "encoder_0/Dense_1": out("encoder_0", "LayerNorm_1")[keep][src_real],
      "encoder_0/Dense_0": np.maximum(enc_hidden, 0)[keep][src_real],
      "decoder_0/Dense_1": out("decoder_0", "LayerNorm_2")[keep][tgt_real],
      "decoder_0/cross_attn/query": out("decoder_0", "LayerNorm_1")[keep][tgt_real],
      "decoder_0/cross_attn/key": out("encoder_norm")[keep][src_real],
      "decoder_0/cross_attn/value": out("encoder_norm")[keep][src_real],
      "attend": out("decoder_norm")[keep][tgt_real],
      "tokens": np.concatenate([np.asarray(src)[keep][src_real],
                                np.asarray(tgt_in)[keep][tgt_real]]),
  }


DENSE = ("encoder_0/Dense_1", "encoder_0/Dense_0", "decoder_0/Dense_1",
         "decoder_0/cross_attn/query", "decoder_0/cross_attn/key", "decoder_0/cross_attn/value")


def assert_reference_factors(state, rows):
  for path in DENSE:
    np.testing.assert_allclose(state.factors[path], gram(rows[path]), rtol=1e-10, atol=1e-12,
                               err_msg=path)
  freq = np.bincount(rows["tokens"], minlength=V) / rows["tokens"].size
  np.testing.assert_allclose(state.factors["shared_embedding"], freq, rtol=1e-12, atol=1e-15)
  np.testing.assert_allclose(state.factors["shared_embedding[attend]"],
                             gram(rows["attend"], bias=False), rtol=1e-10, atol=1e-12)


def test_source_and_target_masks_give_the_factors_of_the_real_rows():
  """``with_row_mask(acts, src_mask, tgt_mask)``: each call gets the mask of its length.

  The encoder's layers and cross-attention's key/value projections read the source's real
  rows, the decoder's others the target's, and the shared table counts the real tokens of
  both lookups (its ``attend`` queries: the target's real rows).
  """
  params, src, tgt, acts, grads = problem()
  tgt_in = tgt[:, :-1]
  masked = sngd_jax.with_row_mask(acts, src != PAD, tgt_in != PAD)
  state = factors_after_one_step(params, grads, masked, fisher=TIED)
  rows = reference_rows(params, src, tgt_in)
  assert_reference_factors(state, rows)
  assert float(state.factors["shared_embedding"][PAD]) == 0.0
  # the order of the masks does not matter
  swapped = sngd_jax.with_row_mask(acts, tgt_in != PAD, src != PAD)
  for path, records in masked.items():
    for a, b in zip(records, swapped[path], strict=True):
      np.testing.assert_array_equal(a.row_mask, b.row_mask, err_msg=path)


def test_documented_path_masks_cannot_mask_cross_attention_or_the_shared_table():
  """What the docs said before: two calls with ``where=`` by path prefix. It raises at the
  cross-attention key (source rows under the target's mask), and a table outside both
  prefixes is left unmasked, its pad lookups counted."""
  _, src, tgt, acts, _ = problem()
  acts = sngd_jax.with_row_mask(acts, src != PAD, where=lambda p: p.startswith("encoder"))
  with pytest.raises(ValueError, match=r"'decoder_0/cross_attn/key'.*\(4, 7, 8\).*\(4, 5\)"):
    sngd_jax.with_row_mask(acts, tgt[:, :-1] != PAD, where=lambda p: p.startswith("decoder"))
  assert all(c.row_mask is None for c in acts["shared_embedding"])


def test_masks_of_one_length_by_paths_and_calls():
  """A source and a target padded to the same length: masks cannot be picked by length
  (the multi-mask form raises, saying so), so the documented recipe masks by path and, for
  the shared table, by call (its source lookup, then its target lookup and ``attend``)."""
  params, src, tgt, acts, grads = problem(SRC[:, :5], TGT)   # S = 5 = T (target input)
  src_mask, tgt_mask = src != PAD, tgt[:, :-1] != PAD
  assert src_mask.shape == tgt_mask.shape
  with pytest.raises(ValueError, match=r"different lengths.*where="):
    sngd_jax.with_row_mask(acts, src_mask, tgt_mask)

  def reads_source(p):
    return p.startswith("encoder") or p.endswith(("cross_attn/key", "cross_attn/value"))

  def table(p):
    return p == "shared_embedding"

  # the recipe of docs/training-loops.md (*Encoder-decoder models*)
  acts = sngd_jax.with_row_mask(acts, src_mask, where=reads_source)
  acts = sngd_jax.with_row_mask(acts, tgt_mask,
                                where=lambda p: not reads_source(p) and not table(p))
  acts = sngd_jax.with_row_mask(acts, src_mask, where=table, calls=[0])
  acts = sngd_jax.with_row_mask(acts, tgt_mask, where=table, calls=[1, 2])
  state = factors_after_one_step(params, grads, acts, fisher=TIED)
  assert_reference_factors(state, reference_rows(params, src, tgt[:, :-1]))


def test_updates_are_float64_damped_solves_over_the_real_rows():
  params, src, tgt, acts, grads = problem()
  tgt_in = tgt[:, :-1]
  tx = sngd_jax.sngd(fisher=TIED, **ref.one_step_kwargs())
  updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
      grads, tx.init(params), sngd_jax.with_row_mask(acts, src != PAD, tgt_in != PAD))
  rows = reference_rows(params, src, tgt_in)
  for path in ("encoder_0/Dense_1", "decoder_0/cross_attn/query", "decoder_0/cross_attn/key"):
    ref.assert_dense_update(rows[path], leaf(grads, path), leaf(updates, path), name=path,
                            rtol=1e-8)
  # the tied table: (D + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}
  freq = np.bincount(rows["tokens"], minlength=V) / rows["tokens"].size
  g_e = np.asarray(grads["shared_embedding"]["embedding"], np.float64)
  left = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  expect = ref.damped_solve(gram(rows["attend"], bias=False), left.T).T
  np.testing.assert_allclose(updates["shared_embedding"]["embedding"], expect, rtol=1e-8)


def test_coverage_every_layer_with_its_fisher_and_nothing_missing():
  params, src, tgt, _, _ = problem()
  report = sngd_jax.coverage(smoothed_loss, params, src, tgt, fisher=TIED)
  rows = {r.path: r for r in report.params}
  assert len(rows) == len(jax.tree.leaves(params))
  assert not [p for p, r in rows.items() if "MISSING" in r.fisher or r.fisher == "pass-through"]
  assert rows["shared_embedding/embedding"].fisher == (
      f"tied: diagonal/embed {V} + linear/attend {D}x{D}")
  assert rows["shared_embedding/embedding"].inverse == "diagonal + cholesky"
  for path in ("encoder_0/Dense_1/kernel", "decoder_0/cross_attn/key/kernel",
               "decoder_0/cross_attn/query/kernel"):
    assert rows[path].fisher == f"linear/dense {D + 1}x{D + 1}", path
    assert rows[path].inverse == "cholesky"
  assert rows["decoder_0/cross_attn/out/kernel"].fisher == f"linear/dense {D + 1}x{D + 1}"
  assert rows["encoder_0/Dense_0/kernel"].fisher == f"linear/dense {MLP + 1}x{MLP + 1}"
  assert rows["decoder_norm/scale"].fisher == f"per-channel/norm {D}x2x2"


def test_stats_batch_size_takes_sentence_pairs_for_source_and_target_layers():
  """``stats_batch_size=2``: the first two sentence pairs, whatever the layer's length (the
  table's lookups are counted whole, as documented: *Statistics from part of the batch*)."""
  params, src, tgt, acts, grads = problem()
  tgt_in = tgt[:, :-1]
  state = factors_after_one_step(
      params, grads, sngd_jax.with_row_mask(acts, src != PAD, tgt_in != PAD), fisher=TIED,
      stats_batch_size=2)
  rows = reference_rows(params, src, tgt_in, examples=2)
  rows["tokens"] = reference_rows(params, src, tgt_in)["tokens"]
  assert_reference_factors(state, rows)
  whole = reference_rows(params, src, tgt_in)["decoder_0/cross_attn/key"]
  assert not np.allclose(state.factors["decoder_0/cross_attn/key"], gram(whole), rtol=1e-3)


def empty_cache(params, src, steps):
  """The decoder's cache for ``steps`` positions, in the params' dtype."""
  cache = Seq2Seq(decode=True).init(jax.random.key(0), src,
                                    jnp.ones((src.shape[0], steps), jnp.int32))["cache"]
  dtype = jax.tree.leaves(params)[0].dtype
  return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                      else a, cache)


def greedy_decode(params, src, steps, cache=None):
  """Greedy decoding with the cache (``decode=True``, ``mutable=["cache"]``)."""
  model = Seq2Seq(decode=True)
  enc = MODEL.apply({"params": params}, src, method=Seq2Seq.encode)
  cache = empty_cache(params, src, steps) if cache is None else cache
  token = jnp.ones((src.shape[0], 1), jnp.int32)     # BOS = 1
  out = []
  for _ in range(steps):
    logits, mut = model.apply({"params": params, "cache": cache}, enc, src, token,
                              method=Seq2Seq.decode_logits, mutable=["cache"])
    cache = mut["cache"]
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    out.append(token)
  return jnp.concatenate(out, 1), logits


def test_cached_decoding_in_the_jitted_train_step_leaves_the_factors_alone():
  """A train step that also decodes greedily with the cache (outside the captured loss, in
  the same ``jit``) keeps the float64 factors of the real rows; the cached decoder's last
  logits equal the full decoder's on the decoded prefix."""
  params, src, tgt, _, _ = problem()
  tx = sngd_jax.sngd(fisher=TIED, **ref.ONE_STEP)

  @jax.jit
  def step(params, opt_state, src, tgt):
    (_, (_, acts)), grads = jax.value_and_grad(
        sngd_jax.capture(smoothed_loss, has_aux=True), has_aux=True)(params, src, tgt)
    acts = sngd_jax.with_row_mask(acts, src != PAD, tgt[:, :-1] != PAD)
    decoded = greedy_decode(params, src, 3)
    _, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return opt_state, decoded

  with no_sngd_warnings():  # no decode=True warning: the decoding is outside the capture
    state, (tokens, last) = step(params, tx.init(params), src, tgt)
  assert_reference_factors(state, reference_rows(params, src, tgt[:, :-1]))
  prefix = np.concatenate([np.ones((4, 1), int), np.asarray(tokens[:, :2])], 1)
  full = MODEL.apply({"params": params}, src, jnp.asarray(prefix))
  real = (prefix != PAD).all(1)  # the full decoder's padding mask would hide a PAD token
  assert real.sum() >= 2, prefix
  np.testing.assert_allclose(np.asarray(last)[real, 0], np.asarray(full)[real, -1],
                             rtol=1e-9, atol=1e-12)


def test_cached_decoding_inside_the_captured_loss_warns():
  """Decoding inside the captured loss (predictions as ``aux``) records each step as a
  one-token call of the decoder's layers: ``capture`` warns, naming the attention, and the
  masks match none of them (``with_row_mask`` raises, naming the layer)."""
  params, src, tgt, acts, _ = problem()
  cache = empty_cache(params, src, 2)

  def loss(p, src, tgt):
    value, _ = smoothed_loss(p, src, tgt)
    return value, greedy_decode(p, src, 2, cache)[0]

  with pytest.warns(UserWarning, match=r"attention 'decoder_0/self_attn' ran with "
                    r"decode=True.*Decode outside the captured function"):
    _, (_, inside) = sngd_jax.capture(loss, has_aux=True)(params, src, tgt)
  assert [c.inputs.shape for c in acts["decoder_0/cross_attn/query"]] == [(4, 5, D)]
  assert [c.inputs.shape for c in inside["decoder_0/cross_attn/query"]] == [
      (4, 5, D), (4, 1, D), (4, 1, D)]
  with pytest.raises(ValueError, match=r"\(call [1-9]\d*, \w+\).*\(4, 1(, 8)?\) match none of the "
                     "masks"):
    sngd_jax.with_row_mask(inside, src != PAD, tgt[:, :-1] != PAD)


def test_jitted_train_state_steps_with_dropout_decrease_the_loss():
  params, src, tgt, _, _ = problem()
  params = jax.tree.map(lambda a: a.astype(jnp.float32), params)
  state = sngd_jax.TrainState.create(apply_fn=MODEL.apply, params=params,
                                     tx=sngd_jax.sngd_adam(3e-2, fisher=TIED))

  @jax.jit
  def train_step(state, src, tgt, rng):
    (loss, (_, acts)), grads = jax.value_and_grad(
        sngd_jax.capture(smoothed_loss, has_aux=True), has_aux=True)(
            state.params, src, tgt, rng)
    acts = sngd_jax.with_row_mask(acts, src != PAD, tgt[:, :-1] != PAD)
    return state.apply_gradients(grads=grads, activations=acts), loss

  with jax.enable_x64(False):
    src32, tgt32 = src.astype(jnp.int32), tgt.astype(jnp.int32)
    first = float(smoothed_loss(state.params, src32, tgt32)[0])
    for i in range(20):
      state, loss = train_step(state, src32, tgt32, jax.random.key(i))
      assert np.isfinite(float(loss))
    last = float(smoothed_loss(state.params, src32, tgt32)[0])
  assert ref.all_finite(state.params)
  assert last < 0.7 * first, (first, last)


def test_several_masks_errors_name_the_layer_and_the_fix():
  _, src, tgt, acts, _ = problem()
  with pytest.raises(ValueError, match=r"several masks, of shapes \[\(4,\), \(4, 5\)\]"):
    sngd_jax.with_row_mask(acts, jnp.ones(4), tgt[:, :-1] != PAD)
  with pytest.raises(TypeError, match=r"a function \('<lambda>'\) where a mask goes.*where="):
    sngd_jax.with_row_mask(acts, src != PAD, lambda p: p.startswith("encoder"))
  with pytest.raises(ValueError, match=r"several masks.*\(3, 5\)"):
    sngd_jax.with_row_mask(acts, src != PAD, tgt[:3, :-1] != PAD)
  # a target mask of the wrong length: the decoder's layers match neither mask
  with pytest.raises(ValueError, match=r"'decoder_0/\S+' \(call 0, \w+\).*\(4, 5, \d+\) match "
                     r"none of the masks of lengths \[7, 6\].*where=lambda p: p == "):
    sngd_jax.with_row_mask(acts, src != PAD, tgt != PAD)

  class Pooled(nn.Module):  # a layer over the mean of the tokens: no token axis to match
    @nn.compact
    def __call__(self, src, tgt):
      return nn.Dense(2)(nn.Embed(V, D)(src).mean(1)) + nn.Embed(V, D)(tgt).sum()

  params = Pooled().init(jax.random.key(0), src, tgt)["params"]
  _, pooled = sngd_jax.capture(lambda p: Pooled().apply({"params": p}, src, tgt).sum())(params)
  with pytest.raises(ValueError, match=r"'Dense_0'.*no token axis.*where="):
    sngd_jax.with_row_mask(pooled, src != PAD, tgt != PAD)


def test_cross_attention_inputs_kv_records_the_source_rows_as_inputs_k_v():
  """flax 0.12 deprecates ``inputs_kv=``; its key/value rows are the source's, as with
  ``inputs_k=``/``inputs_v=``."""
  q, kv = jnp.ones((2, 3, 4)), jax.random.normal(jax.random.key(1), (2, 5, 4))
  attn = nn.MultiHeadDotProductAttention(2)
  params = attn.init(jax.random.key(0), q, kv, kv)["params"]
  with pytest.warns(DeprecationWarning, match="inputs_kv"):
    _, old = sngd_jax.capture(lambda p: attn.apply({"params": p}, q, inputs_kv=kv).sum())(
        params)
  _, new = sngd_jax.capture(lambda p: attn.apply({"params": p}, q, kv, kv).sum())(params)
  for path in ("key", "value", "query"):
    np.testing.assert_array_equal(old[path][0].inputs, new[path][0].inputs)
  np.testing.assert_array_equal(new["key"][0].inputs, kv)


def test_recurrent_encoder_decoder_cells_take_the_mask_of_their_time_steps():
  """An LSTM encoder over the source and an LSTM decoder over the target (``nn.RNN``, rows
  time-major): each cell's rows take the mask with as many tokens as it has time steps."""

  class RNNSeq2Seq(nn.Module):
    @nn.compact
    def __call__(self, src, tgt_in):
      embed = nn.Embed(V, D)
      carry, _ = nn.RNN(nn.LSTMCell(4), return_carry=True, name="encoder")(embed(src))
      return nn.Dense(V)(nn.RNN(nn.LSTMCell(4), name="decoder")(embed(tgt_in),
                                                               initial_carry=carry))

  model, src, tgt_in = RNNSeq2Seq(), jnp.asarray(SRC), jnp.asarray(TGT[:, :-1])
  params = model.init(jax.random.key(0), src, tgt_in)["params"]
  _, acts = sngd_jax.capture(lambda p: model.apply({"params": p}, src, tgt_in).sum())(params)
  masked = sngd_jax.with_row_mask(acts, src != PAD, tgt_in != PAD)
  cells = [p for p in masked if p.startswith("LSTMCell_")]  # 0: the encoder's, 1: decoder's
  assert len(cells) == 16
  for path in cells:
    mask = np.asarray((src if path.startswith("LSTMCell_0") else tgt_in) != PAD, np.float64)
    (record,) = masked[path]
    np.testing.assert_array_equal(np.asarray(record.row_mask).reshape(-1), mask.T.reshape(-1),
                                  err_msg=path)
  for record, tokens in zip(masked["Embed_0"], (src, tgt_in), strict=True):
    np.testing.assert_array_equal(record.row_mask, tokens != PAD)
  np.testing.assert_array_equal(np.asarray(masked["Dense_0"][0].row_mask)[..., 0],
                                np.asarray(tgt_in != PAD))


def test_decoder_that_shifts_its_targets_is_masked_by_the_targets():
  """As in the WMT example, the decoder shifts the targets right inside, its first input being
  the pad id: mask its rows by the targets (the positions whose predictions are trained),
  ``tgt != PAD``; the first lookup of the pad id is then a real one and counted."""

  class Shifting(nn.Module):
    @nn.compact
    def __call__(self, src, tgt):
      embed = nn.Embed(V, D, name="shared_embedding")
      enc = nn.Dense(D, name="encoder")(embed(src))
      y = embed(jnp.pad(tgt, ((0, 0), (1, 0)))[:, :-1])     # shift_right: PAD first
      y = y + nn.MultiHeadDotProductAttention(HEADS, name="cross_attn")(y, enc, enc)
      return embed.attend(y)

  model, src, tgt = Shifting(), jnp.asarray(SRC), jnp.asarray(TGT)
  params = f64(model.init(jax.random.key(0), src, tgt)["params"])

  def loss(p, src, tgt):
    logits = model.apply({"params": p}, src, tgt)
    return (optax.softmax_cross_entropy_with_integer_labels(logits, tgt) * (tgt != PAD)).sum()

  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, src, tgt)
  state = factors_after_one_step(params, grads,
                                 sngd_jax.with_row_mask(acts, src != PAD, tgt != PAD),
                                 fisher=TIED)
  shifted = np.pad(TGT, ((0, 0), (1, 0)))[:, :-1]
  ids = np.concatenate([SRC[SRC != PAD], shifted[TGT != PAD]])
  np.testing.assert_allclose(state.factors["shared_embedding"],
                             np.bincount(ids, minlength=V) / ids.size, rtol=1e-12)
  assert float(state.factors["shared_embedding"][PAD]) == len(TGT) / ids.size


class _NNXDecoder(nnx.Module):
  """An NNX decoder block whose attention can decode with a cache (``decode=``)."""

  def __init__(self, rngs: nnx.Rngs, decode: bool = False):
    self.attn = nnx.MultiHeadAttention(2, D, decode=decode, rngs=rngs)
    self.out = nnx.Linear(D, 5, rngs=rngs)

  def __call__(self, x, decode=None):
    return self.out(self.attn(x, decode=decode, deterministic=True))


@pytest.mark.parametrize("by", ["argument", "attribute"])
def test_nnx_cached_decoding_inside_the_captured_loss_warns(by):
  """``capture_nnx`` warns, naming the attention, when an ``nnx.MultiHeadAttention`` decodes
  with its cache inside the captured loss (``decode=True`` as the call's argument or the
  module's attribute): each decoding step became one-token rows of its projections. Decoding
  outside the captured function, in the same jitted step, records the training rows only and
  does not warn."""
  model = {"dec": _NNXDecoder(nnx.Rngs(0), decode=by == "attribute")}
  x = jax.random.normal(jax.random.key(1), (3, 4, D), jnp.float32)
  model["dec"].attn.init_cache((3, 4, D), dtype=jnp.float32)

  def train_loss(m, x):
    return jnp.mean(m["dec"](x, decode=False) ** 2)

  def loss_decoding_inside(m, x):
    step = {"argument": {"decode": True}, "attribute": {}}[by]
    return train_loss(m, x), m["dec"](x[:, :1], **step)

  with pytest.warns(UserWarning, match=r"attention 'dec/attn' ran with decode=True.*Decode "
                    r"outside the captured function"):
    _, (_, inside) = sngd_jax.capture_nnx(loss_decoding_inside, has_aux=True)(model, x)
  assert [c.inputs.shape for c in inside["dec/out"]] == [(3, 4, D), (3, 1, D)]

  @nnx.jit
  def step(m, x):
    value, acts = sngd_jax.capture_nnx(train_loss)(m, x)
    return value, acts, m["dec"](x[:, :1], decode=True)  # decoded outside the capture

  with no_sngd_warnings():
    _, acts, _ = step(model, x)
  assert {k: [c.inputs.shape for c in v] for k, v in acts.items()} == {
      "dec/attn/query": [(3, 4, D)], "dec/attn/key": [(3, 4, D)], "dec/attn/value": [(3, 4, D)],
      "dec/attn/out": [(3, 4, 2, D // 2)], "dec/out": [(3, 4, D)]}
