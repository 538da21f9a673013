"""Temporary memory of each evaluation task's SNGD step with and without the trust-region
diagnostic that ``evaluate.py`` records (``evaluate.make_step(..., diagnose=...)``).

    python3 -m benchmarks.diag_temp        # ~5 min; results/diag_temp.json

Compiles ``sngd_momentum``'s step (``sngd()`` then SGD momentum, as the protocol's ``sngd``)
twice per task and reads ``compiled.memory_analysis().temp_size_in_bytes``. XLA:CPU
allocates that much on every run of the step; above glibc's 32 MiB mmap threshold every run
page-faults on it (docs/performance.md), so a diagnostic that pushes a step over it changes
the step time it is meant to observe.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", default="cnn,resnet-bn,autoencoder,char-lstm,transformer")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                               "diag_temp.json"))
  args = p.parse_args(argv)
  import jax.numpy as jnp
  import optax

  from benchmarks import eval_tasks, evaluate, harness

  rows = {}
  for name in args.tasks.split(","):
    task = eval_tasks.EVAL_TASKS[name](30.0)
    xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
    pre, post = evaluate.OPTIMIZERS["sngd"](0.01)
    post = optax.with_extra_args_support(post)
    args_ = (*evaluate.init_run(task, pre, post, 0, xs), xs, ys, jnp.arange(task.batch_size))
    row = {}
    for diagnose in (False, True):
      c = evaluate.make_step(task, pre, post, diagnose=diagnose).lower(*args_).compile()
      row["with_diagnostic" if diagnose else "without"] = (
          c.memory_analysis().temp_size_in_bytes / 2**20)
    rows[name] = row
    print(f"{name:12s} temporaries without the diagnostic {row['without']:.1f} MiB, "
          f"with it {row['with_diagnostic']:.1f} MiB", flush=True)
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "unit": "MiB", "rows": rows}, f, indent=1)
  print("wrote", args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
