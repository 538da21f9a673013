"""The full benchmark suite: tasks x optimizers x learning rates x seeds, same budget.

    python3 -m benchmarks.run                                  # everything (hours on 2 cores)
    python3 -m benchmarks.run --tasks mlp-256-256 --seeds 3    # one task
    python3 -m benchmarks.run --quick                          # 1 seed, first lr, 10 s runs
    python3 -m benchmarks.run --list                           # tasks and optimizers

Every run of a task gets the same budget of step time (``--budget-s``, summed
step times; compile and evaluation excluded) and the same minibatch order per
seed. Each optimizer is tuned on its small learning-rate grid (:data:`GRIDS`);
the table reports, per task and optimizer, the median over seeds at the best
learning rate (the one reaching the EMA train-loss target fastest, else the
lowest final EMA loss) and, in the JSON, every run.

kfac-jax runs in its own virtual environment (``benchmarks/setup_kfac.sh``),
as a subprocess on the same data; SNGD on tasks with layers the library does
not capture yet is reported as pending, with the library's error.

Writes ``benchmarks/results/<task>.json`` (date, machine, versions, every run),
``benchmarks/results/<task>.png`` (EMA train loss vs steps and vs wall time)
and the tables between the markers in ``benchmarks/results/suite.md``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import tempfile

from tqdm import tqdm

from benchmarks import OPENBLAS_CAP, datasets, harness, report, tasks

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
KFAC_PYTHON = os.environ.get("KFAC_PYTHON", "/opt/kfac-venv/bin/python")

GRIDS = {
    "sngd": (0.01, 0.03),
    "sngd-amortized": (0.01, 0.03),
    "adam": (1e-3, 3e-3),
    "adamw": (1e-3, 3e-3),
    "sgd": (0.03, 0.1),
    "psgd_kron": (3e-4, 1e-3),
    "kfac_jax": (1e-3, 3e-3),
}
DEFAULT_OPTIMIZERS = ("sngd", "sngd-amortized", "adam", "sgd", "psgd_kron", "kfac_jax")
DEFAULT_TASKS = tuple(tasks.TASKS)
MARK_START, MARK_END = "<!-- results:start -->", "<!-- results:end -->"


def kfac_available() -> str:
  """'' if the kfac-jax interpreter works, else why not."""
  if not os.path.exists(KFAC_PYTHON):
    return (f"no kfac-jax environment at {KFAC_PYTHON}: run `bash benchmarks/setup_kfac.sh` "
            "(or set KFAC_PYTHON)")
  try:
    subprocess.run([KFAC_PYTHON, "-c", "import kfac_jax"], check=True, capture_output=True,
                   timeout=120)
  except (subprocess.SubprocessError, OSError) as e:
    return f"kfac-jax does not import in {KFAC_PYTHON}: {e}"
  return ""


def run_kfac(task: harness.Task, sizes, lr: float, seed: int, steps: int,
             budget, eval_every: int, data_dir: str) -> dict:
  cfg = {"task": task.name, "sizes": list(sizes), "loss": task.loss, "data_dir": data_dir,
         "batch_size": task.batch_size, "lr": lr, "seed": seed, "steps": steps,
         "time_budget_s": budget, "eval_every": eval_every, "loss_target": task.loss_target,
         "acc_target": task.acc_target, "damping": 1e-2,
         "linear_layers": linear_layers(task)}
  with tempfile.TemporaryDirectory() as tmp:
    cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "rec.json")
    with open(cfg_path, "w") as f:
      json.dump(cfg, f)
    # The same cap on jaxlib's LAPACK threads as in this process (benchmarks/__init__.py).
    env = dict(os.environ, JAX_PLATFORMS="cpu", OPENBLAS_NUM_THREADS=OPENBLAS_CAP)
    proc = subprocess.run([KFAC_PYTHON, os.path.join(HERE, "kfac_runner.py"), "--config",
                           cfg_path, "--out", out_path], capture_output=True, text=True,
                          env=env, timeout=3600)
    if proc.returncode != 0:
      raise RuntimeError(f"kfac_runner failed: {proc.stderr[-2000:]}")
    with open(out_path) as f:
      return json.load(f)


def mlp_sizes(task: harness.Task):
  """Widths after the input for kfac_runner, or None for non-MLP tasks."""
  model = task.model
  if hasattr(model, "sizes"):
    return list(model.sizes)
  if task.name == "autoencoder":
    w = list(model.widths)
    return w + w[-2::-1] + [task.x_train.shape[1]]
  return None


def linear_layers(task: harness.Task):
  """Indices of the layers with no ReLU after them (the code and the output of the AE)."""
  if task.name == "autoencoder":
    n = len(task.model.widths)
    return [n - 1, 2 * n - 1]
  return None


def update_readme() -> str:
  """Rewrites the old suite's tables (``benchmarks/results/suite.md``) from results/*.json.

  The suite predates the protocol of ``benchmarks/README.md`` (its grids are two points, its
  defaults were chosen on its MLPs); :mod:`benchmarks.evaluate` is the protocol's runner.
  """
  lines = [MARK_START, ""]
  order = {name: i for i, name in enumerate(tasks.TASKS)}
  # Only the suite's task files: results/ also holds other benchmarks' JSON (profile, ...).
  files = sorted((f for f in glob.glob(os.path.join(RESULTS, "*.json"))
                  if os.path.basename(f)[:-5] in order),
                 key=lambda f: order[os.path.basename(f)[:-5]])
  for path in files:
    with open(path) as f:
      res = json.load(f)
    name, m, a = os.path.basename(path)[:-5], res["machine"], res["args"]
    lines += [f"### {name}", "", res["task"] + ".", "",
              f"Measured {m['date']} on {m.get('cpu_model', m['processor'])} "
              f"({m['cpu_count']} cores, load average at start "
              f"{tuple(round(x, 1) for x in m.get('loadavg_at_start', ()))}), JAX {m['jax']}; "
              f"budget {a['budget_s']:g} s of step time per run, {a['seeds']} seed(s); "
              f"learning-rate grids {res['grids']}; median over seeds at each optimizer's "
              "best learning rate (`python3 -m benchmarks.run --tasks " + name + "`).", ""]
    if res["rows"]:
      lines += [report.markdown_table(res["rows"], best_only=True), ""]
      lines += [f"![{name}](results/{name}.png)", ""]
    for n in res["notes"]:
      lines.append(f"- {n}")
    lines.append("")
  lines.append(MARK_END)
  block = "\n".join(lines)
  path = os.path.join(RESULTS, "suite.md")
  text = f"# The old suite (superseded by benchmarks/README.md)\n\n{MARK_START}\n{MARK_END}\n"
  if os.path.exists(path):
    with open(path) as f:
      text = f.read()
  if MARK_START in text and MARK_END in text:
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    text = head + block + tail
  else:
    text += "\n" + block + "\n"
  with open(path, "w") as f:
    f.write(text)
  return block


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", default=",".join(DEFAULT_TASKS))
  p.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS))
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--budget-s", type=float, default=30.0, help="seconds of step time per run")
  p.add_argument("--max-steps", type=int, default=10**7)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--eval-every", type=int, default=500)
  p.add_argument("--lrs", default=None,
                 help="override grids: name=lr:lr,name=lr (e.g. sngd=0.01,adam=0.001:0.003)")
  p.add_argument("--quick", action="store_true", help="1 seed, first lr of each grid, 10 s")
  p.add_argument("--data-dir", default=datasets.DEFAULT_MNIST_DIR)
  p.add_argument("--no-readme", action="store_true", help="do not rewrite benchmarks/README.md")
  p.add_argument("--list", action="store_true")
  args = p.parse_args(argv)
  if args.list:
    print("tasks:", ", ".join(tasks.TASKS))
    print("optimizers:", ", ".join(f"{k} {v}" for k, v in GRIDS.items()))
    return 0
  grids = dict(GRIDS)
  if args.quick:
    args.seeds, args.budget_s = 1, min(args.budget_s, 10.0)
    grids = {k: v[:1] for k, v in grids.items()}
  if args.lrs:
    for item in args.lrs.split(","):
      k, v = item.split("=")
      grids[k] = tuple(float(x) for x in v.split(":"))
  opt_names = args.optimizers.split(",")
  ds = datasets.default_dataset(args.data_dir)
  machine = harness.machine_info()
  kfac_reason = kfac_available() if "kfac_jax" in opt_names else ""
  os.makedirs(RESULTS, exist_ok=True)
  notes = {}
  for task_name in args.tasks.split(","):
    task, why = tasks.build(task_name, ds, args.batch_size)
    if task is None:
      print(f"{task_name}: not run: {why}")
      continue
    notes[task_name] = []
    plan = []
    for name in opt_names:
      if name.startswith("sngd"):
        why = harness.sngd_supports(task)
        if why:
          notes[task_name].append(f"sngd: pending (layer support, issue 4): {why}")
          continue
      elif name == "kfac_jax":
        if kfac_reason:
          notes[task_name].append(f"kfac_jax: not run: {kfac_reason}")
          continue
        if mlp_sizes(task) is None:
          notes[task_name].append("kfac_jax: not run: kfac_runner covers the MLP and "
                                  "autoencoder tasks only")
          continue
      else:
        why = harness.optimizer_available(name)
        if why:
          notes[task_name].append(f"{name}: not run: {why}")
          continue
      for lr in grids[name]:
        for seed in range(args.seeds):
          plan.append((name, lr, seed))
    records = []
    print(f"\n{task.description}: {len(plan)} runs of {args.budget_s:g} s")
    for name, lr, seed in tqdm(plan, desc=task_name, file=sys.stderr):
      try:
        if name == "kfac_jax":
          rec = run_kfac(task, mlp_sizes(task), lr, seed, args.max_steps, args.budget_s,
                         args.eval_every, args.data_dir)
        else:
          rec = harness.train(task, name, lr, seed, args.max_steps, time_budget_s=args.budget_s,
                              eval_every=args.eval_every)
      except Exception as e:  # record the failure, keep the suite going
        notes[task_name].append(f"{name} lr={lr:g} seed={seed}: failed: "
                                f"{type(e).__name__}: {str(e)[:300]}")
        continue
      rec["label"] = name
      records.append(rec)
    rows = report.summarize(records)
    if rows:
      print(report.markdown_table(rows))
      report.plot(records, os.path.join(RESULTS, f"{task_name}.png"), title=task.description)
    for n in notes[task_name]:
      print("  note:", n)
    report.write_json(os.path.join(RESULTS, f"{task_name}.json"), {
        "machine": machine, "task": task.description, "args": vars(args),
        "grids": {k: grids[k] for k in opt_names if k in grids}, "rows": rows,
        "notes": notes[task_name], "runs": records})
  if not args.no_readme:
    update_readme()
    print(f"\nupdated {os.path.join(RESULTS, 'suite.md')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
