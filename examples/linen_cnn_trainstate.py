"""A linen CNN on Fashion-MNIST trained with ``sngd_jax.TrainState``.

The training step of Flax's own MNIST example (a ``TrainState``, a loss that
returns ``(loss, logits)``), with SNGD: the loss is wrapped by
``sngd_jax.capture(..., has_aux=True)`` and the activations go to
``state.apply_gradients``. One ``jax.jit`` holds the whole step, so the
activations never leave the compiled function.

Run from the repository root::

  python -m examples.linen_cnn_trainstate --steps 200
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import sngd_jax
from examples import _common


class CNN(nn.Module):
  """Flax's MNIST CNN, narrower: two conv + pool stages, then two dense layers."""

  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.avg_pool(nn.relu(nn.Conv(16, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.avg_pool(nn.relu(nn.Conv(32, (3, 3))(x)), (2, 2), strides=(2, 2))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.num_classes)(x)


@jax.jit
def train_step(state: sngd_jax.TrainState, images, labels):
  def loss_fn(params):
    logits = state.apply_fn({"params": params}, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits

  grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
  (loss, (logits, acts)), grads = grad_fn(state.params)
  state = state.apply_gradients(grads=grads, activations=acts)
  return state, loss, jnp.mean(jnp.argmax(logits, -1) == labels)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=200, argv=argv, batch_size=(int, 128))
  data = _common.image_data()
  shape = (-1,) + data.image_shape
  model = CNN(data.num_classes)
  params = model.init(jax.random.key(args.seed), jnp.zeros((1,) + data.image_shape))["params"]
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params,
                                     tx=sngd_jax.sngd_momentum(0.05))
  stream = _common.batches(data.x_train, data.y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(stream)
    state, loss, accuracy = train_step(state, x.reshape(shape), y)
    _common.log(step, args.steps, float(loss), accuracy=float(accuracy))


if __name__ == "__main__":
  main()
