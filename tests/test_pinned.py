"""Behaviour pinned by fixtures written with an earlier version of the code.

``tests/fixtures/make_fixtures.py`` wrote them (see its docstring). Under the
JAX version that wrote a fixture the comparison is bit for bit; under another
(the minimum-versions CI job) XLA may order float32 sums differently, so it is
to float32 rounding over 20 steps.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.fixtures import make_fixtures as fx


def _check(got: dict[str, np.ndarray], fixture) -> None:
  want = {k[len("param"):]: fixture[k] for k in fixture.files if k.startswith("param")}
  assert sorted(got) == sorted(want)
  same_version = str(fixture["jax_version"]) == jax.__version__
  for k, v in want.items():
    if same_version:
      np.testing.assert_array_equal(got[k], v, err_msg=k)
    else:
      np.testing.assert_allclose(got[k], v, rtol=1e-4, atol=1e-5, err_msg=k)


def test_readme_mlp_trajectory_is_pinned():
  fixture = np.load(os.path.join(fx.HERE, "readme_mlp_trajectory.npz"))
  losses, params = fx.readme_mlp()
  if str(fixture["jax_version"]) == jax.__version__:
    np.testing.assert_array_equal(losses, fixture["losses"])
  else:
    np.testing.assert_allclose(losses, fixture["losses"], rtol=1e-4)
  assert losses[-1] < losses[0]
  _check(fx.flat(params), fixture)


def test_old_checkpoint_restores_and_continues(tmp_path):
  model, params, tx, data = fx.checkpoint_problem()
  target = {"params": params, "opt_state": tx.init(params)}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  restored = ocp.StandardCheckpointer().restore(os.path.join(fx.HERE, "checkpoint_v0"),
                                               abstract)
  assert jax.tree.structure(restored) == jax.tree.structure(target)
  params, opt_state = restored["params"], restored["opt_state"]
  assert int(opt_state[0].count) == 7
  step = fx.make_step(model, tx)
  for x, y in data[7:]:
    params, opt_state, _ = step(params, opt_state, x, y)
  _check(fx.flat(params), np.load(os.path.join(fx.HERE, "checkpoint_v0_expected.npz")))


if __name__ == "__main__":
  pytest.main([__file__])
