"""Ablation of `sngd()`'s defaults: what each default buys in steps and in step time.

    python3 -m benchmarks.defaults               # ~6 minutes on 2 CPU cores
    python3 -m benchmarks.defaults --steps 200   # smoke test

Each variant changes one default back to its earlier value, on the README's
MLP 784-256-256-10 and the paper's deep narrow 784-80x6-10 (Fashion-MNIST when
installed, else digits; batch 128; `sngd_momentum(lr, momentum=0.9)`), for a
fixed number of steps at three learning rates, interleaved with Adam (lr 1e-3)
in one process so that the step-time ratios are side by side:

* `previous`: the defaults before this ablation (`factor_every=1, decay=0.995`,
  exact Cholesky up to d = 4096, no trust region);
* `+ nystrom`: `inverse="auto"` with its new rule (Nystrom rank 128 above d = 512);
* `+ factor_every=5`: also `factor_every=5, decay=0.975` (the same horizon);
* `defaults`: also the trust region `max_norm=1.0`, i.e. `sngd()` as shipped.

Writes `benchmarks/results/defaults.json` and `.md` (date, machine, versions).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks import datasets, harness, report, tasks
from benchmarks import main as main_job

# The earlier `inverse="auto"` was Cholesky up to d = 4096: every layer here.
PREVIOUS = dict(factor_every=1, decay=0.995, inverse="cholesky", max_norm=None)
VARIANTS = {
    "previous": PREVIOUS,
    "+ nystrom": {**PREVIOUS, "inverse": "auto"},
    "+ factor_every=5": {**PREVIOUS, "inverse": "auto", "factor_every": 5, "decay": 0.975},
    "defaults": {},
}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=1500)
  p.add_argument("--lrs", default="0.01,0.03,0.1")
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = p.parse_args(argv)
  ds = datasets.default_dataset()
  lrs = [float(v) for v in args.lrs.split(",")]
  problems = {"784-256-256-10": main_job.main_task(ds),
              "784-80x6-10": tasks.build("mlp-80x6", ds)[0]}
  all_rows, lines = [], []
  for label, task in problems.items():
    runs = [dict(task=task, opt_name=name, lr=lr, seed=0, steps=args.steps,
                 eval_every=args.steps, optimizer=harness.sngd_variant(**kw))
            for name, kw in VARIANTS.items() for lr in lrs]
    runs.append(dict(task=task, opt_name="adam", lr=1e-3, seed=0, steps=args.steps,
                     eval_every=args.steps))
    print(f"{label}: {len(runs)} runs of {args.steps} steps", file=sys.stderr, flush=True)
    records = harness.interleaved(runs, chunk=50)
    adam = records[-1]
    lines += [f"### {task.description} ({label}), {args.steps} steps, EMA loss target "
              f"{task.loss_target}", "",
              "| variant | lr | EMA train loss | test acc | steps to target | median ms "
              "(x Adam) | mean ms (x Adam) |", "|---|---|---|---|---|---|---|"]
    for rec in records:
      mean = rec["wall_s"] / max(rec["steps"], 1)
      adam_mean = adam["wall_s"] / max(adam["steps"], 1)
      row = {"problem": label, "variant": rec["optimizer"], "lr": rec["lr"],
             "ema_loss": rec["final_ema_loss"], "test_acc": rec["final_metric"],
             "steps_to_loss": rec.get("steps_to_loss"), "diverged": rec["diverged"],
             "median_ms": rec["median_step_s"] * 1e3, "mean_ms": mean * 1e3,
             "x_adam_median": rec["median_step_s"] / adam["median_step_s"],
             "x_adam_mean": mean / adam_mean}
      all_rows.append(row)
      loss = "diverged" if row["diverged"] else f"{row['ema_loss']:.4f}"
      lines.append(
          f"| {row['variant']} | {row['lr']:g} | {loss} | {row['test_acc']:.4f} | "
          f"{row['steps_to_loss'] or '-'} | {row['median_ms']:.2f} ({row['x_adam_median']:.2f}) | "
          f"{row['mean_ms']:.2f} ({row['x_adam_mean']:.2f}) |")
    lines.append("")
  info = harness.machine_info()
  load = np.round(info.get("loadavg_at_start", []), 1).tolist()
  head = [f"# Ablation of the defaults ({info['date']}, {info.get('cpu_model', '')}, "
          f"{info['cpu_count']} cores, load at start {load}, jax {info['jax']}, {ds.name})", "",
          "`python3 -m benchmarks.defaults`; see its docstring for the variants. One seed; "
          "the runs of a problem are interleaved, 50 steps a turn.", ""]
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "defaults.md"), "w") as f:
    f.write("\n".join(head + lines))
  report.write_json(os.path.join(args.out, "defaults.json"),
                    {"machine": info, "steps": args.steps, "rows": all_rows})
  print("\n".join(head + lines))
  return 0


if __name__ == "__main__":
  sys.exit(main())
