"""Data-parallel SNGD on 8 host CPU devices: jit + NamedSharding, shard_map, pmap.

The multi-device tests need ``XLA_FLAGS=--xla_force_host_platform_device_count=8``
set before JAX is imported, which must not leak into the rest of the suite
(other tests assume the default single device). So in a normal (1-device)
session ``test_on_8_forced_devices`` runs this file again in a subprocess with
the flag set, and fails if any test there fails or is skipped; the
multi-device tests themselves are skipped in the 1-device session. Run them
directly with::

  PJRT_NPROC=64 XLA_FLAGS=--xla_force_host_platform_device_count=8 \
    python -m pytest -q tests/test_sharding.py

(``PJRT_NPROC``: a larger XLA:CPU thread pool, see ``tests/forced_devices.py``.)
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference
import numpy as np
import optax
import pytest
from forced_devices import NUM_DEVICES, run_on_forced_devices
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sngd_jax
from sngd_jax import Captured
from sngd_jax._src import distributed, statistics
from sngd_jax._src.inverse import sharded

multi = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices: run in a subprocess by test_on_8_forced_devices")


def test_on_8_forced_devices(tmp_path):
  if jax.device_count() >= NUM_DEVICES:
    pytest.skip("this session already has 8 devices; the tests below run directly")
  summary = run_on_forced_devices(__file__, ["-m", "not slow"], timeout=900, log_dir=tmp_path)
  # Only this runner may skip there; every multi-device test must have run.
  assert re.search(r"\d+ passed, 1 skipped", summary), summary


# ---------------------------------------------------------------- helpers


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(16)(x))
    x = nn.relu(nn.Dense(16)(x))
    return nn.Dense(4)(x)


MODEL = MLP()
STEPS, BATCH, FEATURES = 20, 64, 6
FISHER = {"Dense_1": "rfim"}  # one per-unit layer: groups of 16 blocks of size 17


@functools.lru_cache(maxsize=None)
def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(STEPS, BATCH, FEATURES)).astype(np.float32)
  y = rng.integers(0, 4, size=(STEPS, BATCH))
  params = MODEL.init(jax.random.key(0), x[0])["params"]
  return x, y, params


def _loss(params, x, y):
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _optimizer(**kwargs):
  return sngd_jax.sngd_momentum(0.05, momentum=0.9, fisher=FISHER, inverse_every=5, **kwargs)


def _onehot_loss(params, x, y):
  """``_loss`` with one-hot labels (an explicit mesh refuses the integer labels' gather)."""
  logits = MODEL.apply({"params": params}, x)
  return optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, logits.shape[-1])).mean()


def _train(tx, step_wrapper=None, put=None, axis_name=None, loss=_loss, batches=None):
  """20 steps; returns (params, state). ``put(tree, batch)`` places arrays; ``batches``:
  the ``(xs, ys)`` stacked over steps (default: ``_data()``'s)."""
  put = put or (lambda tree, batch: tree)
  xs, ys, params = _data()
  xs, ys = batches or (xs, ys)

  def step(params, state, x, y):
    loss_fn = loss
    if axis_name is not None:
      # Under shard_map the loss is the global batch mean, so its gradient is too.
      loss_fn = lambda *a: jax.lax.pmean(_loss(*a), axis_name)
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  step = jax.jit(step_wrapper(step) if step_wrapper else step)
  params, state = put(params, False), put(tx.init(params), False)
  for t in range(len(xs)):
    params, state = step(params, state, put(xs[t], True), put(ys[t], True))
  return params, state


@functools.lru_cache(maxsize=None)
def _one_device_run():
  return _train(_optimizer())


def _max_abs_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(u, np.float64) - np.asarray(v, np.float64))))
             for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def _placer(mesh):
  def put(tree, batch):
    return jax.device_put(tree, NamedSharding(mesh, P("data") if batch else P()))
  return put


def _check_same_training(params, state):
  params1, state1 = _one_device_run()
  _, _, params0 = _data()
  assert _max_abs_diff(params1, params0) > 1e-2  # training moved the parameters
  assert int(state[0].count) == STEPS and bool(state[0].has_inverse)
  assert _max_abs_diff(params, params1) < 1e-5
  for path in state1[0].factors:  # factors relative to their scale
    scale = float(jnp.max(jnp.abs(state1[0].factors[path])))
    assert _max_abs_diff(state[0].factors[path], state1[0].factors[path]) < 1e-5 * scale


# ---------------------------------------------------------------- statistics


def _layer_problem(seed=0, n=BATCH, sizes=((5, 3, "linear"), (5, 6, "rfim"), (12, 2, "linear"))):
  """Params and captured activations of three dense layers, without a model."""
  rng = np.random.default_rng(seed)
  params, acts = {}, {}
  for i, (d_in, d_out, _) in enumerate(sizes):
    params[f"L{i}"] = {"kernel": jnp.asarray(rng.normal(size=(d_in, d_out)), jnp.float32),
                       "bias": jnp.zeros((d_out,), jnp.float32)}
    x = rng.normal(size=(n, d_in)).astype(np.float32)
    z = (x @ np.asarray(params[f"L{i}"]["kernel"])).astype(np.float32)
    acts[f"L{i}"] = (Captured(inputs=jnp.asarray(x), outputs=jnp.asarray(z)),)
  fisher = {f"L{i}": kind for i, (_, _, kind) in enumerate(sizes)}
  return params, acts, fisher


def _reference_factor(call, kind):
  """float64 local Fisher of the whole batch."""
  x = np.asarray(call.inputs, np.float64)
  x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
  if kind == "rfim":
    s = 1.0 / (1.0 + np.exp(-np.asarray(call.outputs, np.float64)))
    return np.einsum("nj,na,nb->jab", s ** 2, x, x) / x.shape[0]
  return x.T @ x / x.shape[0]


def _batch_spec(tree):
  return jax.tree.map(lambda _: P("data"), tree)


@multi
@pytest.mark.parametrize("mode", ["jit_auto", "jit_explicit", "shard_map", "pmap"])
def test_local_statistics_are_those_of_the_global_batch(mode):
  params, acts, fisher = _layer_problem()
  grads = jax.tree.map(jnp.ones_like, params)
  kwargs = dict(fisher=fisher, decay=0.0, prior="none")
  if mode.startswith("jit"):
    axis_type = AxisType.Auto if mode == "jit_auto" else AxisType.Explicit
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
    put = _placer(mesh)
    tx = sngd_jax.sngd(**kwargs)
    state = jax.jit(lambda g, s, a: tx.update(g, s, activations=a)[1])(
        put(grads, False), put(tx.init(params), False), put(acts, True))
    factors = state.factors
  elif mode == "shard_map":
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
    put = _placer(mesh)
    tx = sngd_jax.sngd(axis_name="data", **kwargs)
    fn = jax.shard_map(lambda g, s, a: tx.update(g, s, activations=a)[1], mesh=mesh,
                       in_specs=(P(), P(), _batch_spec(acts)), out_specs=P())
    factors = jax.jit(fn)(put(grads, False), put(tx.init(params), False), put(acts, True)).factors
  else:
    tx = sngd_jax.sngd(axis_name="data", **kwargs)
    shards = jax.tree.map(lambda a: a.reshape((NUM_DEVICES, -1) + a.shape[1:]), acts)
    rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (NUM_DEVICES,) + a.shape), t)
    out = jax.pmap(lambda g, s, a: tx.update(g, s, activations=a)[1], axis_name="data")(
        rep(grads), rep(tx.init(params)), shards)
    for leaf in jax.tree.leaves(out.factors):  # identical on every device
      np.testing.assert_array_equal(np.asarray(leaf[0]), np.asarray(leaf[-1]))
    factors = jax.tree.map(lambda a: a[0], out.factors)
  for path, kind in fisher.items():
    ref = _reference_factor(acts[path][0], kind)
    np.testing.assert_allclose(np.asarray(factors[path], np.float64), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@multi
@pytest.mark.parametrize("mode", ["jit_auto", "jit_explicit", "shard_map"])
def test_row_mask_statistics_are_those_of_the_global_batchs_real_rows(mode):
  """``with_row_mask`` with a different number of real examples on each device: the factor
  is that of the real rows of the whole batch (``axis_name``: each device's estimate weighted
  by its real rows; under jit XLA sums the weighted rows)."""
  params, acts, fisher = _layer_problem()
  grads = jax.tree.map(jnp.ones_like, params)
  kwargs = dict(fisher=fisher, decay=0.0, prior="none")
  real = np.arange(BATCH) % 8 < np.arange(BATCH) // 8 % 8  # 0..7 real rows per shard of 8
  acts = sngd_jax.with_row_mask(acts, jnp.asarray(real))
  axis_type = AxisType.Auto if mode == "jit_auto" else AxisType.Explicit
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
  put = _placer(mesh)
  if mode.startswith("jit"):
    tx = sngd_jax.sngd(**kwargs)
    fn = lambda g, s, a: tx.update(g, s, activations=a)[1]
  else:
    tx = sngd_jax.sngd(axis_name="data", **kwargs)
    fn = jax.shard_map(lambda g, s, a: tx.update(g, s, activations=a)[1], mesh=mesh,
                       in_specs=(P(), P(), _batch_spec(acts)), out_specs=P())
  factors = jax.jit(fn)(put(grads, False), put(tx.init(params), False), put(acts, True)).factors
  for path, kind in fisher.items():
    call = acts[path][0]
    ref = _reference_factor(Captured(inputs=call.inputs[real], outputs=call.outputs[real]),
                            kind)
    np.testing.assert_allclose(np.asarray(factors[path], np.float64), ref,
                               rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- training


@multi
@pytest.mark.parametrize("axis_type,shard_refresh",
                         [(AxisType.Auto, False), (AxisType.Explicit, True)],
                         ids=["auto_replicated_refresh", "explicit_sharded_refresh"])
def test_jit_sharded_batch_20_steps_match_one_device(axis_type, shard_refresh):
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
  tx = _optimizer(shard_refresh=mesh if shard_refresh else False)
  params, state = _train(tx, put=_placer(mesh))
  _check_same_training(params, state)


@multi
@pytest.mark.parametrize("shard_refresh", [False, True])
def test_shard_map_20_steps_match_one_device(shard_refresh):
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  tx = _optimizer(axis_name="data", shard_refresh=shard_refresh)
  wrapper = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                    out_specs=(P(), P()))
  params, state = _train(tx, step_wrapper=wrapper, put=_placer(mesh), axis_name="data")
  _check_same_training(params, state)


@multi
@pytest.mark.parametrize("check_vma", [True, False])
def test_multisteps_under_shard_map_matches_one_device_on_the_merged_batch(check_vma):
  """``MultiSteps(sngd(axis_name=...))`` inside ``shard_map``, 2 micro-batches per step.

  Reference: one device, no ``MultiSteps``, each pair of micro-batches as one batch of 128.
  The accumulated statistics are state, replicated like the rest: before 2026-12-05 they
  were each device's own (``check_vma=True`` refused the step at trace time, in the
  accumulator's ``lax.cond``; with ``check_vma=False`` the devices' copies of the "replicated"
  state differed, and a host round trip of it mid-cycle, as a checkpoint makes, kept one
  device's and changed the run by 1e-2). The state goes through the host after every call.
  """
  xs, ys, params0 = _data()
  merged = _train_merged_reference()
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  tx = sngd_jax.MultiSteps(_optimizer(axis_name="data"), every_k_schedule=2)

  def step(params, state, x, y):
    loss_fn = lambda *a: jax.lax.pmean(_loss(*a), "data") if check_vma else _loss(*a)
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, x, y)
    if not check_vma:  # each device's gradient of its own shard (as under pmap)
      grads = jax.lax.pmean(grads, "data")
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state

  step = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                               out_specs=(P(), P()), check_vma=check_vma))
  put = _placer(mesh)
  params, state = put(params0, False), put(tx.init(params0), False)
  for t in range(STEPS):
    params, state = step(params, state, put(xs[t], True), put(ys[t], True))
    for leaf in jax.tree.leaves(state.acc_statistics):  # the devices' copies agree
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      assert all(np.array_equal(s, shards[0]) for s in shards), t
    state = put(jax.device_get(state), False)  # through the host, as a checkpoint
  assert int(state.inner_opt_state[0].count) == STEPS // 2
  assert _max_abs_diff(params, merged[0]) < 1e-5
  for path, factor in merged[1][0].factors.items():
    scale = float(jnp.max(jnp.abs(factor)))
    assert _max_abs_diff(state.inner_opt_state[0].factors[path], factor) < 1e-5 * scale


@functools.lru_cache(maxsize=None)
def _train_merged_reference():
  """One device, ``_optimizer()``, the micro-batches in pairs: 10 steps of batch 128."""
  xs, ys, _ = _data()
  return _train(_optimizer(), batches=(xs.reshape(STEPS // 2, -1, FEATURES),
                                       ys.reshape(STEPS // 2, -1)))


@multi
@pytest.mark.parametrize("layout", ["tensor_parallel", "fsdp"])
def test_explicit_mesh_with_model_sharded_params_matches_one_device(layout):
  """Params sharded over their features (a model axis: the captured inputs are sharded
  along their features) or over their inputs (FSDP), on a mesh with explicit axes: the
  bias column of X~ and W~ = [W; b^T] are joined along a sharded axis."""
  if layout == "tensor_parallel":
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    spec = lambda a: P(None, "model") if a.ndim == 2 else P("model")
  else:
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
    spec = lambda a: P("data", None) if a.ndim == 2 and a.shape[0] % NUM_DEVICES == 0 else P()

  def put(tree, batch):
    if batch:
      return jax.device_put(tree, NamedSharding(mesh, P("data")))
    if isinstance(tree, dict):  # the params
      return jax.device_put(tree, jax.tree.map(lambda a: NamedSharding(mesh, spec(a)), tree))
    return tree  # the state: as init makes it from the sharded params

  with jax.set_mesh(mesh):
    params, state = _train(_optimizer(), put=put, loss=_onehot_loss)
  _check_same_training(params, state)


def _rfim_factor(x, z):
  """float64 ``E[sigmoid(z_j)^2 x~ x~^T]`` per unit ``j`` over rows."""
  x = np.concatenate([np.asarray(x, np.float64), np.ones((x.shape[0], 1))], axis=1)
  s = 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))
  return np.einsum("nj,na,nb->jab", s ** 2, x, x) / x.shape[0]


def _norm_factor(xhat):
  """float64 ``E[[xhat_c^2, xhat_c], [xhat_c, 1]]`` per channel over rows, ``(C, 2, 2)``."""
  r = np.stack([np.asarray(xhat, np.float64), np.ones(xhat.shape)], axis=-1)
  return np.einsum("nca,ncb->cab", r, r) / r.shape[0]


# (layer, input shape, sngd kwargs, float64 factor from the captured call of the global batch)
_EXPLICIT_ROWS_CASES = {
    "conv_depthwise": (
        nn.Conv(6, (3, 3), feature_group_count=3), (16, 5, 5, 3), {},
        lambda c: np_reference.linear_factor(np_reference.conv_patches(
            c.inputs, (3, 3), (1, 1), "SAME", (1, 1), (1, 1), 3)[0])),
    "dense_general_rfim": (
        nn.DenseGeneral((2, 3), axis=(-2, -1)), (16, 3, 4, 5), {"fisher": "rfim"},
        lambda c: _rfim_factor(np.reshape(c.inputs, (48, 20)), np.reshape(c.outputs, (48, 6)))),
    "layer_norm_two_axes": (
        nn.LayerNorm(reduction_axes=(-2, -1), feature_axes=(-2, -1)), (16, 3, 4, 5), {},
        lambda c: _norm_factor(np.reshape(c.inputs, (48, 20)))),
    "stats_batch_size": (
        nn.Dense(3), (16, 5), {"stats_batch_size": 4},
        lambda c: np_reference.linear_factor(np.asarray(c.inputs)[:4])),
}


@multi
@pytest.mark.parametrize("case", list(_EXPLICIT_ROWS_CASES))
def test_explicit_mesh_statistics_of_rows_made_of_several_axes(case):
  """jit on a mesh with explicit axes, the batch sharded over 'data': the one-step factor
  of a layer whose rows or features span several axes (conv patches, a DenseGeneral's two
  input and two output axes, a LayerNorm over two axes) or of a sub-batch that does not
  split over the 8 devices equals the float64 statistic of the global batch. Before
  2026-12-05 each raised JAX's ShardingTypeError in the statistics ("This reshape is not
  supported": a reshape that merged two groups of axes of a sharded array; "slicing on
  sharded dims where out dim (4) is not divisible by mesh axes (8)"), while the same
  layers ran under automatic axes and Flax's own forward pass ran under explicit ones."""
  layer, shape, kwargs, reference = _EXPLICIT_ROWS_CASES[case]
  x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
  params = layer.init(jax.random.key(1), x)["params"]
  kwargs = dict(kwargs)
  (spec,) = sngd_jax.discover(params, kwargs.pop("fisher", "linear")).values()
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)))
  capture = sngd_jax.capture(loss, outputs=True)
  tx = sngd_jax.sngd(fisher={spec.path: spec.fisher}, decay=0.0, prior="none", **kwargs)

  def factor(params, x):
    (_, acts), grads = jax.value_and_grad(capture, has_aux=True)(params, x)
    return tx.update(grads, tx.init(params), activations=acts)[1].factors[spec.path]

  (_, acts), _ = jax.value_and_grad(capture, has_aux=True)(params, x)  # one device
  ref = reference(acts[spec.path][0])
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  with jax.set_mesh(mesh):
    got = jax.jit(factor)(jax.device_put(params, P()), jax.device_put(x, P("data")))
  assert got.shape == ref.shape
  np.testing.assert_allclose(np.asarray(got, np.float64), ref, rtol=1e-5,
                             atol=1e-5 * np.abs(ref).max())


# ---------------------------------------------------------------- state sharding


@multi
def test_state_sharding_type_unchanged_by_update_explicit_mesh():
  # As optax's sharding test: sharding-in-types of the state is the same after
  # init and after an update, eager and jitted, with params sharded over 'x'.
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(AxisType.Explicit,))
  params, acts, fisher = _layer_problem(sizes=((7, 8, "linear"), (8, 16, "rfim")))
  tx = sngd_jax.sngd(fisher=fisher, inverse_every=1)
  reference, _ = tx.update(params, tx.init(params), params, activations=acts)  # one device
  with jax.set_mesh(mesh):
    params = jax.device_put(params, jax.tree.map(
        lambda a: P(None, "x") if a.ndim == 2 else P("x"), params))
    acts = jax.device_put(acts, jax.tree.map(lambda _: P("x"), acts))
    state0 = tx.init(params)
    type0 = jax.tree.map(jax.typeof, state0)
    assert jax.tree.map(jax.typeof, jax.jit(tx.init)(params)) == type0
    _, state1 = tx.update(params, state0, params, activations=acts)
    updates, state2 = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
        params, state0, acts)
    _, state3 = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(params, state2, acts)
  for state in (state1, state2, state3):
    assert jax.tree.map(jax.typeof, state) == type0
  assert int(state3.count) == 2 and bool(state3.has_inverse)
  # Model-sharded gradients meet replicated inverses and keep their sharding.
  assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, params)
  scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(reference))
  assert _max_abs_diff(updates, reference) < 1e-5 * scale


def _run_doc_section(title, replace, checks=True):
  """Runs the ```python blocks (preludes and checks too) of a section of docs/scale-out.md,
  with each ``old -> new`` of ``replace`` made once in the code and ``np_reference`` in the
  namespace (without the page's checks unless ``checks``); returns the namespace."""
  from test_doc_snippets import ROOT, parse, run_block
  text = (ROOT / "docs" / "scale-out.md").read_text()
  start = text.index(f"## {title}\n")
  end = text.find("\n## ", start + 1)
  blocks = parse(text[start:end if end >= 0 else None], "scale-out.md")
  assert blocks, title
  for old, new in replace.items():
    hits = [b for b in blocks if old in b.code.source]
    assert len(hits) == 1 and hits[0].code.source.count(old) == 1, old
    hits[0].code.source = hits[0].code.source.replace(old, new)
  namespace = {"__name__": "__doc_snippet__", "np_reference": np_reference}
  for block in blocks:
    if not checks:
      block.check = None
    run_block(block, namespace)
  return namespace


# The recipe with mesh axis names in the initializers (nn.with_partitioning) and
# nn.get_sharding in place of the logical names and rules.
_MESH_AXES = {
    'nn.with_logical_partitioning(kernel, ("embed", "mlp"))':
        'nn.with_partitioning(kernel, (None, "model"))',
    'nn.with_logical_partitioning(zeros, ("mlp",))': 'nn.with_partitioning(zeros, ("model",))',
    'nn.with_logical_partitioning(kernel, ("mlp", "embed"))':
        'nn.with_partitioning(kernel, ("model", None))',
    'nn.with_logical_partitioning(zeros, ("embed",))': 'nn.with_partitioning(zeros, (None,))',
    'nn.with_logical_partitioning(kernel, (None, "embed"))':
        'nn.with_partitioning(kernel, (None, None))',
    'nn.with_logical_partitioning(kernel, ("embed", "vocab"))':
        'nn.with_partitioning(kernel, (None, None))',
    'metadata_params={nn.PARTITION_NAME: "layers"}': 'metadata_params={nn.PARTITION_NAME: None}',
    "shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)":
        "shardings = nn.get_sharding(abstract, mesh)",
}


@multi
@pytest.mark.parametrize("base", ["momentum", "adam", "mesh_axes"])
def test_flax_partitioning_metadata_recipe_on_a_4x2_mesh(base):
  """docs/scale-out.md's linen recipe (boxed params, ``nn.scan`` with
  ``metadata_params``, ``logical_to_mesh_sharding``, a jitted create and step with in/out
  shardings; ``mesh_axes``: mesh axis names and ``nn.get_sharding``) on a ("data", "model")
  mesh of 4 x 2: the SNGD state replicated, optax's state
  boxed and sharded like the params, and each layer's step the float64 damped solve
  ``-lr (G + damping tr(G) I)^{-1} [gW; gb^T]`` with ``G`` the global batch's ``E[x~ x~^T]``
  (for the scanned layers, layer by layer)."""
  lr, one_step = 0.03, "**np_reference.one_step_kwargs()"
  adam = f"optax.chain(sngd_jax.sngd({one_step}), optax.adam({lr}))"
  tx = adam if base == "adam" else f"sngd_jax.sngd_momentum({lr}, {one_step})"
  replace = {"sngd_jax.sngd_momentum(0.03)": tx, **(_MESH_AXES if base == "mesh_axes" else {})}
  # The page's check reads sngd_momentum's state layout and the logical names.
  ns = _run_doc_section("Flax partitioning metadata", replace, checks=base == "momentum")
  state, specs, x, y = ns["state"], ns["specs"], ns["x"], ns["y"]
  assert dict(ns["mesh"].shape) == {"data": 4, "model": 2}
  # The SNGD state: no boxes, replicated.
  assert all(s == P() for s in jax.tree.leaves(specs.opt_state[0]))
  for leaf in jax.tree.leaves(state.opt_state[0]):
    assert leaf.sharding.is_fully_replicated
  # optax's state: boxed as the params, and placed as them.
  params_specs, params_leaves = specs.params, jax.tree.leaves(state.params)
  if base == "adam":
    moments = specs.opt_state[1][0]
    base_specs, base_states = [moments.mu, moments.nu], [state.opt_state[1][0].mu,
                                                          state.opt_state[1][0].nu]
  else:
    base_specs, base_states = [specs.opt_state[2][0].trace], [state.opt_state[2][0].trace]
  for s in base_specs:
    assert s == params_specs
  for tree in base_states:
    for leaf, param in zip(jax.tree.leaves(tree), params_leaves, strict=True):
      assert leaf.sharding.is_equivalent_to(param.sharding, param.ndim)
  up = state.params["blocks"]["up"]["kernel"]
  if base == "mesh_axes":
    assert type(up) is nn.Partitioned and up.names == (None, None, "model")
  else:
    assert isinstance(up, nn.LogicallyPartitioned) and up.names == ("layers", "embed", "mlp")
  assert up.value.sharding.spec == P(None, None, "model")
  assert not up.value.sharding.is_fully_replicated
  # The numbers: one device, unboxed params, the float64 solve per layer.
  model = ns["model"]
  params0 = nn.unbox(model.init(jax.random.key(0), x)["params"])

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
  grads = jax.jit(jax.grad(loss_fn))(params0, x, y)
  # Each layer's rows by a float64 numpy forward pass of the page's Model.
  p64 = jax.tree.map(np_reference.np64, params0)
  dense = lambda h, p: h @ p["kernel"] + p["bias"]
  h = dense(np_reference.np64(x), p64["embed"])
  rows = {"embed": [np_reference.np64(x)], "blocks/up": [], "blocks/down": []}
  for i in range(3):
    block = jax.tree.map(lambda a, i=i: a[i], p64["blocks"])
    u = np.maximum(dense(h, block["up"]), 0)
    rows["blocks/up"].append(h)
    rows["blocks/down"].append(u)
    h = h + dense(u, block["down"])
  rows["head"] = [h.mean(1)]
  new = nn.unbox(state.params)
  if base == "adam":  # Adam's first step on the preconditioned gradient u: -lr u / (|u| + eps)
    expected_step = lambda pre: -lr * pre / (np.abs(pre) + 1e-8)
  else:  # the first step of the momentum trace: -lr times the solve
    expected_step = lambda pre: -lr * pre
  checked = 0
  for key in ("embed", "head", "blocks/up", "blocks/down"):
    scanned = key.startswith("blocks/")
    name = key.split("/")[-1]
    p0, g, got = ((params0["blocks"][name], grads["blocks"][name], new["blocks"][name])
                  if scanned else (params0[key], grads[key], new[key]))
    for i in range(3) if scanned else [None]:
      pick = (lambda a, i=i: np.asarray(a if i is None else a[i], np.float64))
      r = rows[key][i or 0]
      kernel, bias = np_reference.dense_update(r.reshape(-1, r.shape[-1]), pick(g["kernel"]),
                                               pick(g["bias"]))
      for leaf, pre in (("kernel", kernel), ("bias", bias)):
        step = expected_step(pre)
        np.testing.assert_allclose(pick(got[leaf]), pick(p0[leaf]) + step, rtol=0,
                                   atol=1e-4 * np.abs(step).max(), err_msg=f"{key}[{i}].{leaf}")
        checked += 1
  assert checked == 2 * (2 + 2 * 3)


@multi
@pytest.mark.parametrize("with_sngd", [True, False])
def test_flax_partitioning_recipe_on_explicit_axes_fails_in_flax_dense(with_sngd):
  """What docs/scale-out.md says of explicit axes: the recipe's step fails in Flax's
  ``nn.Dense`` (a kernel split over its contracting axis), with SNGD or plain SGD alike."""
  replace = {"(AxisType.Auto,) * 2": "(AxisType.Explicit,) * 2",
             # explicit axes also refuse the integer labels' gather
             "optax.softmax_cross_entropy_with_integer_labels(logits, y)":
                 "optax.softmax_cross_entropy(logits, jax.nn.one_hot(y, 4))"}
  if not with_sngd:
    replace.update({
        "sngd_jax.sngd_momentum(0.03)": "optax.sgd(0.03)",
        "jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(\n      state.params, x, y)":
            "(lambda out: ((out[0], None), out[1]))(\n      jax.value_and_grad(loss_fn)("
            "state.params, x, y))"})
  with pytest.raises(Exception, match="Contracting dimensions are sharded") as info:
    _run_doc_section("Flax partitioning metadata", replace, checks=False)
  assert type(info.value).__name__ == "ShardingTypeError"
  assert any(str(entry.path).endswith("flax/linen/linear.py") for entry in info.traceback)


@multi
def test_nnx_partitioned_model_and_optimizer_on_a_4x2_mesh():
  """The NNX scale-up guide's pattern (``nnx.with_partitioning`` initializers, the state
  constrained to ``nnx.get_partition_spec`` in an ``nnx.jit``-ed constructor, an
  ``nnx.Optimizer``): SNGD's leaves get ``P()``, the momentum the params' specs, and one
  step is ``-lr`` times the float64 damped solve per layer (docs/scale-out.md)."""
  from flax import nnx
  init, zeros = nnx.initializers.lecun_normal(), nnx.initializers.zeros_init()

  class DotReluDot(nnx.Module):
    def __init__(self, rngs):
      self.up = nnx.Linear(6, 16, kernel_init=nnx.with_partitioning(init, (None, "model")),
                           bias_init=nnx.with_partitioning(zeros, ("model",)), rngs=rngs)
      self.down = nnx.Linear(16, 4, kernel_init=nnx.with_partitioning(init, ("model", None)),
                             rngs=rngs)

    def __call__(self, x):
      return self.down(nnx.relu(self.up(x)))

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

  lr = 0.03
  xs, ys, _ = _data()
  x, y = jnp.asarray(xs[0]), jnp.asarray(ys[0])
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

  @nnx.jit
  def create_sharded():
    model = DotReluDot(nnx.Rngs(0))
    state = nnx.state(model)
    nnx.update(model, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
    return model

  @nnx.jit
  def train_step(model, optimizer, x, y):
    grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn), has_aux=True)
    (loss, acts), grads = grad_fn(model, x, y)
    optimizer.update(model, grads, activations=acts)
    return loss

  with jax.set_mesh(mesh):
    model = create_sharded()
    params0 = jax.tree.map(np_reference.np64, nnx.state(model, nnx.Param))
    optimizer = nnx.Optimizer(
        model, sngd_jax.sngd_momentum(lr, **np_reference.one_step_kwargs()), wrt=nnx.Param)
    specs = nnx.get_partition_spec(nnx.state(optimizer))
    train_step(model, optimizer, *jax.device_put((x, y), NamedSharding(mesh, P("data"))))
  assert model.up.kernel[...].sharding.spec == P(None, "model")
  sngd_specs = jax.tree.leaves(specs["opt_state"][0])
  assert sngd_specs and all(s == P() for s in sngd_specs)
  for leaf in jax.tree.leaves(nnx.state(optimizer)["opt_state"][0]):
    assert leaf.sharding.is_fully_replicated
  trace = specs["opt_state"][2][0]["trace"]
  assert trace["up"]["kernel"].get_value() == P(None, "model")
  assert trace["down"]["kernel"].get_value() == P("model", None)
  # One device, float64: the first layer's rows are x, the second's relu(x W1 + b1).
  hidden = np.maximum(np_reference.np64(x) @ params0["up"]["kernel"][...]
                      + params0["up"]["bias"][...], 0)
  with nnx.use_eager_sharding(False):
    reference = DotReluDot(nnx.Rngs(0))
  grads = nnx.grad(loss_fn)(reference, x, y)
  for name, rows in (("up", np_reference.np64(x)), ("down", hidden)):
    kernel, bias = np_reference.dense_update(rows, grads[name]["kernel"][...],
                                             grads[name]["bias"][...])
    for leaf, pre in (("kernel", kernel), ("bias", bias)):
      got = np_reference.np64(getattr(getattr(model, name), leaf)[...])
      want = params0[name][leaf][...] - lr * pre
      np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * lr * np.abs(pre).max(),
                                 err_msg=f"{name}.{leaf}")


@multi
@pytest.mark.parametrize("shard_refresh", [False, True])
def test_replicated_state_stays_replicated_under_jit(shard_refresh):
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
  put = _placer(mesh)
  params, acts, fisher = _layer_problem()
  tx = sngd_jax.sngd(fisher=fisher, inverse_every=1, shard_refresh=mesh if shard_refresh else False)
  state0 = put(tx.init(params), False)
  step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
  _, state1 = step(put(params, False), state0, put(acts, True))
  _, state2 = step(put(params, False), state1, put(acts, True))
  for before, after in zip(jax.tree.leaves(state0), jax.tree.leaves(state2), strict=True):
    assert after.sharding.is_equivalent_to(before.sharding, after.ndim), (before, after)
    assert after.sharding.is_fully_replicated
  assert int(state2.count) == 2


@multi
@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
def test_jitted_update_compiles_once_with_model_sharded_params(axis_type):
  # Under `jax.set_mesh` of an auto mesh, with the kernels sharded over their output axis,
  # XLA's partitioner sharded the updated per-unit factors and inverses (16, 9, 9) over 'x'
  # while `init` makes them replicated: the second call of the jitted update compiled again
  # (2 compiles in 3 calls, counted below). The update now keeps the state replicated.
  compiles = []
  listener = lambda name, *_, **__: compiles.append(name)
  mesh = jax.make_mesh((NUM_DEVICES,), ("x",), axis_types=(axis_type,))
  params, acts, fisher = _layer_problem(sizes=((7, 8, "linear"), (8, 16, "rfim")))
  tx = sngd_jax.sngd(fisher=fisher, inverse_every=1)
  ref_state = tx.init(params)
  for _ in range(3):  # one device: the reference updates (the params as the gradients)
    reference, ref_state = tx.update(params, ref_state, activations=acts)
  with jax.set_mesh(mesh):
    params = jax.device_put(params, jax.tree.map(
        lambda a: P(None, "x") if a.ndim == 2 else P("x"), params))
    acts = jax.device_put(acts, jax.tree.map(lambda _: P("x"), acts))
    state = state0 = tx.init(params)
    step = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
      for _ in range(3):
        updates, state = step(params, state, acts)
        jax.block_until_ready(state)
    finally:
      jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles.count("/jax/core/compile/backend_compile_duration") == 1, compiles
  for before, after in zip(jax.tree.leaves(state0), jax.tree.leaves(state), strict=True):
    assert after.sharding.is_fully_replicated, (before.sharding, after.sharding)
  assert int(state.count) == 3
  scale = max(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(reference))
  assert _max_abs_diff(updates, reference) < 1e-5 * scale


# ---------------------------------------------------------------- sharded refresh


def _damped_inverse_reference(factor, damping):
  g = np.asarray(factor, np.float64)
  g = 0.5 * (g + np.swapaxes(g, -1, -2))
  shift = damping * np.trace(g, axis1=-2, axis2=-1)
  return np.linalg.inv(g + shift[..., None, None] * np.eye(g.shape[-1]))


@multi
@pytest.mark.parametrize("mode", ["mesh", "set_mesh", "shard_map_2d"])
def test_sharded_refresh_gives_the_same_inverses(mode):
  # Groups of 1+5 blocks (d=6: a linear and a 5-unit rfim layer) and 2 blocks
  # (d=13): neither is a multiple of 8, so padding is exercised.
  params, acts, fisher = _layer_problem(
      sizes=((5, 3, "linear"), (5, 5, "rfim"), (12, 2, "rfim")))
  grads = jax.tree.map(jnp.ones_like, params)
  kwargs = dict(fisher=fisher, damping=1e-3, inverse_every=1)
  plain = sngd_jax.sngd(**kwargs)
  ref_updates, ref_state = jax.jit(lambda g, s, a: plain.update(g, s, activations=a))(
      grads, plain.init(params), acts)
  if mode == "mesh":
    mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
    tx = sngd_jax.sngd(shard_refresh=mesh, **kwargs)
    updates, state = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
        grads, tx.init(params), acts)
  elif mode == "set_mesh":
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    tx = sngd_jax.sngd(shard_refresh=True, **kwargs)
    with jax.set_mesh(mesh):
      updates, state = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
          grads, tx.init(params), acts)
  else:  # inside the user's shard_map over two axes, replicated inputs
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    tx = sngd_jax.sngd(shard_refresh=True, axis_name=("data", "model"), **kwargs)
    fn = jax.shard_map(lambda g, s, a: tx.update(g, s, activations=a), mesh=mesh,
                       in_specs=P(), out_specs=P())
    updates, state = jax.jit(fn)(grads, tx.init(params), acts)
  assert int(state.num_refresh_failures) == 0
  for path in fisher:
    inv, ref_inv = np.asarray(state.inverses[path]), np.asarray(ref_state.inverses[path])
    np.testing.assert_allclose(inv, ref_inv, rtol=1e-6, atol=1e-6 * np.abs(ref_inv).max())
    exact = _damped_inverse_reference(ref_state.factors[path], 1e-3).reshape(inv.shape)
    np.testing.assert_allclose(inv, exact, rtol=1e-3, atol=1e-4 * np.abs(exact).max())
  assert _max_abs_diff(updates, ref_updates) < 1e-6 * (1 + _max_abs_diff(ref_updates, grads))


@multi
@pytest.mark.parametrize("mode", ["jit_mesh", "shard_map"])
def test_sketched_layers_on_8_devices_match_one_device(mode):
  """Layers kept as Nystrom sketches (d = 13 > max_dim): the sketch of the global batch,
  and a refresh split over devices (a group of 2 sketch blocks, padded to 8)."""
  from sngd_jax import inverse as methods
  from sngd_jax._src.inverse import nystrom
  params, acts, fisher = _layer_problem(
      sizes=((12, 3, "linear"), (12, 2, "linear"), (5, 3, "linear")))
  grads = jax.tree.map(jnp.ones_like, params)
  kwargs = dict(fisher=fisher, damping=1e-3, inverse_every=1, decay=0.0, prior="none",
                inverse=methods.auto(max_dim=8, rank=4))
  plain = sngd_jax.sngd(**kwargs)
  ref_updates, ref_state = jax.jit(lambda g, s, a: plain.update(g, s, activations=a))(
      grads, plain.init(params), acts)
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  put = _placer(mesh)
  if mode == "jit_mesh":
    tx = sngd_jax.sngd(shard_refresh=mesh, **kwargs)
    updates, state = jax.jit(lambda g, s, a: tx.update(g, s, activations=a))(
        put(grads, False), put(tx.init(params), False), put(acts, True))
  else:
    tx = sngd_jax.sngd(shard_refresh=True, axis_name="data", **kwargs)
    fn = jax.shard_map(lambda g, s, a: tx.update(g, s, activations=a), mesh=mesh,
                       in_specs=(P(), P(), _batch_spec(acts)), out_specs=(P(), P()))
    updates, state = jax.jit(fn)(put(grads, False), put(tx.init(params), False),
                                 put(acts, True))
  assert int(state.num_refresh_failures) == 0
  omega = np.asarray(nystrom.test_matrix(13, 4, 0, jnp.float32), np.float64)
  for path in ("L0", "L1"):
    sk = state.factors[path]
    assert isinstance(sk, sngd_jax.Sketch) and sk.y.shape == (13, 4)
    ref = _reference_factor(acts[path][0], "linear")
    np.testing.assert_allclose(np.asarray(sk.y, np.float64), ref @ omega, rtol=1e-5,
                               atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(float(sk.trace), np.trace(ref), rtol=1e-5)
  assert state.factors["L2"].shape == (6, 6)
  assert _max_abs_diff(state.inverses, ref_state.inverses) < 1e-5
  assert _max_abs_diff(updates, ref_updates) < 1e-5 * (1 + _max_abs_diff(ref_updates, grads))


@multi
def test_split_refresh_pads_and_gathers():
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  rng = np.random.default_rng(1)
  a = rng.normal(size=(3, 4, 4))
  blocks = jnp.asarray(a @ np.swapaxes(a, 1, 2) + np.eye(4), jnp.float32)
  seen = []

  shift = jnp.asarray([0.5, 1.0, 2.0], jnp.float32)

  def refresh(local, local_shift):
    seen.append(local.shape)
    damped = local + local_shift[:, None, None] * jnp.eye(4)
    return {"inv": jnp.linalg.inv(damped)}, jnp.all(jnp.isfinite(local), axis=(1, 2))

  fn = jax.shard_map(lambda s, r: sharded.split_refresh(refresh, s, r, "data"), mesh=mesh,
                     in_specs=(P(), P()), out_specs=P())
  rep, ok = jax.jit(fn)(blocks, shift)
  assert seen == [(1, 4, 4)]  # ceil(3 / 8) block per device
  assert rep["inv"].shape == (3, 4, 4) and ok.shape == (3,) and bool(jnp.all(ok))
  damped = np.asarray(blocks, np.float64) + np.asarray(shift)[:, None, None] * np.eye(4)
  np.testing.assert_allclose(np.asarray(rep["inv"]), np.linalg.inv(damped), rtol=1e-4, atol=1e-5)


@multi
@pytest.mark.parametrize("name", ["newton_schulz", "denman_beavers"])
def test_iterative_methods_split_over_devices(name):
  """The coupled iterations under ``shard_method`` (their loop carry started as a plain
  identity, invariant over the mesh, which ``shard_map`` refused)."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  rng = np.random.default_rng(2)
  a = rng.normal(size=(5, 6, 6))
  blocks = jnp.asarray(a @ np.swapaxes(a, 1, 2) / 6 + 0.1 * np.eye(6), jnp.float32)
  shift = sngd_jax.inverse.damping_shift(blocks, 1e-2, 0.0)
  method = sngd_jax.inverse.METHODS[name]
  rep, ok = jax.jit(sngd_jax.inverse.shard_method(method, mesh=mesh).refresh)(blocks, shift)
  got = method.apply(rep, jnp.broadcast_to(jnp.eye(6, dtype=jnp.float32), (5, 6, 6)))
  damped = np.asarray(blocks, np.float64) + np.asarray(shift)[:, None, None] * np.eye(6)
  np.testing.assert_allclose(np.asarray(got), np.linalg.inv(damped), rtol=2e-3, atol=2e-3)
  assert bool(jnp.all(ok))


# ---------------------------------------------------------------- agreement


@multi
def test_nonfinite_shard_skips_the_step_on_every_device():
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  put = _placer(mesh)
  params, acts, fisher = _layer_problem()
  bad = acts["L0"][0].inputs.at[BATCH - 1, 0].set(jnp.nan)  # in the last shard only
  acts = dict(acts, L0=(Captured(inputs=bad, outputs=acts["L0"][0].outputs),))
  grads = jax.tree.map(jnp.ones_like, params)
  tx = sngd_jax.sngd(fisher=fisher, axis_name="data")
  state0 = tx.init(params)
  fn = jax.shard_map(lambda g, s, a: tx.update(g, s, activations=a), mesh=mesh,
                     in_specs=(P(), P(), _batch_spec(acts)), out_specs=(P(), P()))
  updates, state = jax.jit(fn)(put(grads, False), put(state0, False), put(acts, True))
  assert int(state.num_skipped_steps) == 1 and int(state.count) == 0
  assert not bool(state.has_inverse)
  assert _max_abs_diff(state.factors, state0.factors) == 0.0
  assert all(float(jnp.max(jnp.abs(u))) == 0.0 for u in jax.tree.leaves(updates))


@multi
def test_axis_name_is_checked_where_update_runs():
  """A wrong or unbound ``axis_name`` is named (JAX raised an empty AssertionError in
  shard_map); a step inside shard_map without it warns (each device's own statistics)."""
  mesh = jax.make_mesh((NUM_DEVICES,), ("data",))
  put = _placer(mesh)
  params, acts, fisher = _layer_problem()
  grads = jax.tree.map(jnp.ones_like, params)

  def run(axis_name, manual=True):
    tx = sngd_jax.sngd(fisher=fisher, axis_name=axis_name)
    update = lambda g, s, a: tx.update(g, s, activations=a)[1].count
    if manual:
      update = jax.shard_map(update, mesh=mesh, in_specs=(P(), P(), _batch_spec(acts)),
                             out_specs=P(), check_vma=False)
    return jax.jit(update)(put(grads, False), put(tx.init(params), False), put(acts, True))

  with pytest.raises(ValueError, match=r"`axis_name='batch'` names an axis that is not bound"
                                       r".*inside a `shard_map` or `pmap` over the axes "
                                       r"\('data',\)"):
    run("batch")
  with pytest.raises(ValueError, match=r"outside any `shard_map`/`pmap`.*leave "
                                       r"`axis_name=None`"):
    run("data", manual=False)
  with pytest.warns(UserWarning, match=r"inside a `shard_map` or `pmap` over the manual "
                                       r"axes \('data',\), but `axis_name` is not set"):
    run(None)
  assert int(run("data")) == 1


# ---------------------------------------------------------------- one device


def test_replicated_out_sharding_is_none_without_a_mesh():
  assert distributed.replicated_out_sharding(jnp.ones((4, 3))) is None


@multi
def test_fault_on_one_shard_skips_the_step_on_every_device():
  """The reliability sweep's shard_map case (``tests/test_sweep.py``), in this 8-device run:
  a 1e20 batch, a NaN activation, a 1e30 constant on device 3's shard and an Inf gradient
  are each skipped on all devices, counted once; a zero batch there is taken."""
  import test_sweep
  test_sweep.test_multi_device_fault_on_one_shard_skips_on_all()


def test_axis_helpers_are_identity_without_axis_name():
  x = jnp.arange(3.0)
  assert distributed.axis_mean(x, None) is x
  flag = jnp.array(False)
  assert distributed.all_agree(flag, None) is flag


def test_shard_refresh_without_mesh_or_axis_raises():
  params, acts, fisher = _layer_problem()
  tx = sngd_jax.sngd(fisher=fisher, shard_refresh=True)
  with pytest.raises(ValueError, match="shard_refresh=True"):
    tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), activations=acts)


@multi
def test_conv_rows_in_chunks_only_where_the_code_holds_its_batch(monkeypatch):
  """Patch rows are chunked by examples inside a manual ``shard_map`` (each device's
  own shard) but not under jit with 8 devices (a chunk of a sharded batch would sit on
  some of the devices); the conv layer's factor is the global batch's either way."""
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", 1)  # one example per chunk
  layer = nn.Conv(4, (3, 3))
  x = jax.random.normal(jax.random.key(0), (2 * NUM_DEVICES, 6, 5, 3))
  params = layer.init(jax.random.key(1), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)))
  tx = lambda **kw: sngd_jax.sngd(decay=0.0, prior="none", **kw)
  chunks = {}

  def factor(tag, **kw):
    def f(x):
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
      (spec,) = sngd_jax.discover(grads).values()
      parts = statistics.example_chunks(spec, acts[spec.path])
      chunks[tag] = None if parts is None else len(parts)
      opt = tx(**kw)
      return opt.update(grads, opt.init(params), activations=acts)[1].factors[spec.path]
    return f

  mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Explicit,))
  sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
  reference = jax.jit(factor("one device"))(jax.device_put(x, jax.devices()[0]))
  auto = jax.jit(factor("jit"))(jax.device_put(x, NamedSharding(
      jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,)), P("data"))))
  manual = jax.jit(jax.shard_map(factor("shard_map", axis_name="data"), mesh=mesh,
                                 in_specs=P("data"), out_specs=P()))(sharded)
  assert chunks == {"one device": None, "jit": None, "shard_map": 2}, chunks
  for got in (auto, manual):
    np.testing.assert_allclose(np.asarray(got), np.asarray(reference), rtol=1e-5, atol=1e-6)
