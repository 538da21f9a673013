"""Weight decay of the presets: kernels and tables only, never a bias, a norm scale or an
array that belongs to no layer.

usage.md: `sngd_momentum`/`sngd_adam` decay the kernels and embedding tables of the layers
`init` finds, not biases or norm scales. Biases and norm scales can have 2 axes: an attention
projection's bias (heads x head_dim) and every bias and scale of a block stacked over depth by
`nn.scan` (L x O). A ViT's class token `(1, 1, D)` and position embedding `(1, T, D)`, made by
`self.param`, belong to no layer and are not decayed (as timm's `no_weight_decay`). With zero
gradients the preset's update is exactly `-lr * wd * p` on a decayed leaf and 0 on any other
(the reference, computed here in numpy); over several steps of real gradients, the presets are
AdamW and momentum SGD written in float64 numpy with an explicit mask on `sngd()`'s output.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import sngd_jax

LR, WD = 0.1, 0.5


class _Attention(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(16)(x)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x, x)
    return nn.Dense(3)(nn.LayerNorm()(x)).mean(1)


class _Block(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return h + nn.Dense(8)(nn.LayerNorm()(h)), None


class _Scanned(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(8)(x)
    h, _ = nn.scan(_Block, variable_axes={"params": 0}, split_rngs={"params": True},
                   length=3)()(h, None)
    return nn.Dense(3)(h)


class _RawViT(nn.Module):
  """A ViT as Flax and big_vision write it: patches by a Dense, a class token and a position
  embedding made by `self.param` (no layer holds them), a pre-norm residual MLP, a head on
  the class token."""

  @nn.compact
  def __call__(self, x):  # x: (B, patches, features)
    h = nn.Dense(8, name="patch_embed")(x)
    cls = self.param("cls", nn.initializers.normal(0.02), (1, 1, h.shape[-1]))
    h = jnp.concatenate([jnp.tile(cls, (h.shape[0], 1, 1)), h], axis=1)
    h = h + self.param("pos_embedding", nn.initializers.normal(0.02), (1,) + h.shape[1:])
    h = h + nn.Dense(8)(nn.LayerNorm()(h))
    return nn.Dense(3, name="head")(nn.LayerNorm()(h)[:, 0])


def _decayed_leaves(model, x, make_tx):
  y = jnp.arange(x.shape[0]) % 3
  params = model.init(jax.random.key(0), x)["params"]
  params = jax.tree.map(lambda p: p + 0.3, params)  # no zero leaf: every decay shows

  def loss_fn(p, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                           y).mean()

  (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
  tx = make_tx()
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), tx.init(params), params,
                         activations=acts)
  out = {}
  for (key_path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                              jax.tree.leaves(params), strict=True):
    name = "/".join(k.key for k in key_path)
    u, p = np.asarray(u, np.float64), np.asarray(p, np.float64)
    if np.allclose(u, -LR * WD * p, rtol=1e-5, atol=0):
      out[name] = True
    else:
      np.testing.assert_array_equal(u, 0.0, err_msg=name)
      out[name] = False
  return out


PRESETS = {
    "sngd_adam": lambda: sngd_jax.sngd_adam(LR, weight_decay=WD),
    "sngd_momentum": lambda: sngd_jax.sngd_momentum(LR, momentum=0.0, weight_decay=WD),
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("model,shape", [(_Attention(), (4, 5, 6)), (_Scanned(), (4, 6)),
                                         (_RawViT(), (4, 3, 6))],
                         ids=["attention", "scanned", "vit"])
def test_weight_decay_skips_every_bias_and_norm_scale(preset, model, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  decayed = _decayed_leaves(model, x, PRESETS[preset])
  want = {name: name.split("/")[-1] in ("kernel", "embedding") for name in decayed}
  assert decayed == want


VIT_KERNELS = ("patch_embed", "Dense_0", "head")  # the explicit mask: these kernels only


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_on_a_vit_are_float64_adamw_and_sgd_with_kernels_masked(preset):
  """A ViT's raw `cls` and `pos_embedding` were decayed by the presets (every array of 2 or
  more axes that was no bias or norm scale), where timm's `no_weight_decay` and big_vision's
  `.*/kernel$` mask leave them out, and where the presets' docs promised "kernels and
  tables". Three steps of each preset against AdamW / momentum SGD in float64 numpy on
  `sngd()`'s output, with the weight decay masked to the three Dense kernels."""
  lr, wd, b1, b2, eps, mu = 0.05, 0.3, 0.8, 0.9, 1e-6, 0.7
  kw = dict(factor_every=1, inverse_every=1)
  tx = {"sngd_adam": lambda: sngd_jax.sngd_adam(lr, b1, b2, eps, weight_decay=wd, **kw),
        "sngd_momentum": lambda: sngd_jax.sngd_momentum(lr, momentum=mu, weight_decay=wd,
                                                        **kw)}[preset]
  with jax.enable_x64(True):
    model = _RawViT()
    x = jax.random.normal(jax.random.key(1), (4, 3, 6), jnp.float64)
    y = jnp.arange(4) % 3
    params = jax.tree.map(lambda p: p.astype(jnp.float64) + 0.3,
                          model.init(jax.random.key(0), x)["params"])
    assert params["cls"].shape == (1, 1, 8) and params["pos_embedding"].shape == (1, 4, 8)

    def loss_fn(p, x, y):
      return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                             y).mean()

    tx, pre = tx(), sngd_jax.sngd(**kw)
    state, pre_state = tx.init(params), pre.init(params)
    flat = lambda t: {"/".join(k.key for k in kp): np.asarray(a, np.float64)
                      for kp, a in jax.tree_util.tree_flatten_with_path(t)[0]}
    mask = {name: name.endswith("/kernel") and name.split("/")[0] in VIT_KERNELS
            for name in flat(params)}
    assert sum(mask.values()) == 3
    m = {n: 0.0 for n in mask}
    v = {n: 0.0 for n in mask}

    @jax.jit
    def step(p, state, pre_state):
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(p, x, y)
      updates, state = tx.update(grads, state, p, activations=acts)
      u, pre_state = pre.update(grads, pre_state, p, activations=acts)
      return updates, state, u, pre_state

    p = params
    for t in range(1, 4):
      updates, state, u, pre_state = step(p, state, pre_state)
      u, w, got = flat(u), flat(p), flat(updates)
      for n in mask:
        decay = wd * w[n] if mask[n] else 0.0
        if preset == "sngd_adam":
          m[n] = b1 * m[n] + (1 - b1) * u[n]
          v[n] = b2 * v[n] + (1 - b2) * u[n] ** 2
          want = -lr * ((m[n] / (1 - b1 ** t)) / (np.sqrt(v[n] / (1 - b2 ** t)) + eps) + decay)
        else:
          m[n] = mu * m[n] + u[n] + decay
          want = -lr * m[n]
        np.testing.assert_allclose(got[n], want, rtol=1e-9, atol=1e-13,
                                   err_msg=f"{n} step {t}")
      p = optax.apply_updates(p, updates)


def test_lora_adapters_are_no_layer_and_not_decayed_unless_chained_with_adamw():
  """`nnx.Optimizer(model, sngd_adam(lr, weight_decay=wd), wrt=nnx.LoRAParam)`: the adapters
  belong to no layer, so the preset does not decay them (docs/layer-coverage.md, *LoRA*);
  `chain(sngd(), adamw(lr, weight_decay=wd))` does: `-lr * wd * p` on each adapter (zero
  gradients, so the decay is all of AdamW's update)."""
  from flax import nnx  # noqa: PLC0415
  model = nnx.LoRALinear(4, 8, lora_rank=2, rngs=nnx.Rngs(0))
  params = jax.tree.map(lambda p: p + 0.3, nnx.state(model, nnx.LoRAParam))
  zeros = jax.tree.map(jnp.zeros_like, params)
  chained = optax.chain(sngd_jax.sngd(), optax.adamw(LR, weight_decay=WD))
  for tx, decayed in ((sngd_jax.sngd_adam(LR, weight_decay=WD), False), (chained, True)):
    with pytest.warns(UserWarning, match="sngd: found no layer in the params"):
      state = tx.init(params)
    updates, _ = tx.update(zeros, state, params, activations={})
    for (key_path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                                jax.tree.leaves(params), strict=True):
      want = -LR * WD * np.asarray(p, np.float64) if decayed else 0.0
      np.testing.assert_allclose(np.asarray(u, np.float64), want, rtol=1e-6, atol=0,
                                 err_msg=jax.tree_util.keystr(key_path))


def _decay_of(tx, params, grads, acts):
  """``{leaf path: True/False}``: the update of ``tx`` at zero gradients is exactly
  ``-LR * WD * p`` (decayed) or 0 (not decayed) on each leaf; anything else fails."""
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, grads), tx.init(params), params,
                         activations=acts)
  out = {}
  for (key_path, u), p in zip(jax.tree_util.tree_flatten_with_path(updates)[0],
                              jax.tree.leaves(params), strict=True):
    name, u, p = jax.tree_util.keystr(key_path), np.asarray(u, np.float64), np.asarray(p)
    out[name] = bool(np.allclose(u, -LR * WD * p, rtol=1e-5, atol=0))
    if not out[name]:
      np.testing.assert_array_equal(u, 0.0, err_msg=name)
  return out


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_haiku_presets_decay_w_and_embeddings_only(preset):
  """docs/hyperparameters.md, *Weight decay*, for Haiku: ``w`` of ``hk.Linear`` and ``hk.Conv1D``
  and ``embeddings`` of ``hk.Embed`` are decayed; ``b``, ``hk.LayerNorm``'s ``scale`` and
  ``offset`` and a raw ``(1, 4)`` array of no layer (``hk.get_parameter``) are not."""
  import haiku as hk  # noqa: PLC0415

  def fn(tokens):
    h = hk.Embed(9, 4)(tokens)
    h = hk.Conv1D(4, 2)(h) * hk.get_parameter("gate", (1, 4), init=jnp.ones)
    h = hk.LayerNorm(-1, create_scale=True, create_offset=True)(jnp.tanh(h))
    return hk.Linear(3)(h).mean(1)

  model = hk.without_apply_rng(hk.transform(fn))
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])
  params = jax.tree.map(lambda p: p + 0.3, model.init(jax.random.key(0), tokens))
  loss_fn = lambda p, t: jnp.sum(jnp.sin(model.apply(p, t)))
  (_, acts), grads = jax.value_and_grad(sngd_jax.capture_hk(loss_fn), has_aux=True)(params,
                                                                                      tokens)
  decay = _decay_of(PRESETS[preset](), params, grads, acts)
  want = {f"['{module}']['{name}']": name in ("w", "embeddings")
          for module, leaves in params.items() for name in leaves}
  assert decay == want


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_equinox_presets_decay_layer_weights_only(preset):
  """docs/hyperparameters.md, *Weight decay*, for Equinox: the ``weight`` of ``eqx.nn.Linear``,
  ``eqx.nn.Conv1d`` and ``eqx.nn.Embedding`` is decayed; biases, ``eqx.nn.LayerNorm``'s weight
  and bias and a raw ``(1, 4)`` array field of no layer are not."""
  import equinox as eqx  # noqa: PLC0415

  class Net(eqx.Module):
    embed: eqx.nn.Embedding
    conv: eqx.nn.Conv1d
    norm: eqx.nn.LayerNorm
    head: eqx.nn.Linear
    gate: jax.Array

    def __init__(self, key):
      k = jax.random.split(key, 3)
      self.embed = eqx.nn.Embedding(9, 4, key=k[0])
      self.conv = eqx.nn.Conv1d(4, 4, 2, key=k[1])
      self.norm = eqx.nn.LayerNorm(4)
      self.head = eqx.nn.Linear(4, 3, key=k[2])
      self.gate = jnp.ones((1, 4))

    def __call__(self, tokens):  # one example: (T,) tokens
      h = jax.vmap(self.embed)(tokens).T  # (4, T), channels first
      h = (self.conv(h).T * self.gate)
      h = jax.vmap(self.norm)(jnp.tanh(h))
      return jax.vmap(self.head)(h).mean(0)

  model = jax.tree.map(lambda p: p + 0.3 if eqx.is_inexact_array(p) else p,
                       Net(jax.random.key(0)))
  tokens = jnp.array([[1, 4, 4, 0], [4, 1, 2, 7]])
  loss_fn = lambda m, t: jnp.sum(jnp.sin(jax.vmap(m)(t)))
  (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(loss_fn), has_aux=True)(
      model, tokens)
  params = eqx.filter(model, eqx.is_inexact_array)
  decay = _decay_of(PRESETS[preset](), params, grads, acts)
  want = {f".{layer}.{name}": name == "weight" and layer != "norm"
          for layer in ("embed", "conv", "norm", "head") for name in ("weight", "bias")
          if not (layer == "embed" and name == "bias")}
  assert decay == {**want, ".gate": False}
