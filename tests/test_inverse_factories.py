"""The factories of sngd_jax.inverse: one method per set of arguments however they are
written (a state's tree structure holds the method), and errors for bad arguments."""

import jax.numpy as jnp
import numpy as np
import pytest

import sngd_jax
from sngd_jax import inverse as inv


def test_equal_arguments_written_differently_give_one_method():
  assert inv.nystrom(64) is inv.nystrom(rank=64)
  assert inv.nystrom() is inv.nystrom(rank=128, seed=0, tail="mean")
  assert inv.auto() is inv.auto(max_dim=512)
  assert inv.block_diagonal() is inv.block_diagonal(block_size=512)
  assert inv.newton_schulz_inverse(40) is inv.newton_schulz_inverse(num_iters=40)
  assert inv.nystrom(64) is not inv.nystrom(65)
  assert inv.nystrom(np.int64(64)) is inv.nystrom(64)  # a NumPy integer is an int here
  params = {"d": {"kernel": jnp.ones((3, 2)), "bias": jnp.ones(2)}}
  a = sngd_jax.sngd(inverse=inv.nystrom(64)).init(params)
  b = sngd_jax.sngd(inverse=inv.nystrom(rank=64)).init(params)
  import jax  # noqa: PLC0415
  assert jax.tree.structure(a) == jax.tree.structure(b)


@pytest.mark.parametrize("make,match", [
    (lambda: inv.nystrom(rank=-1), r"`rank` must be an int >= 1, got -1"),
    (lambda: inv.nystrom(rank=0), r"`rank` must be an int >= 1"),
    (lambda: inv.auto(rank=0), r"`rank` must be an int >= 1"),
    (lambda: inv.block_diagonal(0), r"`block_size` must be an int >= 1, got 0"),
    (lambda: inv.newton_schulz_inverse(num_iters=0), r"`num_iters` must be an int >= 1"),
    (lambda: inv.denman_beavers_inverse(num_iters=-1), r"`num_iters` must be an int >= 1"),
    (lambda: inv.host_refresh("auto"), r"host_refresh wraps an InverseMethod, got 'auto'"),
    (lambda: inv.xla_only("auto"), r"xla_only wraps an InverseMethod"),
    (lambda: inv.shard_method("auto"), r"shard_method wraps an InverseMethod"),
    (lambda: inv.block_diagonal(8, inner=inv.nystrom(4)), r"needs an exact inner method"),
])
def test_bad_arguments_are_named(make, match):
  with pytest.raises(ValueError, match=match):
    make()


def test_block_diagonal_pads_its_last_sub_block_exactly():
  """d = 10 in sub-blocks of 4: the last one (2 rows) is padded, and the applied inverse is
  that of each diagonal sub-block of G + rho I."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(30, 10))
  g = jnp.asarray((x.T @ x / 30)[None])
  method = inv.block_diagonal(4)
  shift = inv.damping_shift(g, 1e-2, 0.0)
  rep, ok = method.refresh(g, shift)
  v = jnp.asarray(rng.normal(size=(1, 10, 3)))
  got = np.asarray(method.apply(rep, v))[0]
  damped = np.asarray(g[0]) + float(shift[0]) * np.eye(10)
  for lo, hi in ((0, 4), (4, 8), (8, 10)):
    want = np.linalg.solve(damped[lo:hi, lo:hi], np.asarray(v[0, lo:hi]))
    np.testing.assert_allclose(got[lo:hi], want, rtol=1e-5)
  assert bool(ok[0])
