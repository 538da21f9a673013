"""The parts of the benchmark protocol that every runner shares (numpy only).

Kept free of JAX and Flax so that :mod:`benchmarks.kfac_runner` can use it from
its own virtual environment (an older JAX): the same minibatch order, the same
EMA of the train loss and the same record fields mean the runs are comparable.
"""

from __future__ import annotations

import time

import numpy as np

EMA_DECAY = 0.99


def batches(n: int, batch_size: int, seed: int):
  """Endless minibatch index arrays: a fresh permutation every epoch (numpy RNG)."""
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(n).astype(np.int32)
    for i in range(0, n - batch_size + 1, batch_size):
      yield perm[i:i + batch_size]


def batch_seed(seed: int) -> int:
  """The minibatch-order seed of a run with initialization seed ``seed``."""
  return seed + 1000


class EMA:
  """Bias-corrected exponential moving average (decay :data:`EMA_DECAY`)."""

  def __init__(self, decay: float = EMA_DECAY):
    self.decay, self.total, self.weight = decay, 0.0, 0.0

  def update(self, value: float) -> float:
    self.total = self.decay * self.total + (1 - self.decay) * value
    self.weight = self.decay * self.weight + (1 - self.decay)
    return self.total / self.weight


def first_crossing(values, target, below=True):
  """Index of the first finite value <= target (>= if not ``below``), or None."""
  for i, v in enumerate(values):
    if v is not None and np.isfinite(v) and (v <= target if below else v >= target):
      return i
  return None


def finish_record(record: dict, losses, times, emas, evals, metric: str) -> dict:
  """Fills the summary fields of a run record from its per-step series."""
  cum = np.cumsum(times)
  record.update({
      "steps": len(losses),
      "median_step_s": float(np.median(times[1:] if len(times) > 1 else times)),
      "wall_s": float(cum[-1]) if len(cum) else 0.0,
      "final_ema_loss": emas[-1] if emas else None,
      "final_metric": evals[-1]["metric"], "final_test_loss": evals[-1]["loss"],
      "metric": metric, "evals": evals,
  })
  target = record.get("loss_target")
  i = first_crossing(emas, target) if target is not None else None
  record["steps_to_loss"] = None if i is None else i + 1
  record["wall_to_loss"] = None if i is None else float(cum[i])
  record["steps_to_acc"] = record["wall_to_acc"] = None
  acc_target = record.get("acc_target")
  if acc_target is not None:
    below = metric != "accuracy"
    for e in evals:
      if (e["metric"] <= acc_target) if below else (e["metric"] >= acc_target):
        record["steps_to_acc"], record["wall_to_acc"] = e["step"], e["wall"]
        break
  keep = np.unique(np.linspace(0, len(losses) - 1, min(400, len(losses))).astype(int))
  record["curve"] = {"step": (keep + 1).tolist(), "wall": cum[keep].tolist(),
                     "ema_loss": [emas[i] for i in keep]}
  return record


# --------------------------------------------------------------------------------------
# The phases of a task: tune (seed 0, grids extended at an edge), then the other seeds
# --------------------------------------------------------------------------------------

LR_STEP = 10.0 ** 0.5
"""Ratio between neighbouring points of a learning-rate grid."""


def run_summary(times, evals: list, reached, compile_s: float) -> dict:
  """The timing and target fields of a run's record, shared by every runner.

  ``times``: each step's wall time (s); ``evals``: ``{"step", "wall", "metric"}`` dicts in
  order; ``reached(metric)``: whether a metric meets the target. The first step (which may
  include a late compile or a first-touch of buffers) is left out of the step statistics;
  ``wall_to_target_with_compile`` adds the step's compile time."""
  arr = np.asarray(times, dtype=float)
  reach = next((e for e in evals if e["metric"] is not None and reached(e["metric"])), None)
  return {
      "steps": len(arr), "wall_s": float(arr.sum()),
      "median_step_ms": float(np.median(arr[1:]) * 1e3) if len(arr) > 1 else None,
      "mean_step_ms": float(arr[1:].mean() * 1e3) if len(arr) > 1 else None,
      "steps_to_target": reach["step"] if reach else None,
      "wall_to_target": reach["wall"] if reach else None,
      "wall_to_target_with_compile": (reach["wall"] + compile_s) if reach else None,
  }


def format_run(r: dict) -> str:
  """One line per finished run, as the runners print them."""
  ms = r["median_step_ms"] if r["median_step_ms"] is not None else float("nan")
  line = (f"  {r['optimizer']:>14} lr={r['lr']:<8.3g} seed={r['seed']} steps={r['steps']:6d} "
          f"{ms:.2f} ms/step compile {r['compile_s']:.1f}s final "
          f"{r['final_metric']} to-target {r['wall_to_target']} ({r['steps_to_target']} steps)")
  if r.get("clipped_frac_first1000") is not None:
    line += f" clipped {r['clipped_frac_first1000']:.2f}/{r['mean_scale_first1000']:.2f}"
  if r.get("minor_faults_median") is not None:
    line += f" faults/step {r['minor_faults_median']:.0f}"
  return line


def interleave(gens: list, turn_s: float = 0.25) -> list:
  """Runs generators round robin, about ``turn_s`` seconds each per turn; returns their
  return values (each run's record) in order."""
  records: list = [None] * len(gens)
  active = list(range(len(gens)))
  while active:
    for i in list(active):
      t0 = time.perf_counter()
      try:
        while time.perf_counter() - t0 < turn_s:
          next(gens[i])
      except StopIteration as stop:
        records[i] = stop.value
        active.remove(i)
  return records


def score(record: dict, higher_is_better: bool) -> tuple:
  """Sort key among one optimizer's learning rates: fewest steps to the target, then the
  best final metric; not reached: the best final metric; diverged last. (The step cost does
  not depend on the lr, so steps rank the grid as step time would, and unlike step time they
  are not changed by machine load that differs between the grid and extension batches.)"""
  r = record
  if r["diverged"] or r["final_metric"] is None:
    return (2, 0.0, 0.0)
  final = -r["final_metric"] if higher_is_better else r["final_metric"]
  if r["steps_to_target"] is not None:
    return (0, r["steps_to_target"], final)
  return (1, final, 0.0)


def tune_and_seed(name: str, opts, seeds: int, grids: dict, higher_is_better: bool,
                  run_batch, max_extend: int):
  """The protocol's phases for one task; ``run_batch(plan)`` runs a list of
  ``(optimizer, lr, seed)`` interleaved and returns their records.

  Returns ``(records, best)``: every run's record and each optimizer's best lr."""
  records = []
  tried = {o: sorted(grids[o]) for o in opts}
  plan = [(o, lr, 0) for o in opts for lr in tried[o]]
  print(f"{name}: tuning {len(plan)} runs", flush=True)
  records += run_batch(plan)
  best = {}
  for ext in range(max_extend + 1):
    more = []
    for o in opts:
      rs = [r for r in records if r["optimizer"] == o and r["seed"] == 0]
      b = min(rs, key=lambda r: score(r, higher_is_better))
      best[o] = b["lr"]
      if ext == max_extend:
        continue
      lrs = sorted(r["lr"] for r in rs)
      if len(lrs) < 2:  # a single point (a reference run): nothing to extend
        continue
      if b["lr"] == lrs[0]:
        more.append((o, float(f"{lrs[0] / LR_STEP:.3g}"), 0))
      elif b["lr"] == lrs[-1]:
        more.append((o, float(f"{lrs[-1] * LR_STEP:.3g}"), 0))
    if not more:
      break
    print(f"{name}: extending grids {[(o, lr) for o, lr, _ in more]}", flush=True)
    records += run_batch(more)
  plan = [(o, best[o], s) for o in opts for s in range(1, seeds)]
  if plan:
    print(f"{name}: seeds {len(plan)} runs", flush=True)
    records += run_batch(plan)
  return records, best
