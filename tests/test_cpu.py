"""limit_lapack_threads caps SciPy's OpenBLAS (jaxlib's CPU LAPACK) and nothing else."""

import jax.numpy as jnp
import numpy as np
import pytest
import threadpoolctl

import sngd_jax


def _pools():
  return {i["filepath"]: i["num_threads"] for i in threadpoolctl.threadpool_info()
          if i["user_api"] == "blas"}


def test_caps_scipy_openblas_only_and_lapack_still_works():
  before = _pools()
  try:
    limited = sngd_jax.limit_lapack_threads(1)
    assert limited and all("scipy" in p["filepath"] for p in limited)
    after = _pools()
    for path, n in after.items():
      if any(p["filepath"] == path for p in limited):
        assert n == 1
      else:  # NumPy's own BLAS (and any other) keeps its thread count
        assert n == before.get(path, n)
    a = np.random.default_rng(0).standard_normal((50, 50))
    spd = a @ a.T + 50 * np.eye(50)
    chol = np.asarray(jnp.linalg.cholesky(jnp.asarray(spd, jnp.float32)), np.float64)
    np.testing.assert_allclose(chol @ chol.T, spd, rtol=1e-4, atol=1e-3)
  finally:  # leave the process as it was
    ctl = threadpoolctl.ThreadpoolController()
    for lib in ctl.lib_controllers:
      if lib.filepath in before:
        lib.set_num_threads(before[lib.filepath])


def test_rejects_a_thread_count_below_one():
  with pytest.raises(ValueError, match="num_threads"):
    sngd_jax.limit_lapack_threads(0)
