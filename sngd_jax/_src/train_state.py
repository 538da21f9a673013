"""Getting the activations to ``tx.update`` through code that does not pass them.

``TrainState``: Flax's ``TrainState`` whose ``apply_gradients`` takes them;
``with_activations``: a transform with them bound, for optax wrappers that call
their inner transform without keyword arguments (``optax.lookahead``,
``optax.contrib.sam``).
"""

from __future__ import annotations

from typing import Any, Optional

import optax
from flax.linen.fp8_ops import OVERWRITE_WITH_GRADIENT
from flax.training import train_state

from sngd_jax._src.capture.records import Activations


class TrainState(train_state.TrainState):
  """Flax's ``TrainState`` whose ``apply_gradients`` also takes ``activations``.

  The standard linen training loop calls ``state.apply_gradients(grads=grads)``,
  which has no way to pass ``sngd_jax.sngd``'s ``activations``. This
  subclass forwards them to ``tx.update(grads, opt_state, params,
  activations=activations)``; everything else (``create``, ``step``,
  ``apply_fn``, the ``overwrite_with_gradient`` collection, checkpointing) is
  Flax's. Any optax transform works: ``tx`` is wrapped with
  ``optax.with_extra_args_support``, so one without extra arguments
  (``optax.adam``) ignores them, and ``activations=None`` calls
  ``tx.update`` without them. A transform that needs other arguments of its
  own (``optax.contrib.reduce_on_plateau``'s ``value``) gets them from
  ``extra_args`` (Flax's ``apply_gradients`` has no way to pass them).

  Examples:
    ```python
    state = sngd_jax.TrainState.create(apply_fn=model.apply, params=params,
                                       tx=sngd_jax.sngd_momentum(0.03))

    @jax.jit
    def train_step(state, x, y):
      def loss_fn(params):
        logits = state.apply_fn({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), logits
      grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
      (loss, (logits, acts)), grads = grad_fn(state.params)
      return state.apply_gradients(grads=grads, activations=acts), loss
    ```
  """

  def apply_gradients(self, *, grads: Any, activations: Optional[Activations] = None,
                      extra_args: Optional[dict[str, Any]] = None,
                      **kwargs: Any) -> TrainState:
    """One optimizer step: ``tx.update`` with the activations, then ``apply_updates``.

    Args:
      grads: gradients with the structure of ``params``.
      activations: what ``sngd_jax.capture`` (or ``capture_nnx``)
        returned for this batch; None for an optimizer that needs none.
      extra_args: further keyword arguments for ``tx.update``, e.g.
        ``{"value": loss}`` for ``optax.contrib.reduce_on_plateau`` in the chain.
      **kwargs: further fields of the state to replace, as in Flax's.

    Returns:
      The state with ``step + 1``, the new ``params`` and ``opt_state``.
    """
    owg = OVERWRITE_WITH_GRADIENT in grads
    grads_with_opt = grads["params"] if owg else grads
    params_with_opt = self.params["params"] if owg else self.params
    extra = dict(extra_args or {})
    if activations is not None:
      if "activations" in extra:
        raise TypeError("sngd: TrainState.apply_gradients got activations twice (also in "
                        "extra_args); pass them once, as activations=")
      extra["activations"] = activations
    tx = self.tx
    if isinstance(tx, optax.MultiSteps):  # not a transform itself (sngd_jax.MultiSteps is one)
      tx = tx.gradient_transformation()
    updates, new_opt_state = optax.with_extra_args_support(tx).update(
        grads_with_opt, self.opt_state, params_with_opt, **extra)
    new_params_with_opt = optax.apply_updates(params_with_opt, updates)
    if owg:
      new_params = {"params": new_params_with_opt,
                    OVERWRITE_WITH_GRADIENT: grads[OVERWRITE_WITH_GRADIENT]}
    else:
      new_params = new_params_with_opt
    return self.replace(step=self.step + 1, params=new_params, opt_state=new_opt_state,
                        **kwargs)


def with_activations(tx: optax.GradientTransformation, activations: Optional[Activations],
                     **extra_args: Any) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` always receives ``activations`` (and ``extra_args``).

  Some optax wrappers call their inner transform's ``update(updates, state,
  params)`` without the keyword arguments they were given (``optax.lookahead``,
  ``optax.contrib.sam``), so ``activations=`` never reaches ``sngd``. Build
  such a wrapper inside the training step around ``with_activations(tx,
  acts)``: a transform is a pair of pure functions, so building it anew for
  each step costs nothing, and ``init`` is ``tx.init`` (the state from a
  wrapper built without the activations fits). Keyword arguments that the
  wrapper does pass are forwarded too; bound ones win.

  Examples:
    ```python
    tx = sngd_jax.sngd_momentum(0.03)
    params = optax.LookaheadParams.init_synced(params)
    opt_state = optax.lookahead(tx, sync_period=5, slow_step_size=0.5).init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
      (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
          params.fast, x, y)
      look = optax.lookahead(sngd_jax.with_activations(tx, acts), 5, 0.5)
      updates, opt_state = look.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss
    ```

  Args:
    tx: any optax transform (one without extra arguments ignores them).
    activations: what ``sngd_jax.capture`` (or ``capture_nnx``,
      ``capture_eqx``, ``capture_hk``) returned for this batch.
    **extra_args: further keyword arguments to bind.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` with ``tx``'s ``init``.
  """
  inner = optax.with_extra_args_support(tx)
  bound = {"activations": activations, **extra_args}

  def update_fn(updates, state, params=None, **passed):
    return inner.update(updates, state, params, **{**passed, **bound})

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
