"""The smoke-training check shared by the layer-family tests (conv, attention, recurrent, NNX).

Each family test builds a small model of its kind, checks its coverage report,
and then calls :func:`assert_trains`: a few dozen steps of ``sngd_momentum``
must bring the loss well below its start.
"""

import jax
import numpy as np
import optax
from flax import nnx
from helpers_mlp import sngd_train_step

import sngd_jax


def softmax_loss(apply):
  """``loss(model, x, y)``: the mean softmax cross-entropy of ``apply(model, x)``'s logits."""

  def loss_fn(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(apply(model, x), y).mean()

  return loss_fn


def _nnx_step(loss_fn, model, tx):
  """``step(x, y)``: one ``nnx.Optimizer`` update of ``model`` with captured activations."""
  opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def update(model, opt, x, y):
    loss_and_acts = sngd_jax.capture_nnx(loss_fn, outputs=True)  # some tests use rfim
    (_, acts), grads = nnx.value_and_grad(loss_and_acts, has_aux=True)(model, x, y)
    opt.update(model, grads, activations=acts)

  return lambda x, y: update(model, opt, x, y)


def assert_trains(loss_fn, model, batches, *, learning_rate, max_ratio, eval_batch=None,
                  inverse_every=10):
  """Trains with ``sngd_momentum(learning_rate, momentum=0.9)``; the loss must fall.

  Args:
    loss_fn: ``loss_fn(model, x, y)``, a scalar.
    model: linen params (one jitted step through ``sngd_jax.capture``) or an NNX
      module (updated in place by ``nnx.Optimizer`` through ``sngd_jax.capture_nnx``).
    batches: the ``(x, y)`` of each step, in order.
    learning_rate: the step size.
    max_ratio: the loss after the last step must be finite and below
      ``max_ratio`` times the loss before the first.
    eval_batch: the ``(x, y)`` the loss is measured on; the first batch if None.
    inverse_every: steps between inverse refreshes.

  Returns:
    ``(before, after)``, the two losses.
  """
  tx = sngd_jax.sngd_momentum(learning_rate, momentum=0.9, inverse_every=inverse_every)
  eval_x, eval_y = batches[0] if eval_batch is None else eval_batch
  if isinstance(model, nnx.Module):
    step = _nnx_step(loss_fn, model, tx)
    evaluate = lambda: float(nnx.jit(loss_fn)(nnx.clone(model), eval_x, eval_y))
    before = evaluate()
    for x, y in batches:
      step(x, y)
  else:
    params, state = model, tx.init(model)
    step = sngd_train_step(tx, loss_fn)
    full = jax.jit(loss_fn)
    evaluate = lambda: float(full(params, eval_x, eval_y))
    before = evaluate()
    for x, y in batches:
      params, state, _ = step(params, state, x, y)
  after = evaluate()
  print(f"loss {before:.3f} -> {after:.3f}")
  assert np.isfinite(after) and after < max_ratio * before, (before, after)
  return before, after
