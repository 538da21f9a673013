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
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Mapping, Optional, Union

import jax

from sngd_jax import paths

FISHER_KINDS = ("linear", "rfim")
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
  """

  path: str
  kernel: tuple[str, ...]
  bias: Optional[tuple[str, ...]]
  in_dim: int
  out_dim: int
  fisher: str

  @property
  def dim(self) -> int:
    """Size ``d`` of the local Fisher: ``in_dim`` plus one for a bias."""
    return self.in_dim + (1 if self.bias is not None else 0)

  @property
  def num_blocks(self) -> int:
    """How many ``d x d`` blocks the layer holds: 1, or ``O`` for rfim."""
    return self.out_dim if self.fisher == "rfim" else 1


def resolve_fisher(fisher: FisherSpec, path: str) -> Optional[str]:
  """Returns the Fisher kind a layer gets, or None to leave it unchanged.

  Args:
    fisher: a kind name, a mapping from layer path to kind (layers not in it
      get ``'linear'``), or a callable from layer path to kind.
    path: the layer path.

  Returns:
    ``'linear'``, ``'rfim'`` or None.

  Raises:
    ValueError: for an unknown kind, naming the layer path.
  """
  if isinstance(fisher, str):
    kind = fisher
  elif isinstance(fisher, Mapping):
    kind = fisher.get(path, "linear")
  elif callable(fisher):
    kind = fisher(path)
  else:
    raise TypeError(f"sngd: `fisher` must be a str, mapping or callable, got {type(fisher)}")
  if kind in (None, "none"):
    return None
  if kind not in FISHER_KINDS:
    raise ValueError(
        f"sngd: unknown fisher kind {kind!r} for layer {path!r}; expected one of "
        f"{FISHER_KINDS} or None")
  return kind


def discover(params: Any, fisher: FisherSpec = "linear") -> dict[str, LayerSpec]:
  """Finds the layers of a params tree.

  Args:
    params: a params pytree (linen ``params`` or ``variables``, NNX state).
    fisher: see :func:`resolve_fisher`.

  Returns:
    Layer specs keyed by layer path, in tree order.
  """
  groups: dict[tuple[str, ...], dict[str, Any]] = {}
  for key_path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    parts = paths.leaf_parts(key_path)
    if len(parts) < 2:
      continue
    groups.setdefault(parts[:-1], {})[parts[-1]] = leaf
  specs = {}
  for parent, leaves in groups.items():
    kernel = leaves.get("kernel")
    if kernel is None or getattr(kernel, "ndim", 0) < 2:
      continue
    path = paths.join(parent)
    kind = resolve_fisher(fisher, path)
    if kind is None:
      continue
    bias = leaves.get("bias")
    out_ndim = bias.ndim if bias is not None else 1
    if out_ndim >= kernel.ndim or tuple(kernel.shape[kernel.ndim - out_ndim:]) != tuple(
        getattr(bias, "shape", kernel.shape[-1:])):
      raise ValueError(
          f"sngd: layer {path!r}: bias shape {getattr(bias, 'shape', None)} does not match "
          f"the trailing axes of kernel shape {kernel.shape}")
    in_dim = math.prod(kernel.shape[:kernel.ndim - out_ndim])
    out_dim = math.prod(kernel.shape[kernel.ndim - out_ndim:])
    specs[path] = LayerSpec(
        path=path,
        kernel=parent + ("kernel",),
        bias=parent + ("bias",) if bias is not None else None,
        in_dim=in_dim,
        out_dim=out_dim,
        fisher=kind,
    )
  return specs
