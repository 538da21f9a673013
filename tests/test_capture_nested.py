"""A capture nested in another on one thread (a loss that captures another model while an
outer capture runs): each records its own model's calls (float64 Gram references of the rows
from a numpy forward pass), and a call of the outer model's layer inside a transform that the
nested capture runs, which the outer capture cannot record, is an error naming the layer (it
was dropped from the outer's activations, reported as if leaked from a ``jax.jit``)."""

import jax
import jax.numpy as jnp
import np_reference as ref
import numpy as np
import pytest
from flax import nnx

import sngd_jax

eqx = pytest.importorskip("equinox")

F64 = jnp.float64
EPS = 1e-6  # nnx.LayerNorm's epsilon

pytestmark = pytest.mark.usefixtures("x64")


def _assert_calls(acts, path, *rows, bias=True):
  """``acts[path]`` holds one call per ``rows`` (in call order), each one's Gram
  ``(1/n) sum x~ x~^T`` that of its rows."""
  assert len(acts[path]) == len(rows), path
  for call, want in zip(acts[path], rows, strict=True):
    got = np.asarray(call.inputs, np.float64).reshape(-1, want.shape[-1])
    np.testing.assert_allclose(ref.gram(got, bias), ref.gram(want, bias), rtol=1e-12,
                               atol=1e-14, err_msg=path)


def _eqx_rows(mlp, x):
  """The rows of each layer of a one-hidden-layer ``eqx.nn.MLP`` (relu), float64 numpy."""
  w0, b0 = np.asarray(mlp.layers[0].weight), np.asarray(mlp.layers[0].bias)
  x = np.asarray(x, np.float64)
  return x, np.maximum(x @ w0.T + b0, 0.0)


def test_nested_eqx_captures_each_record_their_own_model():
  """The outer capture records ``a`` (also ``a.layers[0]`` called on one example inside the
  nested captured function, outside its transforms), the nested one ``b``."""
  k = jax.random.split(jax.random.key(0), 3)
  a = eqx.nn.MLP(3, 2, 4, 1, key=k[0])
  b = eqx.nn.MLP(3, 2, 5, 1, key=k[1])
  x = jax.random.normal(k[2], (6, 3), F64)

  def inner(m, other, x):
    return jnp.sum(jax.vmap(m)(x) ** 2) + jnp.sum(other.layers[0](x[0]))

  def outer(m, other, x):
    value, acts_b = sngd_jax.capture_eqx(inner)(other, m, x)
    return jnp.sum(jax.vmap(m)(x)) + value, acts_b

  (_, (acts_b, acts_a)), _ = eqx.filter_value_and_grad(
      sngd_jax.capture_eqx(outer, has_aux=True), has_aux=True)(a, b, x)
  assert set(acts_a) == set(acts_b) == {"layers/0", "layers/1"}
  rows_a, rows_b = _eqx_rows(a, x), _eqx_rows(b, x)
  _assert_calls(acts_a, "layers/0", rows_a[0][:1], rows_a[0])
  _assert_calls(acts_a, "layers/1", rows_a[1])
  _assert_calls(acts_b, "layers/0", rows_b[0])
  _assert_calls(acts_b, "layers/1", rows_b[1])


class Net(nnx.Module):
  def __init__(self, width, rngs):
    self.l1 = nnx.Linear(3, width, rngs=rngs, param_dtype=F64)
    self.ln = nnx.LayerNorm(width, rngs=rngs, param_dtype=F64)
    self.l2 = nnx.Linear(width, 2, rngs=rngs, param_dtype=F64)

  def __call__(self, x):
    return self.l2(self.ln(self.l1(x)))


def _nnx_rows(m, x):
  """``(l1, ln, l2)`` rows of ``Net``, float64 numpy (``ln``'s: xhat)."""
  v = lambda p: np.asarray(p[...])
  x = np.asarray(x, np.float64)
  h = x @ v(m.l1.kernel) + v(m.l1.bias)
  xhat = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + EPS)
  return x, xhat, xhat * v(m.ln.scale) + v(m.ln.bias)


def test_nested_nnx_captures_each_record_their_own_model():
  """As for Equinox, with a LayerNorm: the outer model's ``l1`` and ``ln`` called inside the
  nested captured function (both captures' norm hooks then run, the nested one's wrapping the
  outer one's) are recorded by the outer capture, with the xhat of its own call."""
  a, b = Net(4, nnx.Rngs(0)), Net(5, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (6, 3), F64)
  x2 = 1.0 + jax.random.normal(jax.random.key(3), (3, 3), F64)

  def inner(m, other, x):
    return jnp.sum(m(x) ** 2) + jnp.sum(other.ln(other.l1(x2)))

  def outer(m, other, x):
    value, acts_b = sngd_jax.capture_nnx(inner)(other, m, x)
    return jnp.sum(m(x)) + value, acts_b

  (_, (acts_b, acts_a)), _ = nnx.value_and_grad(
      sngd_jax.capture_nnx(outer, has_aux=True), has_aux=True)(a, b, x)
  assert set(acts_a) == set(acts_b) == {"l1", "ln", "l2"}
  (a1, a_ln, a2), (i1, i_ln, _) = _nnx_rows(a, x), _nnx_rows(a, x2)
  _assert_calls(acts_a, "l1", i1, a1)
  _assert_calls(acts_a, "ln", i_ln, a_ln, bias=False)
  _assert_calls(acts_a, "l2", a2)
  b1, b_ln, b2 = _nnx_rows(b, x)
  _assert_calls(acts_b, "l1", b1)
  _assert_calls(acts_b, "ln", b_ln, bias=False)
  _assert_calls(acts_b, "l2", b2)


def test_outer_layer_inside_a_nested_captures_transform_is_an_error_naming_it():
  """A loss that captures a sub-model of the captured model under ``jax.vmap`` (Equinox's
  per-example call): the outer capture cannot record that call, and raises naming the layer
  instead of leaving ``'layers/0'`` out; the swaps are undone after the error."""
  k = jax.random.split(jax.random.key(0), 2)
  a = eqx.nn.MLP(3, 2, 4, 1, key=k[0])
  x = jax.random.normal(k[1], (6, 3), F64)
  linear_call, vmap = eqx.nn.Linear.__dict__["__call__"], jax.vmap

  def outer(m, x):
    value, _ = sngd_jax.capture_eqx(lambda first, x: jnp.sum(jax.vmap(first)(x)))(m.layers[0], x)
    return jnp.sum(jax.vmap(m)(x)) + value

  with pytest.raises(ValueError, match=r"layer 'layers/0' of a captured model is called inside "
                                       r"a JAX transform .* run by a capture nested in its"):
    sngd_jax.capture_eqx(outer)(a, x)
  assert eqx.nn.Linear.__dict__["__call__"] is linear_call and jax.vmap is vmap


def test_outer_nnx_layer_inside_a_nested_captures_scan_is_an_error_naming_it():
  """NNX: the outer model's ``l1`` run by a ``jax.lax.scan`` inside the nested captured
  function."""
  a, b = Net(4, nnx.Rngs(0)), Net(5, nnx.Rngs(1))
  x = jax.random.normal(jax.random.key(2), (6, 3), F64)
  linear_call = nnx.Linear.__dict__["__call__"]

  def inner(m, other, x):
    _, ys = jax.lax.scan(lambda c, xi: (c, other.l1(xi[None])), 0.0, x)
    return jnp.sum(m(x)) + jnp.sum(ys)

  def outer(m, other, x):
    return sngd_jax.capture_nnx(inner)(other, m, x)[0] + jnp.sum(m(x))

  with pytest.raises(ValueError, match=r"layer 'l1' of a captured model"):
    sngd_jax.capture_nnx(outer)(a, b, x)
  assert nnx.Linear.__dict__["__call__"] is linear_call
