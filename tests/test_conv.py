"""Convolutions: patches in the kernel's layout, one update vs a float64 reference,
and a small CNN on Fashion-MNIST-shaped data."""

import gzip
import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from helpers_train import assert_trains, softmax_loss

import sngd_jax
from sngd_jax._src import conv as conv_lib
from sngd_jax._src import statistics

pytestmark = pytest.mark.usefixtures("x64")


# (kernel_size, strides, padding, kernel_dilation, input_dilation, groups, C_in, spatial)
CONFIGS = {
    "1d_same_stride": ((3,), (2,), "SAME", (1,), (1,), 1, 3, (9,)),
    "1d_causal_dilated": ((3,), (1,), "CAUSAL", (2,), (1,), 1, 2, (8,)),
    "2d_explicit_groups_dilated": ((3, 2), (2, 1), ((1, 0), (2, 1)), (2, 1), (1, 1), 2, 4,
                                   (7, 6)),
    "2d_circular": ((3, 3), (1, 1), "CIRCULAR", (1, 1), (1, 1), 1, 2, (5, 5)),
    "2d_depthwise_valid": ((2, 2), (1, 1), "VALID", (1, 1), (1, 1), 3, 3, (5, 4)),
    "2d_input_dilation": ((2, 2), (1, 1), ((1, 0), (0, 1)), (1, 1), (2, 1), 1, 2, (4, 4)),
    "3d_valid_stride": ((2, 2, 2), (1, 2, 1), "VALID", (1, 1, 1), (1, 1, 1), 1, 2, (3, 4, 3)),
    "2d_same_stride_dilated": ((3, 3), (2, 2), "SAME", (2, 1), (1, 1), 1, 3, (9, 8)),
    "2d_negative_pads": ((3, 2), (2, 1), ((-1, 2), (1, -1)), (1, 2), (1, 1), 2, 4, (9, 7)),
    "2d_same_3x3": ((3, 3), (1, 1), "SAME", (1, 1), (1, 1), 1, 4, (7, 6)),
    # more offsets along one axis than XLA:CPU fuses into one concatenation (8)
    "1d_wide_kernel": ((11,), (2,), ((4, 6),), (1,), (1,), 1, 3, (19,)),
    "3d_same_3x3x3": ((3, 3, 3), (1, 2, 1), "SAME", (1, 1, 2), (1, 1, 1), 1, 2, (4, 5, 6)),
}


def _conv(cfg, features, use_bias=True):
  k, s, pad, kd, idl, g, _, _ = cfg
  return nn.Conv(features, k, strides=s, padding=pad, kernel_dilation=kd, input_dilation=idl,
                 feature_group_count=g, use_bias=use_bias, param_dtype=jnp.float64)


def _reference_rows(cfg, x):
  k, s, pad, kd, idl, g, _, _ = cfg
  return ref.conv_patches(np.asarray(x), k, s, pad, kd, idl, g)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patches_match_loops_and_reproduce_the_conv(name):
  """Patches equal the loop reference, and patches @ kernel rows == the Flax conv."""
  cfg = CONFIGS[name]
  cin, spatial, groups = cfg[6], cfg[7], cfg[5]
  x = jax.random.normal(jax.random.key(1), (2,) + spatial + (cin,), jnp.float64)
  layer = _conv(cfg, features=2 * groups)
  params = layer.init(jax.random.key(0), x)["params"]
  y = layer.apply({"params": params}, x)
  rows, out_spatial = _reference_rows(cfg, x)
  got = np.asarray(conv_lib.patches(x, conv_lib.conv_config(layer)))
  np.testing.assert_allclose(got, rows, rtol=0, atol=1e-12)
  # The rows index the kernel's own flattening: row (example, pos, group j) times the
  # kernel columns of group j gives the conv output.
  kernel = np.asarray(params["kernel"]).reshape(rows.shape[1], -1)
  per_group = kernel.shape[1] // groups
  z = rows.reshape(-1, groups, rows.shape[1])
  expect = np.concatenate(
      [z[:, j] @ kernel[:, j * per_group:(j + 1) * per_group] for j in range(groups)], axis=1)
  expect = expect + np.asarray(params["bias"])
  assert out_spatial == y.shape[1:-1]
  np.testing.assert_allclose(np.asarray(y).reshape(-1, y.shape[-1]), expect, atol=1e-10)


def _compiled_kernels(fn, *args) -> dict[str, int]:
  """Fusions and unfused concatenations of ``jax.jit(fn)(*args)``'s compiled program
  (each fusion is a kernel XLA:CPU compiles; a concatenation not fused runs as copies)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  fused = set(re.findall(r"calls=%?([\w.\-]+)", text))  # the fusions' bodies
  counts = {"fusion": 0, "concatenate": 0}
  for comp in re.split(r"\n(?=%|ENTRY)", text):
    name = re.match(r"(?:ENTRY\s+)?%?([\w.\-]+)", comp)
    if name is None or name.group(1) in fused:
      continue
    for op in counts:
      counts[op] += comp.count(f" {op}(")
  return counts


@pytest.mark.parametrize("name", ["2d_same_3x3", "2d_negative_pads", "1d_wide_kernel",
                                  "3d_same_3x3x3"])
def test_patches_compile_to_two_kernels(name):
  """The patches are the padded input and one kernel of every offset's slice of it, however
  many offsets (XLA:CPU compile time follows the number of compiled fusions). They were one
  fusion per offset and a concatenation run as copies (8 fusions for a 3x3 conv)."""
  cfg = CONFIGS[name]
  cin = 16 if name == "2d_same_3x3" else cfg[6]
  x = jnp.ones((8,) + cfg[7] + (cin,), jnp.float32)
  config = conv_lib.conv_config(_conv(cfg, features=2 * cfg[5]))
  kernels = _compiled_kernels(lambda x: conv_lib.patches(x, config), x)
  assert kernels["fusion"] <= 2 and kernels["concatenate"] == 0, kernels


@pytest.mark.parametrize("count", [1, 8, 9, 17, 70])
def test_stack_in_fused_groups_equals_jnp_stack(count):
  """``conv._stack``, concatenations of at most 8 operands each, is ``jnp.stack``."""
  arrays = [jnp.full((2, 3, 4), float(i)) + jnp.arange(4.0) for i in range(count)]
  np.testing.assert_array_equal(conv_lib._stack(arrays, 1), jnp.stack(arrays, 1))


def test_conv_statistics_do_not_form_the_rows_with_the_ones_column():
  """A conv layer with a bias: the factor's bias row and column are sums of the patches, so
  the rows ``[patch, 1]`` (a copy of the patches, written an element at a time) are never
  formed: the compiled statistics hold no ``(rows, d + 1)`` array and compile 4 fusions
  (padded input, patches, their sum, the assembled factor), not the 10 of one per offset
  and a concatenation run as copies."""
  spec, calls, _ = _conv_calls(4, spatial=(7, 6), cin=16)
  with jax.enable_x64(False):
    calls = jax.tree.map(lambda a: a.astype(jnp.float32), calls)
    fn = lambda c: statistics.batch_factor(spec, c)
    text = jax.jit(fn).lower(calls).compile().as_text()
    kernels = _compiled_kernels(fn, calls)
  rows = 4 * 7 * 6
  assert f"f32[{rows},{spec.in_dim + 1}]" not in text
  assert f"f32[{rows},{spec.in_dim}]" in text
  assert kernels["fusion"] <= 4 and kernels["concatenate"] == 0, kernels


def _weighted_factor(rows: np.ndarray, weights: np.ndarray, bias: bool) -> np.ndarray:
  """``sum_r m_r x~_r x~_r^T / sum_r m_r`` in float64, ``x~ = [patch, 1]`` with a bias."""
  x = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1) if bias else rows
  return (x * weights[:, None]).T @ x / weights.sum()


@pytest.mark.parametrize("masked", [False, True], ids=["all_rows", "row_mask"])
@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("name,use_bias", [(n, True) for n in sorted(CONFIGS)]
                         + [("2d_same_3x3", False), ("3d_same_3x3x3", False)])
def test_float32_factor_matches_float64_reference(monkeypatch, name, use_bias, chunked,
                                                  masked):
  """The factor computed in float32 (``batch_factor``) equals ``E[x~ x~^T]`` over the
  explicit patches of the same inputs in float64 (numpy loops, ``np_reference``) to float32
  rounding: stride, padding (SAME, VALID, CAUSAL, CIRCULAR, explicit and negative pairs),
  kernel and input dilation, feature groups and depthwise, 1-D to 3-D, kernels with more
  offsets along one axis than one fused concatenation takes, with and without a bias, in
  one piece or one example at a time, with the weights of a row mask."""
  chunk_rows(monkeypatch, chunked)
  cfg = CONFIGS[name]
  k, s, pad, kd, idl, g, cin, spatial = cfg
  n = 3
  with jax.enable_x64(False):
    x = jax.random.normal(jax.random.key(7), (n,) + spatial + (cin,), jnp.float32)
    layer = nn.Conv(2 * g, k, strides=s, padding=pad, kernel_dilation=kd, input_dilation=idl,
                    feature_group_count=g, use_bias=use_bias)
    params = layer.init(jax.random.key(0), x)["params"]
    loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)))
    example_weights = np.array([0.5, 0.0, 2.0], np.float32)
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    if masked:
      acts = sngd_jax.with_row_mask(acts, jnp.asarray(example_weights))
    (spec,) = sngd_jax.discover(grads).values()
    got = jax.jit(lambda c: statistics.batch_factor(spec, c))(acts[spec.path])
  assert got.dtype == jnp.float32
  rows, _ = ref.conv_patches(np.asarray(x, np.float64), k, s, pad, kd, idl, g)
  weights = (np.repeat(example_weights.astype(np.float64), rows.shape[0] // n) if masked
             else np.ones(rows.shape[0]))
  want = _weighted_factor(rows, weights, use_bias)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2e-5,
                             atol=2e-6 * np.abs(want).max())


def chunk_rows(monkeypatch, chunked: bool) -> None:
  """Forces the patch rows of conv layers into one chunk per example (or leaves the default)."""
  if chunked:
    monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", 1)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("name,use_bias", [
    ("1d_causal_dilated", True), ("2d_explicit_groups_dilated", True),
    ("2d_explicit_groups_dilated", False), ("2d_circular", True), ("3d_valid_stride", True),
    ("2d_input_dilation", False)])
def test_one_update_matches_reference(monkeypatch, name, use_bias, chunked):
  """Under jit + value_and_grad: update = (G + damping tr(G) I)^{-1} [gK; gb], G from loops.

  ``chunked``: the rows formed and reduced one example at a time (as the
  default does for large patches) give the same update.
  """
  chunk_rows(monkeypatch, chunked)
  cfg = CONFIGS[name]
  cin, spatial = cfg[6], cfg[7]
  x = jax.random.normal(jax.random.key(2), (3,) + spatial + (cin,), jnp.float64)
  layer = _conv(cfg, features=2 * cfg[5], use_bias=use_bias)
  params = layer.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)) ** 2)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())

  @jax.jit
  def step(params, x):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params, x)
    updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
    return grads, updates

  grads, updates = step(params, x)
  rows, _ = _reference_rows(cfg, x)
  kernel, bias = ref.dense_update(rows, grads["kernel"], grads.get("bias"))
  np.testing.assert_allclose(updates["kernel"], kernel, rtol=1e-8, atol=1e-10)
  if use_bias:
    np.testing.assert_allclose(updates["bias"], bias, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_rfim_per_channel_blocks_for_grouped_conv(monkeypatch, chunked):
  """rfim: channel j uses the rows of its own group, weighted by sigmoid(z_j)^2."""
  chunk_rows(monkeypatch, chunked)
  cfg = CONFIGS["2d_explicit_groups_dilated"]
  x = jax.random.normal(jax.random.key(3), (2,) + cfg[7] + (cfg[6],), jnp.float64)
  layer = _conv(cfg, features=4)
  params = layer.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.sin(layer.apply({"params": p}, x)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
      params, x)
  tx = sngd_jax.sngd(fisher="rfim", **ref.one_step_kwargs())
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows, _ = _reference_rows(cfg, x)
  groups, per_group = 2, 2
  z = np.asarray(layer.apply({"params": params}, x)).reshape(-1, 4)
  rows = rows.reshape(-1, groups, rows.shape[1])
  g = ref.augmented(grads["kernel"], grads["bias"], rows.shape[2])
  for j in range(4):
    xr = np.concatenate([rows[:, j // per_group], np.ones((rows.shape[0], 1))], axis=1)
    w = ref.sigmoid(z[:, j]) ** 2
    # averaged over its own group's n * positions rows (other groups' rows weigh 0)
    gj = (xr * w[:, None]).T @ xr / rows.shape[0]
    pre = ref.damped_solve(gj, g[:, j])
    np.testing.assert_allclose(updates["kernel"].reshape(-1, 4)[:, j], pre[:-1], rtol=1e-8)
    np.testing.assert_allclose(updates["bias"][j], pre[-1], rtol=1e-8)


@pytest.mark.parametrize("fisher", ["rfim", "linear"])
def test_depthwise_conv_equals_its_channels_as_separate_convs(fisher):
  """A depthwise conv's update equals that of the same channels as 1-channel convs.

  rfim: channel j's block averages its own group's rows, as the channel's own conv does
  (it was 1/groups of that, so the step was groups times as large). linear: one factor
  shared by the groups, the average of the separate convs' factors.
  """
  c = 3
  x = jax.random.normal(jax.random.key(5), (2, 6, 6, c), jnp.float64)
  depthwise = nn.Conv(c, (3, 3), feature_group_count=c, param_dtype=jnp.float64)
  params = depthwise.init(jax.random.key(0), x)["params"]
  single = nn.Conv(1, (3, 3), param_dtype=jnp.float64)

  class Separate(nn.Module):
    @nn.compact
    def __call__(self, x):
      return jnp.concatenate(
          [nn.Conv(1, (3, 3), param_dtype=jnp.float64, name=f"c{j}")(x[..., j:j + 1])
           for j in range(c)], -1)

  sep_params = {f"c{j}": {"kernel": params["kernel"][..., j:j + 1],
                          "bias": params["bias"][j:j + 1]} for j in range(c)}
  np.testing.assert_allclose(Separate().apply({"params": sep_params}, x),
                             depthwise.apply({"params": params}, x), rtol=1e-12)

  def step(model, p):
    loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    (_, acts), grads = jax.value_and_grad(
        sngd_jax.capture(loss, outputs=fisher == "rfim"), has_aux=True)(p)
    tx = sngd_jax.sngd(fisher=fisher, **ref.one_step_kwargs())
    return tx.update(grads, tx.init(p), p, activations=acts)[0]

  got = step(depthwise, params)
  separate = step(Separate(), sep_params)
  if fisher == "rfim":
    for j in range(c):
      np.testing.assert_allclose(got["kernel"][..., j], separate[f"c{j}"]["kernel"][..., 0],
                                 rtol=1e-8)
      np.testing.assert_allclose(got["bias"][j], separate[f"c{j}"]["bias"][0], rtol=1e-8)
  else:
    # One shared factor: the mean of the channels' own factors, so not the separate
    # updates; check the shared factor's definition against float64 numpy instead.
    rows = np.stack([np.asarray(conv_lib.patches(x[..., j:j + 1], conv_lib.conv_config(single)))
                     for j in range(c)], 1).reshape(-1, 9)
    xr = np.concatenate([rows, np.ones((rows.shape[0], 1))], 1)
    gram = xr.T @ xr / xr.shape[0]
    g = np.concatenate([np.asarray(grads_of(depthwise, params, x)["kernel"]).reshape(9, c),
                        np.asarray(grads_of(depthwise, params, x)["bias"])[None]], 0)
    pre = ref.damped_solve(gram, g)
    np.testing.assert_allclose(np.asarray(got["kernel"]).reshape(9, c), pre[:-1], rtol=1e-8)
    np.testing.assert_allclose(got["bias"], pre[-1], rtol=1e-8)


def grads_of(model, params, x):
  return jax.grad(lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x))))(params)


# --- transposed convolutions ----------------------------------------------------

TRANSPOSE = {
    "2d_same_stride2": ((3, 3), (2, 2), "SAME", (1, 1), (4, 3)),
    "1d_valid_dilated": ((3,), (2,), "VALID", (2,), (5,)),
    "2d_explicit": ((2, 2), (2, 1), ((1, 0), (0, 1)), (1, 1), (3, 3)),
}


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
@pytest.mark.parametrize("name", sorted(TRANSPOSE))
def test_conv_transpose_update_matches_reference(monkeypatch, name, chunked):
  chunk_rows(monkeypatch, chunked)
  k, s, pad, kd, spatial = TRANSPOSE[name]
  x = jax.random.normal(jax.random.key(4), (2,) + spatial + (2,), jnp.float64)
  layer = nn.ConvTranspose(3, k, strides=s, padding=pad, kernel_dilation=kd,
                           param_dtype=jnp.float64)
  params = layer.init(jax.random.key(0), x)["params"]
  y = layer.apply({"params": params}, x)
  pads = pad if not isinstance(pad, str) else [
      ref.transpose_pads(k[i], s[i], pad, kd[i]) for i in range(len(k))]
  rows, _ = ref.conv_patches(np.asarray(x), k, (1,) * len(k), pads, kd, s, 1)
  kernel = np.asarray(params["kernel"]).reshape(rows.shape[1], -1)
  np.testing.assert_allclose(np.asarray(y).reshape(-1, 3), rows @ kernel + np.asarray(
      params["bias"]), atol=1e-10)
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)) ** 2)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
      params, x)
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, activations=acts)
  kernel_u, bias_u = ref.dense_update(rows, grads["kernel"], grads["bias"])
  np.testing.assert_allclose(updates["kernel"], kernel_u, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(updates["bias"], bias_u, rtol=1e-8, atol=1e-10)


# --- patch rows in chunks of examples ---------------------------------------

def _conv_calls(n, spatial=(6, 5), cin=3):
  cfg = ((3, 3), (1, 1), "SAME", (1, 1), (1, 1), 1, cin, spatial)
  x = jax.random.normal(jax.random.key(5), (n,) + spatial + (cin,), jnp.float64)
  layer = _conv(cfg, features=4)
  params = layer.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  (spec,) = sngd_jax.discover(grads).values()
  (calls,) = acts.values()
  return spec, calls, _reference_rows(cfg, x)[0]


@pytest.mark.parametrize("chunk_bytes,num_chunks", [(1, 7), (2 * 6480, 4), (10**9, None)])
def test_example_chunks_split_the_batch_by_the_size_of_its_patch_rows(monkeypatch, chunk_bytes,
                                                                       num_chunks):
  """Chunks of whole examples, in order, of at most ROW_CHUNK_BYTES of rows (or one example)."""
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", chunk_bytes)
  spec, calls, rows = _conv_calls(7)  # 30 rows of 27 per example: 6480 bytes in float64
  parts = statistics.example_chunks(spec, calls)
  if num_chunks is None:
    assert parts is None
    return
  assert len(parts) == num_chunks
  got = np.concatenate([np.asarray(statistics.layer_rows(spec, p)[0])[:, :-1] for p in parts])
  np.testing.assert_array_equal(got, rows)


def test_sketched_conv_layer_in_chunks_matches_float64(monkeypatch):
  """The Nystrom sketch ((1/n) X~^T X~ Omega, tr) summed over chunks equals the whole batch's."""
  spec, calls, rows = _conv_calls(4)
  omega = jax.random.normal(jax.random.key(6), (rows.shape[1] + 1, 5), jnp.float64)  # + bias
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", 1)
  got = statistics.batch_sketch(spec, calls, omega)
  x = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
  g = x.T @ x / x.shape[0]
  np.testing.assert_allclose(got.y, g @ np.asarray(omega), rtol=1e-10)
  np.testing.assert_allclose(got.trace, np.trace(g), rtol=1e-12)


def test_chunked_patch_rows_lower_the_compiled_memory(monkeypatch):
  """The reason for the chunks: XLA holds one chunk's patches, not the batch's (float32).

  A 3x3 conv on 64 x 28 x 28 x 16 inputs has 29 MB of float32 patches (50176 rows
  of 144); the unchunked statistics hold them all (58 MB when the patches were
  formed one kernel per offset, then concatenated, then copied with the ones
  column), and the compiled statistics with the default chunks must need under a
  third of their temporary memory.
  """
  x = jnp.ones((64, 28, 28, 16), jnp.float32)
  layer = nn.Conv(16, (3, 3))
  params = layer.init(jax.random.key(0), x[:1])["params"]
  loss = lambda p, x: jnp.sum(layer.apply({"params": p}, x))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  (spec,) = sngd_jax.discover(grads).values()

  def temp_bytes():
    f = jax.jit(lambda calls: statistics.batch_factor(spec, calls))
    return f.lower(acts[spec.path]).compile().memory_analysis().temp_size_in_bytes

  chunked = temp_bytes()
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", 10**12)
  whole = temp_bytes()
  assert whole > 50176 * 144 * 4 and chunked < whole / 3, (chunked, whole)


# --- training smoke test ------------------------------------------------------

FASHION = "/usr/share/datasets/fashion-mnist"


def _fashion_subset(n):
  """n real Fashion-MNIST training images (28x28x1 in [0, 1]), or random data if absent."""
  images = os.path.join(FASHION, "train-images-idx3-ubyte.gz")
  labels = os.path.join(FASHION, "train-labels-idx1-ubyte.gz")
  if os.path.exists(images) and os.path.exists(labels):
    with gzip.open(images) as f:
      x = np.frombuffer(f.read(16 + n * 784), np.uint8, offset=16)
    with gzip.open(labels) as f:
      y = np.frombuffer(f.read(8 + n), np.uint8, offset=8)
    return x.reshape(n, 28, 28, 1).astype(np.float32) / 255.0, y.astype(np.int32)
  rng = np.random.default_rng(0)
  return rng.random((n, 28, 28, 1), np.float32), rng.integers(0, 10, n).astype(np.int32)


class SmallCNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), strides=2)(x))              # 14x14
    x = nn.GroupNorm(num_groups=4)(x)
    x = nn.relu(nn.Conv(16, (3, 3), strides=2, feature_group_count=2)(x))  # 7x7
    x = x.mean(axis=(1, 2))
    return nn.Dense(10)(x)


def test_small_cnn_trains_and_every_parameter_is_covered():
  with jax.enable_x64(False):
    x, y = _fashion_subset(256)
    model = SmallCNN()
    params = model.init(jax.random.key(0), x[:1])["params"]
    loss_fn = softmax_loss(lambda p, x: model.apply({"params": p}, x))

    report = sngd_jax.coverage(loss_fn, params, x[:8], y[:8])
    assert report.missing == [] and report.pass_through == []
    leaves = ["/".join(str(k.key) for k in p) for p, _ in
              jax.tree_util.tree_flatten_with_path(params)[0]]
    assert sorted(report.preconditioned) == sorted(leaves)

    quarters = [slice(k * 64, (k + 1) * 64) for k in range(4)]
    batches = [(x[quarters[i % 4]], y[quarters[i % 4]]) for i in range(40)]
    assert_trains(loss_fn, params, batches, eval_batch=(x, y), learning_rate=0.05,
                  max_ratio=0.8)


def test_examples_at_a_traced_start_matches_examples():
  """The loop's slice (traced start) is ``examples``'s, also for time-major rows."""
  x = jnp.arange(2 * 6 * 3, dtype=jnp.float32).reshape(12, 3)  # 2 time steps x 6 examples
  rec = sngd_jax.Captured(inputs=x, outputs=x * 2, time_steps=2)
  got = jax.jit(lambda r, i: r.examples_at(i, 3))(rec, jnp.int32(2))
  want = rec.examples(2, 5)
  np.testing.assert_array_equal(got.inputs, want.inputs)
  np.testing.assert_array_equal(got.outputs, want.outputs)


@pytest.mark.parametrize("chunk_bytes,plan", [(3 * 6480, (3, 2, 1)), (6480, (7, 1, 0))])
def test_chunks_are_summed_in_one_loop(monkeypatch, chunk_bytes, plan):
  """Equal chunks are summed in one loop (one ``while`` in the compiled program, not a copy
  per chunk), the examples left over after it, to the whole batch's factor."""
  spec, calls, rows = _conv_calls(7)
  monkeypatch.setattr(statistics, "ROW_CHUNK_BYTES", chunk_bytes)
  assert statistics._loop_plan(spec, calls) == plan
  f = jax.jit(lambda calls: statistics.batch_factor(spec, calls))
  hlo = f.lower(calls).compile().as_text()
  assert hlo.count(" while(") == 1, hlo.count(" while(")
  x = np.concatenate([rows, np.ones((rows.shape[0], 1))], axis=1)
  np.testing.assert_allclose(f(calls), x.T @ x / x.shape[0], rtol=1e-12)


@pytest.mark.parametrize("how", ["chunked", "stats_batch_size"])
def test_unbatched_conv_input_is_one_example(monkeypatch, how):
  """Flax's ``Conv`` accepts one unbatched example ``(*spatial, C)``: its first spatial axis
  is not an example axis. Split into chunks of "examples" (large images: the default chunk
  size) or cut by ``stats_batch_size``, the rows were patches of slabs of the image, each
  padded on its own (the factor off by 0.45 here; 5e-3 on a 256x256x4 image at the default
  chunk size). The factor is that of the whole image's patches (numpy loops)."""
  cfg = CONFIGS["2d_same_stride_dilated"]
  kw = dict(ref.one_step_kwargs())
  if how == "chunked":
    chunk_rows(monkeypatch, True)
  else:
    kw["stats_batch_size"] = 2
  x = jax.random.normal(jax.random.key(2), cfg[7] + (cfg[6],), jnp.float64)
  layer = _conv(cfg, features=2)
  params = layer.init(jax.random.key(0), x)["params"]
  loss = lambda p, x: jnp.sum(jnp.tanh(layer.apply({"params": p}, x)) ** 2)
  tx = sngd_jax.sngd(**kw)
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  rows, _ = _reference_rows(cfg, np.asarray(x)[None])
  kernel, bias = ref.dense_update(rows, grads["kernel"], grads["bias"])
  np.testing.assert_allclose(updates["kernel"], kernel, rtol=1e-8, atol=1e-10)
  np.testing.assert_allclose(updates["bias"], bias, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("api", ["linen", "nnx"])
def test_masked_conv_is_refused_naming_the_path(api):
  """A ``Conv(mask=...)`` is not the patch factor's layer (its masked entries read no input:
  the plain-conv update moved them although their gradient is 0). It is not recorded:
  ``coverage`` lists it MISSING with the fix, ``update`` raises naming it, and with
  ``fisher={path: None}`` its gradient passes through unchanged."""
  from flax import nnx

  mask = np.ones((3, 3, 2, 4), np.float32)
  mask[2] = 0.0
  x = jnp.asarray(np.random.default_rng(0).normal(size=(5, 6, 6, 2)), jnp.float32)
  if api == "linen":
    class Net(nn.Module):
      @nn.compact
      def __call__(self, x):
        return nn.Conv(4, (3, 3), mask=jnp.asarray(mask), name="masked")(x)

    model = Net()
    params = model.init(jax.random.key(0), x)["params"]
    loss = lambda p, x: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
    report = str(sngd_jax.coverage(loss, params, x))
    grads, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(params, x)
  else:
    class NNXNet(nnx.Module):
      def __init__(self):
        self.masked = nnx.Conv(2, 4, (3, 3), mask=jnp.asarray(mask), rngs=nnx.Rngs(0))

      def __call__(self, x):
        return self.masked(x)

    net = NNXNet()
    loss = lambda m, x: jnp.sum(jnp.sin(m(x)))
    report = str(sngd_jax.coverage(loss, net, x))
    graphdef, state, rest = nnx.split(net, nnx.Param, ...)  # rest: the mask
    loss_p = lambda p, x: loss(nnx.merge(graphdef, p, rest), x)
    grads, acts = jax.grad(sngd_jax.capture_nnx(loss_p), has_aux=True)(state, x)
    params = state
  assert "MISSING" in report and "mask=" in report, report
  tx = sngd_jax.sngd()
  with pytest.raises(ValueError, match="'masked'.*mask="):
    tx.update(grads, tx.init(params), params, activations=acts)
  skip = sngd_jax.sngd(fisher={"masked": None})
  out, _ = skip.update(grads, skip.init(params), params, activations=acts)
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(grads), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_conv_local_is_not_modelled_update_names_it_and_fisher_none_passes_it_through():
  """``nn.ConvLocal`` (an unshared conv: one kernel per output position) is not modelled:
  capture records nothing for it, ``update`` raises naming the layer, ConvLocal and the fix,
  and with ``fisher={'cl': None}`` its update is its gradient while the head's is the float64
  damped solve over the head's rows (the flattened ConvLocal output)."""
  class Local(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.ConvLocal(3, (2,), name="cl", param_dtype=jnp.float64)(x)
      return nn.Dense(2, name="head", param_dtype=jnp.float64)(h.reshape(h.shape[0], -1))

  x = jax.random.normal(jax.random.key(1), (6, 5, 2), jnp.float64)
  model = Local()
  params = model.init(jax.random.key(0), x)["params"]
  loss = lambda p: jnp.sum(jnp.sin(model.apply({"params": p}, x)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params)
  assert set(acts) == {"head"}
  tx = sngd_jax.sngd(**ref.one_step_kwargs())
  with pytest.raises(ValueError, match=r"no activations were captured for layer 'cl'.*not "
                     r"ConvLocal.*fisher=\{'cl': None\}"):
    tx.update(grads, tx.init(params), params, activations=acts)
  tx = sngd_jax.sngd(**ref.one_step_kwargs(), fisher={"cl": None})
  updates, _ = tx.update(grads, tx.init(params), params, activations=acts)
  for leaf in ("kernel", "bias"):
    np.testing.assert_array_equal(updates["cl"][leaf], grads["cl"][leaf])
  h = nn.ConvLocal(3, (2,)).apply({"params": params["cl"]}, x)
  rows = np.asarray(h, np.float64).reshape(6, -1)
  ref.assert_dense_update(rows, grads["head"], updates["head"], "head")
