"""Capture through JAX transforms: layers scanned over depth train exactly like the
unrolled model (linen and NNX), time scans and batch vmaps pool rows (float64
references), and layers whose calls cannot leave a transform are reported, not used."""

import re
import threading

import flax.linen as nn
import helpers_jaxpr
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from exact import exact_sngd
from flax import nnx
from flax.nnx.transforms import compilation as nnx_compilation
from helpers_mlp import sngd_train_step
from helpers_warnings import no_sngd_warnings

import sngd_jax
from sngd_jax._src.capture import swap

L, D, H, BATCH, STEPS = 3, 4, 6, 8, 10
# One rfim layer per block (per-unit blocks, stacked), the others linear.
FISHER = lambda path: "rfim" if path.endswith("up") else "linear"


def _data(dtype=jnp.float32):
  x = jax.random.normal(jax.random.key(1), (BATCH, D), dtype)
  y = jax.random.normal(jax.random.key(2), (BATCH, 2), dtype)
  return x, y


def _assert_trees_close(a, b, rtol=2e-5, atol=1e-6):
  for (path, u), v in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b),
                          strict=True):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


# --- linen: nn.scan(nn.remat(Block)) over depth vs the unrolled model ---------------------

class Block(nn.Module):
  """LayerNorm, a biased rfim layer, a bias-free linear layer, a residual."""

  @nn.compact
  def __call__(self, x, _):
    h = nn.relu(nn.Dense(H, name="up")(nn.LayerNorm(name="ln")(x)))
    return x + nn.Dense(D, use_bias=False, name="down")(h), None


class ScannedNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=L)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(2, name="head")(x)


class UnrolledNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(L):
      x, _ = Block(name=f"block{i}")(x, None)
    return nn.Dense(2, name="head")(x)


def _linen_train(model, params, stacked=None):
  x, y = _data()
  loss = lambda p, x, y: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  tx = sngd_jax.sngd_momentum(0.05, fisher=FISHER, stacked=stacked, factor_every=2,
                              inverse_every=3)
  state = tx.init(params)

  step = sngd_train_step(tx, loss)
  losses = []
  for _ in range(STEPS):
    params, state, value = step(params, state, x, y)
    losses.append(value)
  return params, np.asarray(losses)


def test_linen_scan_over_remat_blocks_trains_like_unrolled_layers():
  """Same initial weights, 10 steps: every stacked factor equals its unrolled layer's."""
  x, _ = _data()
  scanned = ScannedNet().init(jax.random.key(0), x)["params"]
  unrolled = {f"block{i}": jax.tree.map(lambda a, i=i: a[i], scanned["blocks"])
              for i in range(L)} | {"head": scanned["head"]}
  p_scan, l_scan = _linen_train(ScannedNet(), scanned, stacked={"blocks": 1})
  p_unrolled, l_unrolled = _linen_train(UnrolledNet(), unrolled)
  np.testing.assert_allclose(l_scan, l_unrolled, rtol=2e-5)
  assert l_scan[-1] < 0.5 * l_scan[0]
  restacked = jax.tree.map(lambda *a: jnp.stack(a), *[p_unrolled[f"block{i}"] for i in range(L)])
  _assert_trees_close(p_scan["blocks"], restacked)
  _assert_trees_close(p_scan["head"], p_unrolled["head"])


def _scanned_net_grads():
  """``(params, grads, activations)`` of the squared error of :class:`ScannedNet`."""
  x, y = _data()
  model = ScannedNet()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.mean((model.apply({"params": p}, x) - y) ** 2)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(params)
  return params, grads, acts


def test_scanned_factors_are_stacked_and_refreshed_per_layer():
  params, grads, acts = _scanned_net_grads()
  assert [c.stack for c in acts["blocks/up"]] == [1]
  assert acts["blocks/up"][0].inputs.shape == (L, BATCH, D)
  tx = sngd_jax.sngd(fisher=FISHER, stacked={"blocks": 1})
  state = tx.init(params)
  assert state.factors["blocks/up"].shape == (L, H, D + 1, D + 1)  # rfim: a block per unit
  assert state.factors["blocks/down"].shape == (L, H, H)            # no bias
  assert state.factors["blocks/ln"].shape == (L * D, 2, 2)          # per channel of each layer
  _, state = tx.update(grads, state, params, activations=acts)
  assert int(state.num_refresh_failures) == 0


def test_bias_free_stack_without_stacked_option_is_a_clear_error():
  params, grads, acts = _scanned_net_grads()
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match=r"stacked=\{'blocks/down': 1\}"):
    tx.update(grads, tx.init(params), params, activations=acts)
  x, _ = _data()
  report = sngd_jax.coverage(lambda p, x: jnp.sum(ScannedNet().apply({"params": p}, x)), params,
                             x)
  assert report.missing == ["blocks/down/kernel"]
  assert "blocks/up/kernel" in report.preconditioned  # its bias shows the stack


# --- NNX: nnx.vmap-made blocks applied by nnx.scan over nnx.remat -----------------------

class NNXBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln = nnx.LayerNorm(D, rngs=rngs)
    self.up = nnx.Linear(D, H, rngs=rngs)
    self.down = nnx.Linear(H, D, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return x + self.down(nnx.relu(self.up(self.ln(x))))


class NNXScanned(nnx.Module):
  def __init__(self, rngs):
    @nnx.split_rngs(splits=L)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
      return NNXBlock(rngs)

    self.blocks = make(rngs)
    self.head = nnx.Linear(D, 2, rngs=rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    @nnx.remat
    def forward(x, block):
      return block(x)

    return self.head(forward(x, self.blocks))


class NNXUnrolled(nnx.Module):
  def __init__(self, scanned: NNXScanned):
    blocks = []
    for i in range(L):
      block = NNXBlock(nnx.Rngs(0))
      nnx.update(block, jax.tree.map(lambda a, i=i: a[i], nnx.state(scanned.blocks)))
      blocks.append(block)
    self.blocks = nnx.List(blocks)
    self.head = nnx.clone(scanned.head)

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return self.head(x)


def _nnx_train(model, stacked=None):
  x, y = _data()
  loss = lambda m, x, y: jnp.mean((m(x) - y) ** 2)
  tx = sngd_jax.sngd_momentum(0.05, fisher=FISHER, stacked=stacked, factor_every=2,
                              inverse_every=3)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss_and_acts = sngd_jax.capture_nnx(loss, outputs=True)
    (value, acts), grads = nnx.value_and_grad(loss_and_acts, has_aux=True)(model, x, y)
    optimizer.update(model, grads, activations=acts)
    return value

  return np.asarray([step(model, optimizer) for _ in range(STEPS)])


def test_nnx_scan_over_vmapped_remat_blocks_trains_like_unrolled_layers():
  scanned = NNXScanned(nnx.Rngs(0))
  unrolled = NNXUnrolled(scanned)
  l_scan = _nnx_train(scanned, stacked={"blocks": 1})
  l_unrolled = _nnx_train(unrolled)
  np.testing.assert_allclose(l_scan, l_unrolled, rtol=2e-5)
  assert l_scan[-1] < 0.5 * l_scan[0]
  for i in range(L):
    _assert_trees_close(jax.tree.map(lambda a, i=i: a[i], nnx.state(scanned.blocks, nnx.Param)),
                        nnx.state(unrolled.blocks[i], nnx.Param))


# --- user transforms: rows pooled over a vmap over the batch, a scan over time -----------

@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def _one_update(loss, params, *args):
  tx = exact_sngd(**ref.one_step_kwargs())

  @jax.jit
  def step(params, *args):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params, *args)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  with jax.checking_leaks():
    return step(params, *args)


@pytest.mark.parametrize("transform", ["vmap", "scan", "checkpoint", "nested"])
def test_user_transforms_pool_every_row(transform, x64):
  """``jax.vmap`` over examples, ``jax.lax.scan`` over time, ``jax.checkpoint``, and all
  three nested: the Dense layer's factor is the float64 factor of every row it saw."""
  layer = nn.Dense(3, param_dtype=jnp.float64)
  xs = jax.random.normal(jax.random.key(1), (5, 4, 2), jnp.float64)  # (batch, time, in)
  params = {"params": layer.init(jax.random.key(0), xs[0, 0])["params"]}
  apply = lambda p, x: layer.apply(p, x)

  def scanned(p, x):  # x: (time, in) or (time, batch, in)
    def step(h, x_t):
      z = apply(p, x_t)
      return h + jnp.sin(z), z
    return jax.lax.scan(step, jnp.zeros(x.shape[1:-1] + (3,)), x)[0]

  def loss(p, xs):
    if transform == "vmap":
      return jnp.sum(jnp.sin(jax.vmap(jax.vmap(apply, (None, 0)), (None, 0))(p, xs)))
    if transform == "scan":
      return jnp.sum(scanned(p, jnp.swapaxes(xs, 0, 1)))
    if transform == "checkpoint":
      return jnp.sum(jnp.sin(jax.checkpoint(apply)(p, xs)))
    return jnp.sum(jax.vmap(jax.checkpoint(scanned), (None, 0))(p, xs))

  grads, updates, acts = _one_update(loss, params, xs)
  assert sum(np.prod(c.inputs.shape[:-1]) for c in acts[""]) == 20
  rows = np.asarray(xs).reshape(-1, 2)
  ref.assert_dense_update(rows, grads["params"], updates["params"], transform)


class QKV(nn.Module):
  """Three projections of one input (as attention's q, k, v), scanned over depth."""

  @nn.compact
  def __call__(self, x, _):
    q, k, v = (nn.Dense(D, name=n)(x) for n in "qkv")
    return x + jnp.tanh(q * k + v), None


def test_layers_reading_one_input_leave_a_scan_once():
  """q, k and v record one array per block: the scan over depth stacks one copy of it
  (one extra output with capture, not three), and each gets its own stacked factor."""
  model = nn.scan(QKV, variable_axes={"params": 0}, split_rngs={"params": True}, length=L)()
  x = jax.random.normal(jax.random.key(1), (BATCH, D))
  params = model.init(jax.random.key(0), x, None)["params"]
  loss = lambda p, x: jnp.sum(model.apply({"params": p}, x, None)[0] ** 2)

  scan_outputs = lambda f: helpers_jaxpr.scan_output_counts(jax.make_jaxpr(f)(params, x).jaxpr)
  (plain,) = scan_outputs(loss)
  assert scan_outputs(sngd_jax.capture(loss)) == [plain + 1]
  _, acts = sngd_jax.capture(loss)(params, x)
  assert [acts[n][0].inputs.shape for n in "qkv"] == [(L, BATCH, D)] * 3
  assert all(acts[n][0].stack == 1 for n in "qkv")
  np.testing.assert_array_equal(acts["k"][0].inputs, acts["q"][0].inputs)


class Ensemble(nn.Module):
  """Two members with their own weights (nn.vmap over params), each a stacked layer."""

  @nn.compact
  def __call__(self, x):
    members = nn.vmap(nn.Dense, variable_axes={"params": 0}, split_rngs={"params": True},
                      in_axes=None, out_axes=0, axis_size=2)
    return members(3, param_dtype=jnp.float64, name="members")(x)


def test_vmap_over_weights_gives_each_member_its_own_factor(x64):
  x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
  model = Ensemble()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x) * jnp.array([1.0, 2.0])[
      :, None, None]))
  grads, updates, acts = _one_update(loss, params, x)
  assert acts["members"][0].stack == 1
  for i in range(2):
    take = lambda t, i=i: jax.tree.map(lambda a: np.asarray(a)[i], t["members"])
    ref.assert_dense_update(np.asarray(x), take(grads), take(updates), f"member {i}")


@pytest.mark.parametrize("batch_size", [None, 2, 5])
def test_lax_map_over_stacked_params_gives_each_member_its_own_factor(batch_size, x64):
  """``jax.lax.map(lambda p: model.apply(p, x), stacked, batch_size=...)``: an ensemble of 5
  two-layer MLPs mapped over its members, in chunks of ``batch_size`` (2: two chunks and a
  remainder of 1; 5: one chunk). Each member's layers get their own factor of their own
  inputs and the damped solve of their own gradient, whatever ``batch_size`` (it raised that
  the layer was called inside and outside a transform over its params, or asked for
  ``stacked=``: the chunks' (scan, vmap) axes and the remainder's vmap axis were left as
  separate calls)."""
  x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      dense = lambda n, name: nn.Dense(n, param_dtype=jnp.float64, name=name)
      return dense(2, "out")(jnp.tanh(dense(3, "hidden")(x)))

  model = MLP()
  stacked = jax.vmap(lambda k: model.init(k, x))(jax.random.split(jax.random.key(0), 5))
  loss = lambda ps, x: jnp.sum(jnp.sin(jax.lax.map(lambda p: model.apply(p, x), ps,
                                                   batch_size=batch_size)))
  grads, updates, acts = _one_update(loss, stacked, x)
  assert [(c.stack, c.inputs.shape) for c in acts["hidden"]] == [(1, (5, 6, 4))]
  for i in range(5):
    take = lambda t, name, i=i: jax.tree.map(lambda a: np.asarray(a)[i], t["params"][name])
    ref.assert_dense_update(np.asarray(x), take(grads, "hidden"), take(updates, "hidden"),
                            f"member {i} hidden")
    p = take(stacked, "hidden")
    h = np.tanh(np.asarray(x) @ p["kernel"] + p["bias"])
    ref.assert_dense_update(h, take(grads, "out"), take(updates, "out"), f"member {i} out")


def test_lax_map_over_single_examples_of_a_linen_model_is_a_vmap_over_them(x64):
  """What docs/layer-coverage.md says of ``jax.lax.map`` over one example per step of a linen
  model: the map's axis holds the examples, as ``jax.vmap``'s does, so a ``(B,)`` example mask
  gives the update that it gives under ``jax.vmap``: the float64 damped solve against the
  real examples' rows (until 2026-12-06 the map's axis was a scan's, and the mask raised;
  ``tests/test_lax_map.py`` has the factors of linen, NNX and Equinox)."""
  layer = nn.Dense(3, param_dtype=jnp.float64)
  x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
  params = layer.init(jax.random.key(0), x)
  real = np.arange(6) < 4
  tx = sngd_jax.sngd(**ref.one_step_kwargs())

  def masked_update(apply):
    loss = lambda p, x: jnp.sum(jnp.sin(apply(lambda v: layer.apply(p, v), x)))
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    acts = sngd_jax.with_row_mask(acts, real)
    return grads, tx.update(grads, tx.init(params), params, activations=acts)[0]

  grads, updates = masked_update(lambda f, x: jax.lax.map(f, x, batch_size=4))
  ref.assert_dense_update(np.asarray(x)[real], grads["params"], updates["params"], "lax.map")
  _, vmapped = masked_update(lambda f, x: jax.vmap(f)(x))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15),
               updates, vmapped)


# --- what cannot be captured is reported --------------------------------------------------

def test_layer_under_inner_jit_is_reported_not_used():
  layer = nn.Dense(3)
  x = jnp.ones((2, 4))
  params = layer.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jax.jit(lambda p, x: layer.apply({"params": p}, x))(p, x))
  with pytest.warns(UserWarning, match="jit") as caught:
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params, x)
  assert acts == {}
  # The warning names the caller's line, not the library's (`rec.freeze()` in capture).
  assert [w.filename for w in caught if "jit" in str(w.message)] == [__file__]
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="no activations were captured"):
    tx.update(grads, tx.init(params), params, activations=acts)


def test_jax_functions_are_restored_after_capture_and_on_error():
  names = ((jax, "vmap"), (jax.lax, "scan"), (jax, "checkpoint"), (jax, "remat"),
           (jax.lax, "fori_loop"), (jax.lax, "while_loop"), (jax.lax, "cond"), (jax.lax, "switch"),
           (jax, "eval_shape"), (jax.lax, "map"), (nnx_compilation.JitWrapped, "__call__"),
           (nnx_compilation.SimpleJitWrapped, "__call__"))
  originals = [getattr(owner, name) for owner, name in names]
  layer = nn.Dense(2)
  params = layer.init(jax.random.key(0), jnp.ones((1, 3)))["params"]

  def failing(p):
    assert jax.vmap is not originals[0] and swap.unswapped(jax, "vmap") is originals[0]
    raise RuntimeError("inside")

  with pytest.raises(RuntimeError, match="inside"):
    sngd_jax.capture(failing, outputs=True)(params)
  sngd_jax.capture(lambda p: jnp.sum(layer.apply({"params": p}, jnp.ones((1, 3)))))(params)
  assert [getattr(owner, name) for owner, name in names] == originals


def test_a_users_patch_made_after_import_runs_inside_a_capture_and_stays_after(monkeypatch):
  """A user patches ``jax.vmap`` and ``jax.lax.scan`` after importing sngd_jax (a counting
  wrapper of each). A capture of a model using both (and a capture nested in it, and a plain
  call on another thread while the outer one runs) calls the patches, records the vmapped
  and scanned layer's rows (float64 Gram reference), and leaves the patches in place. Before,
  the capture called the functions seen at import (the patches never ran) and restored them
  (the patches were gone after the first capture)."""
  real_vmap, real_scan = jax.vmap, jax.lax.scan
  calls = {"vmap": 0, "scan": 0, "thread": 0}

  def my_vmap(*args, **kwargs):
    calls["thread" if threading.current_thread() is not main else "vmap"] += 1
    return real_vmap(*args, **kwargs)

  def my_scan(*args, **kwargs):
    calls["scan"] += 1
    return real_scan(*args, **kwargs)

  main = threading.current_thread()
  monkeypatch.setattr(jax, "vmap", my_vmap)
  monkeypatch.setattr(jax.lax, "scan", my_scan)
  with jax.enable_x64(True):
    layer = nn.Dense(2, param_dtype=jnp.float64)
    xs = jax.random.normal(jax.random.key(0), (3, 4, 5), jnp.float64)  # (steps, batch, in)
    params = layer.init(jax.random.key(1), xs[0])["params"]

    def loss(p, xs):
      per_example = lambda x: layer.apply({"params": p}, x)
      step = lambda c, x: (c, jax.vmap(per_example)(x))
      return jnp.sum(jax.lax.scan(step, 0.0, xs)[1] ** 2)

    def outer(p, xs):
      other = threading.Thread(target=lambda: jax.vmap(jnp.sin)(jnp.ones(2)))
      other.start()
      other.join()
      nested = sngd_jax.capture(lambda q: jnp.sum(jax.vmap(jnp.sin)(q["bias"])))(p)
      return loss(p, xs) + nested[0]

    _, acts = sngd_jax.capture(outer)(params, xs)
  assert jax.vmap is my_vmap and jax.lax.scan is my_scan
  # each of the two vmaps (the loss's, the nested capture's) ran the patch, maybe more than
  # once (a wrapper may also trace a plain vmap); the other thread's plain call ran it once
  assert calls["vmap"] >= 2 and calls["scan"] >= 1 and calls["thread"] == 1
  assert len(acts[""]) == 1
  np.testing.assert_allclose(
      ref.gram(np.asarray(acts[""][0].inputs, np.float64).reshape(-1, 5), True),
      ref.gram(np.asarray(xs, np.float64).reshape(-1, 5), True), rtol=1e-12)


@pytest.mark.parametrize("loop", ["fori_loop", "nnx.fori_loop", "scan"])
def test_weight_tied_block_in_a_static_fori_loop_or_scan_is_the_unrolled_loop(loop, x64):
  """A block applied ``n`` times (weight-tied refinement) in a ``jax.lax.fori_loop`` or an
  ``nnx.fori_loop`` of static bounds is captured as JAX runs it, a ``jax.lax.scan`` of
  ``length=n``, pooling the ``n`` calls: the update equals the Python loop's (``n`` calls,
  ``4n`` rows) and the float64 solve against every step's input, without a warning.
  (Until 2026-12-06 the fori_loop's calls stayed inside: a warning, and ``update`` raised.)"""
  from flax import nnx

  n, x = 3, jax.random.normal(jax.random.key(1), (4, 5), jnp.float64)

  class Refine(nnx.Module):
    def __init__(self, rngs):
      self.block = nnx.Linear(5, 5, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x, loop):
      step = lambda h, block=self.block: h + jnp.tanh(block(h))
      if loop == "fori_loop":
        return jax.lax.fori_loop(0, n, lambda i, h: step(h), x)
      if loop == "nnx.fori_loop":  # the module in the carry, as nnx.fori_loop's docs write it
        return nnx.fori_loop(0, n, lambda i, c: (c[0], step(c[1], c[0])), (self.block, x))[1]
      if loop == "scan":
        return jax.lax.scan(lambda h, _: (step(h), None), x, None, length=n)[0]
      for _ in range(n):
        x = step(x)
      return x

  def one_update(loop):
    model = Refine(nnx.Rngs(0))
    loss = sngd_jax.capture_nnx(lambda m: jnp.sum(jnp.sin(m(x, loop))))
    (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    params = nnx.state(model, nnx.Param)
    tx = sngd_jax.sngd(**ref.one_step_kwargs())
    return model, grads, acts, lambda: tx.update(grads, tx.init(params), params, activations=acts)

  with no_sngd_warnings():
    model, grads, acts, update = one_update(loop)
  assert [c.inputs.shape for c in acts["block"]] == [(n, 4, 5)]
  updates, state = update()
  updates = nnx.to_pure_dict(updates)
  _, _, _, unrolled = one_update("python")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), updates,
               nnx.to_pure_dict(unrolled()[0]))
  w, b = np.asarray(model.block.kernel[...]), np.asarray(model.block.bias[...])
  h, rows = np.asarray(x), []
  for _ in range(n):
    rows.append(h)
    h = h + np.tanh(h @ w + b)
  ref.assert_factor(state, "block", np.concatenate(rows))  # E[x~ x~^T] over the 4n rows
  ref.assert_dense_update(np.concatenate(rows), nnx.to_pure_dict(grads)["block"],
                          updates["block"], loop)


# --- an inner jit: not captured, named, with the rewrite ----------------------------------
# (layers under cond/switch, jax's and the lifted ones, are modelled: tests/test_cond.py)

_NOT_CAPTURED = r"layer {} was called inside a JAX transform whose values cannot leave it.*{}"


class LinenCond(nn.Module):
  """``nn.cond`` between two sub-blocks, ``nn.switch`` among three, or ``nn.jit`` on one."""

  kind: str

  def setup(self):
    self.ls = [nn.Dense(D) for _ in range(3)]
    self.jitted = nn.jit(nn.Dense)(D)
    self.head = nn.Dense(2)

  def __call__(self, x, i):
    fns = [lambda m, h, k=k: m.ls[k](h) for k in range(3)]
    if self.is_initializing():
      for f in fns:
        f(self, x)
      return self.head(self.jitted(x))
    if self.kind == "nn.cond":
      h = nn.cond(i == 0, fns[0], fns[1], self, x)
    elif self.kind == "nn.switch":
      h = nn.switch(i, fns, self, x)
    else:
      h = self.jitted(x)
    return self.head(h)


@pytest.mark.parametrize("kind,rewrite", [
    ("nn.jit", r"Jit the whole training step instead of a part")])
def test_linen_jit_layers_are_named_not_captured(kind, rewrite):
  """Linen's ``nn.jit``: each layer inside is named in a warning with the rewrite (jit the
  whole step, which the warning did not say until 2026-12-06), left out of the activations,
  and ``update`` raises naming it. (``nn.cond``/``nn.switch`` were reported so until
  2026-12-06; their layers are modelled now: tests/test_cond.py.)"""
  x = jnp.ones((BATCH, D))
  model = LinenCond(kind)
  params = model.init(jax.random.key(0), x, 1)["params"]
  loss = lambda p: jnp.sum(model.apply({"params": p}, x, 1))
  inside = {"nn.cond": ["ls_0", "ls_1"], "nn.switch": ["ls_0", "ls_1", "ls_2"],
            "nn.jit": ["jitted"]}[kind]
  with pytest.warns(UserWarning) as caught:
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  messages = [str(w.message) for w in caught if str(w.message).startswith("sngd:")]
  assert len(messages) == len(inside), messages
  for path, message in zip(inside, messages, strict=True):
    assert re.search(_NOT_CAPTURED.format(repr(path), rewrite), message), message
  assert set(acts) == {"head"}
  uncalled = {p: None for p in ("ls_0", "ls_1", "ls_2", "jitted") if p not in inside}
  tx = sngd_jax.sngd(fisher=uncalled)
  with pytest.raises(ValueError, match=f"no activations were captured for layer '{inside[0]}'"):
    tx.update(grads, tx.init(params), params, activations=acts)


class NNXJit(nnx.Module):
  """A block run by an ``nnx.jit`` inside the model's call: a jitted function of the block
  (``function``), one in tree mode (``graph=False``, ``tree``), or a jitted method
  (``method``); ``plain`` calls the block without a jit (the reference)."""

  def __init__(self, rngs, how):
    self.block = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
    self.bn = nnx.BatchNorm(D, use_scale=False, use_bias=False, rngs=rngs,
                            param_dtype=jnp.float64)
    self.head = nnx.Linear(D, 2, rngs=rngs, param_dtype=jnp.float64)
    self.how = how

  @nnx.jit
  def jitted(self, h):
    return jnp.tanh(self.bn(self.block(h)))

  def __call__(self, x):
    inner = lambda block, bn, h: jnp.tanh(bn(block(h)))
    if self.how == "method":
      h = self.jitted(x)
    elif self.how == "plain":
      h = inner(self.block, self.bn, x)
    else:
      h = nnx.jit(inner, graph=self.how == "function")(self.block, self.bn, x)
    return self.head(h)


@pytest.mark.parametrize("how", ["function", "tree", "method"])
@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # float32 stats
def test_layers_under_nnx_jit_inside_the_captured_function_are_captured(how, x64):
  """An ``nnx.jit`` inside the captured function (a jitted function of a submodule, in graph
  or tree mode, or a jitted method) runs inline while capturing: its layers are the model's
  own, captured by path without a warning, and each layer's update is the float64 damped
  solve against its rows and that of the model without the jit (until 2026-12-06 the block's
  calls stayed inside the jit: a warning naming a ``Linear (weight (4, 4))``, and ``update``
  raised that no activations were captured for 'block'). The BatchNorm in the jit updates its
  running mean on the model, as the jit copied it back: ``0.01`` times the batch mean (its
  momentum is 0.99; NNX keeps it in float32)."""
  x = jax.random.normal(jax.random.key(1), (BATCH, D), jnp.float64)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())

  def one_update(how):
    model = NNXJit(nnx.Rngs(0), how)
    loss = sngd_jax.capture_nnx(lambda m: jnp.sum(jnp.sin(m(x))))
    with no_sngd_warnings():
      (_, acts), grads = nnx.jit(lambda m: nnx.value_and_grad(loss, has_aux=True)(m))(model)
    params = nnx.state(model, nnx.Param)
    updates = tx.update(grads, tx.init(params), params, activations=acts)[0]
    return model, acts, nnx.to_pure_dict(grads), nnx.to_pure_dict(updates)

  model, acts, grads, updates = one_update(how)
  assert set(acts) == {"block", "head"}
  w, b = np.asarray(model.block.kernel[...]), np.asarray(model.block.bias[...])
  z = np.asarray(x) @ w + b
  ref.assert_dense_update(np.asarray(x), grads["block"], updates["block"], "block")
  h = np.tanh((z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5))
  ref.assert_dense_update(h, grads["head"], updates["head"], "head")
  np.testing.assert_allclose(np.asarray(model.bn.mean[...]), 0.01 * z.mean(0), rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13),
               updates, one_update("plain")[3])


class _Steps(nnx.Variable):
  """A counter the jitted function increments: a state update that is not a statistic."""


class _Counted(nnx.Module):
  def __init__(self, rngs):
    self.block = nnx.Linear(D, D, rngs=rngs, param_dtype=jnp.float64)
    self.bn = nnx.BatchNorm(D, use_scale=False, use_bias=False, rngs=rngs,
                            param_dtype=jnp.float64)
    self.head = nnx.Linear(D, 2, rngs=rngs, param_dtype=jnp.float64)
    self.steps = _Steps(jnp.zeros((), jnp.int32))


@nnx.jit(static_argnums=(2,), donate_argnums=(0,))
def _counted_body(m, x, activation):
  m.steps[...] = m.steps[...] + 1
  return m.head(getattr(jnp, activation)(m.bn(m.block(x))))


@pytest.mark.filterwarnings("ignore:scatter inputs have incompatible types")  # float32 stats
def test_an_inline_nnx_jit_applies_its_state_updates_once_per_call(x64):
  """An ``nnx.jit`` with ``static_argnums`` and ``donate_argnums`` whose function increments an
  ``nnx.Variable`` counter and updates a BatchNorm's running mean, called once per loss inside
  an outer ``nnx.jit`` step: with the loss captured (the function run inline) the model after
  3 steps is the uncaptured model's, bit for bit (counter 3, running mean
  ``(1 - 0.99^3) z.mean(0)`` for the same batch ``z`` each step, float32 stats, checked to
  1e-6 against numpy), and the layers under the jit are captured."""
  x = jax.random.normal(jax.random.key(1), (BATCH, D), jnp.float64)
  loss = lambda m: jnp.sum(jnp.sin(_counted_body(m, x, "tanh")))

  def run(captured):
    model = _Counted(nnx.Rngs(0))
    f = sngd_jax.capture_nnx(loss) if captured else loss
    step = nnx.jit(lambda m: nnx.value_and_grad(f, has_aux=captured)(m))
    with no_sngd_warnings():
      for _ in range(3):
        out = step(model)
    return model, out

  plain, _ = run(False)
  model, ((_, acts), _) = run(True)
  assert set(acts) == {"block", "head"}
  assert int(model.steps[...]) == int(plain.steps[...]) == 3
  np.testing.assert_array_equal(np.asarray(model.bn.mean[...]), np.asarray(plain.bn.mean[...]))
  z = np.asarray(x) @ np.asarray(model.block.kernel[...]) + np.asarray(model.block.bias[...])
  np.testing.assert_allclose(np.asarray(model.bn.mean[...]), (1 - 0.99**3) * z.mean(0),
                             rtol=1e-6)


def test_layer_under_an_nnx_jit_with_shardings_is_named_by_path_not_captured():
  """An ``nnx.jit`` given ``in_shardings`` runs as a jit (a plain call would drop its
  constraints): its layer's records cannot leave it, and the warning names the layer by its
  path, ``'block'`` (until 2026-12-06: by class and weight shape), saying to jit the whole
  step; ``update`` raises naming it."""
  class Model(nnx.Module):
    def __init__(self, rngs):
      self.block = nnx.Linear(D, D, rngs=rngs)
      self.head = nnx.Linear(D, 2, rngs=rngs)

    def __call__(self, x):
      jitted = nnx.jit(lambda m, h: m(h), in_shardings=(None, None))
      return self.head(jitted(self.block, x))

  model = Model(nnx.Rngs(0))
  loss = sngd_jax.capture_nnx(lambda m: jnp.sum(m(jnp.ones((BATCH, D)))))
  with pytest.warns(UserWarning) as caught:
    (_, acts), grads = nnx.value_and_grad(loss, has_aux=True)(model)
  messages = [str(w.message) for w in caught if str(w.message).startswith("sngd:")]
  assert len(messages) == 1 and re.search(_NOT_CAPTURED.format(
      repr("block"), r"Jit the whole training step instead of a part"), messages[0]), messages
  assert set(acts) == {"head"}
  params = nnx.state(model, nnx.Param)
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="no activations were captured for layer 'block'"):
    tx.update(grads, tx.init(params), params, activations=acts)
