"""A ``jax.vmap`` over noise draws, Monte Carlo samples or dropout masks, each lane the whole
closed-over batch (``jax.vmap(lambda k: loss(model(x + s * jax.random.normal(k, x.shape))))
(keys)``), is a scan over the draws: the examples are each lane's own, so ``stats_batch_size=2``
takes the first 2 examples of every draw, against float64 Gram sums of exactly those rows from
an independent numpy forward pass. Until 2026-12-06 the draws were read as the examples
(``num_examples`` was the number of draws, ``stats_batch_size=2`` took every example of the
first 2 draws: 0.85 relative off the factor, linen). A vmap over the examples (per-example
functions), also with a vmap over each example's draws inside it, is unchanged; where the
program cannot tell (mapped noise arrays of a closed-over batch), the examples reading is
kept, with a warning. Where one of the two arrays is the batch the user passed to the captured
function (``capture(loss)(params, x)``) and the other is not, that one is the batch, without a
warning.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import factors_after_one_step
from flax import nnx
from helpers_draws import NNXMLP, D, H, LinenMLP, assert_mlp_factors, captured, eqx_mlp
from helpers_warnings import no_sngd_warnings

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

B, S = 5, 3  # examples, draws (D features, H hidden units: helpers_draws)


def _x():
  return jax.random.normal(jax.random.key(1), (B, D), jnp.float64)


KEYS = jax.random.split(jax.random.key(2), S)
draw = lambda k: 0.1 * jax.random.normal(k, (B, D), jnp.float64)


def _noise():
  return jnp.stack([draw(k) for k in KEYS])  # (S, B, D), float64 under the x64 fixture


def _captured(framework, loss_of, expect=no_sngd_warnings):
  """``helpers_draws.captured`` on the ``(B, D)`` batch ``_x()``."""
  return captured(framework, loss_of, _x(), expect)


_assert_factors = assert_mlp_factors


def _draw_rows():
  return ref.np64(_x())[None] + ref.np64(_noise())  # (S, B, D)


@pytest.mark.parametrize("framework", ["linen", "nnx", "equinox"])
def test_vmap_over_noise_draws_takes_the_first_examples_of_every_draw(framework):
  """A ``jax.vmap`` over keys, each lane drawing noise for the whole closed-over batch: the
  lane's calls hold the ``B`` examples themselves, so the vmap's axis is more rows of each
  example, as a scan's: ``num_examples`` is ``B`` (was ``S``), ``stats_batch_size=2`` takes the
  first 2 examples of every draw (took every example of the first 2 draws, 0.85 relative off,
  linen). Every row counts without it. A ``(B,)`` row mask raises, naming the layer, as for a
  scan's axis (it raised for ``S != B``, and silently weighed the draws for ``S == B``)."""
  x = _x()
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda k: f(x + draw(k)))(KEYS)))
  params, grads, acts, (w, b) = _captured(framework, loss_of)
  assert [c.num_examples for c in acts["hidden"]] == [B]
  xs = _draw_rows()
  _assert_factors(factors_after_one_step(params, grads, acts), xs.reshape(-1, D), w, b, "all")
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  xs[:, :2].reshape(-1, D), w, b, "stats_batch_size=2")
  with pytest.raises(ValueError, match="'hidden'.*before its example axis"):
    sngd_jax.with_row_mask(acts, np.array([True, False, True, True, False]))


def test_vmap_over_draws_with_the_batch_passed_unmapped():
  """The batch passed to the vmap unmapped (``in_axes=(None, 0)``) is the batch closed over:
  ``stats_batch_size=2`` takes the first 2 examples of every draw."""
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda e, k: f(e + draw(k)), in_axes=(None, 0))(
      _x(), KEYS)))
  params, grads, acts, (w, b) = _captured("linen", loss_of)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  _draw_rows()[:, :2].reshape(-1, D), w, b)


@pytest.mark.parametrize("framework", ["linen", "nnx"])
def test_vmap_over_the_examples_is_unchanged(framework):
  """A per-example ``jax.vmap`` (each lane one ``(D,)`` example): its axis holds the examples,
  ``stats_batch_size=2`` takes the first 2 and a ``(B,)`` row mask weighs them."""
  x = _x()
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(f)(x)))
  params, grads, acts, (w, b) = _captured(framework, loss_of)
  rows = ref.np64(x)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2), rows[:2],
                  w, b)
  keep = np.array([True, False, True, True, False])
  _assert_factors(factors_after_one_step(params, grads, sngd_jax.with_row_mask(acts, keep)),
                  rows[keep], w, b, "mask")


@pytest.mark.parametrize("keys", ["closed", "per example"])
def test_vmap_over_draws_inside_a_vmap_over_the_examples_is_unchanged(keys):
  """``jax.vmap`` over the examples, inside it a ``jax.vmap`` over each example's ``S`` draws
  (keys closed over, common to all examples, or split from a per-example key): the outer axis
  holds the examples, the inner is more rows of each: ``stats_batch_size=2`` takes every draw
  of the first 2 examples."""
  x = _x()
  one = lambda k: 0.1 * jax.random.normal(k, (D,), jnp.float64)
  if keys == "closed":
    loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda xi: jax.vmap(
        lambda k: f(xi + one(k)))(KEYS))(x)))
    noise = jnp.stack([jnp.stack([one(k) for k in KEYS])] * B)
  else:
    per = jax.random.split(jax.random.key(4), B)
    loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda xi, ki: jax.vmap(
        lambda k: f(xi + one(k)))(jax.random.split(ki, S)))(x, per)))
    noise = jnp.stack([jnp.stack([one(k) for k in jax.random.split(ki, S)]) for ki in per])
  params, grads, acts, (w, b) = _captured("linen", loss_of)
  xs = ref.np64(x)[:, None] + ref.np64(noise)  # (B, S, D)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  xs[:2].reshape(-1, D), w, b)


@pytest.mark.parametrize("where", ["in the lane", "closed over"])
def test_per_example_sequences_with_a_numpy_table_of_positions_read_as_examples(where):
  """A per-example ``jax.vmap`` over ``(B, T, D)`` sequences whose lane adds a NumPy ``(T, D)``
  table of positions (computed in the lane or closed over): the table is a constant of the
  lane's jaxpr with as many rows as the lane's examples, as a closed-over batch would be, but
  a NumPy array is never the batch, so the vmap's axis holds the examples without the
  ambiguity warning (it warned before the NumPy rule): ``stats_batch_size=2`` takes every
  position of the first 2 sequences."""
  t = 6
  table = lambda: np.sin(np.arange(t)[:, None] * np.arange(1, D + 1)[None, :] * 0.3)
  fixed = table()
  pos = table if where == "in the lane" else (lambda: fixed)
  x = jax.random.normal(jax.random.key(5), (B, t, D), jnp.float64)
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda xi: f(xi + pos()))(x)))
  params, grads, acts, (w, b) = _captured("linen", loss_of)
  rows = ref.np64(x) + fixed
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:2].reshape(-1, D), w, b)


def test_vmap_over_noise_arrays_cannot_be_told_from_one_over_examples_and_warns():
  """Vmapped over the ``(S, B, D)`` noise itself, the ``(B, D)`` batch closed over, each lane's
  call reads a closed-over array and a mapped slice both of ``B`` rows, as ``(T, D)`` examples
  with a closed-over ``(T, D)`` table would: the vmap's axis is read as the examples (as
  before), with a warning naming the layers and what to write instead."""
  x = _x()
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda n: f(x + n))(_noise())))
  warns = lambda: pytest.warns(UserWarning, match="sngd: layer 'hidden', 'out' under a "
                               "`jax.vmap`.*look alike.*vmap over keys")
  params, grads, acts, (w, b) = _captured("linen", loss_of, warns)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  _draw_rows()[:2].reshape(-1, D), w, b)


def test_flax_vmaps_over_noise_draws_take_the_first_examples_of_every_draw():
  """``nn.vmap`` (params broadcast, the batch passed unmapped) and ``nnx.vmap`` (the module
  unmapped, the batch closed over) over keys run through ``jax.vmap``: the same reading,
  ``stats_batch_size=2`` takes the first 2 examples of every draw."""
  x, rows = _x(), _draw_rows()

  class Draw(nn.Module):
    @nn.compact
    def __call__(self, k, e):
      return LinenMLP(name="mlp")(e + draw(k))

  model = nn.vmap(Draw, variable_axes={"params": None}, split_rngs={"params": False},
                  in_axes=(0, None))()
  params = model.init(jax.random.key(0), KEYS, x)["params"]
  with no_sngd_warnings():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(lambda p: jnp.sum(jnp.sin(
        model.apply({"params": p}, KEYS, x)))), has_aux=True)(params)
  w, b = (ref.np64(params["mlp"]["hidden"][n]) for n in ("kernel", "bias"))
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:, :2].reshape(-1, D), w, b, "nn.vmap", prefix="mlp/")

  loss_of = lambda m: jnp.sum(jnp.sin(nnx.vmap(lambda m, k: m(x + draw(k)), in_axes=(None, 0))(
      m, KEYS)))
  params, grads, acts, (w, b) = _captured("nnx", loss_of)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:, :2].reshape(-1, D), w, b, "nnx.vmap")


def test_a_lane_that_cannot_be_traced_again_is_read_as_examples_with_a_warning():
  """The vmap's axis is decided by tracing it once more; a lane that fails there (here: one
  that raises the second time it is traced) is read as over the examples, with a warning
  naming ``jax.lax.scan`` for draws: ``stats_batch_size=2`` takes every example of the first
  2 draws."""
  x, traced = _x(), []

  def lane(f, k):
    traced.append(None)
    if len(traced) == 2:
      raise RuntimeError("second trace")
    return f(x + draw(k))

  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda k: lane(f, k))(KEYS)))
  warns = lambda: pytest.warns(UserWarning, match="sngd: could not trace one lane of a "
                               "`jax.vmap`.*RuntimeError: second trace.*jax.lax.scan")
  params, grads, acts, (w, b) = _captured("linen", loss_of, warns)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  _draw_rows()[:2].reshape(-1, D), w, b)


@pytest.mark.parametrize("loop", ["vmap", "lax.map", "vmap in lax.map", "lax.map in vmap"])
def test_draws_of_weights_made_in_the_lane_leak_no_tracer(loop):
  """Each draw's layers read weights made inside the lane or step (a copy of the params,
  ``p + 0``, as a scan over stacked params slices them): tracers of the extra trace that tells
  draws from examples, which ``Recorder.looked_up`` held strongly past that trace until
  2026-12-06: under ``jax.checking_leaks()`` the extra trace raised, so the draws were read as
  the examples with a warning (``stats_batch_size=2`` took every example of the first 2
  draws), and a map nested in a vmap raised out of the capture. Held weakly now: the closed-
  over batch is told from the weights, ``stats_batch_size=2`` takes the first 2 examples of
  every draw (of both nested loops' draws), against float64 numpy Gram sums."""
  x, model = _x(), LinenMLP()
  params = model.init(jax.random.key(0), x)["params"]
  apply = lambda p, e: model.apply({"params": jax.tree.map(lambda a: a + 0.0, p)}, e)
  two = jax.random.split(jax.random.key(3), 2)
  outer = {"vmap": lambda f: jax.vmap(f),  # looked up when called: capture's own jax.vmap
           "lax.map": lambda f: lambda ks: jax.lax.map(f, ks)}
  if loop in outer:
    loss = lambda p: jnp.sum(jnp.sin(outer[loop](lambda k: apply(p, x + draw(k)))(KEYS)))
    rows = _draw_rows()[:, :2]
  else:
    second, first = (outer[n] for n in loop.split(" in "))
    loss = lambda p: jnp.sum(jnp.sin(first(lambda k: second(
        lambda k2: apply(p, x + draw(k) + draw(k2)))(two))(KEYS)))
    noise = ref.np64(_noise())[:, None] + np.stack([ref.np64(draw(k)) for k in two])[None]
    rows = (ref.np64(x) + noise)[:, :, :2]  # (S, 2, 2, D)
  with no_sngd_warnings(), jax.checking_leaks():
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  assert [c.num_examples for c in acts["hidden"]] == [B]
  w, b = (ref.np64(params["hidden"][n]) for n in ("kernel", "bias"))
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows.reshape(-1, D), w, b, loop)


@pytest.mark.parametrize("loop", ["draws", "per example"])
def test_nnx_kernel_as_long_as_the_lane_examples_is_no_batch(loop):
  """NNX layers whose kernel's leading dim equals the lane's examples: ``in_features == B``
  under a ``jax.vmap`` over draws of a closed-over ``(B, B)`` batch, and ``in_features == T``
  under a per-example vmap over ``(N, T, T)`` sequences. The kernel is a closed-over array of
  the lane with as many rows as its examples, as the batch would be; it is a weight the lane
  looked up, so the sequences are examples (every position of the first 2), without the
  ambiguity warning (which the per-example case gives when the identity rule is removed), and
  the draws are draws (``stats_batch_size=2``: the first 2 examples of every draw)."""
  n = 5
  model = NNXMLP(nnx.Rngs(0), d=n)
  x = jax.random.normal(jax.random.key(1), (n, n), jnp.float64)
  one = lambda k: 0.1 * jax.random.normal(k, (n, n), jnp.float64)
  if loop == "draws":
    loss = lambda m: jnp.sum(jnp.sin(jax.vmap(lambda k: m(x + one(k)))(KEYS)))
    rows = (ref.np64(x)[None] + np.stack([ref.np64(one(k)) for k in KEYS]))[:, :2]
  else:
    seqs = jax.random.normal(jax.random.key(6), (4, n, n), jnp.float64)
    loss = lambda m: jnp.sum(jnp.sin(jax.vmap(m)(seqs)))
    rows = ref.np64(seqs)[:2]
  with no_sngd_warnings():
    (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(loss), has_aux=True)(model)
  rows = rows.reshape(-1, n)
  w, b = ref.np64(model.hidden.kernel[...]), ref.np64(model.hidden.bias[...])
  state = factors_after_one_step(nnx.state(model, nnx.Param), grads, acts, stats_batch_size=2)
  _assert_factors(state, rows, w, b, loop)


def test_equinox_per_example_sequences_with_tables_of_positions_in_the_model():
  """An Equinox model of ``(T, D)`` sequences, ``jax.vmap(model)(x)``, adding two tables of
  ``T`` rows held as fields: an int ``(T,)`` index of positions (no parameter, not
  differentiated) and a float ``(T, D)`` table read through ``jax.lax.stop_gradient``. Each
  is a closed-over array of the lane with as many rows as its examples, as a batch would be,
  but a leaf of the captured function's model (``Recorder.top``): the vmap's axis holds the
  examples without the ambiguity warning, ``stats_batch_size=2`` takes every position of the
  first 2 sequences."""
  eqx = pytest.importorskip("equinox")
  t, n = 6, 4

  class Seq(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear
    table: jax.Array
    index: jax.Array

    def __call__(self, e):
      e = e + jax.lax.stop_gradient(self.table) + 0.01 * self.index[:, None].astype(e.dtype)
      return jax.vmap(lambda r: self.out(jnp.tanh(self.hidden(r))))(e)

  k1, k2 = jax.random.split(jax.random.key(0))
  table = jnp.sin(jnp.arange(t * D, dtype=jnp.float64).reshape(t, D))
  model = Seq(eqx.nn.Linear(D, H, key=k1, dtype=jnp.float64),
              eqx.nn.Linear(H, 2, key=k2, dtype=jnp.float64), table, jnp.arange(t))
  x = jax.random.normal(jax.random.key(5), (n, t, D), jnp.float64)
  with no_sngd_warnings():
    (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(
        lambda m: jnp.sum(jnp.sin(jax.vmap(m)(x)))), has_aux=True)(model)
  rows = (ref.np64(x) + ref.np64(table) + 0.01 * np.arange(t)[:, None])[:2].reshape(-1, D)
  w, b = ref.np64(model.hidden.weight.T), ref.np64(model.hidden.bias)
  state = factors_after_one_step(eqx.filter(model, eqx.is_inexact_array), grads, acts,
                                 stats_batch_size=2)
  _assert_factors(state, rows, w, b, "equinox")


@pytest.mark.parametrize("outer", ["vmap", "lax.map"])
def test_vmap_over_a_closed_over_noise_array_inside_a_loop_over_the_examples(outer):
  """A ``jax.vmap`` (or ``jax.lax.map``) over the ``(B, D)`` examples, inside it a
  ``jax.vmap`` over a closed-over ``(S, D)`` noise array (each example plus every draw). The
  outer lane's calls hold ``S`` rows of the inner vmap's axis and read the closed-over noise,
  as a lane that sees a closed-over batch of ``S`` examples would: until 2026-12-06 the outer
  axis was read as draws and the noise as the examples, silently (``stats_batch_size=2`` took
  the first 2 draws of every example, 0.91 relative off 'hidden''s factor). The lane also reads
  its own example ``xi``, one row of the noise's shape: the mirror of ``(D,)`` noise vectors
  mapped around a vmap over a closed-over batch. Both arrays closed over, neither is an
  argument of the captured function that would say which is the batch, so the examples
  reading is kept with a warning: ``stats_batch_size=2`` takes every draw of the first 2
  examples (the batch passed as an argument: no warning, the next test)."""
  x = _x()
  noise = 0.1 * jax.random.normal(jax.random.key(3), (S, D), jnp.float64)
  loops = {"vmap": lambda f, a: jax.vmap(f)(a), "lax.map": lambda f, a: jax.lax.map(f, a)}
  loss_of = lambda f: jnp.sum(jnp.sin(loops[outer](lambda xi: jax.vmap(
      lambda n: f(xi + n))(noise), x)))
  warns = lambda: pytest.warns(UserWarning, match="sngd: layer 'hidden', 'out' under a .*"
                               "one row of that array.*look alike")
  params, grads, acts, (w, b) = _captured("linen", loss_of, warns)
  rows = ref.np64(x)[:, None] + ref.np64(noise)[None]  # (B, S, D)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:2].reshape(-1, D), w, b, outer)


@pytest.mark.parametrize("loop", ["vmap", "lax.map"])
def test_draws_of_a_numpy_batch_in_a_loss_without_jit(loop):
  """A loss differentiated without ``jit`` that closes over a NumPy ``(B, D)`` batch and loops
  over keys, each lane or step drawing noise for the whole batch: the batch is a NumPy constant
  of the lane's jaxpr, not a tracer. Until 2026-12-06 a NumPy array was never the batch, so the
  draws were read as the examples, silently (``stats_batch_size=2`` took every example of the
  first 2 draws, 0.85 relative off 'hidden''s factor). A NumPy array is now the batch where the
  call reads no mapped slice that could be the examples: ``stats_batch_size=2`` takes the
  first 2 examples of every draw, as for a JAX batch or under ``jit``."""
  x = np.asarray(_x())
  loops = {"vmap": lambda f, a: jax.vmap(f)(a), "lax.map": lambda f, a: jax.lax.map(f, a)}
  loss_of = lambda f: jnp.sum(jnp.sin(loops[loop](lambda k: f(x + draw(k)), KEYS)))
  params, grads, acts, (w, b) = _captured("linen", loss_of)
  assert [c.num_examples for c in acts["hidden"]] == [B]
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  _draw_rows()[:, :2].reshape(-1, D), w, b, loop)
  with jax.checking_leaks():  # the same under jit, where the NumPy batch is closed over too
    (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(lambda p: loss_of(
        lambda e: LinenMLP().apply({"params": p}, e))), has_aux=True))(params)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  _draw_rows()[:, :2].reshape(-1, D), w, b, f"{loop} jit")


_LOOPS = {"vmap": lambda f, a: jax.vmap(f)(a), "lax.map": lambda f, a: jax.lax.map(f, a)}
_LOOKALIKE = "sngd: layer 'hidden', 'out' under a .*look alike"


def _captured_passed(framework, loss_of, noise, noise_passed, jit, expect=no_sngd_warnings):
  """``(params, grads, acts, (kernel, bias) of 'hidden')`` of one gradient of ``loss_of(apply,
  x, noise)``, the batch ``x = _x()`` an argument of the captured function (as
  ``capture(loss)(params, x)``) and ``noise`` one too (``noise_passed``) or closed over; under
  ``jit`` or not. ``apply`` is the model on its input (linen: ``(n, D)`` rows or one
  ``(D,)`` row; Equinox: one ``(D,)`` example)."""
  x = _x()
  fn = ((lambda f, x, n: loss_of(f, x, n)) if noise_passed
        else (lambda f, x: loss_of(f, x, noise)))
  args = (x, noise) if noise_passed else (x,)
  with expect():
    if framework == "linen":
      model = LinenMLP()
      params = model.init(jax.random.key(0), x)["params"]
      grad = jax.value_and_grad(sngd_jax.capture(lambda p, *a: fn(
          lambda e: model.apply({"params": p}, e), *a)), has_aux=True)
      (_, acts), grads = (jax.jit(grad) if jit else grad)(params, *args)
      w, b = params["hidden"]["kernel"], params["hidden"]["bias"]
    else:
      eqx = pytest.importorskip("equinox")
      model = eqx_mlp(eqx, jax.random.split(jax.random.key(0)))
      grad = eqx.filter_value_and_grad(sngd_jax.capture_eqx(lambda m, *a: fn(m, *a)),
                                       has_aux=True)
      (_, acts), grads = (eqx.filter_jit(grad) if jit else grad)(model, *args)
      params = eqx.filter(model, eqx.is_inexact_array)
      w, b = model.hidden.weight.T, model.hidden.bias
  return params, grads, acts, (ref.np64(w), ref.np64(b))


def _vectors():
  return 0.1 * jax.random.normal(jax.random.key(3), (S, D), jnp.float64)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("outer", ["vmap", "lax.map"])
def test_noise_array_inside_a_loop_over_the_batch_argument(outer, jit):
  """The test above with the batch an argument of the captured function and the ``(S, D)``
  noise closed over: the loop's mapped operand derives from the data the user passed, the
  closed-over array does not, so the loop is over the examples, without a warning (it warned
  before, 2026-12-06): ``stats_batch_size=2`` takes every draw of the first 2 examples. With the
  noise passed as an argument too, both derive from the arguments: the examples reading, with
  the warning."""
  loss_of = lambda f, x, n: jnp.sum(jnp.sin(_LOOPS[outer](lambda xi: jax.vmap(
      lambda v: f(xi + v))(n), x)))
  rows = (ref.np64(_x())[:, None] + ref.np64(_vectors())[None])[:2].reshape(-1, D)
  for passed in (False, True):
    expect = (lambda: pytest.warns(UserWarning, match=_LOOKALIKE)) if passed else (
        no_sngd_warnings)
    params, grads, acts, (w, b) = _captured_passed("linen", loss_of, _vectors(), passed, jit,
                                                   expect)
    _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2), rows,
                    w, b, f"{outer} jit={jit} noise passed={passed}")


@pytest.mark.parametrize("framework", ["linen", "equinox"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("outer", ["vmap", "lax.map"])
def test_noise_vectors_mapped_around_a_vmap_over_the_batch_argument(outer, jit, framework):
  """The mirror of the tests above: a loop over ``(S, D)`` noise vectors made in the loss,
  inside it a ``jax.vmap`` over the batch the user passed (``jax.vmap(lambda n:
  jax.vmap(model)(x + n))(noise)``, Equinox's idiom). Same shapes as the loop over the
  examples around a vmap over closed-over draws; the batch is the closed-over array that
  derives from the captured function's arguments, so the outer axis is the draws, without a
  warning: ``stats_batch_size=2`` takes the first 2 examples of every draw. Between
  2026-12-06 and this test it warned and read the draws as the examples (the first 2 draws,
  every example)."""
  if framework == "linen":
    inner = lambda f, x, v: jax.vmap(lambda xi: f(xi + v))(x)
  else:
    inner = lambda f, x, v: jax.vmap(f)(x + v)
  loss_of = lambda f, x, n: jnp.sum(jnp.sin(_LOOPS[outer](lambda v: inner(f, x, v), n)))
  params, grads, acts, (w, b) = _captured_passed(framework, loss_of, _vectors(), False, jit)
  rows = ref.np64(_vectors())[:, None] + ref.np64(_x())[None]  # (S, B, D)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:, :2].reshape(-1, D), w, b, f"{framework} {outer} jit={jit}")


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_batch_computed_from_the_argument_is_the_batch_under_jit(jit):
  """The mirror with the batch computed from the argument in the loss before the loops (``2 * x
  - 1``): under ``jit`` the closed-over array is a tracer made from the argument, followed back
  to it, so the outer axis is the draws without a warning (the first 2 examples of every draw).
  Without ``jit`` an array computed outside the loop keeps no trail to the argument: the
  examples reading, with the warning (the first 2 draws, every example). (Computed inside the
  outer loop's body, it is found either way: the lane's own program reads the argument.)"""
  outer = lambda f, xs, n: jnp.sum(jnp.sin(jax.vmap(lambda v: jax.vmap(
      lambda xi: f(xi + v))(xs))(n)))
  loss_of = lambda f, x, n: outer(f, 2.0 * x - 1.0, n)
  expect = no_sngd_warnings if jit else (lambda: pytest.warns(UserWarning, match=_LOOKALIKE))
  params, grads, acts, (w, b) = _captured_passed("linen", loss_of, _vectors(), False, jit,
                                                 expect)
  rows = ref.np64(_vectors())[:, None] + (2.0 * ref.np64(_x()) - 1.0)[None]  # (S, B, D)
  rows = rows[:, :2] if jit else rows[:2]
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows.reshape(-1, D), w, b, f"jit={jit}")


def test_noise_vectors_around_a_vmap_over_a_batch_not_told_apart_warn():
  """Where the arguments do not tell which array is the batch, the examples reading is kept
  with a warning saying to vmap over keys and draw the noise inside: the batch closed over
  (neither array derives from an argument), or the noise vectors passed as an argument too
  (both do). Keys mapped around it keep the draws reading without a warning
  (``stats_batch_size=2``: the first 2 examples of every draw)."""
  x, vectors = _x(), _vectors()
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda n: jax.vmap(lambda xi: f(xi + n))(x))(
      vectors)))
  warns = lambda: pytest.warns(UserWarning, match="sngd: layer 'hidden', 'out' under a "
                               "`jax.vmap`.*look alike.*vmap over keys")
  params, grads, acts, (w, b) = _captured("linen", loss_of, warns)
  rows = ref.np64(vectors)[:, None] + ref.np64(x)[None]  # (S, B, D)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:2].reshape(-1, D), w, b, "closed over: read as examples")
  loss_passed = lambda f, x, n: jnp.sum(jnp.sin(jax.vmap(lambda v: jax.vmap(
      lambda xi: f(xi + v))(x))(n)))
  params, grads, acts, (w, b) = _captured_passed("linen", loss_passed, vectors, True, False,
                                                 warns)
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:2].reshape(-1, D), w, b, "both passed: read as examples")
  one = lambda k: 0.1 * jax.random.normal(k, (D,), jnp.float64)
  loss_of = lambda f: jnp.sum(jnp.sin(jax.vmap(lambda k: jax.vmap(lambda xi: f(xi + one(k)))(
      x))(KEYS)))
  params, grads, acts, (w, b) = _captured("linen", loss_of)
  rows = np.stack([ref.np64(one(k)) for k in KEYS])[:, None] + ref.np64(x)[None]
  _assert_factors(factors_after_one_step(params, grads, acts, stats_batch_size=2),
                  rows[:, :2].reshape(-1, D), w, b, "keys")
