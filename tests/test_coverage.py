"""The coverage report: every leaf listed with its local Fisher (or pass-through /
MISSING) and the bytes its factor really takes in the optimizer state."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sngd_jax


class Mixed(nn.Module):
  @nn.compact
  def __call__(self, x, tokens):
    h = nn.Conv(4, (3, 3))(x).mean((1, 2))
    h = nn.LayerNorm()(h)
    h = h * self.param("temperature", nn.initializers.ones, ())
    e = nn.Embed(7, 4)(tokens).mean(1)
    up = nn.Einsum((2, 1), "bhwc,kc->bhwk", use_bias=False)(x)   # layout not modelled
    return nn.Dense(3)(h + e).sum() + nn.Dense(2, name="head")(h).sum() + up.sum()


def _setup():
  x = jnp.ones((2, 5, 5, 1))
  tokens = jnp.array([[1, 2, 3], [3, 4, 5]])
  model = Mixed()
  params = model.init(jax.random.key(0), x, tokens)["params"]
  loss = lambda p, x, t: model.apply({"params": p}, x, t)
  return loss, params, x, tokens


def test_every_leaf_is_listed_with_its_kind():
  loss, params, x, tokens = _setup()
  report = sngd_jax.coverage(loss, params, x, tokens, fisher={"head": None})
  listed = [p.path for p in report.params]
  leaves = ["/".join(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert sorted(listed) == sorted(leaves)            # every leaf exactly once
  kinds = {p.path: p.fisher for p in report.params}
  assert kinds["Conv_0/kernel"] == "linear/conv 10x10"
  assert kinds["Conv_0/bias"] == "(with Conv_0/kernel)"
  assert kinds["LayerNorm_0/scale"] == "per-channel/norm 4x2x2"
  assert kinds["Embed_0/embedding"] == "diagonal/embed 7"
  assert kinds["Dense_0/kernel"] == "linear/dense 5x5"
  assert kinds["temperature"] == "pass-through"
  assert kinds["head/kernel"] == "pass-through (fisher=None)"
  assert report.missing == ["Einsum_0/kernel"]
  table = str(report)
  assert "parameter" in table and "Conv_0/kernel" in table and "total" in table


def test_factor_bytes_equal_the_optimizer_state():
  loss, params, x, tokens = _setup()
  fisher = {"Einsum_0": None}
  report = sngd_jax.coverage(loss, params, x, tokens, fisher=fisher)
  assert report.missing == []
  state = sngd_jax.sngd(fisher=fisher).init(params)
  per_layer = {path: state.factors[path].nbytes + jax.tree.leaves(state.inverses[path])[0].nbytes
               for path in state.factors}
  got = {p.layer: p.factor_bytes for p in report.params if p.factor_bytes}
  assert got == per_layer
  assert report.total_factor_bytes == sum(per_layer.values())


def test_factor_bytes_of_a_wide_layer_are_its_sketch_and_nystrom_model():
  """Above d = 512 the default keeps a rank-128 sketch and model: the bytes of the real state."""
  model = nn.Dense(4)
  x = jnp.ones((2, 600))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: model.apply({"params": p}, x).sum()
  report = sngd_jax.coverage(loss, params, x)
  assert report.missing == []
  state = sngd_jax.sngd().init(params)
  want = sum(a.nbytes for a in jax.tree.leaves((state.factors, state.inverses)))
  # sketch S Omega, tr S, c; model U, lam, tau, rho
  assert report.total_factor_bytes == want == 4 * (2 * 601 * 128 + 2 + 128 + 2)
  dense = sngd_jax.coverage(loss, params, x, inverse="cholesky")
  assert dense.total_factor_bytes == 2 * 601 * 601 * 4


def test_rfim_is_reported_per_unit():
  loss, params, x, tokens = _setup()
  report = sngd_jax.coverage(loss, params, x, tokens, fisher="rfim", outputs=True)
  kinds = {p.path: p.fisher for p in report.params}
  assert kinds["Dense_0/kernel"] == "rfim/dense 3x5x5"
  assert kinds["LayerNorm_0/scale"] == "per-channel/rfim/norm 4x2x2"
  assert kinds["Embed_0/embedding"] == "diagonal/embed 7"   # one-hot rows: always linear


class NNXNet(nnx.Module):
  def __init__(self, rngs):
    self.conv = nnx.Conv(1, 4, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(4, rngs=rngs)
    self.lin = nnx.Linear(4, 2, rngs=rngs)
    self.gain = nnx.Param(jnp.ones(()))

  def __call__(self, x):
    return self.lin(self.bn(self.conv(x)).mean((1, 2))).sum() * self.gain


def test_nnx_model_report_matches_state_and_leaves_the_model_alone():
  model = NNXNet(nnx.Rngs(0))
  x = jnp.arange(50.0).reshape(2, 5, 5, 1)
  before = jax.tree.map(np.asarray, nnx.state(model))
  report = sngd_jax.coverage(lambda m, x: m(x), model, x)
  after = jax.tree.map(np.asarray, nnx.state(model))
  jax.tree.map(np.testing.assert_array_equal, before, after)   # batch stats unchanged
  kinds = {p.path: p.fisher for p in report.params}
  assert kinds == {"bn/bias": "(with bn/scale)", "bn/scale": "per-channel/norm 4x2x2",
                   "conv/bias": "(with conv/kernel)", "conv/kernel": "linear/conv 10x10",
                   "gain": "pass-through", "lin/bias": "(with lin/kernel)",
                   "lin/kernel": "linear/dense 5x5"}
  state = sngd_jax.sngd().init(nnx.state(model, nnx.Param))
  assert report.total_factor_bytes == sum(
      a.nbytes for a in jax.tree.leaves((state.factors, state.inverses)))


class FlaxMnistCNN(nn.Module):
  """The model of Flax's ``examples/mnist``."""

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(64, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(256)(x.reshape(x.shape[0], -1)))
    return nn.Dense(10)(x)


def test_activation_bytes_of_flax_mnist_cnn_are_its_layer_inputs_by_default():
  """What crosses a jit boundary in the two-jit step, per batch of 128 (float32): the four
  layers' inputs (5.3 MB); the pre-activation outputs (19.4 MB more) only on request."""
  model, x = FlaxMnistCNN(), jnp.zeros((128, 28, 28, 1))
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: model.apply({"params": p}, x).sum()
  inputs = 4 * 128 * (28 * 28 * 1 + 14 * 14 * 32 + 7 * 7 * 64 + 256)
  outputs = 4 * 128 * (28 * 28 * 32 + 14 * 14 * 64 + 256 + 10)
  default = sngd_jax.coverage(loss, params, x)
  assert (default.activation_bytes, default.output_bytes) == (inputs, 0)
  full = sngd_jax.coverage(loss, params, x, outputs=True)
  assert (full.activation_bytes, full.output_bytes) == (inputs + outputs, outputs)
  assert round(inputs / 1e6, 1) == 5.3 and round(outputs / 1e6, 1) == 19.4


class _UsageExample(nn.Module):
  """The model of docs/usage.md's coverage example."""

  @nn.compact
  def __call__(self, img, tokens):
    a = nn.GroupNorm(num_groups=4)(nn.Conv(16, (3, 3), strides=2)(img)).mean((1, 2))
    h = nn.RNN(nn.LSTMCell(32))(nn.Embed(1000, 32)(tokens))[:, -1]
    t = self.param("temperature", nn.initializers.ones, ())
    return nn.Dense(10)(jnp.concatenate([a, h], -1)) / t


def test_the_usage_page_example_is_what_coverage_prints():
  model = _UsageExample()
  img, tokens = jnp.ones((4, 28, 28, 1)), jnp.ones((4, 20), jnp.int32)
  params = model.init(jax.random.key(0), img, tokens)["params"]
  report = sngd_jax.coverage(lambda p, i, t: jnp.sum(model.apply({"params": p}, i, t)),
                             params, img, tokens)
  page = (pathlib.Path(__file__).parent.parent / "docs" / "usage.md").read_text()
  block = page[page.index("```text\nparameter"):]
  block = block[len("```text\n"):block.index("```", 8)].splitlines()
  printed = str(report).splitlines()
  shown = [line for line in block if line != "..."]
  assert len(shown) < len(printed) and all(line in printed for line in shown), shown
  assert printed[-1] == block[-1] and printed[-2] == block[-2]
