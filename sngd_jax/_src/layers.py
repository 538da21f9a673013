"""Which parameters get a local Fisher, and of what shape.

A *layer* is a group of sibling leaves named ``kernel`` (and optionally
``bias``) under one path. Its weights act on an input vector ``x`` of
``in_dim`` features; with a bias the input is augmented, ``x~ = [x; 1]``, and
the bias becomes the last row of ``W~ = [W; b^T]`` (shape ``d x O`` with
``d = in_dim + 1``). The local Fisher of the layer is a ``d x d`` matrix
(``fisher="linear"``) or one per output unit, ``O x d x d`` (``"rfim"``).

The split of the kernel's axes into input and output axes is read from the
shapes alone: the bias has the output shape, so
``in_dim = prod(kernel.shape[:kernel.ndim - bias.ndim])``. This covers
``Dense`` (``I x O``), ``Conv`` (``kh x kw x C_in x C_out``, patches of size
``kh*kw*C_in``) and ``DenseGeneral`` (``D x H x hd`` with bias ``H x hd``).
Without a bias the last kernel axis is taken as the output.

**Stacked layers.** A layer applied under ``nn.scan`` over depth, made by
``nnx.vmap``, or scanned over by Equinox code holds one layer per index of its
leading *stack* axes: a kernel ``(L, I, O)`` with a bias ``(L, O)``. Each
layer of the stack gets its own local Fisher, stored stacked
(``factor_shape = (L, d, d)``) and refreshed with the other blocks of its size.
The params show the stack where the bias does (its leading axes are the
kernel's, and its trailing axes the kernel's outputs); a bias-free stacked
kernel needs ``stacked={path prefix: n}`` (capture reports which).

**Equinox** layers are found by their type (``eqx.nn.Linear``, ``Conv``, ...,
see ``sngd_jax._src.equinox_layers``), whose weights are stored outputs
first (``(O, I)``, ``(O, C/g, *k)``): the spec records the permutation that
brings a weight to the inputs-then-outputs layout used here.

**Haiku** params (``{'mlp/~/linear_0': {'w': ..., 'b': ...}}``) name the same
leaves differently (``HAIKU_NAMES``): ``w`` is a kernel (``hk.Linear``'s
``(I, O)``, ``hk.ConvND``'s ``(*k, C_in/g, C_out)``: the linen layouts), ``b``
its bias, ``embeddings`` an embedding table, ``scale`` with ``offset`` a
normalization's scale and bias. An ``hk.ConvNDTranspose``'s ``w`` is ``(*k, O, C)``, outputs
before inputs, which its shapes do not show: a ``w`` under Haiku's default name for it
(``conv2_d_transpose``, ``conv_nd_transpose_1``: ``layer_spec.haiku_conv_transpose``) is read
with its last two axes swapped (``kernel_perm``). An ``hk.GRU``'s ``w_i``, ``w_h``, ``b`` are
three dense layers (``_haiku_gru``): ``w_i`` with ``b`` over ``x_t``, and ``w_h``'s ``2H``
update/reset columns over ``h_{t-1}`` and its ``H`` candidate columns over ``r_t * h_{t-1}``,
two layers on one leaf (``LayerSpec.columns``). A tree is read with these names when Haiku is
imported and the tree is Haiku's (``is_haiku``): no leaf bears a linen/NNX layer
name (``kernel``, ``embedding``, ``bias``) and some sibling group is a Haiku layer
(``w`` of rank >= 2 with at most a ``b``; ``embeddings`` alone; ``scale`` with an
``offset``). A tree mixing both namings is read with linen's only.

Two more layer structures have no ``kernel`` (see ``STRUCTURES``):

* ``embedding`` leaves (``nn.Embed``, ``nnx.Embed``, shape ``V x D``): the
  layer's input is a one-hot token, so its linear local Fisher
  ``E[onehot onehot^T] = diag(token frequencies)`` is exactly diagonal and is
  kept as a ``V`` vector (``structure="diagonal"``). A table that is also the
  output layer (``attend``: ``logits = h E^T``, tied weights) has, with
  ``fisher={path: "tied"}``, two specs: the lookup's diagonal one at its path
  (from its lookups) and the dense one of the output layer, inputs ``h`` and
  kernel ``E^T`` (``kernel_perm=(1, 0)``, no bias), at ``tied_path(path)``
  (from its ``attend`` calls; ``statistics.layer_calls``); the table's update
  applies both (``precondition``).
* ``scale`` leaves with an optional sibling ``bias`` of the same shape
  (``LayerNorm``, ``BatchNorm``, ``GroupNorm``, ``RMSNorm``): channel ``c``
  computes ``y_c = scale_c * xhat_c + bias_c``, a one-input "dense unit" with
  augmented input ``[xhat_c; 1]``, so it gets its own ``2 x 2`` block
  ``E[[xhat_c^2, xhat_c], [xhat_c, 1]]`` (``1 x 1`` without a bias)
  (``structure="per_channel"``).
"""

from __future__ import annotations

import math
import sys
from typing import Any, Callable, Optional

import jax

from sngd_jax._src import paths
from sngd_jax._src.layer_spec import (  # noqa: F401 (re-exported: the layer vocabulary)
  FISHER_KINDS as FISHER_KINDS,
)
from sngd_jax._src.layer_spec import HAIKU_GRU, haiku_gru_layers
from sngd_jax._src.layer_spec import (
  STRUCTURES as STRUCTURES,
)
from sngd_jax._src.layer_spec import (
  TIED as TIED,
)
from sngd_jax._src.layer_spec import (
  TRANSPOSED_USE as TRANSPOSED_USE,
)
from sngd_jax._src.layer_spec import (
  FisherSpec as FisherSpec,
)
from sngd_jax._src.layer_spec import (
  LayerSpec as LayerSpec,
)
from sngd_jax._src.layer_spec import (
  StackSpec as StackSpec,
)
from sngd_jax._src.layer_spec import (
  UnmodelledLayer as UnmodelledLayer,
)
from sngd_jax._src.layer_spec import (
  _resolve as _resolve,
)
from sngd_jax._src.layer_spec import (
  haiku_conv_transpose as haiku_conv_transpose,
)
from sngd_jax._src.layer_spec import (
  raw_param_note as raw_param_note,
)
from sngd_jax._src.layer_spec import (
  resolve_fisher as resolve_fisher,
)
from sngd_jax._src.layer_spec import (
  stack_axes_of as stack_axes_of,
)
from sngd_jax._src.layer_spec import (
  stacked_kernel_note as stacked_kernel_note,
)
from sngd_jax._src.layer_spec import (
  stacked_table as stacked_table,
)
from sngd_jax._src.layer_spec import (
  tied_path as tied_path,
)


def discover(params: Any, fisher: FisherSpec = "linear",
             stacked: StackSpec = None,
             errors: Optional[dict[str, UnmodelledLayer]] = None) -> dict[str, LayerSpec]:
  """Finds the layers of a params tree.

  A layer is a ``kernel`` (ndim >= 2, optional ``bias``), an ``embedding``
  (``V x D``) or a ``scale`` (optional ``bias``), the same under Haiku's names in a
  Haiku tree, or an Equinox layer found by its type; see the module docstring.

  Args:
    params: a params pytree (linen ``params`` or ``variables``, NNX state, an
      Equinox model filtered to its arrays, Haiku params: ``HAIKU_NAMES``).
    fisher: see ``resolve_fisher``.
    stacked: layer path prefix -> number of leading stack axes of the kernels
      under it, for stacked layers the params do not show (no bias).
    errors: if given, layers whose shapes fit no modelled layer are collected
      here by path (``UnmodelledLayer``) and left out, instead of raised
      (``sngd_jax.coverage`` reports them).

  Returns:
    Layer specs keyed by layer path, in tree order; an embedding table with
    ``fisher={path: "tied"}`` gives two (its lookup at ``path``, its output
    layer at ``tied_path(path)``, both on the same leaf).
  """
  eqx_specs = _equinox_layers(params, fisher, errors)
  if eqx_specs is not None:
    return eqx_specs
  groups = _groups(params)
  haiku = _is_haiku(groups)
  specs = {}
  for parent, leaves in groups.items():
    try:
      if haiku and set(leaves) == set(HAIKU_GRU):
        found = _haiku_gru(parent, leaves, fisher)
      elif haiku:
        names = {ours: theirs for theirs, ours in HAIKU_NAMES.items() if theirs in leaves}
        found = _layer_of(parent, {ours: leaves[theirs] for ours, theirs in names.items()},
                          fisher, stacked, names)
      else:
        found = _layer_of(parent, leaves, fisher, stacked)
    except UnmodelledLayer as e:
      if errors is None:
        raise
      errors[e.path] = e
      continue
    for spec in found if isinstance(found, list) else [found]:
      if spec is not None:
        specs[spec.path] = spec
  return specs


HAIKU_NAMES = {"w": "kernel", "b": "bias", "embeddings": "embedding", "scale": "scale",
               "offset": "bias"}
"""A Haiku param name -> the name discovery reads it as (see the module docstring)."""
_LINEN_NAMES = frozenset({"kernel", "embedding", "bias"})


def _groups(params: Any) -> dict[tuple[str, ...], dict[str, Any]]:
  """The leaves of ``params`` grouped by parent path: ``parent parts -> {name: leaf}``."""
  groups: dict[tuple[str, ...], dict[str, Any]] = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = paths.leaf_parts(key_path)
    if not parts:
      continue
    # A layer at the root (the model is one layer) has the empty path ''.
    groups.setdefault(parts[:-1], {})[parts[-1]] = leaf
  return groups


def _haiku_layer(leaves: dict[str, Any]) -> bool:
  """Whether sibling leaves are those of a Haiku layer (``w``/``b``, ``embeddings``,
  ``scale``/``offset``)."""
  names = set(leaves)
  return ((names in ({"w"}, {"w", "b"}) and getattr(leaves["w"], "ndim", 0) >= 2)
          or names == {"embeddings"} or names == {"scale", "offset"}
          or (names == set(HAIKU_GRU) and getattr(leaves["w_h"], "ndim", 0) >= 2))


def _is_haiku(groups: dict[tuple[str, ...], dict[str, Any]]) -> bool:
  """Whether grouped params are a Haiku tree, read with ``HAIKU_NAMES`` (see the module
  docstring)."""
  if "haiku" not in sys.modules:  # a Haiku model means Haiku is imported
    return False
  if any(name in _LINEN_NAMES for leaves in groups.values() for name in leaves):
    return False
  return any(_haiku_layer(leaves) for leaves in groups.values())


def is_haiku(params: Any) -> bool:
  """Whether ``discover`` reads ``params`` with Haiku's names (``HAIKU_NAMES``)."""
  return _is_haiku(_groups(params))


def haiku_names_unread(params: Any) -> Optional[str]:
  """The path of a leaf with a linen name (``kernel``, ``bias``, ``embedding``) where that
  leaf alone keeps ``discover`` from reading Haiku's names: Haiku is imported and ``params``
  hold a Haiku layer's leaves (a Haiku model with a custom ``hk.get_parameter("bias", ...)``);
  else None."""
  return _haiku_names_unread(_groups(params))


def _haiku_names_unread(groups: dict[tuple[str, ...], dict[str, Any]]) -> Optional[str]:
  """``haiku_names_unread`` of params already grouped (``_groups``)."""
  if "haiku" not in sys.modules:
    return None
  if not any(_haiku_layer(leaves) for leaves in groups.values()):
    return None
  return next((paths.join(parent + (name,)) for parent, leaves in groups.items()
               for name in leaves if name in _LINEN_NAMES), None)


def haiku_model(params: Any) -> bool:
  """Whether ``params`` are read as a Haiku model's (``coverage`` then captures with
  ``capture_hk``): read with Haiku's names (``is_haiku``), or holding more Haiku layers than
  groups of leaves with linen's names (a Haiku model with a custom
  ``hk.get_parameter("kernel", ...)``, which ``haiku_names_unread`` names). A linen or NNX
  model whose own raw param looks like a Haiku layer's (``self.param("w", ...)``,
  ``"scale"`` and ``"offset"``, ``"embeddings"``) beside its linen layers is not."""
  groups = _groups(params)
  if _is_haiku(groups):
    return True
  if _haiku_names_unread(groups) is None:
    return False
  haiku = sum(_haiku_layer(leaves) for leaves in groups.values())
  linen = sum(any(name in _LINEN_NAMES for name in leaves) for leaves in groups.values())
  return haiku > linen


def _equinox_layers(params: Any, fisher: FisherSpec,
                    errors: Optional[dict[str, UnmodelledLayer]] = None
                    ) -> Optional[dict[str, LayerSpec]]:
  """Equinox layers by type, or None when ``params`` holds no Equinox module."""
  eqx = sys.modules.get("equinox")  # an Equinox model means Equinox is imported
  if eqx is None or not any(isinstance(n, eqx.Module) for n in jax.tree.leaves(
      params, is_leaf=lambda n: isinstance(n, eqx.Module))):
    return None
  from sngd_jax._src import equinox_layers  # noqa: PLC0415 (optional dependency)
  return equinox_layers.discover(params, fisher, errors)


def _stack_of_bias(kernel: Any, bias: Any) -> int:
  """The number of leading stack axes a bias shows (0 when it fits the kernel unstacked).

  Unstacked, the bias is the kernel's trailing (output) axes. Stacked over ``s``
  axes, the bias is ``kernel.shape[:s]`` followed by the kernel's trailing axes.
  """
  k, b = tuple(kernel.shape), tuple(bias.shape)
  if 1 <= len(b) < len(k) and k[len(k) - len(b):] == b:
    return 0
  for s in range(1, len(b)):
    rest = b[s:]
    if b[:s] == k[:s] and len(k) - s >= len(rest) + 1 and k[len(k) - len(rest):] == rest:
      return s
  return 0


def _not_tied(kind: str, path: str) -> None:
  if kind == TIED:
    raise ValueError(
        f"sngd: fisher='tied' for layer {path!r}, which is not an embedding table; 'tied' "
        "is for an embedding that is also the output layer (`attend`)")


def _channels_first_bias_fix(path: str, kernel: Any, bias: Any) -> Optional[str]:
  """The fix for a Haiku conv whose channels-first ``data_format`` (``NCHW``) gives its bias
  the shape ``(O, 1, ..., 1)``, which fits no modelled layer; None for other shapes."""
  shape = tuple(getattr(bias, "shape", ()))
  if kernel.ndim < 3 or len(shape) < 2 or shape != (kernel.shape[-1],) + (1,) * (len(shape) - 1):
    return None
  return ("a Haiku conv with a channels-first `data_format` keeps its bias as "
          f"{shape}: build it with `with_bias=False` (channels first without a bias is "
          "modelled) or channels last, or leave it to the next transform with "
          f"`fisher={{{path!r}: None}}`")


def _haiku_conv_transpose(path: str, kernel: Any, bias: Any, kind: str,
                          leaf: Callable[[str], tuple[str, ...]],
                          n_stack: Optional[int]) -> LayerSpec:
  """The spec of an ``hk.ConvNDTranspose`` (by its default name, ``haiku_conv_transpose``):
  its kernel ``(*k, O, C)`` holds the outputs before the inputs, read with the last two axes
  swapped (``kernel_perm``) as the ``(*k, C, O)`` kernel of the convolution of the
  stride-dilated input that it computes (``lax.conv_transpose``). Under ``hk.layer_stack``
  the stack axes lead the kernel and the bias (``(L, O)``), or ``stacked`` gives them."""
  k, out = tuple(kernel.shape), kernel.shape[-2]
  b = None if bias is None else tuple(bias.shape)
  if n_stack is None:
    n_stack = 0 if b is None else len(b) - 1
  shape = k[n_stack:]
  if not 3 <= len(shape) <= 5 or (b is not None and b != k[:n_stack] + (out,)):
    raise UnmodelledLayer(
        path, (leaf("kernel"),) + ((leaf("bias"),) if bias is not None else ()),
        f"a Haiku transposed conv's kernel {k} with bias {b} is not the `(*k, O, C)` kernel "
        f"with an `(O,)` bias of a channels-last `hk.ConvNDTranspose` (1-3-D)"
        + (f" after {n_stack} stack axes" if n_stack else ""),
        f"leave it to the next transform with `fisher={{{path!r}: None}}`")
  return LayerSpec(path=path, kernel=leaf("kernel"),
                   bias=leaf("bias") if bias is not None else None,
                   in_dim=math.prod(shape[:-2]) * shape[-1], out_dim=out, fisher=kind,
                   stack=k[:n_stack], kernel_perm=tuple(range(len(shape) - 2)) + (
                       len(shape) - 1, len(shape) - 2))


def _haiku_gru(parent: tuple[str, ...], leaves: dict[str, Any], fisher: FisherSpec
               ) -> list[LayerSpec]:
  """The three dense layers of an ``hk.GRU`` (``haiku_gru_layers``): ``w_i`` with ``b`` over
  ``x_t``; ``w_h``'s first ``2H`` columns over ``h_{t-1}`` and its last ``H`` over
  ``r_t * h_{t-1}``, two layers on one leaf (``LayerSpec.columns``). Leading axes of all
  three beyond ``b``'s last are stack axes (``hk.layer_stack``)."""
  w_i, w_h, b = (leaves[name] for name in HAIKU_GRU)
  module = paths.join(parent)
  layer_paths = haiku_gru_layers(module)
  n_stack = b.ndim - 1
  stack = tuple(b.shape[:n_stack])
  three_h = b.shape[-1] if b.ndim else 0
  h = three_h // 3
  if (b.ndim < 1 or three_h % 3 or w_i.ndim != n_stack + 2 or w_h.ndim != n_stack + 2
      or tuple(w_i.shape[:n_stack]) != stack or tuple(w_h.shape[:n_stack]) != stack
      or w_i.shape[-1] != three_h or tuple(w_h.shape[-2:]) != (h, three_h)):
    raise UnmodelledLayer(
        module, tuple(parent + (name,) for name in HAIKU_GRU),
        f"params named as an `hk.GRU`'s (`w_i` {tuple(w_i.shape)}, `w_h` {tuple(w_h.shape)}, "
        f"`b` {tuple(b.shape)}) do not have its shapes (`(I, 3H)`, `(H, 3H)`, `(3H,)`, after "
        "the same stack axes)",
        "leave them to the next transform with `fisher={"
        + ", ".join(f"{p!r}: None" for p in layer_paths) + "}`")
  specs = []
  for path, kernel, bias, in_dim, columns in (
      (layer_paths[0], "w_i", "b", w_i.shape[-2], None),
      (layer_paths[1], "w_h", None, h, (0, 2 * h)),
      (layer_paths[2], "w_h", None, h, (2 * h, three_h))):
    kind = resolve_fisher(fisher, path)
    if kind is None:
      continue
    _not_tied(kind, path)
    specs.append(LayerSpec(
        path=path, kernel=parent + (kernel,), bias=None if bias is None else parent + (bias,),
        in_dim=in_dim, out_dim=three_h if columns is None else columns[1] - columns[0],
        fisher=kind, stack=stack, columns=columns))
  return specs


def _layer_of(parent: tuple[str, ...], leaves: dict[str, Any], fisher: FisherSpec,
              stacked: StackSpec = None, names: Optional[dict[str, str]] = None
              ) -> Optional[LayerSpec | list[LayerSpec]]:
  """The layer formed by the sibling leaves under ``parent``, or None (a tied embedding
  table: its two specs, the lookup's and the output layer's). ``leaves`` are keyed by the
  names read here (``kernel``, ``bias``, ...), ``names`` maps them to the params' own
  (Haiku's ``w``, ``b``, ...; the same name where absent)."""
  path = paths.join(parent)
  rename: dict[str, str] = names or {}

  def leaf(name: str) -> tuple[str, ...]:
    return parent + (rename.get(name, name),)
  kernel = leaves.get("kernel")
  embedding = leaves.get("embedding")
  scale = leaves.get("scale")
  if kernel is not None and getattr(kernel, "ndim", 0) >= 2:
    kind, in_axes = _resolve(fisher, path)
    if kind is None:
      return None
    _not_tied(kind, path)
    bias = leaves.get("bias")
    if names and haiku_conv_transpose(path):
      return _haiku_conv_transpose(path, kernel, bias, kind, leaf, stack_axes_of(stacked, path))
    n_stack = stack_axes_of(stacked, path)
    if n_stack is None:
      n_stack = _stack_of_bias(kernel, bias) if bias is not None else 0
    shape = tuple(kernel.shape[n_stack:])
    bias_shape = None if bias is None else tuple(bias.shape[n_stack:])
    if in_axes is not None:
      out_ndim = len(shape) - in_axes
    else:
      out_ndim = len(bias_shape) if bias_shape is not None else 1
    if (n_stack >= kernel.ndim - 1 or not 1 <= out_ndim < len(shape)
        or (bias is not None and (shape[len(shape) - out_ndim:] != bias_shape
                                  or tuple(bias.shape[:n_stack]) != tuple(
                                      kernel.shape[:n_stack])))):
      raise UnmodelledLayer(
          path, (leaf("kernel"),) + ((leaf("bias"),) if bias is not None else ()),
          f"bias shape {getattr(bias, 'shape', None)} does not match "
          f"the trailing axes of kernel shape {kernel.shape}"
          + (f" after its {in_axes} input axes" if in_axes is not None else "")
          + (f" and {n_stack} stack axes" if n_stack else ""),
          _channels_first_bias_fix(path, kernel, bias) if names else None)
    return LayerSpec(
        path=path,
        kernel=leaf("kernel"),
        bias=leaf("bias") if bias is not None else None,
        in_dim=math.prod(shape[:len(shape) - out_ndim]),
        out_dim=math.prod(shape[len(shape) - out_ndim:]),
        fisher=kind,
        stack=tuple(kernel.shape[:n_stack]),
    )
  if kernel is None and embedding is not None and getattr(embedding, "ndim", 0) >= 2:
    kind = resolve_fisher(fisher, path)
    if kind is None:
      return None
    if embedding.ndim > 2:
      raise stacked_table(path, leaf("embedding"), embedding.shape)
    # One-hot inputs: the linear Fisher is diagonal; rfim has no cheaper form here,
    # so an embedding always gets the (exact) linear one.
    lookup = LayerSpec(path=path, kernel=leaf("embedding"), bias=None,
                       in_dim=embedding.shape[0], out_dim=embedding.shape[1],
                       fisher="linear", structure="diagonal", tied=kind == TIED)
    if kind != TIED:
      return lookup
    # also the output layer h E^T: the dense layer with inputs h and kernel E^T
    return [lookup, LayerSpec(path=tied_path(path), kernel=leaf("embedding"), bias=None,
                              in_dim=embedding.shape[1], out_dim=embedding.shape[0],
                              fisher="linear", kernel_perm=(1, 0), tied=True, source=path)]
  if kernel is None and scale is not None and getattr(scale, "ndim", 0) >= 1:
    kind = resolve_fisher(fisher, path)
    if kind is None:
      return None
    _not_tied(kind, path)
    bias = leaves.get("bias")
    if bias is not None and tuple(bias.shape) != tuple(scale.shape):
      raise ValueError(
          f"sngd: layer {path!r}: bias shape {bias.shape} does not match scale shape "
          f"{scale.shape}")
    return LayerSpec(path=path, kernel=leaf("scale"),
                     bias=leaf("bias") if bias is not None else None,
                     in_dim=1, out_dim=math.prod(scale.shape), fisher=kind,
                     structure="per_channel")
  return None
