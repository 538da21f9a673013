"""Where an evaluation task's SNGD step time goes: step variants interleaved in one process.

    python3 -m benchmarks.step_anatomy                       # resnet-bn, 40 rounds
    python3 -m benchmarks.step_anatomy --task cnn --rounds 60

To time an older version with the same script, copy it into a checkout of that version and
run it there (``git worktree add /tmp/old COMMIT; cp benchmarks/step_anatomy.py
/tmp/old/benchmarks/; cd /tmp/old && python3 -m benchmarks.step_anatomy --out ...``).

Variants, all on the same minibatches, compiled first and then run round robin:

- ``adam``, ``sgdm``: the base optimizers (``sgdm`` = SGD momentum 0.9);
- ``sgdm+capture``: SGD momentum whose step also captures the activations and returns them
  (what capturing costs when nothing reads them);
- ``frozen``: ``sngd()`` then SGD momentum with no statistics or refresh ever due
  (``factor_every`` and ``inverse_every`` huge): the cost of the preconditioning alone;
- ``frozen-zeroacts``: the same with the captured activations replaced by zeros before
  ``update`` (so they no longer feed the statistics ``lax.cond``);
- ``stats-every-step``: statistics on every step (``factor_every=1``), no refresh;
- ``sngd``: the defaults (statistics every 5 steps, refresh every 100);
- ``frozen-host``, ``sngd-host``: ``frozen`` and ``sngd`` with the opt-in host refresh
  (``sngd_jax.inverse.host_refresh``): XLA:CPU then runs the whole step synchronously.

Reports the median and mean step (ms), each variant's temporary memory from
``compiled.memory_analysis()`` and the median number of minor page faults of a step
(``getrusage``), and writes ``benchmarks/results/step_anatomy_<task>.json`` (``--out`` to
change) with the ``MALLOC_*`` environment the process ran with. XLA:CPU allocates a step's
temporary memory on every run; glibc maps anything above 32 MiB afresh, so such a step
faults on every page it touches (docs/performance.md). To time that cost away, run with
``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2000000000``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", default="resnet-bn")
  p.add_argument("--rounds", type=int, default=40)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import sngd_jax
  from benchmarks import eval_tasks, evaluate, harness

  task = eval_tasks.EVAL_TASKS[args.task](30.0)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  loss_fn = evaluate._loss_fn(task)
  never = 10**9
  grad_cap = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)

  def step_with(pre, post, acts_mode):
    def step(params, extra, s_pre, s_post, xs, ys, idx):
      (loss, (extra, acts)), g = grad_cap(params, extra, xs[idx], ys[idx])
      if acts_mode == "zero":
        acts = jax.tree.map(jnp.zeros_like, acts)
      if pre is None:  # sgdm+capture: the activations leave the step, nothing reads them
        u, s_post = post.update(g, s_post, params)
        return optax.apply_updates(params, u), extra, acts, s_post, loss
      u, s_pre = pre.update(g, s_pre, params, activations=acts)
      u, s_post = post.update(u, s_post, params)
      return optax.apply_updates(params, u), extra, s_pre, s_post, loss
    return jax.jit(step, donate_argnums=(0, 1, 2, 3))  # as evaluate.make_step

  sgdm = lambda: optax.with_extra_args_support(evaluate._SGDM(0.03))
  host_auto = sngd_jax.inverse.host_refresh(sngd_jax.inverse.auto())
  variants = {
      "adam": (None, optax.with_extra_args_support(evaluate._ADAM(0.003)), "plain"),
      "sgdm": (None, sgdm(), "plain"),
      "sgdm+capture": (None, sgdm(), "keep"),
      "frozen": (sngd_jax.sngd(factor_every=never, inverse_every=never), sgdm(), "pass"),
      "frozen-zeroacts": (sngd_jax.sngd(factor_every=never, inverse_every=never), sgdm(),
                          "zero"),
      "stats-every-step": (sngd_jax.sngd(factor_every=1, inverse_every=never), sgdm(), "pass"),
      "sngd": (sngd_jax.sngd(), sgdm(), "pass"),
      # The opt-in host refresh (one CPU host callback, inverse/host.py) instead of XLA's:
      "frozen-host": (sngd_jax.sngd(factor_every=never, inverse_every=never, inverse=host_auto),
                      sgdm(), "pass"),
      "sngd-host": (sngd_jax.sngd(inverse=host_auto), sgdm(), "pass"),
  }
  compiled, state, temp_mb = {}, {}, {}
  idx0 = jnp.arange(task.batch_size)
  for name, (pre, post, mode) in variants.items():
    params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
    if mode == "plain":
      step = evaluate.make_step(task, None, post)
    else:
      step = step_with(pre, post, mode)
    mem = step.lower(params, extra, s_pre, s_post, xs, ys, idx0).compile().memory_analysis()
    temp_mb[name] = None if mem is None else mem.temp_size_in_bytes / 1e6
    # Timed as training code calls it: the jitted function (JAX calls a `Compiled` whose
    # program holds a host callback through a slower path), after one untimed call.
    jax.block_until_ready(step(*jax.tree.map(jnp.copy, (params, extra, s_pre, s_post)),
                               xs, ys, idx0))
    compiled[name] = step
    state[name] = [params, extra, s_pre, s_post]
  rng = np.random.default_rng(0)
  times = {n: [] for n in compiled}
  faults = {n: [] for n in compiled}
  for _ in range(args.rounds):
    idx = jnp.asarray(rng.integers(0, len(xs), task.batch_size))
    for n, c in compiled.items():
      f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      t0 = time.perf_counter()
      out = c(*state[n], xs, ys, idx)
      jax.block_until_ready(out[4])
      times[n].append(time.perf_counter() - t0)
      faults[n].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
      state[n] = [out[0], out[1], None if variants[n][2] == "keep" else out[2], out[3]]
  rows = {}
  base = float(np.median(times["sgdm"][1:]))
  for n, ts in times.items():
    t = np.asarray(ts[1:]) * 1e3
    rows[n] = {"median_ms": float(np.median(t)), "mean_ms": float(t.mean()),
               "median_x_sgdm": float(np.median(t)) / (base * 1e3), "temp_mb": temp_mb[n],
               "minor_faults_median": float(np.median(faults[n][1:]))}
    print(f"{n:18s} median {rows[n]['median_ms']:7.1f} ms  mean {rows[n]['mean_ms']:7.1f} ms  "
          f"x sgdm {rows[n]['median_x_sgdm']:.2f}  temp {temp_mb[n]:.1f} MB  "
          f"page faults {rows[n]['minor_faults_median']:.0f}", flush=True)
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"step_anatomy_{args.task}.json")
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "load_at_end": os.getloadavg(),
               "command": " ".join(sys.argv), "sngd_jax": sngd_jax.__file__,
               "env": {k: v for k, v in os.environ.items()
                       if k.startswith("MALLOC_") or k in ("XLA_FLAGS", "LD_PRELOAD")},
               "rounds": args.rounds, "variants": rows}, f, indent=1)
  print("wrote", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
