"""The evaluation harness's peers compute what their libraries' own entry points do."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import evaluate


def _run(tx, params, steps=12):
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for t in range(steps):
    g = jax.tree.map(lambda x, t=t: jnp.sin(x * (t + 1)) + 0.1 * x, params)
    u, state = update(g, state, params)
    out.append(u)
  return out


def test_psgd_kron_entry_is_kron_with_an_injected_lr(capsys):
  psgdax = pytest.importorskip("psgdax")  # in the dev extras; absent only outside them
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  params = {"w": jax.random.normal(k1, (20, 7)), "b": jnp.zeros(7),
            "c": jax.random.normal(k2, (3, 4, 5, 6))}
  want = _run(psgdax.kron(learning_rate=3e-3, b1=0.9), params)
  pre, post = evaluate.OPTIMIZERS["psgd-kron"](3e-3)
  assert pre is None
  got = _run(post, params)
  for w, g in zip(want, got, strict=True):
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g), strict=True):
      scale = float(np.max(np.abs(a)))
      assert scale > 0 or a.size == 0 or not np.any(b)
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                                 atol=1e-6 * max(scale, 1e-3))



def _matches(want, got, rel=1e-6):
  for w, g in zip(want, got, strict=True):
    for a, b in zip(jax.tree.leaves(w), jax.tree.leaves(g), strict=True):
      scale = float(np.max(np.abs(a)))
      assert scale > 0 or a.size == 0 or not np.any(b)
      np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0,
                                 atol=rel * max(scale, 1e-3))


def _layers():
  k = jax.random.split(jax.random.PRNGKey(1), 5)
  return {
      "Dense_0": {"kernel": jax.random.normal(k[0], (20, 7)), "bias": jnp.zeros(7)},
      "Conv_0": {"kernel": jax.random.normal(k[1], (3, 3, 2, 5)), "bias": jnp.zeros(5)},
      "attn": {"query": {"kernel": jax.random.normal(k[2], (8, 2, 4))},
               "out": {"kernel": jax.random.normal(k[3], (2, 4, 8))}},
      "Embed_0": {"embedding": jax.random.normal(k[4], (11, 8))},
  }


def test_shampoo_entry_is_distributed_shampoo_with_an_injected_lr():
  pytest.importorskip("precondition")  # in the dev extras; absent only outside them
  ds = evaluate._precondition_shampoo()
  params = _layers()
  # 14 steps: diagonal (grafted) steps until step 5, then two preconditioner refreshes.
  want = _run(ds.distributed_shampoo(3e-3, graft_type=ds.GraftingType.RMSPROP_NORMALIZED,
                                     **evaluate.SHAMPOO_SETTINGS), params, steps=14)
  pre, post = evaluate.OPTIMIZERS["shampoo"](3e-3)
  assert pre is None
  _matches(want, _run(post, params, steps=14))


def test_muon_entry_is_optax_muon_with_an_injected_lr_and_kernels_as_matrices():
  params = _layers()
  dims = evaluate.muon_dimensions(params)
  flat = {jax.tree_util.keystr(p): d for p, d in jax.tree_util.tree_leaves_with_path(
      dims, is_leaf=lambda x: x is None or isinstance(x, optax.contrib.MuonDimensionNumbers))}
  md = optax.contrib.MuonDimensionNumbers
  assert flat == {
      "['Conv_0']['bias']": None, "['Conv_0']['kernel']": md((0, 1, 2), (3,)),
      "['Dense_0']['bias']": None, "['Dense_0']['kernel']": md((0,), (1,)),
      "['Embed_0']['embedding']": None,
      "['attn']['out']['kernel']": md((0, 1), (2,)),
      "['attn']['query']['kernel']": md((0,), (1, 2)),
  }
  want = _run(optax.contrib.muon(3e-3, consistent_rms=0.2,
                                 muon_weight_dimension_numbers=evaluate.muon_dimensions), params)
  pre, post = evaluate.OPTIMIZERS["muon"](3e-3)
  assert pre is None
  _matches(want, _run(post, params))
