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

Two more layer structures have no ``kernel`` (see ``STRUCTURES``):

* ``embedding`` leaves (``nn.Embed``, ``nnx.Embed``, shape ``V x D``): the
  layer's input is a one-hot token, so its linear local Fisher
  ``E[onehot onehot^T] = diag(token frequencies)`` is exactly diagonal and is
  kept as a ``V`` vector (``structure="diagonal"``).
* ``scale`` leaves with an optional sibling ``bias`` of the same shape
  (``LayerNorm``, ``BatchNorm``, ``GroupNorm``, ``RMSNorm``): channel ``c``
  computes ``y_c = scale_c * xhat_c + bias_c``, a one-input "dense unit" with
  augmented input ``[xhat_c; 1]``, so it gets its own ``2 x 2`` block
  ``E[[xhat_c^2, xhat_c], [xhat_c, 1]]`` (``1 x 1`` without a bias)
  (``structure="per_channel"``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import jax

from sngd_jax._src import paths

FISHER_KINDS = ("linear", "rfim")
# How a layer's local Fisher is stored and applied:
#   "dense":       one d x d block (or O blocks for rfim) over x~ = [x; 1];
#   "per_channel": one d x d block per output channel (normalization scale/bias, d <= 2);
#   "diagonal":    a length-in_dim vector (embeddings: one-hot inputs).
STRUCTURES = ("dense", "per_channel", "diagonal")
# `fisher` argument: one kind for all layers, a mapping from layer path to kind
# (None to leave that layer alone), or a callable from path to kind.
FisherSpec = Union[str, Mapping[str, Optional[str]], Callable[[str], Optional[str]]]


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """Static description of one preconditioned layer.

  Attributes:
    path: the layer path, e.g. ``'Dense_0'``.
    kernel: normalized parts of the kernel leaf.
    bias: normalized parts of the bias leaf, or None.
    in_dim: number of input features ``I`` the kernel contracts.
    out_dim: number of outputs ``O`` (product of the output axes).
    fisher: ``'linear'`` or ``'rfim'``.
    structure: one of ``STRUCTURES``; ``kernel`` then names the
      ``kernel``, ``scale`` or ``embedding`` leaf.
  """

  path: str
  kernel: tuple[str, ...]
  bias: Optional[tuple[str, ...]]
  in_dim: int
  out_dim: int
  fisher: str
  structure: str = "dense"

  @property
  def per_unit(self) -> bool:
    """Whether every output unit has its own block (rfim, or a norm channel)."""
    return self.structure == "per_channel" or (
        self.structure == "dense" and self.fisher == "rfim")

  @property
  def factor_shape(self) -> tuple[int, ...]:
    """Shape of the stored factor: ``(d, d)``, ``(O, d, d)`` or ``(in_dim,)``."""
    if self.structure == "diagonal":
      return (self.in_dim,)
    if self.per_unit:
      return (self.out_dim, self.dim, self.dim)
    return (self.dim, self.dim)

  @property
  def dim(self) -> int:
    """Size ``d`` of the local Fisher: ``in_dim`` plus one for a bias."""
    return self.in_dim + (1 if self.bias is not None else 0)

  @property
  def num_blocks(self) -> int:
    """How many ``d x d`` blocks the layer holds: 1, or ``O`` when per unit."""
    return self.out_dim if self.per_unit else 1


def _resolve(fisher: FisherSpec, path: str) -> tuple[Optional[str], Optional[int]]:
  """``(kind or None, number of input axes or None)`` for a layer."""
  if isinstance(fisher, str):
    kind = fisher
  elif isinstance(fisher, Mapping):
    kind = fisher.get(path, "linear")
  elif callable(fisher):
    kind = fisher(path)
  else:
    raise TypeError(f"sngd: `fisher` must be a str, mapping or callable, got {type(fisher)}")
  in_axes = None
  if isinstance(kind, tuple):
    if len(kind) != 2 or not isinstance(kind[1], int) or kind[1] < 1:
      raise ValueError(
          f"sngd: fisher for layer {path!r} must be a kind or (kind, number of input axes), "
          f"got {kind!r}")
    kind, in_axes = kind
  if kind in (None, "none"):
    return None, None
  if kind not in FISHER_KINDS:
    raise ValueError(
        f"sngd: unknown fisher kind {kind!r} for layer {path!r}; expected one of "
        f"{FISHER_KINDS} or None")
  return kind, in_axes


def resolve_fisher(fisher: FisherSpec, path: str) -> Optional[str]:
  """Returns the Fisher kind a layer gets, or None to leave it unchanged.

  Args:
    fisher: a kind name, a mapping from layer path to kind (layers not in it
      get ``'linear'``), or a callable from layer path to kind. A kind may be
      given as ``(kind, n)``: the kernel's first ``n`` axes are its inputs
      (needed only for a kernel without bias and several output axes, e.g.
      the ``(D, heads, head_dim)`` projections of bias-free attention, which
      the params alone do not tell apart from a conv kernel).
    path: the layer path.

  Returns:
    ``'linear'``, ``'rfim'`` or None.

  Raises:
    ValueError: for an unknown kind, naming the layer path.
  """
  return _resolve(fisher, path)[0]


def discover(params: Any, fisher: FisherSpec = "linear") -> dict[str, LayerSpec]:
  """Finds the layers of a params tree.

  A layer is a ``kernel`` (ndim >= 2, optional ``bias``), an ``embedding``
  (``V x D``) or a ``scale`` (optional ``bias``); see the module docstring.

  Args:
    params: a params pytree (linen ``params`` or ``variables``, NNX state).
    fisher: see ``resolve_fisher``.

  Returns:
    Layer specs keyed by layer path, in tree order.
  """
  groups: dict[tuple[str, ...], dict[str, Any]] = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = paths.leaf_parts(key_path)
    if not parts:
      continue
    # A layer at the root (the model is one layer) has the empty path ''.
    groups.setdefault(parts[:-1], {})[parts[-1]] = leaf
  specs = {}
  for parent, leaves in groups.items():
    spec = _layer_of(parent, leaves, fisher)
    if spec is not None:
      specs[spec.path] = spec
  return specs


def _layer_of(parent: tuple[str, ...], leaves: dict[str, Any],
              fisher: FisherSpec) -> Optional[LayerSpec]:
  """The layer formed by the sibling leaves under ``parent``, or None."""
  path = paths.join(parent)
  kernel = leaves.get("kernel")
  embedding = leaves.get("embedding")
  scale = leaves.get("scale")
  if kernel is not None and getattr(kernel, "ndim", 0) >= 2:
    kind, in_axes = _resolve(fisher, path)
    if kind is None:
      return None
    bias = leaves.get("bias")
    if in_axes is not None:
      out_ndim = kernel.ndim - in_axes
    else:
      out_ndim = bias.ndim if bias is not None else 1
    if not 1 <= out_ndim < kernel.ndim or (bias is not None and tuple(
        kernel.shape[kernel.ndim - out_ndim:]) != tuple(bias.shape)):
      raise ValueError(
          f"sngd: layer {path!r}: bias shape {getattr(bias, 'shape', None)} does not match "
          f"the trailing axes of kernel shape {kernel.shape}"
          + (f" after its {in_axes} input axes" if in_axes is not None else ""))
    return LayerSpec(
        path=path,
        kernel=parent + ("kernel",),
        bias=parent + ("bias",) if bias is not None else None,
        in_dim=math.prod(kernel.shape[:kernel.ndim - out_ndim]),
        out_dim=math.prod(kernel.shape[kernel.ndim - out_ndim:]),
        fisher=kind,
    )
  if kernel is None and embedding is not None and getattr(embedding, "ndim", 0) == 2:
    kind = resolve_fisher(fisher, path)
    if kind is None:
      return None
    # One-hot inputs: the linear Fisher is diagonal; rfim has no cheaper form here,
    # so an embedding always gets the (exact) linear one.
    return LayerSpec(path=path, kernel=parent + ("embedding",), bias=None,
                     in_dim=embedding.shape[0], out_dim=embedding.shape[1],
                     fisher="linear", structure="diagonal")
  if kernel is None and scale is not None and getattr(scale, "ndim", 0) >= 1:
    kind = resolve_fisher(fisher, path)
    if kind is None:
      return None
    bias = leaves.get("bias")
    if bias is not None and tuple(bias.shape) != tuple(scale.shape):
      raise ValueError(
          f"sngd: layer {path!r}: bias shape {bias.shape} does not match scale shape "
          f"{scale.shape}")
    return LayerSpec(path=path, kernel=parent + ("scale",),
                     bias=parent + ("bias",) if bias is not None else None,
                     in_dim=1, out_dim=math.prod(scale.shape), fisher=kind,
                     structure="per_channel")
  return None
