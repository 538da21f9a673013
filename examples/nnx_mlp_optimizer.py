"""An NNX MLP on Fashion-MNIST trained with ``nnx.Optimizer``.

The step of Flax's NNX tutorials (``nnx.value_and_grad`` of a loss that
returns ``(loss, logits)``, then ``optimizer.update(model, grads)``), with
SNGD: the loss is wrapped by ``sngd_jax.capture_nnx(..., has_aux=True)`` and
the activations go to ``optimizer.update`` as a keyword.

Run from the repository root::

  python -m examples.nnx_mlp_optimizer --steps 300
"""

from __future__ import annotations

import jax.numpy as jnp
import optax
from flax import nnx

import sngd_jax
from examples import _common


class MLP(nnx.Module):
  def __init__(self, din: int, dhidden: int, dout: int, *, rngs: nnx.Rngs):
    self.hidden1 = nnx.Linear(din, dhidden, rngs=rngs)
    self.hidden2 = nnx.Linear(dhidden, dhidden, rngs=rngs)
    self.out = nnx.Linear(dhidden, dout, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(self.hidden1(x))
    x = nnx.relu(self.hidden2(x))
    return self.out(x)


def loss_fn(model: MLP, x, y):
  logits = model(x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits


@nnx.jit
def train_step(model: MLP, optimizer: nnx.Optimizer, x, y):
  grad_fn = nnx.value_and_grad(sngd_jax.capture_nnx(loss_fn, has_aux=True), has_aux=True)
  (loss, (logits, acts)), grads = grad_fn(model, x, y)
  optimizer.update(model, grads, activations=acts)
  return loss, jnp.mean(jnp.argmax(logits, -1) == y)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv, batch_size=(int, 128))
  data = _common.image_data()
  model = MLP(data.x_train.shape[1], 128, data.num_classes, rngs=nnx.Rngs(args.seed))
  optimizer = nnx.Optimizer(model, sngd_jax.sngd_momentum(0.05), wrt=nnx.Param)
  stream = _common.batches(data.x_train, data.y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(stream)
    loss, accuracy = train_step(model, optimizer, x, y)
    _common.log(step, args.steps, float(loss), accuracy=float(accuracy))


if __name__ == "__main__":
  main()
