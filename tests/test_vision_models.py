"""Two vision workloads written as practitioners write them in Flax linen: a ViT (patch
embedding by a strided `nn.Conv` or by reshape + `nn.Dense`, a class token and position
embedding made with `self.param`, pre-LN blocks, dropout) and a DDPM U-Net (GroupNorm,
strided-conv downsampling, `jax.image.resize` + conv and `nn.ConvTranspose` upsampling, skip
concatenations, a sinusoidal time embedding whose MLP output is added per channel, self-attention
at low resolution, an EMA copy of the params evaluated outside the optimizer).

For each: the coverage report, one update of representative layers against float64 NumPy
damped solves over the exact inputs the layer saw (recorded by `sow` in the model, not by
sngd), `stats_batch_size` taking the first images (all their patches and tokens), and a few
jitted training steps.
"""

import functools
import math
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import optax
import pytest
from exact import factors_after_one_step
from helpers_warnings import no_sngd_warnings
from np_reference import assert_dense_update

import sngd_jax

pytestmark = pytest.mark.usefixtures("x64")

B, K = 4, 2  # batch, stats_batch_size


def _sown(inter, *names):
  """The value a model sowed at ``inter[names[0]]...[names[-1]]`` (one call), as float64."""
  for name in names:
    inter = inter[name]
  (value,) = inter
  return ref.np64(value)


def _first(rows_of, x, k):
  """``rows_of(x[:k])``: a layer's rows built from the first ``k`` examples only (all of
  them for ``k = 0``)."""
  return rows_of(x[:k] if k else x)


def _updates_of_all_and_first_k(loss_fn, params, batch):
  """One jitted step of ``loss_fn`` (returning its sown intermediates as aux): the gradients,
  the one-step updates keyed by ``stats_batch_size`` (0: the whole batch, ``K``) and the
  intermediates; no sngd warning."""
  txs = {k: sngd_jax.sngd(stats_batch_size=k, **ref.one_step_kwargs()) for k in (None, K)}
  txs = {k or 0: tx for k, tx in txs.items()}  # 0: the whole batch

  @jax.jit
  def step(params, *batch):
    (_, (inter, acts)), grads = jax.value_and_grad(
        sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)(params, *batch)
    updates = {k: tx.update(grads, tx.init(params), params, activations=acts)[0]
               for k, tx in txs.items()}
    return grads, updates, inter

  with no_sngd_warnings():
    return step(params, *batch)


# --- ViT ---------------------------------------------------------------------------

D, P, HEADS, NC = 8, 4, 2, 3


class ViTBlock(nn.Module):
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, x, train):
    y = nn.LayerNorm()(x)
    self.sow("intermediates", "attn_in", y)
    y = nn.MultiHeadDotProductAttention(num_heads=HEADS, dropout_rate=self.attn_dropout,
                                        deterministic=not train)(y, y)
    x = x + nn.Dropout(0.1, deterministic=not train)(y)
    y = nn.Dense(2 * D)(nn.LayerNorm()(x))
    y = nn.Dropout(0.1, deterministic=not train)(nn.gelu(y))
    return x + nn.Dense(D)(y)


class ViT(nn.Module):
  patch: str = "conv"  # or "dense": reshape into patches, then nn.Dense
  attn_dropout: float = 0.0

  @nn.compact
  def __call__(self, img, train=False):
    b = img.shape[0]
    self.sow("intermediates", "img", img)
    if self.patch == "conv":
      x = nn.Conv(D, kernel_size=(P, P), strides=(P, P), name="patch_embed")(img)
      x = x.reshape(b, -1, D)
    else:
      h, w, c = img.shape[1:]
      x = img.reshape(b, h // P, P, w // P, P, c).transpose(0, 1, 3, 2, 4, 5)
      x = nn.Dense(D, name="patch_embed")(x.reshape(b, (h // P) * (w // P), P * P * c))
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, D))
    x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)), x], axis=1)
    x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, x.shape[1], D))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    x = ViTBlock(self.attn_dropout, name="block")(x, train)
    x = nn.LayerNorm()(x)[:, 0]
    self.sow("intermediates", "head_in", x)
    return nn.Dense(NC, name="head")(x)


@functools.cache
def _vit_problem(patch, abstract=False):
  """The model, its float64 params (``abstract``: their float32 shapes only, which is all
  `coverage` reads), a batch and the loss, which returns the sown layer inputs as its aux."""
  model = ViT(patch)
  imgs = jax.random.normal(jax.random.key(1), (B, 8, 8, 3),
                           jnp.float32 if abstract else jnp.float64)
  labels = jnp.arange(B) % NC
  init = jax.eval_shape if abstract else lambda f, *a: ref.f64(jax.jit(f)(*a))
  params = init(model.init, jax.random.key(0), imgs)["params"]

  def loss_fn(params, imgs, labels, dropout_key):
    logits, state = model.apply({"params": params}, imgs, train=True,
                                rngs={"dropout": dropout_key}, mutable=["intermediates"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, state["intermediates"]

  return model, params, (imgs, labels, jax.random.key(2)), loss_fn


def _patch_rows(x):
  """The patch conv's rows of images ``x``: its 4x4/4 patches, in the kernel's order."""
  return ref.conv_patches(x, (P, P), (P, P), "SAME", (1, 1), (1, 1), 1)[0]


@pytest.mark.parametrize("patch", ["conv", "dense"])
def test_vit_coverage_lists_every_layer_and_the_raw_params_as_pass_through(patch):
  model, params, batch, loss_fn = _vit_problem(patch, abstract=True)
  with no_sngd_warnings():
    report = sngd_jax.coverage(loss_fn, params, *batch)
  rows = {p.path: (p.fisher, p.inverse) for p in report.params}
  assert not report.missing, report
  patch_kind = "linear/conv 49x49" if patch == "conv" else "linear/dense 49x49"
  expected = {
      "patch_embed/kernel": (patch_kind, "cholesky"),
      "cls": ("pass-through", ""),
      "pos_embedding": ("pass-through", ""),
      "block/LayerNorm_0/scale": ("per-channel/norm 8x2x2", "cholesky"),
      "head/kernel": ("linear/dense 9x9", "cholesky"),
      "block/Dense_0/kernel": ("linear/dense 9x9", "cholesky"),
      "block/Dense_1/kernel": ("linear/dense 17x17", "cholesky"),
  }
  for name in ("query", "key", "value", "out"):
    expected[f"block/MultiHeadDotProductAttention_0/{name}/kernel"] = (
        "linear/dense 9x9", "cholesky")
  for path, want in expected.items():
    assert rows[path] == want, (path, rows[path])
  assert set(report.pass_through) == {"cls", "pos_embedding"}
  # that their updates are the base optimizer's (sngd() returns their gradient): below


def test_vit_updates_match_float64_solves_over_the_images_and_first_images():
  """The patch conv, the attention's query and out projections and the head, against damped
  solves over the rows each layer saw; with `stats_batch_size=K`, the rows of the first K
  images only (all their patches, all their tokens, the class token's row). The reshape +
  Dense patch embedding is a Dense over `(B, N, p*p*c)`: its rows are the same patches (its
  coverage above; its first K images in
  `test_stats_batch_size_on_rows_flattened_over_the_batch_takes_the_first_rows`)."""
  model, params, batch, loss_fn = _vit_problem("conv")
  grads, updates, inter = _updates_of_all_and_first_k(loss_fn, params, batch)
  img = _sown(inter, "img")
  attn_in = _sown(inter, "block", "attn_in")       # (B, tokens, D) after the LayerNorm
  head_in = _sown(inter, "head_in")                # the class token, (B, D)
  p_attn = jax.tree.map(np.asarray, params["block"]["MultiHeadDotProductAttention_0"])
  g_attn = grads["block"]["MultiHeadDotProductAttention_0"]
  for k, u in updates.items():
    u_attn = u["block"]["MultiHeadDotProductAttention_0"]
    assert_dense_update(_first(_patch_rows, img, k), grads["patch_embed"],
                        u["patch_embed"], f"patch_embed k={k}")
    tokens = _first(lambda a: a.reshape(-1, D), attn_in, k)
    assert_dense_update(tokens, g_attn["query"], u_attn["query"], f"query k={k}")
    heads = _first(lambda a: ref.mha_forward(p_attn, a, HEADS), attn_in, k)
    assert_dense_update(heads.reshape(tokens.shape[0], -1), g_attn["out"], u_attn["out"],
                        f"out k={k}")
    assert_dense_update(_first(lambda a: a, head_in, k), grads["head"], u["head"],
                        f"head k={k}")
    for name in ("cls", "pos_embedding"):  # raw params: the gradient, to the next transform
      np.testing.assert_array_equal(u[name], grads[name])


def test_vit_trains_with_train_state_dropout_and_attention_dropout():
  model = ViT("conv", attn_dropout=0.1)
  imgs = jax.random.normal(jax.random.key(1), (16, 8, 8, 3))
  labels = jnp.arange(16) % NC
  params = jax.jit(model.init)(jax.random.key(0), imgs)["params"]
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=sngd_jax.sngd_adam(3e-3))

  @jax.jit
  def train_step(state, imgs, labels, dropout_key):
    def loss_fn(params):
      logits = state.apply_fn({"params": params}, imgs, train=True,
                              rngs={"dropout": dropout_key})
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
    (loss, (_, acts)), grads = grad_fn(state.params)
    return state.apply_gradients(grads=grads, activations=acts), loss

  losses = []
  with no_sngd_warnings():
    for key in jax.random.split(jax.random.key(3), 12):
      state, loss = train_step(state, imgs, labels, key)
      losses.append(float(loss))
  assert np.all(np.isfinite(losses)) and ref.all_finite(state.params), losses
  assert np.mean(losses[-3:]) < 0.7 * losses[0], losses


# --- DDPM U-Net ----------------------------------------------------------------------

CH, GROUPS, T_STEPS = 4, 2, 50


def timestep_embedding(t, dim):
  half = dim // 2
  freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


class ResBlock(nn.Module):
  ch: int

  @nn.compact
  def __call__(self, x, temb, train):
    h = nn.Conv(self.ch, (3, 3))(nn.swish(nn.GroupNorm(num_groups=GROUPS)(x)))
    temb = nn.swish(temb)
    self.sow("intermediates", "temb_in", temb)
    h = h + nn.Dense(self.ch, name="temb_proj")(temb)[:, None, None, :]
    h = nn.Dropout(0.1, deterministic=not train)(
        nn.swish(nn.GroupNorm(num_groups=GROUPS)(h)))
    return x + nn.Conv(self.ch, (3, 3))(h)


class AttnBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    b, hh, ww, c = x.shape
    h = nn.GroupNorm(num_groups=GROUPS)(x).reshape(b, hh * ww, c)
    self.sow("intermediates", "attn_in", h)
    h = nn.MultiHeadDotProductAttention(num_heads=1)(h, h)
    return x + h.reshape(b, hh, ww, c)


class UNet(nn.Module):
  """One level down and up: 8x8 -> strided conv -> 4x4 with self-attention -> back to 8x8 by
  `jax.image.resize` + conv and by `nn.ConvTranspose` (summed), then the skip concatenation."""

  @nn.compact
  def __call__(self, x, t, train=False):
    b = x.shape[0]
    temb = nn.Dense(4 * CH, name="temb_dense0")(timestep_embedding(t, CH))
    temb = nn.Dense(4 * CH, name="temb_dense1")(nn.swish(temb))
    h1 = ResBlock(CH, name="res1")(nn.Conv(CH, (3, 3), name="conv_in")(x), temb, train)  # 8x8
    self.sow("intermediates", "down_in", h1)
    h2 = nn.Conv(2 * CH, (3, 3), strides=(2, 2), name="down")(h1)                        # 4x4
    h2 = AttnBlock(name="attn")(h2)
    self.sow("intermediates", "up_in", h2)
    up = nn.Conv(CH, (3, 3), name="up2")(jax.image.resize(h2, (b, 8, 8, 2 * CH), "nearest"))
    up = up + nn.ConvTranspose(CH, (2, 2), strides=(2, 2), name="up1")(h2)
    u = jnp.concatenate([up, h1], -1)
    self.sow("intermediates", "out_norm_in", u)
    return nn.Conv(x.shape[-1], (3, 3), name="conv_out")(
        nn.swish(nn.GroupNorm(num_groups=GROUPS, name="out_norm")(u)))


ALPHA_BAR = jnp.cumprod(1.0 - jnp.linspace(1e-4, 0.02, T_STEPS))


def noised(x0, key):
  """A DDPM training input: ``(x_t, t, eps)`` at random time steps."""
  kt, kn = jax.random.split(key)
  t = jax.random.randint(kt, (x0.shape[0],), 0, T_STEPS)
  eps = jax.random.normal(kn, x0.shape, x0.dtype)
  ab = ALPHA_BAR[t][:, None, None, None].astype(x0.dtype)
  return jnp.sqrt(ab) * x0 + jnp.sqrt(1.0 - ab) * eps, t, eps


@functools.cache
def _unet_problem(dtype=jnp.float64, batch=B):
  model = UNet()
  x0 = jax.random.normal(jax.random.key(1), (batch, 8, 8, 2), dtype)
  params = jax.jit(model.init)(jax.random.key(0), x0, jnp.zeros((batch,), jnp.int32))["params"]
  if dtype == jnp.float64:
    params = ref.f64(params)

  def loss_fn(params, x0, key):
    xt, t, eps = noised(x0, key)
    pred, state = model.apply({"params": params}, xt, t, train=True,
                              rngs={"dropout": jax.random.fold_in(key, 1)},
                              mutable=["intermediates"])
    return jnp.mean((pred - eps) ** 2), state["intermediates"]

  return model, params, (x0, jax.random.key(2)), loss_fn


def test_unet_coverage_lists_every_layer_with_its_kind():
  model, params, batch, loss_fn = _unet_problem(jnp.float32, batch=8)
  with no_sngd_warnings():
    report = sngd_jax.coverage(loss_fn, params, *batch)
  assert not report.missing and not report.pass_through, report
  rows = {p.path: (p.fisher, p.inverse) for p in report.params}
  expected = {
      "conv_in/kernel": "linear/conv 19x19",            # 3x3x2 patches and the bias
      "down/kernel": "linear/conv 37x37",               # strided
      "up2/kernel": "linear/conv 73x73",                # after jax.image.resize
      "up1/kernel": "linear/conv_transpose 33x33",      # 2x2 patches of 8 channels
      "conv_out/kernel": "linear/conv 73x73",           # after the skip concatenation
      "res1/GroupNorm_0/scale": "per-channel/norm 4x2x2",
      "out_norm/scale": "per-channel/norm 8x2x2",
      "res1/temb_proj/kernel": "linear/dense 17x17",
      "temb_dense0/kernel": "linear/dense 5x5",
      "attn/MultiHeadDotProductAttention_0/query/kernel": "linear/dense 9x9",
      "attn/MultiHeadDotProductAttention_0/out/kernel": "linear/dense 9x9",
  }
  for path, want in expected.items():
    assert rows[path] == (want, "cholesky"), (path, rows[path])


def _group_norm_xhat(x, groups, eps=1e-6):
  """Flax's GroupNorm of ``x (B, H, W, C)`` before its scale and bias, in float64."""
  b, c = x.shape[0], x.shape[-1]
  g = x.reshape(b, -1, groups, c // groups)
  mean = g.mean(axis=(1, 3), keepdims=True)
  var = (g * g).mean(axis=(1, 3), keepdims=True) - mean ** 2
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)


def test_unet_updates_match_float64_solves_over_the_images_and_first_images():
  """A strided conv, a GroupNorm, the time embedding's per-example Dense, the attention's
  query and out projections, the conv after `jax.image.resize` and the `ConvTranspose`,
  against damped solves over the rows each saw (the time embedding's: one per image);
  with `stats_batch_size=K`, the rows of the first K images only."""
  model, params, batch, loss_fn = _unet_problem()
  grads, updates, inter = _updates_of_all_and_first_k(loss_fn, params, batch)
  p_attn = jax.tree.map(np.asarray, params["attn"]["MultiHeadDotProductAttention_0"])
  attn_in = _sown(inter, "attn", "attn_in")                      # (B, 16 tokens, 8)
  conv3 = lambda stride: lambda a: ref.conv_patches(a, (3, 3), (stride,) * 2, "SAME", (1, 1),
                                                    (1, 1), 1)[0]
  up1_pads = [ref.transpose_pads(2, 2, "SAME")] * 2
  up1_rows = lambda a: ref.conv_patches(a, (2, 2), (1, 1), up1_pads, (1, 1), (2, 2), 1)[0]
  for k, u in updates.items():
    g_attn, u_attn = (t["attn"]["MultiHeadDotProductAttention_0"] for t in (grads, u))
    checks = {
        "down": (conv3(2), _sown(inter, "down_in"), grads["down"], u["down"]),
        "up2": (lambda a: conv3(1)(a.repeat(2, axis=1).repeat(2, axis=2)),  # nearest x2
                _sown(inter, "up_in"), grads["up2"], u["up2"]),
        "up1": (up1_rows, _sown(inter, "up_in"), grads["up1"], u["up1"]),
        "res1/temb_proj": (lambda a: a, _sown(inter, "res1", "temb_in"),
                           grads["res1"]["temb_proj"], u["res1"]["temb_proj"]),
        "query": (lambda a: a.reshape(-1, 2 * CH), attn_in, g_attn["query"], u_attn["query"]),
        "out": (lambda a: ref.mha_forward(p_attn, a, 1).reshape(-1, 2 * CH), attn_in,
                g_attn["out"], u_attn["out"]),
    }
    for name, (rows_of, x, g, got) in checks.items():
      assert_dense_update(_first(rows_of, x, k), g, got, f"{name} k={k}")
    # the last GroupNorm reads the skip concatenation: 8 channels, 2 groups of 4
    xhat = _first(lambda a: _group_norm_xhat(a, GROUPS).reshape(-1, 2 * CH),
                  _sown(inter, "out_norm_in"), k)
    g_norm, u_norm = grads["out_norm"], u["out_norm"]
    want_scale, want_bias = ref.channel_update(xhat, np.asarray(g_norm["scale"]),
                                               np.asarray(g_norm["bias"]))
    np.testing.assert_allclose(u_norm["scale"], want_scale, rtol=1e-7, atol=1e-10)
    np.testing.assert_allclose(u_norm["bias"], want_bias, rtol=1e-7, atol=1e-10)


def _ema_step(loss_fn, model, tx, how):
  """A jitted DDPM step that keeps ``ema`` outside the optimizer and evaluates it:
  ``how`` = ``"none"`` (no evaluation), ``"outside"`` (after the captured gradient, in the same
  jit) or ``"argument"`` (inside the captured loss, the EMA params passed after the params)."""

  def ema_loss(ema, x0, key):
    xt, t, eps = noised(x0, jax.random.fold_in(key, 7))
    return jnp.mean((model.apply({"params": ema}, xt, t) - eps) ** 2)

  def loss_with_ema(params, ema, x0, key):
    loss, _ = loss_fn(params, x0, key)
    return loss, (ema_loss(ema, x0, key) if how == "argument" else 0.0)

  @jax.jit
  def step(params, opt_state, ema, x0, key):
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_with_ema, has_aux=True), has_aux=True)
    (loss, (ema_value, acts)), grads = grad_fn(params, ema, x0, key)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    params = optax.apply_updates(params, updates)
    ema = optax.incremental_update(params, ema, step_size=0.1)
    if how == "outside":
      ema_value = ema_loss(ema, x0, key)
    return params, opt_state, ema, loss, ema_value

  return step


def test_unet_trains_with_its_ema_evaluated_in_the_jitted_step():
  """A few jitted steps bring the noise-prediction loss down, and the EMA's with it; the EMA
  params, kept outside the optimizer and evaluated after the captured gradient in the same
  jit, warn of nothing."""
  model, params, (x0, key), loss_fn = _unet_problem(jnp.float32, batch=8)
  tx = sngd_jax.sngd_adam(1e-2)
  step = _ema_step(loss_fn, model, tx, "outside")
  opt_state, ema = tx.init(params), params
  losses, ema_losses = [], []
  with no_sngd_warnings():
    for i in range(12):
      params, opt_state, ema, loss, ema_loss = step(params, opt_state, ema, x0,
                                                    jax.random.fold_in(key, i % 2))
      losses.append(float(loss))
      ema_losses.append(float(ema_loss))
  assert np.all(np.isfinite(losses + ema_losses)) and ref.all_finite(params), losses
  assert np.mean(losses[-2:]) < 0.7 * np.mean(losses[:2]), losses
  assert ema_losses[-1] < 0.8 * ema_losses[0], ema_losses


def test_unet_ema_evaluated_inside_the_captured_loss():
  """Inside the captured loss, the EMA params passed as a later argument add no call to any
  layer (so nothing to its factor) and warn of nothing; closed over instead, under the
  differentiation the EMA model's calls are left out too (their weights are no function of the
  differentiated params), without a warning. Captured without a differentiation, where the
  two copies cannot be told apart, each layer gets the EMA model's call too, pooled into its
  factor, and capture says so, in one warning."""
  model, params, (x0, key), loss_fn = _unet_problem(jnp.float32, batch=8)
  ema = jax.tree.map(lambda a: 0.5 * a, params)
  step = _ema_step(loss_fn, model, sngd_jax.sngd(), "argument")
  with no_sngd_warnings():
    jax.eval_shape(step, params, sngd_jax.sngd().init(params), ema, x0, key)

  def calls(loss, *args):
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss, has_aux=True), has_aux=True)
    (_, (_, acts)), _ = jax.eval_shape(grad_fn, params, *args)
    return {path: len(records) for path, records in acts.items()}

  layers = set(sngd_jax.discover(params))
  with no_sngd_warnings():
    assert calls(loss_fn, x0, key) == dict.fromkeys(layers, 1)

  def loss_with_ema(params, ema, x0, key):
    loss, _ = loss_fn(params, x0, key)
    xt, t, eps = noised(x0, key)
    return loss + jnp.mean((model.apply({"params": ema}, xt, t) - eps) ** 2), None

  with no_sngd_warnings():
    assert calls(loss_with_ema, ema, x0, key) == dict.fromkeys(layers, 1)
  closed_over = lambda params, x0, key: loss_with_ema(params, ema, x0, key)
  with no_sngd_warnings():
    assert calls(closed_over, x0, key) == dict.fromkeys(layers, 1)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    (_, (_, acts)) = jax.eval_shape(sngd_jax.capture(closed_over, has_aux=True), params, x0, key)
  assert {path: len(records) for path, records in acts.items()} == dict.fromkeys(layers, 2)
  # One warning naming every layer (it was one per layer: 18 here, for one EMA copy).
  (message,) = [str(w.message) for w in caught if str(w.message).startswith("sngd:")]
  assert "were called with 2 different weight arrays" in message, message
  assert all(repr(path) in message for path in layers), message


# --- raw params named like a layer's ---------------------------------------------------


class LayerScale(nn.Module):
  """CaiT / DeiT-III's per-channel residual scale, as often written: a param named `scale`."""

  @nn.compact
  def __call__(self, x):
    return x * self.param("scale", nn.initializers.constant(0.1), (x.shape[-1],))


class AddPositionEmbs(nn.Module):
  """A learned position embedding whose param is named `embedding`."""
  leading_one: bool = True

  @nn.compact
  def __call__(self, x):
    shape = ((1,) if self.leading_one else ()) + x.shape[1:]
    return x + self.param("embedding", nn.initializers.normal(0.02), shape)


class RawViT(nn.Module):
  """Patches by reshape + Dense, a position embedding and a LayerScale named like layer params."""
  leading_one: bool = True

  @nn.compact
  def __call__(self, img):
    b = img.shape[0]
    x = img.reshape(b, 2, P, 2, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 4, P * P * 3)
    x = AddPositionEmbs(self.leading_one, name="posemb")(nn.Dense(D, name="patch_embed")(x))
    x = x + LayerScale(name="ls")(nn.Dense(D)(nn.LayerNorm()(x)))
    return nn.Dense(NC, name="head")(x.mean(1))


def _raw_problem(leading_one, fisher=None):
  model = RawViT(leading_one)
  imgs = jax.random.normal(jax.random.key(1), (B, 8, 8, 3))
  labels = jnp.arange(B) % NC
  params = jax.jit(model.init)(jax.random.key(0), imgs)["params"]
  loss_fn = lambda p, imgs, labels: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, imgs), labels).mean()
  return params, (imgs, labels), loss_fn


def _missing(report):
  return {p.path: p.fisher for p in report.params if p.fisher.startswith("MISSING")}


@pytest.mark.parametrize("leading_one", [False, True], ids=["TxD", "1xTxD"])
def test_raw_params_named_scale_or_embedding_are_refused_naming_what_they_may_be(leading_one):
  """A LayerScale's `scale` is read as a norm layer's and a position embedding's `embedding`
  as an embedding table, by their names alone (the params hold no classes). They were refused
  as if a layer had gone uncaptured ('no calls captured ... a layout sngd does not record'; a
  `(1, T, D)` one as 'an ensemble of tables'); `coverage`, `update` and `init` now say that
  they may be the user's own arrays, and the two fixes."""
  params, batch, loss_fn = _raw_problem(leading_one)
  report = sngd_jax.coverage(loss_fn, params, *batch)
  missing = _missing(report)
  assert set(missing) == {"ls/scale", "posemb/embedding"}, missing
  for path, example, name in (("ls/scale", "LayerScale", "gamma"),
                              ("posemb/embedding", "position embedding", "pos_embedding")):
    text = " ".join(missing[path].split())
    assert f"{example}" in text and f"another name (e.g. '{name}')" in text, text
    assert f"`fisher={{'{path.split('/')[0]}': None}}`" in text, text
  tx = sngd_jax.sngd()
  grads = jax.grad(loss_fn)(params, *batch)
  if leading_one:  # a table with a leading axis of 1 reads as a stack of tables: init refuses
    with pytest.raises(ValueError, match=r"(?s)ensemble of tables.*learned position embedding"
                       r".*another name \(e.g. 'pos_embedding'\)"):
      tx.init(params)
    tx = sngd_jax.sngd(fisher={"posemb": None})
  (_, acts), _ = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, *batch)
  with pytest.raises(ValueError, match=r"(?s)no activations were captured.*"
                     r"LayerScale or a learned temperature: `self.param\('scale', \.\.\.\)`"):
    jax.eval_shape(lambda: tx.update(grads, tx.init(params), params, activations=acts))


def test_raw_params_left_out_by_fisher_none_pass_through_untouched():
  params, batch, loss_fn = _raw_problem(True)
  fisher = {"ls": None, "posemb": None}
  report = sngd_jax.coverage(loss_fn, params, *batch, fisher=fisher)
  rows = {p.path: p.fisher for p in report.params}
  assert not report.missing, report
  assert rows["ls/scale"] == rows["posemb/embedding"] == "pass-through (fisher=None)", rows
  tx = sngd_jax.sngd(fisher=fisher)
  lr, wd = 0.1, 0.5
  adams = [sngd_jax.sngd_adam(lr, weight_decay=w, fisher=fisher) for w in (0.0, wd)]

  @jax.jit
  def step(params, *batch):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, *batch)
    return grads, [t.update(grads, t.init(params), params, activations=acts)[0]
                   for t in [tx] + adams]

  with no_sngd_warnings():
    grads, (updates, plain, decayed) = step(params, *batch)
  np.testing.assert_array_equal(updates["ls"]["scale"], grads["ls"]["scale"])
  np.testing.assert_array_equal(updates["posemb"]["embedding"], grads["posemb"]["embedding"])
  assert not np.allclose(updates["head"]["kernel"], grads["head"]["kernel"])
  # sngd_adam's weight decay reaches kernels and tables, by their names: this position
  # embedding is named `embedding` (a table), the LayerScale's `scale` a norm's (docs).
  decay = jax.tree.map(lambda a, b: np.asarray(b) - np.asarray(a), plain, decayed)
  np.testing.assert_allclose(decay["posemb"]["embedding"],
                             -lr * wd * np.asarray(params["posemb"]["embedding"]), rtol=1e-5)
  np.testing.assert_allclose(decay["head"]["kernel"], -lr * wd * np.asarray(
      params["head"]["kernel"]), rtol=1e-5)
  for leaf in (decay["ls"]["scale"], decay["head"]["bias"]):
    np.testing.assert_array_equal(leaf, 0.0)


def test_stats_batch_size_on_rows_flattened_over_the_batch_takes_the_first_rows():
  """A Dense given the patches already flattened over the batch, `(B * N, d)`, has no example
  axis left: `stats_batch_size=K` takes its first K rows (K patches of the first image), as
  docs/layer-coverage.md says, while the same Dense on `(B, N, d)` takes K images."""
  imgs = jax.random.normal(jax.random.key(1), (B, 8, 8, 3), jnp.float64)
  patches = imgs.reshape(B, 2, P, 2, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, 4, -1)
  dense = nn.Dense(D)
  params = ref.f64(dense.init(jax.random.key(0), patches)["params"])
  for x, rows in ((patches.reshape(-1, P * P * 3), ref.np64(patches).reshape(-1, 48)[:K]),
                  (patches, ref.np64(patches)[:K].reshape(-1, 48))):
    loss = lambda p, x: jnp.sum(jnp.sin(dense.apply({"params": p}, x)))
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss), has_aux=True)(params, x)
    state = factors_after_one_step(params, grads, acts, stats_batch_size=K)
    ref.assert_factor(state, "", rows)
