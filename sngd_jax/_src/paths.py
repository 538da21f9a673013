"""Parameter paths: one string per layer, shared by params, grads and activations.

Flax linen params (``{'Dense_0': {'kernel': ...}}``, optionally under a
``'params'`` collection), Flax NNX states (``layers/0/kernel/.value``) and
captured activations all name a layer by the same ``'/'``-joined string, e.g.
``'Dense_0'`` or ``'Block_0/Dense_1'`` or ``'layers/0'``. This module turns
``jax.tree_util`` key paths into those strings.
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

import jax

# Attribute names that wrap a leaf without naming it (NNX ``Variable.value``).
_WRAPPER_ATTRS = ("value", "raw_value")
# A leading variable-collection name that linen's ``variables`` dict adds.
_COLLECTION = "params"


def key_to_str(key: Any) -> str:
  """Returns the readable name of one ``jax.tree_util`` key entry."""
  if isinstance(key, jax.tree_util.DictKey):
    return str(key.key)
  if isinstance(key, jax.tree_util.GetAttrKey):
    return key.name
  if isinstance(key, jax.tree_util.SequenceKey):
    return str(key.idx)
  if isinstance(key, jax.tree_util.FlattenedIndexKey):
    return str(key.key)
  return str(key)


def leaf_parts(key_path: Sequence[Any]) -> tuple[str, ...]:
  """Normalized name parts of a leaf: wrappers and the collection name dropped.

  Args:
    key_path: a key path from ``jax.tree_util.tree_flatten_with_path``.

  Returns:
    The parts, e.g. ``('Dense_0', 'kernel')`` for both
    ``params['params']['Dense_0']['kernel']`` and an NNX ``.../kernel/.value``.
  """
  parts = [key_to_str(k) for k in key_path]
  while parts and isinstance(key_path[len(parts) - 1], jax.tree_util.GetAttrKey) \
      and parts[-1] in _WRAPPER_ATTRS:
    parts.pop()
  if len(parts) > 1 and parts[0] == _COLLECTION:
    parts = parts[1:]
  return tuple(parts)


def join(parts: Sequence[str]) -> str:
  """Joins name parts into the layer-path string used everywhere."""
  return "/".join(parts)


FLAT_MAP_FIX = (
    "a Haiku `FlatMap` (`hk.data_structures.to_immutable_dict`) flattens its leaves by "
    "position, without their names, so no layer in it can be found or named: pass "
    "`hk.data_structures.to_mutable_dict(params)` (plain dicts, as `transform(...).init` "
    "returns them) to `init` and to the step")


def holds_flat_map(tree: Any) -> bool:
  """Whether ``tree`` holds a Haiku ``FlatMap``, whose leaves have no key names
  (``FLAT_MAP_FIX``); False when Haiku is not imported."""
  hk = sys.modules.get("haiku")
  if hk is None:
    return False
  flat_map = type(hk.data_structures.to_immutable_dict({}))

  def is_map(node: Any) -> bool:
    return isinstance(node, flat_map)

  return any(is_map(n) for n in jax.tree.leaves(tree, is_leaf=is_map))
