"""The two-layer MLP, its gradient under each capture and the float64 Gram check shared by the
tests of loops over noise draws (``tests/test_vmap_draws.py``, ``tests/test_lax_map.py``)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx
from helpers_warnings import no_sngd_warnings

import sngd_jax

D, H = 4, 3  # features, hidden units


class LinenMLP(nn.Module):
  """``out(tanh(hidden(x)))``, float64 params: on ``(n, D)`` rows, or one ``(T, D)`` example."""

  @nn.compact
  def __call__(self, x):
    dense = lambda n, name: nn.Dense(n, param_dtype=jnp.float64, name=name)
    return dense(2, "out")(jnp.tanh(dense(H, "hidden")(x)))


class NNXMLP(nnx.Module):
  """The same MLP in NNX, of ``d`` input features."""

  def __init__(self, rngs, d=D):
    self.hidden = nnx.Linear(d, H, rngs=rngs, param_dtype=jnp.float64)
    self.out = nnx.Linear(H, 2, rngs=rngs, param_dtype=jnp.float64)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


def eqx_mlp(eqx, keys):
  """The same MLP in Equinox, on one ``(D,)`` example (per-example layers, no example axis)."""

  class Mlp(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __call__(self, x):
      return self.out(jnp.tanh(self.hidden(x)))

  return Mlp(eqx.nn.Linear(D, H, key=keys[0], dtype=jnp.float64),
             eqx.nn.Linear(H, 2, key=keys[1], dtype=jnp.float64))


def captured(framework, loss_of, x, expect=no_sngd_warnings, eqx_batched=True):
  """``(params, grads, acts, (kernel, bias) of 'hidden' as float64 (D, H) and (H,))`` of one
  gradient of ``loss_of(apply)`` under ``expect()``, ``apply`` the model (``framework``: linen,
  nnx or equinox; linen initialized on ``x``) on its input: for Equinox ``jax.vmap(model)`` of
  ``(n, D)`` rows, or (``eqx_batched`` False) the model on one ``(D,)`` example."""
  with expect():
    if framework == "linen":
      model = LinenMLP()
      params = model.init(jax.random.key(0), x)["params"]
      (_, acts), grads = jax.value_and_grad(sngd_jax.capture(lambda p: loss_of(
          lambda e: model.apply({"params": p}, e))), has_aux=True)(params)
      w, b = params["hidden"]["kernel"], params["hidden"]["bias"]
    elif framework == "nnx":
      model = NNXMLP(nnx.Rngs(0))
      (_, acts), grads = nnx.value_and_grad(sngd_jax.capture_nnx(lambda m: loss_of(m)),
                                            has_aux=True)(model)
      params = nnx.state(model, nnx.Param)
      w, b = model.hidden.kernel[...], model.hidden.bias[...]
    else:
      eqx = pytest.importorskip("equinox")
      model = eqx_mlp(eqx, jax.random.split(jax.random.key(0)))
      apply = (lambda m: lambda e: jax.vmap(m)(e)) if eqx_batched else (lambda m: m)
      (_, acts), grads = eqx.filter_value_and_grad(sngd_jax.capture_eqx(lambda m: loss_of(
          apply(m))), has_aux=True)(model)
      params = eqx.filter(model, eqx.is_inexact_array)
      w, b = model.hidden.weight.T, model.hidden.bias
  return params, grads, acts, (ref.np64(w), ref.np64(b))


def assert_mlp_factors(state, rows, w, b, msg="", prefix=""):
  """The factors of ``prefix + 'hidden'`` and ``prefix + 'out'`` are the float64 Gram sums of
  ``rows`` (``(n, D)`` inputs of the MLP) and of their hidden activations ``tanh(rows @ w +
  b)``, from a numpy forward pass."""
  for path, r in (("hidden", rows), ("out", np.tanh(rows @ w + b))):
    np.testing.assert_allclose(ref.normalized_factor(state, prefix + path), ref.gram(r),
                               rtol=1e-10, atol=1e-13, err_msg=f"{msg} {prefix + path}")
