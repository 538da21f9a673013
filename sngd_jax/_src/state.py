"""``SNGDState``, the state of ``sngd``, and finding it inside an optimizer's state.

An ``sngd`` transform is usually one element of a larger optax state: the tuple
of ``optax.chain`` (``sngd_momentum``, ``sngd_adam``), an ``apply_if_finite`` or
``inject_hyperparams`` state, a ``MultiStepsState``, a ``MaskedState``. The
helpers that read factors from a state (``damped_factors``, ``factor_roots``,
``trust_region_scale``, ``MultiSteps``) find it with ``sngd_states`` and
``only_sngd_state`` here, with one contract: exactly one ``SNGDState``, or an
error that says how many there are.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax

from sngd_jax._src.config import DEFAULTS, SNGDConfig


@flax.struct.dataclass
class SNGDState:
  """State of ``sngd``: arrays only (plus its static configuration), a pytree.

  Attributes:
    count: steps taken (non-finite steps not counted), int32.
    factors: per layer path, the running local Fisher sum ``G_t``
      (``(d, d)`` or ``(O, d, d)``), float32 (float64 under x64); for layers
      whose inverse method is a rank-``r`` Nystrom model (``inverse="auto"``
      for layers wider than 512 inputs) its sketch ``(S_t Omega, tr S_t, c_t)`` of
      ``G_t = S_t + c_t I`` (``c_t``: the prior's identity part, kept exactly), a
      ``sngd_jax.Sketch`` with ``y`` of shape ``(d, r)``.
    weights: per layer path, the weight ``w_t`` of ``G_t`` (use ``G_t / w_t``).
    inverses: per layer path, the cached inverse representation.
    has_inverse: whether an inverse has been computed yet.
    num_refresh_failures: blocks whose refresh failed and kept the old
      inverse, plus the blocks of a running factor found out of range (not
      finite, or its trace within a factor 16 of overflow: possible only in a
      state written otherwise) and restarted from its prior. A layer whose factor
      was never fed (weight 0: not called yet, or only on zero rows) keeps the
      identity and is not counted.
    num_skipped_steps: steps that produced a zero update: those with
      non-finite gradients, and factor steps whose activations are not finite
      or whose batch estimate is out of range (finite activations whose
      ``X~^T X~`` overflows), all of which leave the rest of the state
      unchanged; and those whose preconditioned update overflowed its dtype
      (whose finite statistics are kept).
    config: the static ``SNGDConfig`` the state was made with (part of
      the tree structure, not a leaf: checkpoints hold the arrays only).
  """

  count: jax.Array
  factors: dict[str, Any]
  weights: dict[str, jax.Array]
  inverses: dict[str, Any]
  has_inverse: jax.Array
  num_refresh_failures: jax.Array
  num_skipped_steps: jax.Array
  config: SNGDConfig = flax.struct.field(pytree_node=False, default=DEFAULTS)

  def _replace(self, **kwargs) -> SNGDState:
    """NamedTuple-style alias of ``replace``."""
    return dataclasses.replace(self, **kwargs)


def _is_state(x: Any) -> bool:
  return isinstance(x, SNGDState)


def sngd_states(tree: Any) -> list[SNGDState]:
  """Every ``SNGDState`` inside ``tree`` (an optimizer state), in tree order."""
  return [s for s in jax.tree.leaves(tree, is_leaf=_is_state) if _is_state(s)]


def _is_injected_state(x: Any) -> bool:
  """An ``optax.inject_hyperparams`` (or ``inject_stateful_hyperparams``) state."""
  return isinstance(getattr(x, "hyperparams", None), dict) and hasattr(x, "inner_state")


def injected(tree: Any, name: str, sngd_state: SNGDState) -> Any:
  """The value of hyperparameter ``name`` injected into ``sngd_state``'s transform (the SNGD
  state records an injected value as None), or None.

  It is read from the innermost ``optax.inject_hyperparams`` state in ``tree`` around
  ``sngd_state`` whose hyperparameters hold ``name``: not from another transform's (an
  injected ``optax.clip_by_global_norm`` also has a ``max_norm``), which is no value of this
  ``sngd`` whether or not its own is injected.
  """
  value, node = None, tree
  while True:
    around = [s for s in jax.tree.leaves(node, is_leaf=_is_injected_state)
              if _is_injected_state(s)
              and any(t is sngd_state for t in sngd_states(s.inner_state))]
    if not around:
      return value
    if name in around[0].hyperparams:
      value = around[0].hyperparams[name]
    node = around[0].inner_state


def only_sngd_state(tree: Any) -> SNGDState:
  """``tree`` itself if it is an ``SNGDState``, else the one ``SNGDState`` inside it.

  Raises:
    ValueError: when ``tree`` holds none, or more than one (two ``sngd``
      transforms under ``optax.multi_transform``: pass the one you mean).
  """
  if _is_state(tree):
    return tree
  found = sngd_states(tree)
  if len(found) != 1:
    hint = ("; pass the one you mean (e.g. `opt_state.inner_states[...]`)" if found else
            " (is `sngd` part of this optimizer?)")
    raise ValueError(f"sngd: expected an `SNGDState`, or an optimizer state holding exactly "
                     f"one; got a {type(tree).__name__} holding {len(found)}{hint}")
  return found[0]
