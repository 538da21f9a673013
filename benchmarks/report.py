"""Tables, plots and JSON for benchmark records (see :mod:`benchmarks.harness`)."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np


def _fmt(x, spec=".3f", none="-"):
  if x is None or (isinstance(x, float) and not np.isfinite(x)):
    return none
  return format(x, spec)


def summarize(records: Sequence[dict]) -> list[dict]:
  """Median over seeds per (task, optimizer label, lr); ratios to Adam's best in the task.

  Returns one row per (task, label, lr) with medians of: step time, final EMA
  loss, final metric, wall and steps to the targets (a target counts as
  reached in the median only if more than half of the seeds reached it).
  """
  groups: dict[tuple, list[dict]] = {}
  for r in records:
    groups.setdefault((r["task"], r.get("label", r["optimizer"]), r["lr"]), []).append(r)
  rows = []
  for (task, label, lr), rs in groups.items():
    def med(key, rs=rs):
      vals = [r[key] for r in rs]
      if sum(v is not None for v in vals) * 2 <= len(vals):
        return None
      # An unreached target is +inf in the median.
      return float(np.median([np.inf if v is None else v for v in vals]))
    rows.append({
        "task": task, "label": label, "lr": lr, "seeds": len(rs),
        "median_step_s": med("median_step_s"), "final_ema_loss": med("final_ema_loss"),
        "final_metric": med("final_metric"), "metric": rs[0]["metric"],
        "steps": med("steps"), "wall_s": med("wall_s"),
        "steps_to_loss": med("steps_to_loss"), "wall_to_loss": med("wall_to_loss"),
        "steps_to_acc": med("steps_to_acc"), "wall_to_acc": med("wall_to_acc"),
        "state_bytes": rs[0]["state_bytes"], "param_bytes": rs[0]["param_bytes"],
        "diverged": sum(r["diverged"] for r in rs),
        "loss_target": rs[0]["loss_target"], "acc_target": rs[0]["acc_target"],
    })
  for task in {r["task"] for r in rows}:
    adam = [r for r in rows if r["task"] == task and r["label"] == "adam"
            and r["median_step_s"] is not None]
    ref = float(np.median([r["median_step_s"] for r in adam])) if adam else None
    best_adam = best_of(adam)
    for r in rows:
      if r["task"] != task:
        continue
      r["step_ratio_to_adam"] = (r["median_step_s"] / ref) if ref and r["median_step_s"] else None
      bw = best_adam["wall_to_loss"] if best_adam else None
      r["wall_to_loss_ratio_to_adam"] = (
          r["wall_to_loss"] / bw if bw and r["wall_to_loss"] is not None
          and np.isfinite(r["wall_to_loss"]) else None)
  return rows


def best_of(rows: Sequence[dict]) -> Optional[dict]:
  """The row that reaches the loss target fastest, else the lowest final EMA loss."""
  rows = [r for r in rows if r["final_ema_loss"] is not None]
  if not rows:
    return None
  reached = [r for r in rows if r["wall_to_loss"] is not None and np.isfinite(r["wall_to_loss"])]
  if reached:
    return min(reached, key=lambda r: r["wall_to_loss"])
  return min(rows, key=lambda r: r["final_ema_loss"])


def markdown_table(rows: Sequence[dict], best_only: bool = False) -> str:
  """A markdown table; with ``best_only`` one row per (task, label): its best lr."""
  if best_only:
    by = {}
    for r in rows:
      by.setdefault((r["task"], r["label"]), []).append(r)
    rows = [best_of(v) for v in by.values() if best_of(v)]
  head = ("| task | optimizer | lr | seeds | steps run | step ms | x Adam | final EMA loss "
          "| test metric "
          "| s to loss target | steps to loss target | x Adam (time) | s to test target "
          "| opt. state MB |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in sorted(rows, key=lambda r: (r["task"], r["label"], r["lr"])):
    metric = r["final_metric"]
    nan_note = f" (NaN in {r['diverged']})" if r["diverged"] else ""
    mname = {"accuracy": "acc", "bpc": "bpc", "loss": "loss"}[r["metric"]]
    lines.append(
        f"| {r['task']} | {r['label']} | {r['lr']:g} | {r['seeds']} "
        f"| {_fmt(r['steps'], '.0f')} "
        f"| {_fmt(r['median_step_s'] and r['median_step_s'] * 1e3, '.2f')} "
        f"| {_fmt(r.get('step_ratio_to_adam'), '.2f')} "
        f"| {_fmt(r['final_ema_loss'], '.4f')}{nan_note} "
        f"| {mname} {_fmt(metric, '.4f')} "
        f"| {_fmt(r['wall_to_loss'], '.1f', 'not reached')} "
        f"| {_fmt(r['steps_to_loss'], '.0f', '-')} "
        f"| {_fmt(r.get('wall_to_loss_ratio_to_adam'), '.2f')} "
        f"| {_fmt(r['wall_to_acc'], '.1f', 'not reached')} "
        f"| {r['state_bytes'] / 2**20:.2f} |")
  return "\n".join(lines)


def plot(records: Sequence[dict], path: str, title: str = "") -> None:
  """Two panels: EMA train loss vs steps and vs wall time (one line per run)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  labels = sorted({(r.get("label", r["optimizer"]), r["lr"]) for r in records})
  colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
  seen = set()
  for r in records:
    key = (r.get("label", r["optimizer"]), r["lr"])
    c = r["curve"]
    lab = f"{key[0]} lr={key[1]:g}" if key not in seen else None
    seen.add(key)
    axes[0].plot(c["step"], c["ema_loss"], color=colors[key], label=lab, lw=1.2)
    axes[1].plot(c["wall"], c["ema_loss"], color=colors[key], lw=1.2)
  target = records[0].get("loss_target") if records else None
  for ax, xl in zip(axes, ["step", "wall time of steps (s)"], strict=True):
    ax.set_yscale("log")
    ax.set_xlabel(xl)
    ax.set_ylabel("EMA train loss")
    ax.grid(True, which="both", alpha=0.3)
    if target:
      ax.axhline(target, color="k", ls="--", lw=0.8)
  axes[0].legend(fontsize=8)
  fig.suptitle(title)
  fig.tight_layout()
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write_json(path: str, payload: dict) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=float)
