"""Equinox layers: which leaves of a model form a layer, and in which layout.

Equinox stores weights outputs first and names them ``weight``: ``Linear``
``(O, I)``, ``Conv``/``ConvTranspose`` ``(O, C/g, *k)``, the cells ``(G H, I)``
and ``(G H, H)``. A layer is found by its type (``LAYOUTS``), and its
``sngd_jax.LayerSpec`` records the permutation that brings the weight to
the inputs-then-outputs layout of the rest of sngd (``kernel_perm``), so the
statistics, the inverses and the preconditioned update are those of the same
layer written in Flax. Leading axes beyond a type's own rank are stack axes
(layers made with ``eqx.filter_vmap`` and scanned over).

* ``Linear``: one dense layer, bias optional.
* ``Conv`` (1-3-D), ``ConvTranspose``: a dense layer over input patches; a
  transposed convolution is the convolution of the stride-dilated input.
* ``Embedding``: a diagonal factor (token frequencies); with ``fisher="tied"``, a
  table that a ``Linear`` also reads as its weight (``eqx.nn.Shared``) is also that
  output layer, as linen's ``attend``. Tied the other way (the ``Embedding``'s table replaced
  by a bias-free ``Linear``'s weight), the ``Linear`` with ``fisher="tied"`` has the same two
  specs.
* ``LayerNorm``, ``RMSNorm``, ``GroupNorm``, ``BatchNorm``: one ``2 x 2``
  block per channel (``1 x 1`` without a bias).
* ``LSTMCell``, ``GRUCell``: two dense layers named by their weight,
  ``'<cell>/weight_ih'`` (with the cell's ``bias``) over the input and
  ``'<cell>/weight_hh'`` over the hidden state; ``GRUCell``'s ``bias_n``
  (added inside the reset gate's product) is left to the next transform.
* ``MultiheadAttention``, ``MLP``, ``Sequential``: made of the layers above.
* a module you write yourself, declared with ``@sngd_jax.dense_layer`` (its weight and bias
  fields and their layout, ``layer_spec.DECLARED``): one dense layer, as ``Linear``; its
  ``__call__`` records its input through ``sngd_jax.dense``.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import equinox as eqx
import jax

from sngd_jax._src import layer_spec as layers_lib
from sngd_jax._src import paths

Parts = tuple[str, ...]


def _kind(fisher, path: str):
  kind = layers_lib.resolve_fisher(fisher, path)
  if kind == layers_lib.TIED:
    raise ValueError(
        f"sngd: fisher='tied' for Equinox layer {path!r}, which is not an `Embedding`; "
        "'tied' is for an embedding table that a `Linear` also reads as its weight "
        "(`eqx.nn.Shared`), or a bias-free `Linear` whose weight an `Embedding` reads as "
        "its table")
  return kind


def _dense(module: Any, parts: Parts, fisher, weight: str, bias: Optional[str], path: str,
           base_ndim: int, perm: tuple[int, ...]) -> list[layers_lib.LayerSpec]:
  """A dense-structured spec for ``module.<weight>`` stored ``(O, I...)``-like."""
  w = getattr(module, weight, None)
  if w is None or getattr(w, "ndim", 0) < base_ndim:
    return []
  kind = _kind(fisher, path)
  if kind is None:
    return []
  b = getattr(module, bias, None) if bias else None
  stack = tuple(w.shape[:w.ndim - base_ndim])
  shape = w.shape[w.ndim - base_ndim:]
  return [layers_lib.LayerSpec(
      path=path, kernel=parts + (weight,),
      bias=None if b is None or bias is None else parts + (bias,),
      in_dim=math.prod(shape[1:]), out_dim=shape[0], fisher=kind, stack=stack,
      kernel_perm=perm)]


def linear(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  """A dense spec; with ``fisher="tied"``, a bias-free ``Linear`` whose weight an
  ``Embedding`` reads as its table (``eqx.nn.Shared`` with ``where`` on the table): the
  weight ``(V, D)`` is the table, with the specs of a tied ``Embedding`` (``embedding``)."""
  path = paths.join(parts)
  w = getattr(module, "weight", None)
  if layers_lib.resolve_fisher(fisher, path) == layers_lib.TIED and w is not None:
    if getattr(module, "bias", None) is not None:
      raise ValueError(
          f"sngd: fisher='tied' for Equinox layer {path!r}, which is not an `Embedding` but "
          "a `Linear` with a bias; 'tied' is for a table read both by an `Embedding` lookup "
          "and by a bias-free `Linear` readout (`eqx.nn.Shared`), whose rows are `[h]`, not "
          "`[h; 1]`: build the readout with `use_bias=False`, or pass another kind for this "
          "layer")
    return _tied_table(w, parts, path)
  return _dense(module, parts, fisher, "weight", "bias", path, 2, (1, 0))


def conv(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  r = module.num_spatial_dims
  perm = tuple(range(2, 2 + r)) + (1, 0)  # (O, C/g, *k) -> (*k, C/g, O)
  return _dense(module, parts, fisher, "weight", "bias", paths.join(parts), 2 + r, perm)


def cell(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  return (_dense(module, parts, fisher, "weight_ih", "bias", paths.join(parts + ("weight_ih",)),
                 2, (1, 0))
          + _dense(module, parts, fisher, "weight_hh", None,
                   paths.join(parts + ("weight_hh",)), 2, (1, 0)))


def embedding(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  """The lookup's diagonal spec; with ``fisher="tied"`` also the output layer's, for a
  table that a ``Linear`` reads as its weight (``eqx.nn.Shared``), as in linen."""
  w = module.weight
  path = paths.join(parts)
  kind = layers_lib.resolve_fisher(fisher, path)
  if w is None or w.ndim < 2 or kind is None:
    return []
  if w.ndim > 2:
    raise layers_lib.stacked_table(path, parts + ("weight",), w.shape)
  if kind == layers_lib.TIED:
    return _tied_table(w, parts, path)
  return [layers_lib.LayerSpec(path=path, kernel=parts + ("weight",), bias=None,
                               in_dim=w.shape[0], out_dim=w.shape[1], fisher="linear",
                               structure="diagonal")]


def _tied_table(w: Any, parts: Parts, path: str) -> list[layers_lib.LayerSpec]:
  """The two specs of a tied table ``w`` ``(V, D)`` (``fisher="tied"``): the lookup's
  diagonal one at ``path`` and the output layer's ``logits = W h`` (a Linear's ``(O, I)``
  layout, inputs ``h``) at ``tied_path(path)``."""
  if w.ndim != 2:
    raise layers_lib.stacked_table(path, parts + ("weight",), w.shape)
  lookup = layers_lib.LayerSpec(path=path, kernel=parts + ("weight",), bias=None,
                                in_dim=w.shape[0], out_dim=w.shape[1], fisher="linear",
                                structure="diagonal", tied=True)
  return [lookup, layers_lib.LayerSpec(
      path=layers_lib.tied_path(path), kernel=parts + ("weight",), bias=None,
      in_dim=w.shape[1], out_dim=w.shape[0], fisher="linear", kernel_perm=(1, 0), tied=True,
      source=path)]


def norm(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  w = getattr(module, "weight", None)
  path = paths.join(parts)
  kind = _kind(fisher, path)
  if w is None or kind is None:
    return []
  b = getattr(module, "bias", None)
  return [layers_lib.LayerSpec(path=path, kernel=parts + ("weight",),
                               bias=None if b is None else parts + ("bias",), in_dim=1,
                               out_dim=math.prod(w.shape), fisher=kind,
                               structure="per_channel")]


def declared_dense(module: Any, parts: Parts, fisher) -> list[layers_lib.LayerSpec]:
  """A hand-written module declared with ``sngd_jax.dense_layer``: a dense layer over its
  declared weight (leading axes beyond 2 are stack axes) and optional bias ``(out,)``."""
  decl = layers_lib.declared(type(module))
  assert decl is not None
  w = getattr(module, decl.weight, None)
  path = paths.join(parts)
  if w is None or getattr(w, "ndim", 0) < 2:
    return []
  kind = _kind(fisher, path)
  if kind is None:
    return []
  b = getattr(module, decl.bias, None) if decl.bias else None
  stack, shape = tuple(w.shape[:-2]), tuple(w.shape[-2:])
  out_dim, in_dim = shape if decl.layout == "out_in" else shape[::-1]
  leaves = (parts + (decl.weight,),) + (() if b is None or decl.bias is None
                                        else (parts + (decl.bias,),))
  if b is not None and tuple(b.shape) != stack + (out_dim,):
    raise layers_lib.UnmodelledLayer(
        path, leaves,
        f"bias {decl.bias!r} of shape {tuple(b.shape)} does not fit weight {decl.weight!r} of "
        f"shape {tuple(w.shape)} stored {decl.layout!r} (expected {stack + (out_dim,)})",
        f"check the `layout=` of `@sngd_jax.dense_layer` on {type(module).__name__}, or leave "
        f"the layer to the next transform with `fisher={{{path!r}: None}}`")
  return [layers_lib.LayerSpec(
      path=path, kernel=leaves[0], bias=leaves[1] if len(leaves) > 1 else None,
      in_dim=in_dim, out_dim=out_dim, fisher=kind, stack=stack,
      kernel_perm=(1, 0) if decl.layout == "out_in" else None)]


LAYOUTS: dict[type, Callable[[Any, Parts, Any], list[layers_lib.LayerSpec]]] = {
    eqx.nn.Linear: linear,
    eqx.nn.Conv: conv,
    eqx.nn.ConvTranspose: conv,
    eqx.nn.Embedding: embedding,
    eqx.nn.LayerNorm: norm,
    eqx.nn.RMSNorm: norm,
    eqx.nn.GroupNorm: norm,
    eqx.nn.BatchNorm: norm,
    eqx.nn.LSTMCell: cell,
    eqx.nn.GRUCell: cell,
}
"""Equinox layer type -> ``(module, path parts, fisher) -> specs``."""


def layout_of(module: Any) -> Optional[Callable]:
  if isinstance(module, eqx.Module) and layers_lib.declared(type(module)) is not None:
    return declared_dense
  for cls in type(module).__mro__:
    if cls in LAYOUTS:
      return LAYOUTS[cls]
  return None


def discover(params: Any, fisher: layers_lib.FisherSpec,
             errors: Optional[dict[str, layers_lib.UnmodelledLayer]] = None
             ) -> dict[str, layers_lib.LayerSpec]:
  """The layers of an Equinox model (or of it filtered to arrays, or of its gradients).

  ``errors``: as in ``sngd_jax.discover``.
  """
  is_layer = lambda n: layout_of(n) is not None
  specs = {}
  for key_path, node in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_layer)[0]:
    layout = layout_of(node)
    if layout is None:
      continue
    try:
      found = layout(node, paths.leaf_parts(key_path), fisher)
    except layers_lib.UnmodelledLayer as e:
      if errors is None:
        raise
      errors[e.path] = e
      continue
    for spec in found:
      specs[spec.path] = spec
  return specs
