"""Recurrent cells under nn.RNN: statistics of every time step, one update vs a float64
per-time-step reference, no leaked tracers, and a char-level LSTM smoke test."""

import flax.linen as nn
import helpers_jaxpr
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import exact_sngd
from helpers_train import assert_trains, softmax_loss

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")


CELLS = {
    "lstm": lambda h: nn.LSTMCell(h, param_dtype=jnp.float64),
    "optimized_lstm": lambda h: nn.OptimizedLSTMCell(h, param_dtype=jnp.float64),
    "gru": lambda h: nn.GRUCell(h, param_dtype=jnp.float64),
}
INPUT_LAYERS = {"lstm": ("ii", "if", "ig", "io"), "optimized_lstm": ("ii", "if", "ig", "io"),
                "gru": ("ir", "iz", "in")}
HIDDEN_LAYERS = {"lstm": ("hi", "hf", "hg", "ho"), "optimized_lstm": ("hi", "hf", "hg", "ho"),
                 "gru": ("hr", "hz", "hn")}


class Seq(nn.Module):
  cell: str
  hidden: int = 3

  @nn.compact
  def __call__(self, xs):
    return nn.RNN(CELLS[self.cell](self.hidden), name="rnn")(xs)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_one_update_pools_every_time_step(cell):
  """jit + value_and_grad through nn.RNN: each gate's G sums x_t (or h_{t-1}) over all t."""
  model = Seq(cell)
  xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
  params = model.init(jax.random.key(0), xs)["params"]
  target = jax.random.normal(jax.random.key(2), (3, 5, 3), jnp.float64)
  loss = lambda p, xs: jnp.sum((model.apply({"params": p}, xs) - target) ** 2)
  tx = exact_sngd(**ref.one_step_kwargs())

  @jax.jit
  def step(params, xs):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, xs)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  with jax.checking_leaks():
    grads, updates, acts = step(params, xs)
  (cell_name,) = params  # the cell is a child of Seq, shared by the scan
  cell_params = jax.tree.map(np.asarray, params[cell_name])
  forward = ref.gru_forward if cell == "gru" else ref.lstm_forward
  h_prev, outs = forward(cell_params, np.asarray(xs))
  # the numpy forward is the cell's: it reproduces the model's outputs
  np.testing.assert_allclose(model.apply({"params": params}, xs), outs, atol=1e-12)
  for names, rows in ((INPUT_LAYERS[cell], np.asarray(xs).reshape(-1, 4)),
                      (HIDDEN_LAYERS[cell], h_prev.reshape(-1, 3))):
    for name in names:
      path = f"{cell_name}/{name}"
      assert sum(c.inputs.shape[0] for c in acts[path]) == 15  # 3 sequences x 5 steps
      g, u = grads[cell_name][name], updates[cell_name][name]
      ref.assert_dense_update(rows, g, u, path)
  # the last step alone would give another factor
  last_only = ref.dense_update(h_prev[:, -1], grads[cell_name][HIDDEN_LAYERS[cell][0]][
      "kernel"], grads[cell_name][HIDDEN_LAYERS[cell][0]].get("bias"))[0]
  assert not np.allclose(updates[cell_name][HIDDEN_LAYERS[cell][0]]["kernel"], last_only)


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_gates_that_read_one_input_leave_the_scan_once(cell):
  """The gates reading x_t (or h_{t-1}) record one array: the scan returns two stacked
  record outputs (x and h), not one per gate (8 for an LSTM, 6 for a GRU)."""
  model = Seq(cell)
  xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
  params = model.init(jax.random.key(0), xs)["params"]
  loss = lambda p, xs: jnp.sum(model.apply({"params": p}, xs) ** 2)

  scan_outputs = lambda f: helpers_jaxpr.scan_output_counts(jax.make_jaxpr(f)(params, xs).jaxpr)
  (plain,) = scan_outputs(loss)
  assert scan_outputs(sngd_jax.capture(loss)) == [plain + 2]
  _, acts = sngd_jax.capture(loss)(params, xs)
  (cell_name,) = params
  for names in (INPUT_LAYERS[cell], HIDDEN_LAYERS[cell]):
    first = acts[f"{cell_name}/{names[0]}"][0].inputs
    for name in names[1:]:
      np.testing.assert_array_equal(acts[f"{cell_name}/{name}"][0].inputs, first)


class BiSeq(nn.Module):
  @nn.compact
  def __call__(self, xs, lengths):
    fwd = nn.RNN(nn.LSTMCell(3), return_carry=True, time_major=True)
    carry, ys = fwd(jnp.swapaxes(xs, 0, 1), seq_lengths=lengths)
    bi = nn.Bidirectional(nn.RNN(nn.GRUCell(2)), nn.RNN(nn.GRUCell(2)))
    return jnp.sum(carry[1]) + jnp.sum(ys) + jnp.sum(bi(xs, seq_lengths=lengths))


def test_time_major_bidirectional_and_seq_lengths_record_every_step():
  """Options that change the scan's output layout: each layer still gets B*T rows."""
  with jax.enable_x64(False):
    xs = jax.random.normal(jax.random.key(1), (2, 6, 4))
    lengths = jnp.array([6, 4])
    model = BiSeq()
    params = model.init(jax.random.key(0), xs, lengths)["params"]
    fn = sngd_jax.capture(lambda p, xs, n: model.apply({"params": p}, xs, n))
    with jax.checking_leaks():
      (_, acts), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(params, xs, lengths)
    layers = sngd_jax.discover(params)
    assert set(acts) == set(layers)
    for path, calls in acts.items():
      assert sum(c.inputs.shape[0] for c in calls) == 12, path
    tx = exact_sngd()
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


# --- char-level LSTM smoke test ---------------------------------------------------

TEXT = "the quick brown fox jumps over the lazy dog. " * 40


class CharLSTM(nn.Module):
  vocab: int

  @nn.compact
  def __call__(self, tokens):
    h = nn.Embed(self.vocab, 16)(tokens)
    h = nn.RNN(nn.LSTMCell(32))(h)
    return nn.Dense(self.vocab)(h)


def test_char_lstm_trains_and_every_parameter_is_covered():
  with jax.enable_x64(False):
    chars = sorted(set(TEXT))
    data = np.array([chars.index(c) for c in TEXT], np.int32)
    model = CharLSTM(len(chars))
    rng = np.random.default_rng(0)

    def batch():
      starts = rng.integers(0, len(data) - 17, 32)
      seq = np.stack([data[s:s + 17] for s in starts])
      return seq[:, :-1], seq[:, 1:]

    x, y = batch()
    params = model.init(jax.random.key(0), x)["params"]

    loss_fn = softmax_loss(lambda p, x: model.apply({"params": p}, x))

    report = sngd_jax.coverage(loss_fn, params, x, y)
    assert report.missing == [] and report.pass_through == []
    assert len(report.preconditioned) == len(jax.tree.leaves(params))

    eval_batch = batch()
    batches = [batch() for _ in range(60)]
    assert_trains(loss_fn, params, batches, eval_batch=eval_batch, learning_rate=0.1,
                  max_ratio=0.6)


def test_hand_written_scan_over_time_pools_every_step():
  """A cell under a plain nn.scan over time (params broadcast) gets the statistics of
  every step, as under nn.RNN: the update is the float64 one over all B*T rows."""
  class Scanned(nn.Module):
    @nn.compact
    def __call__(self, xs):
      cell = nn.scan(nn.LSTMCell, variable_broadcast="params", split_rngs={"params": False},
                     in_axes=1, out_axes=1)(3, param_dtype=jnp.float64, name="cell")
      carry = cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
      return cell(carry, xs)[1]

  xs = jax.random.normal(jax.random.key(1), (3, 5, 4), jnp.float64)
  model = Scanned()
  params = model.init(jax.random.key(0), xs)["params"]
  loss = lambda p, xs: jnp.sum(jnp.sin(model.apply({"params": p}, xs)))
  with jax.checking_leaks():
    (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
        params, xs)
  tx = exact_sngd(**ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  h_prev, outs = ref.lstm_forward(jax.tree.map(np.asarray, params["cell"]), np.asarray(xs))
  np.testing.assert_allclose(model.apply({"params": params}, xs), outs, atol=1e-12)
  for names, rows in ((INPUT_LAYERS["lstm"], np.asarray(xs).reshape(-1, 4)),
                      (HIDDEN_LAYERS["lstm"], h_prev.reshape(-1, 3))):
    for name in names:
      g, u = grads["cell"][name], updates["cell"][name]
      kernel, bias = ref.dense_update(rows, g["kernel"], g.get("bias"))
      np.testing.assert_allclose(u["kernel"], kernel, rtol=1e-8, atol=1e-12, err_msg=name)
      if bias is not None:
        np.testing.assert_allclose(u["bias"], bias, rtol=1e-8, atol=1e-12, err_msg=name)


UNBATCHED_CELLS = {
    "gru": (lambda: nn.GRUCell(3, param_dtype=jnp.float64), (3, 4, 2), None),
    "conv_lstm": (lambda: nn.ConvLSTMCell(2, (3, 3), param_dtype=jnp.float64), (3, 4, 4, 4, 2),
                  (3, 3)),
}


@pytest.mark.parametrize("cell", sorted(UNBATCHED_CELLS))
@pytest.mark.parametrize("per_example", [False, True])
def test_sequences_without_batch_axes_record_every_step(cell, per_example):
  """nn.RNN on a sequence with no batch axis (``(T, *features)``: one sequence, or each
  example under the user's jax.vmap) records one row per step (conv: the patches of each
  step), as a batched call does: the update is the float64 one over every step of every
  sequence, and stats_batch_size takes whole sequences. (The time axis was merged into the
  first feature axis: dense gates raised, ConvLSTM's convolutions got a wrong factor.)"""
  make_cell, shape, conv_kernel = UNBATCHED_CELLS[cell]

  class Seq1(nn.Module):
    @nn.compact
    def __call__(self, xs):
      return nn.RNN(make_cell(), name="rnn")(xs)

  model = Seq1()
  xs = jax.random.normal(jax.random.key(1), shape, jnp.float64)
  if not per_example:
    xs = xs[:1]
  params = model.init(jax.random.key(0), xs[0])["params"]
  (cell_name,) = params
  apply = lambda p, x: model.apply({"params": p}, x)
  if per_example:
    loss = lambda p: jnp.sum(jnp.sin(jax.vmap(lambda x: apply(p, x))(xs)))
  else:
    loss = lambda p: jnp.sum(jnp.sin(apply(p, xs[0])))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)

  # the unrolled model, batched over the sequences: what every gate reads at every step
  step_cell = make_cell()
  carry = step_cell.initialize_carry(jax.random.key(0), xs[:, 0].shape)
  seen = {"i": [], "h": []}
  for t in range(xs.shape[1]):
    seen["i"].append(np.asarray(xs[:, t]))
    seen["h"].append(np.asarray(carry[1] if isinstance(carry, tuple) else carry))
    carry, _ = step_cell.apply({"params": params[cell_name]}, carry, xs[:, t])

  def rows(side, k):
    steps = [a[:k] for a in seen[side]]
    if conv_kernel is None:
      return np.concatenate([a.reshape(-1, a.shape[-1]) for a in steps])
    return np.concatenate([ref.conv_patches(a, conv_kernel, (1, 1), "SAME", (1, 1), (1, 1), 1)[0]
                           for a in steps])

  for k in ((None, 2) if per_example else (None,)):
    tx = sngd_jax.sngd(stats_batch_size=k, **ref.one_step_kwargs())
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    for name, g in grads[cell_name].items():
      u = updates[cell_name][name]
      kernel, bias = ref.dense_update(rows(name[0], k), g["kernel"], g.get("bias"))
      np.testing.assert_allclose(u["kernel"], kernel, rtol=1e-8, atol=1e-12, err_msg=name)
      if bias is not None:
        np.testing.assert_allclose(u["bias"], bias, rtol=1e-8, atol=1e-12, err_msg=name)


def test_nnx_rnn_on_one_sequence_without_batch_axis():
  """nnx.RNN on one ``(T, F)`` sequence: T rows per gate, the float64 update (before the
  fix the time axis was merged into the feature axis and update raised)."""
  from flax import nnx  # noqa: PLC0415

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.rnn = nnx.RNN(nnx.GRUCell(2, 3, rngs=rngs, param_dtype=jnp.float64))

  model = Net(nnx.Rngs(0))
  xs = jax.random.normal(jax.random.key(1), (5, 2), jnp.float64)
  loss = lambda m: jnp.sum(jnp.sin(m.rnn(xs)))
  (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model)
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  cell = model.rnn.cell
  h, seen = jnp.zeros(3, jnp.float64), []
  for t in range(5):
    seen.append(np.asarray(h))
    h, _ = cell(h, xs[t])
  g = nnx.to_pure_dict(grads)["rnn"]["cell"]
  u = nnx.to_pure_dict(updates)["rnn"]["cell"]
  for name, rows in (("dense_i", np.asarray(xs)), ("dense_h", np.stack(seen))):
    kernel, bias = ref.dense_update(rows, g[name]["kernel"], g[name].get("bias"))
    np.testing.assert_allclose(u[name]["kernel"], kernel, rtol=1e-8, atol=1e-12, err_msg=name)
    if bias is not None:
      np.testing.assert_allclose(u[name]["bias"], bias, rtol=1e-8, atol=1e-12, err_msg=name)


def test_nnx_rnn_that_is_the_model_itself_names_its_cell_layers():
  """An ``nnx.RNN`` passed as the model (the root of the graph, path ``''``): its cell's
  layers are named ``'cell/dense_i'``, as the params are, and ``dense_i``'s factor is the
  float64 Gram sum of every step's inputs. Until 2026-12-06 they were named
  ``'/cell/dense_i'`` and ``update`` raised that no activations were captured for
  ``'cell/dense_i'``."""
  from flax import nnx  # noqa: PLC0415

  rnn = nnx.RNN(nnx.SimpleCell(2, 3, rngs=nnx.Rngs(0), dtype=jnp.float64,
                                param_dtype=jnp.float64))
  xs = jax.random.normal(jax.random.key(1), (4, 5, 2), jnp.float64)
  loss = sngd_jax.capture_nnx(lambda m: jnp.sum(jnp.sin(m(xs))))
  (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(rnn)
  assert set(acts) == {"cell/dense_i", "cell/dense_h"}
  params = nnx.state(rnn, nnx.Param)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  ref.assert_factor(state, "cell/dense_i", np.asarray(xs).reshape(-1, 2))
