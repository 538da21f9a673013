"""What a layer is: ``LayerSpec`` (shapes, Fisher kind, structure, stack) and the
``fisher``/``stacked`` option resolution shared by every way of finding layers
(``sngd_jax._src.layers`` for params trees, ``sngd_jax._src.equinox_layers``
for Equinox models). See ``sngd_jax._src.layers`` for the rules.
"""

from __future__ import annotations

import dataclasses
import math
import re
import sys
from typing import Any, Callable, Mapping, Optional, Union

FISHER_KINDS = ("linear", "rfim")
"""The kinds of local Fisher that ``sngd(fisher=...)`` takes for a layer (see ``sngd_jax.sngd``);
``None`` leaves a layer alone and ``"tied"`` marks a tied embedding table."""
TIED = "tied"
"""The ``fisher`` kind of an embedding table that is also the output layer (``attend``):
a layer path's own setting only (``fisher={path: "tied"}``), see ``sngd_jax.discover``."""
# How a layer's local Fisher is stored and applied:
#   "dense":       one d x d block (or O blocks for rfim) over x~ = [x; 1];
#   "per_channel": one d x d block per output channel (normalization scale/bias, d <= 2);
#   "diagonal":    a length-in_dim vector (embeddings: one-hot inputs).
STRUCTURES = ("dense", "per_channel", "diagonal")
# `fisher` argument: one kind for all layers, a mapping from layer path to kind
# (None to leave that layer alone), or a callable from path to kind.
FisherSpec = Union[str, Mapping[str, Optional[str]], Callable[[str], Optional[str]]]
# `stacked` argument: layer path prefix -> number of leading stack axes of its layers.
StackSpec = Optional[Mapping[str, int]]


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
    stack: the shape of the leading stack axes of the kernel and bias (one
      layer per index, see the module docstring); ``()`` for one layer.
    kernel_perm: the permutation of the kernel's axes after the stack axes that
      puts its input axes first and its output axes last (Equinox stores
      outputs first); None when they already are.
    tied: one of the two specs of an embedding table ``E`` (``V x D``) that is
      also the output layer ``logits = h E^T`` (``fisher="tied"``): the
      lookup's (``structure="diagonal"``, at the table's path, from its lookups)
      or the output layer's (``structure="dense"``: inputs ``h``, kernel
      ``E^T``, no bias; at ``tied_path(path)``, from its ``attend`` calls).
      Both precondition the table together: ``Delta E = (D + rho I)^{-1} g_E
      (G_h + rho I)^{-1}`` (``sngd_jax._src.precondition``).
    source: the layer path whose captured calls this spec reads (the output-layer
      spec of a tied table reads the table's); None for its own path.
    columns: ``(lo, hi)``: the layer is the kernel's output columns ``lo:hi`` (its last axis;
      the bias's too), one of several layers that share the kernel leaf and read different
      inputs (``hk.GRU``'s ``w_h``: its ``2H`` update and reset columns multiply ``h``, its
      ``H`` candidate columns ``r * h``); None for the whole kernel. Each such layer's update
      is written into its own columns (``precondition.split``).
  """

  path: str
  kernel: tuple[str, ...]
  bias: Optional[tuple[str, ...]]
  in_dim: int
  out_dim: int
  fisher: str
  structure: str = "dense"
  stack: tuple[int, ...] = ()
  kernel_perm: Optional[tuple[int, ...]] = None
  tied: bool = False
  source: Optional[str] = None
  columns: Optional[tuple[int, int]] = None

  @property
  def tied_head(self) -> bool:
    """The output-layer spec of a tied table (its leaf is updated under the lookup's spec)."""
    return self.tied and self.structure == "dense"

  @property
  def per_unit(self) -> bool:
    """Whether every output unit has its own block (rfim, or a norm channel)."""
    return self.structure == "per_channel" or (
        self.structure == "dense" and self.fisher == "rfim")

  @property
  def factor_shape(self) -> tuple[int, ...]:
    """Shape of the stored factor: ``(d, d)``, ``(O, d, d)`` or ``(in_dim,)``, after the
    stack shape."""
    if self.structure == "diagonal":
      return self.stack + (self.in_dim,)
    if self.per_unit:
      return self.stack + (self.out_dim, self.dim, self.dim)
    return self.stack + (self.dim, self.dim)

  @property
  def num_layers(self) -> int:
    """How many layers the spec stands for: the size of its stack (1 unstacked)."""
    return math.prod(self.stack)

  @property
  def dim(self) -> int:
    """Size ``d`` of the local Fisher: ``in_dim`` plus one for a bias."""
    return self.in_dim + (1 if self.bias is not None else 0)

  @property
  def num_blocks(self) -> int:
    """How many ``d x d`` blocks the layer holds: 1, or ``O`` when per unit, times the
    number of stacked layers."""
    return self.num_layers * (self.out_dim if self.per_unit else 1)

  def one_layer(self) -> LayerSpec:
    """The spec of one layer of the stack (itself when not stacked)."""
    return dataclasses.replace(self, stack=()) if self.stack else self


def tied_path(path: str) -> str:
  """The path of the output-layer spec of the tied embedding table at ``path``."""
  return f"{path}[attend]"


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
  if kind == TIED:
    if isinstance(fisher, str):
      raise ValueError(
          "sngd: fisher='tied' is for an embedding table that is also the output layer; "
          "name it: fisher={'<embedding path>': 'tied'}")
    return kind, None
  if kind not in FISHER_KINDS:
    raise ValueError(
        f"sngd: unknown fisher kind {kind!r} for layer {path!r}; expected one of "
        f"{FISHER_KINDS}, 'tied' (an embedding table that is also the output layer) or None")
  return kind, in_axes


_HAIKU_CONV_TRANSPOSE = re.compile(r"conv(_n|[123]_)d_transpose(_[0-9]+)?")


def haiku_conv_transpose(path: str) -> bool:
  """Whether the Haiku layer at ``path`` bears the default name of an ``hk.ConvNDTranspose``
  (``conv2_d_transpose``, ``conv_nd_transpose_1``, ...), the one thing in Haiku params that
  tells its ``(*k, O, C)`` kernel (outputs before inputs) from a conv's ``(*k, C, O)``:
  ``discover`` reads such a kernel with its last two axes swapped, and ``capture_hk`` records
  only such transposed convs (a named one is refused by name)."""
  return _HAIKU_CONV_TRANSPOSE.fullmatch(path.rsplit("/", 1)[-1]) is not None


HAIKU_GRU = ("w_i", "w_h", "b")
"""The params of an ``hk.GRU``: ``w_i`` ``(I, 3H)``, ``w_h`` ``(H, 3H)``, ``b`` ``(3H,)``
(gates ``z``, ``r``, ``a`` in that order of columns)."""


def haiku_gru_layers(module: str) -> tuple[str, str, str]:
  """The three layers of the ``hk.GRU`` at module path ``module``: ``'<module>/w_i'`` (with
  ``b``) over ``x_t``, ``'<module>/w_h[zr]'`` (``w_h[:, :2H]``, the update and reset gates)
  over ``h_{t-1}`` and ``'<module>/w_h[a]'`` (``w_h[:, 2H:]``, the candidate) over
  ``r_t * h_{t-1}``: the paths ``discover`` gives them and ``capture_hk`` records them at."""
  return f"{module}/w_i", f"{module}/w_h[zr]", f"{module}/w_h[a]"


def resolve_fisher(fisher: FisherSpec, path: str) -> Optional[str]:
  """Returns the Fisher kind a layer gets, or None to leave it unchanged.

  Args:
    fisher: a kind name, a mapping from layer path to kind (layers not in it
      get ``'linear'``), or a callable from layer path to kind. A kind may be
      given as ``(kind, n)``: the kernel's first ``n`` axes are its inputs
      (needed only for a kernel without bias and several output axes, e.g.
      the ``(D, heads, head_dim)`` projections of bias-free attention, which
      the params alone do not tell apart from a conv kernel). An embedding
      table that is also the output layer (``nn.Embed.attend``, tied weights)
      takes ``'tied'``, named by its path (a mapping or callable).
    path: the layer path.

  Returns:
    ``'linear'``, ``'rfim'``, ``'tied'`` or None.

  Raises:
    ValueError: for an unknown kind, naming the layer path.
  """
  return _resolve(fisher, path)[0]


def stack_axes_of(stacked: StackSpec, path: str) -> Optional[int]:
  """The number of stack axes ``stacked`` gives the layer at ``path`` (longest prefix)."""
  if not stacked:
    return None
  best = None
  for prefix, n in stacked.items():
    if path == prefix or path.startswith(prefix + "/") or prefix == "":
      if best is None or len(prefix) > len(best[0]):
        best = (prefix, n)
  return None if best is None else best[1]


class UnmodelledLayer(ValueError):
  """A ``kernel`` (and ``bias``) whose shapes fit no layer sngd models, e.g. the
  ``k x out x in`` kernel of ``ConvTranspose(transpose_kernel=True)``.

  Attributes:
    path: the layer path.
    leaves: the path parts of its kernel and bias leaves.
    reason: what does not fit, without the fix.
  """

  def __init__(self, path: str, leaves: tuple[tuple[str, ...], ...], reason: str,
               fix: Optional[str] = None):
    if fix is None:
      fix = (f"if its kernel is not laid out inputs first, then outputs (as "
             f"`ConvTranspose(transpose_kernel=True)`), leave it to the next transform with "
             f"`fisher={{{path!r}: None}}`")
    super().__init__(f"sngd: layer {path!r}: {reason}. {fix[0].upper()}{fix[1:]}")
    self.path, self.leaves, self.reason, self.fix = path, leaves, reason, fix


def stacked_table(path: str, leaf: tuple[str, ...], shape: tuple[int, ...]) -> UnmodelledLayer:
  """The error for an embedding table with stack axes (not modelled yet)."""
  return UnmodelledLayer(
      path, (leaf,),
      f"an embedding table of shape {tuple(shape)} has {len(shape) - 2} leading stack "
      f"ax{'is' if len(shape) == 3 else 'es'} (a vmap over the weights: an ensemble of "
      "tables), whose per-member token "
      "counts sngd does not keep",
      f"vmap the whole training step over the members instead (one sngd state each: "
      f"docs/training-loops.md), or leave the table to the next transform with "
      f"`fisher={{{path!r}: None}}`"
      + (f". {note}" if (note := raw_param_note(path, leaf, "diagonal")) else ""))


# What a norm layer's or an embedding table's param is read as, by the names ``discover``
# reads it under (linen and NNX; Haiku's ``embeddings``), and what a user's own array of that
# name often is (``self.param('scale', ...)``, ``self.param('embedding', ...)``).
_RAW_PARAM_LOOKALIKES = {
    "per_channel": ("a norm layer's scale", ("scale",), "a LayerScale or a learned temperature",
                    "gamma"),
    "diagonal": ("an embedding table", ("embedding", "embeddings"),
                 "a learned position embedding or class token", "pos_embedding"),
}


def raw_param_note(path: str, leaf: tuple[str, ...], structure: str) -> str:
  """For a norm layer's scale or an embedding table (``structure``) that no layer call
  explains: the other thing it may be, an array of the user's own module read as that
  layer's param by its name alone (``params`` hold no layer classes), and the two fixes.
  Empty for other structures and names (Equinox finds its layers by type).

  A raw param (made by ``self.param`` and used directly: a ViT's position embedding, a
  LayerScale) belongs to no layer and passes through to the next transform, unless its name
  is one that ``discover`` reads as a layer's (``scale``, ``embedding``, ``kernel``)."""
  if structure not in _RAW_PARAM_LOOKALIKES:
    return ""
  what, names, example, rename = _RAW_PARAM_LOOKALIKES[structure]
  name = leaf[-1] if leaf else None
  if name not in names:
    return ""
  return (f"If {'/'.join(leaf)!r} is not {what} but an array of your own module named "
          f"{name!r} ({example}: `self.param({name!r}, ...)`, an `nnx.Param` attribute), it "
          f"was read as {what} by that name alone: give it another name (e.g. {rename!r}) or "
          f"pass `fisher={{{path!r}: None}}`; either way it goes to the next transform "
          "untouched, as every other array of your own does")


def stacked_kernel_note(path: str, structure: str, stack: tuple[int, ...]) -> str:
  """For a dense layer with stack axes that no call explains: the way to record a stack of
  dense layers written by hand (a mixture of experts' ``(E, d_in, d_out)`` kernel used by
  ``jnp.einsum('ecd,edf->ecf', x, kernel)``), one factor per layer; empty otherwise."""
  if structure != "dense" or not stack:
    return ""
  return (f"Its params are a stack of {'x'.join(map(str, stack))} dense layers: a stacked "
          "kernel you use yourself (experts' (E, d_in, d_out) kernel in "
          "`jnp.einsum('ecd,edf->ecf', x, kernel)`) is recorded, one factor per layer, when "
          "computed as `jax.vmap(sngd_jax.dense)(x, kernel, bias)` (x: (E, ..., d_in))")


DENSE_LAYOUTS = ("in_out", "out_in")
"""How a hand-written dense layer stores its kernel (``sngd_jax.dense``, ``sngd_jax.dense_layer``):
``'in_out'``, ``(in, out)`` with ``y = x @ kernel`` (Flax's ``Dense``/``Linear``); ``'out_in'``,
``(out, in)`` with ``y = kernel @ x`` for one example (Equinox's ``Linear``)."""


@dataclasses.dataclass(frozen=True)
class DenseDeclaration:
  """What ``sngd_jax.dense_layer`` declared about an Equinox module class.

  Attributes:
    weight: the field that holds the kernel.
    bias: the field that holds the bias (shape ``(out,)``), or None for a layer without one.
    layout: one of ``DENSE_LAYOUTS``.
  """

  weight: str
  bias: Optional[str]
  layout: str


DECLARED: dict[type, DenseDeclaration] = {}
"""Equinox module class -> its ``DenseDeclaration`` (filled by ``dense_layer``)."""


def dense_layer(cls: Any = None, *, weight: str = "weight", bias: Optional[str] = "bias",
                layout: str = "out_in") -> Any:
  """Declares a hand-written Equinox module class as a dense layer (a class decorator).

  Equinox layers are found by their type (``eqx.nn.Linear``, ...), so a module you write
  yourself must say which of its fields is the kernel for ``sngd`` to keep a local Fisher
  ``G = E[x~ x~^T]`` for it; its ``__call__`` then computes the layer with
  ``sngd_jax.dense(x, self.weight, self.bias, layout=...)``, which records ``x`` while
  ``capture_eqx`` runs. Linen and NNX modules need no declaration: a param named
  ``kernel`` (stored ``(in, out)``) with an optional sibling ``bias`` is a dense layer there.

  Examples:
    ```python
    @sngd_jax.dense_layer                      # weight (out, in), bias (out,): eqx.nn.Linear's
    class MyLinear(eqx.Module):
      weight: jax.Array
      bias: jax.Array
      def __call__(self, x):
        return sngd_jax.dense(x, self.weight, self.bias, layout="out_in")
    ```

  Args:
    cls: the class (when used as ``@sngd_jax.dense_layer`` without arguments).
    weight: the field holding the kernel (2-D, plus leading stack axes for layers made
      by ``eqx.filter_vmap``).
    bias: the field holding the bias, shape ``(out,)``; None for a layer without bias.
    layout: ``'out_in'`` (default: a ``(out, in)`` weight, ``y = weight @ x``, as
      ``eqx.nn.Linear``) or ``'in_out'`` (a ``(in, out)`` kernel, ``y = x @ kernel``).

  Returns:
    The class, unchanged (or, called with keyword arguments only, the decorator).
  """
  if layout not in DENSE_LAYOUTS:
    raise ValueError(
        f"sngd: dense_layer(layout={layout!r}): expected one of {DENSE_LAYOUTS} ('out_in': "
        "a (out, in) weight as eqx.nn.Linear stores it; 'in_out': a (in, out) kernel)")

  def declare(c: Any) -> Any:
    eqx = sys.modules.get("equinox")
    if eqx is None or not (isinstance(c, type) and issubclass(c, eqx.Module)):
      raise TypeError(
          f"sngd: dense_layer declares Equinox module classes, got {c!r}. A linen or NNX "
          "module needs no declaration: name its params 'kernel' (stored (in, out)) and "
          "'bias', and compute the layer with `sngd_jax.dense(x, kernel, bias)`")
    DECLARED[c] = DenseDeclaration(weight, bias, layout)
    return c

  return declare if cls is None else declare(cls)


def declared(cls: type) -> Optional[DenseDeclaration]:
  """The declaration of ``cls`` or of its nearest declared base class, or None."""
  for base in cls.__mro__:
    if base in DECLARED:
      return DECLARED[base]
  return None


TRANSPOSED_USE = ("transposed_use",)
"""The ``config`` of an ``embed`` record that marks a use of the table as the transposed
weight of another layer (an ``eqx.nn.Linear`` reading ``E^T`` through ``eqx.nn.Shared``'s
``get``): that layer's inputs index the table's rows, as the lookup's token ids do, so its
local Fisher on the row side is not diagonal and neither ``diag(f)`` nor ``"tied"``
models it. The record holds no ids (``inputs`` is empty): a lookup of nothing wherever it is
read as a lookup, and ``layer_calls`` raises on it."""
