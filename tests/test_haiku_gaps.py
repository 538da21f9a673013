"""Haiku cases at the edge of capture_hk, against float64 references: hk.GRU (three dense
layers; the same cell written with three hk.Linear layers; its options: test_haiku_gru.py),
``sngd_jax.dense`` in a Haiku module, a params tree whose linen-named leaf keeps Haiku's names
unread, and layers under hk.scan / hk.fori_loop (captured as a scan)."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import exact_sngd, factors_after_one_step
from helpers_mlp import reference_update
from helpers_warnings import no_sngd_warnings

import sngd_jax

hk = pytest.importorskip("haiku")  # a guard only: CI installs the `haiku` extra

KEY = jax.random.key(0)
T, B, D, H = 5, 3, 4, 3  # steps, batch, inputs, hidden units


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


_np = ref.np64  # a float64 numpy array


def _step(loss, params, *args, fisher="linear", tx=None):
  """Grads, one update and the activations of ``capture_hk(loss)``, under jit and
  ``jax.checking_leaks`` (``tx``: the exact one-step ``sngd`` unless given)."""
  tx = tx or exact_sngd(**ref.one_step_kwargs(), fisher=fisher)

  @jax.jit
  def step(params, *args):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss), has_aux=True)(
        params, *args)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates, acts

  with jax.checking_leaks():
    return step(params, *args)


def _check(rows, g, u, name, bias=True):
  """``u`` is the damped solve of ``g`` over float64 ``rows`` (a Haiku ``w``/``b`` layer)."""
  kernel, b = ref.dense_update(rows, _np(g["w"]), _np(g["b"]) if bias else None)
  np.testing.assert_allclose(_np(u["w"]), kernel, rtol=1e-8, atol=1e-12, err_msg=name)
  if bias:
    np.testing.assert_allclose(_np(u["b"]), b, rtol=1e-8, atol=1e-12, err_msg=name)


# --- hk.GRU ----------------------------------------------------------------------------

def _gru_model(core, readout=True, unroll="dynamic_unroll"):
  """``core`` under ``hk.<unroll>``, then an hk.Linear readout of every step's state."""
  def fn(xs):  # time major (T, B, D)
    cell = core(H, name="gru")
    out, _ = getattr(hk, unroll)(cell, xs, cell.initial_state(xs.shape[1]))
    return hk.Linear(2, name="readout")(out) if readout else out
  return hk.without_apply_rng(hk.transform(fn))


def _sin_loss(model):
  return lambda p, xs: jnp.sum(jnp.sin(model.apply(p, xs)))


def _gru_params(model, xs):
  params = model.init(KEY, xs)
  params["gru"]["b"] = 0.3 * jax.random.normal(KEY, (3 * H,), jnp.float64)  # not zero
  return params


@pytest.mark.parametrize("unroll", ["dynamic_unroll", "static_unroll"])
def test_hk_gru_is_three_layers_over_the_rows_each_weight_multiplied(unroll, x64):
  """hk.GRU is three dense layers: ``gru/w_i`` (with ``b``) over x_t, ``gru/w_h[zr]``
  (``w_h[:, :2H]``) over h_{t-1}, ``gru/w_h[a]`` (``w_h[:, 2H:]``) over r_t * h_{t-1}, each
  pooled over every step. After one step each factor is the float64 Gram of the rows a numpy
  forward pass of the unrolled cell multiplies by that weight, and the update of ``w_i``,
  ``b`` and each column block of ``w_h`` is its damped solve over those rows (one training
  step: the explicit preconditioned update). No warning. Before, capture_hk warned and the
  GRU's leaves passed through (updates == gradients)."""
  model = _gru_model(hk.GRU, unroll=unroll)
  xs = jax.random.normal(KEY, (T, B, D), jnp.float64)
  params = _gru_params(model, xs)
  x_rows, h_rows, rh_rows, outs = _gru_rows(params, xs)
  with no_sngd_warnings():
    grads, updates, acts = _step(_sin_loss(model), params, xs)
  layers = ("gru/w_i", "gru/w_h[zr]", "gru/w_h[a]")
  assert set(acts) == {*layers, "readout"}
  state = factors_after_one_step(params, grads, acts)
  for layer, rows, bias in zip(layers, (x_rows, h_rows, rh_rows), (True, False, False),
                               strict=True):
    np.testing.assert_allclose(_np(state.factors[layer]), ref.gram(rows, bias), rtol=1e-10,
                               atol=1e-14, err_msg=layer)
  g, u = grads["gru"], updates["gru"]
  _check(x_rows, {"w": g["w_i"], "b": g["b"]}, {"w": u["w_i"], "b": u["b"]}, "w_i")
  for rows, cols, name in ((h_rows, slice(0, 2 * H), "zr"), (rh_rows, slice(2 * H, None), "a")):
    _check(rows, {"w": g["w_h"][:, cols]}, {"w": u["w_h"][:, cols]}, name, bias=False)
  _check(outs.reshape(-1, H), grads["readout"], updates["readout"], "readout")


def test_hk_gru_under_layer_stack_gets_each_layer_its_own_factors(x64):
  """Two hk.GRU layers made by hk.layer_stack (params stacked ``(2, ...)``), each unrolled
  over time: every one of the three layers has one factor per layer of the stack, the float64
  Gram of the rows that layer's weights multiplied (layer 1 reads layer 0's states), and the
  update of each layer's ``w_i``/``b`` and ``w_h`` column blocks is its damped solve."""
  def fn(xs):
    def one(h):
      cell = hk.GRU(H, name="gru")
      return hk.dynamic_unroll(cell, h, cell.initial_state(h.shape[1]))[0]
    return hk.Linear(2, name="readout")(hk.layer_stack(2)(one)(xs))
  model = hk.without_apply_rng(hk.transform(fn))
  xs = jax.random.normal(KEY, (T, B, H), jnp.float64)  # the stack carries (T, B, H)
  params = model.init(KEY, xs)
  (module,) = [k for k in params if k.endswith("gru")]
  params[module]["b"] = 0.3 * jax.random.normal(KEY, (2, 3 * H), jnp.float64)
  with no_sngd_warnings():
    grads, updates, acts = _step(_sin_loss(model), params, xs)
  state = factors_after_one_step(params, grads, acts)
  inputs = xs
  for layer in range(2):
    own = {"gru": {k: v[layer] for k, v in params[module].items()}}
    x_rows, h_rows, rh_rows, outs = _gru_rows(own, inputs)
    inputs = outs
    for name, rows, bias in (("w_i", x_rows, True), ("w_h[zr]", h_rows, False),
                             ("w_h[a]", rh_rows, False)):
      np.testing.assert_allclose(_np(state.factors[f"{module}/{name}"][layer]),
                                 ref.gram(rows, bias), rtol=1e-10, atol=1e-14,
                                 err_msg=f"{name} {layer}")
    g, u = (jax.tree.map(lambda a: a[layer], t[module]) for t in (grads, updates))  # noqa: B023
    _check(x_rows, {"w": g["w_i"], "b": g["b"]}, {"w": u["w_i"], "b": u["b"]}, f"w_i {layer}")
    for rows, cols in ((h_rows, slice(0, 2 * H)), (rh_rows, slice(2 * H, None))):
      _check(rows, {"w": g["w_h"][:, cols]}, {"w": u["w_h"][:, cols]}, f"w_h {layer}",
             bias=False)
  _check(inputs.reshape(-1, H), grads["readout"], updates["readout"], "readout")


@pytest.mark.parametrize("fisher", ["linear", "rfim"])
def test_hk_gru_updates_as_its_twin_of_three_linear_layers(fisher, x64):
  """The update of hk.GRU is, leaf by leaf, that of LinearGRU (the same function written with
  three hk.Linear layers) on the same weights, also with fisher='rfim' (rows weighted by
  each product's outputs, captured with outputs=True); coverage lists a row per column block
  of ``w_h`` with its own factor."""
  gru, linear = _gru_model(hk.GRU), _gru_model(LinearGRU)
  xs = jax.random.normal(KEY, (T, B, D), jnp.float64)
  params = _gru_params(gru, xs)
  tx = exact_sngd(**ref.one_step_kwargs(), fisher=fisher)

  def step(model, p):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(_sin_loss(model), outputs=True),
                                          has_aux=True)(p, xs)
    return tx.update(grads, tx.init(p), p, activations=acts)[0]

  with no_sngd_warnings():
    got, want = step(gru, params), step(linear, _as_linear_gru(params))
  for leaf, value in jax.tree_util.tree_leaves_with_path(_as_linear_gru(got)):
    np.testing.assert_allclose(_np(value), _np(dict(jax.tree_util.tree_leaves_with_path(
        want))[leaf]), rtol=1e-10, atol=1e-14, err_msg=jax.tree_util.keystr(leaf))
  report = sngd_jax.coverage(_sin_loss(gru), params, xs)
  rows = {p.path: p for p in report.params}
  assert rows["gru/w_h[..., 0:6]"].layer == "gru/w_h[zr]"
  assert rows["gru/w_h[..., 6:9]"].layer == "gru/w_h[a]"
  assert rows["gru/w_h[..., 0:6]"].fisher == rows["gru/w_h[..., 6:9]"].fisher == \
      "linear/dense 3x3"
  assert rows["gru/w_i"].fisher == "linear/dense 5x5" and not report.missing
  assert not report.pass_through


class LinearGRU(hk.RNNCore):
  """``hk.GRU``'s function with its three products as ``hk.Linear`` layers: ``input`` is
  ``(w_i, b)`` over ``x``, ``hidden_zr`` is ``w_h[:, :2H]`` over ``state``, ``hidden_a`` is
  ``w_h[:, 2H:]`` over ``r * state`` (the recipe of docs/layer-coverage.md, *Haiku*)."""

  def __init__(self, hidden_size, name=None):
    super().__init__(name=name)
    self.hidden_size = hidden_size

  def __call__(self, inputs, state):
    h = self.hidden_size
    gates_x = hk.Linear(3 * h, name="input")(inputs)
    zr = jax.nn.sigmoid(gates_x[..., :2 * h]
                        + hk.Linear(2 * h, with_bias=False, name="hidden_zr")(state))
    z, r = jnp.split(zr, 2, axis=-1)
    a = jnp.tanh(gates_x[..., 2 * h:]
                 + hk.Linear(h, with_bias=False, name="hidden_a")(r * state))
    state = (1 - z) * state + z * a
    return state, state

  def initial_state(self, batch_size):
    state = jnp.zeros([self.hidden_size])
    return state if batch_size is None else jnp.broadcast_to(state, (batch_size,
                                                                      self.hidden_size))


def _as_linear_gru(p):
  """hk.GRU's params as LinearGRU's."""
  w_i, w_h, b = p["gru"]["w_i"], p["gru"]["w_h"], p["gru"]["b"]
  return {"gru/input": {"w": w_i, "b": b}, "gru/hidden_zr": {"w": w_h[:, :2 * H]},
          "gru/hidden_a": {"w": w_h[:, 2 * H:]},
          **{k: v for k, v in p.items() if k != "gru"}}


def _gru_rows(p, xs):
  """hk.GRU over time in float64 numpy: the rows of each product (x_t; h_{t-1} for the z, r
  columns; r_t * h_{t-1} for the candidate's), every step of every sequence, and the outputs."""
  inputs, states, gated, outs = ref.haiku_gru(p["gru"]["w_i"], p["gru"]["w_h"], p["gru"]["b"],
                                              xs)
  flat = lambda rows: rows.reshape(-1, rows.shape[-1])
  return flat(inputs), flat(states), flat(gated), outs


def test_gru_written_with_linear_layers_is_hk_gru_and_is_modelled(x64):
  """LinearGRU on hk.GRU's weights computes hk.GRU (same outputs, same gradients), and under
  hk.dynamic_unroll each of its layers gets the damped solve over its own float64 rows from
  every step: x_t for (w_i, b), h_{t-1} for w_h's z, r columns, r_t * h_{t-1} for its
  candidate columns."""
  gru, linear = _gru_model(hk.GRU), _gru_model(LinearGRU)
  xs = jax.random.normal(KEY, (T, B, D), jnp.float64)
  params = gru.init(KEY, xs)
  params["gru"]["b"] = 0.3 * jax.random.normal(KEY, (3 * H,), jnp.float64)  # not zero
  mapped = _as_linear_gru(params)
  assert jax.tree.map(jnp.shape, linear.init(KEY, xs)) == jax.tree.map(jnp.shape, mapped)
  x_rows, h_rows, rh_rows, outs = _gru_rows(params, xs)
  cells = _gru_model(hk.GRU, readout=False), _gru_model(LinearGRU, readout=False)
  np.testing.assert_allclose(_np(cells[0].apply(params, xs)), outs, rtol=1e-12)
  np.testing.assert_allclose(_np(cells[1].apply(mapped, xs)), outs, rtol=1e-12)
  hk_grads = jax.grad(_sin_loss(gru))(params, xs)
  grads, updates, acts = _step(_sin_loss(linear), mapped, xs)
  for leaf, got in jax.tree_util.tree_leaves_with_path(grads):
    want = jax.tree_util.tree_leaves_with_path(_as_linear_gru(hk_grads))
    np.testing.assert_allclose(got, dict(want)[leaf], rtol=1e-10, atol=1e-14)
  assert {k: v[0].inputs.shape for k, v in acts.items()} == {
      "gru/input": (T, B, D), "gru/hidden_zr": (T, B, H), "gru/hidden_a": (T, B, H),
      "readout": (T, B, H)}
  _check(x_rows, grads["gru/input"], updates["gru/input"], "input")
  _check(h_rows, grads["gru/hidden_zr"], updates["gru/hidden_zr"], "hidden_zr", bias=False)
  _check(rh_rows, grads["gru/hidden_a"], updates["gru/hidden_a"], "hidden_a", bias=False)
  _check(outs.reshape(-1, H), grads["readout"], updates["readout"], "readout")


# --- sngd_jax.dense in a Haiku module --------------------------------------------------

class MyDense(hk.Module):
  """A hand-written dense layer: its own ``w``, ``b``, the product by ``sngd_jax.dense``."""

  def __init__(self, size, names=("w", "b"), cast=None, layout="in_out", name=None):
    super().__init__(name=name)
    self.size, self.names, self.cast, self.layout = size, names, cast, layout

  def __call__(self, x):
    shape = (x.shape[-1], self.size) if self.layout == "in_out" else (self.size, x.shape[-1])
    w = hk.get_parameter(self.names[0], shape, x.dtype, hk.initializers.TruncatedNormal())
    b = hk.get_parameter(self.names[1], (self.size,), x.dtype, hk.initializers.RandomNormal())
    if self.cast is not None:
      w, b = w.astype(self.cast), b.astype(self.cast)
    return sngd_jax.dense(x, w, b, layout=self.layout)


def _mlp(layer):
  """Two tanh layers made by ``layer(size, name)`` and an hk.Linear head."""
  def fn(x):
    h = jnp.tanh(layer(5, "first")(x))
    h = jnp.tanh(layer(4, "second")(h))
    return hk.Linear(3, name="head")(h)
  return hk.without_apply_rng(hk.transform(fn))


def test_dense_in_a_haiku_module_is_recorded_as_hk_linear(x64):
  """A Haiku module computing its product with ``sngd_jax.dense`` on its own ``w``/``b`` gets
  the damped solve over its float64 input rows, the update of hk.Linear on the same params.
  Before, capture_hk did not record the call: no activations, and ``update`` raised."""
  custom = _mlp(lambda size, name: MyDense(size, name=name))
  builtin = _mlp(lambda size, name: hk.Linear(size, name=name))
  x = jax.random.normal(KEY, (16, 6), jnp.float64)
  params = custom.init(KEY, x)
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, builtin.init(KEY, x))
  with no_sngd_warnings():
    grads, updates, acts = _step(_sin_loss(custom), params, x)
    _, linear_updates, _ = _step(_sin_loss(builtin), params, x)
  assert set(acts) == {"first", "second", "head"}
  h = _np(x)
  for name in ("first", "second", "head"):
    _check(h, grads[name], updates[name], name)
    for leaf in ("w", "b"):
      np.testing.assert_allclose(updates[name][leaf], linear_updates[name][leaf],
                                 rtol=1e-10, atol=1e-14, err_msg=f"{name}/{leaf}")
    h = np.tanh(h @ _np(params[name]["w"]) + _np(params[name]["b"]))


def test_dense_in_a_haiku_module_under_layer_stack_and_dynamic_unroll(x64):
  """Under hk.layer_stack each layer of the stack gets the solve over its own rows; a cell
  built on ``sngd_jax.dense`` under hk.dynamic_unroll pools every step's input rows."""
  def stacked(x):
    return hk.layer_stack(2)(lambda h: jnp.tanh(MyDense(4, name="block")(h)))(x)
  model = hk.without_apply_rng(hk.transform(stacked))
  x = jax.random.normal(KEY, (8, 4), jnp.float64)
  params = model.init(KEY, x)
  (path,) = params
  grads, updates, _ = _step(_sin_loss(model), params, x)
  h = _np(x)
  for i in range(2):
    leaves = lambda tree, i=i: {k: tree[path][k][i] for k in ("w", "b")}
    _check(h, leaves(grads), leaves(updates), f"layer {i}")
    h = np.tanh(h @ _np(params[path]["w"][i]) + _np(params[path]["b"][i]))

  class Cell(hk.RNNCore):
    def __call__(self, x, state):
      state = jnp.tanh(MyDense(H, name="cell")(jnp.concatenate([x, state], -1)))
      return state, state

    def initial_state(self, batch_size):
      return jnp.zeros((batch_size, H))

  def unrolled(xs):
    cell = Cell()
    return hk.dynamic_unroll(cell, xs, cell.initial_state(xs.shape[1]))[0]
  model = hk.without_apply_rng(hk.transform(unrolled))
  xs = jax.random.normal(KEY, (T, B, D), jnp.float64)
  params = model.init(KEY, xs)
  grads, updates, acts = _step(_sin_loss(model), params, xs)
  outs = _np(model.apply(params, xs))
  previous = np.concatenate([np.zeros((1, B, H)), outs[:-1]])
  rows = np.concatenate([_np(xs), previous], -1).reshape(-1, D + H)
  (path,) = acts
  _check(rows, grads[path], updates[path], path)


def test_dense_in_a_haiku_module_reads_a_cast_and_is_recorded_once_in_a_subclass():
  """A cast ``w.astype(bfloat16)`` is read as the module's ``w``, its record holds the rows
  as passed; an hk.Linear subclass whose __call__ uses ``sngd_jax.dense`` is recorded once."""
  x = jax.random.normal(KEY, (8, 6))
  model = hk.without_apply_rng(hk.transform(
      lambda x: MyDense(3, cast=jnp.bfloat16, name="low")(x)))
  params = model.init(KEY, x)
  with no_sngd_warnings():
    _, acts = sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, x)
  assert list(acts) == ["low"] and len(acts["low"]) == 1
  np.testing.assert_array_equal(acts["low"][0].inputs, x)

  class DenseLinear(hk.Linear):
    def __call__(self, x):
      w = hk.get_parameter("w", (x.shape[-1], self.output_size), x.dtype, jnp.ones)
      b = hk.get_parameter("b", (self.output_size,), x.dtype, jnp.zeros)
      return sngd_jax.dense(2 * x, w, b)
  model = hk.without_apply_rng(hk.transform(lambda x: DenseLinear(3, name="sub")(x)))
  params = model.init(KEY, x)
  with no_sngd_warnings():
    _, acts = sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, x)
  assert list(acts) == ["sub"] and len(acts["sub"]) == 1
  np.testing.assert_array_equal(acts["sub"][0].inputs, 2 * x)  # dense's input, not __call__'s


def test_dense_in_a_haiku_module_under_a_mixed_precision_policy():
  """Under ``hk.mixed_precision`` (bf16 compute, f32 params) the module reads a bf16 cast of
  its ``w``/``b`` from ``hk.get_parameter``: read as the params, the call is recorded with
  its bf16 rows, and the update is the float64 solve over them."""
  jmp = pytest.importorskip("jmp")
  policy = jmp.get_policy("params=float32,compute=bfloat16,output=float32")
  with hk.mixed_precision.push_policy(MyDense, policy):
    model = hk.without_apply_rng(hk.transform(lambda x: MyDense(3, name="low")(x)))
    x = jax.random.normal(KEY, (16, 5))
    params = model.init(KEY, x)
    assert params["low"]["w"].dtype == jnp.float32
    loss = lambda p, x: jnp.sum(jnp.sin(model.apply(p, x).astype(jnp.float32)))
    with no_sngd_warnings():
      grads, updates, acts = _step(loss, params, x)
  assert acts["low"][0].inputs.dtype == jnp.bfloat16
  np.testing.assert_array_equal(acts["low"][0].inputs, x.astype(jnp.bfloat16))
  kernel, bias = ref.dense_update(_np(acts["low"][0].inputs), _np(grads["low"]["w"]),
                                  _np(grads["low"]["b"]))
  np.testing.assert_allclose(_np(updates["low"]["w"]), kernel, rtol=2e-3, atol=1e-6)
  np.testing.assert_allclose(_np(updates["low"]["b"]), bias, rtol=2e-3, atol=1e-6)


def test_dense_in_a_haiku_module_with_rfim_is_the_per_unit_solve(x64):
  """``fisher='rfim'`` reads the outputs ``dense`` records: each layer's update is the float64
  per-unit solve over its rows weighted by ``sigmoid(z)^2`` of its outputs, and equals
  hk.Linear's on the same params."""
  custom = _mlp(lambda size, name: MyDense(size, name=name))
  builtin = _mlp(lambda size, name: hk.Linear(size, name=name))
  x = jax.random.normal(KEY, (16, 6), jnp.float64)
  params = custom.init(KEY, x)
  tx = exact_sngd(**ref.one_step_kwargs(), fisher="rfim")
  got = []
  for model in (builtin, custom):  # the custom model's grads are the ones read below
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(_sin_loss(model), outputs=True),
                                          has_aux=True)(params, x)
    got.append(tx.update(grads, tx.init(params), params, activations=acts)[0])
  got.reverse()
  h = _np(x)
  for name in ("first", "second", "head"):
    z = h @ _np(params[name]["w"]) + _np(params[name]["b"])
    kernel, bias = reference_update(h, z, _np(grads[name]["w"]), _np(grads[name]["b"]),
                                    "rfim", ref.DAMPING)
    np.testing.assert_allclose(_np(got[0][name]["w"]), kernel, rtol=1e-9, err_msg=name)
    np.testing.assert_allclose(_np(got[0][name]["b"]), bias, rtol=1e-9, err_msg=name)
    h = np.tanh(z)
  for a, b in zip(jax.tree.leaves(got[0]), jax.tree.leaves(got[1]), strict=True):
    np.testing.assert_allclose(_np(a), _np(b), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("kwargs, match", [
    ({"names": ("kernel", "bias")}, r"layer 'bad': its kernel is the param 'kernel', not 'w'; "
     r"its bias is the param 'bias', not 'b'.*Haiku dense layer.*`hk.get_parameter\('w'.*"
     r"computed without sngd_jax.dense, a param named so would still make `init` read the "
     r"params with linen's names"),
    ({"layout": "out_in"}, r"layer 'bad': it declares layout='out_in', not 'in_out'.*"
     r"Haiku dense layer"),
])
def test_dense_in_a_haiku_module_with_other_names_or_layout_raises(kwargs, match):
  model = hk.without_apply_rng(hk.transform(lambda x: MyDense(3, name="bad", **kwargs)(x)))
  x = jnp.ones((2, 4))
  params = model.init(KEY, x)
  with pytest.raises(ValueError, match=r"sngd_jax.dense: " + match):
    sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, x)


def test_dense_with_another_modules_bias_raises():
  class Inner(hk.Module):
    def __call__(self, x, b):
      w = hk.get_parameter("w", (x.shape[-1], 3), init=jnp.ones)
      return sngd_jax.dense(x, w, b)

  def fn(x):
    b = hk.get_parameter("b", (3,), init=jnp.zeros)  # the root module's
    return Inner(name="inner")(x, b)
  model = hk.without_apply_rng(hk.transform(fn))
  x = jnp.ones((2, 4))
  params = model.init(KEY, x)
  with pytest.raises(ValueError, match=r"layer 'inner': the bias is not a param of the module "
                                       r"that holds the kernel 'inner/w'.*`hk.get_parameter"):
    sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, x)


# --- a linen name in a Haiku params tree ------------------------------------------------

def test_a_linen_named_param_beside_haiku_layers_warns_naming_both():
  """``hk.get_parameter("kernel", ...)`` beside hk.Linear layers: the tree is read with
  linen's names, so ``init`` finds no Haiku layer (their w/b passed through, unsaid). Capture
  and coverage now say so, naming the leaf and the layers; without the leaf, no warning."""
  def fn(x, linen_name):
    k = hk.get_parameter(linen_name, (x.shape[-1], 3), init=jnp.ones)
    return hk.nets.MLP([4, 2])(x @ k)
  x = jnp.ones((2, 5))
  match = (r"capture_hk: the params hold the linen name\(s\) '~/kernel'.*read with linen's "
           r"names only: `init` does not find the Haiku layers recorded here "
           r"\('mlp/~/linear_0', 'mlp/~/linear_1'\).*Rename the param")
  model = hk.without_apply_rng(hk.transform(lambda x: fn(x, "kernel")))
  params = model.init(KEY, x)
  loss = lambda p, x: jnp.sum(model.apply(p, x))
  assert list(sngd_jax.discover(params)) == ["~"]  # the Haiku layers are not found
  with pytest.warns(UserWarning, match=match):
    sngd_jax.capture_hk(loss)(params, x)
  with pytest.warns(UserWarning, match=match):
    report = sngd_jax.coverage(loss, params, x)
  assert "mlp/~/linear_0/w" in report.pass_through
  model = hk.without_apply_rng(hk.transform(lambda x: fn(x, "w_in")))  # a Haiku tree
  params = model.init(KEY, x)
  with no_sngd_warnings():
    _, acts = sngd_jax.capture_hk(lambda p, x: jnp.sum(model.apply(p, x)))(params, x)
  assert set(acts) == set(sngd_jax.discover(params)) == {"mlp/~/linear_0", "mlp/~/linear_1"}


def test_update_of_haiku_params_with_no_layer_found_passes_through_not_flattened_error(x64):
  """Haiku params in which ``init`` finds no layer, while ``capture_hk``'s activations name the
  Haiku layers: every layer left out with ``fisher={path: None}``, ``sngd`` masked to the
  biases, or the Haiku layers unread beside a linen-named leaf that is itself left out.
  ``update`` raised "the params are a flattened dict (key 'mlp/~/linear_0', as
  `flax.traverse_util.flatten_dict` makes)": a Haiku module's name holds ``/``. Now every
  gradient passes through unchanged (float64, exactly), as for any layer left out; the mixed
  tree's signal is capture_hk's warning, which names the linen leaf."""
  def fn(x, linen_kernel):
    if linen_kernel:
      x = x @ hk.get_parameter("kernel", (x.shape[-1], 3), init=jnp.ones)
    return hk.nets.MLP([4, 2])(x)
  x = jax.random.normal(KEY, (6, 5), jnp.float64)
  layers = {"mlp/~/linear_0": None, "mlp/~/linear_1": None}
  biases = lambda p: {k: {n: n == "b" for n in v} for k, v in p.items()}
  cases = [(False, sngd_jax.sngd(fisher=layers), None),
           (False, optax.masked(sngd_jax.sngd(), biases), "sngd: found no layer"),
           (True, sngd_jax.sngd(fisher={"~": None}), None)]
  for linen_kernel, tx, init_warning in cases:
    model = hk.without_apply_rng(hk.transform(lambda x, k=linen_kernel: fn(x, k)))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(KEY, x))
    loss = sngd_jax.capture_hk(lambda p, x, m=model: jnp.sum(jnp.sin(m.apply(p, x))))
    if linen_kernel:
      with pytest.warns(UserWarning, match=r"capture_hk: the params hold the linen name\(s\) "
                                           r"'~/kernel'"):
        (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    else:
      (_, acts), grads = jax.value_and_grad(loss, has_aux=True)(params, x)
    assert set(acts) == {"mlp/~/linear_0", "mlp/~/linear_1"}
    if init_warning:
      with pytest.warns(UserWarning, match=init_warning):
        state = tx.init(params)
    else:
      with no_sngd_warnings():
        state = tx.init(params)
    with no_sngd_warnings():
      updates, _ = tx.update(grads, state, params, activations=acts)
    for (path, u), g in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                            jax.tree.leaves(grads), strict=True):
      assert u.dtype == jnp.float64
      np.testing.assert_array_equal(_np(u), _np(g), err_msg=jax.tree_util.keystr(path))


def test_coverage_of_a_linen_model_with_a_raw_param_named_w_stays_linen():
  """With `haiku` imported, a linen model whose own raw param is named like a Haiku kernel
  (`self.param("w", (4, 4))`, used as `x @ w`) beside its `nn.Dense` layers is a linen
  model: coverage captures it with `capture`, so its Dense layers are covered, their factors
  (what `capture` records) in the report; not routed to `capture_hk`, under which every Dense
  was reported missing (no calls captured)."""
  import flax.linen as nn  # noqa: PLC0415

  class Raw(nn.Module):
    @nn.compact
    def __call__(self, x):
      return x @ self.param("w", nn.initializers.lecun_normal(), (x.shape[-1],) * 2)

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(2)(Raw()(nn.Dense(4)(x)))

  x = jnp.ones((3, 5))
  model = Net()
  params = model.init(KEY, x)["params"]
  with no_sngd_warnings():
    report = sngd_jax.coverage(lambda p, x: jnp.sum(model.apply({"params": p}, x)), params, x)
  assert not report.missing, report
  fishers = {p.path: p.fisher for p in report.params}
  assert fishers["Dense_0/kernel"].startswith("linear/dense"), fishers
  assert fishers["Dense_1/kernel"].startswith("linear/dense"), fishers
  assert fishers["Raw_0/w"] == "pass-through", fishers


# --- hk.scan, hk.fori_loop --------------------------------------------------------------

def _recurrent(loop):
  """A weight-tied hk.Linear applied ``T`` times to a carry, then summed: by ``loop``."""
  def fn(x):
    linear = hk.Linear(D, name="tied")
    return loop(lambda h: jnp.tanh(linear(h)), x)
  return hk.without_apply_rng(hk.transform(fn))


def _unrolled(body, h):
  for _ in range(T):
    h = body(h)
  return h


def _scanned(body, h):
  return hk.scan(lambda h, _: (body(h), None), h, None, length=T)[0]


def _fori(body, h):
  return hk.fori_loop(0, T, lambda _, h: body(h), h)


@pytest.mark.parametrize("loop", [_scanned, _fori], ids=["hk.scan", "hk.fori_loop"])
def test_a_layer_under_hk_scan_or_fori_loop_is_pooled_over_its_steps_as_unrolled(loop, x64):
  """hk.scan runs on jax.lax.scan, and hk.fori_loop of static bounds on jax.lax.fori_loop,
  captured as JAX runs it, a scan (until 2026-12-06 it warned and was not captured): a layer
  called in the body gets one local Fisher over every step's rows, the update of the same
  layer called in a Python loop, and the float64 solve."""
  x = jax.random.normal(KEY, (B, D), jnp.float64)
  scanned, unrolled = _recurrent(loop), _recurrent(_unrolled)
  params = scanned.init(KEY, x)
  with no_sngd_warnings():
    grads, updates, acts = _step(_sin_loss(scanned), params, x)
    _, unrolled_updates, unrolled_acts = _step(_sin_loss(unrolled), params, x)
  assert acts["tied"][0].inputs.shape == (T, B, D) and len(unrolled_acts["tied"]) == T
  rows, h = [], _np(x)
  for _ in range(T):
    rows.append(h)
    h = np.tanh(h @ _np(params["tied"]["w"]) + _np(params["tied"]["b"]))
  _check(np.concatenate(rows), grads["tied"], updates["tied"], "tied")
  for leaf in ("w", "b"):
    np.testing.assert_allclose(updates["tied"][leaf], unrolled_updates["tied"][leaf],
                               rtol=1e-10, atol=1e-14, err_msg=leaf)
