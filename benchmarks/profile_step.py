"""Where an SNGD step's time goes: step variants and isolated pieces, side by side.

    python3 -m benchmarks.profile_step                       # batch 128 and 1024, ~6 min
    python3 -m benchmarks.profile_step --batch-sizes 128 --rounds 3
    python3 -m benchmarks.profile_step --trace /tmp/trace    # also a jax.profiler trace

MLP 784-256-256-10 on Fashion-MNIST (digits if absent). Every variant's jitted
step is compiled first; then the variants run in interleaved rounds of
``--steps-per-round`` steps (default 100, so each round holds exactly one
inverse refresh at ``inverse_every=100``), so that load from other processes
hits all variants alike. Reported per variant: the median step time (what a
step costs between refreshes), the mean (refreshes amortized), both as ratios
to Adam's, and an analytic FLOP count with its floor time at this machine's
measured GEMM rate (a 1024^3 float32 matmul, the best case).

Pieces are timed alone at the layer shapes: the factor ``X~^T X~``, the
preconditioning product ``G^{-1} g``, the inverse refresh, and the forward /
backward pass. Writes ``benchmarks/out/profile_step.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

import sngd_jax
from benchmarks import datasets, harness, models, report
from benchmarks.defaults import PREVIOUS as PREVIOUS_DEFAULTS
from sngd_jax import inverse as methods
from sngd_jax._src import cost as cost_lib
from sngd_jax._src import sketch
from sngd_jax._src.inverse import nystrom

SIZES = (256, 256, 10)


def variants(include_methods: bool = True) -> dict[str, tuple]:
  """name -> (builder(lr), wants_acts, sngd kwargs or None)."""
  out = {
      "adam": (lambda lr: optax.adam(1e-3), False, None),
      "sgd(momentum)": (lambda lr: optax.sgd(0.01, momentum=0.9), False, None),
  }
  sngd_cfgs = {
      "sngd defaults": {},
      "sngd previous defaults (factor_every=1, decay=0.995, Cholesky, no trust region)":
          dict(PREVIOUS_DEFAULTS),
      "sngd defaults with a dense d x d factor for the Nystrom layer (before the sketch)":
          {"inverse": "auto_dense_factor"},
      "sngd apply only (no factor/refresh)": {"factor_every": 10**9, "inverse_every": 10**9},
      "sngd inverse=auto(rank=64)": {"inverse": "auto64"},
      "sngd factor_every=10, inverse_every=300": {"factor_every": 10, "inverse_every": 300,
                                                  "decay": 0.95},
      "sngd factor_every=10, inverse_every=300, stats_batch_size=128": {
          "factor_every": 10, "inverse_every": 300, "decay": 0.95, "stats_batch_size": 128},
  }
  if include_methods:
    for m in sngd_jax.INVERSE_METHODS:
      if m != "cholesky":
        sngd_cfgs[f"sngd inverse={m}"] = {"inverse": m}
  special = {"auto64": methods.auto(rank=64),
             "auto_dense_factor": methods.auto()._replace(sketch=None)}
  for name, kw in sngd_cfgs.items():
    run_kw = {**kw, "inverse": special[kw["inverse"]]} if kw.get("inverse") in special else kw
    out[name] = ((lambda lr, kw=run_kw: sngd_jax.sngd_momentum(0.01, **kw)), True, kw)
  return out


def flops_per_step(in_dim: int, batch: int, kind: str, kw: dict | None) -> dict:
  """Analytic FLOPs of one step (multiply-add = 2), by part.

  fwd+bwd: ``6 B sum(I O)``; Adam: ~12 per parameter; the SNGD parts come from
  :func:`sngd_jax.cost_estimate` with the variant's arguments (factor
  ``2 B_s d^2`` per layer every ``factor_every`` steps; the product with the
  cached inverse every step, ``2 d^2 O`` dense or ``4 d r O`` Nystrom; the
  refresh every ``inverse_every`` steps).
  """
  dims = [in_dim, *SIZES]
  layers = list(zip(dims[:-1], dims[1:], strict=True))
  params = sum((i + 1) * o for i, o in layers)
  out = {"fwd_bwd": 6 * batch * sum(i * o for i, o in layers)}
  out["update"] = 12 * params if kind != "sgd" else 4 * params
  if kw is not None:
    shapes = {f"Dense_{n}": {"kernel": jax.ShapeDtypeStruct((i, o), jnp.float32),
                             "bias": jax.ShapeDtypeStruct((o,), jnp.float32)}
              for n, (i, o) in enumerate(layers)}
    rows = min(batch, kw.get("stats_batch_size") or batch)
    rank64 = kw.get("inverse") == "auto64"
    dense_factor = kw.get("inverse") == "auto_dense_factor"
    costs = sngd_jax.cost_estimate(shapes, batch_rows=rows,
                                   **{**kw, "inverse": "auto"} if rank64 or dense_factor else kw)
    fe = kw.get("factor_every", 5)
    ie = kw.get("inverse_every", 100)
    factor, apply, refresh = [], [], []
    for c, (_, o) in zip(costs.values(), layers, strict=True):
      if rank64 and c.dim > 512:  # rank-64 Nystrom; cost_estimate's "auto" is rank 128
        factor.append(cost_lib.sketch_factor_flops(rows, c.dim, 64))
        apply.append(nystrom.apply_flops(c.dim, 64) * o)
        refresh.append(nystrom.refresh_flops(c.dim, 64, from_sketch=True))
      elif dense_factor and c.dim > 512:  # X^T X into a d x d factor, G Omega at refresh
        factor.append(2.0 * rows * c.dim * c.dim)
        apply.append(c.apply_flops)
        refresh.append(nystrom.refresh_flops(c.dim, 128))
      else:
        factor.append(c.factor_flops)
        apply.append(c.apply_flops)
        refresh.append(c.refresh_flops or 0.0)
    out["factor"] = sum(factor) / fe
    out["apply"] = sum(apply)
    out["refresh"] = sum(refresh) / ie
  out["total"] = sum(out.values())
  return out


def _time(f, *args, n=20):
  jax.block_until_ready(f(*args))
  ts = []
  for _ in range(n):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    ts.append(time.perf_counter() - t)
  return float(np.median(ts))


def gemm_rate() -> float:
  """FLOP/s of a 1024^3 float32 matmul (median of 20)."""
  a = jnp.ones((1024, 1024), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  return 2 * 1024**3 / _time(f, a)


def pieces(in_dim: int, batch: int) -> dict:
  """Isolated timings (ms) of the SNGD pieces at the MLP's shapes."""
  dims = [in_dim, *SIZES]
  out = {}
  key = jax.random.PRNGKey(0)
  for i, (din, dout) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
    d = din + 1
    x = jax.random.normal(key, (batch, d))
    g = jax.random.normal(key, (d, dout))
    gm = x.T @ x / batch + jnp.eye(d)
    out[f"layer{i} {d}x{dout}: factor X^T X"] = _time(jax.jit(lambda x: x.T @ x / x.shape[0]), x)
    if d > 512:  # the default keeps this layer's factor as a rank-128 sketch
      omega = nystrom.test_matrix(d, 128, 0, jnp.float32)
      out[f"layer{i} {d}x{dout}: sketch X^T (X Omega), r=128"] = _time(
          jax.jit(lambda x, omega=omega: sketch.row_sums(x, omega)), x)
    shift = 1e-4 * jnp.trace(gm)[None]
    for name in ("cholesky", "eigh", "nystrom", "auto"):
      method = methods.METHODS[name]
      rep, _ = jax.jit(method.refresh)(gm[None], shift)
      out[f"layer{i} {d}x{dout}: apply G^-1 g, {name}"] = _time(
          jax.jit(lambda r, b, method=method: method.apply(r, b[None])), rep, g)
      out[f"layer{i} {d}x{dout}: refresh {name}"] = _time(
          jax.jit(lambda m, s, method=method: method.refresh(m[None], s)), gm, shift, n=5)
  return {k: v * 1e3 for k, v in out.items()}


def run(batch: int, rounds: int, steps_per_round: int, trace: str | None, ds,
        methods: bool = False) -> dict:
  task = harness.Task("mlp", models.MLP(SIZES), "xent", ds.x_train, ds.y_train, ds.x_test,
                      ds.y_test, batch_size=batch)
  loss_fn, _ = harness.loss_and_metric(task)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  sampler = harness.batches(len(xs), batch, 0)
  vs = variants(include_methods=methods)
  runs = {}
  for name, (builder, wants, kw) in vs.items():
    params = task.model.init(jax.random.PRNGKey(0), xs[:2])["params"]
    tx = builder(None)
    state = jax.tree.map(lambda a: jnp.array(a, copy=True), tx.init(params))
    step = harness.make_step(loss_fn, tx, wants)
    idx = next(sampler)
    step = step.lower(params, state, xs, ys, idx).compile()
    runs[name] = {"step": step, "params": params, "state": state, "times": [], "kw": kw}
  with tqdm(total=rounds * steps_per_round * len(runs), desc=f"batch {batch}",
            file=sys.stderr, leave=False) as bar:
    for _ in range(rounds):
      for r in runs.values():
        p, s = r["params"], r["state"]
        for _ in range(steps_per_round):
          idx = next(sampler)
          t = time.perf_counter()
          p, s, loss = r["step"](p, s, xs, ys, idx)
          float(loss)
          r["times"].append(time.perf_counter() - t)
          bar.update(1)
        r["params"], r["state"] = p, s
  if trace:
    r = runs["sngd defaults"]
    p, s = r["params"], r["state"]
    with jax.profiler.trace(os.path.join(trace, f"batch{batch}")):
      for _ in range(steps_per_round):
        p, s, loss = r["step"](p, s, xs, ys, next(sampler))
      float(loss)
  rate = gemm_rate()
  adam = runs["adam"]["times"]
  rows = []
  for name, r in runs.items():
    ts = np.asarray(r["times"][1:])
    kind = "sgd" if name.startswith("sgd") else "adam"
    fl = flops_per_step(ds.x_train.shape[1], batch, kind, r["kw"])
    rows.append({
        "variant": name, "median_ms": float(np.median(ts) * 1e3), "mean_ms": float(ts.mean() * 1e3),
        "median_x_adam": float(np.median(ts) / np.median(adam[1:])),
        "mean_x_adam": float(ts.mean() / np.mean(adam[1:])),
        "mflop": {k: v / 1e6 for k, v in fl.items()},
        "floor_ms": fl["total"] / rate * 1e3,
        "state_mb": harness.tree_bytes(r["state"]) / 2**20,
    })
  return {"batch": batch, "gemm_gflops": rate / 1e9, "rows": rows,
          "pieces_ms": pieces(ds.x_train.shape[1], batch)}


def print_result(res: dict) -> None:
  print(f"\n## batch {res['batch']} (GEMM rate {res['gemm_gflops']:.1f} GFLOP/s, 1024^3 f32)")
  print("| variant | median ms | x Adam | mean ms (refresh amortized) | x Adam | MFLOP/step "
        "(fwd+bwd / factor / apply / refresh) | FLOP floor ms |")
  print("|---|---|---|---|---|---|---|")
  for r in res["rows"]:
    m = r["mflop"]
    parts = " / ".join(f"{m.get(k, 0):.0f}" for k in ("fwd_bwd", "factor", "apply", "refresh"))
    print(f"| {r['variant']} | {r['median_ms']:.2f} | {r['median_x_adam']:.2f} | "
          f"{r['mean_ms']:.2f} | {r['mean_x_adam']:.2f} | {m['total']:.0f} ({parts}) | "
          f"{r['floor_ms']:.2f} |")
  print("\npieces alone (ms, median):")
  for k, v in res["pieces_ms"].items():
    print(f"  {k}: {v:.2f}")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch-sizes", default="128,1024")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--steps-per-round", type=int, default=100)
  p.add_argument("--trace", default=None, help="write a jax.profiler trace here")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
  args = p.parse_args(argv)
  ds = datasets.default_dataset()
  print(f"MLP {ds.x_train.shape[1]}-256-256-10 on {ds.name}; {args.rounds} interleaved rounds "
        f"of {args.steps_per_round} steps per variant; load average {os.getloadavg()}")
  results = []
  for b in [int(s) for s in args.batch_sizes.split(",")]:
    res = run(b, args.rounds, args.steps_per_round, args.trace, ds)
    print_result(res)
    results.append(res)
  path = os.path.join(args.out, "profile_step.json")
  report.write_json(path, {"machine": harness.machine_info(), "results": results})
  print(f"\nwrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
