"""Dense layers over extra axes: DenseGeneral, attention projections, Einsum; one update
vs a float64 reference, and a one-block transformer smoke test."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from helpers_train import assert_trains, softmax_loss
from np_reference import assert_dense_update

import sngd_jax

F64 = dict(param_dtype=jnp.float64)


pytestmark = pytest.mark.usefixtures("x64")


def _one_step(model, params, *inputs, fisher="linear"):
  loss = lambda p, *a: jnp.sum(jnp.sin(model.apply({"params": p}, *a)))
  kwargs = ref.one_step_kwargs()
  tx = sngd_jax.sngd(fisher=fisher, **kwargs)

  @jax.jit
  def step(params, *inputs):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
        params, *inputs)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates

  return step(params, *inputs)


class General(nn.Module):
  @nn.compact
  def __call__(self, x, x4):
    a = nn.DenseGeneral((2, 3), axis=-1, name="heads", **F64)(x)        # (B, T, 2, 3)
    b = nn.DenseGeneral(4, axis=(1, 3), name="middle", **F64)(x4)       # (B, T, 4)
    c = nn.DenseGeneral(5, axis=(-2, -1), name="merge", **F64)(a)        # (B, T, 5)
    return jnp.sum(a) + jnp.sum(b ** 2) + jnp.sum(jnp.tanh(c))


def test_dense_general_multi_axis():
  """Rows: every non-contracted position; features: contracted axes in kernel order."""
  x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
  x4 = jax.random.normal(jax.random.key(2), (2, 3, 5, 2), jnp.float64)   # contract 1, 3
  model = General()
  params = model.init(jax.random.key(0), x, x4)["params"]
  grads, updates = _one_step(model, params, x, x4)
  xn, x4n = np.asarray(x), np.asarray(x4)
  assert_dense_update(np.array([xn[b, t] for b in range(2) for t in range(3)]), grads["heads"],
                      updates["heads"])
  rows = np.array([[x4n[b, i, t, j] for i in range(3) for j in range(2)]
                   for b in range(2) for t in range(5)])
  assert_dense_update(rows, grads["middle"], updates["middle"])
  a = np.einsum("btd,dhk->bthk", xn, np.asarray(params["heads"]["kernel"])) + np.asarray(
      params["heads"]["bias"])
  assert_dense_update(np.array([a[b, t].ravel() for b in range(2) for t in range(3)]),
                      grads["merge"], updates["merge"])


class Attn(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=6, name="attn", **F64)(x)


def test_attention_projections():
  """q/k/v rows are the tokens; out rows are the per-head attention outputs (numpy MHA)."""
  x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
  model = Attn()
  params = model.init(jax.random.key(0), x)["params"]
  grads, updates = _one_step(model, params, x)
  p = jax.tree.map(np.asarray, params["attn"])
  heads = ref.mha_forward(p, x, num_heads=2)                     # (B, T, H, hd)
  out = np.einsum("bthk,hkd->btd", heads, p["out"]["kernel"]) + p["out"]["bias"]
  np.testing.assert_allclose(model.apply({"params": params}, x), out, atol=1e-12)
  tokens = np.asarray(x).reshape(-1, 4)
  for name in ("query", "key", "value"):
    assert_dense_update(tokens, grads["attn"][name], updates["attn"][name])
  assert_dense_update(heads.reshape(10, -1), grads["attn"]["out"], updates["attn"]["out"])


class Ein(nn.Module):
  @nn.compact
  def __call__(self, x, xm):
    a = nn.Einsum((4, 2, 3), "btd,dhk->bthk", name="proj", **F64)(x)
    b = nn.Einsum((3, 2), "bdt,dk->btk", name="middle", **F64)(xm)
    c = nn.Einsum((4, 5), "...d,dk->...k", use_bias=False, name="ellipsis", **F64)(x)
    return jnp.sum(jnp.tanh(a)) + jnp.sum(b ** 2) + jnp.sum(c ** 3)


def test_einsum_layouts():
  x = jax.random.normal(jax.random.key(1), (2, 3, 4), jnp.float64)
  xm = jax.random.normal(jax.random.key(2), (2, 3, 5), jnp.float64)
  model = Ein()
  params = model.init(jax.random.key(0), x, xm)["params"]
  grads, updates = _one_step(model, params, x, xm)
  xn, xmn = np.asarray(x), np.asarray(xm)
  tokens = np.array([xn[b, t] for b, t in itertools.product(range(2), range(3))])
  assert_dense_update(tokens, grads["proj"], updates["proj"])
  assert_dense_update(tokens, grads["ellipsis"], updates["ellipsis"])
  rows = np.array([xmn[b, :, t] for b, t in itertools.product(range(2), range(5))])
  assert_dense_update(rows, grads["middle"], updates["middle"])


def test_einsum_with_unsupported_layout_is_reported_missing_not_guessed():
  """A kernel whose contracted axes are not leading is not captured: update raises."""
  class Odd(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Einsum((3, 4), "btd,kd->btk", use_bias=False)(x)

  x = jnp.ones((2, 3, 4))
  model = Odd()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x))
  report = sngd_jax.coverage(loss, params, x)
  assert report.missing == ["Einsum_0/kernel"]
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="Einsum_0"):
    tx.update(grads, tx.init(params), params, activations=acts)


# --- one-block transformer smoke test ---------------------------------------------

class Block(nn.Module):
  vocab: int
  dim: int = 32

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[1]
    h = nn.Embed(self.vocab, self.dim)(tokens)
    h = h + self.param("pos", nn.initializers.normal(0.02), (t, self.dim))
    mask = nn.make_causal_mask(tokens)
    h = h + nn.MultiHeadDotProductAttention(num_heads=4)(nn.LayerNorm()(h), mask=mask)
    m = nn.LayerNorm()(h)
    h = h + nn.Dense(self.dim)(nn.gelu(nn.Dense(4 * self.dim)(m)))
    return nn.Dense(self.vocab)(nn.LayerNorm()(h))


def test_one_block_transformer_trains_and_every_parameter_is_covered():
  with jax.enable_x64(False):
    vocab, period = 12, 7
    rng = np.random.default_rng(0)
    pattern = rng.integers(0, vocab, period)

    def batch():
      starts = rng.integers(0, period, 32)
      seq = np.stack([pattern[(s + np.arange(17)) % period] for s in starts]).astype(np.int32)
      return seq[:, :-1], seq[:, 1:]

    model = Block(vocab)
    x, y = batch()
    params = model.init(jax.random.key(0), x)["params"]

    loss_fn = softmax_loss(lambda p, x: model.apply({"params": p}, x))

    report = sngd_jax.coverage(loss_fn, params, x, y)
    assert report.missing == []
    # the learned positional table is the only leaf of no layer, and it is listed as such
    assert report.pass_through == ["pos"]
    assert len(report.preconditioned) == len(jax.tree.leaves(params)) - 1

    eval_batch = batch()
    batches = [batch() for _ in range(40)]
    assert_trains(loss_fn, params, batches, eval_batch=eval_batch, learning_rate=0.05,
                  max_ratio=0.5)


def test_bias_free_projections_need_and_accept_their_input_axes():
  """(D, heads, head_dim) kernels without bias: the report says how to split them."""
  class NoBias(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.MultiHeadDotProductAttention(num_heads=2, use_bias=False, name="attn", **F64)(x)

  x = jax.random.normal(jax.random.key(1), (2, 5, 4), jnp.float64)
  model = NoBias()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x))
  report = sngd_jax.coverage(loss, params, x)
  kinds = {p.path: p.fisher for p in report.params}
  assert "fisher={'attn/query': ('linear', 1)}" in kinds["attn/query/kernel"]
  assert kinds["attn/out/kernel"] == "linear/dense 4x4"      # single output axis: fine
  fisher = {f"attn/{n}": ("linear", 1) for n in ("query", "key", "value")}
  assert sngd_jax.coverage(loss, params, x, fisher=fisher).missing == []
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  tx = sngd_jax.sngd(fisher=fisher, **ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  assert_dense_update(np.asarray(x).reshape(-1, 4), grads["attn"]["query"],
                      updates["attn"]["query"])
