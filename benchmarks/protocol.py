"""The parts of the benchmark protocol that every runner shares (numpy only).

Kept free of JAX and Flax so that :mod:`benchmarks.kfac_runner` can use it from
its own virtual environment (an older JAX): the same minibatch order, the same
EMA of the train loss and the same record fields mean the runs are comparable.
"""

from __future__ import annotations

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
