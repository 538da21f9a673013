"""kfac_eval's plain-JAX models are the evaluation set's Flax models (same parameters, same
outputs), so kfac-jax trains the same networks from the same initializations."""

import jax
import numpy as np

from benchmarks import kfac_eval, models


def _roundtrip(params, tmp_path):
  path = tmp_path / "p.npz"
  np.savez(path, **kfac_eval.export_params(params))
  return kfac_eval.load_params(str(path))


def test_plain_jax_autoencoder_is_the_flax_model(tmp_path):
  model = models.Autoencoder()
  x = np.random.default_rng(0).normal(size=(5, 784)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(3), x)["params"]
  layers = _roundtrip(params, tmp_path)
  assert len(layers) == 8 and layers["Dense_0"]["kernel"].shape == (784, 1000)
  ours = np.asarray(kfac_eval.mlp_apply(layers, x), np.float64)
  ref = np.asarray(model.apply({"params": params}, x), np.float64)
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
  # The code layer (3) is linear: a ReLU there would zero its negative outputs.
  code = x
  for i in range(4):
    layer = layers[f"Dense_{i}"]
    code = np.maximum(code @ np.asarray(layer["kernel"]) + np.asarray(layer["bias"]), 0)
  first4 = {f"Dense_{i}": layers[f"Dense_{i}"] for i in range(4)}
  assert not np.allclose(kfac_eval.mlp_apply(first4, x), code, atol=1e-3)


def test_plain_jax_cnn_is_the_flax_model(tmp_path):
  model = models.SmallCNN((28, 28, 1), 10)
  x = np.random.default_rng(1).normal(size=(4, 784)).astype(np.float32)
  params = model.init(jax.random.PRNGKey(5), x)["params"]
  layers = _roundtrip(params, tmp_path)
  assert sorted(layers) == ["Conv_0", "Conv_1", "Dense_0", "Dense_1"]
  ours = np.asarray(kfac_eval.cnn_apply(layers, x), np.float64)
  ref = np.asarray(model.apply({"params": params}, x), np.float64)
  assert ours.shape == (4, 10)
  np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
  # Pooling matters: without it the dense layer's input would be 4x larger.
  assert layers["Dense_0"]["kernel"].shape == (7 * 7 * 32, 64)
