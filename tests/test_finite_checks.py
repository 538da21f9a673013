"""``inverse.base.all_finite``: the same flags as ``all(isfinite(x))``, from one float reduction."""

import jax.numpy as jnp
import numpy as np
import pytest

from sngd_jax._src.inverse.base import all_finite, all_finite_per_block


@pytest.mark.parametrize("dtype", [np.float32, np.float16, jnp.bfloat16])
def test_all_finite_matches_numpy(dtype):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(8, 5, 7)).astype(np.float32) * 1e3
  specials = [np.nan, np.inf, -np.inf, float(jnp.finfo(dtype).max), -float(jnp.finfo(dtype).max),
              0.0, float(jnp.finfo(dtype).tiny) / 4]
  for k, v in enumerate(specials):  # block k gets one special value, block 7 none
    x[k, k % 5, (3 * k) % 7] = v
  xa = jnp.asarray(x, dtype)
  ref = np.isfinite(np.asarray(xa, np.float64))
  np.testing.assert_array_equal(all_finite_per_block(xa), ref.reshape(8, -1).all(axis=1))
  np.testing.assert_array_equal(all_finite(xa, axis=-1), ref.all(axis=-1))
  assert bool(all_finite(xa)) is bool(ref.all())
  assert bool(all_finite(xa[3:])) is True  # the largest finite values, subnormals: finite


def test_all_finite_empty_is_true():
  np.testing.assert_array_equal(all_finite(jnp.zeros((2, 0)), axis=1), [True, True])
  assert bool(all_finite(jnp.zeros((0,))))
