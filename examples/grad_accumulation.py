"""Gradient accumulation with ``sngd_jax.MultiSteps`` (an MLP on Fashion-MNIST).

``sngd_jax.MultiSteps(tx, every_k_schedule=k)`` is ``optax.MultiSteps`` for
SNGD: each call takes one micro-batch's gradients and activations, and every
``k``-th call applies the update of the whole batch, with the mean gradient and
the local-Fisher statistics of all ``k`` micro-batches (``optax.MultiSteps``
would let only the last micro-batch's activations reach SNGD). ``k`` micro-batches
of ``n`` examples give the update of one batch of ``k n`` at the memory of one
micro-batch.

Run from the repository root::

  python -m examples.grad_accumulation --steps 100 --micro-batches 4
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
import optax

import sngd_jax
from examples import _common


class MLP(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128)(x))
    x = nn.relu(nn.Dense(128)(x))
    return nn.Dense(self.num_classes)(x)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=100, argv=argv,
                            micro_batches=(int, 4), micro_batch_size=(int, 64))
  data = _common.image_data()
  model = MLP(data.num_classes)
  params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
  tx = sngd_jax.MultiSteps(sngd_jax.sngd_momentum(0.05), every_k_schedule=args.micro_batches)
  opt_state = tx.init(params)

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def micro_step(params, opt_state, x, y):
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        params, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), opt_state, loss  # zero updates until the k-th

  stream = _common.batches(data.x_train, data.y_train, args.micro_batch_size, args.seed)
  for step in range(args.steps):
    losses = []
    for _ in range(args.micro_batches):
      x, y = next(stream)
      params, opt_state, loss = micro_step(params, opt_state, x, y)
      losses.append(float(loss))
    assert bool(tx.has_updated(opt_state))
    _common.log(step, args.steps, float(np.mean(losses)))


if __name__ == "__main__":
  main()
