"""What every example shares: the command line, the data, and the loss printout."""

from __future__ import annotations

import argparse
from typing import Iterator, Optional

import numpy as np


def parse_args(description: str, steps: int, argv: Optional[list[str]] = None,
               **extra: tuple[type, object]) -> argparse.Namespace:
  """``--steps N`` (optimizer steps), ``--seed``, and ``extra`` options ``name=(type, default)``."""
  parser = argparse.ArgumentParser(description=description)
  parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
  parser.add_argument("--seed", type=int, default=0)
  for name, (kind, default) in extra.items():
    parser.add_argument(f"--{name.replace('_', '-')}", dest=name, type=kind, default=default)
  return parser.parse_args(argv)


def image_data():
  """Fashion-MNIST from the local IDX files, else scikit-learn's 8x8 digits (no download)."""
  from benchmarks.datasets import default_dataset
  return default_dataset()


def batches(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int
            ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Endless random batches (a fresh permutation every epoch)."""
  rng = np.random.default_rng(seed)
  while True:
    perm = rng.permutation(len(y))
    for i in range(0, len(y) - batch_size + 1, batch_size):
      idx = perm[i:i + batch_size]
      yield x[idx], y[idx]


def log(step: int, steps: int, loss: float, **metrics: float) -> None:
  """Prints ``step N loss X`` (the line tests/test_examples.py reads), about ten times a run."""
  if steps <= 20 or step % max(1, steps // 10) == 0 or step == steps - 1:
    extra = "".join(f" {k} {v:.3f}" for k, v in metrics.items())
    print(f"step {step} loss {loss:.4f}{extra}", flush=True)
