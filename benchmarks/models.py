"""The benchmark networks, as plain Flax linen modules (nothing SNGD specific)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLP(nn.Module):
  """Dense ReLU layers; the last layer is linear (logits or a code)."""

  sizes: Sequence[int]  # hidden and output widths (input width comes from the data)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    for i, width in enumerate(self.sizes):
      x = nn.Dense(width)(x)
      if i < len(self.sizes) - 1:
        x = nn.relu(x)
    return x


class Autoencoder(nn.Module):
  """The classic deep autoencoder (Hinton and Salakhutdinov, 2006), ReLU, linear code.

  ``784-1000-500-250-30`` and back; returns reconstruction logits (sigmoid
  cross-entropy against pixel intensities in ``[0, 1]``).
  """

  widths: Sequence[int] = (1000, 500, 250, 30)

  @nn.compact
  def __call__(self, x):
    x = x.reshape(x.shape[0], -1)
    out = x.shape[-1]
    for i, w in enumerate(self.widths):
      x = nn.Dense(w)(x)
      if i < len(self.widths) - 1:
        x = nn.relu(x)
    for w in list(self.widths[-2::-1]) + [out]:
      x = nn.Dense(w)(x)
      if w != out:
        x = nn.relu(x)
    return x


class CNN(nn.Module):
  """Two 3x3 conv layers with 2x2 max pooling, then a dense head."""

  image_shape: Sequence[int]
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0],) + tuple(self.image_shape))
    for ch in (32, 64):
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


class ResBlock(nn.Module):
  channels: int

  @nn.compact
  def __call__(self, x):
    y = nn.relu(nn.Conv(self.channels, (3, 3))(x))
    y = nn.Conv(self.channels, (3, 3))(y)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """A small ResNet-style network: stem, residual blocks, pooling, dense head (no norm)."""

  image_shape: Sequence[int]
  num_classes: int = 10
  channels: int = 32
  blocks: int = 2

  @nn.compact
  def __call__(self, x):
    x = x.reshape((x.shape[0],) + tuple(self.image_shape))
    x = nn.relu(nn.Conv(self.channels, (3, 3), strides=(2, 2))(x))
    for _ in range(self.blocks):
      x = ResBlock(self.channels)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class CharRNN(nn.Module):
  """Character-level language model: embedding, one recurrent layer of the class attribute
  ``cell`` (not a field: the subclasses set it), dense softmax head."""

  vocab: int
  hidden: int = 128
  embed: int = 32
  cell = nn.OptimizedLSTMCell

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, self.embed)(tokens)
    x = nn.RNN(self.cell(self.hidden))(x)
    return nn.Dense(self.vocab)(x)


class CharLSTM(CharRNN):
  """Character-level language model: embedding, one LSTM layer, dense softmax head."""

  cell = nn.OptimizedLSTMCell


# --------------------------------------------------------------------------------------
# The evaluation set (benchmarks/evaluate.py): models no default was ever tuned on.
# --------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
  """conv(c1)-pool-conv(c2)-pool-dense(h)-classes, 3x3 convs, ReLU."""

  image_shape: Sequence[int]
  num_classes: int = 10
  channels: Sequence[int] = (16, 32)
  hidden: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0],) + tuple(self.image_shape))
    for ch in self.channels:
      x = nn.relu(nn.Conv(ch, (3, 3))(x))
      x = nn.max_pool(x, (2, 2), (2, 2))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(self.num_classes)(x)


class BNBlock(nn.Module):
  """conv-BN-ReLU-conv-BN plus the identity, then ReLU (a basic ResNet block)."""

  channels: int

  @nn.compact
  def __call__(self, x, train: bool):
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.relu(norm()(nn.Conv(self.channels, (3, 3), use_bias=False)(x)))
    y = norm()(nn.Conv(self.channels, (3, 3), use_bias=False)(y))
    return nn.relu(x + y)


class ResNetBN(nn.Module):
  """Stem conv (stride 2)-BN-ReLU, residual blocks with BatchNorm, global pooling, dense."""

  image_shape: Sequence[int]
  num_classes: int = 10
  channels: int = 16
  blocks: int = 2

  @nn.compact
  def __call__(self, x, train: bool = True):
    x = x.reshape((x.shape[0],) + tuple(self.image_shape))
    x = nn.Conv(self.channels, (3, 3), strides=(2, 2), use_bias=False)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for _ in range(self.blocks):
      x = BNBlock(self.channels)(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes)(x)


class TransformerBlock(nn.Module):
  """Pre-LayerNorm causal self-attention and a ReLU MLP, both residual."""

  dim: int
  heads: int

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2], jnp.int32))
    y = nn.LayerNorm()(x)
    x = x + nn.MultiHeadDotProductAttention(self.heads)(y, y, mask=mask)
    y = nn.LayerNorm()(x)
    y = nn.Dense(self.dim)(nn.relu(nn.Dense(4 * self.dim)(y)))
    return x + y


class TransformerLM(nn.Module):
  """A small causal character transformer: token and position embeddings, blocks, head."""

  vocab: int
  length: int
  dim: int = 64
  heads: int = 4
  blocks: int = 2

  @nn.compact
  def __call__(self, tokens, train: bool = True):
    del train
    x = nn.Embed(self.vocab, self.dim)(tokens)
    x = x + nn.Embed(self.length, self.dim)(jnp.arange(tokens.shape[1]))[None]
    for _ in range(self.blocks):
      x = TransformerBlock(self.dim, self.heads)(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


# --------------------------------------------------------------------------------------
# Held-out set 2 (benchmarks/README.md, *Held-out set 2*): added 2026-12-05, after every
# default was fixed, and run once.
# --------------------------------------------------------------------------------------

class Conv1DNet(nn.Module):
  """1-D convs over a signal: conv32(k5)-conv32(k5)-pool-conv64(k3)-pool-dense64-classes."""

  length: int
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = True):
    del train
    x = x.reshape((x.shape[0], self.length, 1))
    x = nn.relu(nn.Conv(32, (5,))(x))
    x = nn.relu(nn.Conv(32, (5,))(x))
    x = nn.max_pool(x, (2,), (2,))
    x = nn.relu(nn.Conv(64, (3,))(x))
    x = nn.max_pool(x, (2,), (2,))
    x = x.reshape(x.shape[0], -1)
    x = nn.relu(nn.Dense(64)(x))
    return nn.Dense(self.num_classes)(x)


class CharGRU(CharRNN):
  """Character-level language model: embedding, one GRU layer, dense softmax head."""

  cell = nn.GRUCell
