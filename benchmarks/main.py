"""The README's main job: SNGD vs Adam vs SGD (momentum) on the default data set.

    python3 -m benchmarks.main                 # ~6 minutes on 2 CPU cores
    python3 -m benchmarks.main --budget-s 10   # quicker
    python3 -m benchmarks.main --steps 5       # smoke test

An MLP 784-256-256-10 (64-256-256-10 on the digits fallback), batch 128, is
trained by each optimizer for the same budget of step time (default 50 s
each; the runs are interleaved in one process, 50 steps a turn, so that load
from other processes hits them alike; ``--steps`` caps the steps instead;
``sngd`` is ``sngd_momentum(lr, momentum=0.9)`` with every default, at two
learning rates; ``sngd_adam`` is ``sngd_jax.sngd_adam(lr)``, Adam on SNGD's
direction). Prints a table (final EMA train loss, test accuracy, median step
time and its ratio to Adam's, wall time and steps to the EMA train-loss target),
and writes ``benchmarks/out/main.png`` (loss vs steps and vs wall time) and
``benchmarks/out/main.json``.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from tqdm import tqdm

from benchmarks import datasets, harness, models, report

DEFAULT_OPTIMIZERS = "sngd:0.01,sngd:0.03,sngd_adam:0.001,adam:0.001,adam:0.003,sgd:0.1"


def main_task(ds: datasets.Dataset, batch_size: int = 128) -> harness.Task:
  """MLP 784-256-256-10 on the data set; loss target 0.15, test target 88% (digits: 95%)."""
  fashion = ds.x_train.shape[1] == 784
  return harness.Task(
      name=f"mlp-256-256/{ds.name}", model=models.MLP((256, 256, ds.num_classes)),
      loss="xent", x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
      y_test=ds.y_test, batch_size=batch_size, loss_target=0.15,
      acc_target=0.88 if fashion else 0.95,
      description=f"MLP {ds.x_train.shape[1]}-256-256-{ds.num_classes}, batch {batch_size}")


def parse_optimizers(spec: str) -> list[tuple[str, float]]:
  out = []
  for item in spec.split(","):
    name, lr = item.split(":")
    if name not in harness.OPTIMIZERS:
      raise SystemExit(f"unknown optimizer {name!r}; known: {sorted(harness.OPTIMIZERS)}")
    out.append((name, float(lr)))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--optimizers", default=DEFAULT_OPTIMIZERS,
                 help=f"name:lr,... (default {DEFAULT_OPTIMIZERS})")
  p.add_argument("--seeds", type=int, default=1, help="seeds per optimizer (median reported)")
  p.add_argument("--budget-s", type=float, default=50.0,
                 help="seconds of step time per run (default 50)")
  p.add_argument("--steps", type=int, default=None,
                 help="fixed number of steps per run instead of the time budget")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--data-dir", default=datasets.DEFAULT_MNIST_DIR,
                 help="MNIST-format directory (falls back to sklearn digits if absent)")
  p.add_argument("--eval-every", type=int, default=500)
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out"))
  args = p.parse_args(argv)

  ds = datasets.default_dataset(args.data_dir)
  task = main_task(ds, args.batch_size)
  opts = parse_optimizers(args.optimizers)
  print(f"data: {ds.name} ({len(ds.x_train)} train, {len(ds.x_test)} test); task: "
        f"{task.description}; budget: "
        f"{f'{args.steps} steps' if args.steps else f'{args.budget_s:g} s of steps'} per run")
  budget = None if args.steps else args.budget_s
  max_steps = args.steps or 10**7
  runs = [dict(task=task, opt_name=name, lr=lr, seed=seed, steps=max_steps,
               time_budget_s=budget, eval_every=min(args.eval_every, max_steps))
          for seed in range(args.seeds) for name, lr in opts]
  # Interleaved (round robin, 50 steps a turn) so that load from other processes hits all
  # optimizers alike.
  with tqdm(total=len(runs) * (budget if budget else max_steps), desc="all runs",
            unit="s" if budget else "step", file=sys.stderr,
            bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} {unit}") as bar:
    records = harness.interleaved(runs, chunk=50, progress=bar)
  for rec in records:
    rec["label"] = rec["optimizer"]
    print(f"  {rec['optimizer']} lr={rec['lr']:g} seed={rec['seed']}: {rec['steps']} steps, "
          f"EMA loss {rec['final_ema_loss']:.4f}, test acc {rec['final_metric']:.4f}, "
          f"{rec['median_step_s'] * 1e3:.2f} ms/step")

  rows = report.summarize(records)
  table = report.markdown_table(rows)
  print()
  print(f"EMA train-loss target {task.loss_target}, test-accuracy target {task.acc_target}; "
        "times are summed step times (compile and evaluation excluded)")
  print(table)
  verdict = target_verdict(rows)
  if verdict:
    print()
    print(verdict)
  os.makedirs(args.out, exist_ok=True)
  png = os.path.join(args.out, "main.png")
  report.plot(records, png, title=f"{task.description} on {ds.name}")
  js = os.path.join(args.out, "main.json")
  report.write_json(js, {"machine": harness.machine_info(), "task": task.description,
                         "dataset": ds.name, "args": vars(args), "rows": rows,
                         "runs": records, "verdict": verdict})
  print(f"\nwrote {png} and {js}")
  return 0


def target_verdict(rows) -> str:
  """The issue's target, per SNGD variant: wall time to the loss target <= 0.7x best Adam's."""
  adam = report.best_of([r for r in rows if r["label"] == "adam"])
  if not adam:
    return ""
  aw = adam["wall_to_loss"]
  lines = []
  for label in sorted({r["label"] for r in rows if r["label"].startswith("sngd")}):
    sngd = report.best_of([r for r in rows if r["label"] == label])
    sw, target = sngd["wall_to_loss"], sngd["loss_target"]
    head = f"target ({label} reaches EMA loss {target} in <= 0.7x best Adam's time):"
    if sw is None or not np.isfinite(sw):
      lines.append(f"{head} {label} did not reach it")
    elif aw is None or not np.isfinite(aw):
      lines.append(f"{head} {sw:.1f} s; Adam did not reach it within {adam['wall_s']:.1f} s, "
                   f"so the ratio is < {sw / adam['wall_s']:.2f} (met)"
                   if sw / adam["wall_s"] <= 0.7 else
                   f"{head} {sw:.1f} s; Adam did not reach it within {adam['wall_s']:.1f} s "
                   "(undecided: raise --budget-s)")
    else:
      ratio = sw / aw
      lines.append(f"{head} {sw:.1f} s vs Adam lr={adam['lr']:g} {aw:.1f} s: ratio "
                   f"{ratio:.2f}, {'met' if ratio <= 0.7 else 'NOT met'}")
  return "\n".join(lines)


if __name__ == "__main__":
  sys.exit(main())
