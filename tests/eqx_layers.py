"""Hand-written Equinox layers shared by the tests of ``sngd_jax.dense`` and
``@sngd_jax.dense_layer`` (``test_custom_layers.py``, ``test_feature_intersections.py``).

Importing this module needs Equinox; a test module where Equinox is optional imports it after
``pytest.importorskip("equinox")``.
"""

import equinox as eqx
import jax
import jax.numpy as jnp

import sngd_jax


@sngd_jax.dense_layer
class EqxLinear(eqx.Module):
  """A hand-written Equinox dense layer, stored as ``eqx.nn.Linear`` stores it: ``(out, in)``."""

  weight: jax.Array
  bias: jax.Array

  def __call__(self, x):
    return sngd_jax.dense(x, self.weight, self.bias, layout="out_in")


class EqxNet(eqx.Module):
  """``head(tanh(hidden(x)))``."""

  hidden: eqx.Module
  head: eqx.Module

  def __call__(self, x):
    return self.head(jnp.tanh(self.hidden(x)))
