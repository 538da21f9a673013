"""The CPU refresh on the host (``inverse/host.py``) against the XLA refresh and float64.

On CPU the refresh of the built-in methods runs in NumPy/LAPACK inside one
``jax.pure_callback``; the XLA path (``refresh_inverses_xla``) is what GPU and TPU
run. Both must give the same inverses (to float32 rounding; a Nystrom basis only up
to the signs of its columns, so the Nystrom models are compared as operators), the
same accepted and rejected blocks, and the same training updates.
"""

from types import SimpleNamespace

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse import host as host_lib
from sngd_jax._src.inverse import nystrom as nystrom_lib
from sngd_jax._src.inverse import refresh as refresh_lib

AUTO = sngd_jax.inverse.host_refresh(sngd_jax.inverse.auto())  # the opt-in host path


def _layers(kinds, seed=0):
  """specs, factors (float32, weight 2), weights and identity inverses for ``kinds``:
  ``(path, d, blocks)``; ``d > 513`` is a sketched Nystrom layer, ``d = 0`` diagonal."""
  rng = np.random.default_rng(seed)
  specs, factors, weights, old = {}, {}, {}, {}
  for path, d, nb in kinds:
    weights[path] = jnp.float32(2.0)
    if d == 0:
      specs[path] = SimpleNamespace(dim=40, structure="diagonal")
      factors[path] = jnp.asarray(rng.random(40) * 2.0, jnp.float32)
      old[path] = jnp.ones(40, jnp.float32)
      continue
    x = rng.standard_normal((nb, 2 * d, d))
    g = 2.0 * np.swapaxes(x, -1, -2) @ x / (2 * d)
    specs[path] = SimpleNamespace(dim=d, structure="dense")
    if AUTO.sketch(d, jnp.float32) is not None:
      factors[path] = sketch_lib.of_dense(jnp.asarray(g[0], jnp.float32),
                                          AUTO.sketch(d, jnp.float32))
    else:
      factors[path] = jnp.asarray(g if nb > 1 else g[0], jnp.float32)
    old[path] = AUTO.identity(nb, d, jnp.float32)
  return specs, factors, weights, old


def _both(specs, factors, weights, old, method=AUTO, damping=1e-3, abs_damping=1e-8):
  host = jax.jit(lambda f, w, o: refresh_lib.refresh_inverses(
      specs, f, w, o, method, damping, abs_damping))(factors, weights, old)
  xla = jax.jit(lambda f, w, o: refresh_lib.refresh_inverses_xla(
      specs, f, w, o, method, damping, abs_damping))(factors, weights, old)
  return host, xla


def _operator(rep):
  if isinstance(rep, nystrom_lib.NystromRep):
    return np.asarray(nystrom_lib.dense(rep))  # (M + rho I): the basis's signs drop out
  return np.asarray(rep)


def _assert_same(host, xla, rtol=2e-5):
  (h, hf), (x, xf) = host, xla
  assert int(hf) == int(xf)
  assert set(h) == set(x)
  for p in h:
    a, b = _operator(h[p]), _operator(x[p])
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.max(np.abs(b)), err_msg=p)


KINDS = [("one", 1, 1), ("two", 2, 7), ("five", 5, 1), ("nine", 9, 3), ("nine_b", 9, 1),
         ("wide", 600, 1), ("wide_b", 600, 1), ("wider", 700, 1), ("embed", 0, 1)]


def test_host_refresh_matches_the_xla_refresh_for_every_layer_kind():
  """Closed-form 1x1 and 2x2 blocks, Cholesky groups of one and several blocks and layers,
  sketched Nystrom layers of two sizes, a diagonal embedding: the same inverses."""
  host, xla = _both(*_layers(KINDS))
  assert int(host[1]) == 0
  _assert_same(host, xla)


def test_host_refresh_matches_float64_inverses():
  """The dense blocks against ``inv(G / w + rho I)`` in float64 (rho from the trace)."""
  specs, factors, weights, old = _layers([p for p in KINDS if 0 < p[1] <= 513])
  (new, _), _ = _both(specs, factors, weights, old)
  for p in specs:
    g = np.asarray(factors[p], np.float64).reshape((-1,) + factors[p].shape[-2:]) / 2.0
    shift = 1e-3 * np.trace(g, axis1=-2, axis2=-1)[:, None, None] + 1e-8
    want = np.linalg.inv(g + shift * np.eye(g.shape[-1]))
    np.testing.assert_allclose(np.asarray(new[p]), want, rtol=1e-4,
                               atol=1e-5 * np.max(np.abs(want)), err_msg=p)


def test_nystrom_host_model_matches_float64_reference():
  """At rank >= the numerical rank the Nystrom model is exact: ``(G + rho I)^{-1}``."""
  d, r = 600, 40
  rng = np.random.default_rng(1)
  x = rng.standard_normal((r, d))
  g = x.T @ x / r  # rank 40 < 128
  specs = {"w": SimpleNamespace(dim=d, structure="dense")}
  factors = {"w": sketch_lib.of_dense(jnp.asarray(g, jnp.float32), AUTO.sketch(d, jnp.float32))}
  (new, failures), _ = _both(specs, factors, {"w": jnp.float32(1.0)},
                             {"w": AUTO.identity(1, d, jnp.float32)})
  assert int(failures) == 0
  shift = 1e-3 * np.trace(g) + 1e-8
  want = np.linalg.inv(g + shift * np.eye(d))
  got = np.linalg.inv(_operator(new["w"])[0].astype(np.float64))
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.max(np.abs(want)))


@pytest.mark.parametrize("bad", ["nan", "inf", "indefinite", "zero"])
def test_rejected_blocks_are_the_xla_refresh_rejects(bad):
  """A non-finite, indefinite or all-zero factor (zero shift with ``abs_damping=0``) is
  rejected by both paths, in the same blocks, and keeps its old inverse."""
  specs, factors, weights, old = _layers(KINDS)
  old = jax.tree.map(lambda a: a * 3.0, old)  # recognizable old inverses
  for path in ("nine", "two", "wide", "embed", "one"):
    f = factors[path]
    if bad == "zero":
      f = jax.tree.map(jnp.zeros_like, f)
    else:
      value = {"nan": jnp.nan, "inf": jnp.inf, "indefinite": -50.0}[bad]
      if isinstance(f, sketch_lib.Sketch):
        f = f._replace(y=f.y.at[3, 2].set(value)) if bad != "indefinite" else \
            f._replace(y=-f.y, trace=-f.trace)
      elif f.ndim == 1:
        f = f.at[5].set(value)
      elif bad == "indefinite":
        f = f.at[..., 1, 1].set(value)
      else:
        f = f.at[..., 0, 1].set(value)
    factors[path] = f
  host, xla = _both(specs, factors, weights, old, abs_damping=0.0)
  assert int(host[1]) > 0
  _assert_same(host, xla)
  spoiled = ("nine", "wide") + (("embed",) if bad != "indefinite" else ())  # every block
  for path in spoiled:
    jax.tree.map(lambda n, o: np.testing.assert_array_equal(np.asarray(n), np.asarray(o)),
                 host[0][path], old[path])


def test_nystrom_zero_factor_is_exact_and_an_impossible_sketch_is_rejected():
  """Two degenerate Nystrom blocks, the same on both paths.

  A zero factor with ``abs_damping > 0``: the exact inverse is ``I / s``; both paths give it
  and accept it (the shift ``nu`` of a zero sketch is taken from a unit norm, so the small
  Cholesky factors). A finite sketch that no PSD factor makes (``Y = -5 Omega``, so
  ``Omega^T Y_nu`` is negative definite and its Cholesky fails): both reject it and keep the
  old inverse (the XLA path used to accept a model of the tail alone, ``tau I``).
  """
  d = 600
  omega = AUTO.sketch(d, jnp.float32)
  specs = {"w": SimpleNamespace(dim=d, structure="dense")}
  weights = {"w": jnp.float32(1.0)}
  old_rep = jax.tree.map(lambda a: a * 3.0, AUTO.identity(1, d, jnp.float32))
  zero = {"w": sketch_lib.Sketch(jnp.zeros((d, omega.shape[1]), jnp.float32),
                                 jnp.float32(0.0), jnp.float32(0.0))}
  host, xla = _both(specs, zero, weights, {"w": old_rep}, abs_damping=1e-2)
  for new, failures in (host, xla):
    assert int(failures) == 0
    np.testing.assert_allclose(_operator(new["w"])[0], 1e-2 * np.eye(d), atol=1e-9)
  _assert_same(host, xla)
  impossible = {"w": sketch_lib.Sketch(-5.0 * omega, jnp.float32(d), jnp.float32(0.0))}
  host, xla = _both(specs, impossible, weights, {"w": old_rep})
  for new, failures in (host, xla):
    assert int(failures) == 1
    jax.tree.map(lambda n, o: np.testing.assert_array_equal(np.asarray(n), np.asarray(o)),
                 new["w"], old_rep)


def _custom_calls(fn, *args):
  """The ``custom_call_target``s of the compiled CPU program, and whether it has a loop."""
  import re
  text = jax.jit(fn).lower(*args).compile().as_text()
  return re.findall(r'custom_call_target="([^"]+)"', text), " while(" in text


def test_cpu_program_has_one_callback_and_no_lapack_call():
  """The CPU refresh compiles to one callback (no LAPACK custom call, no loop); with
  ``xla_only``, the default method or a method without a twin (``eigh``) it is the XLA
  refresh."""
  specs, factors, weights, old = _layers(KINDS)

  def calls(method):
    return _custom_calls(lambda f, w, o: refresh_lib.refresh_inverses(
        specs, f, w, o, method, 1e-3, 1e-8), factors, weights, old)

  targets, loop = calls(AUTO)
  assert len(targets) == 1 and "callback" in targets[0] and not loop
  targets, loop = calls(sngd_jax.inverse.xla_only(AUTO))
  assert any("potrf" in t for t in targets) and not any("callback" in t for t in targets)
  # Opt-in: the default method's CPU program holds no callback (XLA:CPU would run the
  # whole step synchronously), and host_refresh needs NumPy twins.
  assert calls(sngd_jax.inverse.auto())[0] == targets
  assert sngd_jax.inverse.xla_only(AUTO) == sngd_jax.inverse.xla_only(sngd_jax.inverse.auto())
  with pytest.raises(ValueError, match="host_refresh needs a method with NumPy twins"):
    sngd_jax.inverse.host_refresh(sngd_jax.inverse.eigh())
  assert sngd_jax.inverse.xla_only(AUTO) is sngd_jax.inverse.xla_only(AUTO)
  assert host_lib.plan(specs, factors, sngd_jax.inverse.eigh()) is None
  sharded = sngd_jax.inverse.shard_method(AUTO, axis_name="d")
  assert host_lib.plan(specs, factors, sharded) is None


class Net(nn.Module):
  """Every layer kind the host refresh groups: an embedding (diagonal), a 600-input Dense
  (sketched Nystrom), LayerNorm (2x2 per unit), Dense layers of equal and other sizes."""

  @nn.compact
  def __call__(self, tokens, x):
    e = nn.Embed(20, 8)(tokens).mean(axis=1)
    h = nn.relu(nn.Dense(16)(x))
    h = nn.LayerNorm()(jnp.concatenate([h, e], axis=-1))
    h = nn.relu(nn.Dense(16)(h))
    h = nn.relu(nn.Dense(16)(h))
    return nn.Dense(3)(h)


@pytest.mark.parametrize("make", [sngd_jax.sngd_momentum, sngd_jax.sngd_adam])
def test_training_updates_equal_the_xla_refresh(make):
  """Five steps with a refresh at every step: the host path's updates equal the XLA
  path's to float32 rounding (and both refresh without a failure)."""
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 20, (32, 4)))
  x = jnp.asarray(rng.standard_normal((32, 600)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((32, 3)), jnp.float32)
  model = Net()
  params = model.init(jax.random.key(0), tokens, x)["params"]
  loss = lambda p, t, x, y: jnp.mean((model.apply({"params": p}, t, x) - y) ** 2)
  grad_fn = jax.grad(sngd_jax.capture(loss, outputs=True), has_aux=True)

  def train(inverse):
    tx = make(1e-2, inverse=inverse, inverse_every=1, factor_every=1)
    state, p, out = tx.init(params), params, []

    @jax.jit
    def step(p, state, t, x, y):
      grads, acts = grad_fn(p, t, x, y)
      updates, state = tx.update(grads, state, p, activations=acts)
      return optax.apply_updates(p, updates), state, updates

    for i in range(5):
      p, state, updates = step(p, state, tokens, x + 0.1 * i, y)
      out.append(updates)
    assert int(state[0].num_refresh_failures) == 0
    return out

  got, want = train(AUTO), train(sngd_jax.inverse.xla_only(AUTO))
  for g, w in zip(got, want, strict=True):
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(w), strict=True):
      # two LAPACKs in float32, five refreshes: sngd_adam's elementwise normalization
      # amplifies an entry whose second moment is tiny (once 1 entry of 9600 was 1.7e-5 off,
      # 1.7e-3 of the update's scale, under load)
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                                 atol=5e-3 * float(np.max(np.abs(np.asarray(b)))))


def test_vmapped_refresh_calls_the_host_once_per_member():
  """Under ``jax.vmap`` (an ensemble of optimizer states) the callback runs once per member
  and gives each member's own inverses."""
  specs, factors, weights, old = _layers([("nine", 9, 3), ("five", 5, 1)])
  stack = lambda t: jax.tree.map(lambda a: jnp.stack([a, 2.0 * a]), t)
  f = jax.vmap(lambda fa, w, o: refresh_lib.refresh_inverses(specs, fa, w, o, AUTO, 1e-3, 1e-8))
  new, failures = jax.jit(f)(stack(factors), stack(weights), stack(old))
  for i in range(2):
    one = jax.tree.map(lambda a, i=i: a[i], (new, failures))
    member = jax.tree.map(lambda a, i=i: a[i], (stack(factors), stack(weights), stack(old)))
    _, want = _both(specs, *member)
    _assert_same(one, want)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size", [3, 4096, 600 * 128])
def test_all_finite_sees_nan_in_large_arrays(size, dtype):
  """``base.all_finite`` flags a NaN or an infinity anywhere in arrays of every size (XLA:CPU
  drops NaN from ``max`` reductions of 4096 or more entries: ``docs/known-issues.md``) and
  never flags finite values, even near the largest float."""
  from sngd_jax._src.inverse.base import all_finite, all_finite_per_block
  big = float(jnp.finfo(dtype).max)
  check = jax.jit(lambda a: all_finite(a, axis=-1))
  for pos in (0, size // 3, size - 1):
    for value in (jnp.nan, jnp.inf, -jnp.inf):
      x = jnp.ones((2, size), dtype).at[1, pos].set(value)
      np.testing.assert_array_equal(np.asarray(check(x)), [True, False])
      np.testing.assert_array_equal(np.asarray(jax.jit(all_finite_per_block)(x)),
                                    [True, False])
    x = jnp.full((2, size), big, dtype).at[1, pos].set(-big)
    np.testing.assert_array_equal(np.asarray(check(x)), [True, True])


def test_xla_refresh_rejects_a_nan_in_a_large_sketch():
  """The XLA refresh of a Nystrom layer whose sketch (600 x 128) holds one NaN is rejected:
  the old inverse is kept and counted (before the fix it became ``tau I``)."""
  specs, factors, weights, old = _layers([("wide", 600, 1)])
  factors["wide"] = factors["wide"]._replace(y=factors["wide"].y.at[3, 2].set(jnp.nan))
  for fn in (refresh_lib.refresh_inverses_xla, refresh_lib.refresh_inverses):
    new, failures = jax.jit(lambda f, w, o, fn=fn: fn(specs, f, w, o, AUTO, 1e-3, 1e-8))(
        factors, weights, old)
    assert int(failures) == 1
    jax.tree.map(lambda n, o: np.testing.assert_array_equal(np.asarray(n), np.asarray(o)),
                 new["wide"], old["wide"])


def test_eager_update_refreshes_on_the_host():
  """``tx.update`` outside ``jit`` gives the jitted update's result. There the callback
  receives ``jax.Array``s and must not dispatch JAX work from inside the running program
  (before it converted them to NumPy, ``test_checkpoint``'s eager training hung in the
  suite; a single eager update, as here, need not)."""
  specs_model = Net()
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, 20, (8, 4)))
  x = jnp.asarray(rng.standard_normal((8, 600)), jnp.float32)
  y = jnp.asarray(rng.standard_normal((8, 3)), jnp.float32)
  params = specs_model.init(jax.random.key(1), tokens, x)["params"]
  loss = lambda p, t, x, y: jnp.mean((specs_model.apply({"params": p}, t, x) - y) ** 2)
  grads, acts = jax.grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(params, tokens, x, y)
  tx = sngd_jax.sngd(inverse_every=1, factor_every=1, inverse=AUTO)
  state = tx.init(params)
  eager, _ = tx.update(grads, state, params, activations=acts)
  jitted, _ = jax.jit(lambda g, s, p, a: tx.update(g, s, p, activations=a))(
      grads, state, params, acts)
  for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                               atol=1e-5 * float(np.max(np.abs(np.asarray(b)))))
