"""Times of the inverse methods vs block size and vs number of blocks.

Run from the repository root::

    python -m benchmarks.matfun            # full grid (about 10 minutes on 2 CPU cores)
    python -m benchmarks.matfun --quick    # small grid, a smoke test

Every timing is the wall time of a call of a jitted function after one call
for compilation, with the result blocked on; the methods are timed
round-robin and the median and minimum of several runs are kept. The factor is a
float32 ``G = X^T X / n + 1e-4 tr(G) I`` with ``n = d`` rows whose column
scales decay from 1 to 1e-2 (condition number about 1e4, as the default
damping gives). Writes ``benchmarks/results/matfun_<platform>.json`` and
``.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from sngd_jax import inverse as matfun
from sngd_jax import inverse as methods
from sngd_jax import inverse as nystrom

DIMS = (64, 128, 256, 512, 1024, 2048, 4096)
BATCHES = (1, 4, 16, 64)
BATCH_DIM = 128
APPLY_COLUMNS = 256
# A method whose median refresh exceeds this many seconds is not run at larger sizes.
CAP_SECONDS = 2.0


def candidates(rank: int, block_size: int) -> dict[str, matfun.InverseMethod]:
  return {
      "cholesky": matfun.cholesky(),
      "eigh": matfun.eigh(),
      "denman_beavers": matfun.denman_beavers_inverse(),
      "newton_schulz": matfun.newton_schulz_inverse(),
      f"nystrom_r{rank}": nystrom.nystrom(rank),
      f"blocks_{block_size}": methods.block_diagonal(block_size),
  }


def factor(d: int, batch: int = 1, seed: int = 0) -> tuple[jax.Array, jax.Array]:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch, d, d)) * np.logspace(0, -2, d)
  g = np.einsum("bnd,bne->bde", x, x) / d
  g = jnp.asarray(g, jnp.float32)
  return g, matfun.damping_shift(g, 1e-4, 0.0)


def timed(fn, *args) -> float:
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def summarize(times: list[float]) -> dict[str, float]:
  return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def repeats_for(d: int) -> int:
  return 7 if d <= 256 else 5 if d <= 1024 else 3


def time_vs_dim(dims, rank, block_size):
  """For each d, all methods are timed round-robin (interleaved), so that load from other
  processes affects them alike; median and minimum over the runs are kept."""
  rows = []
  methods_ = candidates(rank, block_size)
  jitted = {n: (jax.jit(m.refresh), jax.jit(m.apply)) for n, m in methods_.items()}
  capped: dict[str, int] = {}
  for d in dims:
    g, shift = factor(d)
    v = jnp.ones((1, d, APPLY_COLUMNS), jnp.float32)
    exact = np.linalg.solve(np.asarray(g[0], np.float64) + float(shift[0]) * np.eye(d),
                            np.ones((d, 1)))
    live, reps = {}, {}
    for name, (refresh, apply) in jitted.items():
      if name in capped:
        rows.append({"method": name, "dim": d,
                     "skipped": f"refresh > {CAP_SECONDS} s at d={capped[name]}"})
        continue
      rep, ok = jax.block_until_ready(refresh(g, shift))  # compiles
      jax.block_until_ready(apply(rep, v))
      got = np.asarray(apply(rep, v[:, :, :1])[0], np.float64)
      err = float(np.linalg.norm(got - exact) / np.linalg.norm(exact))
      live[name] = {"ok": bool(ok[0]), "rel_error_vs_float64_solve": err,
                    "refresh": [], "apply": []}
      reps[name] = rep
    for _ in range(repeats_for(d)):
      for name, res in live.items():
        refresh, apply = jitted[name]
        res["refresh"].append(timed(refresh, g, shift))
        res["apply"].append(timed(apply, reps[name], v))
    for name, res in live.items():
      row = {"method": name, "dim": d, "ok": res["ok"],
             "rel_error_vs_float64_solve": res["rel_error_vs_float64_solve"],
             "refresh": summarize(res["refresh"]), "apply": summarize(res["apply"])}
      rows.append(row)
      print(f"{name:16s} d={d:5d} refresh median {row['refresh']['median_s'] * 1e3:10.2f} "
            f"min {row['refresh']['min_s'] * 1e3:10.2f} ms  apply min "
            f"{row['apply']['min_s'] * 1e3:8.2f} ms  "
            f"rel.err {row['rel_error_vs_float64_solve']:.1e}",
            flush=True)
      if row["refresh"]["min_s"] > CAP_SECONDS:
        capped[name] = d
  return rows


def time_vs_batch(batches, d, rank, block_size):
  """One batched call for b blocks vs a Python loop of b single-block calls, interleaved."""
  rows = []
  for name in ("cholesky", "eigh", "newton_schulz"):
    refresh = jax.jit(candidates(rank, block_size)[name].refresh)
    for b in batches:
      g, shift = factor(d, b)

      def loop(g, s, b=b, refresh=refresh):
        return [refresh(g[i:i + 1], s[i:i + 1]) for i in range(b)]

      jax.block_until_ready(refresh(g, shift))
      jax.block_until_ready(loop(g, shift))
      batched, looped = [], []
      for _ in range(5):
        batched.append(timed(refresh, g, shift))
        looped.append(timed(loop, g, shift))
      row = {"method": name, "dim": d, "batch": b, "batched": summarize(batched),
             "loop": summarize(looped)}
      rows.append(row)
      print(f"{name:16s} d={d} b={b:3d} batched min {min(batched) * 1e3:9.2f} ms  loop min "
            f"{min(looped) * 1e3:9.2f} ms", flush=True)
  return rows


def markdown(result) -> str:
  m = result["machine"]
  lines = [
      f"# Inverse methods on {m['platform']} ({m['device']})",
      "",
      f"{result['date']}, jax {result['jax']}, {m['cpu_count']} CPU cores reported "
      f"(`os.cpu_count`), {m['processor'] or m['machine']}. " + result["note"],
      "",
      "## Refresh time vs block size d (float32, one block)",
      "",
      "ms: minimum (median) of 3-7 interleaved runs after compilation. The minimum is the "
      "least disturbed by other processes.",
      "",
  ]
  names = list(dict.fromkeys(r["method"] for r in result["vs_dim"]))
  dims = sorted({r["dim"] for r in result["vs_dim"]})
  by = {(r["method"], r["dim"]): r for r in result["vs_dim"]}

  def cell(r, key):
    if r is None:
      return "-"
    if "skipped" in r:
      return "skipped"
    return f"{r[key]['min_s'] * 1e3:.2f} ({r[key]['median_s'] * 1e3:.2f})"

  lines.append("| method | " + " | ".join(f"d={d}" for d in dims) + " |")
  lines.append("|---" * (len(dims) + 1) + "|")
  for n in names:
    lines.append(f"| {n} | " + " | ".join(cell(by.get((n, d)), "refresh") for d in dims) + " |")
  lines += ["", f"## Apply time (G^-1 times a d x {APPLY_COLUMNS} gradient; ms, min (median))",
            ""]
  lines.append("| method | " + " | ".join(f"d={d}" for d in dims) + " |")
  lines.append("|---" * (len(dims) + 1) + "|")
  for n in names:
    lines.append(f"| {n} | " + " | ".join(cell(by.get((n, d)), "apply") for d in dims) + " |")
  lines += ["", "## Relative error of G^-1 v vs a float64 solve", ""]
  lines.append("| method | " + " | ".join(f"d={d}" for d in dims) + " |")
  lines.append("|---" * (len(dims) + 1) + "|")
  for n in names:
    cells = []
    for d in dims:
      r = by.get((n, d))
      cells.append("-" if r is None or "skipped" in r
                   else f"{r['rel_error_vs_float64_solve']:.1e}")
    lines.append(f"| {n} | " + " | ".join(cells) + " |")
  if result["vs_batch"]:
    d = result["vs_batch"][0]["dim"]
    lines += ["", f"## Batch of b blocks of size d={d}: one batched call vs a loop of b calls",
              "", "ms, minimum of 5 interleaved runs.", "",
              "| method | b | batched | batched per block | loop | loop / batched |",
              "|---|---|---|---|---|---|"]
    for r in result["vs_batch"]:
      tb, tl = r["batched"]["min_s"], r["loop"]["min_s"]
      lines.append(f"| {r['method']} | {r['batch']} | {tb * 1e3:.2f} | "
                   f"{tb / r['batch'] * 1e3:.2f} | {tl * 1e3:.2f} | {tl / tb:.1f}x |")
  return "\n".join(lines) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true", help="small grid (smoke test)")
  parser.add_argument("--rank", type=int, default=256, help="Nystrom rank")
  parser.add_argument("--block-size", type=int, default=512, help="block_diagonal size")
  parser.add_argument("--out", default=os.path.join("benchmarks", "results"))
  args = parser.parse_args()
  dims = DIMS[:3] if args.quick else DIMS
  batches = BATCHES[:2] if args.quick else BATCHES
  device = jax.devices()[0]
  result = {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "jax": jax.__version__,
      "machine": {"platform": device.platform, "device": device.device_kind,
                  "machine": platform.machine(), "processor": platform.processor(),
                  "system": platform.platform(), "cpu_count": os.cpu_count()},
      "note": ("No GPU was available for this run. The CPU was shared with other jobs "
               "(load average above the core count), so absolute times are noisy; compare "
               "methods within one column. Methods whose refresh took more than "
               f"{CAP_SECONDS} s were not run at larger sizes."),
      "settings": {"rank": args.rank, "block_size": args.block_size, "dtype": "float32",
                   "damping": 1e-4, "cap_seconds": CAP_SECONDS},
  }
  result["vs_dim"] = time_vs_dim(dims, args.rank, args.block_size)
  result["vs_batch"] = time_vs_batch(batches, BATCH_DIM, args.rank, args.block_size)
  os.makedirs(args.out, exist_ok=True)
  stem = os.path.join(args.out, f"matfun_{device.platform}" + ("_quick" if args.quick else ""))
  with open(stem + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown(result))
  print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
  main()
