"""How far the default preconditioned gradient is from the exact damped inverse, per layer.

    python3 -m benchmarks.approx_quality                          # every model
    python3 -m benchmarks.approx_quality --tasks cnn --steps 300 --at 1,100,300

Along one training trajectory (``sngd_momentum(lr)`` with every default), two
shadow ``sngd`` transforms see the same gradients and activations:

* **default**: ``sngd(max_norm=None)``, the defaults' factors, schedule and
  inverse methods (rank-128 Nystrom above ``d = 512``), without the trust-region
  scale (which changes the length, not the direction, of all layers at once);
* **stale exact**: ``sngd(inverse="cholesky", max_norm=None)``, the same
  schedule with dense factors and exact inverses.

At the chosen steps the exact preconditioned gradient
``u* = (G + (damping tr G) I)^{-1} g`` is computed in float64 NumPy from the dense
factor ``G`` in use *now* (the stale-exact shadow's running average), and each
layer reports, for both shadows, the relative error ``||u - u*|| / ||u*||`` and the
cosine ``<u, u*> / (||u|| ||u*||)``. The default's error is the Nystrom
approximation plus the staleness of the cached inverse (refreshed every
``inverse_every`` steps); the stale-exact column isolates the staleness.

Writes ``benchmarks/results/approx_quality.json`` and ``approx_quality.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401
import sngd_jax
from benchmarks import eval_tasks, evaluate, harness
from benchmarks.protocol import batch_seed, batches
from sngd_jax._src import precondition
from sngd_jax._src.transform import _flatten

HERE = os.path.dirname(os.path.abspath(__file__))


def _task(name):
  if name in eval_tasks.EVAL_TASKS:
    return eval_tasks.EVAL_TASKS[name](1.0)
  shape, _, prep = name.partition("/")
  return eval_tasks.mlp(shape, prep or "pixel")


def measure(task, lr: float, steps: int, at: list[int], seed: int = 0) -> list[dict]:
  loss_fn = evaluate._loss_fn(task)
  grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
  main = sngd_jax.sngd_momentum(lr)
  shadow_default = sngd_jax.sngd(max_norm=None)
  shadow_exact = sngd_jax.sngd(inverse="cholesky", max_norm=None)

  @jax.jit
  def step(params, extra, s_main, s_def, s_ex, x, y):
    (loss, (extra, acts)), g = grad_fn(params, extra, x, y)
    u, s_main = main.update(g, s_main, params, activations=acts)
    u_def, s_def = shadow_default.update(g, s_def, params, activations=acts)
    u_ex, s_ex = shadow_exact.update(g, s_ex, params, activations=acts)
    return optax.apply_updates(params, u), extra, s_main, s_def, s_ex, loss, g, u_def, u_ex

  xs, ys = task.x_train, task.y_train
  kw = {"train": True} if task.train_arg else {}
  variables = task.model.init(jax.random.PRNGKey(seed), jnp.asarray(xs[:2]), **kw)
  params = variables["params"]
  extra = {"batch_stats": variables["batch_stats"]} if task.batch_stats else {}
  s_main, s_def, s_ex = main.init(params), shadow_default.init(params), shadow_exact.init(params)
  specs = sngd_jax.discover(params)
  sampler = batches(len(xs), task.batch_size, batch_seed(seed))
  rows = []
  for t in range(1, steps + 1):
    idx = next(sampler)
    params, extra, s_main, s_def, s_ex, loss, g, u_def, u_ex = step(
        params, extra, s_main, s_def, s_ex, jnp.asarray(xs[idx]), jnp.asarray(ys[idx]))
    if t not in at:
      continue
    leaves, _, index = _flatten(g)
    d_leaves, _, _ = _flatten(u_def)
    e_leaves, _, _ = _flatten(u_ex)
    state = s_ex
    for path, spec in specs.items():
      if spec.structure == "diagonal":
        continue  # embeddings: the exact diagonal in every configuration
      G = np.asarray(state.factors[path], np.float64) / float(state.weights[path])
      gg = np.asarray(precondition.augmented(spec, leaves, index, jnp.float32), np.float64)
      ud = np.asarray(precondition.augmented(spec, d_leaves, index, jnp.float32), np.float64)
      ue = np.asarray(precondition.augmented(spec, e_leaves, index, jnp.float32), np.float64)
      blocks = G.reshape((-1,) + G.shape[-2:])
      d = blocks.shape[-1]
      shift = 1e-4 * np.trace(blocks, axis1=1, axis2=2)
      if spec.per_unit:  # column j with block j
        ustar = np.stack([np.linalg.solve(blocks[j] + shift[j] * np.eye(d), gg[:, j])
                          for j in range(gg.shape[1])], axis=1)
      else:
        ustar = np.linalg.solve(blocks[0] + shift[0] * np.eye(d), gg)
      def err(u, ustar=ustar):
        n = np.linalg.norm(ustar)
        return (float(np.linalg.norm(u - ustar) / n),
                float(np.sum(u * ustar) / (np.linalg.norm(u) * n)))
      e_def, c_def = err(ud)
      e_ex, c_ex = err(ue)
      method = sngd_jax.inverse.METHODS["auto"].info(d).name if not spec.per_unit else \
          "cholesky (per unit)"
      rows.append({"task": task.name, "step": t, "layer": path, "d": d, "out": spec.out_dim,
                   "method": method, "rel_err_default": e_def, "cos_default": c_def,
                   "rel_err_stale_exact": e_ex, "cos_stale_exact": c_ex,
                   "loss": float(loss)})
    print(f"{task.name} step {t}: " + "; ".join(
        f"{r['layer']} ({r['method']}, d={r['d']}) {r['rel_err_default']:.3f}/"
        f"{r['cos_default']:.3f}" for r in rows if r["step"] == t), flush=True)
  return rows


def table(rows) -> str:
  lines = ["| task | layer | d x O | method | step | rel. error default | cosine default | "
           "rel. error stale exact | cosine stale exact |", "|" + "---|" * 9]
  for r in rows:
    lines.append(f"| {r['task']} | {r['layer']} | {r['d']} x {r['out']} | {r['method']} | "
                 f"{r['step']} | {r['rel_err_default']:.3f} | {r['cos_default']:.3f} | "
                 f"{r['rel_err_stale_exact']:.3f} | {r['cos_stale_exact']:.3f} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", default="mlp-256-256/pixel,mlp-256-256/01,cnn,resnet-bn,"
                                    "autoencoder,char-lstm,transformer")
  p.add_argument("--lr", type=float, default=0.01)
  p.add_argument("--steps", type=int, default=500)
  p.add_argument("--at", default="1,50,99,101,300,500")
  p.add_argument("--out", default=os.path.join(HERE, "results", "approx_quality"))
  args = p.parse_args(argv)
  at = [int(a) for a in args.at.split(",")]
  rows = []
  machine = harness.machine_info()
  for name in args.tasks.split(","):
    rows += measure(_task(name), args.lr, args.steps, at)
    with open(args.out + ".json", "w") as f:  # after every task: partial results survive
      json.dump({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, f,
                indent=1)
    with open(args.out + ".md", "w") as f:
      f.write(f"Command: `{' '.join(sys.argv)}`\n\n" + table(rows) + "\n")
  print(table(rows))
  return 0


if __name__ == "__main__":
  sys.exit(main())
