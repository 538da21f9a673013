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
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import factors_after_one_step
from flax import nnx
from helpers_warnings import no_sngd_warnings

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

B, T, D, H = 5, 3, 4, 3
# None: a scan over the 5 examples; 2: a scan over 2 vmapped chunks of 2, and a remainder of 1.
BATCH_SIZES = [None, 2]
FRAMEWORKS = ["linen", "nnx", "equinox", "haiku"]


class LinenMLP(nn.Module):
  """Two dense layers on one example, a ``(T, D)`` sequence: ``T`` rows each."""

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, param_dtype=jnp.float64, name=name)
    return dense(2, "out")(jnp.tanh(dense(H, "hidden")(x)))


class NNXMLP(nnx.Module):
  def __init__(self, rngs):
    self.hidden = nnx.Linear(D, H, rngs=rngs, param_dtype=jnp.float64)
    self.out = nnx.Linear(H, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


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


def _noise_draws_factors(loop, **kwargs):
  """The 'hidden' and 'out' factors of a linen MLP run on ``S = 3`` noisy copies of a ``(B, D)``
  batch (a Monte Carlo loss over noise draws, each step a whole batch), the draws looped by
  ``jax.lax.map`` or ``jax.lax.scan``; and the float64 inputs ``(S, B, D)``, kernel, bias."""
  x = _batch()[:, 0]  # (B, D)
  noise = 0.1 * jax.random.normal(jax.random.key(2), (3, B, D), jnp.float64)
  model = LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  step = lambda p, n: model.apply({"params": p}, x + n)
  if loop == "map":
    loss = lambda p: jnp.sum(jnp.sin(jax.lax.map(lambda n: step(p, n), noise)))
  else:
    loss = lambda p: jnp.sum(jnp.sin(jax.lax.scan(lambda c, n: (c, step(p, n)), None,
                                                  noise)[1]))
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  state = factors_after_one_step(params, grads, acts, **kwargs)
  xs = ref.np64(x)[None] + ref.np64(noise)
  return state, xs, ref.np64(params["hidden"]["kernel"]), ref.np64(params["hidden"]["bias"])


def test_map_over_noise_draws_reads_the_draws_as_examples_scan_the_batch():
  """What docs/layer-coverage.md says of a ``jax.lax.map`` whose every step is a batch (noise
  draws, positions, diffusion times): its axis is read as the examples, as a ``jax.vmap``'s,
  so ``stats_batch_size=2`` takes every example of the first 2 draws, not the first 2
  examples (0.72 relative off the factor of the first 2 examples of every draw); written as
  ``jax.lax.scan`` over the draws, as the docs say, the scan's axis is more rows and
  ``stats_batch_size=2`` takes the first 2 examples of every draw. Both against float64 Gram
  sums of the rows, from a numpy forward pass."""
  for loop, keep in (("map", np.s_[:2]), ("scan", np.s_[:, :2])):
    state, xs, w, b = _noise_draws_factors(loop, stats_batch_size=2)
    rows = xs[keep].reshape(-1, D)
    for path, r in (("hidden", rows), ("out", np.tanh(rows @ w + b))):
      np.testing.assert_allclose(ref.normalized_factor(state, path), ref.gram(r), rtol=1e-10,
                                 atol=1e-13, err_msg=f"{loop} {path}")
