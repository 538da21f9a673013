"""benchmarks/gpu.py's precision switch: it reaches every product, and only while active."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import sngd_jax
from benchmarks import gpu


def _lowered_update(width):
  model = nn.Sequential([nn.Dense(width), nn.relu, nn.Dense(3)])
  x = jax.random.normal(jax.random.PRNGKey(0), (16, 3))  # 3 inputs + bias: an exact block
  y = jnp.arange(16) % 3
  params = model.init(jax.random.PRNGKey(1), x)["params"]

  def loss(p):
    logits = model.apply({"params": p}, x)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), y])

  # Wide enough hidden layer for a Nystrom block beside the exact ones.
  tx = sngd_jax.sngd(inverse=sngd_jax.inverse.auto(max_dim=4, rank=4))
  state = tx.init(params)

  def upd(p, s):
    g, acts = jax.grad(sngd_jax.capture(loss), has_aux=True)(p)
    return tx.update(g, s, p, activations=acts)[0]

  return jax.jit(upd).lower(params, state), params, state


def test_products_at_switches_every_highest_product_and_restores():
  before, params, state = _lowered_update(8)
  n = gpu.count_highest(before.as_text())
  assert n > 0
  with gpu.products_at(jax.lax.Precision.DEFAULT):
    switched, _, _ = _lowered_update(8)
  assert gpu.count_highest(switched.as_text()) == 0
  after, _, _ = _lowered_update(8)
  assert gpu.count_highest(after.as_text()) == n
  # On CPU a float32 product is exact at either precision: the same update.
  u0 = before.compile()(params, state)
  u1 = switched.compile()(params, state)
  for a, b in zip(jax.tree.leaves(u0), jax.tree.leaves(u1), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_a_lowered_trace_is_what_a_later_call_runs():
  """gpu.measure lowers inside ``products_at`` and calls outside it: the call must reuse
  the trace (else the "default" step would silently run at HIGHEST)."""
  traces = []
  mod = __import__("sngd_jax._src.dtypes", fromlist=["HIGHEST"])

  def f(a):
    traces.append(mod.HIGHEST)
    return jnp.matmul(a, a, precision=mod.HIGHEST)

  g = jax.jit(f)
  a = jnp.ones((3, 3))
  with gpu.products_at(jax.lax.Precision.DEFAULT):
    lowered = g.lower(a)
  g(a)
  assert traces == [jax.lax.Precision.DEFAULT]
  assert gpu.count_highest(lowered.as_text()) == 0



def test_first_compile_child_records_each_stage():
  """benchmarks/gpu_first_compile.py's per-process record, on CPU (the GPU flags are accepted
  there and change nothing): both optimizers' compile and step times, the per-jit options
  given to SNGD's step only, and a loss that training made finite."""
  from benchmarks import gpu_first_compile

  rec = gpu_first_compile.child_task("cnn", "perjit-notriton", 2)
  assert rec["sngd-adam"]["compiler_options"] == {"xla_gpu_enable_triton_gemm": False}
  assert rec["adam"]["compiler_options"] is None
  for opt in ("adam", "sngd-adam"):
    r = rec[opt]
    assert r["compile_s"] > 0 and r["ms_median"] > 0 and np.isfinite(r["loss_last"])
