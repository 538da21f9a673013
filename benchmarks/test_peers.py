"""The evaluation harness's peers compute what their libraries' own entry points do."""

import jax
import jax.numpy as jnp
import numpy as np
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

