"""sngd_jax.MultiSteps: k micro-batches of n examples give the update of one batch of k n.

The reference is the same optimizer run on the concatenated batch (the manual
path); micro-batch and big-batch runs agree to float32 rounding, for dense,
conv (with LayerNorm), recurrent (Embed + nn.RNN LSTM), a tied embedding,
Nystrom-sketched layers and a model of the other layer kinds (grouped conv, GroupNorm,
attention, RMSNorm, ConvTranspose, Einsum, DenseGeneral; some of them fisher="rfim"), over
several accumulation cycles with amortized statistics and refreshes. Then optax.MultiSteps's
options with sngd inside (a callable every_k_schedule, should_skip_update_fn,
use_grad_mean=False) and optax.inject_hyperparams with a learning rate changed between calls.
"""

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax
from sngd_jax._src.state import only_sngd_state

K, N = 2, 8  # micro-batches per step, examples per micro-batch


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(9)(nn.tanh(nn.Dense(7)(x)))))


class CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.LayerNorm()(nn.Conv(4, (3, 3), padding="VALID")(x)))
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class LSTM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    h = nn.RNN(nn.LSTMCell(4))(nn.Embed(7, 5)(tokens))
    return nn.Dense(7)(h)


class TiedLSTM(nn.Module):
  """The embedding table is also the output layer (``fisher={"Embed_0": "tied"}``)."""

  @nn.compact
  def __call__(self, tokens):
    emb = nn.Embed(7, 5)
    return emb.attend(nn.RNN(nn.LSTMCell(5))(emb(tokens)))


class Mixed(nn.Module):
  """The layer kinds the other models leave out, on sequences of 5 steps of 2 features."""

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3,), padding="SAME", feature_group_count=2)(x)  # grouped
    h = nn.GroupNorm(num_groups=2)(h)
    h = nn.RMSNorm()(nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4)(h))
    h = nn.ConvTranspose(3, (2,), strides=(2,))(nn.tanh(h))
    return nn.DenseGeneral(3, axis=(-2, -1))(nn.Einsum((3, 2), "btc,co->bto")(h))


# fisher="rfim" on some layers of Mixed (weighted by their outputs: captured with outputs=True)
MIXED_RFIM = {"MultiHeadDotProductAttention_0/query": "rfim", "ConvTranspose_0": "rfim",
              "Einsum_0": "rfim", "GroupNorm_0": "rfim"}


def _problem(kind):
  rng = np.random.default_rng(0)
  if kind == "mixed":
    x = jnp.asarray(rng.normal(size=(K * N, 5, 2)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, K * N), jnp.int32)
    model = Mixed()
  elif kind in ("recurrent", "tied"):
    x = jnp.asarray(rng.integers(0, 7, (K * N, 5)), jnp.int32)
    y = jnp.asarray(rng.integers(0, 7, (K * N, 5)), jnp.int32)
    model = LSTM() if kind == "recurrent" else TiedLSTM()
  else:
    shape = (K * N, 6, 6, 2) if kind == "conv" else (K * N, 6)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    y = jnp.asarray(rng.integers(0, 3, K * N), jnp.int32)
    model = CNN() if kind == "conv" else MLP()
  params = model.init(jax.random.key(0), x[:1])["params"]

  def loss_fn(p, x, y):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return params, x, y, loss_fn


def _inner(kind):
  if kind == "injected":  # factor_every is an array: statistics accumulated at every call
    return optax.inject_hyperparams(sngd_jax.sngd_momentum)(
        0.1, damping=1e-2, decay=0.7, factor_every=2, inverse_every=2)
  if kind == "multi_transform":  # sngd on two layers (a prefix mask), Adam on the last
    sngd = optax.chain(sngd_jax.sngd(damping=1e-2, decay=0.7, factor_every=2, inverse_every=2),
                       optax.sgd(0.1, momentum=0.9))
    return optax.multi_transform({"sngd": sngd, "adam": optax.adam(1e-2)},
                                 {"Dense_0": "sngd", "Dense_1": "sngd", "Dense_2": "adam"})
  if kind == "masked_bias":  # the biases masked out: sngd sees layers without a bias
    mask = {f"Dense_{i}": {"kernel": True, "bias": False} for i in range(3)}
    return optax.chain(
        optax.masked(sngd_jax.sngd(damping=1e-2, decay=0.7, factor_every=2, inverse_every=2),
                     mask),
        optax.sgd(0.1, momentum=0.9))
  inverse = sngd_jax.inverse.nystrom(rank=4) if kind == "sketched" else "auto"
  fisher = {"tied": {"Embed_0": "tied"}, "mixed": MIXED_RFIM}.get(kind, "linear")
  return optax.chain(
      sngd_jax.sngd(damping=1e-2, decay=0.7, factor_every=2, inverse_every=2, inverse=inverse,
                    fisher=fisher),
      optax.sgd(0.1, momentum=0.9))


def _step(tx, loss_fn, outputs=False):
  @jax.jit
  def step(params, state, x, y):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=outputs),
                                          has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, updates
  return step


@pytest.mark.parametrize("kind", ["dense", "conv", "recurrent", "tied", "sketched",
                                  "injected", "multi_transform", "masked_bias", "mixed"])
def test_micro_batches_give_the_big_batch_update(kind):
  """Also with the ``sngd`` under a mask (``optax.multi_transform``, ``optax.masked``): the
  statistics of the layers and rows it sees (``transform.as_seen_by``)."""
  own_model = ("conv", "recurrent", "tied", "mixed")
  params, x, y, loss_fn = _problem(kind if kind in own_model else "dense")
  big_tx = _inner(kind)
  ms = sngd_jax.MultiSteps(_inner(kind), every_k_schedule=K)
  outputs = kind == "mixed"  # read by its fisher="rfim" layers
  big_step, micro_step = _step(big_tx, loss_fn, outputs), _step(ms, loss_fn, outputs)
  big_p, big_s = params, big_tx.init(params)
  ms_p, ms_s = params, ms.init(params)
  for cycle in range(5):  # crosses factor and non-factor steps, refresh and no-refresh
    for i in range(K):
      batch = slice(i * N, (i + 1) * N)
      ms_p, ms_s, updates = micro_step(ms_p, ms_s, x[batch], y[batch])
      if i < K - 1:
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
    big_p, big_s, _ = big_step(big_p, big_s, x, y)
    assert bool(ms.has_updated(ms_s)) and int(ms_s.gradient_step) == cycle + 1
    a, b = only_sngd_state(ms_s), only_sngd_state(big_s)
    assert int(a.count) == int(b.count) == cycle + 1
    for path in b.factors:
      jax.tree.map(lambda f, g, path=path: np.testing.assert_allclose(
          f, g, rtol=2e-5, atol=1e-6, err_msg=path), a.factors[path], b.factors[path])
    jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=2e-6),
                 ms_p, big_p)
  assert all(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ms_p),
                                                   jax.tree.leaves(params), strict=True))
  if kind == "sketched":  # accumulators of sketched layers are d x r sketches, never d x d
    for path, f in ms_s.acc_statistics.items():
      if isinstance(only_sngd_state(ms_s).factors[path], sngd_jax.Sketch):
        assert isinstance(f, sngd_jax.Sketch) and f.y.shape[-1] == 4, path
    assert any(isinstance(f, sngd_jax.Sketch) for f in ms_s.acc_statistics.values())


def test_unequal_micro_batches_weigh_statistics_by_rows_and_the_gradient_per_batch():
  """docs/training-loops.md: a short last micro-batch counts in the factors by its rows
  (as one batch of all the rows would), and in the gradient as in ``optax.MultiSteps``
  (the mean of the micro-batch means)."""
  params, x, y, loss_fn = _problem("dense")
  sizes = (6, 6, 4)  # 3 micro-batches of the K * N = 16 rows, the last one short
  tx = lambda: optax.chain(sngd_jax.sngd(damping=1e-2, decay=0.0, prior="none",
                                         max_norm=None, inverse_every=1),
                           optax.sgd(0.1))
  ms = sngd_jax.MultiSteps(tx(), every_k_schedule=len(sizes))
  micro_step, state = _step(ms, loss_fn), ms.init(params)
  start, grads = 0, []
  for n in sizes:
    xb, yb = x[start:start + n], y[start:start + n]
    grads.append(jax.grad(loss_fn)(params, xb, yb))
    new_params, state, _ = micro_step(params, state, xb, yb)
    start += n
  whole = slice(0, sum(sizes))
  (_, acts), _ = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
      params, x[whole], y[whole])
  mean_grad = jax.tree.map(lambda *g: sum(g) / len(g), *grads)
  big = tx()
  updates, big_state = big.update(mean_grad, big.init(params), params, activations=acts)
  for path, f in only_sngd_state(big_state).factors.items():
    np.testing.assert_allclose(only_sngd_state(state).factors[path], f, rtol=2e-5, atol=1e-6,
                               err_msg=path)
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=2e-6),
               new_params, optax.apply_updates(params, updates))
  # the whole batch's mean gradient would move the params elsewhere: the check can tell
  whole_grad = jax.grad(loss_fn)(params, x[whole], y[whole])
  other, _ = big.update(whole_grad, big.init(params), params, activations=acts)
  assert not all(np.allclose(p, q, rtol=1e-4, atol=2e-6) for p, q in zip(
      jax.tree.leaves(new_params), jax.tree.leaves(optax.apply_updates(params, other)),
      strict=True))


def _assert_same_run(ms_state, ms_params, big_state, big_params):
  a, b = only_sngd_state(ms_state), only_sngd_state(big_state)
  assert int(a.count) == int(b.count)
  for path in b.factors:
    jax.tree.map(lambda f, g, path=path: np.testing.assert_allclose(
        f, g, rtol=2e-5, atol=1e-6, err_msg=path), a.factors[path], b.factors[path])
  jax.tree.map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-4, atol=2e-6),
               ms_params, big_params)


@pytest.mark.parametrize("option", ["callable_schedule", "skip_not_finite", "sum"])
def test_optax_multisteps_options_with_sngd_inside(option):
  """``optax.MultiSteps``'s options, with sngd inside: ``every_k_schedule`` a callable (2
  micro-batches of 4 rows, then 3), ``should_skip_update_fn=optax.skip_not_finite`` (a
  micro-batch with a NaN input between the good ones: skipped, its statistics too) and
  ``use_grad_mean=False`` (the sum of the micro-batch gradients, the statistics still the
  row-weighted mean). Reference: the inner optimizer on the concatenated good micro-batches,
  with ``k`` times the loss for the sum."""
  params, x, y, loss_fn = _problem("dense")
  n = 4 if option == "callable_schedule" else N
  k_of = (lambda step: jnp.where(step < 1, 2, 3)) if option == "callable_schedule" else (
      lambda step: K)
  ms = sngd_jax.MultiSteps(
      _inner("dense"), every_k_schedule=k_of if option == "callable_schedule" else K,
      should_skip_update_fn=optax.skip_not_finite if option == "skip_not_finite" else None,
      use_grad_mean=option != "sum")
  big_tx = _inner("dense")
  scaled = lambda p, x, y: K * loss_fn(p, x, y)
  micro_step = _step(ms, loss_fn)
  big_step = _step(big_tx, scaled if option == "sum" else loss_fn)
  ms_p, ms_s, big_p, big_s = params, ms.init(params), params, big_tx.init(params)
  bad_x = x[:N].at[3, 2].set(jnp.nan)
  for cycle in range(3):  # factor steps 0 and 2, not 1; k = 2, 3, 3 under the schedule
    k = int(k_of(cycle))
    for i in range(k):
      rows = slice(i * n, (i + 1) * n)
      if option == "skip_not_finite" and i == cycle % k:  # the first, then the last one
        before = ms_s
        ms_p, ms_s, updates = micro_step(ms_p, ms_s, bad_x, y[:N])
        assert bool(ms_s.skip_state["should_skip"]) and int(ms_s.mini_step) == i
        assert all(bool(jnp.all(u == 0)) for u in jax.tree.leaves(updates))
        jax.tree.map(np.testing.assert_array_equal, ms_s._replace(skip_state=()),
                     before._replace(skip_state=()))
      ms_p, ms_s, _ = micro_step(ms_p, ms_s, x[rows], y[rows])
    big_p, big_s, _ = big_step(big_p, big_s, x[:k * n], y[:k * n])
    assert int(ms_s.gradient_step) == cycle + 1
    _assert_same_run(ms_s, ms_p, big_s, big_p)


def test_inject_hyperparams_learning_rate_changed_between_calls():
  """``optax.inject_hyperparams(sngd_jax.sngd_momentum)`` inside ``MultiSteps``, its learning
  rate set in the state between calls (before the emitting one, or mid-cycle, a jnp scalar or a
  Python float as in optax's docs): the update uses the rate the state holds on the emitting
  call and keeps it, as the plain injected optimizer on the big batch with the same rates. A run
  at the constant first rate differs (the rate is read)."""
  params, x, y, loss_fn = _problem("dense")
  make = lambda: optax.inject_hyperparams(sngd_jax.sngd_momentum)(
      0.1, damping=1e-2, factor_every=2, inverse_every=2)
  big_tx, ms = make(), sngd_jax.MultiSteps(make(), every_k_schedule=K)
  big_step, micro_step = _step(big_tx, loss_fn), _step(ms, loss_fn)

  def run(rates):
    ms_p, ms_s, big_p, big_s = params, ms.init(params), params, big_tx.init(params)
    for cycle, lr in enumerate(rates):
      value = jnp.asarray(lr, jnp.float32) if cycle < 2 else lr
      for i in range(K):
        if i == (K - 1 if cycle % 2 == 0 else 0):
          ms_s.inner_opt_state.hyperparams["learning_rate"] = value
        ms_p, ms_s, _ = micro_step(ms_p, ms_s, x[i * N:(i + 1) * N], y[i * N:(i + 1) * N])
      assert float(ms_s.inner_opt_state.hyperparams["learning_rate"]) == np.float32(lr)
      big_s.hyperparams["learning_rate"] = value
      big_p, big_s, _ = big_step(big_p, big_s, x, y)
      _assert_same_run(ms_s, ms_p, big_s, big_p)
    return ms_p

  changed = run([0.1, 0.03, 0.2, 0.05])
  constant = run([0.1] * 4)
  assert not np.allclose(changed["Dense_0"]["kernel"], constant["Dense_0"]["kernel"],
                         rtol=1e-3, atol=1e-5)


def test_statistics_are_accumulated_only_for_factor_steps():
  params, x, y, loss_fn = _problem("dense")
  ms = sngd_jax.MultiSteps(_inner("dense"), every_k_schedule=K)  # factor_every=2
  step = _step(ms, loss_fn)
  state = ms.init(params)
  rows = lambda s: [int(r) for r in s.acc_rows.values()]
  params, state, _ = step(params, state, x[:N], y[:N])      # inner count 0: a factor step
  assert rows(state) == [N] * 3
  params, state, _ = step(params, state, x[N:], y[N:])      # emits; accumulators reset
  assert rows(state) == [0] * 3
  params, state, _ = step(params, state, x[:N], y[:N])      # inner count 1: not read
  assert rows(state) == [0] * 3
  assert all(float(jnp.sum(jnp.abs(f))) == 0 for f in jax.tree.leaves(state.acc_statistics))


# Without sngd inside: tests/test_multisteps_optax.py compares every field with optax.MultiSteps.


def test_signature_is_optax_multisteps():
  """``help(sngd_jax.MultiSteps)`` and IDEs show optax's arguments, not ``(*args, **kwargs)``."""
  assert inspect.signature(sngd_jax.MultiSteps) == inspect.signature(optax.MultiSteps)


def test_sngd_inside_needs_activations():
  params, x, y, loss_fn = _problem("dense")
  ms = sngd_jax.MultiSteps(_inner("dense"), every_k_schedule=K)
  grads = jax.grad(loss_fn)(params, x, y)
  with pytest.raises(ValueError, match="needs `activations=`"):
    ms.update(grads, ms.init(params), params)


def test_two_sngd_groups_are_refused_with_the_fix():
  params, _, _, _ = _problem("dense")
  labels = jax.tree.map(lambda _: "a", params)
  labels = {**labels, "Dense_1": jax.tree.map(lambda _: "b", params["Dense_1"])}
  inner = optax.multi_transform({"a": sngd_jax.sngd_momentum(0.1),
                                 "b": sngd_jax.sngd_adam(1e-3)}, labels)
  with pytest.raises(ValueError, match=r"holds 2\. Wrap each group's optimizer in its own "
                                       r"`sngd_jax.MultiSteps` inside `optax.multi_transform`"):
    sngd_jax.MultiSteps(inner, every_k_schedule=K).init(params)


@pytest.mark.parametrize("wrap", ["chain", "apply_if_finite", "multi_transform"])
def test_optax_wrappers_pass_activations_on(wrap):
  """``MultiSteps`` is a ``GradientTransformationExtraArgs``, so optax's wrappers forward
  ``activations=`` to it (they drop them for ``optax.MultiSteps``); the wrapped runs equal the
  bare one exactly."""
  params, x, y, loss_fn = _problem("dense")
  bare = sngd_jax.MultiSteps(_inner("dense"), every_k_schedule=K)
  ms = sngd_jax.MultiSteps(_inner("dense"), every_k_schedule=K)
  assert isinstance(ms, optax.GradientTransformationExtraArgs)
  assert isinstance(ms, optax.MultiSteps)
  init, _ = ms  # the (init, update) pair of every optax transform
  jax.tree.map(np.testing.assert_array_equal, init(params), ms.init(params))
  if wrap == "chain":
    tx = optax.chain(optax.clip_by_global_norm(1e9), ms)
  elif wrap == "apply_if_finite":
    tx = optax.apply_if_finite(ms, 3)
  else:
    tx = optax.multi_transform({"all": ms}, lambda p: jax.tree.map(lambda _: "all", p))
  s1, s2 = bare.init(params), tx.init(params)
  p1 = p2 = params
  step1, step2 = _step(bare, loss_fn), _step(tx, loss_fn)
  for i in range(3 * K):
    batch = slice((i % K) * N, (i % K + 1) * N)
    p1, s1, _ = step1(p1, s1, x[batch], y[batch])
    p2, s2, _ = step2(p2, s2, x[batch], y[batch])
  assert int(only_sngd_state(s2).count) == 3
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p1, p2)
  assert not np.allclose(jax.tree.leaves(p2)[0], jax.tree.leaves(params)[0])


def test_nnx_optimizer_with_wrapped_multisteps():
  from flax import nnx  # noqa: PLC0415

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.a, self.b = nnx.Linear(6, 7, rngs=rngs), nnx.Linear(7, 3, rngs=rngs)

    def __call__(self, x):
      return self.b(nnx.tanh(self.a(x)))

  _, x, y, _ = _problem("dense")

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  def run(make_tx):
    model = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
      (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)(
          model, x, y)
      opt.update(model, grads, activations=acts)

    for i in range(2 * K):
      batch = slice((i % K) * N, (i % K + 1) * N)
      step(model, opt, x[batch], y[batch])
    return nnx.state(model, nnx.Param)

  inner = lambda: sngd_jax.sngd_momentum(0.1, damping=1e-2, factor_every=2, inverse_every=2)
  bare = run(lambda: sngd_jax.MultiSteps(inner(), every_k_schedule=K))
  wrapped = run(lambda: optax.apply_if_finite(
      sngd_jax.MultiSteps(inner(), every_k_schedule=K), 3))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), bare, wrapped)


def test_float64_statistics_are_averaged_in_float64():
  """Under x64 with ``accumulator_dtype=float64``, three micro-batches give the big batch's
  factors to float64 rounding: the row weights ``n / total`` were divided in float32 (1e-8)."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(3)
    k = 3
    x = jnp.asarray(rng.normal(size=(k * N, 6)))
    y = jnp.asarray(rng.integers(0, 3, k * N), jnp.int32)
    model = MLP()
    params = jax.tree.map(lambda a: a.astype(jnp.float64),
                          model.init(jax.random.key(0), x[:N])["params"])

    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(
          model.apply({"params": p}, x), y).mean()

    grad_fn = jax.grad(sngd_jax.capture(loss_fn), has_aux=True)
    inner = sngd_jax.sngd(decay=0.0, inverse="cholesky", max_norm=None)
    ms = sngd_jax.MultiSteps(inner, every_k_schedule=k, accumulator_dtype=jnp.float64)
    state = ms.init(params)
    for i in range(k):
      g, acts = grad_fn(params, x[i * N:(i + 1) * N], y[i * N:(i + 1) * N])
      _, state = ms.update(g, state, params, activations=acts)
    g, acts = grad_fn(params, x, y)
    _, want = inner.update(g, inner.init(params), params, activations=acts)
    for path, f in want.factors.items():
      np.testing.assert_allclose(state.inner_opt_state.factors[path], f, rtol=1e-13,
                                 atol=1e-15, err_msg=path)


def test_optax_multisteps_around_sngd_warns_and_ours_does_not():
  """``optax.MultiSteps`` hands the inner optimizer one micro-batch's activations at most
  (a newcomer's natural port, silent under ``nnx.Optimizer`` and a direct ``update``):
  ``init`` warns and names ``sngd_jax.MultiSteps``; that one, and a plain optimizer under
  ``optax.MultiSteps``, do not warn."""
  import warnings  # noqa: PLC0415
  params = {"Dense_0": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
  with pytest.warns(UserWarning, match="sngd_jax.MultiSteps") as caught:
    optax.MultiSteps(sngd_jax.sngd_adam(1e-3), 2).init(params)
  assert caught[0].filename == __file__  # the user's line, not optax's
  with pytest.warns(UserWarning, match="sngd_jax.MultiSteps"):
    optax.MultiSteps(sngd_jax.sngd(), 2).gradient_transformation().init(params)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sngd_jax.MultiSteps(sngd_jax.sngd_adam(1e-3), 2).init(params)
    optax.MultiSteps(optax.adam(1e-3), 2).init(params)


def test_rows_past_int32_keep_positive_weights():
  """A cycle of more than ``2**31`` rows of one layer (here the state after 2047 micro-batches
  of ``2**20`` rows of a 1x1 conv, then three more with larger inputs) averages every
  micro-batch by its rows: an int32 row count wrapped negative there and the last micro-batches
  pulled the factor away from their own estimate. Reference: the float64 row-weighted mean."""
  class Conv1x1(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Conv(1, (1, 1))(x).mean()

  model = Conv1x1()
  params = model.init(jax.random.key(0), jnp.ones((1, 2, 2, 1)))["params"]
  loss_fn = lambda p, x: model.apply({"params": p}, x)
  ms = sngd_jax.MultiSteps(optax.chain(sngd_jax.sngd(decay=0.0, prior="none"), optax.sgd(0.1)),
                           every_k_schedule=4096)
  n, before = 2 ** 20, 2 ** 31 - 2 ** 20  # rows per micro-batch; rows accumulated so far
  state = ms.init(params)
  ones = jnp.ones((2, 2))  # the mean so far: inputs of 1 (E[x^2] = E[x] = 1, with the bias row)
  state = state._replace(
      mini_step=jnp.asarray(2047, state.mini_step.dtype),
      acc_statistics={"Conv_0": ones},
      acc_rows={"Conv_0": jnp.asarray(before, state.acc_rows["Conv_0"].dtype)})

  @jax.jit
  def step(state, a):
    x = jnp.full((1, 1024, 1024, 1), a, jnp.float32)  # 2**20 rows
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x)
    return ms.update(grads, state, params, activations=acts)[1]

  for _ in range(3):
    state = step(state, jnp.float32(3.0))
  total = before + 3 * n
  want = np.array([[before * 1.0 + 3 * n * 9.0, before * 1.0 + 3 * n * 3.0],
                   [before * 1.0 + 3 * n * 3.0, total]], np.float64) / total
  np.testing.assert_allclose(state.acc_statistics["Conv_0"], want, rtol=1e-5)
  assert float(state.acc_rows["Conv_0"]) == total


def test_vmapped_members_run_the_inner_update_on_emitting_calls_only():
  """Under a caller's ``jax.vmap`` (an ensemble) each member gets its single run's params, and
  the inner optimizer (preconditioning, refreshes) runs on the emitting calls only: a plain
  ``lax.cond`` became a select there, which ran it on every micro-batch."""
  params, x, y, loss_fn = _problem("dense")
  ran = []

  def spy_update(updates, state, params=None, **extra):
    del params, extra
    jax.debug.callback(lambda v: ran.append(1), jnp.ravel(jax.tree.leaves(updates)[0])[0])
    return updates, state

  spy = optax.GradientTransformationExtraArgs(lambda p: optax.EmptyState(), spy_update)
  ms = sngd_jax.MultiSteps(optax.chain(_inner("dense"), spy), every_k_schedule=K)
  single = _step(ms, loss_fn)
  members = jax.tree.map(lambda a: jnp.stack([a, a]), params)
  step = jax.jit(jax.vmap(_step(ms, loss_fn).__wrapped__, in_axes=(0, 0, None, None)))
  p1, s1, pv, sv = params, ms.init(params), members, jax.vmap(ms.init)(members)
  for _ in range(3):
    for i in range(K):
      batch = slice(i * N, (i + 1) * N)
      p1, s1, _ = single(p1, s1, x[batch], y[batch])
      pv, sv, _ = step(pv, sv, x[batch], y[batch])
  jax.effects_barrier()
  assert len(ran) == 3 * (1 + 2)  # per cycle: the single run's emit, and one per member
  for m in range(2):
    jax.tree.map(lambda a, b, m=m: np.testing.assert_allclose(a[m], b, rtol=1e-5, atol=1e-7),
                 pv, p1)


def test_multisteps_passes_through_equinox_filter_jit_as_an_argument():
  """Equinox steps often take the optimizer as an argument of ``eqx.filter_jit`` (or hold it in
  an ``eqx.Module``), which flattens it and rebuilds it from its leaves. ``optax.MultiSteps``
  is one leaf; ``sngd_jax.MultiSteps``, a NamedTuple subclass, was flattened into its two
  functions and rebuilt as ``MultiSteps(init_fn, update_fn)``: ``AttributeError: 'function'
  object has no attribute 'init'``. Now a static pytree: the step compiles once and two cycles
  of micro-batches give the inner optimizer's run on the concatenated batches."""
  eqx = pytest.importorskip("equinox")
  _, x, y, _ = _problem("dense")
  model = eqx.nn.MLP(6, 3, width_size=7, depth=2, activation=jnp.tanh, key=jax.random.key(0))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()

  traces = []

  @eqx.filter_jit
  def step(model, opt_state, tx, x, y):
    traces.append(1)
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss_fn), has_aux=True)(
        model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return eqx.apply_updates(model, updates), opt_state

  params = eqx.filter(model, eqx.is_inexact_array)
  ms = sngd_jax.MultiSteps(_inner("dense"), every_k_schedule=K)
  assert jax.tree.map(lambda a: a, ms) is ms
  micro, micro_state = model, ms.init(params)
  big, big_tx = model, _inner("dense")
  big_state = big_tx.init(params)
  for _ in range(2):
    for i in range(K):
      batch = slice(i * N, (i + 1) * N)
      micro, micro_state = step(micro, micro_state, ms, x[batch], y[batch])
    big, big_state = step(big, big_state, big_tx, x, y)
  assert len(traces) == 2  # one compile per optimizer
  got, want = eqx.filter(micro, eqx.is_inexact_array), eqx.filter(big, eqx.is_inexact_array)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), got, want)
  assert not np.allclose(got.layers[0].weight, model.layers[0].weight)
