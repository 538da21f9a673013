"""Which layer calls capture records, and what it records for each: one table.

``LAYERS`` maps a linen or NNX layer class to its recorder, a function
``(module, args, kwargs, output) -> (x, z, kind, config)`` (or None for a call
that sngd cannot model, which is then not recorded), where ``args`` are the
positional arguments of the call (the input first). Subclasses are matched
through their MRO (``lookup``). Normalization layers (``NORMS``) are
recorded from ``xhat``, which Flax's own normalization routine computes
(``flax_patches``); embeddings record token ids (``kind='embed'``).

Supported: ``Dense``/``Linear``, ``DenseGeneral``/``LinearGeneral`` (hence
the q/k/v/out projections of attention), ``Einsum`` (kernels laid out as
contracted axes then output axes), ``Conv`` (1-3-D), ``ConvTranspose``
(``transpose_kernel=False``, not ``'CIRCULAR'``), ``Embed``, linen's
``DenseParams`` of ``OptimizedLSTMCell``, and the normalization layers
(``LayerNorm``, ``BatchNorm``, ``GroupNorm``, ``RMSNorm``, ``InstanceNorm``).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx

from sngd_jax._src import conv as conv_lib
from sngd_jax._src.capture.records import Record, axes_shifted

LayerRecorder = Callable[[Any, tuple, dict, Any], Record]


def contract_config(axes: Any, ndim: int) -> tuple:
  """Dense config for a kernel contracting input ``axes`` (kernel order = sorted)."""
  axes = (axes,) if isinstance(axes, int) else tuple(axes)
  axes = tuple(sorted(a % ndim for a in axes))
  if axes == (ndim - 1,):
    return ()
  return (axes, None)


def einsum_config(einsum_str: str, x_ndim: int, kernel_ndim: int) -> Optional[tuple]:
  """Dense config of an einsum layer, or None if its layout is not a dense layer's.

  Supported: ``lhs,rhs->out`` where the kernel ``rhs`` is the contracted
  letters followed by output letters, every other ``lhs`` letter is a row
  (batch/position) letter kept in ``out``, and no letter is shared by all three.
  (Without a bias and with several output letters the params do not say where
  the kernel's input axes end: ``sngd_jax.coverage`` then gives the
  ``fisher={path: (kind, n_input_axes)}`` to pass.)

  Args:
    einsum_str: the equation (explicit, two operands).
    x_ndim: rank of the input.
    kernel_ndim: rank of the kernel.

  Returns:
    ``(contract_axes, out_perm)`` for ``sngd_jax._src.statistics.dense_rows``.
  """
  eq = einsum_str.replace(" ", "")
  if "->" not in eq or eq.count(",") != 1:
    return None
  operands, out = eq.split("->")
  lhs, rhs = operands.split(",")
  if "..." in lhs:
    free = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    fill = "".join(free[:x_ndim - (len(lhs) - 3)])
    lhs, out = lhs.replace("...", fill), out.replace("...", fill)
  if "." in rhs or len(lhs) != x_ndim or len(rhs) != kernel_ndim:
    return None
  contracted = [c for c in rhs if c in lhs and c not in out]
  kernel_out = [c for c in rhs if c in out and c not in lhs]
  rows = [c for c in lhs if c not in rhs]
  if (list(rhs) != contracted + kernel_out or not contracted or not kernel_out
      or any(c not in out for c in rows) or sorted(out) != sorted(rows + kernel_out)):
    return None
  axes = tuple(lhs.index(c) for c in contracted)  # in kernel order
  out_perm = tuple(out.index(c) for c in rows + kernel_out)
  return (axes, None if out_perm == tuple(range(len(out))) else out_perm)


def _dense(module, args, kwargs, out) -> Record:
  x, out = one_example(args[0], out, 0)
  return x, out, "dense", ()


def _contracted_one_example(x, out, config: tuple) -> Record:
  """The record of a dense call contracting the input axes of ``config`` (``()``: the last),
  with an example axis.

  A ``DenseGeneral``/``LinearGeneral``/``Einsum`` called on one unbatched example whose
  axes are all contracted (``(D,)``, or ``(H, D)`` with ``axis=(-2, -1)``; per example, e.g.
  under a ``jax.vmap`` of the captured gradient) has no row axis: its leading axis holds
  features and must not be read as examples (``stats_batch_size`` cut its features), as
  ``_one_example`` for dense and conv calls and ``norm_record`` for norms. One leading
  row axis is added, and the contracted axes shift past it.
  """
  contracted = len(config[0]) if config else 1
  if x.ndim == contracted:
    return x[None], out[None], "dense", axes_shifted("dense", config, 1)
  return x, out, "dense", config


def _linen_dense_general(module, args, kwargs, out) -> Record:
  if module.batch_dims:
    return None  # kernel with batch axes: not one dense layer
  x = args[0]
  return _contracted_one_example(x, out, contract_config(module.axis, x.ndim))


def _nnx_linear_general(module, args, kwargs, out) -> Record:
  if module.batch_axis:
    return None  # kernel with batch axes: not one dense layer
  x = args[0]
  return _contracted_one_example(x, out, contract_config(module.axis, x.ndim))


def _einsum(kernel_ndim: Callable[[Any], int]) -> LayerRecorder:
  def recorder(module, args, kwargs, out) -> Record:
    x = args[0]
    eq = kwargs.get("einsum_str", args[1] if len(args) > 1 else None) or module.einsum_str
    config = einsum_config(eq, x.ndim, kernel_ndim(module))
    return None if config is None else _contracted_one_example(x, out, config)
  return recorder


def one_example(x, out, rank: int):
  """``(x, out)`` with an example axis: Flax's convs also take one unbatched example
  ``(*spatial, C)`` (``rank`` spatial axes; a ``Dense`` one ``(D,)`` vector, ``rank=0``),
  whose first axis must not be read as examples (the rows' chunks and
  ``stats_batch_size`` cut along the example axis)."""
  if x.ndim == rank + 1:
    return x[None], out[None]
  return x, out


def norm_record(xhat, out, feature_axes: tuple[int, ...]) -> tuple[Any, Any, tuple]:
  """``(xhat, out, config)`` of a normalization call, with an example axis.

  A ``LayerNorm``/``RMSNorm`` called on one unbatched ``(C,)`` vector (per example, e.g.
  under a ``jax.vmap`` of the captured gradient) normalizes over every axis: it is one
  example, whose leading axis holds channels and must not be read as examples (as
  ``one_example`` for dense and conv calls).
  """
  if xhat.ndim == len(feature_axes):
    return xhat[None], out[None], (tuple(a + 1 for a in feature_axes),)
  return xhat, out, (feature_axes,)


def _conv(module, args, kwargs, out) -> Record:
  if getattr(module, "mask", None) is not None:
    return None  # a masked kernel: its inputs are not every patch entry (not modelled)
  config = conv_lib.conv_config(module)
  x, out = one_example(args[0], out, len(config[0]))
  return x, out, "conv", config


def _conv_transpose(module, args, kwargs, out) -> Record:
  if getattr(module, "mask", None) is not None:
    return None  # as _conv
  config = conv_lib.conv_transpose_config(module)
  if config is None:
    return None
  x, out = one_example(args[0], out, len(config[0]))
  return x, out, "conv_transpose", config


def _embed(module, args, kwargs, out) -> Record:
  return args[0], out, "embed", ()


def _dense_params(module, args, kwargs, out) -> Record:
  # OptimizedLSTMCell's DenseParams returns (kernel, bias); the cell fuses the
  # matmuls, so the pre-activation is recomputed here (used by rfim only).
  x = args[0]
  kernel, bias = out
  z = jnp.dot(x, kernel.astype(x.dtype))
  if bias is not None:
    z = z + bias.astype(z.dtype)
  return x, z, "dense", ()


LAYERS: dict[type, LayerRecorder] = {
    # linen
    nn.Dense: _dense,
    nn.DenseGeneral: _linen_dense_general,
    nn.Einsum: _einsum(lambda m: len(m.shape)),
    nn.Conv: _conv,
    nn.ConvTranspose: _conv_transpose,
    nn.Embed: _embed,
    nn.recurrent.DenseParams: _dense_params,
    # NNX
    nnx.Linear: _dense,
    nnx.LinearGeneral: _nnx_linear_general,
    nnx.Einsum: _einsum(lambda m: m.kernel.ndim),
    nnx.Conv: _conv,
    nnx.ConvTranspose: _conv_transpose,
    nnx.Embed: _embed,
}
"""Layer class (linen or NNX) -> recorder ``(module, args, kwargs, output) -> Record``."""

NORMS: tuple[type, ...] = (nn.LayerNorm, nn.BatchNorm, nn.GroupNorm, nn.RMSNorm,
                           nn.InstanceNorm, nnx.LayerNorm, nnx.BatchNorm, nnx.GroupNorm,
                           nnx.RMSNorm, nnx.InstanceNorm)
"""Normalization layers (linen and NNX), recorded from ``xhat``."""

NNX_CELLS: tuple[type, ...] = (nnx.LSTMCell, nnx.OptimizedLSTMCell, nnx.GRUCell,
                               nnx.SimpleCell)
"""NNX recurrent cells whose inner ``Linear`` layers are recorded under ``nnx.RNN``."""


WEIGHT_NAMES: dict[type, str] = {nn.Embed: "embedding", nnx.Embed: "embedding",
                                 **{cls: "scale" for cls in NORMS}}
"""The param that names a layer's weight, where it is not ``kernel``."""


def weight_name(module: Any) -> str:
  """The name of the param that holds ``module``'s weight (kernel, embedding or scale)."""
  for cls in type(module).__mro__:
    if cls in WEIGHT_NAMES:
      return WEIGHT_NAMES[cls]
  return "kernel"


def lookup(module: Any) -> Optional[LayerRecorder]:
  """The recorder of ``module``'s class (or nearest base class in ``LAYERS``)."""
  for cls in type(module).__mro__:
    if cls in LAYERS:
      return LAYERS[cls]
  return None
