"""Behaviour pinned by fixtures written with an earlier version of the code.

``tests/fixtures/make_fixtures.py`` wrote them (see its docstring): a 20-step
trajectory of the README's MLP at the defaults, and an orbax checkpoint of
``chain(sngd(), sgd(momentum))`` that must restore into the current state
structure and continue identically. The current code's results are computed
in a fresh process (``make_fixtures --dump``), so that nothing an earlier test
did to this process (x64 mode, LAPACK thread counts) can change the bits.
The comparison is not bit for bit: XLA:CPU generates code for the host CPU's
vector width, so the same JAX version on another machine (CI's) sums float32
in another order (measured: 2e-7 relative on the losses, 2.5e-6 on a bias of
size 1e-3 after 20 steps; on an AMD EPYC host, 1.1e-7 absolute on a kernel
entry of 3.5e-4 in a kernel whose entries reach 0.28, so the parameters'
absolute tolerance scales with each array's largest entry: at most 1.9e-6 of it
was measured there). Under the JAX version that wrote a fixture the
tolerance is that rounding (``SAME_VERSION``); under another (the
minimum-versions CI job) XLA may also fuse differently, so it is wider
(``OTHER_VERSION``). A change of behaviour moves them far more: a 10% larger
default damping moved the losses by up to 1.2e-3 relative and failed both tests.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.fixtures import make_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def current(tmp_path_factory) -> dict[str, np.ndarray]:
  out = str(tmp_path_factory.mktemp("pinned") / "current.npz")
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  subprocess.run([sys.executable, "-m", "tests.fixtures.make_fixtures", "--dump", out],
                 cwd=ROOT, env=env, check=True, timeout=900)
  return dict(np.load(out))


# rtol, and an absolute tolerance of `scale` times the array's largest entry (at least atol).
SAME_VERSION = dict(rtol=2e-5, atol=1e-7, scale=1e-5)
OTHER_VERSION = dict(rtol=1e-4, atol=1e-5, scale=1e-4)


def _tolerance(fixture) -> dict[str, float]:
  return SAME_VERSION if str(fixture["jax_version"]) == jax.__version__ else OTHER_VERSION


def _check(got: dict[str, np.ndarray], fixture) -> None:
  want = {k[len("param"):]: fixture[k] for k in fixture.files if k.startswith("param")}
  assert sorted(got) == sorted(want)
  tol = _tolerance(fixture)
  for k, v in want.items():
    atol = max(tol["atol"], tol["scale"] * float(np.abs(v).max()))
    np.testing.assert_allclose(got[k], v, err_msg=k, rtol=tol["rtol"], atol=atol)


def _part(current: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
  return {k[len(prefix):]: v for k, v in current.items() if k.startswith(prefix)}


def test_readme_mlp_trajectory_is_pinned(current):
  fixture = np.load(os.path.join(fx.HERE, "readme_mlp_trajectory.npz"))
  losses = current["losses"]
  np.testing.assert_allclose(losses, fixture["losses"], rtol=_tolerance(fixture)["rtol"])
  assert losses[-1] < losses[0]
  _check(_part(current, "readme"), fixture)


def test_old_checkpoint_restores_and_continues(current):
  _check(_part(current, "resumed"),
         np.load(os.path.join(fx.HERE, "checkpoint_v1_expected.npz")))
