"""Early-training stability of the factor priors (the choice of `sngd(prior=...)`).

    python3 -m benchmarks.prior_stability            # ~12 minutes on 2 CPU cores

Trains MLPs on the default data set (Fashion-MNIST when installed, else digits),
batch 128, `chain(sngd(prior=P, max_norm=M), sgd(lr, momentum=0.9))` with every
other argument at its default, for each prior, trust-region radius (`None` =
off, `1.0` = the default) and learning rate, and records the EMA train loss
(0.98) at a few step counts. Writes
`benchmarks/results/prior_stability.json` and `.md` (date, machine, versions).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from benchmarks import datasets

SHAPES = {"784-80x6-10": (80,) * 6, "784-256-256-10": (256, 256)}
PRIORS = ("identity", "scaled_identity", "none")
MAX_NORMS = (None, 1.0)
MARKS = (20, 50, 100, 200, 400, 1000)


class MLP(nn.Module):
  widths: tuple

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(10)(x)


def ema_losses(widths, prior, max_norm, lr, steps, x, y, seed=0):
  model = MLP(widths)
  params = model.init(jax.random.key(seed), x[:1])["params"]
  loss_fn = lambda p, xb, yb: optax.softmax_cross_entropy_with_integer_labels(
      model.apply({"params": p}, xb), yb).mean()
  tx = optax.chain(sngd_jax.sngd(prior=prior, max_norm=max_norm), optax.sgd(lr, momentum=0.9))

  def body(carry, key):
    p, s, ema = carry
    idx = jax.random.randint(key, (128,), 0, x.shape[0])
    (loss, acts), g = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(
        p, x[idx], y[idx])
    u, s = tx.update(g, s, p, activations=acts)
    ema = jnp.where(ema < 0, loss, 0.98 * ema + 0.02 * loss)
    return (optax.apply_updates(p, u), s, ema), ema

  keys = jax.random.split(jax.random.key(seed + 1), steps)
  _, emas = jax.jit(lambda p, s: jax.lax.scan(body, (p, s, -1.0), keys))(
      params, tx.init(params))
  return np.asarray(emas)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--lrs", default="0.01,0.03,0.1")
  ap.add_argument("--steps", type=int, default=1000)
  args = ap.parse_args(argv)
  ds = datasets.default_dataset()
  x = jnp.asarray(ds.x_train.reshape(len(ds.x_train), -1), jnp.float32)
  y = jnp.asarray(ds.y_train, jnp.int32)
  marks = [m for m in MARKS if m <= args.steps]
  rows = []
  for shape, widths in SHAPES.items():
    for prior in PRIORS:
      for max_norm in MAX_NORMS:
        for lr in [float(v) for v in args.lrs.split(",")]:
          emas = ema_losses(widths, prior, max_norm, lr, args.steps, x, y)
          row = {"model": shape, "prior": prior, "max_norm": max_norm, "lr": lr,
                 "ema_loss": {m: float(emas[m - 1]) for m in marks},
                 "finite": bool(np.isfinite(emas).all())}
          rows.append(row)
          print(shape, prior, max_norm, lr, np.round(emas[[m - 1 for m in marks]], 3),
                flush=True)
  meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
          "jax": jax.__version__, "dataset": ds.name, "batch": 128, "momentum": 0.9}
  out_dir = os.path.join(os.path.dirname(__file__), "results")
  with open(os.path.join(out_dir, "prior_stability.json"), "w") as f:
    json.dump({"meta": meta, "rows": rows}, f, indent=1)
  lines = [f"# Prior stability ({meta['date']}, {meta['machine']}, jax {meta['jax']}, "
           f"{meta['dataset']}, batch 128, SGD momentum 0.9, other sngd args default)", "",
           "EMA train loss (0.98) after N steps; `nan` = diverged.", "",
           "| model | prior | max_norm | lr | " + " | ".join(f"{m} steps" for m in marks) + " |",
           "| --- | --- | --- | --- | " + " | ".join("---" for _ in marks) + " |"]
  for r in rows:
    lines.append(f"| {r['model']} | `{r['prior']}` | {r['max_norm']} | {r['lr']} | " + " | ".join(
        f"{r['ema_loss'][m]:.3f}" for m in marks) + " |")
  with open(os.path.join(out_dir, "prior_stability.md"), "w") as f:
    f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
