"""A linen LSTM (``nn.RNN``) reading Fashion-MNIST images row by row.

Each image is a sequence of its rows (28 steps of 28 pixels); an LSTM run by
``nn.RNN`` reads it and a dense layer classifies the last hidden state. SNGD
preconditions the cell's input and hidden-to-hidden layers with statistics
pooled over every time step (``capture`` records each step of the scan).
The activations are captured in one jitted function and the update runs in
another (the two-jit step of many codebases): ``capture`` returns a plain
pytree that crosses ``jax.jit`` like the gradients; it holds only the layer
inputs (all that the default ``fisher="linear"`` reads).

Run from the repository root::

  python -m examples.lstm_sequence --steps 200
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sngd_jax
from examples import _common


class RowLSTM(nn.Module):
  hidden: int = 64
  num_classes: int = 10

  @nn.compact
  def __call__(self, rows):  # (batch, time, features)
    h = nn.RNN(nn.OptimizedLSTMCell(self.hidden))(rows)
    return nn.Dense(self.num_classes)(h[:, -1])


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=200, argv=argv, batch_size=(int, 64))
  data = _common.image_data()
  height, width, _ = data.image_shape
  model = RowLSTM(num_classes=data.num_classes)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1, height, width)))["params"]
  tx = sngd_jax.sngd_momentum(0.05)
  opt_state = tx.init(params)

  def loss_fn(params, rows, labels):
    logits = model.apply({"params": params}, rows)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  @jax.jit
  def gradients(params, rows, labels):
    (loss, acts), grads = jax.value_and_grad(
        sngd_jax.capture(loss_fn), has_aux=True)(params, rows, labels)
    return loss, grads, acts

  @jax.jit
  def apply(params, opt_state, grads, acts):
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state

  stream = _common.batches(data.x_train, data.y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(stream)
    loss, grads, acts = gradients(params, x.reshape(-1, height, width), y)
    params, opt_state = apply(params, opt_state, grads, acts)
    _common.log(step, args.steps, float(loss))


if __name__ == "__main__":
  main()
