"""Nystrom approximation and its Woodbury application, against float64 numpy references."""

import functools

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sngd_jax._src.inverse import nystrom

pytestmark = pytest.mark.usefixtures("x64")


def psd(d, lam, seed=0):
  q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
  return (q * lam) @ q.T


@functools.lru_cache(maxsize=None)
def _method(rank, tail, seed):
  """One method and one jitted refresh per setting, so repeated shapes do not recompile."""
  method = nystrom.nystrom(rank, seed=seed, tail=tail)
  return method, jax.jit(method.refresh)


def rep_of(g, rank, shift, tail="mean", seed=0):
  method, refresh = _method(rank, tail, seed)
  rep, ok = refresh(jnp.asarray(g)[None], jnp.asarray([shift]))
  return method, rep, bool(ok[0])


def spectral(x):
  return np.linalg.norm(x, 2)


@pytest.mark.parametrize("tail", ["mean", "zero"])
@pytest.mark.parametrize("d,true_rank,rank", [(1, 1, 4), (20, 20, 20), (50, 10, 16),
                                              (64, 64, 64)])
def test_exact_at_full_rank(d, true_rank, rank, tail):
  """``G`` of rank at most ``r``: the model is ``G`` itself (to rounding)."""
  lam = np.concatenate([np.logspace(0, -6, true_rank), np.zeros(d - true_rank)])
  g = psd(d, lam)
  shift = 1e-4 * np.trace(g)
  _, rep, ok = rep_of(g, rank, shift, tail)
  assert ok
  model = np.asarray(nystrom.dense(rep))[0]
  assert spectral(model - (g + shift * np.eye(d))) < 1e-10 * spectral(g)


def hmt_bound(lam, rank, p):
  """Halko-Martinsson-Tropp Thm 10.8 bound on ||G - G_r||_2 (prob >= 1 - 6 p^-p)."""
  k = rank - p
  root = (1 + 8 * np.sqrt(rank * p * np.log(p))) * np.sqrt(lam[k]) \
      + 3 * np.sqrt(rank) * np.sqrt(np.sum(lam[k:]))
  return root ** 2


@pytest.mark.parametrize("decay", [1.0, 2.0, 3.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_low_rank_error_bound(decay, seed):
  """Plain Nystrom (``tail="zero"``): ``0 <= G - G_r`` and ``||G - G_r||_2`` within the
  Halko-Martinsson-Tropp bound; and, for a quickly decaying spectrum, close to the best
  rank-``k`` error ``lam_{k+1}`` (within 10x for ``k = r - 8``)."""
  d, rank, p = 300, 40, 8
  lam = np.arange(1, d + 1, dtype=np.float64) ** -decay
  g = psd(d, lam, seed)
  u, ev, tau = jax.jit(nystrom.approximate, static_argnums=(1, 2, 3))(
      jnp.asarray(g)[None], rank, seed, "zero")
  u, ev = np.asarray(u)[0], np.asarray(ev)[0]
  assert float(tau[0]) == 0.0
  err = g - (u * ev) @ u.T
  assert np.min(np.linalg.eigvalsh(err)) > -1e-12  # G_r <= G
  assert spectral(err) <= hmt_bound(lam, rank, p)
  if decay >= 2:
    assert spectral(err) <= 10 * lam[rank - p]


def test_tail_mean_keeps_trace():
  d, rank = 100, 10
  lam = np.arange(1, d + 1, dtype=np.float64) ** -1.0
  g = psd(d, lam)
  _, rep, _ = rep_of(g, rank, 0.0, "mean")
  u, ev, tau = (np.asarray(x)[0] for x in rep[:3])
  np.testing.assert_allclose(tau, (np.trace(g) - ev.sum()) / (d - rank), rtol=1e-12)
  np.testing.assert_allclose(np.trace(np.asarray(nystrom.dense(rep))[0]), np.trace(g),
                             rtol=1e-12)
  np.testing.assert_allclose(u.T @ u, np.eye(rank), atol=1e-12)


@pytest.mark.parametrize("tail", ["mean", "zero"])
def test_woodbury_powers(tail):
  """``(M + rho I)^p v`` equals the dense model's power for ``p = -1, -1/2, 1/2``, and
  ``(M + rho I)^{-1}`` is within ``||G - M||_2 / rho^2`` of ``(G + rho I)^{-1}``."""
  d, rank = 120, 24
  lam = np.arange(1, d + 1, dtype=np.float64) ** -1.5
  g = psd(d, lam)
  shift = 1e-3 * np.trace(g)
  method, rep, ok = rep_of(g, rank, shift, tail)
  assert ok
  model = np.asarray(nystrom.dense(rep))[0]
  w, v_ = np.linalg.eigh(model)
  v = np.random.default_rng(3).normal(size=(1, d, 2))
  for p in (-1.0, -0.5, 0.5):
    ref = (v_ * w ** p) @ v_.T @ v[0]
    out = np.asarray(nystrom.power_apply(rep, jnp.asarray(v), p))[0]
    np.testing.assert_allclose(out, ref, rtol=1e-9, atol=1e-9 * np.abs(ref).max())
  x = np.asarray(method.apply(rep, jnp.asarray(v)))[0]
  exact = np.linalg.solve(g + shift * np.eye(d), v[0])
  gap = spectral(g + shift * np.eye(d) - model)
  assert np.linalg.norm(x - exact, axis=0).max() <= gap / shift ** 2 * \
      np.linalg.norm(v[0], axis=0).max() * (1 + 1e-9)


def test_memory_is_order_d_r():
  d, rank = 500, 16
  method = nystrom.nystrom(rank)
  rep = method.identity(3, d, jnp.float32)
  sizes = [x.size for x in jax.tree.leaves(rep)]
  assert max(sizes) == 3 * d * rank
  out = method.apply(rep, jnp.ones((3, d, 2), jnp.float32))
  np.testing.assert_array_equal(out, 1.0)  # the identity representation


def test_failure_flag_on_non_finite():
  d = 10
  g = psd(d, np.linspace(1, 0.1, d))
  bad = np.stack([g, g])
  bad[1, 2, 3] = np.inf
  method = nystrom.nystrom(4)
  _, ok = method.refresh(jnp.asarray(bad), jnp.asarray([1e-3, 1e-3]))
  assert list(np.asarray(ok)) == [True, False]


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(d=st.sampled_from([6, 24]), k=st.integers(1, 8),
                  seed=st.integers(0, 10 ** 6), log_scale=st.floats(-3, 3))
def test_exact_for_low_rank_property(d, k, seed, log_scale):
  """Any PSD ``G`` of rank ``k <= r = 8``: the Woodbury inverse is exact."""
  k = min(k, d)
  rng = np.random.default_rng(seed)
  f = rng.normal(size=(d, k)) * 10.0 ** log_scale
  g = f @ f.T
  shift = 1e-2 * np.trace(g)
  method, rep, ok = rep_of(g, 8, shift, "mean")
  assert ok
  v = rng.normal(size=(1, d, 1))
  x = np.asarray(method.apply(rep, jnp.asarray(v)))[0]
  damped = g + shift * np.eye(d)
  assert np.linalg.norm(damped @ x - v[0]) < 1e-8 * np.linalg.cond(damped) * np.linalg.norm(v)
