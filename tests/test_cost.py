"""Tests of the per-layer cost estimate against the real state and formulas."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sngd_jax
from sngd_jax import Captured
from sngd_jax._src import layers as layers_lib
from sngd_jax._src import statistics as factors_lib


def _params(shapes=((784, 256), (256, 256), (256, 10))):
  return {f"Dense_{i}": {"kernel": jnp.zeros(s, jnp.float32), "bias": jnp.zeros(s[1:], jnp.float32)}
          for i, s in enumerate(shapes)}


def _nbytes(tree):
  return sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree))


def test_linear_layer_costs_match_the_formulas():
  costs = sngd_jax.cost_estimate(_params(), batch_rows=128, inverse_every=100, factor_every=2,
                                 inverse="cholesky")
  c = costs["Dense_0"]
  d = 785
  assert (c.dim, c.num_blocks, c.fisher) == (d, 1, "linear")
  assert c.factor_bytes == c.inverse_bytes == d * d * 4
  assert c.state_bytes == 2 * d * d * 4
  assert c.allreduce_bytes == d * d * 4
  assert c.factor_flops == 2 * 128 * d * d
  assert c.refresh_flops == pytest.approx(d ** 3 / 3 + 3 * d ** 3)
  assert c.apply_flops == 2 * d * d * 256
  assert c.flops_per_step == pytest.approx(
      2 * 128 * d * d / 2 + (d ** 3 / 3 + 3 * d ** 3) / 100 + 2 * d * d * 256)


def test_rows_per_layer():
  """A mapping gives each layer its own rows (a conv layer's are batch x positions); a layer
  missing from it has unknown statistics flops."""
  costs = sngd_jax.cost_estimate(_params(), batch_rows={"Dense_1": 64, "Dense_2": 32},
                                 inverse="cholesky")
  assert costs["Dense_0"].factor_flops is None and costs["Dense_0"].flops_per_step is None
  assert costs["Dense_1"].factor_flops == 2 * 64 * 257 * 257
  assert costs["Dense_2"].factor_flops == 2 * 32 * 257 * 257


def test_default_rule_is_nystrom_above_512():
  """The default ``inverse="auto"``: rank-128 Nystrom for the 785-wide layer, dense below."""
  costs = sngd_jax.cost_estimate(_params(), batch_rows=128)
  d, r = 785, 128
  c = costs["Dense_0"]
  assert c.inverse_bytes == (d * r + r + 2) * 4  # U, lam, tau, rho
  # The factor is kept as its sketch (S Omega, tr S, c): no d x d matrix, no G Omega at refresh.
  assert c.factor_bytes == c.allreduce_bytes == (d * r + 2) * 4
  assert c.factor_flops == 4 * 128 * d * r + 2 * 128 * d
  assert c.refresh_flops == pytest.approx(7 * d * r * r + 10 * r ** 3)
  assert c.apply_flops == 4 * d * r * 256 + 2 * d * 256
  assert c.flops_per_step == pytest.approx(
      c.factor_flops / 5 + c.refresh_flops / 100 + c.apply_flops)
  small = costs["Dense_1"]
  assert small.dim == 257 and small.apply_flops == 2 * 257 * 257 * 256
  assert small.refresh_flops == pytest.approx(257 ** 3 / 3 + 3 * 257 ** 3)


def test_state_bytes_are_those_of_the_real_state():
  params = _params(((20, 8), (8, 6), (6, 3)))
  kwargs = dict(fisher={"Dense_1": "rfim"})
  costs = sngd_jax.cost_estimate(params, **kwargs)
  state = sngd_jax.sngd(**kwargs).init(params)
  for path, c in costs.items():
    assert c.factor_bytes == _nbytes(state.factors[path])
    assert c.inverse_bytes == _nbytes(state.inverses[path])
  assert costs["Dense_1"].num_blocks == 6 and costs["Dense_1"].factor_bytes == 6 * 9 * 9 * 4
  # The all-reduced estimate is what batch_factor returns, byte for byte.
  spec = layers_lib.discover(params, kwargs["fisher"])["Dense_1"]
  call = Captured(inputs=jnp.ones((5, 8)), outputs=jnp.ones((5, 6)))
  assert costs["Dense_1"].allreduce_bytes == _nbytes(factors_lib.batch_factor(spec, [call]))


def test_abstract_params_and_unknown_parts():
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _params())
  costs = sngd_jax.cost_estimate(params, fisher={"Dense_2": None})
  assert list(costs) == ["Dense_0", "Dense_1"]  # a layer left alone has no cost
  assert costs["Dense_0"].factor_flops is None and costs["Dense_0"].flops_per_step is None
  table = sngd_jax.format_costs(costs)
  # rank-128 sketch + Nystrom model; the 257-wide layer is exact
  assert "| Dense_0 | linear | nystrom(rank=128) | 785 x 785 x 1 | 804 KB |" in table
  assert "| Dense_1 | linear | cholesky | 257 x 257 x 1 |" in table
  assert costs["Dense_0"].method == "nystrom(rank=128)" and costs["Dense_1"].method == "cholesky"
  assert "**total**" in table and table.count("\n") == 4


def test_the_scale_out_page_table_is_what_cost_estimate_gives():
  """docs/scale-out.md's example (MLP 784-256-256-10, batch 128, defaults) row for row, and
  its `inverse="cholesky"` and rfim figures."""
  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(256)(x))
      x = nn.relu(nn.Dense(256)(x))
      return nn.Dense(10)(x)

  params = MLP().init(jax.random.key(0), jnp.ones((1, 784)))["params"]
  page = " ".join(
      (pathlib.Path(__file__).parent.parent / "docs" / "scale-out.md").read_text().split())
  table = sngd_jax.format_costs(sngd_jax.cost_estimate(params, batch_rows=128))
  for row in table.splitlines()[2:]:
    assert " ".join(row.split()) in page, row
  dense0 = sngd_jax.cost_estimate(params, batch_rows=128, inverse="cholesky")["Dense_0"]
  assert f"{dense0.refresh_flops / 1e9:.2f} Gflop refresh" in page
  assert f"and {dense0.flops_per_step / 1e6:.0f} Mflop per step" in page
  assert f"amortized refresh ({dense0.refresh_flops / 100 / 1e6:.0f} Mflop)" in page
  rfim = sngd_jax.cost_estimate(params, batch_rows=128, fisher={"Dense_1": "rfim"})["Dense_1"]
  assert f"{(rfim.factor_bytes + rfim.inverse_bytes) / 1e6:.0f} MB of state" in page
  assert f"{rfim.allreduce_bytes / 1e6:.1f} MB all-reduce" in page
