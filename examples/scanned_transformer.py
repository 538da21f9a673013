"""A character-level transformer LM whose blocks are rematerialized and scanned over depth.

The blocks are written once and applied with ``nn.scan(nn.remat(Block), ...)``: their params
are stacked with a leading layer axis, which is how large models are written for TPUs. SNGD
gives every layer of the stack its own local Fisher (stored stacked, refreshed in the same
batched calls as the other blocks of its size) with the usual ``capture(loss_fn)`` call.

Run: ``python examples/scanned_transformer.py --steps 200`` (a few seconds per 10 steps on CPU).
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax

TEXT = ("structured natural gradient descent preconditions each layer by the inverse of its "
        "local fisher matrix, built from the inputs the layer saw. ") * 20


class Block(nn.Module):
  """Pre-norm causal self-attention and a ReLU MLP, with residuals (one layer of the stack)."""

  heads: int

  @nn.compact
  def __call__(self, x, _):
    width = x.shape[-1]
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=self.heads, name="attn")(
        nn.LayerNorm(name="ln1")(x), mask=mask)
    h = nn.relu(nn.Dense(4 * width, name="up")(nn.LayerNorm(name="ln2")(x)))
    return x + nn.Dense(width, name="down")(h), None


class LM(nn.Module):
  vocab: int
  width: int = 64
  heads: int = 4
  layers: int = 4
  context: int = 32

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.width, name="embed")(tokens)
    x = x + self.param("position", nn.initializers.normal(0.02), (self.context, self.width))
    blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=self.layers)
    x, _ = blocks(self.heads, name="blocks")(x, None)
    return nn.Dense(self.vocab, name="head")(nn.LayerNorm(name="ln_f")(x))


def batches(tokens: np.ndarray, batch: int, context: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  while True:
    start = rng.integers(0, len(tokens) - context - 1, size=batch)
    yield np.stack([tokens[s:s + context + 1] for s in start])


def main(argv=None) -> float:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--lr", type=float, default=0.1)
  args = parser.parse_args(argv)

  chars = sorted(set(TEXT))
  tokens = np.array([chars.index(c) for c in TEXT], np.int32)
  model = LM(vocab=len(chars))
  data = batches(tokens, args.batch, model.context)
  params = model.init(jax.random.key(0), jnp.asarray(next(data)[:, :-1]))["params"]

  def loss_fn(params, batch):
    logits = model.apply({"params": params}, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

  print(sngd_jax.coverage(loss_fn, params, jnp.asarray(next(data)), outputs=False))
  tx = sngd_jax.sngd_momentum(args.lr, factor_every=5, inverse_every=20)
  state = tx.init(params)

  @jax.jit
  def step(params, state, batch):
    # outputs=False: the default fisher="linear" reads only the layer inputs.
    (loss, acts), grads = jax.value_and_grad(
        sngd_jax.capture(loss_fn, outputs=False), has_aux=True)(params, batch)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  start, loss = time.perf_counter(), float("nan")
  for t in range(args.steps):
    params, state, loss = step(params, state, jnp.asarray(next(data)))
    if t % max(args.steps // 10, 1) == 0 or t == args.steps - 1:
      print(f"step {t:4d}  loss {float(loss):.3f}  ({time.perf_counter() - start:.1f} s)")
  return float(loss)


if __name__ == "__main__":
  main()
