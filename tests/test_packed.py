"""Packed sequences: several documents per row of a language-model batch.

Each row holds documents back to back, told apart by ``segment_ids`` (1, 2, ... per document,
0 for the padding at the end of a row) with per-document ``positions``; attention is causal
within a document, ``nn.combine_masks(nn.make_attention_mask(seg, seg, jnp.equal),
nn.make_causal_mask(tokens))``, and the loss is weighted by ``seg > 0``. A small transformer
LM (token and position tables, one pre-norm block of attention and MLP, a final LayerNorm, the
logits from the token table, ``attend``, or from a Dense) is masked with
``with_row_mask(acts, seg > 0)``. Every layer's factor is checked against float64 sums over the
real tokens, built from Flax's own ``capture_intermediates`` and a numpy attention (not from the
capture), and the updates against damped float64 solves; ``stats_batch_size`` takes whole rows.
"""

import functools
import warnings

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
from np_reference import f64, gram

import sngd_jax

pytestmark = [pytest.mark.usefixtures("x64"),
              pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")]

V, D, HEADS, MLP, T = 17, 8, 2, 16, 8
EPS = 1e-6  # nn.LayerNorm's epsilon
# three rows: two documents and a pad, two documents filling the row, one short document
SEG = np.array([[1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 1, 1, 2, 2, 2], [1, 1, 0, 0, 0, 0, 0, 0]])
POS = np.array([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 0, 0, 0, 0, 0]])
_rng = np.random.default_rng(0)
INPUTS = _rng.integers(1, V, size=SEG.shape) * (SEG > 0)    # padding: token 0 at position 0
TARGETS = _rng.integers(1, V, size=SEG.shape) * (SEG > 0)
REAL = SEG > 0
TIED = {"embed": "tied"}


def packed_mask(tokens, seg):
  """Causal attention within each document (padding attends to padding only)."""
  return nn.combine_masks(nn.make_attention_mask(seg, seg, jnp.equal),
                          nn.make_causal_mask(tokens))


class Block(nn.Module):
  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(HEADS, name="attn")(nn.LayerNorm()(x), mask=mask)
    return x + nn.Dense(D)(nn.gelu(nn.Dense(MLP)(nn.LayerNorm()(x))))


class PackedLM(nn.Module):
  tied: bool = True

  @nn.compact
  def __call__(self, tokens, seg, pos):
    embed = nn.Embed(V, D, name="embed")
    x = embed(tokens) + nn.Embed(T, D, name="pos_embed")(pos)
    x = Block(name="block")(x, packed_mask(tokens, seg))
    x = nn.LayerNorm(name="final_norm")(x)
    return embed.attend(x) if self.tied else nn.Dense(V, name="head")(x)


def packed_loss(model, params, tokens, seg, pos, targets):
  logits = model.apply({"params": params}, tokens, seg, pos)
  weights = seg > 0
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return (losses * weights).sum() / weights.sum()


@functools.cache
def problem(tied):
  """The model, float64 params, captured activations and gradients (computed once)."""
  model = PackedLM(tied)
  tokens, seg, pos, targets = map(jnp.asarray, (INPUTS, SEG, POS, TARGETS))
  params = f64(model.init(jax.random.key(0), tokens, seg, pos)["params"])
  # LayerNorms away from their init (scale 1, bias 0), so their outputs are not their xhat
  params = jax.tree_util.tree_map_with_path(
      lambda p, a: a + 0.3 * jax.random.normal(jax.random.key(len(str(p))), a.shape, a.dtype)
      if "Norm" in str(p) or "norm" in str(p) else a, params)
  loss = functools.partial(packed_loss, model)
  (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
      params, tokens, seg, pos, targets)
  return model, params, acts, grads


def leaf(tree, path):
  return functools.reduce(lambda t, k: t[k], path.split("/"), tree)


def standardized(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + EPS)


@functools.cache
def reference_rows(tied, rows=None):
  """Float64 inputs of every layer at the real tokens of the first ``rows`` rows, from Flax's
  intermediates (module outputs) and numpy (the attention and the LayerNorms' xhat)."""
  model, params, _, _ = problem(tied)
  tokens, seg, pos = map(jnp.asarray, (INPUTS, SEG, POS))
  _, state = model.apply({"params": params}, tokens, seg, pos, capture_intermediates=True,
                         mutable=["intermediates"])
  inter = state["intermediates"]

  def out(path):
    return np.asarray(leaf(inter, path)["__call__"][0], np.float64)

  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x0 = p["embed"]["embedding"][INPUTS] + p["pos_embed"]["embedding"][POS]
  # the attention from the projections' outputs: within a document, causal
  q, k, v = (out(f"block/attn/{n}") for n in ("query", "key", "value"))   # (B, T, H, hd)
  allowed = (SEG[:, :, None] == SEG[:, None, :]) & np.tril(np.ones((T, T), bool))
  logits = np.einsum("bqhd,bkhd->bhqk", q / np.sqrt(q.shape[-1]), k)
  logits = np.where(allowed[:, None], logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  heads = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)
  x1 = x0 + out("block/attn")
  np.testing.assert_allclose(heads.reshape(*heads.shape[:2], -1) @ p["block"]["attn"]["out"][
      "kernel"].reshape(D, D) + p["block"]["attn"]["out"]["bias"], out("block/attn"),
      rtol=1e-10, atol=1e-12)  # the numpy attention is Flax's
  keep = slice(None, rows)
  real = REAL[keep]

  def at_real(a):
    return a[keep][real]

  ln0 = out("block/LayerNorm_0")
  return {
      "block/LayerNorm_0": at_real(standardized(x0)),
      "block/attn/query": at_real(ln0), "block/attn/key": at_real(ln0),
      "block/attn/value": at_real(ln0),
      "block/attn/out": at_real(heads.reshape(*heads.shape[:2], -1)),
      "block/LayerNorm_1": at_real(standardized(x1)),
      # Flax numbers the outer Dense first: Dense_1 is the MLP's first layer
      "block/Dense_1": at_real(out("block/LayerNorm_1")),
      "block/Dense_0": at_real(np.asarray(jax.nn.gelu(out("block/Dense_1")))),
      "final_norm": at_real(standardized(out("block"))),
      "head": at_real(out("final_norm")),
      "tokens": INPUTS[keep][real], "positions": POS[keep][real],
  }


DENSE = ("block/attn/query", "block/attn/key", "block/attn/value", "block/attn/out",
         "block/Dense_0", "block/Dense_1")
NORMS = ("block/LayerNorm_0", "block/LayerNorm_1", "final_norm")


def assert_reference_factors(state, rows, tied, whole_tables=None):
  """Every layer's factor is the float64 one of ``rows``; the tables' counts those of
  ``whole_tables`` (``stats_batch_size`` counts lookups whole), else of ``rows``."""
  for path in DENSE:
    np.testing.assert_allclose(state.factors[path], gram(rows[path]), rtol=1e-10, atol=1e-12,
                               err_msg=path)
  for path in NORMS:
    want = np.stack([gram(rows[path][:, c:c + 1]) for c in range(D)])
    np.testing.assert_allclose(state.factors[path], want, rtol=1e-10, atol=1e-12, err_msg=path)
  tables = rows if whole_tables is None else whole_tables
  for path, ids, n in (("embed", tables["tokens"], V), ("pos_embed", tables["positions"], T)):
    np.testing.assert_allclose(state.factors[path], np.bincount(ids, minlength=n) / ids.size,
                               rtol=1e-12, atol=1e-15, err_msg=path)
  if tied:
    np.testing.assert_allclose(state.factors["embed[attend]"], gram(rows["head"], bias=False),
                               rtol=1e-10, atol=1e-12)
  else:
    np.testing.assert_allclose(state.factors["head"], gram(rows["head"]), rtol=1e-10,
                               atol=1e-12)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_lm_factors_are_those_of_the_real_tokens(tied):
  _, params, acts, grads = problem(tied)
  kw = {"fisher": TIED} if tied else {}
  with no_sngd_warnings():
    masked = sngd_jax.with_row_mask(acts, jnp.asarray(SEG) > 0)
  state = factors_after_one_step(params, grads, masked, **kw)
  rows = reference_rows(tied)
  assert_reference_factors(state, rows, tied)
  assert float(state.factors["embed"][0]) == 0.0  # no padding lookup counted
  unmasked = factors_after_one_step(params, grads, acts, **kw)
  assert not np.allclose(unmasked.factors["block/Dense_0"], gram(rows["block/Dense_0"]),
                         rtol=1e-3)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_lm_updates_are_float64_damped_solves_over_the_real_tokens(tied):
  _, params, acts, grads = problem(tied)
  kw = {"fisher": TIED} if tied else {}
  tx = sngd_jax.sngd(**kw, **ref.one_step_kwargs())
  updates, _ = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
      grads, tx.init(params), sngd_jax.with_row_mask(acts, jnp.asarray(SEG) > 0))
  rows = reference_rows(tied)
  for path in DENSE + (() if tied else ("head",)):
    ref.assert_dense_update(rows[path], leaf(grads, path), leaf(updates, path), name=path,
                            rtol=1e-8)
  for path in NORMS:
    g = leaf(grads, path)
    scale, bias = ref.channel_update(rows[path], np.asarray(g["scale"]), np.asarray(g["bias"]))
    np.testing.assert_allclose(leaf(updates, path)["scale"], scale, rtol=1e-8, err_msg=path)
    np.testing.assert_allclose(leaf(updates, path)["bias"], bias, rtol=1e-8, err_msg=path)
  freq = np.bincount(rows["positions"], minlength=T) / rows["positions"].size
  g_pos = np.asarray(grads["pos_embed"]["embedding"], np.float64)
  np.testing.assert_allclose(updates["pos_embed"]["embedding"],
                             g_pos / (freq + ref.DAMPING * freq.sum())[:, None], rtol=1e-8)
  freq = np.bincount(rows["tokens"], minlength=V) / rows["tokens"].size
  g_e = np.asarray(grads["embed"]["embedding"], np.float64)
  left = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  if tied:  # (D + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}
    left = ref.damped_solve(gram(rows["head"], bias=False), left.T).T
  np.testing.assert_allclose(updates["embed"]["embedding"], left, rtol=1e-8)


def test_packed_lm_stats_batch_size_takes_whole_rows():
  """``stats_batch_size=2``: every real token of the first two rows (all their documents),
  none of the third row's; the tables' lookups are counted whole, as documented."""
  _, params, acts, grads = problem(True)
  masked = sngd_jax.with_row_mask(acts, jnp.asarray(SEG) > 0)
  with no_sngd_warnings():  # no warning that the layers' example axes differ
    warnings.filterwarnings("ignore", message="sngd: fisher='tied' with max_norm=None")
    state = factors_after_one_step(params, grads, masked, fisher=TIED, stats_batch_size=2)
  assert_reference_factors(state, reference_rows(True, rows=2), True,
                           whole_tables=reference_rows(True))
  whole = reference_rows(True)["block/Dense_0"]
  assert not np.allclose(state.factors["block/Dense_0"], gram(whole), rtol=1e-3)


def test_segment_ids_as_the_mask_count_every_real_token_once():
  """The segment ids themselves (an integer mask, 0 = padding) mask as ``seg > 0``: a token's
  weight is not its document's number (which counted the second document of a row twice)."""
  _, params, acts, grads = problem(False)
  by_ids = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, jnp.asarray(SEG)))
  assert_reference_factors(by_ids, reference_rows(False), False)


class NNXPackedLM(nnx.Module):
  """The NNX twin: token and position tables, a pre-norm attention block, a final LayerNorm
  and untied logits."""

  def __init__(self, rngs):
    f64 = {"param_dtype": jnp.float64, "rngs": rngs}
    self.embed = nnx.Embed(V, D, **f64)
    self.pos_embed = nnx.Embed(T, D, **f64)
    self.ln = nnx.LayerNorm(D, **f64)
    self.attn = nnx.MultiHeadAttention(HEADS, D, decode=False, **f64)
    self.final_norm = nnx.LayerNorm(D, **f64)
    self.head = nnx.Linear(D, V, **f64)

  def __call__(self, tokens, seg, pos):
    x = self.embed(tokens) + self.pos_embed(pos)
    x = x + self.attn(self.ln(x), mask=packed_mask(tokens, seg), deterministic=True)
    return self.head(self.final_norm(x))


def test_nnx_packed_lm_factors_through_nnx_optimizer():
  model = NNXPackedLM(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sngd_jax.sngd(**ref.ONE_STEP), wrt=nnx.Param)
  tokens, seg, pos, targets = map(jnp.asarray, (INPUTS, SEG, POS, TARGETS))

  def loss_fn(model, tokens, seg, pos, targets):
    losses = optax.softmax_cross_entropy_with_integer_labels(model(tokens, seg, pos), targets)
    return (losses * (seg > 0)).sum() / (seg > 0).sum()

  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
      model, tokens, seg, pos, targets)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(model)))
  opt.update(model, grads, activations=sngd_jax.with_row_mask(acts, seg))   # the ids as mask
  (state,) = sngd_jax._src.state.sngd_states(opt.opt_state)
  # numpy forward pass
  x0 = p["embed"]["embedding"][INPUTS] + p["pos_embed"]["embedding"][POS]
  ln = standardized(x0) * p["ln"]["scale"] + p["ln"]["bias"]
  proj = {n: np.einsum("btd,dhk->bthk", ln, p["attn"][n]["kernel"]) + p["attn"][n]["bias"]
          for n in ("query", "key", "value")}
  allowed = (SEG[:, :, None] == SEG[:, None, :]) & np.tril(np.ones((T, T), bool))
  logits = np.einsum("bqhd,bkhd->bhqk", proj["query"] / np.sqrt(D // HEADS), proj["key"])
  w = np.exp(np.where(allowed[:, None], logits, -np.inf) - logits.max(-1, keepdims=True))
  heads = np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), proj["value"])
  heads = heads.reshape(*heads.shape[:2], D)
  x1 = x0 + heads @ p["attn"]["out"]["kernel"].reshape(D, D) + p["attn"]["out"]["bias"]
  final = standardized(x1) * p["final_norm"]["scale"] + p["final_norm"]["bias"]
  # after the attention to 1e-6 only: nnx.dot_product_attention under the float32 mask of
  # nn.make_attention_mask is numpy's attention to ~2e-7 (Flax linen's to 1e-15); a padding row
  # in a factor would be an error of order 1e-1
  for path, rows, rtol in (("attn/query", ln, 1e-10), ("attn/key", ln, 1e-10),
                           ("attn/value", ln, 1e-10), ("attn/out", heads, 1e-6),
                           ("head", final, 1e-6)):
    np.testing.assert_allclose(state.factors[path], gram(rows[REAL]), rtol=rtol, atol=1e-9,
                               err_msg=path)
  for path, xhat, rtol in (("ln", standardized(x0), 1e-10), ("final_norm", standardized(x1),
                                                              1e-6)):
    want = np.stack([gram(xhat[REAL][:, c:c + 1]) for c in range(D)])
    np.testing.assert_allclose(state.factors[path], want, rtol=rtol, atol=1e-9, err_msg=path)
  for path, ids, n in (("embed", INPUTS[REAL], V), ("pos_embed", POS[REAL], T)):
    np.testing.assert_allclose(state.factors[path], np.bincount(ids, minlength=n) / ids.size,
                               rtol=1e-12, err_msg=path)
