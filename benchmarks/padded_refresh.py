"""Experiment (not in the library): every dense block refreshed in one group, padded.

    python3 -m benchmarks.padded_refresh      # ~3 min; results/padded_refresh.json

The refresh compiles its own stacking, factorization glue, acceptance test and per-layer
selection for every group of equal-size blocks (``refresh_inverses``), and it is the
largest part of the fusions SNGD adds to the step (``compile_time --profile``). This
measures one way to compile fewer: all dense (Cholesky) blocks of a model zero-padded to
the widest one, ``[[G, 0], [0, 0]] + rho I``, whose inverse holds ``(G + rho I)^{-1}`` in
its top-left corner, refreshed as one group (Nystrom and diagonal layers as before). For
each evaluation model: the compiled step's fusions (all, and the refresh's) and compile
time with the library's XLA refresh (``refresh_inverses_xla``; a CPU step now refreshes on the
host, ``inverse/host.py``) and with the padded one, and the refresh's run time on
random positive-definite factors (median of 5).
"""
import argparse
import json
import os
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import compile_time as ct
from benchmarks import harness
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src import statistics
from sngd_jax._src.inverse import refresh as R
from sngd_jax._src.inverse.base import damping_shift, symmetrize

orig = R.refresh_inverses_xla  # the XLA refresh (the CPU default is now on the host)


def padded(specs, factors, weights, old_inverses, method, damping, abs_damping):
  """``refresh_inverses`` with every dense block of the model in one zero-padded group."""
  dense = [p for p, s in specs.items()
           if s.structure != "diagonal" and not sketch_lib.is_sketch(factors[p])]
  rest = {p: s for p, s in specs.items() if p not in dense}
  new, failures = ({}, jnp.zeros((), jnp.int32))
  if rest:
    new, failures = orig(rest, factors, weights, old_inverses, method, damping, abs_damping)
  if not dense:
    return new, failures
  width = max(factors[p].shape[-1] for p in dense)
  blocks, sizes, dims = [], [], []
  for p in dense:
    g = statistics.normalized(factors[p], weights[p]).reshape((-1,) + factors[p].shape[-2:])
    d = g.shape[-1]
    blocks.append(jnp.pad(g, ((0, 0), (0, width - d), (0, width - d))))
    sizes.append(g.shape[0])
    dims.append(d)
  stacked = symmetrize(jnp.concatenate(blocks))
  shift = damping_shift(stacked, damping, abs_damping)  # the padding adds nothing to a trace
  rep, ok = R.refresh_group(method, stacked, shift, width, stacked.dtype)
  failures += jnp.sum(~ok).astype(jnp.int32)
  start = 0
  for p, size, d in zip(dense, sizes, dims, strict=True):
    sl = slice(start, start + size)
    start += size
    inv = rep[sl][:, :d, :d].reshape((size,) + old_inverses[p].shape[-2:])
    new[p] = R.keep_accepted(inv, ok[sl], old_inverses[p].reshape(inv.shape)).reshape(
        old_inverses[p].shape)
  return new, failures


def refresh_time(task, fn, reps=5):
  """Milliseconds (median of ``reps``) of ``fn`` (a ``refresh_inverses``) on the task's
  layers, with random positive-definite dense factors, and the inverses it made."""
  from benchmarks import evaluate
  from sngd_jax._src import layers as layers_lib
  from sngd_jax._src.inverse import registry
  params, _, st, _ = evaluate.init_run(task, sngd_jax.sngd(), optax.sgd(0.01))
  specs = layers_lib.discover(params, st.config.fisher, st.config.stacked)
  key = jax.random.PRNGKey(1)

  def psd(f):
    if sketch_lib.is_sketch(f) or f.ndim < 2:
      return jax.tree.map(lambda a: jnp.abs(a) + 1.0, f)
    x = jax.random.normal(key, f.shape[:-2] + (f.shape[-1] + 8, f.shape[-1]))
    return jnp.swapaxes(x, -1, -2) @ x / x.shape[-2]

  factors = {p: psd(f) for p, f in st.factors.items()}
  weights = jax.tree.map(jnp.ones_like, st.weights)
  f = jax.jit(lambda fa, w, inv: fn(specs, fa, w, inv, registry.auto(), 1e-3, 1e-8))
  out = jax.block_until_ready(f(factors, weights, st.inverses))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(f(factors, weights, st.inverses))
    times.append(time.perf_counter() - t0)
  return float(np.median(times)) * 1e3, out[0]


def max_rel_diff(a, b) -> float:
  """The largest ``max |a - b| / max |a|`` over the leaves of two trees of inverses."""
  diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                                          / max(float(np.max(np.abs(np.asarray(x)))), 1e-30)),
                       a, b)
  return max(jax.tree.leaves(diffs), default=0.0)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "padded_refresh.json"))
  out = p.parse_args(argv).out
  jax.config.update("jax_enable_compilation_cache", False)
  rows = []
  for name in ("cnn", "resnet-bn", "autoencoder", "char-lstm", "transformer"):
    task = ct._tasks()[name]()
    row, inverses = {"model": name}, {}
    for label, fn in (("library", orig), ("padded", padded)):
      with mock.patch("sngd_jax._src.transform.refresh_inverses", fn):
        p = ct.profile_compile(task, sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9))
      ms, inverses[label] = refresh_time(task, fn)
      row[label] = {"fusions": p["fusions"],
                    "refresh_fusions": p["fusions_by_stage"].get("sngd_refresh", 0),
                    "compile_ms": p["total"], "refresh_run_ms": ms}
    # The padded group gives the same inverses (to float32 rounding of a larger factorization).
    row["max_rel_diff"] = max_rel_diff(inverses["library"], inverses["padded"])
    rows.append(row)
    print(name, row["library"], row["padded"], flush=True)
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv), "rows": rows},
              f, indent=1)
  print("\n| model | fusions: library / padded | refresh fusions | compile ms | refresh run ms "
        "| inverses: max rel. difference |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    a, b = r["library"], r["padded"]
    print(f"| {r['model']} | {a['fusions']} / {b['fusions']} | {a['refresh_fusions']} / "
          f"{b['refresh_fusions']} | {a['compile_ms']:.0f} / {b['compile_ms']:.0f} | "
          f"{a['refresh_run_ms']:.1f} / {b['refresh_run_ms']:.1f} | {r['max_rel_diff']:.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
