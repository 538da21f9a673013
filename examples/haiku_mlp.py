"""A Haiku MLP with BatchNorm on Fashion-MNIST trained with SNGD.

Needs the haiku extra: ``pip install "sngd_jax[haiku]"``.

The Haiku way: the model is a function made pure by ``hk.transform_with_state``; its params
and its state (BatchNorm's moving averages) are dicts keyed by module name. SNGD needs two
changes to a plain optax loop: wrap the loss with ``sngd_jax.capture_hk`` and pass the
activations to ``update``. The loss returns ``(loss, new_state)``, so the capture gets
``has_aux=True``.

Run from the repository root::

  python -m examples.haiku_mlp --steps 300
"""

from __future__ import annotations

import haiku as hk
import jax
import jax.numpy as jnp
import optax

import sngd_jax
from examples import _common


def forward(x, is_training):
  h = hk.Linear(128)(x)
  h = jax.nn.relu(hk.BatchNorm(True, True, decay_rate=0.9)(h, is_training))
  h = jax.nn.relu(hk.Linear(128)(h))
  return hk.Linear(10)(h)


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv,
                            batch_size=(int, 128), lr=(float, 0.03))
  data = _common.image_data()
  x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
  model = hk.without_apply_rng(hk.transform_with_state(forward))
  params, state = model.init(jax.random.PRNGKey(args.seed), jnp.asarray(x_train[:8]), True)

  def loss_fn(params, state, x, y):
    logits, state = model.apply(params, state, x, True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), state

  if args.steps > 20:
    print(sngd_jax.coverage(loss_fn, params, state, x_train[:8], y_train[:8]))
  tx = sngd_jax.sngd_momentum(args.lr)
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, state, opt_state, x, y):
    (loss, (state, acts)), grads = jax.value_and_grad(
        sngd_jax.capture_hk(loss_fn, has_aux=True), has_aux=True)(params, state, x, y)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return optax.apply_updates(params, updates), state, opt_state, loss

  batches = _common.batches(x_train, y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(batches)
    params, state, opt_state, loss = train_step(params, state, opt_state, jnp.asarray(x),
                                                jnp.asarray(y))
    _common.log(step, args.steps, float(loss))
  logits, _ = model.apply(params, state, jnp.asarray(x_test[:2000]), False)
  print(f"test accuracy {float(jnp.mean(jnp.argmax(logits, -1) == y_test[:2000])):.3f}")


if __name__ == "__main__":
  main()
