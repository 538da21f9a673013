"""Input checks with clear errors, and the acceptance test of a refreshed inverse.

Two kinds of guard live here:

* *Static* checks, run while tracing (shapes and dtypes are known then), that
  turn a mistake into an error naming the layer path and the expected and
  actual shapes or dtypes, instead of a broadcasting error deep in XLA.
* :func:`accept_refresh`, run on device at every inverse refresh, which
  decides per block whether a new inverse representation may replace the old
  one. A block of ``A = G + s I`` (``G`` positive semi-definite, shift
  ``s = damping * tr(G) + abs_damping``) is accepted only if

  - ``s > 0`` and ``1 / s`` is finite (a zero or subnormal shift means the
    damped matrix may be singular: there is nothing safe to invert);
  - the representation is finite and, applied to a fixed probe ``v``, gives
    ``y = A^{-1} v`` with ``v^T y > 0`` (positive definite along ``v``) and
    ``||y|| <= 2 ||v|| / s`` (the exact inverse obeys ``||A^{-1}|| <= 1 / s``
    for any PSD ``G``, also for low-rank approximations of ``G``; an inverse
    that breaks the bound by a factor 2 is numerically wrong).

  A rejected block keeps its previous inverse (the identity before the first
  refresh) and is counted in ``num_refresh_failures``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import jax.numpy as jnp

from sngd_jax import layers as layers_lib
from sngd_jax import paths
from sngd_jax import sketch as sketch_lib


def check_fisher_arg(fisher: layers_lib.FisherSpec) -> None:
  """Rejects an unknown ``fisher`` kind at construction time, when it can be known.

  Args:
    fisher: the ``fisher`` argument of :func:`sngd_jax.sngd`.

  Raises:
    ValueError: for a string (or a mapping value) that is not a known kind.
  """
  if isinstance(fisher, str):
    layers_lib.resolve_fisher(fisher, "<every layer>")
  elif isinstance(fisher, Mapping):
    for path in fisher:
      layers_lib.resolve_fisher(fisher, path)


def check_param_dtypes(specs: Mapping[str, layers_lib.LayerSpec], leaves: list[Any],
                       index: Mapping[tuple[str, ...], int], what: str) -> None:
  """Requires floating-point kernels and biases for every preconditioned layer.

  Args:
    specs: the layers.
    leaves: flat leaves of the params (or updates) tree.
    index: leaf parts -> position in ``leaves``.
    what: ``"params"`` or ``"updates"``, for the message.

  Raises:
    TypeError: naming the leaf path and its dtype.
  """
  for spec in specs.values():
    for parts in (spec.kernel, spec.bias):
      if parts is None:
        continue
      dtype = jnp.asarray(leaves[index[parts]]).dtype
      if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(
            f"sngd: {what} leaf {paths.join(parts)!r} of layer {spec.path!r} has dtype "
            f"{dtype}; a preconditioned layer needs floating-point params and gradients "
            "(float16, bfloat16, float32 or float64)")


def check_state_shapes(specs: Mapping[str, layers_lib.LayerSpec],
                       factors: Mapping[str, Any],
                       sketch_ranks: Optional[Mapping[str, int]] = None) -> None:
  """Requires every state factor to have the shape the layer's params need.

  Args:
    specs: the layers of the updates tree.
    factors: the state's factors, by layer path.
    sketch_ranks: the rank ``r`` of each layer kept as a sketch (its factor is
      a :class:`sngd_jax.sketch.Sketch` with ``y`` of shape ``(d, r)``).

  Raises:
    ValueError: naming the layer path and the expected and actual factor shapes.
  """
  sketch_ranks = sketch_ranks or {}
  shape = lambda f: (("sketch",) + tuple(f.y.shape)) if sketch_lib.is_sketch(f) \
      else tuple(f.shape)
  for path, spec in specs.items():
    want = spec.factor_shape
    if path in sketch_ranks:
      want = ("sketch", spec.dim, sketch_ranks[path])
    got = shape(factors[path])
    if got != want:
      raise ValueError(
          f"sngd: layer {path!r}: the optimizer state holds a factor of shape {got}, but "
          f"params with kernel {paths.join(spec.kernel)!r} of {spec.in_dim} inputs and "
          f"{spec.out_dim} outputs{' and a bias' if spec.bias else ''} need {want} "
          f"(fisher={spec.fisher!r}). Was the state made by `init` on the same params?")


def check_activations(specs: Mapping[str, layers_lib.LayerSpec], activations: Mapping) -> None:
  """Requires floating-point activations with at least one axis (token ids excepted).

  Args:
    specs: the layers.
    activations: captured activations by layer path.

  Raises:
    TypeError: for integer or boolean activations, naming the layer path.
    ValueError: for scalar (rank 0) activations, naming the layer path.
  """
  for path, spec in specs.items():
    for i, call in enumerate(activations[path]):
      for name, x in (("inputs", call.inputs), ("outputs", call.outputs)):
        x = jnp.asarray(x)
        if x.ndim == 0:
          raise ValueError(
              f"sngd: layer {path!r}: call {i} captured scalar {name}; expected shape "
              f"(..., {spec.in_dim if name == 'inputs' else spec.out_dim})")
        if name == "inputs" and call.kind == "embed":
          continue  # token ids: integers by design
        if not jnp.issubdtype(x.dtype, jnp.floating):
          raise TypeError(
              f"sngd: layer {path!r}: call {i} captured {name} of dtype {x.dtype} and shape "
              f"{x.shape}; activations must be floating point")


def _probe(d: int, dtype) -> jax.Array:
  """A fixed probe vector with no structure aligned to the axes, ``||v|| = 1``."""
  v = jnp.cos(jnp.arange(1, d + 1, dtype=dtype) * 1.3) + 1.5
  return v / jnp.linalg.norm(v)


def accept_refresh(apply_fn, rep: Any, blocks: jax.Array, shift: jax.Array,
                   ok: jax.Array) -> jax.Array:
  """Per-block acceptance of a refreshed inverse (see the module docstring).

  Args:
    apply_fn: the method's ``apply(rep, g)`` for ``g`` of shape ``(b, d, k)``.
    rep: the new representation of ``A^{-1}`` (leading axis ``b``).
    blocks: the refreshed blocks, shape ``(b, d, d)`` (only shape and dtype are used).
    shift: the damping shift ``s`` per block, shape ``(b,)``.
    ok: the method's own flags, shape ``(b,)``.

  Returns:
    ``(b,)`` bool: the blocks whose new inverse may be used.
  """
  b, d, _ = blocks.shape
  dtype = blocks.dtype
  v = jnp.broadcast_to(_probe(d, dtype)[None, :, None], (b, d, 1))
  y = apply_fn(rep, v)[..., 0].astype(dtype)
  inv_shift = 1.0 / shift.astype(dtype)
  finite_rep = jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf.reshape(b, -1)), axis=1)
                                  for leaf in jax.tree.leaves(rep)]), axis=0)
  positive = jnp.einsum("bd,bd->b", v[..., 0], y) > 0
  bounded = jnp.linalg.norm(y, axis=-1) <= 2.0 * inv_shift
  good_shift = (shift > 0) & jnp.isfinite(inv_shift)
  return ok & finite_rep & jnp.all(jnp.isfinite(y), axis=-1) & positive & bounded & good_shift


def limit_outlier(estimate: jax.Array, factor: jax.Array, weight: jax.Array,
                  max_ratio: float) -> jax.Array:
  """Scales down a batch estimate far larger than the running factor.

  With ``T = tr(G_{t-1} / w_{t-1})`` (summed over the blocks of an rfim layer)
  and ``T^ = tr(G^)``, the estimate is multiplied by ``min(1, max_ratio * T / T^)``.
  One batch ``c`` times out of scale would otherwise put ``(1 - decay) c^2 G``
  into the moving average and freeze the layer for about
  ``2 ln(c) / (1 - decay)`` steps (the inverse scales the gradient down by ``c^2``).
  Before the first update (``w = 0``) or while ``T = 0`` nothing is limited.

  Args:
    estimate: the batch estimate ``G^``, ``(d, d)`` or ``(O, d, d)``.
    factor: the running sum ``G_{t-1}``.
    weight: its weight ``w_{t-1}``.
    max_ratio: the largest allowed ``T^ / T``.

  Returns:
    The (possibly scaled) estimate.
  """
  dtype = jax.tree.leaves(factor)[0].dtype
  estimate = jax.tree.map(lambda e: e.astype(dtype), estimate)
  running = sketch_lib.trace(factor) / jnp.maximum(weight, jnp.finfo(dtype).tiny)
  new = sketch_lib.trace(estimate)
  limit = max_ratio * running
  outlier = (weight > 0) & (running > 0) & (new > limit)
  scale = jnp.where(outlier, limit / jnp.where(outlier, new, 1.0), 1.0)
  return jax.tree.map(lambda e: e * scale.astype(dtype), estimate)
