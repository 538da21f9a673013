"""``sngd_jax.presets.paper``: the reference configuration, against the exact references."""

import jax
import numpy as np
import optax
import pytest
from exact import exact_sngd
from helpers_mlp import dense_inputs, grads_and_acts, make_problem

import sngd_jax

FEATURES = (7, 5, 3)


pytestmark = pytest.mark.usefixtures("x64")


def _run(tx, params, loss_fn, x, y, steps):
  state = tx.init(params)
  outs = []
  for _ in range(steps):
    _, grads, acts = grads_and_acts(loss_fn, params, x, y)
    u, state = tx.update(grads, state, params, activations=acts)
    params = optax.apply_updates(params, jax.tree.map(lambda a: -0.05 * a, u))
    outs.append(u)
  return outs, state


def test_paper_preset_values():
  kw = sngd_jax.presets.paper(("Dense_0", "Dense_2"))
  assert {k: v for k, v in kw.items() if k != "fisher"} == {
      "prior": "identity", "decay": 0.995, "factor_every": 1, "inverse_every": 100,
      "inverse": "cholesky", "max_norm": None, "damping": 1e-4, "abs_damping": 0.0}
  specs = sngd_jax.discover(make_problem(features=FEATURES)[1], kw["fisher"])
  assert {p: s.fisher for p, s in specs.items()} == {
      "Dense_0": "linear", "Dense_1": "rfim", "Dense_2": "linear"}
  # Hashable and equal when built twice (the state records the configuration statically).
  assert hash(kw["fisher"]) == hash(sngd_jax.presets.paper(("Dense_2", "Dense_0"))["fisher"])


@pytest.mark.parametrize("rfim", [False, True])
def test_paper_preset_is_exact_sngd_with_identity_prior(rfim):
  """Over 5 steps the preset equals tests/exact.py's exact_sngd with the identity prior,
  exact Cholesky inverses and the same Fisher kinds: the same numbers bit for bit."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  kw = sngd_jax.presets.paper(("Dense_0", "Dense_2"), rfim=rfim)
  got, _ = _run(sngd_jax.sngd(**kw), params, loss_fn, x, y, 5)
  want, _ = _run(exact_sngd(fisher=kw["fisher"], prior="identity", inverse="cholesky",
                            inverse_every=100), params, loss_fn, x, y, 5)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(a, b)


def test_paper_preset_first_step_against_float64_reference():
  """Step 1: G = 0.995 I + 0.005 G^ (identity prior), exact damped inverse, no trust region,
  rfim on the hidden layer: the float64 reference of helpers_mlp."""
  _, params, x, y, loss_fn = make_problem(features=FEATURES)
  _, grads, acts = grads_and_acts(loss_fn, params, x, y)
  tx = sngd_jax.sngd(**sngd_jax.presets.paper(("Dense_0", "Dense_2")))
  u, _ = tx.update(grads, tx.init(params), params, activations=acts)
  xs, zs = dense_inputs(params, x, FEATURES)
  for i, fisher in enumerate(["linear", "rfim", "linear"]):
    name = f"Dense_{i}"
    gw, gb = np.asarray(grads[name]["kernel"]), np.asarray(grads[name]["bias"])
    uw, ub = _mixed_reference(xs[i], zs[i], gw, gb, fisher)
    np.testing.assert_allclose(u[name]["kernel"], uw, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(u[name]["bias"], ub, rtol=1e-9, atol=1e-14)


def _mixed_reference(xr, zr, gw, gb, fisher):
  """(G + 1e-4 tr(G) I)^{-1} g with G = 0.995 I + 0.005 G^ (per unit for rfim)."""
  n = xr.shape[0]
  xa = np.concatenate([xr, np.ones((n, 1))], axis=1)
  g = np.concatenate([gw, gb[None]], axis=0)
  d = xa.shape[1]
  eye = np.eye(d)
  def solve(gh, col):
    G = 0.995 * eye + 0.005 * gh
    return np.linalg.solve(G + 1e-4 * np.trace(G) * eye, col)
  if fisher == "linear":
    u = solve(xa.T @ xa / n, g)
  else:
    s2 = (1.0 / (1.0 + np.exp(-zr))) ** 2
    u = np.stack([solve((xa * s2[:, j:j + 1]).T @ xa / n, g[:, j]) for j in range(g.shape[1])],
                 axis=1)
  return u[:-1], u[-1]



def test_paper_without_linear_layers_warns():
  """The reference gives the first and last layers the linear Fisher; forgetting
  ``linear_layers`` gave them per-unit rfim blocks with no word."""
  with pytest.warns(UserWarning, match="without `linear_layers`"):
    sngd_jax.presets.paper()
  import warnings  # noqa: PLC0415
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    sngd_jax.presets.paper(rfim=False)
    sngd_jax.presets.paper(("Dense_0", "Dense_2"))
