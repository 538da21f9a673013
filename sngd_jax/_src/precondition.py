"""Applying the cached inverses to a layer's gradient, and the trust region.

A layer's gradient is gathered into the augmented matrix ``[gW; gb^T]``
(``d x O``, ``augmented``), multiplied by the cached inverse of its damped
local Fisher (``apply_inverse``):

```
U = (G + rho I)^{-1} [gW; gb^T]           (one d x d block, fisher="linear")
u_j = (G_j + rho_j I)^{-1} g_j            (a block per output unit: rfim, norms)
U = diag(1 / (f + rho)) gE                (diagonal: embeddings)
U = diag(1 / (f + rho)) gE (G_h + rho I)^{-1}   (a tied table: the lookup's and the
                                                 output layer's, fisher="tied")
```

and split back into kernel and bias (``split``). The trust region
(``trust_region_scale``) then scales all preconditioned layers jointly so
that the update's norm in the local-Fisher metric,
``q = sum_l <g_l, u_l> = sum_l g_l^T (G_l + rho_l I)^{-1} g_l``, is at most
``max_norm``. The reconstructed network (``sngd_jax._src.reconstruct``)
uses the same gather and split.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from sngd_jax._src import distributed
from sngd_jax._src import dtypes as dtypes_lib
from sngd_jax._src.dtypes import compute_dtype
from sngd_jax._src.inverse import diagonal as diagonal_lib
from sngd_jax._src.inverse.base import InverseMethod
from sngd_jax._src.layers import LayerSpec, tied_path


def _kernel_perm(spec: LayerSpec) -> tuple[int, ...]:
  """The full permutation of the kernel leaf (stack axes kept first), or ``()``."""
  if spec.kernel_perm is None:
    return ()
  k = len(spec.stack)
  return tuple(range(k)) + tuple(p + k for p in spec.kernel_perm)


def augmented(spec: LayerSpec, leaves: Sequence[Any], index: Mapping[tuple[str, ...], int],
              dtype) -> jax.Array:
  """``W~ = [W; b^T]`` of shape ``(d, O)`` from a layer's kernel and bias leaves.

  A stacked layer gives ``stack + (d, O)``; an Equinox kernel is first permuted
  to the inputs-then-outputs layout (``spec.kernel_perm``).

  Args:
    spec: the layer.
    leaves: the flat leaves of a params-shaped tree (params or gradients).
    index: leaf parts -> position in ``leaves``.
    dtype: the dtype of the result.
  """
  w = leaves[index[spec.kernel]]
  if perm := _kernel_perm(spec):
    w = jnp.transpose(w, perm)
  w = _columns(spec, w.reshape(spec.stack + (spec.in_dim, -1))).astype(dtype)
  if spec.bias is not None:
    b = _columns(spec, leaves[index[spec.bias]].reshape(spec.stack + (1, -1))).astype(dtype)
    # under an explicit mesh both operands need the same sharding, the joined axis whole
    w = distributed.unshard_axis(w, -2)
    w = jnp.concatenate([w, distributed.reshard_like(b, w)], axis=-2)
  return w


def _columns(spec: LayerSpec, w: jax.Array) -> jax.Array:
  """The layer's own output columns of ``w`` (``(..., rows, all outputs)``): ``w`` itself
  unless the layer is some of its kernel's columns (``LayerSpec.columns``)."""
  return w if spec.columns is None else w[..., spec.columns[0]:spec.columns[1]]


def _into_columns(spec: LayerSpec, part: jax.Array, leaf: Any, rows: int) -> jax.Array:
  """``part`` (``(..., rows, O)``) as ``leaf``'s shape and dtype: ``leaf`` with the layer's own
  columns replaced by ``part`` when the layer is some of its columns, else ``part`` itself."""
  if spec.columns is None:
    return part.reshape(leaf.shape).astype(leaf.dtype)
  lo, hi = spec.columns
  whole = jnp.asarray(leaf).reshape(spec.stack + (rows, -1))
  return whole.at[..., lo:hi].set(part.astype(whole.dtype)).reshape(leaf.shape)


def split(spec: LayerSpec, w: jax.Array, leaves: Sequence[Any],
          index: Mapping[tuple[str, ...], int]) -> dict[int, jax.Array]:
  """The inverse of ``augmented``: leaf position -> kernel / bias part of ``w``.

  Each part takes the shape and dtype of the leaf it replaces. A layer that is some of its
  kernel's columns (``LayerSpec.columns``) gives the leaf of ``leaves`` with those columns
  replaced: pass the leaves that the other layers of the same kernel wrote into.
  """
  kernel = leaves[index[spec.kernel]]
  part = w[..., :spec.in_dim, :]
  if perm := _kernel_perm(spec):
    inverse = tuple(sorted(range(len(perm)), key=perm.__getitem__))
    permuted = tuple(kernel.shape[p] for p in perm)
    part = jnp.transpose(part.reshape(permuted), inverse)
  out = {index[spec.kernel]: _into_columns(spec, part, kernel, spec.in_dim)}
  if spec.bias is not None:
    bias = leaves[index[spec.bias]]
    out[index[spec.bias]] = _into_columns(spec, w[..., spec.in_dim:, :], bias, 1)
  return out


def apply_inverse(spec: LayerSpec, inverse: Any, method: InverseMethod,
                  g: jax.Array) -> jax.Array:
  """The preconditioned ``(d, O)`` gradient of one layer (see the module docstring)."""
  if spec.structure == "diagonal":
    return diagonal_lib.apply(inverse, g)
  d, o = g.shape[-2:]
  if spec.per_unit:  # blocks ordered (layer, unit): columns of each layer's (d, O)
    cols = jnp.swapaxes(g, -1, -2).reshape(-1, d, 1)
    return jnp.swapaxes(method.apply(inverse, cols).reshape(g.shape[:-2] + (o, d)), -1, -2)
  return method.apply(inverse, g.reshape(-1, d, o)).reshape(g.shape)


def precondition(specs: Mapping[str, LayerSpec], leaves: Sequence[Any],
                 index: Mapping[tuple[str, ...], int], inverses: Mapping[str, Any],
                 factor_dtypes: Mapping[str, Any], method: InverseMethod
                 ) -> tuple[dict[str, jax.Array], jax.Array]:
  """Every layer's preconditioned gradient ``u_l`` and ``q = sum_l <g_l, u_l>``.

  A tied embedding table has two specs (``LayerSpec.tied``): its update is in
  ``u`` under the lookup spec's path, with both inverses applied (a Kronecker
  product of the two PSD inverses, so ``<g, u>`` stays a squared norm).

  ``q`` is the squared norm of the update in the local-Fisher metric, which the
  trust region needs; it is also non-finite whenever any ``u_l`` is
  (``inf * 0`` and ``inf - inf`` are NaN), which the transform's overflow
  guard reads instead of passing over every update again.

  Returns:
    ``(u, q)``: ``(d, O)`` updates by layer path in the factor dtype, and ``q``
    (float32, or float64 when a factor is).
  """
  q_dtype = compute_dtype(*factor_dtypes.values())
  pres, sq_norm = {}, jnp.zeros((), q_dtype)
  for path, spec in specs.items():
    if spec.tied_head:
      continue  # with its table's lookup spec, below
    g = augmented(spec, leaves, index, factor_dtypes[path])
    g = distributed.replicate(g)  # as the inverses, under an explicit mesh
    pre = apply_inverse(spec, inverses[path], method, g)
    if spec.tied:  # a tied table: then the output layer's inverse, from the right
      out = tied_path(path)
      pre = jnp.swapaxes(apply_inverse(specs[out], inverses[out], method,
                                       jnp.swapaxes(pre, -1, -2).astype(factor_dtypes[out])),
                         -1, -2).astype(pre.dtype)
    sq_norm = sq_norm + jnp.vdot(g, pre, precision=dtypes_lib.HIGHEST).astype(q_dtype)
    pres[path] = pre
  return pres, sq_norm


def scale_and_check(sq_norm: jax.Array, max_norm: Any, finite: jax.Array
                    ) -> tuple[Optional[jax.Array], jax.Array]:
  """The trust-region scale (None without ``max_norm``) and whether ``q`` is finite.

  Computed once, in a ``lax.cond`` on ``finite`` (a step that is not finite is
  zeroed by the guard whatever its scale): a conditional's results are
  buffers, which every leaf's kernel reads. Computed in the open, XLA fuses
  the sum over the layers' terms into the kernel of every leaf that reads the
  scale or the flag, repeating it in each, once per parameter leaf
  (``benchmarks/README.md``, *Compile time*).
  """
  dtype = sq_norm.dtype

  def compute(q):
    one = jnp.ones((), dtype) if max_norm is None else trust_region_scale(q, max_norm)
    return one, jnp.isfinite(q)

  scale, q_finite = jax.lax.cond(
      finite, compute, lambda q: (jnp.ones((), dtype), jnp.zeros((), bool)), sq_norm)
  return (None if max_norm is None else scale), q_finite


def trust_region_scale(sq_norm: jax.Array, max_norm: Any) -> jax.Array:
  """``min(1, max_norm / sqrt(q))``; 1 where that is not finite (the guard skips such steps)."""
  radius = jnp.asarray(max_norm, sq_norm.dtype)
  scale = jnp.minimum(1.0, radius * jax.lax.rsqrt(jnp.maximum(sq_norm, 1e-30)))
  return jnp.where(jnp.isfinite(scale), scale, 1.0)
