"""On a GPU: what the first SNGD step of a process pays for (benchmarks/README.md, *On a GPU*).

    python3 -m benchmarks.gpu_first_compile --tasks cnn,transformer --out DIR

On the H200 the first SNGD training step of a process compiled in 12-21 s and a second, nearly
identical one in 2.5-2.8 s, whatever had been compiled before it. This script separates the
candidate causes, each in a fresh process (``subprocess``, so that nothing is cached in
memory), on each task:

* ``default``: Adam's step, then ``sngd_adam``'s: seconds to lower, to compile, and of the
  first call, then the median ms/step of :data:`STEPS` calls;
* ``autotune0``: the same with ``XLA_FLAGS=--xla_gpu_autotune_level=0`` (no autotuning of
  GEMMs and convolutions);
* ``notriton``: ``--xla_gpu_enable_triton_gemm=false`` (cuBLAS for every GEMM);
* ``perjit``: the default flags, but SNGD's step compiled with
  ``compiler_options={"xla_gpu_autotune_level": 0}`` (what a user can pass to one ``jit``
  without touching the process's flags);
* ``perjit-notriton``: SNGD's step compiled with
  ``compiler_options={"xla_gpu_enable_triton_gemm": False}``;
* ``warm-solver``: Cholesky, ``eigh`` and a triangular solve compiled and run once before the
  steps (whether the one-time part is loading the CUDA solver library);

and ``primitives``: a fresh process that compiles and runs a GEMM, then those three solver
calls, each timed (compile, first call, second call).

Writes ``gpu_first_compile.json`` (one record per process) and prints a table. On CPU the
flags are accepted and change nothing; the script runs there too (for its test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "default": "",
    "autotune0": "--xla_gpu_autotune_level=0",
    "notriton": "--xla_gpu_enable_triton_gemm=false",
    "perjit": "",
    "warm-solver": "",
    "perjit-notriton": "",
}
# Compiler options given to SNGD's step alone (``Lowered.compile(compiler_options=...)``,
# as ``jax.jit(..., compiler_options=...)`` passes them).
PER_JIT = {"perjit": {"xla_gpu_autotune_level": 0},
           "perjit-notriton": {"xla_gpu_enable_triton_gemm": False}}
STEPS = 100


def _solver_calls(d: int = 256):
  import jax
  import jax.numpy as jnp

  a = jax.random.normal(jax.random.key(0), (d, d), jnp.float32)
  spd = a @ a.T / d + jnp.eye(d)
  return {
      "gemm": (lambda m: m @ m, spd),
      "cholesky": (jnp.linalg.cholesky, spd),
      "eigh": (lambda m: jnp.linalg.eigh(m)[0], spd),
      "triangular_solve": (
          lambda m: jax.scipy.linalg.solve_triangular(jnp.tril(m) + d * jnp.eye(d), m,
                                                      lower=True), spd),
  }


def _timed_calls(calls):
  import jax

  out = {}
  for name, (fn, arg) in calls.items():
    f = jax.jit(fn)
    t0 = time.perf_counter()
    c = f.lower(arg).compile()
    t1 = time.perf_counter()
    jax.block_until_ready(c(arg))
    t2 = time.perf_counter()
    jax.block_until_ready(c(arg))
    t3 = time.perf_counter()
    out[name] = {"compile_s": t1 - t0, "first_call_s": t2 - t1, "second_call_s": t3 - t2}
  return out


def child_primitives():
  import jax

  t0 = time.perf_counter()
  jax.devices()
  rec = {"variant": "primitives", "backend_init_s": time.perf_counter() - t0}
  rec["calls"] = _timed_calls(_solver_calls())
  return rec


def child_task(task_name: str, variant: str, steps: int):
  import jax
  import numpy as np
  import optax

  from benchmarks import evaluate, gpu

  t0 = time.perf_counter()
  dev = jax.devices()[0]
  rec = {"task": task_name, "variant": variant, "xla_flags": os.environ.get("XLA_FLAGS", ""),
         "device": f"{dev.platform}: {getattr(dev, 'device_kind', '?')}", "jax": jax.__version__,
         "backend_init_s": time.perf_counter() - t0}
  if variant == "warm-solver":
    rec["warm_calls"] = _timed_calls(_solver_calls())
  task = gpu.TASKS[task_name](30.0)
  xs, ys = jax.numpy.asarray(task.x_train), jax.numpy.asarray(task.y_train)
  sampler = evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0))
  idxs = [next(sampler) for _ in range(steps + 1)]
  for opt in ("adam", "sngd-adam"):
    pre, post = evaluate.OPTIMIZERS[opt](gpu.LRS[task_name][opt])
    post = optax.with_extra_args_support(post)
    args = evaluate.init_run(task, pre, post, 0, xs)
    step = evaluate.make_step(task, pre, post)
    t0 = time.perf_counter()
    lowered = step.lower(*args, xs, ys, idxs[0])
    t1 = time.perf_counter()
    options = PER_JIT.get(variant) if opt != "adam" else None
    compiled = lowered.compile(compiler_options=options)
    t2 = time.perf_counter()
    st = compiled(*args, xs, ys, idxs[0])
    float(st[4])
    t3 = time.perf_counter()
    times = []
    state = st[:4]
    for i in range(steps):
      s0 = time.perf_counter()
      st = compiled(*state, xs, ys, idxs[i + 1])
      loss = float(st[4])
      times.append(time.perf_counter() - s0)
      state = st[:4]
    rec[opt] = {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t3 - t2,
                "ms_median": 1e3 * float(np.median(times)), "loss_last": loss,
                "compiler_options": options}
    print(f"  {task_name} {variant} {opt}: lower {rec[opt]['lower_s']:.1f} s, compile "
          f"{rec[opt]['compile_s']:.1f} s, first call {rec[opt]['first_call_s']:.2f} s, "
          f"{rec[opt]['ms_median']:.2f} ms/step", file=sys.stderr, flush=True)
  return rec


def _spawn(args, flags: str, timeout: float):
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flags).strip()
  cmd = [sys.executable, "-m", "benchmarks.gpu_first_compile", "--child", *args]
  t0 = time.perf_counter()
  try:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"child": args, "error": f"timeout after {timeout:.0f} s"}
  sys.stderr.write(r.stderr[-2000:] if r.returncode else "")
  lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
  if r.returncode or not lines:
    return {"child": args, "error": f"rc {r.returncode}: {r.stderr[-500:]}"}
  rec = json.loads(lines[-1])
  rec["process_s"] = time.perf_counter() - t0
  return rec


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default="cnn,transformer")
  p.add_argument("--variants", default=",".join(VARIANTS))
  p.add_argument("--steps", type=int, default=STEPS)
  p.add_argument("--timeout", type=float, default=120.0, help="seconds per process")
  p.add_argument("--out", default="benchmarks/results/gpu")
  p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
  a = p.parse_args(argv)
  if a.child:
    rec = (child_primitives() if a.child[0] == "primitives"
           else child_task(a.child[0], a.child[1], int(a.child[2])))
    print(json.dumps(rec), flush=True)
    return 0
  records = []
  os.makedirs(a.out, exist_ok=True)
  path = os.path.join(a.out, "gpu_first_compile.json")
  jobs = [("primitives",)] + [(t, v) for t in a.tasks.split(",")
                              for v in a.variants.split(",")]
  print("| task | variant | SNGD lower / compile / first call s | Adam compile s "
        "| ms/step SNGD / Adam |", flush=True)
  for job in jobs:
    if job[0] == "primitives":
      rec = _spawn(["primitives"], "", a.timeout)
      if "calls" in rec:
        print("primitives:", {k: round(v["compile_s"] + v["first_call_s"], 2)
                              for k, v in rec["calls"].items()}, flush=True)
    else:
      rec = _spawn([job[0], job[1], str(a.steps)], VARIANTS[job[1]], a.timeout)
      if "sngd-adam" in rec:
        s, ad = rec["sngd-adam"], rec["adam"]
        print(f"| {job[0]} | {job[1]} | {s['lower_s']:.1f} / {s['compile_s']:.1f} / "
              f"{s['first_call_s']:.2f} | {ad['compile_s']:.1f} | {s['ms_median']:.2f} / "
              f"{ad['ms_median']:.2f} |", flush=True)
    if "error" in rec:
      print(job, rec["error"][-300:], flush=True)
    records.append(rec)
    with open(path, "w") as f:
      json.dump({"steps": a.steps, "records": records}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
