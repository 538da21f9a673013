"""Training code as users write it with rematerialization policies, loops and scope wrappers:
the SNGD factors after two steps against float64 Gram sums of the rows each layer saw (an
independent numpy forward pass with the params of that step), and the updates against the same
model written without the pattern (unrolled, unwrapped), in float64.

Patterns: ``jax.checkpoint`` with ``checkpoint_policies`` (``dots_with_no_batch_dims_saveable``,
``nothing_saveable``, ``save_only_these_names`` with ``checkpoint_name``), ``nn.remat`` with a
policy, ``prevent_cse=False`` and ``static_argnums``, ``nn.remat_scan``, ``nnx.remat``,
``eqx.filter_checkpoint``, ``hk.remat``; a weight-tied layer in ``nn.scan(length=n)`` without
``xs`` and in a static ``jax.lax.fori_loop`` (a ``fori_loop`` of traced bounds: JAX's own error),
a ``while_loop`` in the loss (on the targets, or an inference pass of the model: a copy passed as
an argument after the trained params; the same params inside it are named, not pooled); and
``jax.named_scope``, ``nn.share_scope``, ``hk.vmap(split_rng=False)`` over an ensemble axis and
``jax.pmap`` with ``sngd(axis_name=...)``.
"""

import functools
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from flax import nnx
from helpers_warnings import no_sngd_warnings
from jax.ad_checkpoint import checkpoint_name

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

P = jax.checkpoint_policies
B, D, H, STEPS, TIED = 8, 5, 6, 2, 3
# every step a factor step, whose factor is that step's Gram sum; exact solves each step
KW = dict(ref.ONE_STEP, inverse_every=1, damping=ref.DAMPING)


def _data():
  x = jax.random.normal(jax.random.key(1), (B, D), jnp.float64)
  y = jax.random.normal(jax.random.key(2), (B, 2), jnp.float64)
  return x, y


def _train(loss, params, args, capture=sngd_jax.capture, frozen=False):
  """``STEPS`` jitted steps of ``chain(sngd(**KW), sgd(0.1))`` on ``capture(loss)``, its
  gradient taken with respect to its first argument, the params (``frozen``: the params are
  passed again as its second argument; ``args`` may be a function of the params); per step:
  the params it started from, its normalized factors ``G_t / w_t`` and its updates."""
  tx = optax.chain(sngd_jax.sngd(**KW), optax.sgd(0.1))
  state = tx.init(params)

  @jax.jit
  def step(p, s):
    a = args(p) if callable(args) else args
    (_, acts), g = jax.value_and_grad(capture(loss), has_aux=True)(
        p, *((p,) if frozen else ()), *a)
    u, s = tx.update(g, s, p, activations=acts)
    return optax.apply_updates(p, u), s, u

  out = []
  for _ in range(STEPS):
    before = params
    params, state, u = step(params, state)
    out.append((before, _factors(state[0]), u))
  return out


def _factors(state):
  return {k: np.asarray(v, np.float64) / np.asarray(state.weights[k], np.float64)
          for k, v in state.factors.items()}


def _same_run(run, want, name, rtol=1e-10):
  """Factors and updates of every step equal to those of the model without the pattern."""
  for (_, fa, ua), (_, fb, ub) in zip(run, want, strict=True):
    assert fa.keys() == fb.keys(), (name, sorted(fa), sorted(fb))
    for k in fa:
      np.testing.assert_allclose(fa[k], fb[k], rtol=rtol, atol=1e-14, err_msg=f"{name}: {k}")
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=rtol, atol=1e-14,
                                                         err_msg=name), ua, ub)


def _assert_grams(run, rows_of, name):
  """Each step's factors are the float64 Gram sums ``E[x~ x~^T]`` of ``rows_of(params)``."""
  for before, factors, _ in run:
    rows = rows_of(before)
    assert set(factors) == set(rows), (name, sorted(factors), sorted(rows))
    for path, r in rows.items():
      want = ref.linear_factor(r)
      np.testing.assert_allclose(factors[path], want, rtol=1e-10, atol=1e-13,
                                 err_msg=f"{name}: {path}")


def _np(a):
  return np.asarray(a, np.float64)


def _lin(p):
  """A linen/NNX layer's ``(W (in, out), b)`` in float64."""
  return _np(p["kernel"]), _np(p["bias"])


def _block_rows(x, a, b, scale=1.0):
  """The residual block ``x + scale * (tanh(x Wa + ba) Wb + bb)`` in float64: its output and
  the rows of its two layers."""
  h = np.tanh(x @ a[0] + a[1])
  return x + scale * (h @ b[0] + b[1]), {"a": x, "b": h}


# --- rematerialization policies -----------------------------------------------------------

class Block(nn.Module):
  """A residual block; ``train`` (static under remat) scales the branch."""

  @nn.compact
  def __call__(self, x, train):
    h = checkpoint_name(jnp.tanh(nn.Dense(H, name="a", param_dtype=jnp.float64)(x)), "h")
    return x + nn.Dense(D, name="b", param_dtype=jnp.float64)(h) * (1.0 if train else 0.5)


_LINEN_REMAT = {
    "plain": lambda: Block,
    "dots": lambda: nn.remat(Block, policy=P.dots_with_no_batch_dims_saveable,
                             prevent_cse=False, static_argnums=(2,)),
    "nothing": lambda: nn.remat(Block, policy=P.nothing_saveable, static_argnums=(2,)),
    "names": lambda: nn.remat(Block, policy=P.save_only_these_names("h"),
                              static_argnums=(2,)),
    "nn.checkpoint": lambda: nn.checkpoint(Block, policy=P.everything_saveable,
                                           static_argnums=(2,))}
_WRAPS = ("dots", "nothing", "names", "nn.checkpoint")


class Blocks(nn.Module):
  """Four blocks, ``b{i}`` wrapped by ``_LINEN_REMAT[_WRAPS[i]]`` (``plain``: none), the
  static ``train`` flag alternating; then a head."""

  plain: bool

  @nn.compact
  def __call__(self, x):
    for i, wrap in enumerate(_WRAPS):
      x = _LINEN_REMAT["plain" if self.plain else wrap]()(name=f"b{i}")(x, i % 2 == 0)
    return nn.Dense(2, name="head", param_dtype=jnp.float64)(x)


def _blocks_rows(params, x):
  rows = {}
  h = _np(x)
  for i in range(len(_WRAPS)):
    p = params[f"b{i}"]
    h, r = _block_rows(h, _lin(p["a"]), _lin(p["b"]), 1.0 if i % 2 == 0 else 0.5)
    rows.update({f"b{i}/{k}": v for k, v in r.items()})
  return {**rows, "head": h}


@functools.cache
def _linen_plain():
  x, y = _data()
  model = Blocks(plain=True)
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  return params, _train(loss, params, (x, y))


def test_linen_remat_with_policies_and_static_argnums_is_the_plain_block():
  """``nn.remat(Block, policy=...)`` with ``dots_with_no_batch_dims_saveable`` and
  ``prevent_cse=False``, ``nothing_saveable``, ``save_only_these_names`` (a
  ``checkpoint_name`` in the block), and ``nn.checkpoint``, each with ``static_argnums`` for
  a static ``train`` flag: the factors are the Gram sums of each layer's rows, and the updates
  those of the blocks without remat."""
  x, y = _data()
  model = Blocks(plain=False)
  params, want = _linen_plain()
  assert jax.tree.structure(model.init(jax.random.key(0), x)["params"]) == jax.tree.structure(
      params)
  loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  with no_sngd_warnings():
    run = _train(loss, params, (x, y))
  _assert_grams(run, lambda p: _blocks_rows(p, x), "nn.remat")
  _same_run(run, want, "nn.remat")


def test_jax_checkpoint_of_apply_with_policies_is_the_plain_model():
  """``jax.checkpoint(apply, policy=...)`` around the model in the loss, nested three deep:
  ``save_only_these_names`` inside ``dots_with_no_batch_dims_saveable`` inside
  ``nothing_saveable``, the outermost made by ``functools.partial(jax.checkpoint, ...,
  static_argnums=...)`` as a decorator."""
  x, y = _data()
  model = Blocks(plain=True)
  params, want = _linen_plain()

  def loss(p, x, y):
    @functools.partial(jax.checkpoint, policy=P.nothing_saveable, static_argnums=(2,))
    def f(p, x, scale):
      inner = jax.checkpoint(lambda p, x: model.apply({"params": p}, x),
                             policy=P.save_only_these_names("h"))
      return jax.checkpoint(inner, policy=P.dots_with_no_batch_dims_saveable,
                            prevent_cse=False)(p, x) * scale
    return jnp.mean((f(p, x, 1.0) - y) ** 2)

  with no_sngd_warnings():
    run = _train(loss, params, (x, y))
  _assert_grams(run, lambda p: _blocks_rows(p, x), "jax.checkpoint")
  _same_run(run, want, "jax.checkpoint")


def test_linen_remat_scan_gives_each_block_of_the_unrolled_stack_its_factor():
  """``nn.remat_scan(Block, lengths=(2, 2))`` stacks 4 blocks' params ``(2, 2, ...)``: the
  factors are stacked ``(2, 2, d, d)``, block ``(i, j)``'s that of block ``2 i + j`` of the
  unrolled model, and so are the updates."""

  class Tied(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x + jnp.tanh(nn.Dense(D, name="d", param_dtype=jnp.float64)(x))

  class Net(nn.Module):
    scanned: bool

    @nn.compact
    def __call__(self, x):
      if self.scanned:
        x = nn.remat_scan(Tied, lengths=(2, 2), policy=P.nothing_saveable)(name="blocks")(x)
      else:
        for i in range(4):
          x = Tied(name=f"b{i}")(x)
      return nn.Dense(2, name="head", param_dtype=jnp.float64)(x)

  x, y = _data()
  scanned, unrolled = Net(True), Net(False)
  params = scanned.init(jax.random.key(0), x)["params"]
  flat = {"head": params["head"], **{
      f"b{2 * i + j}": jax.tree.map(lambda a, i=i, j=j: a[i, j], params["blocks"])
      for i in range(2) for j in range(2)}}
  loss = lambda m: lambda p, x, y: jnp.mean((m.apply({"params": p}, x) - y) ** 2)
  with no_sngd_warnings():
    run = _train(loss(scanned), params, (x, y))
  want = _train(loss(unrolled), flat, (x, y))
  for (before, fa, ua), (_, fb, ub) in zip(run, want, strict=True):
    assert fa["blocks/d"].shape == (2, 2, D + 1, D + 1)
    h = _np(x)
    for k in range(4):
      i, j = divmod(k, 2)
      np.testing.assert_allclose(fa["blocks/d"][i, j], fb[f"b{k}/d"], rtol=1e-10, atol=1e-14)
      np.testing.assert_allclose(fa["blocks/d"][i, j], ref.linear_factor(h), rtol=1e-10,
                                 atol=1e-13)
      w, b = (_np(before["blocks"]["d"][n][i, j]) for n in ("kernel", "bias"))
      h = h + np.tanh(h @ w + b)
      for n in ("kernel", "bias"):
        np.testing.assert_allclose(ua["blocks"]["d"][n][i, j], ub[f"b{k}"]["d"][n],
                                   rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(fa["head"], ref.linear_factor(h), rtol=1e-10, atol=1e-13)


class NBlock(nnx.Module):
  def __init__(self, rngs):
    self.a = nnx.Linear(D, H, rngs=rngs, param_dtype=jnp.float64)
    self.b = nnx.Linear(H, D, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return x + self.b(jnp.tanh(self.a(x)))


class NNet(nnx.Module):
  """Two blocks: ``blk0`` under ``nnx.remat`` of a function made in ``__call__`` (policy
  ``dots_with_no_batch_dims_saveable``, ``prevent_cse=False``), ``blk1`` under
  ``jax.checkpoint`` over ``nnx.split``/``nnx.merge`` (``nothing_saveable``); ``plain``: none."""

  def __init__(self, rngs, plain):
    self.blk0, self.blk1 = NBlock(rngs), NBlock(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs, param_dtype=jnp.float64)
    self.plain = plain

  def __call__(self, x):
    if self.plain:
      return self.head(self.blk1(self.blk0(x)))
    h = nnx.remat(lambda m, x: m(x), policy=P.dots_with_no_batch_dims_saveable,
                  prevent_cse=False)(self.blk0, x)
    graph, state = nnx.split(self.blk1)
    h = jax.checkpoint(lambda s, x: nnx.merge(graph, s)(x), policy=P.nothing_saveable)(state, h)
    return self.head(h)


def _nnx_train(plain):
  """``STEPS`` steps of ``nnx.Optimizer(model, chain(sngd(**KW), sgd(0.1)))`` under
  ``nnx.jit``, as ``_train`` reports them."""
  x, y = _data()
  model = NNet(nnx.Rngs(0), plain)
  opt = nnx.Optimizer(model, optax.chain(sngd_jax.sngd(**KW), optax.sgd(0.1)), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt):
    loss = sngd_jax.capture_nnx(lambda m: jnp.mean((m(x) - y) ** 2))
    (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    opt.update(model, grads, activations=acts)

  out = []
  for _ in range(STEPS):
    before = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    step(model, opt)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    out.append((before, _factors(opt.opt_state[0]),
                jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), after, before)))
  return x, out


def test_nnx_remat_with_a_policy_is_the_plain_block():
  """``nnx.remat(f, policy=..., prevent_cse=False)`` of a submodule, and ``jax.checkpoint``
  over ``nnx.split``/``nnx.merge`` with a policy: the plain model's factors and steps."""
  def rows(p, x):
    out, rows = _np(x), {}
    for name in ("blk0", "blk1"):
      out, r = _block_rows(out, _lin(p[name]["a"]), _lin(p[name]["b"]))
      rows.update({f"{name}/{k}": v for k, v in r.items()})
    return {**rows, "head": out}

  with no_sngd_warnings():
    x, run = _nnx_train(plain=False)
  _assert_grams(run, lambda p: rows(p, x), "nnx.remat")
  _same_run(run, _nnx_train(plain=True)[1], "nnx.remat")


def test_equinox_filter_checkpoint_with_policies_is_the_plain_block():
  """``eqx.filter_checkpoint(f, policy=...)`` of a block of ``eqx.nn.Linear`` layers, called
  per example under ``jax.vmap``: ``nothing_saveable`` inside ``dots_with_no_batch_dims_saveable``
  with ``prevent_cse=False``."""
  eqx = pytest.importorskip("equinox")

  class Net(eqx.Module):
    a: eqx.nn.Linear
    b: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key):
      k = jax.random.split(key, 3)
      self.a = eqx.nn.Linear(D, H, key=k[0], dtype=jnp.float64)
      self.b = eqx.nn.Linear(H, D, key=k[1], dtype=jnp.float64)
      self.head = eqx.nn.Linear(D, 2, key=k[2], dtype=jnp.float64)

    def __call__(self, x, remat):
      block = lambda ab, x: x + ab[1](jnp.tanh(ab[0](x)))
      if remat:
        inner = eqx.filter_checkpoint(block, policy=P.nothing_saveable)
        block = eqx.filter_checkpoint(lambda ab, x: inner(ab, x),
                                      policy=P.dots_with_no_batch_dims_saveable,
                                      prevent_cse=False)
      return self.head(block((self.a, self.b), x))

  x, y = _data()
  model = Net(jax.random.key(0))
  params = eqx.filter(model, eqx.is_inexact_array)

  def train(remat):
    loss = lambda p, x, y: jnp.mean((jax.vmap(lambda v: eqx.combine(p, model)(v, remat))(x)
                                     - y) ** 2)
    return _train(loss, params, (x, y), capture=sngd_jax.capture_eqx)

  def rows(p):
    lin = lambda layer: (_np(layer.weight).T, _np(layer.bias))
    out, r = _block_rows(_np(x), lin(p.a), lin(p.b))
    return {"a": r["a"], "b": r["b"], "head": out}

  with no_sngd_warnings():
    run = train(True)
  _assert_grams(run, rows, "eqx.filter_checkpoint")
  _same_run(run, train(False), "eqx.filter_checkpoint")


def _hk_model(hk, plain):
  """A block and a head; unless ``plain``, the block is run by ``hk.vmap(split_rng=False)`` over
  an ensemble axis of 2 views of the batch (params shared), inside ``hk.remat`` with
  ``dots_with_no_batch_dims_saveable`` and ``prevent_cse=False``, its branch inside ``hk.remat``
  with ``save_only_these_names``."""
  def f(x):
    def branch(x):
      return hk.Linear(D, name="b")(checkpoint_name(jnp.tanh(hk.Linear(H, name="a")(x)), "h"))
    if plain:
      h = x + branch(x)
    else:
      block = lambda v: v + hk.remat(branch, policy=P.save_only_these_names("h"))(v)
      ensemble = lambda v: hk.vmap(block, split_rng=False)(v.reshape(2, B // 2, D))
      h = hk.remat(ensemble, policy=P.dots_with_no_batch_dims_saveable, prevent_cse=False)(
          x).reshape(B, D)
    return hk.Linear(2, name="head")(h)
  return hk.without_apply_rng(hk.transform(f))


def test_haiku_remat_with_policies_and_hk_vmap_are_the_plain_model():
  """``hk.remat(f, policy=...)`` and ``hk.vmap(f, split_rng=False)`` over an ensemble axis of
  the inputs (params shared: every member's rows pooled into one factor per layer)."""
  hk = pytest.importorskip("haiku")
  x, y = _data()
  plain = _hk_model(hk, True)
  params = ref.f64(plain.init(jax.random.key(0), x))
  loss = lambda m: lambda p, x, y: jnp.mean((m.apply(p, x) - y) ** 2)

  def rows(p):
    lin = lambda n: (_np(p[n]["w"]), _np(p[n]["b"]))
    out, r = _block_rows(_np(x), lin("a"), lin("b"))
    return {"a": r["a"], "b": r["b"], "head": out}

  with no_sngd_warnings():
    run = _train(loss(_hk_model(hk, False)), params, (x, y), capture=sngd_jax.capture_hk)
  _assert_grams(run, rows, "hk.remat")
  _same_run(run, _train(loss(plain), params, (x, y), capture=sngd_jax.capture_hk), "hk.remat")


# --- loops and scopes ------------------------------------------------------------------------

class Cell(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + jnp.tanh(nn.Dense(D, name="d", param_dtype=jnp.float64)(h)), None


class SharedScope(nn.Module):
  """A wrapper whose ``Cell``'s params live in the wrapper's own scope (``nn.share_scope``)."""

  @nn.compact
  def __call__(self, x):
    cell = Cell()
    nn.share_scope(self, cell)
    for _ in range(TIED):
      x, _ = cell(x, None)
    return x


_LOOPS = ("nn.scan", "fori_loop", "named_scope", "share_scope")


class Tied(nn.Module):
  """Four stages ``s{i}``, each a ``Cell`` applied ``TIED`` times by ``_LOOPS[i]`` (``plain``:
  a Python loop; ``traced``: one ``fori_loop`` stage of ``n`` steps), then a head."""

  plain: bool = False
  traced: bool = False

  @nn.compact
  def __call__(self, x, n=TIED):
    if self.traced:
      cell = Cell(name="s0")
      return nn.Dense(2, name="head")(jax.lax.fori_loop(0, n, lambda i, h: cell(h, None)[0], x))
    for i, how in enumerate(_LOOPS):
      if self.plain:
        cell = Cell(name=f"s{i}")
        for _ in range(TIED):
          x, _ = cell(x, None)
      elif how == "nn.scan":  # no xs: `length=`, the params broadcast over the steps
        x, _ = nn.scan(Cell, variable_broadcast="params", split_rngs={"params": False},
                       length=TIED)(name=f"s{i}")(x, None)
      elif how == "fori_loop":
        cell = Cell(name=f"s{i}")
        x = jax.lax.fori_loop(0, TIED, lambda i, h, cell=cell: cell(h, None)[0], x)
      elif how == "named_scope":
        cell = Cell(name=f"s{i}")
        with jax.named_scope("refine"):
          for t in range(TIED):
            with jax.named_scope(f"step{t}"):
              x, _ = cell(x, None)
      else:
        x = SharedScope(name=f"s{i}")(x)
    return nn.Dense(2, name="head", param_dtype=jnp.float64)(x)


def _tied_rows(p, x):
  h, rows = _np(x), {}
  for i in range(len(_LOOPS)):
    w, b = _lin(p[f"s{i}"]["d"])
    seen = []
    for _ in range(TIED):
      seen.append(h)
      h = h + np.tanh(h @ w + b)
    rows[f"s{i}/d"] = np.concatenate(seen)
  return {**rows, "head": h}


def _fixed_point(y, loop):
  """A target computed by a loop that touches no params: Heron's iteration on ``|y| + 1``."""
  body = lambda t: 0.5 * (t + (jnp.abs(y) + 1.0) / t)
  if loop:
    return jax.lax.while_loop(lambda c: c[0] < 4, lambda c: (c[0] + 1, body(c[1])),
                              (0, jnp.ones_like(y)))[1]
  t = jnp.ones_like(y)
  for _ in range(4):
    t = body(t)
  return t


def _tied_loss(model, loop):
  return lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - _fixed_point(y, loop)) ** 2)


@functools.cache
def _tied_plain():
  x, y = _data()
  model = Tied(plain=True)
  params = model.init(jax.random.key(0), x)["params"]
  return params, _train(_tied_loss(model, False), params, (x, y))


def test_weight_tied_cells_in_loops_and_scopes_are_the_python_loops():
  """A cell applied ``TIED`` times by ``nn.scan(length=n)`` without xs, a static
  ``jax.lax.fori_loop``, under ``jax.named_scope``s, or inside an ``nn.share_scope`` wrapper
  (its params at the wrapper's path), with a ``jax.lax.while_loop`` on the targets in the loss
  (no layer inside): each cell gets one factor pooled over its ``TIED * B`` rows, and the
  updates are those of Python loops, without a warning."""
  x, y = _data()
  model = Tied()
  params, want = _tied_plain()
  assert jax.tree.structure(model.init(jax.random.key(0), x)["params"]) == jax.tree.structure(
      params)
  with no_sngd_warnings():
    run = _train(_tied_loss(model, True), params, (x, y))
  _assert_grams(run, lambda p: _tied_rows(p, x), "loops")
  _same_run(run, want, "loops")


def test_fori_loop_of_traced_bounds_fails_with_jaxs_own_error():
  """A ``fori_loop`` whose bound is traced has no reverse-mode gradient: the error is JAX's,
  the same with and without capture."""
  x, y = _data()
  model = Tied(traced=True)
  params = model.init(jax.random.key(0), x, TIED)["params"]
  loss = lambda p, x, y, n: jnp.mean((model.apply({"params": p}, x, n) - y) ** 2)
  jax_message = r"^Reverse-mode differentiation does not work for lax.while_loop or lax.fori_loop"
  for f in (loss, sngd_jax.capture(loss)):
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # capture's warning that the layers are not captured
      with pytest.raises(ValueError, match=jax_message):
        jax.jit(jax.value_and_grad(f, has_aux=f is not loss))(params, x, y, TIED)


# --- an inference pass with a while_loop in the loss ------------------------------------------

class Refiner(nn.Module):
  """A model whose inference path (``refine=True``) refines its output in an
  ``nn.while_loop`` of a data-dependent length, calling its layers inside the loop."""

  @nn.compact
  def __call__(self, x, refine=False):
    cell, head = Cell(name="tied"), nn.Dense(2, name="head", param_dtype=jnp.float64)
    out = head(cell(x, None)[0])
    if refine:
      def body(mdl, c):
        return c[0] + 1, c[1] + 0.1 * head(cell(x, None)[0])
      out = nn.while_loop(lambda mdl, c: (c[0] < 2) | (jnp.abs(c[1]).max() < 0.0), body,
                          self, (0, out))[1]
    return out


def _refiner_rows(p, x):
  w, b = _lin(p["tied"]["d"])
  return {"tied/d": _np(x), "head": _np(x) + np.tanh(_np(x) @ w + b)}


def test_inference_loop_on_params_passed_after_the_trained_ones_is_left_out():
  """A loss that builds its target by the model's inference path (an ``nn.while_loop`` calling
  the layers, no gradient through it) on the params passed again as an argument after the
  trained ones: those calls are left out (no warning), the factors are the Gram sums of the
  training call's rows, and the updates those of the target computed outside the loss."""
  x, y = _data()
  model = Refiner()
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p, frozen, x, y):
    target = y + model.apply({"params": frozen}, x, refine=True)
    return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

  with no_sngd_warnings():
    run = _train(loss, params, (x, y), frozen=True)
  _assert_grams(run, lambda p: _refiner_rows(p, x), "inference loop")
  target = lambda p: (x, y + model.apply({"params": p}, x, refine=True))
  want = _train(lambda p, x, t: jnp.mean((model.apply({"params": p}, x) - t) ** 2), params,
                target)
  _same_run(run, want, "inference loop")


_REWRITE = (r"an inference pass inside the loss.*as an argument after the trained params "
            r"\(`loss\(params, frozen_params, x\)`, called as `loss\(params, params, x\)`")


def test_inference_loop_on_the_trained_params_names_the_layers_and_the_rewrite():
  """The same inference path on ``stop_gradient(params)`` inside the loss: the calls inside the
  ``while_loop`` cannot leave it, so capture warns, naming each layer and the rewrite that
  fits (the params as an argument after the trained ones; until 2026-12-06 the warning offered
  only rewrites that do not fit a loop of a data-dependent length), and ``update`` raises
  naming the layer. Until 2026-12-06 the cell, whose input inside the loop is the loop-invariant
  ``x``, was not named: its call inside the loop was kept, once however many steps the loop
  ran, without a warning (``tied/d`` had 3 calls, the loop's among them)."""
  x, y = _data()
  model = Refiner()
  params = model.init(jax.random.key(0), x)["params"]

  def loss(p, x, y):
    target = y + model.apply({"params": jax.lax.stop_gradient(p)}, x, refine=True)
    return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

  with pytest.warns(UserWarning) as caught:
    (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
        params, x, y)
  messages = [str(w.message) for w in caught if "was called inside" in str(w.message)]
  assert len(messages) == 2, messages
  for path, message in zip(["head", "tied/d"], messages, strict=True):
    assert re.search(f"layer '{path}' was called inside a JAX transform whose values cannot "
                     f"leave it.*{_REWRITE}", message, re.S), message
  tx = sngd_jax.sngd(**KW)
  with pytest.raises(ValueError, match="no activations were captured for layer 'head'"):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_haiku_while_loop_layers_are_named_and_a_stopped_copy_is_left_out():
  """Haiku's ``hk.while_loop`` (and ``hk.fori_loop`` of a traced number of steps) carries the
  params through its body. Its calls are named through the carry (until 2026-12-06 they could
  not be named: the layers kept the rows of their calls outside the loop, while the warning
  said ``update`` would raise): as linen's,
  capture warns, naming each layer and the rewrite, and ``update`` raises naming it. With the
  params passed again after the trained ones the loop's calls are left out without a warning,
  and a ``stop_gradient`` copy's calls, constants of the loss's differentiation, are left out
  without a warning too (until 2026-12-06 they were not captured with a warning that said so):
  the factors are the Gram sums of the training call's rows."""
  hk = pytest.importorskip("haiku")
  x, y = _data()

  def f(x, refine, n=2):
    a, head = hk.Linear(D, name="a"), hk.Linear(2, name="head")
    out = head(jnp.tanh(a(x)))
    if refine == "fori_loop":  # of a traced number of steps: a while_loop too
      out = hk.fori_loop(0, n, lambda i, o: o + 0.1 * head(jnp.tanh(a(x))), out)
    elif refine:
      out = hk.while_loop(lambda c: c[0] < 2,
                          lambda c: (c[0] + 1, c[1] + 0.1 * head(jnp.tanh(a(x)))), (0, out))[1]
    return out

  model = hk.without_apply_rng(hk.transform(f))
  params = ref.f64(model.init(jax.random.key(0), x, False))
  a = (_np(params["a"]["w"]), _np(params["a"]["b"]))
  rows = {"a": _np(x), "head": np.tanh(_np(x) @ a[0] + a[1])}
  tx = sngd_jax.sngd(**KW)

  def update(loss, *frozen):
    (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True))(
        params, *frozen, x, y)
    return _factors(tx.update(grads, tx.init(params), params, activations=acts)[1])

  def inside(p, x, y):  # no gradient through the loop, or JAX refuses it
    target = y + jax.lax.stop_gradient(model.apply(p, x, True))
    return jnp.mean((model.apply(p, x, False) - target) ** 2)

  def traced(p, x, y, n):
    target = y + jax.lax.stop_gradient(model.apply(p, x, "fori_loop", n))
    return jnp.mean((model.apply(p, x, False) - target) ** 2)

  for loss, n in ((inside, ()), (traced, (2,))):
    with pytest.warns(UserWarning) as caught:
      with pytest.raises(ValueError, match="no activations were captured for layer 'a'"):
        (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True))(
            params, x, y, *n)
        tx.update(grads, tx.init(params), params, activations=acts)
    messages = [str(w.message) for w in caught if "was called inside" in str(w.message)]
    assert len(messages) == 2, [str(w.message) for w in caught]
    for path, message in zip(["a", "head"], messages, strict=True):
      assert re.search(f"layer '{path}' was called inside a JAX transform.*{_REWRITE}", message,
                       re.S), message
  with no_sngd_warnings():
    got = update(lambda p, frozen, x, y: jnp.mean(
        (model.apply(p, x, False) - y - model.apply(frozen, x, True)) ** 2), params)
  _assert_grams([(params, got, None)], lambda p: rows, "hk.while_loop, params passed again")

  def stopped(p, x, y):
    target = y + model.apply(jax.lax.stop_gradient(p), x, False)
    return jnp.mean((model.apply(p, x, False) - target) ** 2)

  with no_sngd_warnings():
    got = update(stopped)
  _assert_grams([(params, got, None)], lambda p: rows, "stop_gradient copy")


# --- scale-out: jax.pmap ----------------------------------------------------------------------

def test_pmap_with_axis_name_is_the_plain_step():
  """``jax.pmap(step, axis_name="batch")`` with ``sngd(axis_name="batch")`` over the local
  devices (one in this suite, 8 forced ones in ``test_sharding.py``), the batch split over
  them: every device's state and updates are those of the step without pmap."""
  x, y = _data()
  loss = _tied_loss(Tied(plain=True), False)
  params, want = _tied_plain()
  n = jax.local_device_count()
  tx = optax.chain(sngd_jax.sngd(**KW, axis_name="batch"), optax.sgd(0.1))

  def step(p, s, x, y):
    (_, acts), g = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(p, x, y)
    u, s = tx.update(jax.lax.pmean(g, "batch"), s, p, activations=acts)
    return optax.apply_updates(p, u), s, u

  step = jax.pmap(step, axis_name="batch")
  replicate = lambda t: jax.tree.map(lambda a: jnp.stack([a] * n), t)
  p, s = replicate(params), replicate(tx.init(params))
  first = lambda t: jax.tree.map(lambda a: a[0], t)
  run = []
  with no_sngd_warnings():
    for _ in range(STEPS):
      before = first(p)
      p, s, u = step(p, s, x.reshape(n, B // n, D), y.reshape(n, B // n, 2))
      run.append((before, _factors(first(s[0])), first(u)))
  _assert_grams(run, lambda p: _tied_rows(p, x), "pmap")
  _same_run(run, want, "pmap")


def test_checkpoint_with_static_argnums_keeps_no_tracer_after_the_trace():
  """``jax.checkpoint(f, static_argnums=...)`` under capture, in a jitted gradient under
  ``jax.checking_leaks()``: JAX caches the function it traces for static arguments; capture's
  wrapper of it held the recorder and the caller's arguments, so the cache kept tracers of the
  finished trace (reported as a leak; plain JAX reports none). The factor is the float64 Gram
  of the layer's rows."""
  eqx = pytest.importorskip("equinox")
  x = _data()[0]
  lin = eqx.nn.Linear(D, 2, key=jax.random.key(0), dtype=jnp.float64)

  def loss(m, x):
    out = jax.checkpoint(lambda m, x, n: jax.vmap(m)(x) * n, static_argnums=(2,))(m, x, 2.0)
    return jnp.sum(jnp.sin(out))

  with jax.checking_leaks(), no_sngd_warnings():
    grads, acts = eqx.filter_jit(eqx.filter_grad(sngd_jax.capture_eqx(loss), has_aux=True))(
        lin, x)
  params = eqx.filter(lin, eqx.is_inexact_array)
  tx = sngd_jax.sngd(**KW)
  _, state = tx.update(grads, tx.init(params), params, activations=acts)
  ref.assert_factor(state, "", ref.np64(x))
