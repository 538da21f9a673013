"""Input patches of a convolution, in the layout of its kernel.

A convolution with kernel ``K`` of shape ``(k_1, ..., k_s, C_in/g, C_out)``
(``g = feature_group_count``) is a dense layer applied at every output
position to the *patch* of input values under the (dilated) window. Its
one-sided local Fisher is the dense one over patches (K-FAC's treatment of
convolutions, R. Grosse and J. Martens, "A Kronecker-factored approximate Fisher
matrix for convolution layers", ICML 2016):

```
G = E[p~ p~^T],   p~ = [patch; 1],   patch of size k_1 * ... * k_s * C_in/g,
```

the expectation taken over the batch and every output position.

Patches are strided slices of the padded input, one per kernel offset, laid
out like the kernel, which flattens as ``k_index * C_in/g + c``: ``G`` indexes
the rows of ``K.reshape(-1, C_out)`` directly and the preconditioned gradient
needs no remapping. (Inputs with ``input_dilation`` go through
``jax.lax.conv_general_dilated_patches``, whose channel-major features are
reordered to the same layout.)

Feature groups (``g > 1``, depthwise when ``g = C_in``): output channels of
group ``j`` only see input channels of group ``j``, all through the same
``(k, C_in/g)`` kernel rows. We keep **one factor shared by all groups**: the
patch of each group is one more sample (``n * positions * g`` rows). This
costs ``d^2`` like an ungrouped layer, and equals per-group factors when the
groups' input statistics agree; per-group factors would cost ``g d^2``.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

# Static description of a call: (kernel_size, strides, padding, input_dilation,
# kernel_dilation, feature_group_count), all tuples / strings (hashable).
ConvConfig = tuple


def _broadcast(x: Any, rank: int) -> tuple[int, ...]:
  if x is None:
    x = 1
  if isinstance(x, int):
    return (x,) * rank
  return tuple(int(v) for v in x)


def _canonical_padding(padding: Any, rank: int) -> Any:
  """Flax's padding spellings, as a hashable lax padding (string or pairs)."""
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return ((padding, padding),) * rank
  pads = []
  for p in padding:
    pads.append((p, p) if isinstance(p, int) else (int(p[0]), int(p[1])))
  if len(pads) != rank:
    raise ValueError(f"sngd: conv padding {padding!r} does not fit {rank} spatial dims")
  return tuple(pads)


def conv_config(module: Any) -> ConvConfig:
  """The static config of a linen ``nn.Conv`` or an ``nnx.Conv``.

  Args:
    module: the conv module (reads ``kernel_size``, ``strides``, ``padding``,
      ``input_dilation``, ``kernel_dilation``, ``feature_group_count``).

  Returns:
    ``(kernel_size, strides, padding, input_dilation, kernel_dilation, groups)``.
  """
  kernel_size = module.kernel_size
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  rank = len(kernel_size)
  return (kernel_size, _broadcast(module.strides, rank),
          _canonical_padding(module.padding, rank), _broadcast(module.input_dilation, rank),
          _broadcast(module.kernel_dilation, rank), int(module.feature_group_count))


def patches(x: jax.Array, config: ConvConfig) -> jax.Array:
  """The input patches of a conv call, one row per (example, position, group).

  Reproduces the padding of Flax's ``Conv`` (``'SAME'``, ``'VALID'``,
  ``'CIRCULAR'``, ``'REFLECT'``, ``'CAUSAL'``, explicit pairs), then
  takes one strided slice per kernel offset and orders each row like the
  kernel's rows ``(k_1, ..., k_s, c)``.

  Args:
    x: the conv input, ``(*batch, *spatial, C_in)`` (channels last).
    config: from ``conv_config``.

  Returns:
    ``(n * positions * groups, prod(kernel_size) * C_in / groups)`` rows.
  """
  kernel_size, strides, padding, input_dilation, kernel_dilation, groups = config
  rank = len(kernel_size)
  x = x.reshape((-1,) + x.shape[x.ndim - rank - 1:])
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if rank != 1:
      raise ValueError("sngd: CAUSAL padding exists for 1-D convolutions only")
    x = jnp.pad(x, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = "VALID"
  if rank > 3:
    raise ValueError(f"sngd: {rank}-D convolutions are not supported (1-D to 3-D are)")
  if all(d == 1 for d in input_dilation):
    out = _windows(x, kernel_size, strides, padding, kernel_dilation)
  else:
    out = _windows_by_conv(x, kernel_size, strides, padding, input_dilation, kernel_dilation)
  # (n, *positions, volume x C_in, either layout) -> (rows, groups, volume, C_in/groups).
  # Each reshape merges or splits one group of axes: under a mesh with explicit axes JAX
  # infers the sharding of those (the rows keep the batch's), not of two at once.
  channels = x.shape[-1]
  volume = math.prod(kernel_size)
  out = out.reshape((-1, out.shape[-1]))
  out = out.reshape((-1, volume, groups, channels // groups))
  out = jnp.swapaxes(out, 1, 2)
  out = out.reshape((-1, volume, channels // groups))
  return out.reshape(-1, volume * channels // groups)


# XLA:CPU fuses a concatenation with at most this many operands, along an axis that is not
# the minor one (`cpu_instruction_fusion.cc`): a wider one is run as copies, each operand a
# kernel of its own.
_CONCAT_FUSED_MAX = 8


def _stack(arrays: list[jax.Array], axis: int) -> jax.Array:
  """``jnp.stack(arrays, axis)`` in concatenations that XLA:CPU fuses into one kernel: at
  most ``_CONCAT_FUSED_MAX`` operands each, along an axis that is not the last.

  More arrays are stacked in groups of ``_CONCAT_FUSED_MAX`` (the last filled with zeros)
  on a further new axis, then flattened and cut to ``len(arrays)``: XLA merges
  concatenations nested along one axis back into one.
  """
  if len(arrays) <= _CONCAT_FUSED_MAX:
    return jnp.stack(arrays, axis)
  count, size = len(arrays), _CONCAT_FUSED_MAX
  arrays = arrays + [jnp.zeros_like(arrays[0])] * (-count % size)
  groups = [jnp.stack(arrays[i:i + size], axis) for i in range(0, len(arrays), size)]
  out = _stack(groups, axis)  # (..., groups, size, ...)
  out = out.reshape(out.shape[:axis] + (-1,) + out.shape[axis + 2:])
  return lax.slice_in_dim(out, 0, count, axis=axis)


def _windows(x: jax.Array, kernel_size, strides, padding, kernel_dilation) -> jax.Array:
  """``(n, *positions, prod(kernel_size) * C)``: one strided slice per kernel offset.

  Copies only (exact). XLA:CPU runs ``conv_general_dilated_patches`` as a
  convolution with a one-hot kernel, ``prod(k) * C`` multiply-adds per output
  value, which made the statistics step of a small ResNet cost several times its
  forward and backward passes (``benchmarks/step_anatomy.py`` and
  benchmarks/README.md measure the change).

  Two compiled kernels: the padded input, then every offset's slice of it, stacked one
  kernel axis at a time on axes before the channels, in concatenations of at most
  ``_CONCAT_FUSED_MAX`` operands, which XLA:CPU fuses into one kernel. (Concatenated on
  the channel axis, a 3x3 conv's patches compiled one kernel per offset, the padding
  fused into each, and ran the 9-operand concatenation as copies: XLA:CPU fuses neither
  a concatenation of more than 8 operands nor one along the minor axis.
  ``benchmarks/conv_stats_ab.py`` measures these patches, with
  ``statistics._gram_with_ones_column``, against the channel-axis concatenation, per conv
  layer's batch estimate and per training step: ``benchmarks/results/conv_stats_ab_cnn.json``
  and ``benchmarks/results/conv_stats_ab_resnet-bn.json``.)
  """
  rank = len(kernel_size)
  spatial = x.shape[1:1 + rank]
  dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation, strict=True)]
  pads = (lax.padtype_to_pads(spatial, dilated, strides, padding)
          if isinstance(padding, str) else padding)
  # lax.pad: explicit pads may be negative (cropping), as lax.conv allows.
  x = lax.pad(x, jnp.zeros((), x.dtype), [(0, 0, 0)] + [(int(lo), int(hi), 0) for lo, hi in pads]
              + [(0, 0, 0)])
  positions = [(x.shape[1 + i] - dilated[i]) // strides[i] + 1 for i in range(rank)]

  def taps(prefix: tuple[int, ...]) -> jax.Array:
    # (n, *positions, *kernel_size[len(prefix):], C): the offsets starting with `prefix`.
    if len(prefix) == rank:
      start = [o * d for o, d in zip(prefix, kernel_dilation, strict=True)]
      limit = [b + (m - 1) * s + 1 for b, m, s in zip(start, positions, strides, strict=True)]
      return lax.slice(x, (0, *start, 0), (x.shape[0], *limit, x.shape[-1]), (1, *strides, 1))
    return _stack([taps(prefix + (o,)) for o in range(kernel_size[len(prefix)])], 1 + rank)

  out = taps(())
  # (..., k_1, ..., k_s, C) flattens to the kernel's row order (k_index * C + c).
  return out.reshape(out.shape[:1 + rank] + (-1,))


def _windows_by_conv(x: jax.Array, kernel_size, strides, padding, input_dilation,
                     kernel_dilation) -> jax.Array:
  """``_windows`` for a dilated input, by ``lax.conv_general_dilated_patches``."""
  rank = len(kernel_size)
  spatial = "DHW"[3 - rank:]
  lhs_spec = "N" + spatial + "C"
  out = lax.conv_general_dilated_patches(
      x, kernel_size, strides, padding, lhs_dilation=input_dilation,
      rhs_dilation=kernel_dilation,
      dimension_numbers=(lhs_spec, spatial + "IO", lhs_spec),
      precision=lax.Precision.HIGHEST)
  # Features come channel-major (c * volume + k_index): to (..., volume, C).
  out = out.reshape(out.shape[:-1] + (x.shape[-1], math.prod(kernel_size)))
  return jnp.swapaxes(out, -1, -2)


def conv_output_rows(z: jax.Array, config: ConvConfig) -> jax.Array:
  """Pre-activations as rows aligned with ``patches``.

  Row ``(i, group j)`` of the patches feeds only output channels of group
  ``j``; the other channels get ``-inf`` there, so their rfim weight
  ``sigmoid(z)^2`` is 0; ``statistics.batch_factor`` divides each channel's
  rfim block by the number of its own group's rows, so that it is the average
  over them (as for the same channel in a conv of its group alone).

  Args:
    z: the conv output, ``(*batch, *spatial_out, C_out)``.
    config: from ``conv_config``.

  Returns:
    ``(n * positions * groups, C_out)``.
  """
  groups = config[5]
  out_channels = z.shape[-1]
  z = z.reshape(-1, out_channels)
  if groups == 1:
    return z
  owner = jnp.arange(out_channels) // (out_channels // groups)
  mask = owner[None, :] == jnp.arange(groups)[:, None]  # (groups, C_out)
  rows = jnp.where(mask[None], z[:, None, :], -jnp.inf)
  return rows.reshape(-1, out_channels)


# Transposed convolutions: ``lax.conv_transpose`` is a convolution of the
# stride-dilated input with the kernel (``transpose_kernel=False``), so its
# patches come from the same call with an identity kernel, whose output feature
# ``k_index * C_in + c`` copies input channel ``c`` at window offset ``k``: the
# kernel's own row order, and Flax's padding rules by construction.
ConvTransposeConfig = tuple


def conv_transpose_config(module: Any) -> Any:
  """``(kernel_size, strides, padding, kernel_dilation)`` of a ``ConvTranspose``.

  Returns None for what is not a plain transposed conv over shared kernel rows
  (``transpose_kernel=True``, or ``'CIRCULAR'`` padding, which folds the output).
  """
  kernel_size = module.kernel_size
  kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
  rank = len(kernel_size)
  padding = _canonical_padding(module.padding, rank)
  if getattr(module, "transpose_kernel", False) or padding == "CIRCULAR":
    return None
  return (kernel_size, _broadcast(module.strides, rank), padding,
          _broadcast(module.kernel_dilation, rank))


def transpose_patches(x: jax.Array, config: ConvTransposeConfig) -> jax.Array:
  """Input patches of a transposed conv, ``(n * positions, prod(k) * C_in)``."""
  kernel_size, strides, padding, kernel_dilation = config
  rank = len(kernel_size)
  x = x.reshape((-1,) + x.shape[x.ndim - rank - 1:])
  size = math.prod(kernel_size) * x.shape[-1]
  eye = jnp.eye(size, dtype=x.dtype).reshape(kernel_size + (x.shape[-1], size))
  out = lax.conv_transpose(x, eye, strides, padding, rhs_dilation=kernel_dilation,
                           precision=lax.Precision.HIGHEST)
  return out.reshape(-1, size)
