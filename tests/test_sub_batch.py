"""stats_batch_size selects the first k examples (all their rows), for every layer kind.

One update with the batch's statistics from its first ``k`` examples only,
against a float64 reference that builds each layer's rows from those examples
alone: dense rows, conv patches, attention tokens (and per-head outputs), and
every time step of an LSTM run by ``nn.RNN`` (whose captured rows are
time-major, ``T * B``).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from helpers_warnings import no_sngd_warnings
from np_reference import assert_dense_update

import sngd_jax

F64 = dict(param_dtype=jnp.float64)
B, K, T = 5, 2, 4


pytestmark = pytest.mark.usefixtures("x64")


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, vec, img, seq):
    d = nn.Dense(3, name="dense", **F64)(vec)
    c = nn.Conv(3, (3, 3), padding="VALID", name="conv", **F64)(img)
    a = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, name="attn", **F64)(seq)
    h = nn.RNN(nn.LSTMCell(3, param_dtype=jnp.float64), name="rnn")(seq)
    return jnp.sum(jnp.sin(d)) + jnp.sum(jnp.sin(c)) + jnp.sum(jnp.sin(a)) + jnp.sum(
        jnp.sin(h))


def test_statistics_of_the_first_examples_for_dense_conv_attention_and_lstm():
  keys = jax.random.split(jax.random.key(1), 3)
  vec = jax.random.normal(keys[0], (B, 6), jnp.float64)
  img = jax.random.normal(keys[1], (B, 5, 5, 2), jnp.float64)
  seq = jax.random.normal(keys[2], (B, T, 4), jnp.float64)
  model = Mixed()
  params = model.init(jax.random.key(0), vec, img, seq)["params"]
  loss = lambda p: model.apply({"params": p}, vec, img, seq)
  tx = sngd_jax.sngd(stats_batch_size=K, **ref.one_step_kwargs())

  @jax.jit
  def step(params):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  grads, updates, acts = step(params)
  p = jax.tree.map(np.asarray, params)
  first = lambda a: np.asarray(a)[:K]
  assert_dense_update(first(vec), grads["dense"], updates["dense"], "dense")
  patches, _ = ref.conv_patches(first(img), (3, 3), (1, 1), "VALID", (1, 1), (1, 1), 1)
  assert_dense_update(patches, grads["conv"], updates["conv"], "conv")
  tokens = first(seq).reshape(-1, 4)
  for name in ("query", "key", "value"):
    assert_dense_update(tokens, grads["attn"][name], updates["attn"][name], name)
  heads = ref.mha_forward(p["attn"], first(seq), num_heads=2)
  assert_dense_update(heads.reshape(K * T, -1), grads["attn"]["out"], updates["attn"]["out"], "out")
  (cell,) = set(p) - {"dense", "conv", "attn"}  # the cell is Mixed's child, shared by the scan
  h_prev, _ = ref.lstm_forward(p[cell], first(seq))
  assert acts[f"{cell}/hi"][0].time_steps == T
  for names, rows in ((("ii", "if", "ig", "io"), tokens),
                      (("hi", "hf", "hg", "ho"), h_prev.reshape(-1, 3))):
    for name in names:
      assert_dense_update(rows, grads[cell][name], updates[cell][name], name)


def test_first_examples_of_time_major_rows():
  x = jnp.arange(3 * 4 * 2).reshape(3 * 4, 2)  # T = 3 steps of B = 4 examples, row t * B + b
  call = sngd_jax.Captured(inputs=x, outputs=x[:, :1], time_steps=3)
  sub = call.first_examples(2)
  want = np.concatenate([np.asarray(x)[t * 4:t * 4 + 2] for t in range(3)])
  np.testing.assert_array_equal(sub.inputs, want)
  np.testing.assert_array_equal(sub.outputs, want[:, :1])
  assert sub.time_steps == 3
  np.testing.assert_array_equal(sngd_jax.Captured(inputs=x, outputs=x).first_examples(2).inputs,
                                np.asarray(x)[:2])


class Nested(nn.Module):
  """An RNN in the cell of an RNN: the inner cell's rows are T_outer * T_inner * B."""

  @nn.compact
  def __call__(self, xs):  # (B, T_outer, T_inner, F)
    return nn.RNN(_InnerCell(), name="outer")(xs)


class _InnerCell(nn.RNNCellBase):
  @nn.compact
  def __call__(self, carry, x):  # x: (B, T_inner, F)
    h = nn.RNN(nn.SimpleCell(3), name="inner")(x)
    return carry, h[:, -1]

  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(())

  @property
  def num_feature_axes(self):
    return 2


def test_nested_rnn_records_multiply_time_steps():
  with jax.enable_x64(False):  # the cells' carries are float32
    xs = jax.random.normal(jax.random.key(0), (B, 2, 3, 4))
    model = Nested()
    params = model.init(jax.random.key(1), xs)["params"]
    _, acts = sngd_jax.capture(lambda p: jnp.sum(model.apply({"params": p}, xs)))(params)
  (path,) = [p for p in acts if p.endswith("/i")]
  (call,) = acts[path]
  assert call.time_steps == 6 and call.inputs.shape == (6 * B, 4)
  # rows t * B + b (t over outer, then inner steps): the first K examples at every step
  want = np.stack([np.asarray(xs)[:K, to, ti] for to in range(2) for ti in range(3)])
  np.testing.assert_array_equal(call.first_examples(K).inputs, want.reshape(-1, 4))


# --- records made under JAX transforms (issue 13): where the examples are -----------------

class _Block(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return jnp.tanh(nn.Dense(4, name="dense", **F64)(x)), None


class _Step(nn.Module):
  @nn.compact
  def __call__(self, carry, x_t):  # one time step: x_t (B, 4)
    return carry, jnp.tanh(nn.Dense(4, name="dense", **F64)(x_t))


class _Scanned(nn.Module):
  """Dense layers scanned over depth (stacked params) and a Dense under a time scan."""

  @nn.compact
  def __call__(self, x):  # x: (B, T, 4)
    blocks = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=3)
    h, _ = blocks(name="blocks")(x, None)
    over_time = nn.scan(_Step, variable_broadcast="params", split_rngs={"params": False},
                        in_axes=1, out_axes=1)
    _, h = over_time(name="time")(jnp.zeros(()), h)
    return jnp.sum(jnp.sin(h))


def test_stacked_and_time_scanned_layers_take_the_first_examples():
  """Factors from ``stats_batch_size=K`` equal the factors of the first K examples alone."""
  x = jax.random.normal(jax.random.key(3), (B, T, 4), jnp.float64)
  model = _Scanned()
  params = model.init(jax.random.key(0), x)["params"]

  def factors(inputs, size):
    loss = lambda p: model.apply({"params": p}, inputs)
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params)
    tx = sngd_jax.sngd(stats_batch_size=size, stacked={"blocks": 1}, **ref.one_step_kwargs())
    return tx.update(grads, tx.init(params), params, activations=acts)[1].factors

  sub, alone = factors(x, K), factors(x[:K], None)
  assert sub["blocks/dense"].shape == (3, 5, 5)
  for path in ("blocks/dense", "time/dense"):
    np.testing.assert_allclose(sub[path], alone[path], rtol=1e-10, atol=1e-14, err_msg=path)
  full = factors(x, None)
  assert not np.allclose(full["time/dense"], alone["time/dense"])  # the test can fail


def test_per_example_layers_under_a_users_vmap_take_the_first_examples():
  """Equinox: the batch is the axis of the user's vmap, not the layer's leading axis."""
  eqx = pytest.importorskip("equinox")
  model = eqx.nn.MLP(4, 3, 6, 1, key=jax.random.key(0), dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(1), (B, 4), jnp.float64)
  loss = lambda m, x: jnp.sum(jnp.sin(jax.vmap(m)(x)))
  loss_and_acts = sngd_jax.capture_eqx(loss, outputs=True)
  (_, acts), grads = eqx.filter_value_and_grad(loss_and_acts, has_aux=True)(model, x)
  assert acts["layers/0"][0].batch_axis == 0
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.sngd(stats_batch_size=K, **ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows = np.asarray(x)[:K]
  for i, layer in enumerate(model.layers):  # Equinox weights are (out, in)
    kernel, bias = ref.dense_update(rows, np.asarray(grads.layers[i].weight).T,
                                    np.asarray(grads.layers[i].bias))
    np.testing.assert_allclose(updates.layers[i].weight, kernel.T, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(updates.layers[i].bias, bias, rtol=1e-8, atol=1e-12)
    rows = np.maximum(rows @ np.asarray(layer.weight).T + np.asarray(layer.bias), 0.0)


class Positions(nn.Module):
  """nanoGPT's embeddings: tokens, plus learned positions looked up with ``arange(T)``."""

  @nn.compact
  def __call__(self, tokens):
    t = tokens.shape[1]
    h = nn.Embed(7, 3, name="wte", **F64)(tokens) + nn.Embed(T, 3, name="wpe", **F64)(
        jnp.arange(t))
    return jnp.sum(jnp.sin(nn.Dense(2, name="head", **F64)(h)))


def test_embedding_lookups_are_counted_whole():
  """A position table's lookup ``(T,)`` has no example axis: its first k entries are
  positions, so it is counted whole (as a token table's, whose counts cost nothing),
  while the dense layer takes the first k examples' rows."""
  tokens = jnp.array([[1, 2, 2, 0], [3, 3, 1, 6], [5, 0, 0, 0], [2, 4, 6, 1], [1, 1, 1, 1]])
  model = Positions()
  params = model.init(jax.random.key(0), tokens)["params"]
  tx = sngd_jax.sngd(stats_batch_size=K, **ref.one_step_kwargs())
  loss = sngd_jax.capture(lambda p: model.apply({"params": p}, tokens))
  (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_allclose(state.factors["wpe"], np.full(T, 1 / T), rtol=1e-12)
  freq = np.bincount(np.asarray(tokens).ravel(), minlength=7) / tokens.size
  np.testing.assert_allclose(state.factors["wte"], freq, rtol=1e-12)
  for name, f in (("wpe", np.full(T, 1 / T)), ("wte", freq)):
    g = np.asarray(grads[name]["embedding"])
    np.testing.assert_allclose(updates[name]["embedding"],
                               g / (f + ref.DAMPING * f.sum())[:, None], rtol=1e-10)
  p = jax.tree.map(np.asarray, params)
  h = p["wte"]["embedding"][np.asarray(tokens)] + p["wpe"]["embedding"][None]
  assert_dense_update(h[:K].reshape(-1, 3), grads["head"], updates["head"], "head")


def test_dense_on_one_unbatched_vector_is_one_example():
  """``nn.Dense`` called on one ``(D,)`` vector: one example (one row), also with
  ``stats_batch_size``, which cut its features before (an error suggesting a wrong
  ``fisher=``). Reference: float64 ``x~ x~^T`` of that row, and the same layer called on the
  ``(1, D)`` batch."""
  from sngd_jax._src import transform

  model = nn.Dense(3)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5,)), jnp.float32)
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  tx = sngd_jax.sngd(stats_batch_size=2, decay=0.0, prior="none")
  outs = []
  for inputs in (x, x[None]):
    grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params, inputs)
    est, _ = transform.local_statistics(grads, tx.init(params), acts)
    row = np.append(np.asarray(x, np.float64), 1.0)
    np.testing.assert_allclose(np.asarray(est[""]), np.outer(row, row), rtol=1e-6)
    outs.append(tx.update(grads, tx.init(params), params, activations=acts)[0])
  for a, b in zip(jax.tree.leaves(outs[0]), jax.tree.leaves(outs[1]), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


class Conditioned(nn.Module):
  """A batched layer and a layer on one conditioning vector ``(D,)``, one example."""

  @nn.compact
  def __call__(self, x, c):
    return jnp.sum(jnp.sin(nn.Dense(3, name="body", **F64)(x) + nn.Dense(3, name="cond",
                                                                         **F64)(c)))


def test_a_layer_on_one_conditioning_vector_beside_a_batch_does_not_warn():
  """``stats_batch_size`` warns when the layers' example axes differ in length
  (tests/test_gnn.py); a layer called on one unbatched vector holds one example, all of it
  kept, so a batch beside it is no such case. Its factor is that row's, the batched layer's
  the first ``K`` rows' (float64)."""
  rng = np.random.default_rng(0)
  x, c = rng.normal(size=(B, 4)), rng.normal(size=(6,))
  model = Conditioned()
  params = model.init(jax.random.key(0), x, c)["params"]
  loss = sngd_jax.capture(lambda p: model.apply({"params": p}, x, c))
  (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
  tx = sngd_jax.sngd(stats_batch_size=K, decay=0.0, prior="none", max_norm=None)
  with no_sngd_warnings():
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
  np.testing.assert_allclose(ref.normalized_factor(state, "body"), ref.gram(x[:K]), rtol=1e-12)
  np.testing.assert_allclose(ref.normalized_factor(state, "cond"), ref.gram(c[None]),
                             rtol=1e-12)


class LearnedPositions(nn.Module):
  """Token and learned position embeddings (``pos(jnp.arange(T))``: a lookup whose leading
  axis is the positions), then a Dense on every token."""

  @nn.compact
  def __call__(self, ids):
    h = nn.Embed(7, 4, name="tok", **F64)(ids) + nn.Embed(
        ids.shape[1], 4, name="pos", **F64)(jnp.arange(ids.shape[1]))
    return jnp.sum(jnp.sin(nn.Dense(3, name="out", **F64)(h)))


def test_learned_positions_beside_a_batch_do_not_warn():
  """``stats_batch_size`` warns when the layers' example axes differ in length; a learned
  position table's lookup (``T`` positions, ``T != B``) is counted whole, not cut, so it is
  no such axis. The Dense's factor is its rows of the first ``K`` examples (float64)."""
  rng = np.random.default_rng(1)
  ids = jnp.asarray(rng.integers(0, 7, size=(B, T + 2)))
  model = LearnedPositions()
  params = model.init(jax.random.key(0), ids)["params"]
  loss = sngd_jax.capture(lambda p: model.apply({"params": p}, ids))
  (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params)
  assert acts["pos"][0].num_examples == T + 2 != B
  tx = sngd_jax.sngd(stats_batch_size=K, decay=0.0, prior="none", max_norm=None)
  with no_sngd_warnings():
    _, state = tx.update(grads, tx.init(params), params, activations=acts)
  p = jax.tree.map(np.asarray, params)
  h = p["tok"]["embedding"][np.asarray(ids)] + p["pos"]["embedding"][None]
  np.testing.assert_allclose(ref.normalized_factor(state, "out"),
                             ref.gram(h[:K].reshape(-1, 4)), rtol=1e-12)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_norm_on_one_unbatched_vector_is_one_example(api):
  """``LayerNorm`` called on one ``(C,)`` vector (per-example gradients: a ``jax.vmap`` of
  the captured gradient over the batch) is one example, one row per channel, also with
  ``stats_batch_size``, which cut its channels before ("captured 3 channels, params have
  5"). Reference: float64 ``[[xhat^2, xhat], [xhat, 1]]`` per channel of the rows of the
  first 3 examples (the vmap's axis holds the examples), and the mean of the per-example
  gradients solved against it."""
  from flax import nnx

  c, n = 5, 8
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, c)) * 2 + 1)
  y = jnp.asarray(rng.normal(size=(n, c)))
  if api == "linen":
    model = nn.LayerNorm(**F64)
    params = model.init(jax.random.key(0), x[0])["params"]
    per_example = lambda p, xi, yi: jnp.sum((model.apply({"params": p}, xi) - yi) ** 2)
    grad_fn = jax.grad(sngd_jax.capture(per_example), has_aux=True)
    leaves = lambda t: t
  else:
    model = nnx.LayerNorm(c, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    graph, params = nnx.split(model, nnx.Param)
    per_example = lambda m, xi, yi: jnp.sum((m(xi) - yi) ** 2)
    captured = sngd_jax.capture_nnx(per_example)
    grad_fn = lambda p, xi, yi: nnx.grad(captured, has_aux=True)(nnx.merge(graph, p), xi, yi)
    leaves = nnx.to_pure_dict
  _, single = grad_fn(params, x[0], y[0])
  assert [a.inputs.shape for a in single[""]] == [(1, c)]  # one example of c channels
  grads, acts = jax.vmap(grad_fn, in_axes=(None, 0, 0))(params, x, y)
  grads = jax.tree.map(lambda g: g.mean(0), grads)
  tx = sngd_jax.sngd(stats_batch_size=3, **ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  xn = np.asarray(x, np.float64)
  xhat = (xn - xn.mean(1, keepdims=True)) / np.sqrt(xn.var(1, keepdims=True) + 1e-6)
  xhat = xhat[:3]  # stats_batch_size=3
  g, u = leaves(grads), leaves(updates)
  scale, bias = ref.channel_update(xhat, np.asarray(g["scale"]), np.asarray(g["bias"]))
  np.testing.assert_allclose(u["scale"], scale, rtol=1e-8, atol=1e-12)
  np.testing.assert_allclose(u["bias"], bias, rtol=1e-8, atol=1e-12)


def _general_layer(name, h, d):
  """A DenseGeneral-like layer contracting every axis of one ``(h, d)`` or ``(d,)`` example,
  as ``(model, api, example_shape)``."""
  from flax import nnx
  rngs = nnx.Rngs(0)
  return {
      "linen_dense_general": (nn.DenseGeneral(5, axis=-1, **F64), "linen", (d,)),
      "linen_dense_general_2axes": (nn.DenseGeneral((2, 3), axis=(-2, -1), **F64), "linen",
                                    (h, d)),
      "linen_einsum": (nn.Einsum((h, d, 5), "hd,hdo->o", **F64), "linen", (h, d)),
      "nnx_linear_general": (nnx.LinearGeneral(d, 5, rngs=rngs, **F64), "nnx", (d,)),
      "nnx_linear_general_2axes": (nnx.LinearGeneral((h, d), 5, axis=(-2, -1), rngs=rngs,
                                                     **F64), "nnx", (h, d)),
      "nnx_einsum": (nnx.Einsum("d,do->o", (d, 5), (5,), rngs=rngs, **F64), "nnx", (d,)),
  }[name]


@pytest.mark.parametrize("name", ["linen_dense_general", "linen_dense_general_2axes",
                                  "linen_einsum", "nnx_linear_general",
                                  "nnx_linear_general_2axes", "nnx_einsum"])
def test_general_dense_on_one_unbatched_example_is_one_example(name):
  """``DenseGeneral``/``LinearGeneral``/``Einsum`` called on one example whose axes are all
  contracted (``(D,)``, ``(H, D)``; per-example gradients: a ``jax.vmap`` of the captured
  gradient over the batch) is one example with one row. Before, its first axis was read as
  the example axis, so ``stats_batch_size=3`` cut ``D = H = 4`` features to 3 (an error, or,
  with ``(H, D)``, rows of 3 of the 4 ``H``). Reference: float64 dense solve with the rows
  ``x_i`` flattened, of every example, or of the first 3 (the vmap's axis holds the
  examples)."""
  from flax import nnx

  h, d, n = 4, 4, 8
  model, api, shape = _general_layer(name, h, d)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(n,) + shape))
  if api == "linen":
    params = model.init(jax.random.key(0), x[0])["params"]
    per_example = lambda p, xi: jnp.sum(jnp.sin(model.apply({"params": p}, xi)))
    grad_fn = jax.grad(sngd_jax.capture(per_example), has_aux=True)
    leaves = lambda t: t
  else:
    graph, params = nnx.split(model, nnx.Param)
    per_example = lambda m, xi: jnp.sum(jnp.sin(m(xi)))
    captured = sngd_jax.capture_nnx(per_example)
    grad_fn = lambda p, xi: nnx.grad(captured, has_aux=True)(nnx.merge(graph, p), xi)
    leaves = nnx.to_pure_dict
  _, single = grad_fn(params, x[0])
  assert [a.inputs.shape for a in single[""]] == [(1,) + shape]  # one example
  grads, acts = jax.vmap(grad_fn, in_axes=(None, 0))(params, x)
  grads = jax.tree.map(lambda g: g.mean(0), grads)
  for stats_batch_size in (None, 3):
    rows = np.asarray(x[:stats_batch_size], np.float64).reshape(stats_batch_size or n, -1)
    tx = sngd_jax.sngd(stats_batch_size=stats_batch_size, **ref.one_step_kwargs())
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    g, u = leaves(grads), leaves(updates)
    kernel, bias = ref.dense_update(rows, g["kernel"], g.get("bias"))
    np.testing.assert_allclose(u["kernel"], kernel, rtol=1e-8, atol=1e-12)
    if bias is not None:
      np.testing.assert_allclose(u["bias"], bias, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("api", ["linen", "nnx", "equinox"])
def test_per_example_sequences_under_a_vmap_of_the_gradient_take_the_first_examples(api):
  """Per-example gradients of a layer applied to a ``(T, D)`` sequence (``jax.vmap`` of the
  captured gradient over the batch, e.g. a transformer applied per example): the vmap's axis
  holds the examples. Before, the call's own leading axis ``T`` was read as the example axis
  of each vmapped "micro-batch" (``batch_axis`` 1 after pooling, ``num_examples`` T), so
  ``stats_batch_size=3`` took the first 3 positions of all 8 examples (linen, NNX), or, for
  Equinox (no example axis per call), was ignored. Reference: float64 dense solve with the
  ``T`` rows of each of the first 3 examples."""
  from flax import nnx

  from sngd_jax._src.capture.records import leading_axes_pooled

  n, t, d = 8, 5, 4
  x = jnp.asarray(np.random.default_rng(2).normal(size=(n, t, d)))
  if api == "linen":
    model = nn.Dense(3, **F64)
    params = model.init(jax.random.key(0), x[0])["params"]
    per_example = lambda p, xi: jnp.sum(jnp.sin(model.apply({"params": p}, xi)))
    grad_fn = jax.grad(sngd_jax.capture(per_example), has_aux=True)
    leaves, path = (lambda t: t), ""
  elif api == "nnx":
    graph, params = nnx.split(nnx.Linear(d, 3, rngs=nnx.Rngs(0), **F64), nnx.Param)
    captured = sngd_jax.capture_nnx(lambda m, xi: jnp.sum(jnp.sin(m(xi))))
    grad_fn = lambda p, xi: nnx.grad(captured, has_aux=True)(nnx.merge(graph, p), xi)
    leaves, path = nnx.to_pure_dict, ""
  else:
    eqx = pytest.importorskip("equinox")
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          eqx.nn.Linear(d, 3, key=jax.random.key(0)))
    captured = sngd_jax.capture_eqx(lambda m, xi: jnp.sum(jnp.sin(jax.vmap(m)(xi))))
    grad_fn = jax.grad(captured, has_aux=True)
    leaves = lambda m: {"kernel": m.weight.T, "bias": m.bias}
    path = None
  grads, acts = jax.vmap(grad_fn, in_axes=(None, 0))(params, x)
  grads = jax.tree.map(lambda g: g.mean(0), grads)
  path = path if path is not None else next(iter(acts))
  pooled = leading_axes_pooled(acts[path][0])
  assert pooled.num_examples == n
  for k in (None, 3):
    tx = sngd_jax.sngd(stats_batch_size=k, **ref.one_step_kwargs())
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    g, u = leaves(grads), leaves(updates)
    rows = np.asarray(x[:k], np.float64).reshape(-1, d)
    kernel, bias = ref.dense_update(rows, g["kernel"], g["bias"])
    np.testing.assert_allclose(u["kernel"], kernel, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(u["bias"], bias, rtol=1e-8, atol=1e-12)
