"""SNGD on part of a linen MLP, Adam on the rest, with ``optax.multi_transform``.

A common split: the hidden layers get SNGD (``sngd_jax.sngd_momentum``), the output
layer gets Adam. ``optax.multi_transform`` hands each optimizer its own part of the
params (the rest as ``optax.MaskedNode``) and passes ``activations=`` on to both; SNGD
ignores the activations of the layer it does not own. The training step is
``linen_cnn_trainstate``'s (``sngd_jax.TrainState``): only the optimizer differs.
``optax.masked``, or an ``nnx.Optimizer`` with a ``wrt`` filter (frozen layers), work
the same way (``docs/training-loops.md``).

Run from the repository root::

  python -m examples.partial_model --steps 300
"""

from __future__ import annotations

import flax.linen as nn
import jax
import optax

import sngd_jax
from examples import _common
from examples.linen_cnn_trainstate import train_step


class MLP(nn.Module):
  hidden: int = 128
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(self.hidden, name="hidden1")(x))
    x = nn.relu(nn.Dense(self.hidden, name="hidden2")(x))
    return nn.Dense(self.num_classes, name="head")(x)


def make_tx() -> optax.GradientTransformation:
  labels = {"hidden1": "sngd", "hidden2": "sngd", "head": "adam"}  # a prefix of the params
  return optax.multi_transform(
      {"sngd": sngd_jax.sngd_momentum(0.05), "adam": optax.adam(1e-3)}, labels)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv, batch_size=(int, 128))
  data = _common.image_data()
  model = MLP(num_classes=data.num_classes)
  params = model.init(jax.random.key(args.seed), data.x_train[:1])["params"]
  state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params, tx=make_tx())
  stream = _common.batches(data.x_train, data.y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(stream)
    state, loss, accuracy = train_step(state, x, y)
    _common.log(step, args.steps, float(loss), accuracy=float(accuracy))


if __name__ == "__main__":
  main()
