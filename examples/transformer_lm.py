"""A small decoder-only transformer language model on bundled text (characters).

Token and position embeddings, pre-norm blocks of causal multi-head
self-attention and an MLP, and an output layer tied to the token embedding
(``nn.Embed.attend``, as in GPT-2; ``--tied 0`` gives it its own ``Dense``);
trained on the Zen of Python (shipped with Python as ``this``), next character
prediction. Every parameter gets a local Fisher: the position embedding a
diagonal one, the tied token embedding both the lookup's diagonal one and the
output layer's (``fisher={"Embed_0": "tied"}``: ``G_h = E[h h^T]`` over the
output layer's inputs), the attention projections (``DenseGeneral``) and MLP layers one per
layer over all tokens, the layer norms one per channel. ``sngd_jax.coverage``
prints which.

Run from the repository root::

  python -m examples.transformer_lm --steps 300
"""

from __future__ import annotations

import codecs
import contextlib
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from examples import _common

with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the text
  import this

TEXT = codecs.decode(this.s, "rot13")


class Block(nn.Module):
  heads: int

  @nn.compact
  def __call__(self, x, mask):
    x = x + nn.MultiHeadDotProductAttention(self.heads)(nn.LayerNorm()(x), mask=mask)
    h = nn.gelu(nn.Dense(4 * x.shape[-1])(nn.LayerNorm()(x)))
    return x + nn.Dense(x.shape[-1])(h)


class TransformerLM(nn.Module):
  vocab: int
  context: int
  width: int = 64
  depth: int = 2
  heads: int = 4
  tied: bool = True

  @nn.compact
  def __call__(self, tokens):
    positions = jnp.arange(tokens.shape[-1])
    embed = nn.Embed(self.vocab, self.width)  # Embed_0
    x = embed(tokens) + nn.Embed(self.context, self.width)(positions)
    mask = nn.make_causal_mask(tokens)
    for _ in range(self.depth):
      x = Block(self.heads)(x, mask)
    x = nn.LayerNorm()(x)
    return embed.attend(x) if self.tied else nn.Dense(self.vocab)(x)


def text_batches(data: np.ndarray, context: int, batch_size: int, seed: int):
  """Random windows of ``context + 1`` characters: inputs and next-character targets."""
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - context - 1, batch_size)
    windows = np.stack([data[s:s + context + 1] for s in starts])
    yield windows[:, :-1], windows[:, 1:]


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv,
                            batch_size=(int, 32), context=(int, 64), tied=(int, 1),
                            lr=(float, 1e-2))
  chars = sorted(set(TEXT))
  data = np.array([chars.index(c) for c in TEXT], np.int32)
  model = TransformerLM(len(chars), args.context, tied=bool(args.tied))
  # The tied table is also the output layer: it is preconditioned as both layers.
  fisher = {"Embed_0": "tied"} if args.tied else "linear"
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, args.context), jnp.int32))
  params = params["params"]

  def loss_fn(params, tokens, targets):
    logits = model.apply({"params": params}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  stream = text_batches(data, args.context, args.batch_size, args.seed)
  x, y = next(stream)
  if args.steps > 20:
    print(sngd_jax.coverage(loss_fn, params, x, y, fisher=fisher))
  # Adam on the preconditioned gradient: on this tied model it ended lower than SGD momentum
  # on it and than Adam (benchmarks/README.md, *Tied embeddings*; lr 1e-2 was its best there).
  tx = sngd_jax.sngd_adam(args.lr, fisher=fisher)
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
