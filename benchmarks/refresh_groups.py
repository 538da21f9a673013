"""How a group of equal-size blocks is refreshed on CPU: compile time and run time.

    python3 -m benchmarks.refresh_groups      # ~10 min; results/refresh_groups.json

On CPU a group of several blocks is refreshed one block per LAPACK call
(``inverse.refresh.batched_refresh``: batched LAPACK kernels can deadlock XLA's
thread pool). This compares, for each evaluation model, the forms of that CPU refresh:

- ``loop``: every group of more than one block in a ``lax.map`` loop, ``2 x 2`` blocks by
  LAPACK too (the library before ``refresh_groups`` existed: ``SMALL_DIM = 0``,
  ``UNROLL_MAX = 0``);
- ``closed form``: ``2 x 2`` blocks (per-unit factors of normalization layers) inverted in
  closed form as one group (``SMALL_DIM = 2``), the other groups as in ``loop``;
- ``library``: also groups of up to ``UNROLL_MAX = 8`` blocks written out as one-block calls
  (the library's default);
- ``unroll 16``: groups of up to 16 blocks written out;
- ``layers 8``: groups of one-block layers written out up to 8 layers, as other groups
  (``UNROLL_LAYERS_MAX = 8``, the library before ``533ebf9``), against ``library``'s 16.

For each: the fusions of the compiled step (all, and the refresh's), its compile time
(median of ``--rounds`` compiles, variants interleaved), the refresh's run time on random
positive-definite factors (median of 7, ``padded_refresh.refresh_time``), and the largest
relative difference of its inverses from the first variant's (``loop``).
"""
import argparse
import contextlib
import json
import os
import sys
from unittest import mock

import jax
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import compile_time as ct
from benchmarks import harness
from benchmarks.padded_refresh import max_rel_diff, refresh_time
from sngd_jax._src.inverse import dense
from sngd_jax._src.inverse import refresh as R

VARIANTS = {
    "loop": {"SMALL_DIM": 0, "UNROLL_MAX": 0, "UNROLL_LAYERS_MAX": 0},
    "closed form": {"SMALL_DIM": 2, "UNROLL_MAX": 0, "UNROLL_LAYERS_MAX": 0},
    "library": {},
    "unroll 16": {"UNROLL_MAX": 16},
    "layers 8": {"UNROLL_LAYERS_MAX": 8},
}


@contextlib.contextmanager
def variant(name: str):
  """The library's XLA refresh (the default; the host refresh, ``inverse/host.py``, is opt-in)
  with the settings of ``VARIANTS[name]``."""
  with contextlib.ExitStack() as stack:
    for attr, value in VARIANTS[name].items():
      stack.enter_context(mock.patch.object(dense if attr == "SMALL_DIM" else R, attr, value))
    yield


def measure(name: str, rounds: int, names: list[str]) -> dict:
  task = ct._tasks()[name]()
  make = lambda: (sngd_jax.sngd(), optax.sgd(0.01, momentum=0.9))
  row, inverses, seconds = {"model": name}, {}, {v: [] for v in names}
  for v in names:
    with variant(v):
      p = ct.profile_compile(task, *make())
      ms, inverses[v] = refresh_time(task, R.refresh_inverses, reps=7)
    row[v] = {"fusions": p["fusions"],
              "refresh_fusions": p["fusions_by_stage"].get("sngd_refresh", 0),
              "refresh_run_ms": ms,
              "max_rel_diff_from_first": max_rel_diff(inverses[names[0]], inverses[v])}
  for _ in range(rounds):
    for v in names:
      with variant(v):
        seconds[v].append(ct.compile_seconds(task, *make()))
  for v in names:
    row[v]["compile_s"] = float(np.median(seconds[v]))
    row[v]["compile_s_all"] = seconds[v]
  return row


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--models", default=",".join(ct._tasks()))
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--variants", default=",".join(VARIANTS),
                 help="the first is the reference of the inverses' difference")
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "results", "refresh_groups.json"))
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  names = args.variants.split(",")
  rows = []
  for name in args.models.split(","):
    rows.append(measure(name, args.rounds, names))
    print(name, {v: rows[-1][v] for v in names}, flush=True)
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "variants": {v: VARIANTS[v] for v in names}, "rows": rows}, f, indent=1)
  print("\n| model | fusions: " + " / ".join(names) + " | refresh fusions | compile s "
        f"(median) | refresh run ms | inverses: max rel. difference from `{names[0]}` |")
  print("|---|---|---|---|---|---|")
  for r in rows:
    col = lambda key, fmt, r=r: " / ".join(format(r[v][key], fmt) for v in names)
    print(f"| {r['model']} | {col('fusions', 'd')} | {col('refresh_fusions', 'd')} | "
          f"{col('compile_s', '.2f')} | {col('refresh_run_ms', '.1f')} | "
          f"{max(r[v]['max_rel_diff_from_first'] for v in names):.1e} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
