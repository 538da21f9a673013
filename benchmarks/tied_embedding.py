"""Tied embeddings: the table preconditioned by both local Fishers, by one, or by none.

    python3 -m benchmarks.tied_embedding            # ~10 min on 2 cores
    python3 -m benchmarks.tied_embedding --steps 150 --seeds 3

The small character transformer of ``examples/transformer_lm.py`` (Zen of
Python), its output layer tied to the token embedding (``nn.Embed.attend``) or
an untied ``Dense``. Configurations, each on its own 5-point learning-rate
grid, 3 seeds, interleaved in one process (every configuration and rate of a
seed before the next seed):

- ``sngd_momentum`` on the tied model with ``fisher={"Embed_0": "tied"}``
  (both local Fishers: ``(D + rho I)^{-1} g_E (G_h + rho I)^{-1}``), with
  ``fisher={"Embed_0": None}`` (the table passes through to SGD momentum), and
  on the untied model;
- ``sngd_adam`` tied (``"tied"``) and untied; Adam tied and untied.

Reported: the mean training loss of the last 20 steps (median over seeds) at
each configuration's best rate (marked when at a grid edge), and the loss of
each rate. A design check of the ``"tied"`` option on the example it ships
with (no default was chosen here); not the protocol's evaluation set.
Writes ``benchmarks/results/tied_embedding.json``.

``--no-trust-region`` instead runs ``sngd_momentum`` tied and untied with and
without the trust region (``max_norm=None``) on one seed and three rates
(``results/tied_embedding_no_trust_region.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import harness
from examples import transformer_lm as lm

HERE = os.path.dirname(os.path.abspath(__file__))
SGD_GRID = (0.01, 0.03, 0.1, 0.3, 1.0)
ADAM_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
TIED = {"Embed_0": "tied"}


def configs():
  """name -> (tied model?, learning-rate grid, optimizer from a rate)."""
  adam = lambda lr: optax.with_extra_args_support(optax.adam(lr))
  return {
      "sngd_momentum, tied ('tied')": (True, SGD_GRID,
                                       lambda lr: sngd_jax.sngd_momentum(lr, fisher=TIED)),
      "sngd_momentum, tied (table passes through)": (
          True, SGD_GRID, lambda lr: sngd_jax.sngd_momentum(lr, fisher={"Embed_0": None})),
      "sngd_momentum, untied": (False, SGD_GRID, sngd_jax.sngd_momentum),
      "sngd_adam, tied ('tied')": (True, ADAM_GRID,
                                   lambda lr: sngd_jax.sngd_adam(lr, fisher=TIED)),
      "sngd_adam, untied": (False, ADAM_GRID, sngd_jax.sngd_adam),
      "adam, tied": (True, ADAM_GRID, adam),
      "adam, untied": (False, ADAM_GRID, adam),
  }


def run(tied: bool, tx, steps: int, seed: int, context: int = 64, batch: int = 32) -> float:
  """Mean training loss of the last 20 of ``steps`` steps."""
  chars = sorted(set(lm.TEXT))
  data = np.array([chars.index(c) for c in lm.TEXT], np.int32)
  model = lm.TransformerLM(len(chars), context, tied=tied)
  params = model.init(jax.random.key(seed), jnp.zeros((1, context), jnp.int32))["params"]

  def loss_fn(p, tokens, targets):
    logits = model.apply({"params": p}, tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  step = harness.make_step(loss_fn, tx, wants_acts=True)
  whole = jnp.arange(batch)  # make_step indexes its batch: here every row
  state, stream, losses = tx.init(params), lm.text_batches(data, context, batch, seed), []
  for _ in range(steps):
    tokens, targets = next(stream)
    params, state, loss = step(params, state, jnp.asarray(tokens), jnp.asarray(targets), whole)
    losses.append(float(loss))
  tail = float(np.mean(losses[-20:]))
  return tail if np.isfinite(tail) else float("inf")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--steps", type=int, default=150)
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--out", default=None)
  p.add_argument("--no-trust-region", action="store_true")
  args = p.parse_args(argv)
  t0 = time.time()
  if args.no_trust_region:
    return _trust_region_check(args, t0)
  args.out = args.out or os.path.join(HERE, "results", "tied_embedding.json")
  losses: dict[str, dict[str, list[float]]] = {
      name: {str(lr): [] for lr in grid} for name, (_, grid, _) in configs().items()}
  for seed in range(args.seeds):
    for name, (tied, grid, make) in configs().items():
      for lr in grid:
        losses[name][str(lr)].append(run(tied, make(lr), args.steps, seed))
      print(f"seed {seed} {name}: " + ", ".join(
          f"{lr} {losses[name][str(lr)][-1]:.3f}" for lr in grid), flush=True)
  rows = []
  for name, (_, grid, _) in configs().items():
    med = {lr: float(np.median(losses[name][str(lr)])) for lr in grid}
    best = min(grid, key=lambda lr: med[lr])
    rows.append({"config": name, "best_lr": best, "edge": best in (grid[0], grid[-1]),
                 "median_loss": med[best], "per_lr_median": {str(k): v for k, v in med.items()},
                 "per_seed_at_best": losses[name][str(best)]})
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "steps": args.steps, "seeds": args.seeds, "seconds": time.time() - t0,
               "rows": rows, "losses": losses}, f, indent=1)
  print(f"\n{args.steps} steps, {args.seeds} seeds: mean training loss of the last 20 steps "
        "(median over seeds) at the best rate\n")
  print("| configuration | best lr | loss | per seed |\n|---|---|---|---|")
  for r in rows:
    lr = f"{r['best_lr']:g}" + (" (grid edge)" if r["edge"] else "")
    seeds = ", ".join(f"{v:.3f}" for v in r["per_seed_at_best"])
    print(f"| {r['config']} | {lr} | {r['median_loss']:.3f} | {seeds} |")
  print(f"\nwrote {args.out}")
  return 0


def _trust_region_check(args, t0) -> int:
  out = args.out or os.path.join(HERE, "results", "tied_embedding_no_trust_region.json")
  rows = []
  print("| lr | tied | tied, max_norm=None | untied | untied, max_norm=None |\n"
        "|---|---|---|---|---|")
  for lr in (0.03, 0.1, 0.3):
    row = {"lr": lr}
    for name, tied, kw in (("tied", True, {"fisher": TIED}),
                           ("tied, max_norm=None", True, {"fisher": TIED, "max_norm": None}),
                           ("untied", False, {}),
                           ("untied, max_norm=None", False, {"max_norm": None})):
      row[name] = run(tied, sngd_jax.sngd_momentum(lr, **kw), args.steps, 0)
    rows.append(row)
    print(f"| {lr:g} | " + " | ".join(f"{v:.3g}" for k, v in row.items() if k != "lr") + " |",
          flush=True)
  with open(out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv),
               "steps": args.steps, "seed": 0, "seconds": time.time() - t0, "rows": rows}, f,
              indent=1)
  print(f"\nwrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
