"""Weight decay of the presets: kernels and tables only, never a bias or a norm scale.

usage.md: `sngd_momentum`/`sngd_adam` decay "every parameter leaf of 2 or more axes (dense and
conv kernels, embedding tables), not biases or norm scales". Biases and norm scales can have
2 axes: an attention projection's bias (heads x head_dim) and every bias and scale of a block
stacked over depth by `nn.scan` (L x O). With zero gradients the preset's update is exactly
`-lr * wd * p` on a decayed leaf and 0 on any other (the reference, computed here in numpy).
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
@pytest.mark.parametrize("model,shape", [(_Attention(), (4, 5, 6)), (_Scanned(), (4, 6))],
                         ids=["attention", "scanned"])
def test_weight_decay_skips_every_bias_and_norm_scale(preset, model, shape):
  x = jax.random.normal(jax.random.key(1), shape)
  decayed = _decayed_leaves(model, x, PRESETS[preset])
  want = {name: name.endswith(("kernel", "embedding")) for name in decayed}
  assert decayed == want
