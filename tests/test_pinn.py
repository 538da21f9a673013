"""Scientific ML: physics-informed losses, whose residual differentiates the network with
respect to its *inputs* (``jax.grad``/``jax.jacfwd``/``jax.hessian`` per collocation point
under ``jax.vmap``), a DeepONet and a Fourier-feature MLP, checked against float64 numpy.

The factor of every layer must be ``E[x~ x~^T]`` over the layer's primal inputs at the
collocation points, each point once per call of the model (docs/scientific-ml.md): the
derivative transforms add no rows (no tangents, no copies), whatever way the second
derivatives are written.
"""

import warnings

import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

H = 6  # hidden width
N_IN, N_BD = 10, 4  # interior and boundary collocation points


def _points():
  xi = jax.random.uniform(jax.random.key(1), (N_IN, 2), jnp.float64)
  xb = jax.random.uniform(jax.random.key(2), (N_BD, 2), jnp.float64)
  return xi, xb


class MLP(nn.Module):
  """``u(x)`` for one point ``x`` of shape ``(2,)``: tanh MLP, scalar output."""

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(H, param_dtype=jnp.float64)(x))
    h = jnp.tanh(nn.Dense(H, param_dtype=jnp.float64)(h))
    return nn.Dense(1, param_dtype=jnp.float64)(h)[..., 0]


MODEL = MLP()


def _u(params, x):
  return MODEL.apply({"params": params}, x)


# Five ways to write the Laplacian of u at one point; each calls the model once.
def _lap_hessian(params, x):
  return jnp.trace(jax.hessian(_u, argnums=1)(params, x))


def _lap_fwd_rev(params, x):
  return jnp.trace(jax.jacfwd(jax.jacrev(_u, argnums=1), argnums=1)(params, x))


def _lap_rev_rev(params, x):
  return jnp.trace(jax.jacrev(jax.jacrev(_u, argnums=1), argnums=1)(params, x))


def _lap_fwd_fwd(params, x):
  return jnp.trace(jax.jacfwd(jax.jacfwd(_u, argnums=1), argnums=1)(params, x))


def _lap_hvp_vmap(params, x):
  """Forward-over-reverse Hessian-vector products, vmapped over the directions (the
  usual efficient Laplacian): the primal is computed once, the directions only batch
  the tangents."""
  grad_u = lambda x: jax.grad(_u, argnums=1)(params, x)
  hvp = lambda v: jax.jvp(grad_u, (x,), (v,))[1]
  return jnp.trace(jax.vmap(hvp)(jnp.eye(x.shape[-1], dtype=x.dtype)))


LAPLACIANS = {"hessian": _lap_hessian, "jacfwd_jacrev": _lap_fwd_rev,
              "jacrev_jacrev": _lap_rev_rev, "jacfwd_jacfwd": _lap_fwd_fwd,
              "hvp_vmap": _lap_hvp_vmap}


def _poisson_loss(laplacian):
  """Mean squared residual of ``-lap u = 1`` in the interior plus ``u = 0`` on the boundary."""
  def loss(params, xi, xb):
    residual = jax.vmap(lambda x: laplacian(params, x) + 1.0)(xi)
    boundary = jax.vmap(lambda x: _u(params, x))(xb)
    return jnp.mean(residual ** 2) + jnp.mean(boundary ** 2)
  return loss


def _np_rows(params, x):
  """Each Dense layer's input at the points ``x``, by a float64 numpy forward pass."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  r0 = np.asarray(x, np.float64)
  r1 = np.tanh(r0 @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  r2 = np.tanh(r1 @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"])
  return {"Dense_0": r0, "Dense_1": r1, "Dense_2": r2}


def _one_update(loss, params, *batch):
  tx = sngd_jax.sngd(factor_every=1, **ref.one_step_kwargs())
  step = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # nothing leaked, nothing uncaptured
    with jax.checking_leaks():
      (_, acts), grads = step(params, *batch)
  updates, state = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  return grads, updates, acts, state


def _check_dense(rows, grads, updates, path, rtol=1e-9):
  assert "bias" in grads[path], path
  ref.assert_dense_update(rows, grads[path], updates[path], path, rtol=rtol)


@pytest.mark.parametrize("name", list(LAPLACIANS))
def test_residual_through_input_derivatives_records_each_point_once(name):
  """The factor of each layer is E[x~ x~^T] over the interior and boundary points, each
  once: the layers' primal inputs, whichever transforms compute the second derivatives.
  Run under `jax.checking_leaks` (before 2026-12-05 capture's cache of stopped inputs kept
  the tracers of the derivative transforms alive past their end, which it reports; and the
  Hessian-vector products vmapped over the directions recorded every interior point once
  per direction)."""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]
  grads, updates, acts, state = _one_update(_poisson_loss(LAPLACIANS[name]), params, xi, xb)
  interior, boundary = _np_rows(params, xi), _np_rows(params, xb)
  for path in ("Dense_0", "Dense_1", "Dense_2"):
    assert sum(c.inputs.size for c in acts[path]) == (N_IN + N_BD) * interior[path].shape[1]
    _check_dense(np.concatenate([interior[path], boundary[path]]), grads, updates, path)
  # float64 params: float64 factors, inverses and updates (no silent float32 anywhere)
  assert {a.dtype for a in jax.tree.leaves((state.factors, state.inverses, updates))} == {
      jnp.dtype(jnp.float64)}


def test_coverage_counts_each_point_once():
  """`coverage` traces the loss as the step does: the same rows, the same bytes, whichever
  way the Laplacian is written (the vmapped Hessian-vector products counted 2x before)."""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]
  rows = (N_IN + N_BD) * (2 + H + H)  # inputs of Dense_0, Dense_1, Dense_2 at every point
  for name in ("hessian", "hvp_vmap"):
    report = sngd_jax.coverage(_poisson_loss(LAPLACIANS[name]), params, xi, xb)
    assert report.activation_bytes == rows * 8, name  # float64
    assert report.missing == [] and len(report.preconditioned) == 6, name


def test_each_call_of_the_model_is_rows_and_one_call_gives_u_and_its_derivatives():
  """The model evaluated once for `u` and once inside `jax.hessian` at the same point is two
  calls: the interior points count twice against the boundary's once (as the docs say).
  `jax.jacfwd(..., has_aux=True)` returns `u`, its gradient and its Hessian from one call."""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]

  def two_calls(params, xi, xb):  # -lap u + u^3 = 1
    r = jax.vmap(lambda x: _lap_hessian(params, x) - _u(params, x) ** 3 + 1.0)(xi)
    return jnp.mean(r ** 2) + jnp.mean(jax.vmap(lambda x: _u(params, x))(xb) ** 2)

  def derivatives(params, x):
    """`(u, grad u, hess u)` at `x` from one call of the model."""
    def grad_with_value(x):
      value, grad = jax.value_and_grad(_u, argnums=1)(params, x)
      return grad, (value, grad)
    hess, (value, grad) = jax.jacfwd(grad_with_value, has_aux=True)(x)
    return value, grad, hess

  def one_call(params, xi, xb):
    def residual(x):
      value, _, hess = derivatives(params, x)
      return -jnp.trace(hess) + value ** 3 - 1.0
    r = jax.vmap(residual)(xi)
    return jnp.mean(r ** 2) + jnp.mean(jax.vmap(lambda x: _u(params, x))(xb) ** 2)

  x0 = xi[0]
  value, grad, hess = derivatives(params, x0)
  np.testing.assert_allclose(value, _u(params, x0), rtol=1e-12)
  np.testing.assert_allclose(grad, jax.grad(_u, argnums=1)(params, x0), rtol=1e-12)
  np.testing.assert_allclose(hess, jax.hessian(_u, argnums=1)(params, x0), rtol=1e-12)

  interior, boundary = _np_rows(params, xi), _np_rows(params, xb)
  g2, u2, _, _ = _one_update(two_calls, params, xi, xb)
  g1, u1, _, _ = _one_update(one_call, params, xi, xb)
  for path in ("Dense_0", "Dense_1", "Dense_2"):
    twice = np.concatenate([interior[path], interior[path], boundary[path]])
    _check_dense(twice, g2, u2, path)
    _check_dense(np.concatenate([interior[path], boundary[path]]), g1, u1, path)


# --- Equinox -------------------------------------------------------------------------------

def test_equinox_pinn_float64():
  """`eqx.nn.MLP` (tanh) in float64: Laplacian by `jax.hessian` and by vmapped
  Hessian-vector products, per-example layer calls; float64 state and updates."""
  model = eqx.nn.MLP(2, "scalar", H, 2, activation=jnp.tanh, key=jax.random.key(0),
                     dtype=jnp.float64)
  xi, xb = _points()

  def hvp_laplacian(model, x):
    hvp = lambda v: jax.jvp(jax.grad(model), (x,), (v,))[1]
    return jnp.trace(jax.vmap(hvp)(jnp.eye(2, dtype=x.dtype)))

  laplacians = {"hessian": lambda model, x: jnp.trace(jax.hessian(model)(x)),
                "hvp_vmap": hvp_laplacian}
  w = [np.asarray(layer.weight, np.float64) for layer in model.layers]
  b = [np.asarray(layer.bias, np.float64) for layer in model.layers]
  x = np.concatenate([np.asarray(xi), np.asarray(xb)])
  rows = [x]
  for i in range(2):
    rows.append(np.tanh(rows[-1] @ w[i].T + b[i]))
  params = eqx.filter(model, eqx.is_inexact_array)
  tx = sngd_jax.sngd(factor_every=1, **ref.one_step_kwargs())
  for name, laplacian in laplacians.items():
    def loss(model, xi, xb, laplacian=laplacian):
      residual = jax.vmap(lambda x: laplacian(model, x) + 1.0)(xi)
      return jnp.mean(residual ** 2) + jnp.mean(jax.vmap(model)(xb) ** 2)

    with jax.checking_leaks():
      (_, acts), grads = eqx.filter_jit(eqx.filter_value_and_grad(
          sngd_jax.capture_eqx(loss), has_aux=True))(model, xi, xb)
    state = tx.init(params)
    updates, state = eqx.filter_jit(tx.update)(grads, state, params, activations=acts)
    for i in range(3):
      kernel, bias = ref.dense_update(rows[i], np.asarray(grads.layers[i].weight).T,
                                      np.asarray(grads.layers[i].bias).reshape(-1))
      np.testing.assert_allclose(np.asarray(updates.layers[i].weight).T, kernel, rtol=1e-9,
                                 atol=1e-12, err_msg=f"{name} layer {i}")
      np.testing.assert_allclose(np.asarray(updates.layers[i].bias).reshape(-1), bias,
                                 rtol=1e-9, atol=1e-12, err_msg=f"{name} layer {i}")
    leaves = jax.tree.leaves((state.factors, state.inverses, eqx.filter(updates, eqx.is_array)))
    assert {a.dtype for a in leaves} == {jnp.dtype(jnp.float64)}, name


# --- full batch with a line search ---------------------------------------------------------

def _sngd_direction(params, xi, xb, grads):
  """``-(G + rho I)^{-1} g`` per layer, G over all collocation points (float64 numpy)."""
  interior, boundary = _np_rows(params, xi), _np_rows(params, xb)
  out = {}
  for path in ("Dense_0", "Dense_1", "Dense_2"):
    rows = np.concatenate([interior[path], boundary[path]])
    kernel, bias = ref.dense_update(rows, grads[path]["kernel"], grads[path]["bias"])
    out[path] = {"kernel": -kernel, "bias": -bias}
  return out


def test_line_search_over_the_sngd_direction():
  """`optax.scale_by_backtracking_linesearch` after `sngd`: the activations go in through
  `sngd_jax.with_activations` (a plain chain hands `activations=` to the line search too,
  which refuses it); the step is the Armijo step along the SNGD direction, computed here
  from float64 numpy and the same backtracking rule."""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]
  loss = _poisson_loss(_lap_hessian)
  value_fn = jax.jit(lambda p: loss(p, xi, xb))
  sngd = sngd_jax.sngd(factor_every=1, **ref.one_step_kwargs())
  search = lambda: optax.scale_by_backtracking_linesearch(max_backtracking_steps=30)
  (value, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
      params, xi, xb)

  plain = optax.chain(sngd, optax.sgd(1.0), search())
  with pytest.raises(TypeError, match="activations"):
    plain.update(grads, plain.init(params), params, activations=acts, value=value,
                 grad=grads, value_fn=value_fn)

  tx = optax.chain(sngd_jax.with_activations(sngd, acts), optax.sgd(1.0), search())
  updates, state = jax.jit(lambda g, s: tx.update(
      g, s, params, value=value, grad=g, value_fn=value_fn))(grads, plain.init(params))

  direction = _sngd_direction(params, xi, xb, grads)
  slope = sum(np.vdot(direction[k][n], grads[k][n]) for k in direction for n in ("kernel", "bias"))
  assert slope < 0
  at = lambda step: float(value_fn(jax.tree.map(lambda p, d: p + step * d, params, direction)))
  step = 1.0  # min(increase_factor * 1.0, max_learning_rate)
  while at(step) > float(value) + 1e-4 * step * slope:  # Armijo, decrease_factor 0.8
    step *= 0.8
  assert step < 1.0  # the search did backtrack
  np.testing.assert_allclose(state[-1].learning_rate, step, rtol=1e-12)
  for k in direction:
    for n in ("kernel", "bias"):
      np.testing.assert_allclose(updates[k][n], step * direction[k][n], rtol=1e-8, atol=1e-14)


def test_zoom_line_search_over_the_sngd_direction():
  """`scale_by_zoom_linesearch` (strong Wolfe) after `sngd`, through `with_activations`:
  the update is the float64 numpy SNGD direction times the step it reports."""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]
  loss = _poisson_loss(_lap_hessian)
  value_fn = lambda p: loss(p, xi, xb)
  sngd = sngd_jax.sngd(factor_every=1, **ref.one_step_kwargs())
  zoom = lambda acts: optax.chain(sngd_jax.with_activations(sngd, acts), optax.scale(-1.0),
                                  optax.scale_by_zoom_linesearch(max_linesearch_steps=20))
  (value, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
      params, xi, xb)
  updates, state = jax.jit(lambda g, s, acts: zoom(acts).update(
      g, s, params, value=value, grad=g, value_fn=value_fn))(grads, zoom(None).init(params), acts)
  step = float(state[-1].learning_rate)
  assert step > 0
  direction = _sngd_direction(params, xi, xb, grads)
  for k in direction:
    for n in ("kernel", "bias"):
      np.testing.assert_allclose(updates[k][n], step * direction[k][n], rtol=1e-8, atol=1e-14)
  assert jax.jit(value_fn)(optax.apply_updates(params, updates)) < value


@pytest.mark.slow
def test_lbfgs_after_sngd_runs_and_lowers_the_loss():
  """`optax.lbfgs()` (L-BFGS with the zoom line search) after `sngd`, bound to the step's
  activations: full-batch steps run and lower the loss. (L-BFGS then builds its curvature
  pairs from preconditioned gradients, which is not L-BFGS in the reconstructed network.)"""
  xi, xb = _points()
  params = MODEL.init(jax.random.key(0), xi[0])["params"]
  loss = _poisson_loss(_lap_hessian)
  value_fn = lambda p: loss(p, xi, xb)
  lbfgs = lambda acts: optax.chain(sngd_jax.with_activations(sngd_jax.sngd(), acts),
                                   optax.lbfgs())

  @jax.jit
  def step_fn(params, state):
    (value, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(
        params, xi, xb)
    updates, state = lbfgs(acts).update(grads, state, params, value=value, grad=grads,
                                        value_fn=value_fn)
    return optax.apply_updates(params, updates), state, value

  state = lbfgs(None).init(params)
  values = []
  for _ in range(3):
    params, state, value = step_fn(params, state)
    values.append(float(value))
  assert all(np.isfinite(values)) and values[-1] < values[0]


# --- neural operators and Fourier features ---------------------------------------------------

class DeepONet(nn.Module):
  """Branch net on the sensor values of each input function, trunk net on the query
  points, combined by an einsum (plus a learned scalar bias, which passes through)."""

  @nn.compact
  def __call__(self, f, y):
    dense = lambda n, name: nn.Dense(n, name=name, param_dtype=jnp.float64)
    b = dense(5, "branch_out")(jnp.tanh(dense(H, "branch_in")(f)))
    t = dense(5, "trunk_out")(jnp.tanh(dense(H, "trunk_in")(y)))
    return jnp.einsum("bk,pk->bp", b, t) + self.param("b0", nn.initializers.zeros, ())


def test_deeponet_branch_rows_are_functions_and_trunk_rows_are_points():
  f = jax.random.normal(jax.random.key(0), (5, 7), jnp.float64)  # 5 functions, 7 sensors
  y = jax.random.uniform(jax.random.key(1), (9, 1), jnp.float64)  # 9 query points
  target = jax.random.normal(jax.random.key(2), (5, 9), jnp.float64)
  model = DeepONet()
  params = model.init(jax.random.key(3), f, y)["params"]
  loss = lambda p, f, y, t: jnp.mean((model.apply({"params": p}, f, y) - t) ** 2)
  grads, updates, _, _ = _one_update(loss, params, f, y, target)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  rows = {"branch_in": np.asarray(f), "trunk_in": np.asarray(y)}
  for net in ("branch", "trunk"):
    rows[f"{net}_out"] = np.tanh(rows[f"{net}_in"] @ p[f"{net}_in"]["kernel"]
                                 + p[f"{net}_in"]["bias"])
  for path, r in rows.items():
    _check_dense(r, grads, updates, path)
  np.testing.assert_array_equal(updates["b0"], grads["b0"])  # pass-through


class FourierMLP(nn.Module):
  """Random Fourier features ``[sin 2 pi B x, cos 2 pi B x]`` (B fixed, in a collection
  that is not trained) into a tanh MLP."""

  @nn.compact
  def __call__(self, x):
    init = lambda: 2.0 * jax.random.normal(jax.random.key(7), (2, 4), jnp.float64)
    b = self.variable("constants", "B", init).value
    z = 2 * jnp.pi * x @ b
    h = jnp.tanh(nn.Dense(H, param_dtype=jnp.float64)(jnp.concatenate([jnp.sin(z),
                                                                        jnp.cos(z)], -1)))
    return nn.Dense(1, param_dtype=jnp.float64)(h)[..., 0]


def test_fourier_feature_mlp_factor_is_over_the_features():
  model = FourierMLP()
  xi, _ = _points()
  variables = model.init(jax.random.key(0), xi[0])
  params, consts = variables["params"], {"constants": variables["constants"]}
  u = lambda p, x: model.apply({"params": p, **consts}, x)

  def loss(p, xi):
    lap = jax.vmap(lambda x: jnp.trace(jax.hessian(u, argnums=1)(p, x)))(xi)
    return jnp.mean((lap + 1.0) ** 2)

  grads, updates, _, _ = _one_update(loss, params, xi)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  z = 2 * np.pi * np.asarray(xi) @ np.asarray(consts["constants"]["B"])
  features = np.concatenate([np.sin(z), np.cos(z)], -1)
  _check_dense(features, grads, updates, "Dense_0")
  hidden = np.tanh(features @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"])
  _check_dense(hidden, grads, updates, "Dense_1")


class SpectralConv(nn.Module):
  """An FNO layer's complex spectral weights, here named ``kernel``."""

  @nn.compact
  def __call__(self, x):  # (batch, n, channels)
    c, modes = x.shape[-1], 3
    init = lambda key, shape: (jax.random.normal(key, shape) + 0j).astype(jnp.complex128)
    w = self.param("kernel", init, (c, c, modes))
    xf = jnp.fft.rfft(x, axis=1)[:, :modes]
    of = jnp.einsum("bmi,iom->bmo", xf, w)
    out = jnp.zeros((x.shape[0], x.shape[1] // 2 + 1, c), of.dtype).at[:, :modes].set(of)
    return jnp.fft.irfft(out, n=x.shape[1], axis=1)


class FNO(nn.Module):
  @nn.compact
  def __call__(self, a):
    h = nn.Dense(4, param_dtype=jnp.float64)(a)
    h = jax.nn.gelu(SpectralConv(name="spectral")(h) + nn.Dense(4, param_dtype=jnp.float64)(h))
    return nn.Dense(1, param_dtype=jnp.float64)(h)


def test_complex_spectral_kernel_is_refused_with_the_fix():
  """A complex ``kernel`` (an FNO's spectral weights) looks like a dense layer by its name:
  `init` names it and the `fisher` entry that passes it through; with that entry the step
  preconditions the real dense layers and passes the spectral weights' gradient on."""
  a = jax.random.normal(jax.random.key(0), (3, 8, 1), jnp.float64)
  model = FNO()
  params = model.init(jax.random.key(1), a)["params"]
  with pytest.raises(TypeError, match=r"'spectral/kernel' of layer 'spectral' has dtype "
                                      r"complex128.*fisher=\{'spectral': None\}"):
    sngd_jax.sngd().init(params)
  loss = lambda p, a: jnp.mean(model.apply({"params": p}, a) ** 2)
  tx = sngd_jax.sngd(fisher={"spectral": None}, factor_every=1, **ref.one_step_kwargs())
  (_, acts), grads = jax.jit(jax.value_and_grad(sngd_jax.capture(loss), has_aux=True))(
      params, a)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  np.testing.assert_array_equal(updates["spectral"]["kernel"], grads["spectral"]["kernel"])
  _check_dense(np.asarray(a).reshape(-1, 1), grads, updates, "Dense_0")
