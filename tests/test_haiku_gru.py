"""hk.GRU (three dense layers, two of them column blocks of ``w_h``) with the options that cut,
add up, stack, reparametrize or weigh its rows, each against float64 numpy references of the
rows each layer multiplied (``x_t``; ``h_{t-1}`` for ``w_h[:, :2H]``; ``r_t * h_{t-1}`` for
``w_h[:, 2H:]``): ``stats_batch_size`` (the first sequences, every step of theirs), gradient
accumulation (``sngd_jax.MultiSteps``), an ensemble (a ``jax.vmap`` over stacked params), the
reconstructed network (``to_reconstructed``) and row masks (``with_row_mask``).
The modelling itself (factors under dynamic_unroll, static_unroll, layer_stack) is checked in
tests/test_haiku_gaps.py."""

import re

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd, factors_after_one_step
from helpers_warnings import no_sngd_warnings

import sngd_jax
from sngd_jax._src.state import only_sngd_state

hk = pytest.importorskip("haiku")  # a guard only: CI installs the `haiku` extra

KEY = jax.random.key(0)
T, B, D, H = 4, 6, 3, 3  # steps, sequences, inputs, hidden units
LAYERS = ("gru/w_i", "gru/w_h[zr]", "gru/w_h[a]")
BIAS = {"gru/w_i": True, "gru/w_h[zr]": False, "gru/w_h[a]": False}
COLS = {"gru/w_h[zr]": slice(0, 2 * H), "gru/w_h[a]": slice(2 * H, 3 * H)}


@pytest.fixture
def x64():
  """float64 for one test (the module's MultiSteps test runs in float32)."""
  with jax.enable_x64(True):
    yield


_np = ref.np64  # a float64 numpy array


def _model(unroll="dynamic_unroll", time_major=True, per_example=False, cell=None):
  """An hk.GRU (or ``cell``) under ``hk.<unroll>``, then an hk.Linear readout of every step's
  state, batch-major ``(B, T, H)`` (so that its example axis is the sequences, as the
  cell's). ``per_example``: the model of one ``(T, D)`` sequence, an unbatched cell."""
  def fn(xs):
    core = (cell or hk.GRU)(H, name="gru")
    if per_example:
      out, _ = hk.dynamic_unroll(core, xs, core.initial_state(None))
    else:
      out, _ = getattr(hk, unroll)(core, xs, core.initial_state(xs.shape[1 if time_major else 0]),
                                   time_major=time_major)
      if time_major:
        out = jnp.swapaxes(out, 0, 1)
    return hk.Linear(2, name="readout")(out)
  return hk.without_apply_rng(hk.transform(fn))


def _params(model, xs, key=KEY):
  params = jax.jit(model.init)(key, xs)
  k1, k2 = jax.random.split(jax.random.fold_in(key, 1))
  params["gru"]["b"] = 0.3 * jax.random.normal(k1, (3 * H,), xs.dtype)  # not zero
  params["gru"]["w_h"] = params["gru"]["w_h"] + 0.3 * jax.random.normal(k2, (H, 3 * H), xs.dtype)
  return params


def _xs(dtype=jnp.float64, n=B, key=1):
  """``n`` sequences, time major ``(T, n, D)``."""
  return jax.random.normal(jax.random.key(key), (T, n, D), dtype)


def _rows(p, xs):
  """hk.GRU over time in float64 numpy (time-major ``xs (T, n, D)``): per layer of LAYERS the
  rows it multiplied, ``(T, n, d)`` (step, sequence), and the states ``(T, n, H)``."""
  inputs, states, gated, outs = ref.haiku_gru(p["gru"]["w_i"], p["gru"]["w_h"], p["gru"]["b"],
                                              xs)
  rows = dict(zip(LAYERS, (inputs, states, gated), strict=True))
  return rows, np.stack(outs)


def _flat(a):
  return a.reshape(-1, a.shape[-1])


def _sin_loss(model, per_example=False, batch_major=False):
  """``sum(sin(model(xs)))`` of time-major ``xs``: as it is, batch-major, or per sequence under
  ``jax.vmap``."""
  if per_example:
    return lambda p, xs: jnp.sum(jnp.sin(jax.vmap(lambda x: model.apply(p, x), in_axes=1)(xs)))
  if batch_major:
    return lambda p, xs: jnp.sum(jnp.sin(model.apply(p, jnp.swapaxes(xs, 0, 1))))
  return lambda p, xs: jnp.sum(jnp.sin(model.apply(p, xs)))


def _grads_acts(loss, params, xs, outputs=False):
  (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture_hk(loss, outputs=outputs),
                                                has_aux=True))(params, xs)
  return grads, acts


def _one_step(loss, params, xs, mask=None, **kwargs):
  """Grads, the update and the state of one step of the exact one-step ``sngd`` (its factors
  are that step's batch estimates; ``kwargs`` added), in one jitted function; ``mask``: a row
  mask for ``with_row_mask``."""
  tx = exact_sngd(**ref.one_step_kwargs(), **kwargs)

  @jax.jit
  def step(params, xs):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(params, xs)
    if mask is not None:
      acts = sngd_jax.with_row_mask(acts, mask)
    updates, state = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, state
  return step(params, xs)


def _check_updates(grads, updates, rows, readout_rows, err=""):
  """Every leaf of the GRU and the readout is the damped solve of its gradient over ``rows``
  (per layer of LAYERS, ``(n, d)``) and ``readout_rows``."""
  g, u = grads["gru"], updates["gru"]
  kernel, bias = ref.dense_update(rows["gru/w_i"], g["w_i"], g["b"])
  np.testing.assert_allclose(_np(u["w_i"]), kernel, rtol=1e-8, atol=1e-12, err_msg=err + "w_i")
  np.testing.assert_allclose(_np(u["b"]), bias, rtol=1e-8, atol=1e-12, err_msg=err + "b")
  for layer, cols in COLS.items():
    kernel, _ = ref.dense_update(rows[layer], g["w_h"][:, cols], None)
    np.testing.assert_allclose(_np(u["w_h"][:, cols]), kernel, rtol=1e-8, atol=1e-12,
                               err_msg=err + layer)
  kernel, bias = ref.dense_update(readout_rows, grads["readout"]["w"], grads["readout"]["b"])
  np.testing.assert_allclose(_np(updates["readout"]["w"]), kernel, rtol=1e-8, atol=1e-12,
                             err_msg=err + "readout")


# --- 1. stats_batch_size: the first sequences, all of their steps ------------------------

K = 2  # stats_batch_size

# (unroll, time_major, per_example)
SUB_BATCH_MODELS = {"dynamic": ("dynamic_unroll", True, False),
                    "dynamic_batch_major": ("dynamic_unroll", False, False),
                    "static": ("static_unroll", True, False),
                    "vmap_per_sequence": ("dynamic_unroll", True, True)}


@pytest.mark.parametrize("case", sorted(SUB_BATCH_MODELS))
def test_stats_batch_size_takes_every_step_of_the_first_sequences(case, x64):
  """``stats_batch_size=2`` on B=6 sequences of T=4 steps: each of the GRU's three factors
  (and the readout's) is the float64 Gram of the rows of the first 2 sequences at every step
  (8 rows), and each update is the damped solve over them; not the first 2 time-major rows of
  every step's batch read as examples, nor the first 2 steps. Under hk.dynamic_unroll (time
  major, batch major), hk.static_unroll (one call per step) and per sequence under
  ``jax.vmap`` (an unbatched cell). No warning: under hk.static_unroll it warned before
  2026-12-07 that the example axes differ in length, comparing the cell's 4 calls of 6
  sequences, ``(6, 6, 6, 6)``, with the readout's one call of 6."""
  unroll, time_major, per_example = SUB_BATCH_MODELS[case]
  model = _model(unroll, time_major, per_example)
  xs = _xs()
  params = _params(model, xs[:, 0] if per_example else (xs if time_major else
                                                         jnp.swapaxes(xs, 0, 1)))
  loss = _sin_loss(model, per_example, batch_major=not time_major)
  rows, outs = _rows(params, xs)
  first = {layer: _flat(r[:, :K]) for layer, r in rows.items()}
  readout_rows = _flat(np.swapaxes(outs, 0, 1)[:K])
  with no_sngd_warnings():
    grads, updates, state = _one_step(loss, params, xs, stats_batch_size=K)
  for layer in LAYERS:
    want = ref.gram(first[layer], BIAS[layer])
    np.testing.assert_allclose(_np(state.factors[layer]), want, rtol=1e-10, atol=1e-14,
                               err_msg=layer)
    # the check can fail: all rows, or the first K * T time-major rows, give other factors
    assert not np.allclose(want, ref.gram(_flat(rows[layer]), BIAS[layer]), atol=1e-3), layer
    assert not np.allclose(want, ref.gram(_flat(rows[layer])[:K * T], BIAS[layer]),
                           atol=1e-3), layer
  np.testing.assert_allclose(_np(state.factors["readout"]), ref.gram(readout_rows), rtol=1e-10,
                             atol=1e-14)
  _check_updates(grads, updates, first, readout_rows)


def test_stats_batch_size_on_hk_lstm_takes_the_first_sequences_as_for_hk_gru(x64):
  """hk.LSTM under hk.dynamic_unroll (one dense layer ``'lstm/linear'`` over ``[x_t;
  h_{t-1}]``) cuts as hk.GRU does: its factor with ``stats_batch_size=2`` is the float64 Gram
  of the first 2 sequences' rows at every step (``h_{t-1}`` from the model's own outputs)."""
  def fn(xs):
    core = hk.LSTM(H, name="lstm")
    out, _ = hk.dynamic_unroll(core, xs, core.initial_state(xs.shape[1]))
    return out
  model = hk.without_apply_rng(hk.transform(fn))
  xs = _xs()
  params = jax.jit(model.init)(KEY, xs)
  outs = _np(jax.jit(model.apply)(params, xs))  # (T, B, H): h_t
  prev = np.concatenate([np.zeros((1, B, H)), outs[:-1]])
  rows = np.concatenate([_np(xs), prev], axis=-1)
  with no_sngd_warnings():
    _, _, state = _one_step(lambda p, x: jnp.sum(jnp.sin(model.apply(p, x))), params, xs,
                            stats_batch_size=K)
  want = ref.gram(_flat(rows[:, :K]))
  np.testing.assert_allclose(_np(state.factors["lstm/linear"]), want, rtol=1e-10, atol=1e-14)
  assert not np.allclose(want, ref.gram(_flat(rows)[:K * T]), atol=1e-3)


# --- 2. sngd_jax.MultiSteps: k micro-batches of n sequences, one batch of k n ------------

def _train_step(tx, loss):
  @jax.jit
  def step(params, state, xs):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(params, xs)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, updates
  return step


def test_multisteps_micro_batches_of_sequences_give_the_big_batch_update():
  """2 micro-batches of 3 sequences each (float32) accumulate each of the GRU's three factors
  as one batch of the 6 sequences: at every cycle (statistics of that cycle alone, momentum
  in the update) each factor is the float64 Gram of the rows of all 6 sequences at the
  cycle's params, to float32 rounding (not the last micro-batch's), and the factors and
  params follow the run on the whole batch (as tests/test_accumulation.py for other
  layers); the micro-batch call before the last returns zero updates."""
  model = _model()
  xs = _xs(jnp.float32)
  params = _params(model, xs)
  loss = lambda p, x: jnp.mean(jnp.sin(model.apply(p, x)))
  n = B // 2

  def inner_tx():
    return optax.chain(sngd_jax.sngd(**ref.one_step_kwargs(), factor_every=1),
                       optax.sgd(0.1, momentum=0.9))
  big_tx, ms = inner_tx(), sngd_jax.MultiSteps(inner_tx(), every_k_schedule=2)
  big_step, micro_step = _train_step(big_tx, loss), _train_step(ms, loss)
  big_p, big_s, ms_p, ms_s = params, big_tx.init(params), params, ms.init(params)
  for cycle in range(3):
    rows, _ = _rows(ms_p, xs)
    for i in range(2):
      ms_p, ms_s, updates = micro_step(ms_p, ms_s, xs[:, i * n:(i + 1) * n])
      if i == 0:
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    big_p, big_s, _ = big_step(big_p, big_s, xs)
    a, b = only_sngd_state(ms_s), only_sngd_state(big_s)
    assert int(a.count) == int(b.count) == cycle + 1
    for layer in LAYERS:
      want = ref.gram(_flat(rows[layer]), BIAS[layer])
      np.testing.assert_allclose(_np(a.factors[layer]), want, rtol=2e-5, atol=2e-6,
                                 err_msg=f"{layer} cycle {cycle}")
      assert not np.allclose(_np(a.factors[layer]),  # not the last micro-batch's alone
                             ref.gram(_flat(rows[layer][:, n:]), BIAS[layer]), atol=1e-3)
      np.testing.assert_allclose(a.factors[layer], b.factors[layer], rtol=2e-5, atol=1e-6,
                                 err_msg=f"{layer} cycle {cycle}")
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=2e-6),
                 ms_p, big_p)
  assert not np.allclose(ms_p["gru"]["w_h"], params["gru"]["w_h"])


# --- 3. an ensemble: jax.vmap over stacked params, one factor per member -----------------

E = 4  # members (not H: the readout's stacked (E, H, 2) kernel reads unambiguously)


def test_ensemble_vmapped_over_stacked_params_gets_one_factor_per_member(x64):
  """Four members of an hk-transformed GRU model, their params stacked ``(E, ...)`` and the
  model applied under ``jax.vmap`` over them on one batch inside the captured loss: each of
  the GRU's three layers (and the readout) has one factor per member, the float64 Gram of the
  rows that member's weights multiplied, and each member's update of ``w_i``, ``b`` and each
  column block of ``w_h`` is the damped solve over its own rows. Also with the whole step
  vmapped (each member its own optimizer state): the same updates."""
  model = _model()
  xs = _xs()
  stacked = jax.tree.map(lambda *a: jnp.stack(a), *[_params(model, xs, k)
                                                    for k in jax.random.split(KEY, E)])
  loss = lambda p, x: jnp.sum(jnp.sin(jax.vmap(lambda q: model.apply(q, x))(p)))
  with no_sngd_warnings():
    grads, updates, state = _one_step(loss, stacked, xs)
  member = lambda tree, e: jax.tree.map(lambda a: a[e], tree)
  for e in range(E):
    rows, outs = _rows(member(stacked, e), xs)
    rows = {layer: _flat(r) for layer, r in rows.items()}
    for layer in LAYERS:
      assert state.factors[layer].shape[0] == E
      np.testing.assert_allclose(_np(state.factors[layer][e]), ref.gram(rows[layer],
                                 BIAS[layer]), rtol=1e-10, atol=1e-14, err_msg=f"{layer} {e}")
    _check_updates(member(grads, e), member(updates, e), rows,
                   _flat(np.swapaxes(outs, 0, 1)), f"member {e}: ")

  # the whole step vmapped, each member alone: the same updates
  one = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x)))

  tx = exact_sngd(**ref.one_step_kwargs())

  def alone(p):
    (_, a), g = jax.value_and_grad(sngd_jax.capture_hk(one), has_aux=True)(p, xs)
    return tx.update(g, tx.init(p), p, activations=a)[0]
  with no_sngd_warnings():
    vmapped = jax.jit(jax.vmap(alone))(stacked)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-13),
               vmapped, updates)


# --- 4. the reconstructed network ---------------------------------------------------------

def _reconstructed_loss(prime, roots, xs):
  """``_sin_loss(_model())`` written as the reconstructed network: each of the GRU's three
  products, and the readout, a local Fisher layer ``G^{-1/2} x~`` then ``W'``."""
  w_i, w_h, b = (prime["gru"][k] for k in ("w_i", "w_h", "b"))
  inv = {path: r.inv_sqrt for path, r in roots.items()}
  dense = sngd_jax.reconstructed_dense
  h = jnp.zeros((xs.shape[1], H), xs.dtype)
  outs = []
  for x in xs:
    gx = dense(x, w_i, b, inv["gru/w_i"])
    zr = jax.nn.sigmoid(gx[:, :2 * H] + dense(h, w_h[:, :2 * H], None, inv["gru/w_h[zr]"]))
    z, r = zr[:, :H], zr[:, H:]
    a = jnp.tanh(gx[:, 2 * H:] + dense(r * h, w_h[:, 2 * H:], None, inv["gru/w_h[a]"]))
    h = (1 - z) * h + z * a
    outs.append(h)
  out = jnp.swapaxes(jnp.stack(outs), 0, 1)
  return jnp.sum(jnp.sin(dense(out, prime["readout"]["w"], prime["readout"]["b"],
                               inv["readout"])))


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_sgd_on_the_reconstructed_gru_is_sngd(fisher, x64):
  """``to_reconstructed`` maps each of the GRU's three layers by its own root (``w_h``'s
  column blocks each by theirs, ``W' = G^{1/2} W~``): the reconstructed network (written by
  hand with ``reconstructed_dense`` for the three products) computes the same loss, the map
  round-trips, and one SGD step on ``W'`` mapped back by ``from_reconstructed`` is
  ``params - lr * update`` of sngd with the same factors (the paper's theorem), also with
  fisher='rfim' (one root per output unit, the column blocks' units their own)."""
  model = _model()
  xs = _xs()
  params = _params(model, xs)
  loss = _sin_loss(model)
  tx = exact_sngd(fisher=fisher, damping=1e-2, inverse_every=1, decay=0.5)
  captured = sngd_jax.capture_hk(loss, outputs=fisher == "rfim")

  @jax.jit
  def step(state, xs):
    (_, acts), grads = jax.value_and_grad(captured, has_aux=True)(params, xs)
    return (grads, *tx.update(grads, state, params, activations=acts))
  state = tx.init(params)
  for i in range(2):  # two batches: factors that are no one batch's Gram
    grads, updates, state = step(state, xs + i)
  roots = jax.jit(sngd_jax.factor_roots)(state)
  assert set(roots) == {*LAYERS, "readout"}
  to_prime, from_prime = jax.jit(sngd_jax.to_reconstructed), jax.jit(sngd_jax.from_reconstructed)
  prime = to_prime(params, roots)
  back = from_prime(prime, roots)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
               back, params)
  for layer, cols in COLS.items():  # each block mapped by its own root, not the other's
    g = ref.np64(state.factors[layer]) / ref.np64(state.weights[layer])
    if fisher == "linear":
      damped = g + 1e-2 * np.trace(g) * np.eye(H)
      w, v = np.linalg.eigh(damped)
      want = (v * np.sqrt(w)) @ v.T @ _np(params["gru"]["w_h"][:, cols])
      np.testing.assert_allclose(_np(prime["gru"]["w_h"][:, cols]), want, rtol=1e-9,
                                 atol=1e-12, err_msg=layer)
  value, g_prime = jax.jit(jax.value_and_grad(_reconstructed_loss))(prime, roots, xs + 1)
  np.testing.assert_allclose(value, jax.jit(loss)(params, xs + 1), rtol=1e-10, atol=1e-10)
  lr = 0.1
  stepped = from_prime(jax.tree.map(lambda p, g: p - lr * g, prime, g_prime), roots)
  jax.tree.map(lambda got, p, u: np.testing.assert_allclose(
      (got - p) / lr, -u, rtol=1e-7, atol=1e-11), stepped, params, updates)
  assert not np.allclose(updates["gru"]["w_h"], grads["gru"]["w_h"])


# --- 5. row masks -------------------------------------------------------------------------

def _masked_rows(rows, mask):
  """``rows`` ``(T, B, d)`` at the real (step, sequence) pairs of a ``(B, T)`` or ``(B,)``
  mask."""
  keep = np.asarray(mask, bool)
  keep = np.broadcast_to(keep[:, None], (B, T)) if keep.ndim == 1 else keep
  return rows[keep.T]


MASKS = {"examples": np.array([1, 1, 0, 1, 0, 1], bool),
         "tokens": np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0],
                             [1, 1, 1, 0], [1, 1, 1, 1]], bool)}


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_row_mask_per_sequence_under_vmap_weighs_each_step_of_each_sequence(kind, x64):
  """The GRU applied per sequence under ``jax.vmap`` (an unbatched cell under
  hk.dynamic_unroll): a ``(B,)`` mask of the real sequences, or a ``(B, T)`` one of the real
  steps, gives each of the three layers the float64 Gram of the real (step, sequence) rows
  only, and the update the damped solve over them; the readout likewise."""
  model = _model(per_example=True)
  xs = _xs()
  params = _params(model, xs[:, 0])
  mask = MASKS[kind]
  rows, outs = _rows(params, xs)
  with no_sngd_warnings():
    grads, updates, state = _one_step(_sin_loss(model, per_example=True), params, xs, mask)
  real = {layer: _masked_rows(r, mask) for layer, r in rows.items()}
  for layer in LAYERS:
    np.testing.assert_allclose(_np(state.factors[layer]), ref.gram(real[layer], BIAS[layer]),
                               rtol=1e-10, atol=1e-14, err_msg=layer)
  _check_updates(grads, updates, real, _masked_rows(outs, mask))


def test_row_mask_under_static_unroll_per_step_call(x64):
  """hk.static_unroll calls the cell once per step, on that step's ``(B, D)`` batch: a
  ``(B,)`` mask weighs every call's sequences, and a ``(B, T)`` one is given step by step
  with ``calls=[t]`` (the mask's column ``t`` for the cell's call ``t``; the readout, on
  ``(B, T, H)``, takes the whole mask). Float64 Gram of the real rows."""
  model = _model("static_unroll")
  xs = _xs()
  params = _params(model, xs)
  rows, outs = _rows(params, xs)
  grads, acts = _grads_acts(_sin_loss(model), params, xs)
  assert len(acts["gru/w_i"]) == T
  masked = {"examples": sngd_jax.with_row_mask(acts, MASKS["examples"])}
  tokens = MASKS["tokens"]
  by_step = sngd_jax.with_row_mask(acts, tokens, where=lambda p: p == "readout")
  for t in range(T):
    by_step = sngd_jax.with_row_mask(by_step, tokens[:, t], calls=[t],
                                     where=lambda p: p != "readout")
  masked["tokens"] = by_step
  for kind, a in masked.items():
    with no_sngd_warnings():
      state = factors_after_one_step(params, grads, a)
    for layer in LAYERS:
      np.testing.assert_allclose(
          _np(state.factors[layer]), ref.gram(_masked_rows(rows[layer], MASKS[kind]),
                                              BIAS[layer]),
          rtol=1e-10, atol=1e-14, err_msg=f"{kind} {layer}")
    np.testing.assert_allclose(_np(state.factors["readout"]),
                               ref.gram(_masked_rows(outs, MASKS[kind])), rtol=1e-10,
                               atol=1e-14, err_msg=kind)


def test_a_whole_token_mask_on_a_cell_called_once_per_step_warns_naming_the_per_step_mask(x64):
  """Given whole to ``hk.static_unroll``'s cell (``T`` calls on ``(B, D)``, no token axis),
  a ``(B, T)`` mask counts a sequence at every step where any of its steps is real, padded
  steps included: a warning names each GRU layer and the per-step ``calls=[t]`` mask, and the
  factors are those of that rule (the readout, one call on ``(B, T, H)``, is weighed per token
  and not named). Float64 Gram of the rows."""
  model = _model("static_unroll")
  xs = _xs()
  params = _params(model, xs)
  rows, outs = _rows(params, xs)
  grads, acts = _grads_acts(_sin_loss(model), params, xs)
  tokens = MASKS["tokens"]
  with pytest.warns(UserWarning, match=r"calls=\[t\]") as record:
    masked = sngd_jax.with_row_mask(acts, tokens)
  named = {m for w in record for m in re.findall(r"layer '([^']*)' has \d+ calls", str(w.message))}
  assert named == set(LAYERS)
  any_real = np.asarray(tokens).any(axis=1)
  with no_sngd_warnings():
    state = factors_after_one_step(params, grads, masked)
  for layer in LAYERS:
    np.testing.assert_allclose(_np(state.factors[layer]),
                               ref.gram(_masked_rows(rows[layer], any_real), BIAS[layer]),
                               rtol=1e-10, atol=1e-14, err_msg=layer)
  np.testing.assert_allclose(_np(state.factors["readout"]),
                             ref.gram(_masked_rows(outs, tokens)), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kind", sorted(MASKS))
def test_row_mask_under_a_batched_dynamic_unroll_raises_naming_the_layer_and_the_rewrite(kind,
                                                                                        x64):
  """Under hk.dynamic_unroll of a batched cell the records are ``(T, B, d)``: the scan's axis
  comes before the sequences and nothing says it is time (a scan over micro-batches looks the
  same), so a mask is refused, naming the GRU layer and the rewrite that takes one (the cell
  per sequence under ``jax.vmap``), never silently dropped or misapplied."""
  model = _model()
  xs = _xs()
  params = _params(model, xs)
  _, acts = _grads_acts(_sin_loss(model), params, xs)
  with pytest.raises(ValueError, match=r"layer 'gru/w_[^']*'.*scan.*jax\.vmap"):
    sngd_jax.with_row_mask(acts, MASKS[kind])
  for layer in LAYERS:  # each of the three is named when masked alone
    with pytest.raises(ValueError, match=re.escape(f"layer {layer!r}")):
      sngd_jax.with_row_mask(acts, MASKS[kind], where=lambda p, layer=layer: p == layer)
