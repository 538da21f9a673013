"""Conv statistics before and after ``37dee44``/``00a5f14``: time, memory, compile, in one process.

    python3 -m benchmarks.conv_stats_ab --task cnn       # ~3 min; results/conv_stats_ab_cnn.json
    python3 -m benchmarks.conv_stats_ab --task resnet-bn

"Before" is the library's ``conv.py`` at ``ce11dca`` (one strided slice per kernel offset,
concatenated on the channel axis), read with ``git show`` (so a clone with history is needed),
with a conv layer's factor taken as ``x~^T x~`` over the rows ``[patch, 1]``; "after" is the
library as it is (the offsets stacked in fused concatenations; the bias row and column from the
patches' sums, ``statistics._gram_with_ones_column``). Both are swapped in with ``mock.patch``
in one process, compiled, then called round robin:

- ``layers``: each conv layer's batch estimate alone (``statistics.batch_factor`` under
  ``jit``, one batch), median ms of ``--layer-rounds`` calls, compiled temporary memory, and
  the largest difference of the two factors;
- ``step``: the whole ``sngd_momentum`` training step, with statistics on every step and at
  the defaults, median ms of ``--rounds`` steps, compiled temporary memory, the factors'
  largest relative difference after those steps;
- ``compile``: seconds to compile the default step, ``--compile-rounds`` interleaved rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import types
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag, LAPACK cap)
import sngd_jax
from benchmarks import eval_tasks, evaluate, harness
from sngd_jax._src import conv as conv_new
from sngd_jax._src import statistics

BEFORE = "ce11dca"
HERE = os.path.dirname(os.path.abspath(__file__))


def old_conv_module() -> types.ModuleType:
  """``sngd_jax/_src/conv.py`` as it was at ``BEFORE``, as a module."""
  src = subprocess.run(["git", "show", f"{BEFORE}:sngd_jax/_src/conv.py"], cwd=HERE,
                       check=True, capture_output=True, text=True).stdout
  module = types.ModuleType("conv_before")
  exec(compile(src, f"conv.py@{BEFORE}", "exec"), module.__dict__)
  return module


def _gram_before(x, m):
  mx = x if m is None else m[:, None] * x
  return mx.T @ x


def variant(name: str, old: types.ModuleType):
  if name == "after":
    return contextlib.nullcontext()
  stack = contextlib.ExitStack()
  stack.enter_context(mock.patch.object(conv_new, "patches", old.patches))
  stack.enter_context(mock.patch.object(statistics, "_gram_with_ones_column", _gram_before))
  return stack


def layers(task, old, rounds: int) -> dict:
  xs = jnp.asarray(task.x_train[:task.batch_size])
  ys = jnp.asarray(task.y_train[:task.batch_size])
  pre = sngd_jax.sngd()
  params, extra, _, _ = evaluate.init_run(task, pre, optax.sgd(0.1), 0, jnp.asarray(task.x_train))
  grad = jax.value_and_grad(sngd_jax.capture(evaluate._loss_fn(task), has_aux=True), has_aux=True)
  (_, (_, acts)), g = grad(params, extra, xs, ys)
  specs = sngd_jax.discover(g)
  comp = {}
  for path, spec in specs.items():
    calls = acts[path]
    if not any(c.kind == "conv" for c in calls):
      continue
    for v in ("before", "after"):
      with variant(v, old):
        c = jax.jit(lambda calls, spec=spec: statistics.batch_factor(spec, calls)).lower(
            calls).compile()
      comp[path, v] = (c, calls, c.memory_analysis().temp_size_in_bytes / 1e6)
  outs = {k: np.asarray(c(calls)) for k, (c, calls, _) in comp.items()}
  times = {k: [] for k in comp}
  for _ in range(rounds):
    for k, (c, calls, _) in comp.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(calls))
      times[k].append(time.perf_counter() - t0)
  res = {}
  for path in sorted({p for p, _ in comp}):
    o, n = outs[path, "before"], outs[path, "after"]
    res[path] = {f"{v}_ms": float(np.median(times[path, v])) * 1e3 for v in ("before", "after")}
    res[path].update({f"{v}_temp_mb": comp[path, v][2] for v in ("before", "after")})
    res[path]["max_rel_diff"] = float(np.abs(o - n).max() / np.abs(o).max())
  return res


def _make_step(task, pre, post):
  grad = jax.value_and_grad(sngd_jax.capture(evaluate._loss_fn(task), has_aux=True), has_aux=True)

  def step(params, extra, s_pre, s_post, xs, ys, idx):
    (loss, (extra, acts)), g = grad(params, extra, xs[idx], ys[idx])
    u, s_pre = pre.update(g, s_pre, params, activations=acts)
    u, s_post = post.update(u, s_post, params)
    return optax.apply_updates(params, u), extra, s_pre, s_post, loss

  return jax.jit(step, donate_argnums=(0, 1, 2, 3))


def steps(task, old, rounds: int, compile_rounds: int) -> dict:
  xs, ys = jnp.asarray(task.x_train), jnp.asarray(task.y_train)
  idx0 = jnp.arange(task.batch_size)
  configs = {"statistics every step": {"factor_every": 1, "inverse_every": 10**9},
             "defaults": {}}
  compiled, state, temp = {}, {}, {}
  for cname, kw in configs.items():
    for v in ("before", "after"):
      name = f"{cname}/{v}"
      pre, post = sngd_jax.sngd(**kw), optax.with_extra_args_support(evaluate._SGDM(0.03))
      params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
      with variant(v, old):
        c = _make_step(task, pre, post).lower(params, extra, s_pre, s_post, xs, ys,
                                              idx0).compile()
      temp[name] = c.memory_analysis().temp_size_in_bytes / 1e6
      compiled[name], state[name] = c, [params, extra, s_pre, s_post]
  rng = np.random.default_rng(0)
  times = {n: [] for n in compiled}
  for _ in range(rounds + 1):
    idx = jnp.asarray(rng.integers(0, len(xs), task.batch_size))
    for n, c in compiled.items():
      t0 = time.perf_counter()
      out = c(*state[n], xs, ys, idx)
      jax.block_until_ready(out[4])
      times[n].append(time.perf_counter() - t0)
      state[n] = list(out[:4])
  diffs = {}
  for cname in configs:
    fo = jax.tree.leaves(state[f"{cname}/before"][2].factors)
    fn = jax.tree.leaves(state[f"{cname}/after"][2].factors)
    diffs[cname] = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
                       for a, b in zip(fo, fn, strict=True))
  seconds = {"before": [], "after": []}
  pre, post = sngd_jax.sngd(), optax.with_extra_args_support(evaluate._SGDM(0.03))
  params, extra, s_pre, s_post = evaluate.init_run(task, pre, post, 0, xs)
  for _ in range(compile_rounds):
    for v in seconds:
      jax.clear_caches()
      with variant(v, old):
        lowered = _make_step(task, pre, post).lower(params, extra, s_pre, s_post, xs, ys, idx0)
      t0 = time.perf_counter()
      lowered.compile()
      seconds[v].append(time.perf_counter() - t0)
  return {"step_ms_median": {n: float(np.median(t[1:])) * 1e3 for n, t in times.items()},
          "temp_mb": temp, "factors_max_rel_diff_after_steps": diffs,
          "compile_s": seconds,
          "compile_s_median": {k: float(np.median(v)) for k, v in seconds.items()}}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--task", default="cnn")
  p.add_argument("--layer-rounds", type=int, default=300)
  p.add_argument("--rounds", type=int, default=60)
  p.add_argument("--compile-rounds", type=int, default=3)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  jax.config.update("jax_enable_compilation_cache", False)
  old = old_conv_module()
  task = eval_tasks.EVAL_TASKS[args.task](30.0)
  res = {"machine": harness.machine_info(), "command": " ".join(sys.argv), "before": BEFORE,
         "task": args.task, "layers": layers(task, old, args.layer_rounds)}
  res.update(steps(task, old, args.rounds, args.compile_rounds))
  res["loadavg_at_end"] = list(os.getloadavg())
  out = args.out or os.path.join(HERE, "results", f"conv_stats_ab_{args.task}.json")
  with open(out, "w") as f:
    json.dump(res, f, indent=1)
  print(json.dumps({k: v for k, v in res.items() if k != "machine"}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
