"""Local Fisher statistics of a layer, from its captured activations.

For a layer with augmented inputs ``x~ = [x; 1]`` (rows of a matrix ``X~``,
``n`` rows pooled over the batch, positions and calls) and pre-activations ``z``:

* linear:  ``G = (1/n) X~^T X~ = E[x~ x~^T]``, one ``d x d`` matrix;
* rfim:    ``G_j = (1/n) sum_i s(z_ij)^2 x~_i x~_i^T``, ``s = sigmoid``, one per
  output unit ``j`` (the relative Fisher information of a softplus/ReLU unit).

The running estimate is an exponential moving average with a prior ``P``::

    G_t = decay * (G_{t-1} + (1 - w_{t-1}) * P(G^)) + (1 - decay) * G^,

read through the weight ``w`` as ``G_t / w_t``. The prior decides how the
average starts (see :data:`PRIORS`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp

from sngd_jax.capture import Captured
from sngd_jax.distributed import replicated_out_sharding
from sngd_jax.layers import LayerSpec

PRIORS = ("scaled_identity", "identity", "none")
"""How the factor average starts.

* ``"scaled_identity"`` (default): the average starts from ``(tr(G^_1)/d) I``,
  an isotropic matrix with the scale of the first batch's statistics, so early
  steps are well damped whatever the input scale.
* ``"identity"``: starts from ``I`` (the reference code; scale dependent).
* ``"none"``: a bias-corrected average of batch estimates only
  (``w_t = 1 - decay^t``); with ``decay=0`` the factor is the current batch's.
"""

# kind -> function(Captured) -> (inputs (n, I), outputs (n, O)) as rows.
RowFn = Callable[[Captured], tuple[jax.Array, jax.Array]]


def dense_rows(call: Captured) -> tuple[jax.Array, jax.Array]:
  """Rows of a dense call: every leading axis (batch, time, tokens) is a sample."""
  x = call.inputs.reshape(-1, call.inputs.shape[-1])
  z = call.outputs.reshape(x.shape[0], -1)
  return x, z


ROWS: dict[str, RowFn] = {"dense": dense_rows}


def stat_dtype(*arrays: jax.Array) -> jnp.dtype:
  """float32, or float64 where an input already is (x64 mode)."""
  return jnp.result_type(jnp.float32, *[a.dtype for a in arrays])


def layer_rows(spec: LayerSpec, calls: Sequence[Captured]) -> tuple[jax.Array, jax.Array]:
  """Pools the rows of all calls of a layer into ``(X~, Z)``.

  Args:
    spec: the layer.
    calls: its captured calls.

  Returns:
    ``X~`` of shape ``(n, d)`` (a ones column appended when the layer has a
    bias) and ``Z`` of shape ``(n, O)``, in the statistics dtype.

  Raises:
    ValueError: naming the layer path, if a call's feature sizes do not match.
  """
  xs, zs = [], []
  for call in calls:
    x, z = ROWS[call.kind](call)
    if x.shape[-1] != spec.in_dim or z.shape[-1] != spec.out_dim:
      raise ValueError(
          f"sngd: layer {spec.path!r}: captured activations have {x.shape[-1]} input and "
          f"{z.shape[-1]} output features per row (inputs {call.inputs.shape}, outputs "
          f"{call.outputs.shape}), but its kernel expects {spec.in_dim} inputs and "
          f"{spec.out_dim} outputs")
    xs.append(x)
    zs.append(z)
  dtype = stat_dtype(*xs)
  x = jnp.concatenate(xs).astype(dtype)
  z = jnp.concatenate(zs).astype(dtype)
  if spec.bias is not None:
    x = jnp.concatenate([x, jnp.ones_like(x[:, :1])], axis=1)  # keeps x's row sharding
  return x, z


def batch_factor(spec: LayerSpec, calls: Sequence[Captured]) -> jax.Array:
  """The batch estimate ``G^`` of a layer: ``(d, d)`` or ``(O, d, d)`` for rfim."""
  x, z = layer_rows(spec, calls)
  n = x.shape[0]
  out_sharding = replicated_out_sharding(x)  # rows may be sharded over devices
  if spec.fisher == "rfim":
    w = jax.nn.sigmoid(z) ** 2
    return jnp.einsum("nj,na,nb->jab", w, x, x, out_sharding=out_sharding) / n
  return jnp.matmul(x.T, x, out_sharding=out_sharding) / n


def prior_of(prior: str, estimate: jax.Array) -> jax.Array:
  """The prior ``P(G^)`` for a (stack of) ``d x d`` estimate(s)."""
  d = estimate.shape[-1]
  eye = jnp.eye(d, dtype=estimate.dtype)
  if prior == "identity":
    return jnp.broadcast_to(eye, estimate.shape)
  if prior == "scaled_identity":
    scale = jnp.trace(estimate, axis1=-2, axis2=-1) / d
    return scale[..., None, None] * eye
  if prior == "none":
    return jnp.zeros_like(estimate)
  raise ValueError(f"sngd: unknown prior {prior!r}; expected one of {PRIORS}")


def ema_update(factor: jax.Array, weight: jax.Array, estimate: jax.Array, decay,
               prior: str) -> tuple[jax.Array, jax.Array]:
  """One step of the prior-started moving average.

  Args:
    factor: the running sum ``G_{t-1}`` (unnormalized).
    weight: its weight ``w_{t-1}`` (0 before the first update).
    estimate: the batch estimate ``G^``.
    decay: the EMA decay in ``[0, 1]``.
    prior: one of :data:`PRIORS`.

  Returns:
    ``(G_t, w_t)``; the factor in use is ``G_t / w_t``.
  """
  estimate = estimate.astype(factor.dtype)
  filled = factor + (1.0 - weight) * prior_of(prior, estimate)
  new_factor = decay * filled + (1.0 - decay) * estimate
  if prior == "none":
    new_weight = decay * weight + (1.0 - decay)
  else:
    new_weight = jnp.ones_like(weight)
  return new_factor, new_weight


def normalized(factor: jax.Array, weight: jax.Array) -> jax.Array:
  """The factor in use, ``G_t / w_t`` (the zero matrix while ``w_t = 0``)."""
  return factor / jnp.maximum(weight, jnp.finfo(factor.dtype).tiny)
