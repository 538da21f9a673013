"""kfac_eval's plain-JAX autoencoder is the evaluation set's Flax model (same parameters, same
outputs), so kfac-jax trains the same network from the same initialization."""

import jax
import numpy as np

from benchmarks import kfac_eval, models


def test_plain_jax_autoencoder_is_the_flax_model(tmp_path):
  model = models.Autoencoder()
  x = np.random.default_rng(0).normal(size=(5, 784)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(3), x)["params"]
  path = tmp_path / "p.npz"
  np.savez(path, **kfac_eval.export_params(params))
  layers = kfac_eval.load_params(str(path))
  assert len(layers) == 8 and layers[0]["kernel"].shape == (784, 1000)
  ours = np.asarray(kfac_eval.mlp_apply(layers, x), np.float64)
  ref = np.asarray(model.apply({"params": params}, x), np.float64)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # The code layer (3) is linear: a ReLU there would zero its negative outputs.
  code = x
  for layer in layers[:4]:
    code = np.maximum(code @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]), 0)
  assert not np.allclose(kfac_eval.mlp_apply(layers[:4], x), code, atol=1e-3)
