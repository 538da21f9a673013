"""``jax.lax.map`` over the batch: a model applied per example, ``jax.lax.map(lambda x:
model.apply(params, x), batch)`` (or ``batch_size=k``, a scan over vmapped chunks and a vmapped
remainder), in linen, NNX, Equinox and Haiku (the transformed model's ``apply`` under the map).
The map's axis holds the examples, as a ``jax.vmap``'s does: a ``(B,)`` row mask weighs them (a
``(B, T)`` mask their tokens), and ``stats_batch_size=n`` takes every row of the first ``n``
examples.

Each factor is compared with the float64 Gram sum ``(1/n) sum_r x~_r x~_r^T`` of the rows the
layer saw, from an independent numpy forward pass. Until 2026-12-06 the map's axis was a scan's
(more rows of every example, as time steps): the masks raised that the axes before the example
axis were not indexed by the mask (Equinox: that the record had no example axis), and
``stats_batch_size=2`` took the first two positions of every example (linen, NNX, Haiku), or
every row (Equinox).

A ``jax.lax.map`` whose every step sees the whole closed-over batch (noise draws of a Monte
Carlo loss, mapped over keys) is a scan over the draws: the examples are each step's own, and
``stats_batch_size=2`` takes the first 2 examples of every draw (until 2026-12-06 the draws were
read as the examples). Where the program cannot tell (mapped noise arrays, a per-example map
with a closed-over table), the examples reading is kept, with a warning.
"""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import factors_after_one_step
from flax import nnx
from helpers_draws import NNXMLP, D, H, LinenMLP, assert_mlp_factors, captured
from helpers_warnings import no_sngd_warnings

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

B, T = 5, 3  # examples, positions (D features, H hidden units: helpers_draws)
# None: a scan over the 5 examples; 2: a scan over 2 vmapped chunks of 2, and a remainder of 1.
BATCH_SIZES = [None, 2]
FRAMEWORKS = ["linen", "nnx", "equinox", "haiku"]


def _batch():
  return jax.random.normal(jax.random.key(1), (B, T, D), jnp.float64)


def _captured(framework, batch_size):
  """``(params, grads, acts, (kernel, bias) of 'hidden' as (D, H) and (H,))`` of one gradient
  of ``sum(sin(lax.map(model, x, batch_size=batch_size)))``, without an sngd warning."""
  x = _batch()
  per_example = lambda f: lambda *a: jnp.sum(jnp.sin(jax.lax.map(
      lambda e: f(*a, e), x, batch_size=batch_size)))
  with no_sngd_warnings():
    if framework == "linen":
      model = LinenMLP()
      params = model.init(jax.random.key(0), x[0])["params"]
      loss = per_example(lambda p, e: model.apply({"params": p}, e))
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
      w, b = params["hidden"]["kernel"], params["hidden"]["bias"]
    elif framework == "nnx":
      model = NNXMLP(nnx.Rngs(0))
      loss = per_example(lambda m, e: m(e))
      (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model)
      params = nnx.state(model, nnx.Param)
      w, b = model.hidden.kernel[...], model.hidden.bias[...]
    elif framework == "haiku":  # the transformed model's apply under the map, outside it
      hk = pytest.importorskip("haiku")
      model = hk.without_apply_rng(hk.transform(lambda x: hk.Linear(2, name="out")(
          jnp.tanh(hk.Linear(H, name="hidden")(x)))))
      params = model.init(jax.random.key(0), x[0])
      loss = per_example(lambda p, e: model.apply(p, e))
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(params)
      w, b = params["hidden"]["w"], params["hidden"]["b"]
    else:
      eqx = pytest.importorskip("equinox")
      keys = jax.random.split(jax.random.key(0))

      class EqxMLP(eqx.Module):
        hidden: eqx.nn.Linear
        out: eqx.nn.Linear

        def __call__(self, x):  # per token, under a vmap over the example's T positions
          return jax.vmap(lambda t: self.out(jnp.tanh(self.hidden(t))))(x)

      model = EqxMLP(eqx.nn.Linear(D, H, key=keys[0], dtype=jnp.float64),
                     eqx.nn.Linear(H, 2, key=keys[1], dtype=jnp.float64))
      loss = per_example(lambda m, e: m(e))
      (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss), has_aux=True)(
          model)
      params = eqx.filter(model, eqx.is_inexact_array)
      w, b = model.hidden.weight.T, model.hidden.bias
  return params, grads, acts, (ref.np64(w), ref.np64(b))


def _assert_factors(state, keep, w, b):
  """The factors of 'hidden' and 'out' are the float64 Gram sums over the rows ``keep``
  selects (a ``(B, T)`` bool array: example ``i``'s position ``t``) of the numpy forward
  pass."""
  x = ref.np64(_batch())
  h = np.tanh(x @ w + b)
  for path, rows in (("hidden", x[keep]), ("out", h[keep])):
    np.testing.assert_allclose(ref.normalized_factor(state, path), ref.gram(rows),
                               rtol=1e-10, atol=1e-13, err_msg=path)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_every_row_of_every_example_without_a_mask(framework, batch_size):
  params, grads, acts, (w, b) = _captured(framework, batch_size)
  assert [c.batch_axis for c in acts["hidden"]] == [0]
  assert [c.num_examples for c in acts["hidden"]] == [B]
  _assert_factors(factors_after_one_step(params, grads, acts), np.ones((B, T), bool), w, b)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_row_mask_weighs_the_mapped_examples_and_their_tokens(framework, batch_size):
  """A ``(B,)`` mask keeps the real examples' rows (all ``T`` of each); a ``(B, T)`` mask the
  real tokens. (It raised: the map's axis was more rows, not the examples.)"""
  params, grads, acts, (w, b) = _captured(framework, batch_size)
  real = np.array([True, False, True, True, False])
  tokens = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0], [0, 0, 0], [1, 0, 1]], bool)
  for mask, keep in ((real, np.repeat(real[:, None], T, axis=1)), (tokens, tokens)):
    state = factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, mask))
    _assert_factors(state, keep, w, b)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_stats_batch_size_takes_the_first_examples_every_row(framework, batch_size):
  """``stats_batch_size=2``: the ``2 * T`` rows of examples 0 and 1 (linen and NNX took the
  first 2 positions of every example, Equinox every row)."""
  params, grads, acts, (w, b) = _captured(framework, batch_size)
  state = factors_after_one_step(params, grads, acts, stats_batch_size=2)
  _assert_factors(state, np.arange(B)[:, None].repeat(T, axis=1) < 2, w, b)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_masked_update_is_the_damped_solve_over_the_real_examples(batch_size):
  """The whole update, not the factor alone: with a ``(B,)`` mask the linen update of each
  layer is the float64 damped solve of its gradient against the real examples' rows."""
  params, grads, acts, (w, b) = _captured("linen", batch_size)
  real = np.array([True, True, False, True, False])
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  updates, _ = jax.jit(lambda g, a: tx.update(g, tx.init(params), params, activations=a))(
      grads, sngd_jax.with_row_mask(acts, real))
  x = ref.np64(_batch())[real].reshape(-1, D)
  ref.assert_dense_update(x, grads["hidden"], updates["hidden"], "hidden")
  ref.assert_dense_update(np.tanh(x @ w + b), grads["out"], updates["out"], "out")


def test_map_over_micro_batches_is_a_vmap_over_them():
  """``jax.lax.map`` over ``M`` micro-batches of ``b`` examples (each step a ``(b, D)`` batch),
  as ``jax.vmap`` over them: the map's axis is the examples' axis, so ``stats_batch_size=1``
  takes the first micro-batch whole and an ``(M, b)`` mask weighs example ``j`` of micro-batch
  ``i`` (it took example 0 of every micro-batch, and the mask raised)."""
  x = _batch()  # read as M = 5 micro-batches of b = 3 examples of D features
  model = LinenMLP()
  params = model.init(jax.random.key(0), x[0])["params"]
  loss = lambda p: jnp.sum(jnp.sin(jax.lax.map(lambda m: model.apply({"params": p}, m), x,
                                               batch_size=2)))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  w, b = ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=1),
                  np.arange(B)[:, None].repeat(T, axis=1) < 1, w, b)
  real = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1], [0, 1, 0]], bool)
  _assert_factors(factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, real)),
                  real, w, b)


S = 3  # noise draws


def _noise(how):
  """``(S, B, D)`` float64 noise, and what the map runs over: the noise itself, or the keys the
  step draws it from (``jax.random.normal(key, (B, D))``)."""
  keys = jax.random.split(jax.random.key(2), S)
  noise = 0.1 * jnp.stack([jax.random.normal(k, (B, D), jnp.float64) for k in keys])
  if how == "noise":
    return noise, noise, lambda n: n
  return noise, keys, lambda k: 0.1 * jax.random.normal(k, (B, D), jnp.float64)


def _draws_captured(framework, loop="map", how="keys", batch_size=None, expect=no_sngd_warnings):
  """``(params, grads, acts, noisy inputs (S, B, D) as float64, (kernel, bias) of 'hidden')``
  of one gradient of a Monte Carlo loss over ``S`` noise draws of a closed-over ``(B, D)``
  batch, every step the whole batch: ``sum(sin(lax.map(lambda n: model(x + n), noise)))``
  (``how='keys'``: each step draws its noise from its key), or the same loop as ``lax.scan``.
  Under ``expect()`` (no sngd warning)."""
  x = _batch()[:, 0]  # (B, D)
  noise, over, draw = _noise(how)

  def looped(step):
    if loop == "map":
      return jnp.sum(jnp.sin(jax.lax.map(lambda n: step(x + draw(n)), over,
                                         batch_size=batch_size)))
    return jnp.sum(jnp.sin(jax.lax.scan(lambda c, n: (c, step(x + draw(n))), None, over)[1]))

  params, grads, acts, (w, b) = captured(framework, looped, x, expect)
  return params, grads, acts, ref.np64(x)[None] + ref.np64(noise), (w, b)


_assert_draw_factors = assert_mlp_factors


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_map_over_noise_draws_takes_the_first_examples_of_every_draw(framework, batch_size):
  """A ``jax.lax.map`` over keys whose every step draws noise for the whole closed-over batch
  (a Monte Carlo loss; whole, or in chunks of ``batch_size``): each step's layer calls hold the
  ``B`` examples themselves, so the map's axis is more rows of each example, as a
  ``jax.lax.scan``'s: ``stats_batch_size=2`` takes the first 2 examples of every draw. (The
  map's axis was read as the examples: ``stats_batch_size=2`` took every example of the first
  2 draws, 0.72 relative off the factor.) Without ``stats_batch_size`` every row counts either
  way. A ``(B,)`` row mask raises, naming the layer, as for a scan's axis (it raised too, or,
  with as many draws as examples, silently weighed the draws)."""
  params, grads, acts, xs, (w, b) = _draws_captured(framework, batch_size=batch_size)
  assert [c.num_examples for c in acts["hidden"]] == [B]
  _assert_draw_factors(factors_after_one_step(params, grads, acts), xs.reshape(-1, D), w, b,
                       "all rows")
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                       xs[:, :2].reshape(-1, D), w, b, "stats_batch_size=2")
  with pytest.raises(ValueError, match="'hidden'.*before its example axis"):  # as a scan's
    sngd_jax.with_row_mask(acts, np.array([True, False, True, True, False]))


def test_map_over_noise_arrays_cannot_be_told_from_one_over_examples_and_warns():
  """Mapped over the ``(S, B, D)`` noise itself, with the ``(B, D)`` batch closed over, each
  step's call reads a closed-over array and a mapped slice both of ``B`` rows: the same shapes
  and data flow as ``(T, D)`` examples mapped with a closed-over ``(T, D)`` table. The map's
  axis is then read as the examples (the documented default), with a warning naming the layers
  and ``jax.lax.scan``: ``stats_batch_size=2`` takes every example of the first 2 draws."""
  warns = lambda: pytest.warns(UserWarning, match="sngd: layer 'hidden', 'out' under a "
                               "`jax.lax.map`.*look alike.*`jax.lax.scan`")
  params, grads, acts, xs, (w, b) = _draws_captured("linen", how="noise", expect=warns)
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                       xs[:2].reshape(-1, D), w, b)


def test_map_over_noise_draws_is_the_scan_over_them():
  """The draws looped by ``jax.lax.scan`` give the same factors (the scan's axis is never the
  examples): the float64 Gram of the first 2 examples of every draw."""
  params, grads, acts, xs, (w, b) = _draws_captured("linen", "scan", "noise")
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                       xs[:, :2].reshape(-1, D), w, b)


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_map_over_draws_inside_a_vmap_over_the_examples(framework):
  """``jax.vmap`` over the examples, inside it a ``jax.lax.map`` over each example's ``S``
  draws (``(B, S, D)`` noise): the vmap's axis holds the examples, the map's is more rows of
  each: ``stats_batch_size=2`` takes every draw of the first 2 examples."""
  x = _batch()[:, 0]
  noise = 0.1 * jax.random.normal(jax.random.key(3), (B, S, D), jnp.float64)
  looped = lambda step: jnp.sum(jnp.sin(jax.vmap(lambda xi, ni: jax.lax.map(
      lambda n: step(xi + n), ni))(x, noise)))
  params, grads, acts, (w, b) = captured(framework, looped, x, eqx_batched=False)
  xs = ref.np64(x)[:, None] + ref.np64(noise)  # (B, S, D)
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                       xs[:2].reshape(-1, D), w, b)


class TrunkHead(nnx.Module):
  """``trunk`` on the batch, then ``head`` on ``S`` noise draws of its output, in a
  ``jax.lax.map`` over keys: each step closes over the activation ``h``, not the batch."""

  def __init__(self, rngs):
    self.trunk = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
    self.head = nnx.Linear(D, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x, keys):
    h = self.trunk(x)
    return jax.lax.map(
        lambda k: self.head(h + 0.1 * jax.random.normal(k, h.shape, h.dtype)), keys)


def test_map_over_draws_of_a_closed_over_activation_takes_the_first_examples_of_every_draw():
  """The whole batch each step sees is an activation computed outside the map (``h =
  trunk(x)``, Monte Carlo dropout or noise on a head), differentiated as parameters are: the
  map's axis is the draws', ``stats_batch_size=2`` takes the first 2 examples of every draw
  (float64 numpy). Until 2026-12-06 a differentiated array was read as a parameter, never the
  batch: ``head``'s record held 3 "examples" (the draws) and ``stats_batch_size=2`` took every
  example of the first 2 draws (1.46 relative off the factor)."""
  x = _batch()[:, 0]
  keys = jax.random.split(jax.random.key(2), S)
  model = TrunkHead(nnx.Rngs(0))
  with no_sngd_warnings():
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(
        lambda m: jnp.sum(jnp.sin(m(x, keys)))), has_aux=True)(model)
  params = nnx.state(model, nnx.Param)
  assert [c.num_examples for c in acts["head"]] == [B]
  state = factors_after_one_step(params, grads, acts, stats_batch_size=2)
  w, b = ref.np64(model.trunk.kernel[...]), ref.np64(model.trunk.bias[...])
  h = ref.np64(x) @ w + b
  hs = np.stack([h + 0.1 * ref.np64(jax.random.normal(k, h.shape, jnp.float64)) for k in keys])
  np.testing.assert_allclose(ref.normalized_factor(state, "head"),
                             ref.gram(hs[:, :2].reshape(-1, D)), rtol=1e-10, atol=1e-13)
  np.testing.assert_allclose(ref.normalized_factor(state, "trunk"),
                             ref.gram(ref.np64(x)[:2]), rtol=1e-10, atol=1e-13)


def test_map_over_draws_of_a_batch_passed_before_the_params_is_the_scan_over_them():
  """linen's ``capture(loss)(x, params)`` (the batch first, the params differentiated with
  ``argnums=1``): the batch is an argument of the captured function, not a parameter (only its
  differentiated arguments are), so a map over keys whose steps add noise to it is still a
  scan over the draws: ``stats_batch_size=2`` takes the first 2 examples of every draw
  (float64 numpy)."""
  x = _batch()[:, 0]
  noise, keys, draw = _noise("keys")
  model = LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda x, p: jnp.sum(jnp.sin(jax.lax.map(
      lambda k: model.apply({"params": p}, x + draw(k)), keys)))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), argnums=1, has_aux=True)(
        x, params)
  assert [c.num_examples for c in acts["hidden"]] == [B]
  xs = ref.np64(x)[None] + ref.np64(noise)
  w, b = ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                       xs[:, :2].reshape(-1, D), w, b)


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_a_map_that_pools_no_layer_traces_its_step_as_jax_does(batch_size):
  """The extra trace that tells draws from examples is made only for a map with a layer call
  that pools its axis: a map over stacked params (an ensemble, each member its own factor) and
  a map whose step calls no layer trace their step as often as JAX's own ``lax.map`` (once,
  twice with a remainder chunk; until 2026-12-06 once more each), with the ensemble's factors the
  float64 Gram of its input per member."""
  x = _batch()[:, 0]
  model = LinenMLP()
  stacked = jax.vmap(lambda k: model.init(k, x)["params"])(jax.random.split(jax.random.key(0), 2))
  traced = []

  def member(p):
    traced.append("member")
    return model.apply({"params": p}, x)

  def metric(e):
    traced.append("metric")
    return jnp.sum(e ** 2)

  loss = lambda p: jnp.sum(jnp.sin(jax.lax.map(member, p, batch_size=batch_size))) + jnp.sum(
      jax.lax.map(metric, x, batch_size=batch_size))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(stacked)
  captured, traced[:] = list(traced), []
  jax.value_and_grad(loss)(stacked)
  assert captured == traced  # as many traces of each step as JAX's lax.map makes
  state = factors_after_one_step(stacked, grads, acts)
  for m in range(2):
    np.testing.assert_allclose(np.asarray(ref.normalized_factor(state, "hidden"))[m],
                               ref.gram(ref.np64(x)), rtol=1e-10, atol=1e-13)


def test_a_step_that_cannot_be_traced_again_is_read_as_examples_with_a_warning():
  """The map's axis is decided by tracing a step once more; a step that fails there (here: a
  step that raises the second time it is traced, after the map's own trace) is read as over
  the examples, as a ``jax.vmap``'s, with a warning naming ``jax.lax.scan`` for draws:
  ``stats_batch_size=2`` takes every row of the first 2 examples."""
  x = _batch()
  model = LinenMLP()
  params = model.init(jax.random.key(0), x[0])["params"]
  traced = []

  def step(p, e):
    traced.append(None)
    if len(traced) == 2:
      raise RuntimeError("second trace")
    return model.apply({"params": p}, e)

  loss = lambda p: jnp.sum(jnp.sin(jax.lax.map(lambda e: step(p, e), x)))
  with pytest.warns(UserWarning, match="sngd: could not trace one step of a `jax.lax.map`.*"
                    "RuntimeError: second trace.*jax.lax.scan"):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  w, b = ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  np.arange(B)[:, None].repeat(T, axis=1) < 2, w, b)


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_per_example_map_with_a_closed_over_table_keeps_the_examples(kind):
  """``(T, D)`` examples mapped, each plus a closed-over ``(T, D)`` table (not a parameter):
  read as over the examples, ``stats_batch_size=2`` takes every row of the first 2 examples. A
  JAX array table is alike to noise draws of a closed-over batch (see above): a warning. A
  NumPy one is never the batch (a batch under ``jit`` or ``grad`` is a JAX array): no warning
  (it warned until the NumPy rule, 2026-12-06)."""
  x, table = _batch(), np.linspace(-1.0, 1.0, T * D).reshape(T, D)
  closed = table if kind == "numpy" else jnp.asarray(table)
  model = LinenMLP()
  params = model.init(jax.random.key(0), x[0])["params"]
  loss = lambda p: jnp.sum(jnp.sin(jax.lax.map(lambda e: model.apply({"params": p}, e + closed),
                                               x)))
  expect = no_sngd_warnings() if kind == "numpy" else pytest.warns(
      UserWarning, match="sngd: layer 'hidden', 'out' under a `jax.lax.map`")
  with expect:
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  w, b = ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])
  rows = ref.np64(x)[:2].reshape(-1, D) + np.tile(table, (2, 1))
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2), rows,
                       w, b)


def test_nested_maps_over_the_batch_trace_the_innermost_step_once_more_per_level():
  """Three ``jax.lax.map``s nested over a ``(2, 2, 2, T, D)`` batch: each map traces its step
  once more to tell draws from examples, and in that trace the maps nested in the step replay
  the readings they made in the map's own trace instead of tracing their steps again. The
  innermost step is traced ``depth + 1 = 4`` times (8 until 2026-12-06: doubled at each level,
  16 for four). The readings are those of the traces made before: the outer map's axis holds
  the examples, ``stats_batch_size=1`` takes every row of the first (float64 numpy)."""
  x = jax.random.normal(jax.random.key(1), (2, 2, 2, T, D), jnp.float64)
  model = LinenMLP()
  params = model.init(jax.random.key(0), x[0, 0, 0])["params"]
  traced = []

  def step(p, e):
    traced.append(None)
    return model.apply({"params": p}, e)

  nest = lambda f: lambda a: jax.lax.map(f, a)
  loss = lambda p: jnp.sum(jnp.sin(nest(nest(nest(lambda e: step(p, e))))(x)))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  assert len(traced) == 4
  assert [c.num_examples for c in acts["hidden"]] == [2]
  w, b = ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])
  _assert_draw_factors(factors_after_one_step(params, grads, acts, stats_batch_size=1),
                       ref.np64(x)[0].reshape(-1, D), w, b)
