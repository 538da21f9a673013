"""A transformer language model whose blocks are rematerialized and scanned over depth
(params stacked with a leading layer axis) trains with SNGD: on one device, and on 8
forced CPU devices with a ``data x model`` mesh, where it follows the one-device run.

As in ``tests/test_sharding.py``, the 8-device test runs this file again in a
subprocess with ``--xla_force_host_platform_device_count=8`` (the flag must be set
before JAX is imported and must not leak into the rest of the suite).
"""

import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from forced_devices import NUM_DEVICES, run_on_forced_devices
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import sngd_jax

multi = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices: run in a subprocess by test_on_8_forced_devices")

VOCAB, D, HEADS, LAYERS, SEQ, BATCH, STEPS = 16, 16, 2, 2, 8, 16, 12


class Block(nn.Module):
  """Pre-norm causal self-attention and MLP, with residuals."""

  @nn.compact
  def __call__(self, x, _):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    h = nn.MultiHeadDotProductAttention(num_heads=HEADS, name="attn")(
        nn.LayerNorm(name="ln1")(x), mask=mask)
    x = x + h
    h = nn.Dense(4 * D, name="up")(nn.LayerNorm(name="ln2")(x))
    return x + nn.Dense(D, name="down")(nn.gelu(h)), None


class LM(nn.Module):
  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, D, name="embed")(tokens)
    blocks = nn.scan(nn.remat(Block), variable_axes={"params": 0},
                     split_rngs={"params": True}, length=LAYERS)
    x, _ = blocks(name="blocks")(x, None)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="ln_f")(x))


MODEL = LM()


@functools.lru_cache(maxsize=None)
def _data():
  """Sequences of a noisy counter mod VOCAB: the next token is learnable."""
  rng = np.random.default_rng(0)
  start = rng.integers(0, VOCAB, size=(STEPS, BATCH, 1))
  tokens = (start + np.arange(SEQ + 1)) % VOCAB
  params = MODEL.init(jax.random.key(0), jnp.asarray(tokens[0, :, :-1]))["params"]
  return tokens, params


def _loss(params, tokens):
  logits = MODEL.apply({"params": params}, tokens[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()


def _train(put=lambda tree, kind: tree):
  """``put(tree, kind)`` places arrays (``kind``: 'params', 'state' or 'batch')."""
  tokens, params = _data()
  tx = sngd_jax.sngd_momentum(0.1, factor_every=2, inverse_every=4)

  @jax.jit
  def step(params, state, batch):
    (value, acts), grads = jax.value_and_grad(sngd_jax.capture(_loss), has_aux=True)(
        params, batch)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, value

  params = put(params, "params")
  state = put(tx.init(params), "state")
  losses = []
  for t in range(STEPS):
    params, state, value = step(params, state, put(jnp.asarray(tokens[t]), "batch"))
    losses.append(float(value))
  return params, state, np.asarray(losses)


@functools.lru_cache(maxsize=None)
def _one_device():
  return _train()


def test_scanned_transformer_trains_with_stacked_factors():
  _, state, losses = _one_device()
  assert losses[-1] < 0.6 * losses[0], losses
  sngd_state = state[0]
  assert sngd_state.factors["blocks/up"].shape == (LAYERS, D + 1, D + 1)
  assert sngd_state.factors["blocks/attn/query"].shape == (LAYERS, D + 1, D + 1)
  assert sngd_state.factors["blocks/attn/out"].shape == (LAYERS, D + 1, D + 1)
  assert sngd_state.factors["blocks/ln1"].shape == (LAYERS * D, 2, 2)
  assert int(sngd_state.num_refresh_failures) == 0


def test_on_8_forced_devices(tmp_path):
  if jax.device_count() >= NUM_DEVICES:
    pytest.skip("this session already has 8 devices; the test below runs directly")
  summary = run_on_forced_devices(__file__, ["-m", "not slow", "-k", "mesh"], timeout=900,
                                  log_dir=tmp_path)
  assert re.search(r"1 passed", summary), summary


def _model_axis(path: str, leaf) -> P:
  """Tensor-parallel layout: the MLP's hidden units and the attention heads over 'model'."""
  if path.endswith("up/kernel"):
    return P(None, None, "model")        # (layers, D, 4D)
  if path.endswith("up/bias"):
    return P(None, "model")
  if path.endswith("down/kernel"):
    return P(None, "model", None)        # (layers, 4D, D)
  if re.search(r"attn/(query|key|value)/kernel$", path):
    return P(None, None, "model", None)  # (layers, D, heads, head dim)
  if path.endswith("attn/out/kernel"):
    return P(None, "model", None, None)  # (layers, heads, head dim, D)
  return P()


@multi
def test_data_x_model_mesh_follows_one_device():
  mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)

  def put(tree, kind):
    if kind == "batch":
      return jax.device_put(tree, NamedSharding(mesh, P("data")))
    if kind == "params":
      return jax.tree_util.tree_map_with_path(
          lambda path, leaf: jax.device_put(leaf, NamedSharding(
              mesh, _model_axis(jax.tree_util.keystr(path, simple=True, separator="/"), leaf))),
          tree)
    return jax.device_put(tree, NamedSharding(mesh, P()))

  params, _, losses = _train(put)
  assert params["blocks"]["up"]["kernel"].sharding.spec == P(None, None, "model")
  one_params, _, one_losses = _one_device()
  np.testing.assert_allclose(losses, one_losses, rtol=2e-4, atol=2e-5)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(one_params), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-3, atol=2e-4)
