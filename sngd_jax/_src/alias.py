"""A complete SNGD optimizer in one call."""

from __future__ import annotations

import inspect
from typing import Any, Optional

import jax
import optax

from sngd_jax._src import layers as layers_lib
from sngd_jax._src import paths
from sngd_jax._src.config import DEFAULTS, AxisName
from sngd_jax._src.inverse.base import InverseMethod
from sngd_jax._src.transform import sngd


def _preconditioner(arguments: dict[str, Any]) -> optax.GradientTransformationExtraArgs:
  """``sngd(...)`` with the arguments of ``sngd`` found in an alias's ``locals()``.

  The aliases spell out every ``sngd`` argument (so that ``optax.inject_hyperparams``
  sees them); this forwards them in one place.
  """
  return sngd(**{name: arguments[name] for name in _SNGD_ARGS})


_SNGD_ARGS = tuple(inspect.signature(sngd).parameters)


def _kernel_mask_for(stacked: layers_lib.StackSpec):
  """The weight-decay mask: ``_kernel_mask`` with the ``stacked`` the alias was given."""
  return lambda params: _kernel_mask(params, stacked)


def _check_arrays(params: Any) -> None:
  """Raises a TypeError naming the path of a params leaf that is not an array."""
  def check(key_path, p):
    if not hasattr(p, "ndim"):
      raise TypeError(
          f"sngd: the params hold a {type(p).__name__} at "
          f"{paths.join(paths.leaf_parts(key_path))!r}, not an array: pass only the arrays "
          "to `init` and `update` (an Equinox model: `eqx.filter(model, eqx.is_array)`)")
  jax.tree_util.tree_map_with_path(check, params)


def _params_checked(tx: optax.GradientTransformationExtraArgs
                    ) -> optax.GradientTransformationExtraArgs:
  """``tx`` whose ``update`` first checks that ``params`` holds arrays only.

  The weight decay's mask is computed from the updates, so params with a leaf the updates
  lack (an Equinox model passed whole: its activation functions) failed inside optax's
  masking with a bare pytree-structure error; ``init`` already names the path and the fix.
  """
  def update(updates, state, params=None, **extra_args):
    if params is not None:
      _check_arrays(params)
    return tx.update(updates, state, params, **extra_args)
  return optax.GradientTransformationExtraArgs(tx.init, update)


def _kernel_mask(params: Any, stacked: layers_lib.StackSpec = None) -> Any:
  """True for the kernels and embedding tables of the layers ``discover`` finds (dense and conv
  kernels, tables; Haiku's ``w`` and ``embeddings``; Equinox layers' weights), False for every
  other leaf: biases and norm scales, and arrays that belong to no layer.

  A layer's kernel is decayed whatever ``fisher`` says of it (a layer left out with
  ``fisher={path: None}``, or one whose shapes fit no modelled layer, keeps a kernel). A bias
  or norm scale can have 2 or more axes: an attention projection's bias (``heads x
  head_dim``), and every bias and norm scale of a layer stacked over depth (``nn.scan``:
  ``L x O``); none is decayed. An array no layer holds (a ViT's class token ``(1, 1, D)`` and
  position embedding ``(1, T, D)`` made by ``self.param``, a LayerScale's factor, a learned
  temperature) is not decayed either, as timm's ``no_weight_decay`` and big_vision's
  ``.*/kernel$`` leave them out: only a leaf's name (``kernel``, ``embedding``; Haiku ``w``,
  ``embeddings``) or an Equinox layer's type makes it a kernel or a table.

  Raises:
    TypeError: naming the path of a leaf that is not an array (an Equinox model
      passed to ``init`` without ``eqx.filter(model, eqx.is_array)``).
  """
  _check_arrays(params)
  unmodelled: dict[str, layers_lib.UnmodelledLayer] = {}
  specs = layers_lib.discover(params, "linear", stacked, errors=unmodelled)
  decayed = {tuple(spec.kernel) for spec in specs.values() if spec.structure != "per_channel"}
  decayed |= {tuple(e.leaves[0]) for e in unmodelled.values()}  # their kernel (or table)
  def is_kernel(key_path, p):
    return p.ndim >= 2 and tuple(paths.leaf_parts(key_path)) in decayed
  return jax.tree_util.tree_map_with_path(is_kernel, params)


def sngd_momentum(
    learning_rate: optax.ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    nesterov: bool = False,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    fisher: layers_lib.FisherSpec = DEFAULTS.fisher,
    stacked: layers_lib.StackSpec = DEFAULTS.stacked,
    inverse: str | InverseMethod = DEFAULTS.inverse,
    damping: optax.ScalarOrSchedule = DEFAULTS.damping,
    abs_damping: optax.ScalarOrSchedule = DEFAULTS.abs_damping,
    decay: float = DEFAULTS.decay,
    factor_every: int = DEFAULTS.factor_every,
    inverse_every: int = DEFAULTS.inverse_every,
    inverse_warmup: bool = DEFAULTS.inverse_warmup,
    prior: str = DEFAULTS.prior,
    stats_batch_size: Optional[int] = DEFAULTS.stats_batch_size,
    max_factor_ratio: Optional[float] = DEFAULTS.max_factor_ratio,
    max_norm: optax.ScalarOrSchedule | None = DEFAULTS.max_norm,
    axis_name: Optional[AxisName] = DEFAULTS.axis_name,
    shard_refresh: bool | jax.sharding.Mesh = DEFAULTS.shard_refresh,
    uncalled: str = DEFAULTS.uncalled,
) -> optax.GradientTransformationExtraArgs:
  """SNGD preconditioning followed by SGD with momentum and weight decay.

  ``chain(sngd(...), add_decayed_weights(weight_decay, mask=kernels),
  sgd(learning_rate, momentum))``: the update is

  ```
  m <- mu m + ((G + rho I)^{-1} g + lambda W),     W <- W - eta m,
  ```

  with weight decay applied after the preconditioner (decoupled from it) and
  to the kernels and embedding tables of the layers ``init`` finds (not biases or
  norm scales, nor arrays that belong to no layer: a ViT's class token and position
  embedding; docs/hyperparameters.md, *Weight decay*). The reference code's L2 term is part of
  its loss, so it is preconditioned; pass ``weight_decay=0`` and add the term
  to the loss to get that behaviour.

  Args:
    learning_rate: the step size ``eta``, or a schedule.
    momentum: heavy-ball momentum ``mu`` (0 for plain SGD).
    nesterov: use Nesterov momentum.
    weight_decay: decoupled weight decay ``lambda`` on the kernels and embedding tables
      of the layers ``init`` finds.
    fisher: see ``sngd_jax.sngd``.
    stacked: see ``sngd_jax.sngd``.
    inverse: see ``sngd_jax.sngd``.
    damping: see ``sngd_jax.sngd``.
    abs_damping: see ``sngd_jax.sngd``.
    decay: see ``sngd_jax.sngd``.
    factor_every: see ``sngd_jax.sngd``.
    inverse_every: see ``sngd_jax.sngd``.
    inverse_warmup: see ``sngd_jax.sngd``.
    prior: see ``sngd_jax.sngd``.
    stats_batch_size: see ``sngd_jax.sngd``.
    max_factor_ratio: see ``sngd_jax.sngd``.
    max_norm: see ``sngd_jax.sngd``.
    axis_name: see ``sngd_jax.sngd``.
    shard_refresh: see ``sngd_jax.sngd``.
    uncalled: see ``sngd_jax.sngd``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    ``update``.
  """
  return _params_checked(optax.chain(
      _preconditioner(locals()),  # first: locals() holds just the arguments
      optax.add_decayed_weights(weight_decay, mask=_kernel_mask_for(stacked)),
      optax.sgd(learning_rate, momentum=_momentum_or_none(momentum), nesterov=nesterov),
  ))


def sngd_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    fisher: layers_lib.FisherSpec = DEFAULTS.fisher,
    stacked: layers_lib.StackSpec = DEFAULTS.stacked,
    inverse: str | InverseMethod = DEFAULTS.inverse,
    damping: optax.ScalarOrSchedule = DEFAULTS.damping,
    abs_damping: optax.ScalarOrSchedule = DEFAULTS.abs_damping,
    decay: float = DEFAULTS.decay,
    factor_every: int = DEFAULTS.factor_every,
    inverse_every: int = DEFAULTS.inverse_every,
    inverse_warmup: bool = DEFAULTS.inverse_warmup,
    prior: str = DEFAULTS.prior,
    stats_batch_size: Optional[int] = DEFAULTS.stats_batch_size,
    max_factor_ratio: Optional[float] = DEFAULTS.max_factor_ratio,
    max_norm: optax.ScalarOrSchedule | None = DEFAULTS.max_norm,
    axis_name: Optional[AxisName] = DEFAULTS.axis_name,
    shard_refresh: bool | jax.sharding.Mesh = DEFAULTS.shard_refresh,
    uncalled: str = DEFAULTS.uncalled,
) -> optax.GradientTransformationExtraArgs:
  """SNGD preconditioning followed by Adam (AdamW) on the preconditioned gradient.

  ``chain(sngd(...), adamw(learning_rate, b1, b2, eps, weight_decay, mask=kernels))``:
  with ``u = (G + rho I)^{-1} g`` the preconditioned gradient (after the trust
  region),

  ```
  m <- b1 m + (1 - b1) u,   v <- b2 v + (1 - b2) u^2,
  W <- W - eta (m^ / (sqrt(v^) + eps) + lambda W)
  ```

  (``m^``, ``v^`` bias-corrected). The local Fisher supplies the directions
  between the inputs of a layer, which a diagonal method cannot see; Adam's
  per-entry normalization then sets the step size (start at the learning rate
  Adam would use: on the tasks of ``benchmarks/README.md`` the best value was Adam's own
  or 3x smaller, between ``1e-3`` and ``3e-2``; docs/hyperparameters.md, *Learning
  rate*). On its tuning set it reached the
  test target in fewer steps than ``sngd_momentum`` and than Adam, each with a tuned
  learning rate (*Tuning-set study 2* there).

  Args:
    learning_rate: Adam's step size ``eta``, or a schedule.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's ``eps``.
    weight_decay: decoupled weight decay ``lambda`` (AdamW), not preconditioned, on the
      kernels and embedding tables of the layers ``init`` finds (not biases, norm scales, or
      arrays of no layer such as a ViT's class token; docs/hyperparameters.md, *Weight
      decay*). Defaults to 0, where ``optax.adamw``'s defaults to ``1e-4``;
      for another mask than kernels, chain ``sngd()`` with ``optax.adamw(..., mask=)``.
    fisher: see ``sngd_jax.sngd``.
    stacked: see ``sngd_jax.sngd``.
    inverse: see ``sngd_jax.sngd``.
    damping: see ``sngd_jax.sngd``.
    abs_damping: see ``sngd_jax.sngd``.
    decay: see ``sngd_jax.sngd``.
    factor_every: see ``sngd_jax.sngd``.
    inverse_every: see ``sngd_jax.sngd``.
    inverse_warmup: see ``sngd_jax.sngd``.
    prior: see ``sngd_jax.sngd``.
    stats_batch_size: see ``sngd_jax.sngd``.
    max_factor_ratio: see ``sngd_jax.sngd``.
    max_norm: see ``sngd_jax.sngd``.
    axis_name: see ``sngd_jax.sngd``.
    shard_refresh: see ``sngd_jax.sngd``.
    uncalled: see ``sngd_jax.sngd``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; pass ``activations=`` to
    ``update``.
  """
  return _params_checked(optax.chain(
      _preconditioner(locals()),  # first: locals() holds just the arguments
      optax.adamw(learning_rate, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay,
                  mask=_kernel_mask_for(stacked)),
  ))


def _momentum_or_none(momentum: Any) -> Any:
  """``None`` (no momentum buffer) for a Python zero; an array (injected) is kept as is."""
  if isinstance(momentum, (int, float)) and not isinstance(momentum, bool) and momentum == 0:
    return None
  return momentum
