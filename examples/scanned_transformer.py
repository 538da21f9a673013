"""A transformer language model whose blocks are rematerialized and scanned over depth.

The blocks are written once and applied with ``nn.scan(nn.remat(Block), ...)``:
their params are stacked with a leading layer axis, which is how large models
are written for TPU runs. SNGD gives every layer of the stack its own local
Fisher (stored stacked, refreshed in the same batched kernel calls as the other
blocks of its size) through the usual ``capture(loss_fn)`` call, with no model
change. ``stacked={"blocks": 1}`` tells ``sngd`` that the params under
``blocks`` carry one leading layer axis (a biased layer shows it by its bias;
a bias-free one cannot, so the option names the subtree). Trained on the Zen
of Python (shipped with Python as ``this``), next character prediction.

Run from the repository root::

  python -m examples.scanned_transformer --steps 300
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from examples import _common
from examples.transformer_lm import TEXT, text_batches


class Block(nn.Module):
  """Pre-norm causal self-attention and a GELU MLP, with residuals (one layer of the stack)."""

  heads: int

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
        nn.LayerNorm(name="ln1")(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * x.shape[-1], name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(x.shape[-1], name="down")(h), None


class ScannedLM(nn.Module):
  vocab: int
  context: int
  width: int = 64
  depth: int = 4
  heads: int = 4

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    x = nn.Embed(self.vocab, self.width)(tokens) + nn.Embed(self.context, self.width)(positions)
    blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.depth)
    x, _ = blocks(self.heads, name="blocks")(x, None)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv,
                            batch_size=(int, 32), context=(int, 64), lr=(float, 0.03))
  chars = sorted(set(TEXT))
  data = np.array([chars.index(c) for c in TEXT], np.int32)
  model = ScannedLM(len(chars), args.context)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.context), jnp.int32))
  params = params["params"]

  def loss_fn(params, tokens, targets):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  stream = text_batches(data, args.context, args.batch_size, args.seed)
  x, y = next(stream)
  if args.steps > 20:
    print(sngd_jax.coverage(loss_fn, params, x, y, stacked={"blocks": 1}))
  tx = sngd_jax.sngd_momentum(args.lr, stacked={"blocks": 1})
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, tokens, targets):
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, tokens, targets)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss

  for step in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, x, y)
    _common.log(step, args.steps, float(loss))
    x, y = next(stream)


if __name__ == "__main__":
  main()
