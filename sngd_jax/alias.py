"""A complete SNGD optimizer in one call."""

from __future__ import annotations

from typing import Any

import jax
import optax

from sngd_jax.transform import sngd


def _kernel_mask(params: Any) -> Any:
  """True for weight matrices (ndim >= 2), False for biases and scales."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def sngd_momentum(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    **sngd_kwargs: Any,
) -> optax.GradientTransformationExtraArgs:
  """SNGD preconditioning followed by SGD with momentum and weight decay.

  ``chain(sngd(**sngd_kwargs), add_decayed_weights(weight_decay, mask=kernels),
  sgd(learning_rate, momentum))``: the update is

      m <- momentum * m + (G^{-1} g + weight_decay * W),   W <- W - lr * m,

  with weight decay decoupled from the preconditioner and applied to weight
  matrices only (not biases), as the reference code's L2 term was.

  Args:
    learning_rate: the step size, or a schedule.
    momentum: heavy-ball momentum (0 for plain SGD).
    nesterov: use Nesterov momentum.
    weight_decay: decoupled weight decay on kernels.
    **sngd_kwargs: passed to :func:`sngd_jax.sngd`.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    ``update``.
  """
  return optax.chain(
      sngd(**sngd_kwargs),
      optax.add_decayed_weights(weight_decay, mask=_kernel_mask),
      optax.sgd(learning_rate, momentum=momentum or None, nesterov=nesterov),
  )
