"""Scientific ML: physics-informed losses, whose residual differentiates the network with
respect to its *inputs* (``jax.grad``/``jax.jacfwd``/``jax.hessian`` per collocation point
under ``jax.vmap``), a DeepONet and a Fourier-feature MLP, checked against float64 numpy.

The factor of every layer must be ``E[x~ x~^T]`` over the layer's primal inputs at the
collocation points, each point once per call of the model (docs/scientific-ml.md): the
derivative transforms add no rows (no tangents, no copies), whatever way the second
derivatives are written.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
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
              "jacrev_jacrev": _lap_rev_rev, "jacfwd_jacfwd": _lap_fwd_fwd}


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
  updates, state = tx.update(grads, tx.init(params), params, activations=acts)
  return grads, updates, acts, state


def _check_dense(rows, grads, updates, path, rtol=1e-9):
  kernel, bias = ref.dense_update(rows, grads[path]["kernel"], grads[path]["bias"])
  np.testing.assert_allclose(updates[path]["kernel"], kernel, rtol=rtol, atol=1e-12,
                             err_msg=path)
  np.testing.assert_allclose(updates[path]["bias"], bias, rtol=rtol, atol=1e-12, err_msg=path)


@pytest.mark.parametrize("name", list(LAPLACIANS))
def test_residual_through_input_derivatives_records_each_point_once(name):
  """The factor of each layer is E[x~ x~^T] over the interior and boundary points, each
  once: the layers' primal inputs, whichever transforms compute the second derivatives.
  Run under `jax.checking_leaks` (before 2026-12-05 capture's cache of stopped inputs kept
  the tracers of the derivative transforms alive past their end, which it reports)."""
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
