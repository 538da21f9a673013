"""Page faults of an XLA:CPU step with 32 MiB of temporaries, per malloc configuration.

    python3 -m benchmarks.page_faults                 # 2 processes x 40 runs per configuration

XLA:CPU allocates a compiled step's temporary buffer on every run; glibc maps an allocation
above 32 MiB afresh and unmaps it on ``free``, so every run faults on each page it touches
(docs/performance.md). Each configuration runs a small jitted step (``sin``, ``cos``, two
2048 x 2048 matmuls: 32 MiB of temporaries) in fresh processes and records the minor page
faults (``getrusage``) of each run after the first:

- ``glibc``: glibc's defaults;
- ``glibc-keep``: ``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2000000000``;
- ``jemalloc``, ``tcmalloc``: ``LD_PRELOAD`` of Debian's ``libjemalloc2`` /
  ``libtcmalloc-minimal4`` (skipped when not installed);
- ``glibc-heaps``: glibc's defaults, the step compiled with XLA's
  ``xla_multiheap_size_constraint_per_heap`` at 16 MiB (``compiler_options``: the
  temporaries split into heaps of at most that size, each below the mmap threshold).

Writes ``benchmarks/results/page_faults.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap

CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import jax, jax.numpy as jnp

    @jax.jit
    def step(x):
      a, b = jnp.sin(x), jnp.cos(x)
      return (jnp.tanh(a @ b) @ a + b).sum()

    x = jnp.ones((2048, 2048))
    heap = os.environ.get("PF_HEAP_BYTES")
    opts = {"xla_multiheap_size_constraint_per_heap": int(heap)} if heap else {}
    c = step.lower(x).compile(compiler_options=opts)
    c(x).block_until_ready()
    faults = []
    for _ in range(int(sys.argv[1])):
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      c(x).block_until_ready()
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"faults": faults, "temp_bytes": c.memory_analysis().temp_size_in_bytes}))
""")

LIBS = "/usr/lib/x86_64-linux-gnu"
CONFIGS = {
    "glibc": {},
    "glibc-keep": {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0",
                   "MALLOC_TRIM_THRESHOLD_": "2000000000"},
    "jemalloc": {"LD_PRELOAD": f"{LIBS}/libjemalloc.so.2"},
    "tcmalloc": {"LD_PRELOAD": f"{LIBS}/libtcmalloc_minimal.so.4"},
    "glibc-heaps": {"PF_HEAP_BYTES": str(16 * 2**20)},
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--processes", type=int, default=2)
  p.add_argument("--runs", type=int, default=40)
  p.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "page_faults.json"))
  args = p.parse_args(argv)
  from benchmarks import harness
  out = {"machine": harness.machine_info(), "command": " ".join(sys.argv), "configs": {}}
  for name in args.configs.split(","):
    extra = CONFIGS[name]
    lib = extra.get("LD_PRELOAD")
    if lib and not os.path.exists(lib):
      print(f"{name}: {lib} not installed, skipped")
      continue
    env = dict(os.environ, JAX_PLATFORMS="cpu", **extra)
    runs = []
    for _ in range(args.processes):
      r = subprocess.run([sys.executable, "-c", CHILD, str(args.runs)], env=env, check=True,
                         capture_output=True, text=True, timeout=600)
      runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    out["configs"][name] = {"env": extra, "processes": runs}
    for r in runs:
      f = r["faults"]
      last = max((i for i, x in enumerate(f) if x > 100), default=-1)
      print(f"{name:10s} temp {r['temp_bytes'] / 2**20:.1f} MiB  faults of the first 8 runs "
            f"{f[:8]}  last run with > 100 faults: {last + 1} of {len(f)}", flush=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  print("wrote", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
