"""On an accelerator: the preconditioning products at ``precision=HIGHEST`` (the library's
choice) against the backend's default precision (issue 16, item 7).

    python3 -m benchmarks.gpu --tasks cnn,resnet-bn,transformer --out DIR

For each evaluation task, with ``sngd_adam``'s parts (``sngd()`` then Adam at the task's best
learning rate from the CPU evaluation, :data:`LRS`):

* **Numbers.** After ``K`` steps at the library's precision, one more update (the refresh step
  ``K = inverse_every``, which rebuilds every inverse, and the next, which only applies them)
  is computed from the same state and batch at both precisions; per layer and over the whole
  update: the relative error ``||u_default - u_highest|| / ||u_highest||`` and the cosine.
* **Speed.** Compile time, and the median ms/step of the whole jitted training step at each
  precision and of Adam alone, in alternating blocks of :data:`BLOCK` steps (the same process,
  the same batches).
* **The switch is checked**: the number of ``HIGHEST`` dot/conv precisions in each step's
  StableHLO is recorded. On CPU none remain at the default precision; on the H200 one or two
  did, from how JAX lowers its own linear algebra there (benchmarks/README.md, *On a GPU*).

The products are switched by rebinding ``sngd_jax._src.dtypes.HIGHEST`` while the step is
traced (this process only). Writes ``gpu_precision.json`` and prints a table. Time to target
on the accelerator is ``benchmarks.evaluate`` with ``--lrs`` at these learning rates
(benchmarks/README.md, *On a GPU*).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from benchmarks import eval_tasks, evaluate

# The one constant every product of sngd reads at trace time; `conv.py`'s patch extraction
# does not (a convolution with a 0/1 kernel that must copy its inputs exactly).
PRODUCT_PRECISION = ("sngd_jax._src.dtypes", "HIGHEST")

# Best learning rates of the CPU evaluation (benchmarks/README.md, Rerun 7 and the
# transformer's extended grid), per task.
LRS = {
    "cnn": {"sngd": 0.0316, "sngd-adam": 0.00316, "adam": 0.00316},
    "resnet-bn": {"sngd": 0.1, "sngd-adam": 0.01, "adam": 0.00316},
    "transformer": {"sngd": 0.316, "sngd-adam": 0.00316, "adam": 0.00316},
}
TASKS = {"cnn": eval_tasks.cnn, "resnet-bn": eval_tasks.resnet_bn,
         "transformer": eval_tasks.transformer}
BLOCK = 25


@contextlib.contextmanager
def products_at(precision):
  """Traces inside this block use ``precision`` for the preconditioning products."""
  module_name, name = PRODUCT_PRECISION
  module = importlib.import_module(module_name)
  old = getattr(module, name)
  setattr(module, name, precision)
  try:
    yield
  finally:
    setattr(module, name, old)


def count_highest(text: str) -> int:
  """Dot/conv ops of a StableHLO text whose precision config is ``HIGHEST``."""
  return text.count("precision = [HIGHEST")


def _update_fn(task, pre):
  loss_fn = evaluate._loss_fn(task)
  grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)

  def upd(params, extra, s_pre, x, y):
    (_, (_, acts)), g = grad_fn(params, extra, x, y)
    u, _ = pre.update(g, s_pre, params, activations=acts)
    return u

  return jax.jit(upd)


def _errors(a, b):
  na = np.linalg.norm(a)
  return {"rel_err": float(np.linalg.norm(b - a) / max(na, 1e-30)),
          "cos": float(a @ b / max(na * np.linalg.norm(b), 1e-30))}


def _compare(u_ref, u):
  rows, refs, lows = {}, [], []
  pairs = zip(jax.tree_util.tree_leaves_with_path(u_ref), jax.tree.leaves(u), strict=True)
  for (path, a), b in pairs:
    refs.append(np.asarray(a, np.float64).ravel())
    lows.append(np.asarray(b, np.float64).ravel())
    rows[jax.tree_util.keystr(path)] = _errors(refs[-1], lows[-1])
  worst = max(rows.values(), key=lambda r: r["rel_err"])
  return {"total": _errors(np.concatenate(refs), np.concatenate(lows)), "worst_layer": worst,
          "layers": rows}


def _compiled_step(task, opt, lr, xs, ys, idx):
  """``opt``'s jitted training step on ``task``, its first arguments, and its compile seconds."""
  pre, post = evaluate.OPTIMIZERS[opt](lr)
  post = optax.with_extra_args_support(post)
  args = evaluate.init_run(task, pre, post, 0, xs)
  step = evaluate.make_step(task, pre, post)
  t0 = time.perf_counter()
  step.lower(*args, xs, ys, idx).compile()
  return step, args, time.perf_counter() - t0


def measure(name: str, steps: int, timed_blocks: int):
  task = TASKS[name](30.0)
  lr = LRS[name]["sngd-adam"]
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  sampler = evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0))
  idxs = [next(sampler) for _ in range(steps + 2 + BLOCK * timed_blocks)]
  out = {"task": name, "lr": lr, "steps_before": steps}

  modes = {"highest": jax.lax.Precision.HIGHEST, "default": jax.lax.Precision.DEFAULT}
  fns, upds = {}, {}
  pre, post = evaluate.OPTIMIZERS["sngd-adam"](lr)
  post = optax.with_extra_args_support(post)
  args0 = evaluate.init_run(task, pre, post, 0, xs)
  for mode, prec in modes.items():
    with products_at(prec):
      step = evaluate.make_step(task, pre, post)
      lowered = step.lower(*args0, xs, ys, idxs[0])
      t0 = time.perf_counter()
      lowered.compile()
      out[f"compile_s_{mode}"] = time.perf_counter() - t0
      out[f"highest_ops_{mode}"] = count_highest(lowered.as_text())
      fns[mode] = step
      upds[mode] = _update_fn(task, pre)
      upds[mode].lower(args0[0], args0[1], args0[2], xs[idxs[0]], ys[idxs[0]]).compile()

  # `lower` fills each jit's trace cache, so the calls below, outside `products_at`, run the
  # traces made inside it (one trace per function: checked in benchmarks/test_gpu.py).
  # K steps at the library's precision, then one update from the same state at each.
  params, extra, s_pre, s_post = jax.tree.map(jnp.copy, args0)
  for t in range(steps):
    params, extra, s_pre, s_post, loss, _ = fns["highest"](params, extra, s_pre, s_post,
                                                          xs, ys, idxs[t])
  out["loss_at_K"] = float(loss)
  for label, extra_steps in (("refresh_step", 0), ("apply_step", 1)):
    p, e, sp, so = params, extra, s_pre, s_post
    if extra_steps:
      p, e, sp, so = jax.tree.map(jnp.copy, (p, e, sp, so))
      p, e, sp, so, _, _ = fns["highest"](p, e, sp, so, xs, ys, idxs[steps])
    x, y = xs[idxs[steps + 1]], ys[idxs[steps + 1]]
    ref = upds["highest"](p, e, sp, x, y)
    low = upds["default"](p, e, sp, x, y)
    out[label] = _compare(ref, low)
    out[label]["count"] = int(sp.count) if hasattr(sp, "count") else None

  # Speed: whole steps, alternating blocks; Adam alone as the reference.
  a_step, a_args, out["compile_s_adam"] = _compiled_step(task, "adam", LRS[name]["adam"], xs,
                                                          ys, idxs[0])
  states = {m: jax.tree.map(jnp.copy, (params, extra, s_pre, s_post)) for m in modes}
  states["adam"] = a_args
  fns["adam"] = a_step
  times = {m: [] for m in states}
  for m in states:  # one untimed call each
    st = fns[m](*states[m], xs, ys, idxs[0])
    jax.block_until_ready(st)
    states[m] = st[:4]
  i = 0
  for _ in range(timed_blocks):
    for m in states:
      for _ in range(BLOCK):
        t0 = time.perf_counter()
        st = fns[m](*states[m], xs, ys, idxs[i % len(idxs)])
        float(st[4])
        times[m].append(time.perf_counter() - t0)
        states[m] = st[:4]
        i += 1
  for m, ts in times.items():
    out[f"ms_median_{m}"] = 1e3 * float(np.median(ts))
    out[f"ms_mean_{m}"] = 1e3 * float(np.mean(ts))
  return out


def compile_order(name: str, order):
  """Compile seconds of each optimizer's step on ``name``, compiled in ``order`` in one
  process. On the H200 the first *SNGD* step of a process took 10-15 s more than a second
  one, whatever was compiled before it (benchmarks/README.md, *On a GPU*)."""
  task = TASKS[name](30.0)
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  idx = next(evaluate.batches(len(task.x_train), task.batch_size, evaluate.batch_seed(0)))
  out = []
  for opt in order:
    _, _, seconds = _compiled_step(task, opt, LRS[name][opt], xs, ys, idx)
    out.append({"task": name, "optimizer": opt, "compile_s": seconds})
    print(f"{name} {opt} compile {out[-1]['compile_s']:.1f} s", flush=True)
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tasks", default="cnn,resnet-bn,transformer")
  p.add_argument("--steps", type=int, default=None,
                 help="steps before the compared update (default: inverse_every)")
  p.add_argument("--timed-blocks", type=int, default=8)
  p.add_argument("--out", default=evaluate.OUT)
  p.add_argument("--compile-order", default=None,
                 help="only compile times, in this order, e.g. adam,sngd-adam,sngd")
  a = p.parse_args(argv)
  if a.compile_order:
    recs = []
    for name in a.tasks.split(","):
      recs += compile_order(name, a.compile_order.split(","))
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_compile_order.json"), "w") as f:
      json.dump({"device": str(jax.devices()[0].device_kind), "jax": jax.__version__,
                 "order": a.compile_order, "records": recs}, f, indent=1)
    return 0
  steps = a.steps or sngd_jax.DEFAULTS.inverse_every
  dev = jax.devices()[0]
  results = {"device": f"{dev.platform}: {getattr(dev, 'device_kind', '?')}",
             "jax": jax.__version__, "host": platform.node(), "tasks": []}
  print(results["device"], "jax", jax.__version__, flush=True)
  print("| task | compile s highest / default / adam | ms/step median highest / default / adam "
        "| refresh step: rel err (worst layer) | apply step: rel err (worst layer) "
        "| HIGHEST ops highest / default |", flush=True)
  for name in a.tasks.split(","):
    r = measure(name, steps, a.timed_blocks)
    results["tasks"].append(r)
    print(f"| {name} | {r['compile_s_highest']:.1f} / {r['compile_s_default']:.1f} / "
          f"{r['compile_s_adam']:.1f} | {r['ms_median_highest']:.2f} / "
          f"{r['ms_median_default']:.2f} / {r['ms_median_adam']:.2f} | "
          f"{r['refresh_step']['total']['rel_err']:.1e} "
          f"({r['refresh_step']['worst_layer']['rel_err']:.1e}) | "
          f"{r['apply_step']['total']['rel_err']:.1e} "
          f"({r['apply_step']['worst_layer']['rel_err']:.1e}) | "
          f"{r['highest_ops_highest']} / {r['highest_ops_default']} |", flush=True)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "gpu_precision.json"), "w") as f:
      json.dump(results, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
