"""Square roots and dense inverse methods against float64 numpy references.

Test matrices are built from their eigendecomposition, ``A = Q diag(lam) Q^T``
with ``lam`` log-spaced from 1 to ``1/cond``, so that the reference roots
``Q diag(lam^{+-1/2}) Q^T`` are known exactly (in float64).
"""

import hypothesis
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sngd_jax import inverse as matfun

pytestmark = pytest.mark.usefixtures("x64")


def spd(d, cond, seed=0, batch=2):
  """``(batch, d, d)`` SPD matrices with condition number ``cond``, and their ``(Q, lam)``."""
  rng = np.random.default_rng(seed)
  qs, lams, mats = [], [], []
  for _ in range(batch):
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    lam = np.logspace(0, -np.log10(cond), d) if d > 1 else np.ones(1)
    mats.append((q * lam) @ q.T)
    qs.append(q)
    lams.append(lam)
  return np.stack(mats), np.stack(qs), np.stack(lams)


def power(q, lam, p):
  return np.einsum("bij,bj,bkj->bik", q, lam ** p, q)


def rel(x, ref):
  return np.linalg.norm(x - ref) / np.linalg.norm(ref)


ITERATIVE = {"num_iters": 60, "tol": "auto"}

# (method, size, cond) -> relative error bounds; float64 throughout. The bounds
# follow the conditioning of each quantity: A^{-1/2} has condition cond^{1/2},
# so its relative error is ~ eps * cond^{1/2} * (a small factor).
CASES = [(m, d, c) for m in ("eigh", "denman_beavers", "newton_schulz")
         for d, c in [(1, 1.0), (2, 1e8), (7, 1e2), (33, 1e4), (64, 1e6), (64, 1e8),
                      (128, 1e4)]]


@pytest.mark.parametrize("method,d,cond", CASES)
def test_roots_match_float64_reference(method, d, cond):
  a, q, lam = spd(d, cond)
  kw = {} if method == "eigh" else ITERATIVE
  r = jax.jit(lambda x: matfun.sqrt_and_inv_sqrt(x, method, **kw))(jnp.asarray(a))
  y, z = np.asarray(r.sqrt), np.asarray(r.inv_sqrt)
  eps = np.finfo(np.float64).eps
  bound = 1e3 * eps * np.sqrt(cond) * max(d, 8)
  assert rel(y @ y, a) < 1e3 * eps * np.sqrt(cond) * 8      # Y Y = A
  assert rel(y, power(q, lam, 0.5)) < bound                 # Y = A^{1/2}
  assert rel(z, power(q, lam, -0.5)) < bound                # Z = A^{-1/2}
  zy = np.einsum("bij,bjk->bik", z, y)
  assert np.max(np.abs(zy - np.eye(d))) < bound             # Z = Y^{-1}
  assert np.all(np.asarray(r.error) < 1e-8)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["eigh", "denman_beavers", "newton_schulz"])
def test_roots_size_1024(method):
  a, q, lam = spd(1024, 1e4, batch=1)
  kw = {} if method == "eigh" else ITERATIVE
  r = jax.jit(lambda x: matfun.sqrt_and_inv_sqrt(x, method, **kw))(jnp.asarray(a))
  y, z = np.asarray(r.sqrt), np.asarray(r.inv_sqrt)
  assert rel(y, power(q, lam, 0.5)) < 1e-10
  assert rel(z, power(q, lam, -0.5)) < 1e-10


@pytest.mark.parametrize("scale", ["frobenius", "trace"])
@pytest.mark.parametrize("method", ["denman_beavers", "newton_schulz"])
def test_fixed_iterations_and_error_estimate(method, scale):
  """Too few steps leave a large error estimate; enough steps drive it to rounding."""
  a, _, _ = spd(16, 1e6)
  fn = matfun.ROOTS[method]
  few = fn(jnp.asarray(a), num_iters=3, tol=None, scale=scale)
  many = fn(jnp.asarray(a), num_iters=50, tol=None, scale=scale)
  assert np.all(np.asarray(few.error) > 1e-2)
  assert np.all(np.asarray(many.error) < 1e-9)
  # The estimate is an upper bound on Y Y vs A (it includes that term).
  y = np.asarray(few.sqrt)
  assert np.all(np.linalg.norm(y @ y - a, axis=(1, 2)) / np.linalg.norm(a, axis=(1, 2))
                <= np.asarray(few.error) * (1 + 1e-9))


def test_newton_schulz_bfloat16_uses_float32():
  """bfloat16 in and out; the products run on float32 operands (float32 accumulation)."""
  a, q, lam = spd(16, 1e2)
  a16 = jnp.asarray(a, jnp.bfloat16)
  r = matfun.newton_schulz(a16, num_iters=30, tol="auto")
  assert r.sqrt.dtype == jnp.bfloat16 and r.inv_sqrt.dtype == jnp.bfloat16
  a_rounded = np.asarray(a16, np.float64)
  # bfloat16 has an 8-bit mantissa: the input is known to ~4e-3 and so is the output.
  assert rel(np.asarray(r.sqrt, np.float64), power(q, lam, 0.5)) < 2e-2
  assert rel(np.asarray(r.inv_sqrt, np.float64), power(q, lam, -0.5)) < 2e-2
  assert np.all(np.asarray(r.error) < 1e-4)  # float32 iterates converged on the rounded A
  del a_rounded
  jaxpr = jax.make_jaxpr(lambda x: matfun.newton_schulz(x, num_iters=5))(a16)
  dots = [e for e in _eqns(jaxpr.jaxpr) if e.primitive.name == "dot_general"]
  assert dots and all(v.aval.dtype == jnp.float32 for e in dots for v in e.invars)


def _eqns(jaxpr):
  """Every equation of a jaxpr, recursing into loop and cond bodies."""
  for e in jaxpr.eqns:
    yield e
    for sub in _subjaxprs(e.params):
      yield from _eqns(sub)


def _subjaxprs(params):
  for v in params.values():
    vs = v if isinstance(v, (tuple, list)) else (v,)
    for x in vs:
      if hasattr(x, "jaxpr") and hasattr(x.jaxpr, "eqns"):
        yield x.jaxpr
      elif hasattr(x, "eqns"):
        yield x


DENSE = {
    "cholesky": matfun.cholesky(),
    "eigh": matfun.eigh(),
    "denman_beavers": matfun.denman_beavers_inverse(num_iters=60),
    "newton_schulz": matfun.newton_schulz_inverse(num_iters=60),
}


@pytest.mark.parametrize("name", sorted(DENSE))
@pytest.mark.parametrize("d,cond,damping", [(1, 1.0, 0.0), (9, 1e4, 1e-4), (64, 1e8, 0.0),
                                            (64, 1e8, 1e-4), (200, 1e6, 1e-3)])
def test_inverse_apply_residual(name, d, cond, damping):
  """``x = apply(refresh(G, rho), v)`` solves ``(G + rho I) x = v``."""
  a, _, _ = spd(d, cond, seed=1)
  shift = damping * np.trace(a, axis1=1, axis2=2)
  method = DENSE[name]
  rep, ok = jax.jit(method.refresh)(jnp.asarray(a), jnp.asarray(shift))
  v = np.random.default_rng(2).normal(size=(2, d, 3))
  x = np.asarray(method.apply(rep, jnp.asarray(v)))
  damped = a + shift[:, None, None] * np.eye(d)
  ref = np.linalg.solve(damped, v)
  kappa = np.max(np.linalg.cond(damped))
  eps = np.finfo(np.float64).eps
  assert np.all(np.asarray(ok))
  # Forward error of a backward-stable inverse ~ eps * kappa (iterations: a few more).
  assert rel(x, ref) < 1e2 * eps * kappa * max(d, 8)
  assert rel(np.einsum("bij,bjk->bik", damped, x), v) < 1e2 * eps * kappa * max(d, 8)


@pytest.mark.parametrize("name", ["cholesky", "eigh"])
def test_inverse_size_1024(name):
  a, _, _ = spd(1024, 1e4, batch=1)
  shift = 1e-4 * np.trace(a, axis1=1, axis2=2)
  rep, ok = jax.jit(DENSE[name].refresh)(jnp.asarray(a), jnp.asarray(shift))
  v = np.random.default_rng(2).normal(size=(1, 1024, 2))
  x = np.asarray(DENSE[name].apply(rep, jnp.asarray(v)))
  damped = a + shift[:, None, None] * np.eye(1024)
  assert bool(ok[0])
  assert rel(x, np.linalg.solve(damped, v)) < 1e-10


def test_refresh_flags_failures():
  a, _, _ = spd(8, 1e2)
  bad = a.copy()
  bad[1, 0, 0] = np.nan
  shift = jnp.zeros(2)
  for name, method in DENSE.items():
    _, ok = method.refresh(jnp.asarray(bad), shift)
    assert list(np.asarray(ok)) == [True, False], name
  indefinite = a - 2 * np.eye(8)
  for name in ("cholesky", "eigh"):
    _, ok = DENSE[name].refresh(jnp.asarray(indefinite), shift)
    assert not np.any(np.asarray(ok)), name
  # An error estimate above the bound fails the refresh (too few iterations).
  strict = matfun.newton_schulz_inverse(num_iters=2, tol=None, error_bound=1e-3)
  _, ok = strict.refresh(jnp.asarray(spd(8, 1e4)[0]), shift)
  assert not np.any(np.asarray(ok))


def test_damp_and_shift():
  a, _, _ = spd(5, 10.0)
  a = a + np.triu(np.ones((5, 5)), 1) * 1e-3  # slightly asymmetric
  sym = 0.5 * (a + np.swapaxes(a, 1, 2))
  rho = 1e-2 * np.trace(sym, axis1=1, axis2=2) + 0.5
  np.testing.assert_allclose(matfun.damping_shift(jnp.asarray(sym), 1e-2, 0.5), rho)
  np.testing.assert_allclose(matfun.damp(jnp.asarray(a), 1e-2, 0.5),
                             sym + rho[:, None, None] * np.eye(5), rtol=1e-14)


@st.composite
def spd_matrices(draw):
  d = draw(st.integers(1, 12))
  m = draw(hnp.arrays(np.float64, (d, d), elements=st.floats(-1, 1)))
  log_cond = draw(st.floats(0, 8))
  q, _ = np.linalg.qr(m + 3 * np.eye(d))
  lam = np.logspace(0, -log_cond, d) * draw(st.floats(1e-3, 1e3))
  return (q * lam) @ q.T


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(a=spd_matrices(), method=st.sampled_from(sorted(matfun.ROOTS)))
def test_roots_property(a, method):
  """On any SPD matrix: Y Y = A and Z Y = I to a precision set by its conditioning."""
  kw = {} if method == "eigh" else ITERATIVE
  r = matfun.sqrt_and_inv_sqrt(jnp.asarray(a)[None], method, **kw)
  y, z = np.asarray(r.sqrt[0]), np.asarray(r.inv_sqrt[0])
  kappa = np.linalg.cond(a)
  tol = 1e4 * np.finfo(np.float64).eps * np.sqrt(kappa)
  assert rel(y @ y, a) < tol
  assert np.max(np.abs(z @ y - np.eye(a.shape[0]))) < tol
  assert np.allclose(y, y.T, atol=tol * np.linalg.norm(y))


@hypothesis.settings(max_examples=15, deadline=None)
@hypothesis.given(a=spd_matrices(), name=st.sampled_from(sorted(DENSE)),
                  damping=st.sampled_from([0.0, 1e-4, 1e-1]))
def test_inverse_property(a, name, damping):
  shift = damping * np.trace(a)
  rep, ok = DENSE[name].refresh(jnp.asarray(a)[None], jnp.asarray([shift]))
  v = np.ones((1, a.shape[0], 1))
  x = np.asarray(DENSE[name].apply(rep, jnp.asarray(v)))[0]
  damped = a + shift * np.eye(a.shape[0])
  assert bool(ok[0])
  assert rel(damped @ x, v[0]) < 1e4 * np.finfo(np.float64).eps * np.linalg.cond(damped)


@pytest.mark.parametrize("fn", [matfun.eigh_roots, matfun.denman_beavers, matfun.newton_schulz])
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.complex64])
def test_roots_refuse_integer_and_complex_matrices(fn, dtype):
  """An integer matrix has no integer roots and a complex one is not the symmetric matrix
  these roots are for: each public root function names the dtype instead of returning
  integer roots or dropping the imaginary part."""
  a = (4 * jnp.eye(3)).astype(dtype)
  with pytest.raises(TypeError, match=f"sngd: {fn.__name__} takes a real floating.*"
                     f"{jnp.dtype(dtype).name}"):
    fn(a)
