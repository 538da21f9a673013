"""Features combined as a practitioner combines them, each against a float64 reference.

Row masks (``sngd_jax.with_row_mask``), hand-written layers (``sngd_jax.dense``,
``@sngd_jax.dense_layer``), other models passed to the loss (a target network) and
per-example gradients were each tested on their own; here they meet ``MultiSteps``,
``stats_batch_size``, scans over depth, ``fisher="rfim"``, tied embeddings,
``inject_hyperparams``, ``TrainState``, the host refresh, Equinox and mixed precision. Every
factor is compared with an explicit float64 numpy factor of the real rows (or with one big
batch in place of micro-batches), and every update with the damped float64 solve.
"""

import functools
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
from np_reference import ONE_STEP, PAD, gram, np64

import sngd_jax
from sngd_jax._src.state import only_sngd_state

pytestmark = pytest.mark.usefixtures("x64")

V, D, H = 11, 5, 6


def rfim(rows, z):
  """``G_j = (1/n) sum_r sigmoid(z_rj)^2 x~_r x~_r^T`` per output unit ``j``."""
  x = np.concatenate([np64(rows), np.ones((len(rows), 1))], axis=1)
  s = ref.sigmoid(np64(z)) ** 2
  return np.einsum("rj,ra,rb->jab", s, x, x) / len(rows)


def close(got, want, rtol=1e-10, atol=1e-12):
  np.testing.assert_allclose(np64(got), np64(want), rtol=rtol, atol=atol)


def lengths_mask(lengths, t):
  return np.arange(t)[None] < np.asarray(lengths)[:, None]


def tokens_of(rng, lengths, t):
  mask = lengths_mask(lengths, t)
  return np.where(mask, rng.integers(1, V, size=mask.shape), PAD), mask


class HandDense(nn.Module):
  """A research-code dense layer, written with ``sngd_jax.dense``."""

  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float64

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                   self.param_dtype)
    b = self.param("bias", nn.initializers.normal(0.5), (self.features,), self.param_dtype)
    return sngd_jax.dense(x, w, b, dtype=self.dtype)


class LM(nn.Module):
  """Embed -> hand-written dense -> tanh -> nn.Dense, on (B, T) tokens."""

  @nn.compact
  def __call__(self, tokens):
    e = nn.Embed(V, D, param_dtype=jnp.float64)(tokens)
    h = jnp.tanh(HandDense(H, name="hand")(e))
    return nn.Dense(V, param_dtype=jnp.float64, name="head")(h)


def lm_rows(params, tokens):
  """Each layer's float64 input rows per token: ``(e, h)`` of shape ``(B, T, .)``."""
  e = np64(params["Embed_0"]["embedding"])[tokens]
  z = e @ np64(params["hand"]["kernel"]) + np64(params["hand"]["bias"])
  return e, np.tanh(z), z


def lm_loss(model):
  def loss_fn(params, tokens, mask):
    logits = model.apply({"params": params}, tokens)
    lo = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
    return (lo * mask).sum()
  return loss_fn


# --- row mask x MultiSteps (micro-batches of different sizes and real rows) -----------

@pytest.mark.parametrize("fisher", ["linear", pytest.param("rfim", marks=pytest.mark.slow)])
def test_row_mask_multisteps_uneven_micro_batches_is_one_batch_of_the_real_rows(fisher):
  """Three micro-batches of 2, 3 and 1 sequences of lengths 4, 6 and 5 with 5, 9 and 0 real
  tokens (the third all padding): the factors after the cycle are the mask-weighted estimate
  over the 14 real tokens of the whole cycle (not the mean of the three micro-batches'
  estimates), the embedding's counts are the real tokens', and the update is the damped
  float64 solve with the summed gradient. Linen, a hand-written ``sngd_jax.dense`` layer and
  ``nn.Dense``; also ``fisher="rfim"`` for the two dense layers."""
  rng = np.random.default_rng(0)
  model = LM()
  micro = [tokens_of(rng, [3, 2], 4), tokens_of(rng, [6, 0, 3], 6), tokens_of(rng, [0], 5)]
  params = model.init(jax.random.key(0), jnp.asarray(micro[0][0]))["params"]
  kinds = {"Embed_0": "linear", "hand": fisher, "head": fisher}
  inner = sngd_jax.sngd(**ONE_STEP, inverse_every=1, damping=ref.DAMPING, fisher=kinds)
  tx = sngd_jax.MultiSteps(inner, every_k_schedule=len(micro), use_grad_mean=False,
                           accumulator_dtype=jnp.float64)  # optax's default: float32
  loss = sngd_jax.capture(lm_loss(model), outputs=fisher == "rfim")

  @jax.jit
  def step(state, tokens, mask):
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params, tokens, mask)
    acts = sngd_jax.with_row_mask(acts, mask)
    return tx.update(grads, state, params, activations=acts)

  state, grad_sum = tx.init(params), None
  for tokens, mask in micro:
    updates, state = step(state, jnp.asarray(tokens), jnp.asarray(mask))
    grads = jax.grad(lm_loss(model))(params, jnp.asarray(tokens), jnp.asarray(mask))
    grad_sum = grads if grad_sum is None else jax.tree.map(jnp.add, grad_sum, grads)
  sngd_state = only_sngd_state(state.inner_opt_state)
  real = [lm_rows(params, t) + (m,) for t, m in micro]
  e = np.concatenate([r[0][r[3]] for r in real])
  h = np.concatenate([r[1][r[3]] for r in real])
  z = np.concatenate([r[2][r[3]] for r in real])
  assert len(e) == 14
  head_z = h @ np64(params["head"]["kernel"]) + np64(params["head"]["bias"])
  want = {"hand": gram(e) if fisher == "linear" else rfim(e, z),
          "head": gram(h) if fisher == "linear" else rfim(h, head_z)}
  for path, g in want.items():
    close(sngd_state.factors[path], g)
  toks = np.concatenate([t[m] for t, m in micro])
  close(sngd_state.factors["Embed_0"], np.bincount(toks, minlength=V) / toks.size)
  if fisher == "linear":
    for path, rows in (("hand", e), ("head", h)):
      k, b = ref.dense_update(rows, grad_sum[path]["kernel"], grad_sum[path]["bias"])
      close(updates[path]["kernel"], k, rtol=1e-8)
      close(updates[path]["bias"], b, rtol=1e-8)
  # The mean of the micro-batches' estimates (what a per-micro-batch weight would give) is
  # another matrix: the test tells the two apart.
  per_micro = [gram(r[0][r[3]]) for r in real[:2]]
  assert not np.allclose(np.mean(per_micro, 0), gram(e), rtol=1e-3)


def test_row_mask_multisteps_stats_batch_size_takes_each_micro_batchs_first_examples():
  """``stats_batch_size=2`` under ``MultiSteps``: each micro-batch's estimate is of the real
  tokens of its own first 2 sequences, weighted by their count (3 + 0 and 5 + 6 real
  tokens): the factor is the estimate of those 14 rows pooled."""
  rng = np.random.default_rng(1)
  model = LM()
  micro = [tokens_of(rng, [3, 0, 4], 6), tokens_of(rng, [5, 6, 1], 6)]
  params = model.init(jax.random.key(0), jnp.asarray(micro[0][0]))["params"]
  tx = sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP, stats_batch_size=2), every_k_schedule=2)
  loss = sngd_jax.capture(lm_loss(model))
  state = tx.init(params)
  for tokens, mask in micro:
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(
        params, jnp.asarray(tokens), jnp.asarray(mask))
    _, state = tx.update(grads, state, params,
                         activations=sngd_jax.with_row_mask(acts, mask))
  factors = only_sngd_state(state.inner_opt_state).factors
  rows = [lm_rows(params, t[:2]) + (m[:2],) for t, m in micro]
  e = np.concatenate([r[0][r[3]] for r in rows])
  h = np.concatenate([r[1][r[3]] for r in rows])
  assert len(e) == 14
  close(factors["hand"], gram(e))
  close(factors["head"], gram(h))


# --- row mask x layers scanned over depth (nn.scan + nn.remat, nnx.scan) ---------------

class _RematBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    h = jnp.tanh(HandDense(D, name="hand")(x))
    return jnp.tanh(nn.Dense(D, param_dtype=jnp.float64, name="dense")(h)), None


class _ScanLM(nn.Module):
  """Embed -> 2 blocks (hand-written dense, nn.Dense) under nn.scan of nn.remat -> head."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(V, D, param_dtype=jnp.float64)(tokens)
    blocks = nn.scan(nn.remat(_RematBlock), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=2)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(V, param_dtype=jnp.float64, name="head")(x)


def test_row_mask_nn_scan_of_remat_blocks_with_hand_written_dense_under_multisteps():
  """Linen blocks under ``nn.scan(nn.remat(...))`` over depth, each with a hand-written
  ``sngd_jax.dense`` and an ``nn.Dense``, masked by token, accumulated by ``MultiSteps``
  over two micro-batches of different lengths: every layer of the stack's factor is that of
  its float64 inputs at the real tokens of both micro-batches."""
  rng = np.random.default_rng(2)
  model = _ScanLM()
  micro = [tokens_of(rng, [4, 1], 5), tokens_of(rng, [2, 3, 0], 3)]
  params = model.init(jax.random.key(1), jnp.asarray(micro[0][0]))["params"]
  tx = sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP), every_k_schedule=2)
  loss = sngd_jax.capture(lm_loss(model))
  state = tx.init(params)
  for tokens, mask in micro:
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(
        params, jnp.asarray(tokens), jnp.asarray(mask))
    _, state = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
        grads, state, sngd_jax.with_row_mask(acts, mask))
  factors = only_sngd_state(state.inner_opt_state).factors
  p = jax.tree.map(np64, params)
  want = {"blocks/hand": [], "blocks/dense": [], "head": []}
  for layer in range(2):
    ins_hand, ins_dense = [], []
    for tokens, mask in micro:
      x = p["Embed_0"]["embedding"][tokens]
      for k in range(layer + 1):
        hk, dk = p["blocks"]["hand"], p["blocks"]["dense"]
        h = np.tanh(x @ hk["kernel"][k] + hk["bias"][k])
        if k == layer:
          ins_hand.append(x[mask])
          ins_dense.append(h[mask])
        x = np.tanh(h @ dk["kernel"][k] + dk["bias"][k])
      if layer == 1:
        want["head"].append(x[mask])
    want["blocks/hand"].append(gram(np.concatenate(ins_hand)))
    want["blocks/dense"].append(gram(np.concatenate(ins_dense)))
  close(factors["blocks/hand"], np.stack(want["blocks/hand"]))
  close(factors["blocks/dense"], np.stack(want["blocks/dense"]))
  close(factors["head"], gram(np.concatenate(want["head"])))


class _NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.lin = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class _NNXScanNet(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=2)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return _NNXBlock(rngs)
    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)
    return self.head(body(x, self.blocks))


def test_row_mask_nnx_scan_over_depth_through_nnx_optimizer_and_multisteps():
  """NNX blocks under ``nnx.scan`` over depth, masked by token, ``nnx.Optimizer`` of
  ``sngd_jax.MultiSteps`` over two micro-batches: the stacked factors are those of each
  layer's float64 inputs at the real tokens of both."""
  rng = np.random.default_rng(3)
  model = _NNXScanNet(nnx.Rngs(0))
  opt = nnx.Optimizer(model, sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP),
                                                 every_k_schedule=2), wrt=nnx.Param)
  micro = []
  for lengths in ([3, 1], [4, 0, 2]):
    mask = lengths_mask(lengths, 4)
    micro.append((rng.normal(size=mask.shape + (D,)) * np.where(mask, 1, 40)[..., None],
                  mask))

  def loss_fn(model, x, mask):
    return ((model(x) ** 2).sum(-1) * mask).sum()

  kernels = np64(model.blocks.lin.kernel[...])
  biases = np64(model.blocks.lin.bias[...])
  head_in, layer_in = [], [[], []]
  for x, mask in micro:
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
        model, jnp.asarray(x), jnp.asarray(mask))
    opt.update(model, grads, activations=sngd_jax.with_row_mask(acts, jnp.asarray(mask)))
    h = x
    for k in range(2):
      layer_in[k].append(h[mask])
      h = np.tanh(h @ kernels[k] + biases[k])
    head_in.append(h[mask])
  (state,) = sngd_jax._src.state.sngd_states(opt.opt_state)
  close(state.factors["blocks/lin"], np.stack([gram(np.concatenate(r)) for r in layer_in]))
  close(state.factors["head"], gram(np.concatenate(head_in)))


# --- row mask x tied embeddings x inject_hyperparams x MultiSteps -----------------------

class _TiedLM(nn.Module):
  """A token table used for the lookup and, through a hidden layer, as the output layer."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(V, D, param_dtype=jnp.float64)
    h = jnp.tanh(nn.Dense(D, param_dtype=jnp.float64, name="hidden")(emb(tokens)))
    return emb.attend(h)


@pytest.mark.filterwarnings("ignore:sngd. fisher=.tied. with max_norm=None")
@pytest.mark.parametrize("injected", [pytest.param("damping", marks=pytest.mark.slow),
                                      "factor_every"])
def test_row_mask_tied_embedding_injected_hyperparams_under_multisteps(injected):
  """A tied table (``fisher={"Embed_0": "tied"}``) masked by token, its sngd built by
  ``optax.inject_hyperparams`` (``damping``, or ``factor_every``, which ``MultiSteps``
  cannot read at trace time) inside ``MultiSteps`` over two micro-batches: the lookup's
  frequencies and the output layer's ``E[h h^T]`` are those of the real tokens of both, and
  the table's update is ``(diag(f) + rho_D I)^{-1} g_E (G_h + rho_G I)^{-1}`` in float64."""
  rng = np.random.default_rng(4)
  model = _TiedLM()
  micro = [tokens_of(rng, [5, 2], 5), tokens_of(rng, [1, 4, 3], 4)]
  params = model.init(jax.random.key(2), jnp.asarray(micro[0][0]))["params"]
  kw = dict(decay=0.0, prior="none", max_norm=None, inverse_every=1,
            fisher={"Embed_0": "tied"})
  hyper = dict(damping=ref.DAMPING, factor_every=1)
  static = {k: v for k, v in hyper.items() if k != injected}
  inner = optax.inject_hyperparams(functools.partial(sngd_jax.sngd, **kw, **static))(
      **{injected: hyper[injected]})
  tx = sngd_jax.MultiSteps(inner, every_k_schedule=2, use_grad_mean=False,
                           accumulator_dtype=jnp.float64)
  loss = sngd_jax.capture(lm_loss(model))
  state, grad_sum = tx.init(params), None
  for tokens, mask in micro:
    (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(
        params, jnp.asarray(tokens), jnp.asarray(mask))
    updates, state = jax.jit(lambda g, s, a: tx.update(g, s, params, activations=a))(
        grads, state, sngd_jax.with_row_mask(acts, mask))
    grad_sum = grads if grad_sum is None else jax.tree.map(jnp.add, grad_sum, grads)
  factors = only_sngd_state(state.inner_opt_state).factors
  p = jax.tree.map(np64, params)
  emb = p["Embed_0"]["embedding"]
  toks = np.concatenate([t[m] for t, m in micro])
  e = emb[toks]
  h = np.tanh(e @ p["hidden"]["kernel"] + p["hidden"]["bias"])
  freq = np.bincount(toks, minlength=V) / toks.size
  close(factors["Embed_0"], freq)
  close(factors["Embed_0[attend]"], gram(h, bias=False))
  close(factors["hidden"], gram(e))
  g_e = np64(grad_sum["Embed_0"]["embedding"])
  rows = g_e / (freq + ref.DAMPING * freq.sum())[:, None]
  want = ref.damped_solve(gram(h, bias=False), rows.T).T
  close(updates["Embed_0"]["embedding"], want, rtol=1e-8)
  k, b = ref.dense_update(e, grad_sum["hidden"]["kernel"], grad_sum["hidden"]["bias"])
  close(updates["hidden"]["kernel"], k, rtol=1e-8)
  close(updates["hidden"]["bias"], b, rtol=1e-8)


# --- row mask x TrainState x MultiSteps x host refresh x tied embedding ------------------

class _MLP(nn.Module):
  param_dtype: Any = jnp.float64

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(HandDense(H, param_dtype=self.param_dtype, name="hand")(x))
    return nn.Dense(3, param_dtype=self.param_dtype, name="head")(h)


@pytest.mark.parametrize("host", [pytest.param(False, marks=pytest.mark.slow), True])
def test_example_mask_trainstate_multisteps_host_refresh_is_the_float64_solve(host,
                                                                             monkeypatch):
  """Batches padded to a fixed size (a ``(B,)`` mask, 5 and 2 real examples of 7, the
  padding far out of scale), float32, ``sngd_jax.TrainState`` around ``MultiSteps`` around
  ``chain(sngd(inverse=...), sgd(lr))``, the refresh in XLA or on the host
  (``sngd_jax.inverse.host_refresh``, float32 only: float64 factors keep the XLA refresh):
  the new params are ``p - lr * (G + rho I)^{-1} g`` with ``G`` the float64 factor of the 7
  real examples and ``g`` the summed gradient, to float32 rounding."""
  from sngd_jax._src.inverse import host as host_lib
  calls = []
  refresh_all = host_lib.refresh_all
  monkeypatch.setattr(host_lib, "refresh_all",
                      lambda *a, **k: calls.append(1) or refresh_all(*a, **k))
  rng = np.random.default_rng(5)
  model, lr = _MLP(jnp.float32), 0.1
  batches = []
  for real in (5, 2):
    x = rng.normal(size=(7, 4)) * np.r_[np.ones(real), 50 * np.ones(7 - real)][:, None]
    batches.append((np.float32(x), rng.integers(0, 3, 7),
                    (np.arange(7) < real).astype(np.float32)))
  method = sngd_jax.inverse.auto()
  if host:
    method = sngd_jax.inverse.host_refresh(method)

  def loss_fn(p, x, y, m):
    lo = optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x), y)
    return (lo * m).sum()

  with jax.enable_x64(False):
    params = model.init(jax.random.key(3), jnp.ones((1, 4)))["params"]
    sngd = sngd_jax.sngd(**ONE_STEP, inverse_every=1, damping=ref.DAMPING, inverse=method)
    tx = sngd_jax.MultiSteps(optax.chain(sngd, optax.sgd(lr)), every_k_schedule=2,
                             use_grad_mean=False)
    state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=tx)

    @jax.jit
    def step(state, x, y, m):
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
          state.params, x, y, m)
      return state.apply_gradients(grads=grads,
                                   activations=sngd_jax.with_row_mask(acts, m > 0))

    grad_sum = None
    for x, y, m in batches:
      state = step(state, jnp.asarray(x), jnp.asarray(y), jnp.asarray(m))
      g = jax.grad(loss_fn)(params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(m))
      grad_sum = g if grad_sum is None else jax.tree.map(jnp.add, grad_sum, g)
    jax.block_until_ready(state)
  assert len(calls) == (1 if host else 0)  # the one refresh, of the emitting call
  p = jax.tree.map(np64, params)
  xs = np.concatenate([np64(x[m > 0]) for x, _, m in batches])
  h = np.tanh(xs @ p["hand"]["kernel"] + p["hand"]["bias"])
  for path, rows in (("hand", xs), ("head", h)):
    k, b = ref.dense_update(rows, grad_sum[path]["kernel"], grad_sum[path]["bias"])
    scale = lr * max(np.abs(k).max(), np.abs(b).max())
    close(state.params[path]["kernel"], p[path]["kernel"] - lr * k, rtol=1e-3,
          atol=1e-4 * scale)
    close(state.params[path]["bias"], p[path]["bias"] - lr * b, rtol=1e-3, atol=1e-4 * scale)


# --- Equinox: row mask x dense_layer x rfim x MultiSteps --------------------------------

def _eqx_classes():
  eqx = pytest.importorskip("equinox")
  from eqx_layers import EqxLinear, EqxNet  # noqa: PLC0415 (Equinox is optional here)

  return eqx, EqxLinear, EqxNet


@pytest.mark.parametrize("fisher", [pytest.param("linear", marks=pytest.mark.slow), "rfim"])
def test_eqx_dense_layer_row_mask_multisteps(fisher):
  """An Equinox model (a ``@sngd_jax.dense_layer`` layer and ``eqx.nn.Linear``) called
  under ``jax.vmap`` over the batch and the tokens, masked by token, accumulated by
  ``MultiSteps`` over micro-batches of (2, 5) and (3, 3) tokens with 6 and 4 real: the
  factors (``E[x~ x~^T]``, or per unit ``E[sigmoid(z_j)^2 x~ x~^T]``) are those of the 10
  real tokens' float64 rows."""
  eqx, EqxLinear, EqxNet = _eqx_classes()
  k = jax.random.split(jax.random.key(4), 2)
  lin = eqx.nn.Linear(4, H, key=k[0], dtype=jnp.float64)
  model = EqxNet(EqxLinear(lin.weight, lin.bias),
                 eqx.nn.Linear(H, 2, key=k[1], dtype=jnp.float64))
  params = eqx.filter(model, eqx.is_inexact_array)
  rng = np.random.default_rng(6)
  micro = []
  for lengths, t in (([5, 1], 5), ([2, 0, 2], 3)):
    mask = lengths_mask(lengths, t)
    micro.append((rng.normal(size=mask.shape + (4,)) * np.where(mask, 1, 30)[..., None], mask))
  fishers = {"hidden": fisher, "head": fisher}
  tx = sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP, fisher=fishers), every_k_schedule=2)
  state = tx.init(params)
  loss = sngd_jax.capture_eqx(
      lambda m, x, mask: ((jax.vmap(jax.vmap(m))(x) ** 2).sum(-1) * mask).sum(),
      outputs=fisher == "rfim")
  for x, mask in micro:
    (_, acts), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, jnp.asarray(x), jnp.asarray(mask))
    _, state = tx.update(grads, state, params,
                         activations=sngd_jax.with_row_mask(acts, jnp.asarray(mask)))
  factors = only_sngd_state(state.inner_opt_state).factors
  xs = np.concatenate([x[m] for x, m in micro])
  z = xs @ np64(lin.weight).T + np64(lin.bias)
  h = np.tanh(z)
  zo = h @ np64(model.head.weight).T + np64(model.head.bias)
  hidden = next(p for p in factors if p.startswith("hidden"))
  head = next(p for p in factors if p.startswith("head"))
  if fisher == "linear":
    close(factors[hidden], gram(xs))
    close(factors[head], gram(h))
  else:
    close(factors[hidden], rfim(xs, z))
    close(factors[head], rfim(h, zo))


# --- sngd_jax.dense x jax.checkpoint x row mask (linen, NNX, Equinox) -------------------

class _CheckpointedDense(nn.Module):
  """A hand-written layer that rematerializes its product: ``jax.checkpoint`` of a function
  of the input and the params, passed as arguments."""

  features: int
  mode: str = "arguments"

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                   jnp.float64)
    b = self.param("bias", nn.initializers.normal(0.5), (self.features,), jnp.float64)
    if self.mode == "closed over":
      return jax.checkpoint(lambda x: sngd_jax.dense(x, w, b))(x)
    if self.mode == "vmap per example":  # the params broadcast to every example
      return jax.vmap(jax.checkpoint(lambda x, w, b: sngd_jax.dense(x, w, b)),
                      in_axes=(0, None, None))(x, w, b)
    return jax.checkpoint(lambda x, w, b: sngd_jax.dense(x, w, b))(x, w, b)


class _CheckpointedNet(nn.Module):
  mode: str = "arguments"

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(_CheckpointedDense(H, self.mode, name="hand")(x))
    return nn.Dense(2, param_dtype=jnp.float64, name="head")(h)


def _masked_sequences(seed, lengths, t, d):
  rng = np.random.default_rng(seed)
  mask = lengths_mask(lengths, t)
  return rng.normal(size=mask.shape + (d,)) * np.where(mask, 1, 30)[..., None], mask


def _one_step_update(params, grads, acts):
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  return updates, state


@pytest.mark.parametrize("mode", ["arguments", "closed over", "vmap per example"])
def test_linen_dense_under_jax_checkpoint_inside_the_module_with_a_row_mask(mode):
  """``jax.checkpoint`` inside a hand-written linen layer, the params passed to it as
  arguments (before: refused as 'not one of its params', though they are), closed over, or
  passed to a ``jax.vmap`` over the examples (``in_axes=None``) of the checkpointed product:
  the layer is recorded and its masked update is the damped float64 solve over the real
  tokens."""
  x, mask = _masked_sequences(7, [4, 1, 3], 4, 3)
  model = _CheckpointedNet(mode)
  params = model.init(jax.random.key(5), jnp.asarray(x))["params"]
  loss = lambda p: (jnp.sin(model.apply({"params": p}, jnp.asarray(x))).sum(-1) * mask).sum()
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  updates, _ = _one_step_update(params, grads, sngd_jax.with_row_mask(acts, mask))
  p = jax.tree.map(np64, params)
  h = np.tanh(x @ p["hand"]["kernel"] + p["hand"]["bias"])
  for path, rows in (("hand", x[mask]), ("head", h[mask])):
    k, b = ref.dense_update(rows, grads[path]["kernel"], grads[path]["bias"])
    close(updates[path]["kernel"], k, rtol=1e-9)
    close(updates[path]["bias"], b, rtol=1e-9)


class _VmappedHeads(nn.Module):
  """An ensemble of 3 heads with stacked params, applied by ``jax.vmap`` inside the module:
  each head's call of ``sngd_jax.dense`` gets a slice of the stack."""

  @nn.compact
  def __call__(self, x):
    w = self.param("kernel", nn.initializers.lecun_normal(), (3, x.shape[-1], 2), jnp.float64)
    b = self.param("bias", nn.initializers.normal(0.5), (3, 2), jnp.float64)
    return jax.vmap(lambda w, b: sngd_jax.dense(x, w, b))(w, b)


def test_linen_dense_of_params_vmapped_inside_the_module_is_one_factor_per_head():
  """Followed out through the ``jax.vmap``, the stacked params are the layer's (before:
  refused as 'not one of its params'): one factor per head, each the float64
  ``E[x~ x~^T]`` of the real tokens, and each head's update the damped solve."""
  x, mask = _masked_sequences(15, [2, 3], 3, 4)
  model = _VmappedHeads()
  params = model.init(jax.random.key(11), jnp.asarray(x))["params"]
  loss = lambda p: (jnp.sin(model.apply({"params": p}, jnp.asarray(x))).sum((0, -1))
                    * mask).sum()
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  updates, state = _one_step_update(params, grads, sngd_jax.with_row_mask(acts, mask))
  (factor,) = state.factors.values()
  close(factor, np.stack([gram(x[mask])] * 3))
  for i in range(3):
    k, b = ref.dense_update(x[mask], grads["kernel"][i], grads["bias"][i])
    close(updates["kernel"][i], k, rtol=1e-9)
    close(updates["bias"][i], b, rtol=1e-9)


class _NNXCheckpointed(nnx.Module):
  """A hand-written NNX layer whose product runs under ``jax.checkpoint``."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (3, H), jnp.float64) / 2)
    self.bias = nnx.Param(jax.random.normal(rngs.params(), (H,), jnp.float64) / 2)
    self.head = nnx.Linear(H, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    h = jax.checkpoint(lambda x, k, b: sngd_jax.dense(x, k, b))(x, self.kernel[...],
                                                                self.bias[...])
    return self.head(jnp.tanh(h))


def test_nnx_dense_under_jax_checkpoint_with_a_row_mask():
  x, mask = _masked_sequences(8, [2, 4], 4, 3)
  model = _NNXCheckpointed(nnx.Rngs(0))
  loss = lambda m, x: (jnp.sin(m(x)).sum(-1) * mask).sum()
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(
      model, jnp.asarray(x))
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1)
  updates, _ = tx.update(grads, tx.init(params), params,
                         activations=sngd_jax.with_row_mask(acts, mask))
  k, b = ref.dense_update(x[mask], grads["kernel"][...], grads["bias"][...])
  close(updates["kernel"][...], k, rtol=1e-9)
  close(updates["bias"][...], b, rtol=1e-9)


def test_eqx_dense_layer_under_jax_checkpoint_with_a_row_mask():
  eqx, EqxLinear, EqxNet = _eqx_classes()

  @sngd_jax.dense_layer
  class Checkpointed(eqx.Module):
    weight: jax.Array
    bias: jax.Array

    def __call__(self, x):
      return jax.checkpoint(lambda x, w, b: sngd_jax.dense(x, w, b, layout="out_in"))(
          x, self.weight, self.bias)

  k = jax.random.split(jax.random.key(6), 2)
  lin = eqx.nn.Linear(3, H, key=k[0], dtype=jnp.float64)
  model = EqxNet(Checkpointed(lin.weight, lin.bias),
                 eqx.nn.Linear(H, 2, key=k[1], dtype=jnp.float64))
  x, mask = _masked_sequences(9, [1, 4, 2], 4, 3)
  loss = sngd_jax.capture_eqx(
      lambda m, x: (jnp.sin(jax.vmap(jax.vmap(m))(x)).sum(-1) * mask).sum())
  (_, acts), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model, jnp.asarray(x))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1)
  updates, _ = tx.update(grads, tx.init(params), params,
                         activations=sngd_jax.with_row_mask(acts, mask))
  w, b = ref.dense_update(x[mask], np64(grads.hidden.weight).T, grads.hidden.bias)
  close(np64(updates.hidden.weight).T, w, rtol=1e-9)
  close(updates.hidden.bias, b, rtol=1e-9)


# --- sngd_jax.dense x mixed precision x rfim x row mask x stats_batch_size --------------

class _MixedNet(nn.Module):
  """bfloat16 activations, float32 params: the hidden layer hand-written or nn.Dense."""

  hand: bool

  @nn.compact
  def __call__(self, x):
    if self.hand:
      h = HandDense(H, jnp.bfloat16, jnp.float32, name="hand")(x)
    else:
      h = nn.Dense(H, dtype=jnp.bfloat16, param_dtype=jnp.float32, name="Dense_0")(x)
    return nn.Dense(2, dtype=jnp.bfloat16, param_dtype=jnp.float32, name="head")(jnp.tanh(h))


@pytest.mark.parametrize("fisher", ["linear", pytest.param("rfim", marks=pytest.mark.slow)])
def test_dense_bf16_activations_f32_params_row_mask_stats_batch_size(fisher):
  """``sngd_jax.dense(..., dtype=bfloat16)`` on float32 params, masked by token, statistics
  from the first 2 of 3 sequences: the factor is float32, equal to ``nn.Dense(dtype=bf16)``'s
  (before, the hand-written layer recorded its bfloat16-cast input: 0.4% off) and to the
  float64 estimate from the input rows of the real tokens of those 2 sequences (``rfim``: with
  the bfloat16 pre-activations); the update is float32 and finite."""
  x, mask = _masked_sequences(10, [3, 1, 4], 4, 5)
  with jax.enable_x64(False):
    states = {}
    for hand in (True, False):
      model = _MixedNet(hand)
      params = model.init(jax.random.key(7), jnp.ones((1, 5)))["params"]
      name = "hand" if hand else "Dense_0"
      if not hand:  # the same numbers in the built-in layer
        params = {"Dense_0": states[True][2]["hand"], "head": states[True][2]["head"]}
      loss = lambda p, model=model: (model.apply(
          {"params": p}, jnp.asarray(x, jnp.float32)).astype(jnp.float32).sum(-1) * mask).sum()
      (_, acts), grads = jax.value_and_grad(
          sngd_jax.capture(loss, outputs=fisher == "rfim"), has_aux=True)(params)
      tx = sngd_jax.sngd(**ONE_STEP, fisher=fisher, stats_batch_size=2)
      updates, state = tx.update(grads, tx.init(params), params,
                                 activations=sngd_jax.with_row_mask(acts, mask))
      states[hand] = (state.factors[name], updates[name], params)
  factor, updates, params = states[True]
  assert factor.dtype == jnp.float32
  assert all(u.dtype == jnp.float32 and np.isfinite(u).all() for u in jax.tree.leaves(updates))
  close(factor, states[False][0], rtol=1e-6, atol=1e-7)
  rows = np64(np.float32(x[:2][mask[:2]]))  # the input as passed (before the cast)
  if fisher == "linear":
    close(factor, gram(rows), rtol=1e-5, atol=1e-6)
  else:  # the pre-activations as the layer computed them, in bfloat16
    bf = lambda a: np64(jnp.asarray(a, jnp.bfloat16))
    z = bf(bf(rows) @ bf(params["hand"]["kernel"]) + bf(params["hand"]["bias"]))
    close(factor, rfim(rows, z), rtol=2e-2, atol=1e-3)


# --- a target network passed as an argument x row mask x MultiSteps ---------------------

class _Q(nn.Module):
  @nn.compact
  def __call__(self, obs):
    h = jnp.tanh(HandDense(H, name="hand")(obs))
    return nn.Dense(3, param_dtype=jnp.float64, name="q")(h)


def test_target_network_argument_row_mask_multisteps():
  """A DQN step on batches padded to 6 transitions (4 and 1 real), the target network
  passed to the captured loss after the online params (its calls, also of the hand-written
  layer, left out), ``MultiSteps`` over the two: the online factors are those of the 5 real
  observations in float64, not of the next observations the target network read; the
  update is the damped solve with the summed gradient."""
  rng = np.random.default_rng(11)
  q = _Q()
  params = q.init(jax.random.key(8), jnp.ones((1, 4)))["params"]
  target = jax.tree.map(lambda a: a + 0.3, params)
  batches = []
  for real in (4, 1):
    m = (np.arange(6) < real).astype(np.float64)
    scale = np.where(m > 0, 1.0, 40.0)[:, None]
    batches.append((rng.normal(size=(6, 4)) * scale, rng.integers(0, 3, 6),
                    rng.normal(size=(6, 4)) * 5, m))

  def td(p, tp, obs, a, next_obs, m):
    y = jax.lax.stop_gradient(1.0 + 0.9 * q.apply({"params": tp}, next_obs).max(-1))
    qa = jnp.take_along_axis(q.apply({"params": p}, obs), a[:, None], 1)[:, 0]
    return (m * (qa - y) ** 2).sum()

  inner = sngd_jax.sngd(**ONE_STEP, inverse_every=1, damping=ref.DAMPING)
  tx = sngd_jax.MultiSteps(inner, every_k_schedule=2, use_grad_mean=False,
                           accumulator_dtype=jnp.float64)

  @jax.jit
  def step(state, obs, a, next_obs, m):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(td), has_aux=True)(
        params, target, obs, a, next_obs, m)
    return tx.update(grads, state, params, activations=sngd_jax.with_row_mask(acts, m))

  state, grad_sum = tx.init(params), None
  for batch in batches:
    updates, state = step(state, *map(jnp.asarray, batch))
    g = jax.grad(td)(params, target, *map(jnp.asarray, batch))
    grad_sum = g if grad_sum is None else jax.tree.map(jnp.add, grad_sum, g)
  factors = only_sngd_state(state.inner_opt_state).factors
  p = jax.tree.map(np64, params)
  obs = np.concatenate([b[0][b[3] > 0] for b in batches])
  h = np.tanh(obs @ p["hand"]["kernel"] + p["hand"]["bias"])
  close(factors["hand"], gram(obs))
  close(factors["q"], gram(h))
  for path, rows in (("hand", obs), ("q", h)):
    k, b = ref.dense_update(rows, grad_sum[path]["kernel"], grad_sum[path]["bias"])
    close(updates[path]["kernel"], k, rtol=1e-8)
    close(updates[path]["bias"], b, rtol=1e-8)


# --- per-example gradients (jax.vmap over a captured grad) x row mask -------------------

@pytest.mark.parametrize("mask_kind", [pytest.param("examples", marks=pytest.mark.slow),
                                       "tokens"])
def test_per_example_gradients_with_a_row_mask(mask_kind):
  """``jax.vmap(grad_fn)`` over a batch of (T, D) sequences, each call one example (a
  hand-written layer and ``nn.Dense``), masked by example ``(B,)`` or by token ``(B, T)``:
  the factors are those of the real examples' (tokens') float64 rows, also with
  ``stats_batch_size=2`` (the first 2 examples, all their real tokens)."""
  x, mask = _masked_sequences(12, [3, 1, 0, 2], 3, 4)
  model = _MLP()
  params = model.init(jax.random.key(9), jnp.ones((1, 4)))["params"]
  grad_fn = jax.grad(sngd_jax.capture(
      lambda p, xs: jnp.sin(model.apply({"params": p}, xs)).sum()), has_aux=True)
  per_example, acts = jax.jit(jax.vmap(grad_fn, in_axes=(None, 0)))(params, jnp.asarray(x))
  grads = jax.tree.map(lambda g: g.mean(0), per_example)
  real = mask if mask_kind == "tokens" else mask.any(1)
  masked = sngd_jax.with_row_mask(acts, real)
  p = jax.tree.map(np64, params)
  h = np.tanh(x @ p["hand"]["kernel"] + p["hand"]["bias"])
  rows_of = lambda a, n: (a[:n][mask[:n]] if mask_kind == "tokens"
                          else a[:n][real[:n]].reshape(-1, a.shape[-1]))
  for sub in (None, 2):
    n = len(x) if sub is None else sub
    state = factors_after_one_step(params, grads, masked, stats_batch_size=sub)
    close(state.factors["hand"], gram(rows_of(x, n)))
    close(state.factors["head"], gram(rows_of(h, n)))


class _NNXHandQ(nnx.Module):
  """A hand-written NNX layer (``nnx.Param`` kernel and bias, ``sngd_jax.dense``) and a
  ``nnx.Linear`` head."""

  def __init__(self, rngs):
    self.kernel = nnx.Param(jax.random.normal(rngs.params(), (4, H), jnp.float64) / 2)
    self.bias = nnx.Param(jax.random.normal(rngs.params(), (H,), jnp.float64) / 2)
    self.q = nnx.Linear(H, 3, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return self.q(jnp.tanh(sngd_jax.dense(x, self.kernel, self.bias)))


def test_nnx_target_network_argument_row_mask_multisteps():
  """NNX: ``loss_fn(model, target, ...)`` with a hand-written layer in both, batches padded
  to 5 (3 and 2 real), ``nnx.Optimizer`` of ``MultiSteps``: the online factors are the
  float64 ones of the 5 real observations, not the target's next observations."""
  rng = np.random.default_rng(13)
  model = _NNXHandQ(nnx.Rngs(1))
  target = nnx.clone(model)
  opt = nnx.Optimizer(model, sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP),
                                                 every_k_schedule=2), wrt=nnx.Param)

  def td_loss(model, target, obs, next_obs, m):
    y = jax.lax.stop_gradient(1.0 + 0.9 * target(next_obs).max(-1))
    return (m * (model(obs)[:, 0] - y) ** 2).sum()

  kernel, bias = np64(model.kernel[...]), np64(model.bias[...])
  real_obs = []
  for real in (3, 2):
    m = (np.arange(5) < real).astype(np.float64)
    obs = rng.normal(size=(5, 4)) * np.where(m > 0, 1, 40)[:, None]
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(td_loss), has_aux=True)(
        model, target, jnp.asarray(obs), jnp.asarray(rng.normal(size=(5, 4)) * 5),
        jnp.asarray(m))
    opt.update(model, grads, activations=sngd_jax.with_row_mask(acts, m))
    real_obs.append(obs[m > 0])
  (state,) = sngd_jax._src.state.sngd_states(opt.opt_state)
  obs = np.concatenate(real_obs)
  close(state.factors["kernel"] if "kernel" in state.factors else state.factors[""],
        gram(obs))
  close(state.factors["q"], gram(np.tanh(obs @ kernel + bias)))


def test_eqx_target_network_argument_row_mask():
  """Equinox: the target model passed after the online one, both called under ``jax.vmap``
  over the batch; a ``(B,)`` mask: the online factors are those of the real observations."""
  eqx, EqxLinear, EqxNet = _eqx_classes()
  k = jax.random.split(jax.random.key(10), 2)
  lin = eqx.nn.Linear(4, H, key=k[0], dtype=jnp.float64)
  model = EqxNet(EqxLinear(lin.weight, lin.bias),
                 eqx.nn.Linear(H, 3, key=k[1], dtype=jnp.float64))
  target = jax.tree.map(lambda a: a + 0.2 if eqx.is_inexact_array(a) else a, model)
  rng = np.random.default_rng(14)
  m = (np.arange(6) < 4).astype(np.float64)
  obs = rng.normal(size=(6, 4)) * np.where(m > 0, 1, 40)[:, None]
  next_obs = rng.normal(size=(6, 4)) * 5

  def td_loss(model, target, obs, next_obs):
    y = jax.lax.stop_gradient(1.0 + 0.9 * jax.vmap(target)(next_obs).max(-1))
    return (m * (jax.vmap(model)(obs)[:, 0] - y) ** 2).sum()

  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(td_loss), has_aux=True)(
      model, target, jnp.asarray(obs), jnp.asarray(next_obs))
  params = eqx.filter(model, eqx.is_inexact_array)
  state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, m))
  hidden = next(p for p in state.factors if p.startswith("hidden"))
  head = next(p for p in state.factors if p.startswith("head"))
  real = obs[m > 0]
  close(state.factors[hidden], gram(real))
  close(state.factors[head], gram(np.tanh(real @ np64(lin.weight).T + np64(lin.bias))))


def test_eqx_dense_layer_stacked_by_filter_vmap_scanned_with_a_row_mask_and_checkpoint():
  """Equinox: 2 hand-written layers made by ``eqx.filter_vmap`` and applied by
  ``jax.lax.scan`` over depth with ``jax.checkpoint`` on the step, the model under
  ``jax.vmap`` over the batch and the tokens, masked by token under ``MultiSteps`` over two
  micro-batches: each layer of the stack's factor is that of its float64 inputs at the
  real tokens of both."""
  eqx, EqxLinear, _ = _eqx_classes()

  class Stack(eqx.Module):
    blocks: Any

    def __call__(self, x):
      params, static = eqx.partition(self.blocks, eqx.is_array)

      @jax.checkpoint
      def step(h, p):
        return jnp.tanh(eqx.combine(p, static)(h)), None
      return jax.lax.scan(step, x, params)[0]

  keys = jax.random.split(jax.random.key(12), 2)
  lins = eqx.filter_vmap(lambda k: eqx.nn.Linear(4, 4, key=k, dtype=jnp.float64))(keys)
  model = Stack(EqxLinear(lins.weight, lins.bias))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.MultiSteps(sngd_jax.sngd(**ONE_STEP), every_k_schedule=2)
  state = tx.init(params)
  loss = sngd_jax.capture_eqx(
      lambda m, x, mask: ((jax.vmap(jax.vmap(m))(x) ** 2).sum(-1) * mask).sum())
  micro = [_masked_sequences(16, [3, 1], 3, 4), _masked_sequences(17, [2, 0, 3], 3, 4)]
  ins = [[], []]
  for x, mask in micro:
    (_, acts), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
        model, jnp.asarray(x), jnp.asarray(mask))
    _, state = tx.update(grads, state, params,
                         activations=sngd_jax.with_row_mask(acts, jnp.asarray(mask)))
    h = x
    for k in range(2):
      ins[k].append(h[mask])
      h = np.tanh(h @ np64(lins.weight[k]).T + np64(lins.bias[k]))
  (factor,) = only_sngd_state(state.inner_opt_state).factors.values()
  close(factor, np.stack([gram(np.concatenate(r)) for r in ins]))


# --- a PINN (per-point vmap through input derivatives) x a padded batch of points -------

class _PointMLP(nn.Module):
  """``u(x)`` for one point ``x`` of shape ``(2,)``."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(HandDense(H, name="hand")(x))
    return nn.Dense(1, param_dtype=jnp.float64, name="out")(h)[..., 0]


def test_pinn_padded_interior_points_masked_by_call():
  """A Poisson PINN whose interior points are padded to a fixed 8 (6 real, the padding far
  outside the domain) and whose 4 boundary points are not: the ``(8,)`` mask cannot apply to
  the boundary call (before: an error without a way out; now it names ``calls=``), and
  ``with_row_mask(acts, mask, calls=[0])`` masks the interior call only. The factors are the
  float64 ``E[x~ x~^T]`` over the 6 real interior and the 4 boundary points, each once
  (through the Hessian's derivative transforms), and the update is the damped solve."""
  model = _PointMLP()
  xi = np.random.default_rng(18).uniform(size=(8, 2))
  xi[6:] = 50.0
  xb = np.random.default_rng(19).uniform(size=(4, 2))
  mi = (np.arange(8) < 6).astype(np.float64)
  params = model.init(jax.random.key(13), jnp.asarray(xi[0]))["params"]
  u = lambda p, x: model.apply({"params": p}, x)

  def loss(p, xi, xb, mi):
    lap = jax.vmap(lambda x: jnp.trace(jax.hessian(u, argnums=1)(p, x)))(xi)
    return jnp.sum(mi * (lap + 1.0) ** 2) / mi.sum() + jnp.mean(jax.vmap(lambda x: u(p, x))(
        xb) ** 2)

  (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
      params, jnp.asarray(xi), jnp.asarray(xb), jnp.asarray(mi))
  with pytest.raises(ValueError, match=r"'hand' \(call 1.*length 4, not the mask's 8.*"
                                       r"calls=\[\.\.\.\]"):
    sngd_jax.with_row_mask(acts, mi)
  with pytest.raises(TypeError, match=r"calls=0.*sequence of call indices"):
    sngd_jax.with_row_mask(acts, mi, calls=0)
  updates, state = _one_step_update(params, grads,
                                    sngd_jax.with_row_mask(acts, mi, calls=[0]))
  p = jax.tree.map(np64, params)
  pts = np.concatenate([xi[:6], xb])
  h = np.tanh(pts @ p["hand"]["kernel"] + p["hand"]["bias"])
  for path, rows in (("hand", pts), ("out", h)):
    close(state.factors[path], gram(rows))
    k, b = ref.dense_update(rows, grads[path]["kernel"], grads[path]["bias"])
    close(updates[path]["kernel"], k, rtol=1e-9)
    close(updates[path]["bias"], b, rtol=1e-9)
  # the last call by a negative index: the same as calls=[1] (the boundary: all real)
  same = sngd_jax.with_row_mask(acts, jnp.ones(4), calls=[-1])
  assert same["hand"][0].row_mask is None and same["hand"][1].row_mask is not None
