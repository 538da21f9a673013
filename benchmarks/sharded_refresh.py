"""Benchmark: the inverse refresh on 1 device vs split over 8 (forced host) devices.

The refresh of a group of ``b`` equal-size ``d x d`` blocks (``sngd``'s
``_refresh_inverses``: damping + Cholesky inverse) is timed four ways, jitted,
in one process with 8 host CPU devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``, set here before JAX
is imported):

* ``1 device``: inputs on one device, the plain refresh;
* ``8 replicated``: inputs replicated over an 8-device mesh, the plain refresh,
  so every device repeats all ``b`` blocks (what a replicated state does by
  default);
* ``8 sharded``: ``sngd(shard_refresh=mesh)``'s refresh: each device inverts
  ``ceil(b/8)`` blocks, then an all-gather.
* ``1 device, ceil(b/8) blocks``: the work one device does in the sharded
  refresh, alone: what the sharded refresh would take on 8 real devices,
  less the all-gather.

Forced host devices share this machine's cores: they model the *work split*
and the collectives, not 8 real accelerators. On a machine with fewer cores
than devices the sharded refresh cannot be 8x faster; the useful reading is
sharded vs replicated (how much redundant work the option removes), the last
column (the per-device work), and the overhead for a group of one block
(nothing to split).

Run: ``python -m benchmarks.sharded_refresh [--repeats 5] [--quick]``. Writes
``benchmarks/results/sharded_refresh.json`` and prints a markdown table.
"""

from __future__ import annotations

import os

from benchmarks import force_cpu_devices

force_cpu_devices(8)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from sngd_jax import inverse as inverse_lib  # noqa: E402
from sngd_jax._src.inverse import base as matfun  # noqa: E402
from sngd_jax._src.inverse.registry import get_method  # noqa: E402

# (blocks b, size d): per-unit rfim blocks of a 128-input layer with 64 units;
# 8 equal layers of width 256 (+ bias); one 785-wide
# layer (nothing to split).
CASES = [(64, 129), (8, 257), (1, 785)]
QUICK_CASES = [(64, 129), (8, 257), (1, 257)]


def _machine() -> dict:
  model = platform.processor() or platform.machine()
  try:
    with open("/proc/cpuinfo") as f:
      model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return {"cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(), "jax": jax.__version__,
          "devices": f"{jax.device_count()} x {jax.devices()[0].platform} (forced host devices)"}


def _spd_blocks(b: int, d: int, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, 2 * d, d)).astype(np.float32)
  return np.einsum("bna,bnc->bac", x, x) / (2 * d)


def _time(fn, arg, repeats: int) -> list[float]:
  jax.block_until_ready(fn(arg))  # compile and warm up
  out = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(arg))
    out.append(time.perf_counter() - t)
  return out


def run(cases, repeats: int) -> list[dict]:
  method = get_method("cholesky")
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharded = inverse_lib.shard_method(method, mesh=mesh)

  def plain(g):
    return method.refresh(matfun.symmetrize(g), matfun.damping_shift(g, 1e-4, 0.0))

  def split(g):
    return sharded.refresh(matfun.symmetrize(g), matfun.damping_shift(g, 1e-4, 0.0))

  rows = []
  for b, d in cases:
    g = _spd_blocks(b, d)
    one = jax.device_put(g, jax.devices()[0])
    rep = jax.device_put(g, NamedSharding(mesh, P()))
    per_device = jax.device_put(g[:-(-b // jax.device_count())], jax.devices()[0])
    configs = {"1 device": (jax.jit(plain), one), "8 replicated": (jax.jit(plain), rep),
               "8 sharded": (jax.jit(split), rep),
               "1 device, ceil(b/8) blocks": (jax.jit(plain), per_device)}
    results = {k: fn(x) for k, (fn, x) in configs.items() if k != "1 device, ceil(b/8) blocks"}
    ref = np.asarray(results["1 device"][0])
    err = max(float(np.max(np.abs(np.asarray(r[0]) - ref))) / float(np.max(np.abs(ref)))
              for r in results.values())
    # Interleave the configurations round by round so that load from other
    # processes on this shared machine hits all of them alike.
    times = {k: [] for k in configs}
    for _ in range(repeats):
      for k, (fn, x) in configs.items():
        times[k] += _time(fn, x, 1)
    med = {k: statistics.median(v) for k, v in times.items()}
    rows.append({"blocks": b, "dim": d, "median_s": med,
                 "speedup_sharded_vs_1": med["1 device"] / med["8 sharded"],
                 "speedup_sharded_vs_replicated": med["8 replicated"] / med["8 sharded"],
                 "max_rel_diff": err, "repeats": repeats})
    print(f"b={b:3d} d={d:4d}: " + ", ".join(f"{k} {v * 1e3:8.2f} ms" for k, v in med.items())
          + f"; max rel diff {err:.1e}", flush=True)
  return rows


def table(rows: list[dict]) -> str:
  lines = ["| blocks x d | 1 device | 8 replicated | 8 sharded | sharded vs 1 | "
           "sharded vs replicated | 1 device, ceil(b/8) blocks |", "|" + " --- |" * 7]
  for r in rows:
    m = r["median_s"]
    lines.append(f"| {r['blocks']} x {r['dim']} | {m['1 device'] * 1e3:.1f} ms | "
                 f"{m['8 replicated'] * 1e3:.1f} ms | {m['8 sharded'] * 1e3:.1f} ms | "
                 f"{r['speedup_sharded_vs_1']:.2f}x | {r['speedup_sharded_vs_replicated']:.2f}x | "
                 f"{m['1 device, ceil(b/8) blocks'] * 1e3:.1f} ms |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--quick", action="store_true", help="small cases, 3 repeats")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                    "sharded_refresh.json"))
  args = parser.parse_args()
  cases, repeats = (QUICK_CASES, 3) if args.quick else (CASES, args.repeats)
  machine = _machine()
  print(json.dumps(machine), flush=True)
  rows = run(cases, repeats)
  print(table(rows))
  result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": machine, "load_average_at_end": os.getloadavg(), "rows": rows}
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=1)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
