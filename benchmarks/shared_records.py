"""Records that leave a scan once per distinct input (``Shared``), against once per layer.

    python3 -m benchmarks.shared_records --task char-lstm --rounds 200

The gates of an LSTM cell read one input ``x_t`` (and one ``h_{t-1}``); capture hands
them one stopped-gradient value and ``nn.RNN``'s scan returns it once
(``sngd_jax._src.capture.records.Shared``). This A/B builds the task's default SNGD step
(``sngd()`` then SGD momentum, as ``benchmarks.evaluate``) twice in one process, once
traced with every record leaving the scan on its own (the behaviour before ``Shared``:
eight stacked outputs instead of two on the char-LSTM), and times both with SGD momentum
round robin on the same minibatches, the two SNGD variants in alternating order (a step's
place in the round moved its median by up to 0.7 ms in trials). Reports the compile
seconds (one each), the temporary memory of the compiled step and the median step; writes
``benchmarks/results/shared_records_<task>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", default="char-lstm")
  p.add_argument("--rounds", type=int, default=200)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax

  import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
  import sngd_jax
  from benchmarks import eval_tasks, evaluate, harness
  from sngd_jax._src.capture import records

  @contextlib.contextmanager
  def per_layer_records():
    """Trace as before ``Shared``: every record its own scan output and stopped value."""
    flatten, stop = records.Shared.tree_flatten, records.Recorder.__dict__["_stop_gradient"]

    def flat(self):
      leaves, treedef = jax.tree.flatten(self.tree)
      return tuple(leaves), (treedef, tuple(range(len(leaves))))

    records.Shared.tree_flatten = flat
    records.Recorder._stop_gradient = staticmethod(lambda target, x: jax.lax.stop_gradient(x))
    try:
      yield
    finally:
      records.Shared.tree_flatten, records.Recorder._stop_gradient = flatten, stop

  task = eval_tasks.EVAL_TASKS[args.task](30.0)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  sgdm = lambda: optax.with_extra_args_support(evaluate._SGDM(0.03))
  variants = {"sgdm": (None, False), "sngd (shared records)": (sngd_jax.sngd(), False),
              "sngd (per-layer records)": (sngd_jax.sngd(), True)}
  steps, state, rows = {}, {}, {}
  idx0 = jnp.arange(task.batch_size)
  for name, (pre, old) in variants.items():
    post = sgdm()
    params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
    step = evaluate.make_step(task, pre, post)
    with per_layer_records() if old else contextlib.nullcontext():
      t0 = time.perf_counter()
      compiled = step.lower(params, extra, s_pre, s_post, xs, ys, idx0).compile()
      compile_s = time.perf_counter() - t0
      # the jitted function is what the runs call; one untimed call traces and caches it
      jax.block_until_ready(step(*jax.tree.map(jnp.copy, (params, extra, s_pre, s_post)),
                                 xs, ys, idx0))
    mem = compiled.memory_analysis()
    rows[name] = {"compile_s": compile_s,
                  "temp_mb": None if mem is None else mem.temp_size_in_bytes / 1e6}
    steps[name], state[name] = step, [params, extra, s_pre, s_post]
  rng = np.random.default_rng(0)
  times: dict[str, list[float]] = {n: [] for n in steps}
  names = list(steps)
  for r in range(args.rounds):
    idx = jnp.asarray(rng.integers(0, len(xs), task.batch_size))
    for n in names[:1] + (names[1:] if r % 2 == 0 else names[:0:-1]):
      step = steps[n]
      t0 = time.perf_counter()
      out = step(*state[n], xs, ys, idx)
      jax.block_until_ready(out[4])
      times[n].append(time.perf_counter() - t0)
      state[n] = list(out[:4])
  base = float(np.median(times["sgdm"][1:]))
  for n, ts in times.items():
    t = np.asarray(ts[1:])
    rows[n].update(median_ms=1e3 * float(np.median(t)), mean_ms=1e3 * float(t.mean()),
                   median_x_sgdm=float(np.median(t)) / base)
    r = rows[n]
    print(f"{n:26s} median {r['median_ms']:6.2f} ms  x sgdm {r['median_x_sgdm']:.3f}  "
          f"mean {r['mean_ms']:6.2f} ms  temp {r['temp_mb']:.1f} MB  "
          f"compile {r['compile_s']:.2f} s", flush=True)
  out = args.out or os.path.join(os.path.dirname(__file__), "results",
                                 f"shared_records_{args.task}.json")
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "load_at_end": os.getloadavg(),
               "command": " ".join(["python3 -m benchmarks.shared_records"] + sys.argv[1:]),
               "rounds": args.rounds, "variants": rows}, f, indent=1)
  print("wrote", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
