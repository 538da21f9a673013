"""An Equinox MLP classifier on Fashion-MNIST trained with SNGD.

Needs the equinox extra: ``pip install "sngd_jax[equinox]"``.

The Equinox way: layers are called per example under the user's ``jax.vmap``,
the model is a pytree, and ``eqx.filter_value_and_grad`` differentiates its
floating-point arrays. SNGD needs two changes to a plain optax loop: wrap the
loss with ``sngd_jax.capture_eqx`` and pass the activations to ``update``.
The loss returns ``(loss, logits)``, so the capture gets ``has_aux=True``.

Run from the repository root::

  python -m examples.equinox_mlp --steps 300
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import sngd_jax
from examples import _common


def main(argv=None):
  args = _common.parse_args(__doc__.splitlines()[0], steps=300, argv=argv,
                            batch_size=(int, 128), lr=(float, 0.03))
  data = _common.image_data()
  x_train, y_train, x_test, y_test = data.x_train, data.y_train, data.x_test, data.y_test
  model = eqx.nn.MLP(x_train.shape[1], data.num_classes, width_size=128, depth=2,
                     key=jax.random.key(args.seed))

  def loss_fn(model, x, y):
    logits = jax.vmap(model)(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits

  if args.steps > 20:
    print(sngd_jax.coverage(loss_fn, model, x_train[:8], y_train[:8]))
  tx = sngd_jax.sngd_momentum(args.lr)
  opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))

  @eqx.filter_jit
  def train_step(model, opt_state, x, y):
    (loss, (_logits, acts)), grads = eqx.filter_value_and_grad(
        sngd_jax.capture_eqx(loss_fn, has_aux=True), has_aux=True)(model, x, y)
    params = eqx.filter(model, eqx.is_inexact_array)
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    return eqx.apply_updates(model, updates), opt_state, loss

  batches = _common.batches(x_train, y_train, args.batch_size, args.seed)
  for step in range(args.steps):
    x, y = next(batches)
    model, opt_state, loss = train_step(model, opt_state, jnp.asarray(x), jnp.asarray(y))
    _common.log(step, args.steps, float(loss))
  logits = jax.vmap(model)(jnp.asarray(x_test[:2000]))
  print(f"test accuracy {float(jnp.mean(jnp.argmax(logits, -1) == y_test[:2000])):.3f}")


if __name__ == "__main__":
  main()
