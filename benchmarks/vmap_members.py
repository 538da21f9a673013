"""A caller's ``jax.vmap`` over the SNGD step: cost per member against a member alone.

    python3 -m benchmarks.vmap_members --members 4 --rounds 5

An ensemble (or several seeds) trained in one program vmaps the whole step. ``lax.cond``
with a batched predicate runs both branches, so the statistics (due one step in
``factor_every``) and the refresh (one in ``inverse_every``) would run on every step for
every member; the library's ``control.schedule_cond`` keeps them conditional. Variants, each
compiled once, then timed in interleaved rounds of ``--steps`` steps (each round's mean
step, which counts the round's statistics and refresh steps, and its median step; the
medians over rounds are reported):

* ``alone``: one member's jitted ``sngd_momentum`` step;
* ``vmap``: ``jax.jit(jax.vmap(step))`` over ``--members`` members (the library);
* ``vmap-lax-cond``: the same with the library's two schedule conditionals replaced by
  ``lax.cond`` (what the step did before ``schedule_cond``; traced with the replacement).

The model is the MLP 784-256-256-10 on random inputs, batch 128 (refresh groups: the
785-wide input layer's rank-128 Nystrom model, two 257-wide Cholesky blocks). Writes
``benchmarks/results/vmap_members.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (LAPACK cap)
import sngd_jax
from benchmarks import harness
from sngd_jax._src import control

HERE = os.path.dirname(os.path.abspath(__file__))


class MLP(nn.Module):
  widths: tuple = (256, 256)

  @nn.compact
  def __call__(self, x):
    for w in self.widths:
      x = nn.relu(nn.Dense(w)(x))
    return nn.Dense(10)(x)


def _plain_cond(pred, true_fn, false_fn, operand):
  return jax.lax.cond(pred, true_fn, false_fn, operand)


def measure(members: int, steps: int, rounds: int, widths=(256, 256), batch: int = 128,
            d_in: int = 784):
  model = MLP(widths)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, d_in)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 10, batch))
  tx = sngd_jax.sngd_momentum(0.01)

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                           y).mean()

  def step(p, s):
    (loss, acts), g = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(p)
    u, s = tx.update(g, s, p, activations=acts)
    return optax.apply_updates(p, u), s, loss

  ps = jax.vmap(lambda k: model.init(k, x)["params"])(
      jax.random.split(jax.random.key(0), members))
  ss = jax.vmap(tx.init)(ps)
  p1 = jax.tree.map(lambda a: a[0], ps)
  s1 = tx.init(p1)
  variants = {"alone": (jax.jit(step), (p1, s1))}
  variants["vmap"] = (jax.jit(jax.vmap(step)), (ps, ss))
  with mock.patch.object(control, "schedule_cond", _plain_cond):
    f = jax.jit(jax.vmap(step))
    f.lower(ps, ss)  # traced here, with plain lax.cond; the call below reuses the trace
    variants["vmap-lax-cond"] = (f, (ps, ss))
  states, compile_s = {}, {}
  for name, (f, args) in variants.items():
    t0 = time.perf_counter()
    out = f(*args)
    jax.block_until_ready(out)
    compile_s[name] = time.perf_counter() - t0
    states[name] = out[:2]
  means: dict[str, list[float]] = {name: [] for name in variants}
  medians: dict[str, list[float]] = {name: [] for name in variants}
  for _ in range(rounds):
    for name, (f, _) in variants.items():
      ts = []
      for _ in range(steps):
        t0 = time.perf_counter()
        out = f(*states[name])
        jax.block_until_ready(out)
        ts.append(time.perf_counter() - t0)
        states[name] = out[:2]
      means[name].append(1e3 * float(np.mean(ts)))
      medians[name].append(1e3 * float(np.median(ts)))
  return {"members": members, "steps_per_round": steps, "rounds": rounds,
          "widths": list(widths), "batch": batch,
          "first_call_s": compile_s,
          "ms_mean": {k: float(np.median(v)) for k, v in means.items()},
          "ms_median": {k: float(np.median(v)) for k, v in medians.items()},
          "ms_mean_rounds": means, "ms_median_rounds": medians}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--members", type=int, default=4)
  p.add_argument("--steps", type=int, default=100, help="steps per round (100: one refresh)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=os.path.join(HERE, "results", "vmap_members.json"))
  a = p.parse_args(argv)
  r = measure(a.members, a.steps, a.rounds)
  mean, med = r["ms_mean"], r["ms_median"]
  with open(a.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(sys.argv), **r}, f,
              indent=1)
  print(f"| variant | ms/step, mean / median (median of {a.rounds} rounds of {a.steps}) "
        "| mean per member | first call s |")
  print("|---|---|---|---|")
  for k in mean:
    n = 1 if k == "alone" else a.members
    print(f"| {k} | {mean[k]:.2f} / {med[k]:.2f} | {mean[k] / n:.2f} | "
          f"{r['first_call_s'][k]:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
