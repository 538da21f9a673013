"""Diagnostics read from an SNGD state: the trust region's scale.

With ``max_norm`` set, every update is scaled by
``s = min(1, max_norm / sqrt(q))``, ``q = sum_l <g_l, (G_l + rho_l I)^{-1} g_l>``
(``sngd_jax._src.precondition``). Whether that clips most steps (``s < 1``)
decides whether the optimizer is taking natural-gradient steps or normalized
ones; ``trust_region_scale`` makes it observable without a new state leaf.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src import precondition
from sngd_jax._src.config import value_at
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.state import injected, only_sngd_state
from sngd_jax._src.transform import _flatten, _layers_of, _method_of, seen_by_state


def _state_layers(specs: dict[str, Any], state: Any) -> dict[str, Any]:
  """The layers of the full ``grads`` as the state's ``sngd`` saw them.

  Under ``optax.multi_transform`` / ``selective_transform`` / ``masked``, ``sngd`` sees only
  its part of the params (the rest ``optax.MaskedNode``): a layer it does not see has no
  factor in the state and is left out, and a layer whose bias it does not see (a masked-out
  bias) has a factor of block size ``d = in_dim`` without the bias row (a ``d x d`` matrix,
  or a Nystrom sketch with ``d`` rows), so its bias is left out too, as in ``update``
  (``transform.seen_by_state``, the rule ``MultiSteps`` reads the whole tree by).
  """
  return {path: seen_by_state(spec, state.factors[path]) for path, spec in specs.items()
          if path in state.factors}


def trust_region_scale(grads: Any, opt_state: Any, updates: Optional[Any] = None, *,
                       max_norm: Optional[Any] = None) -> jax.Array:
  """The trust-region scale ``s = min(1, max_norm / sqrt(q))`` of an update.

  Two ways to call it:

  * ``trust_region_scale(grads, new_state, updates)`` with the ``updates`` that
    ``sngd_jax.sngd`` returned for ``grads`` (its own output, before any
    momentum): the scale that update used. It costs one dot product per layer:
    for a clipped step ``<g, s u> = s q`` and ``s = max_norm / sqrt(q)``, so
    ``s = min(1, max_norm^2 / <g, s u>)``; an unclipped step has
    ``<g, u> = q <= max_norm^2`` and gives 1.
  * ``trust_region_scale(grads, state)``: the scale an update of ``grads``
    with the state's cached inverses would use (that of the next update unless
    it refreshes the inverses). It costs one product with every inverse, as
    much as the preconditioning of a step.

  Args:
    grads: the gradients (params-shaped). Under ``optax.multi_transform``,
      ``selective_transform`` or ``masked``, those of all the params: the layers (and
      biases) that the state's ``sngd`` does not see are left out, as its update leaves
      them out.
    opt_state: a state holding an ``sngd_jax.SNGDState`` (that of
      ``sngd`` or of a chain containing it).
    updates: optionally, ``sngd``'s output for ``grads``.
    max_norm: the radius; by default the configured one, or, where the state
      records None because it was injected (``optax.inject_hyperparams``), the
      injected value found in ``opt_state`` (pass the whole injected state).

  Returns:
    A scalar in ``(0, 1]``; 1 without a trust region (``max_norm=None``) and
    for a skipped step. NaN when ``updates`` cannot be ``sngd``'s output for
    ``grads`` (``<g, u> < 0``: the updates of a chain after its learning rate,
    ``-lr * ...``, rather than ``sngd``'s own).
  """
  state = only_sngd_state(opt_state)
  config = state.config
  radius_of = config.max_norm if max_norm is None else max_norm
  if radius_of is None:  # injected (`optax.inject_hyperparams`): the state records None
    radius_of = injected(opt_state, "max_norm", state)
  if radius_of is None:
    return jnp.ones((), jnp.float32)
  specs = _state_layers(_layers_of(config, grads), state)
  leaves, _, index = _flatten(grads)
  dtypes = {p: jax.tree.leaves(state.factors[p])[0].dtype for p in specs}
  if updates is not None:
    u_leaves, _, _ = _flatten(updates)
    q = jnp.zeros((), compute_dtype(*dtypes.values()))
    for path, spec in specs.items():
      if spec.tied_head:
        continue  # a tied table's second spec: its leaf is counted once, with the first
      g = precondition.augmented(spec, leaves, index, dtypes[path])
      u = precondition.augmented(spec, u_leaves, index, dtypes[path])
      q = q + jnp.vdot(g, u, precision=dtypes_lib.HIGHEST).astype(q.dtype)
    radius = jnp.asarray(value_at(radius_of, state.count - 1), q.dtype)
    # min(1, radius^2 / q), 1 where that is not finite; the quotient only where it is below
    # 1, so that no Inf is made on the way (eagerly, jax_debug_infs checks every operation)
    r2 = radius ** 2
    scale = jnp.where(q > r2, r2 / jnp.where(q > r2, q, 1.0), 1.0)
    # q < 0: not sngd's output (a chain's final updates point downhill, -lr * ...): NaN
    # rather than a plausible 1 (sqrt(q), not a NaN constant, which jax_debug_nans would
    # stop at eagerly for any q)
    return jnp.where(q < 0, jnp.sqrt(q), scale)
  _, q = precondition.precondition(specs, leaves, index, state.inverses, dtypes,
                                   _method_of(config))
  return precondition.trust_region_scale(q, value_at(radius_of, state.count))
