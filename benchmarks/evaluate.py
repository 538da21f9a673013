"""The evaluation protocol (benchmarks/README.md, *Protocol*): tune, then 3 seeds, interleaved.

    python3 -m benchmarks.evaluate --tasks cnn --optimizers sngd,adam     # one task
    python3 -m benchmarks.evaluate --tasks cnn --probe                    # step/compile probe
    python3 -m benchmarks.evaluate --report                               # tables from JSON

Per task:

1. **Tuning** (seed 0): every optimizer runs every point of its log-spaced
   learning-rate grid (:data:`GRIDS`, 5 points a factor ~3.16 apart, containing
   the optimizer's recommended value); all these runs are interleaved in one
   process (round robin, ~0.25 s of steps a turn). An optimizer's best learning
   rate is the one reaching the test target in the fewest steps (ties: the better
   final metric), else the best final test metric. If it is the lowest or
   highest point tried, the grid is extended by one point on that side and the
   new runs are interleaved likewise, up to ``--max-extend`` times.
2. **Seeds**: seeds 1 and 2 at each optimizer's best learning rate, interleaved.

Every run has the same budget of step time (the task's ``budget_s``; compile
and evaluation excluded) and the same initialization and minibatch order per
seed. The learning rate is a state entry (``optax.inject_hyperparams``), so each
(task, optimizer) is compiled once and every run of it reports that compile
time. A record holds: compile time (``jit(step).lower(...).compile()``),
per-step times, the test-subset metric every ``eval_every`` steps, the final
metric on the whole test set, the XLA executable's memory (arguments without
the training data, outputs, temporaries), the median minor page faults of a
step, and for SNGD the trust-region scale of every :data:`DIAG_EVERY`-th step
(:func:`sngd_jax.trust_region_scale`, from the update itself; see
:func:`make_step` for why not every step).

Writes ``benchmarks/results/eval/<task>.json``; ``--report`` writes
``benchmarks/results/eval/summary.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import resource
import sys
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import benchmarks  # noqa: F401  (XLA flag and LAPACK thread cap, before JAX work)
import sngd_jax
from benchmarks import eval_tasks, harness, protocol
from benchmarks.protocol import batch_seed, batches, interleave

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "results", "eval")


# --------------------------------------------------------------------------------------
# Optimizers: name -> builder(lr) -> (sngd part or None, the rest)
# --------------------------------------------------------------------------------------

def graft(base: optax.GradientTransformation) -> optax.GradientTransformation:
  """Layer-wise grafting: the direction of the incoming update, the norm of ``base``'s.

  ``base`` (e.g. Adam) runs on the *raw* gradients passed as ``extra_args['grads']``;
  each leaf's output is ``-||base(g)|| * u / ||u||`` (Agarwal et al., 2020): ``u`` is a
  preconditioned gradient (an ascent direction), ``base(g)`` an optax update (descent).
  """
  def init(params):
    return base.init(params)

  def update(updates, state, params=None, *, grads, **extra):
    del extra
    b, state = base.update(grads, state, params)
    def one(u, bu):
      nu = jnp.linalg.norm(u)
      return jnp.where(nu > 0, -u * (jnp.linalg.norm(bu) / jnp.maximum(nu, 1e-30)), bu)
    return jax.tree.map(one, updates, b), state

  return optax.GradientTransformationExtraArgs(init, update)


def _inj(opt, **kw):
  """``opt(learning_rate=lr, **kw)`` with the learning rate a state entry, so that one
  compiled step serves every point of a grid (same numbers as a constant lr)."""
  return lambda lr: optax.inject_hyperparams(opt)(learning_rate=lr, **kw)


_SGDM = _inj(optax.sgd, momentum=0.9)
_ADAM = _inj(optax.adam)


def _psgd_kron(lr):
  """PSGD-Kron, ``psgdax.kron(lr, b1=0.9)`` with kron's other defaults, written as kron's own
  chain (``scale_by_kron``, then the lr) so that the lr can be a state entry
  (``inject_hyperparams(kron)`` cannot trace kron's Python branches). The same updates as
  ``kron`` (``test_benchmarks_smoke``); ``scale_by_kron``'s own default initial scale is 1,
  kron's is None (set from the first gradients), hence the explicit argument."""
  from psgdax import scale_by_kron  # optional: pip install psgdax
  with contextlib.redirect_stdout(io.StringIO()):  # it prints its state sizes
    kron = scale_by_kron(b1=0.9, preconditioner_init_scale=None)
  # A plain GradientTransformation: its update takes no extra arguments (``grads=``).
  return optax.chain(optax.GradientTransformation(kron.init, kron.update), _inj(optax.sgd)(lr))


def _scale(lr):
  """``optax.scale(lr)`` with ``lr`` a state entry (for a peer built with learning rate 1)."""
  return optax.inject_hyperparams(optax.scale)(step_size=lr)


def _precondition_shampoo():
  """google-research's Distributed Shampoo module (``pip install precondition-opt``).

  Its last release (0.3.0, 2023) calls ``jax.tree_map`` and its siblings, which JAX has
  since removed; they are aliased to the ``jax.tree`` functions they were before importing
  it (this process only: the benchmark's, never the library's).
  """
  for name in ("map", "leaves", "flatten", "unflatten", "structure"):
    try:
      getattr(jax, "tree_" + name)
    except AttributeError:
      setattr(jax, "tree_" + name, getattr(jax.tree, name))
  from precondition import distributed_shampoo  # optional: pip install precondition-opt
  return distributed_shampoo


SHAMPOO_SETTINGS = {"block_size": 128, "preconditioning_compute_steps": 10}
"""Distributed Shampoo's settings beside its defaults: the block size its docstring
recommends ("use 128 as default"), the preconditioner recomputed every 10 steps (its
default, 1, is "ideal" but costs an inverse p-th root of every block each step), and
grafting to RMSProp's normalized step (set in :func:`_shampoo`), which puts its learning
rate on Adam's scale as in the AlgoPerf JAX Shampoo baseline."""


def _shampoo(lr):
  """Distributed Shampoo (Anil et al. 2020) at :data:`SHAMPOO_SETTINGS`, written as the
  optimizer at learning rate 1 followed by ``scale(lr)``: the same updates as
  ``distributed_shampoo(lr, ...)`` (its learning rate multiplies the final update;
  ``benchmarks/test_peers.py``), with the lr a state entry."""
  ds = _precondition_shampoo()
  return optax.chain(
      ds.distributed_shampoo(1.0, graft_type=ds.GraftingType.RMSPROP_NORMALIZED,
                             **SHAMPOO_SETTINGS),
      _scale(lr))


def muon_dimensions(params):
  """Which leaves Muon orthogonalizes, and as which matrix: every ``kernel`` of two or more
  axes, its input axes against its output axes (a conv kernel ``(kh, kw, c_in, c_out)`` as
  ``(kh kw c_in) x c_out``; an attention projection ``(d, heads, head_dim)`` as
  ``d x (heads head_dim)``, its output ``(heads, head_dim, d)`` as ``(heads head_dim) x d``).
  Embeddings, biases and norm scales go to Muon's Adam (``None``), as Muon's authors
  recommend for the non-matrix and embedding parameters."""
  def one(path, leaf):
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if names[-1] != "kernel" or leaf.ndim < 2:
      return None
    n_in = 2 if (leaf.ndim == 3 and len(names) > 1 and names[-2] == "out") else leaf.ndim - 1
    if leaf.ndim == 3 and len(names) > 1 and names[-2] in ("query", "key", "value"):
      n_in = 1
    return optax.contrib.MuonDimensionNumbers(
        reduction_axis=tuple(range(n_in)), output_axis=tuple(range(n_in, leaf.ndim)))
  return jax.tree_util.tree_map_with_path(one, params)


def _muon(lr):
  """Muon (optax.contrib) with ``consistent_rms=0.2`` (Liu et al. 2025: updates scaled to
  AdamW's RMS, so that one learning rate on Adam's scale serves the matrices and Muon's Adam
  for the rest), the kernels of :func:`muon_dimensions`, otherwise its defaults; learning
  rate 1 followed by ``scale(lr)`` (the same updates, ``benchmarks/test_peers.py``)."""
  return optax.chain(
      optax.contrib.muon(1.0, consistent_rms=0.2,
                         muon_weight_dimension_numbers=muon_dimensions),
      _scale(lr))


def _sngd(**kw):
  return lambda lr: (sngd_jax.sngd(**kw), _SGDM(lr))


def _abl(**changes):
  """The paper preset (linear Fisher everywhere) with ``changes``, plain SGD on top."""
  return lambda lr: (sngd_jax.sngd(**{**sngd_jax.presets.paper(rfim=False), **changes}),
                     _inj(optax.sgd)(lr))


OPTIMIZERS: dict[str, Callable[[float], tuple[Any, Any]]] = {
    # sngd_jax.sngd_momentum(lr, momentum=0.9) with every default, split in its two parts
    # (the same numbers) so that the trust-region scale can be read from sngd's output.
    "sngd": _sngd(),
    "sngd-warmup": _sngd(inverse_warmup=True),
    "sngd-inv20": _sngd(inverse_every=20),
    # The early-phase lead (issue 16): a factor that is not mostly prior at the first
    # refreshes. `prior="none"` is the bias-corrected average of batch estimates only;
    # decay 0.9 lets the scaled-identity prior fade ~4x faster than 0.975.
    "sngd-none-wu": _sngd(prior="none", inverse_warmup=True),
    "sngd-d90-wu": _sngd(decay=0.9, inverse_warmup=True),
    "sngd-adam-none-wu": lambda lr: (sngd_jax.sngd(prior="none", inverse_warmup=True),
                                     _ADAM(lr)),
    # The rank of the Nystrom model of layers above 512 inputs (issue 16 item 4), with Adam.
    # (`auto(...)` is cached: the seed runs reuse the grid's compiled step.)
    "sngd-adam-r64": lambda lr: (sngd_jax.sngd(inverse=sngd_jax.inverse.auto(rank=64)),
                                 _ADAM(lr)),
    "sngd-adam-r256": lambda lr: (sngd_jax.sngd(inverse=sngd_jax.inverse.auto(rank=256)),
                                  _ADAM(lr)),
    "sngd-adam-chol": lambda lr: (sngd_jax.sngd(inverse="cholesky"), _ADAM(lr)),
    "sngd-notr": _sngd(max_norm=None),
    "sngd-tr3": _sngd(max_norm=3.0),
    "sngd-chol": _sngd(inverse="cholesky"),
    "sngd-sub32": _sngd(stats_batch_size=32),  # statistics from 32 examples of the batch
    "sngd-adam": lambda lr: (sngd_jax.sngd(), _ADAM(lr)),
    "sngd-adam-notr": lambda lr: (sngd_jax.sngd(max_norm=None), _ADAM(lr)),
    "sngd-graft": lambda lr: (sngd_jax.sngd(), graft(_ADAM(lr))),
    "sngd-paper": _abl(),  # the paper preset as it is (the ablation's first row)
    # The ablation from the paper preset to the defaults, one change at a time (linear
    # local Fisher everywhere, as the preset's rfim=False variant; plain SGD on top until the
    # last step, which is `sngd`: the same configuration with momentum 0.9).
    "abl-paper": _abl(),
    "abl-tr": _abl(max_norm=1.0),
    "abl-amortized": _abl(max_norm=1.0, decay=0.975, factor_every=5),
    "abl-prior": _abl(max_norm=1.0, decay=0.975, factor_every=5, prior="scaled_identity"),
    "abl-auto": _abl(max_norm=1.0, decay=0.975, factor_every=5, prior="scaled_identity",
                     inverse="auto"),
    "adam": lambda lr: (None, _ADAM(lr)),
    "adamw": lambda lr: (None, _inj(optax.adamw, weight_decay=1e-4)(lr)),
    "sgd": lambda lr: (None, _SGDM(lr)),
    "psgd-kron": lambda lr: (None, _psgd_kron(lr)),
    "shampoo": lambda lr: (None, _shampoo(lr)),
    "muon": lambda lr: (None, _muon(lr)),
}

# Five log-spaced points, a factor sqrt(10) apart, each containing the recommended value
# (Adam 1e-3; SGD momentum 0.03-0.1; sngd_momentum 0.01-0.03; Adam on SNGD's direction 1e-3).
_SNGD_GRID = (1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1)
_ADAM_GRID = (1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2)
GRIDS = {
    "adam": _ADAM_GRID, "adamw": _ADAM_GRID, "psgd-kron": _ADAM_GRID, "sngd-adam": _ADAM_GRID,
    "shampoo": _ADAM_GRID, "muon": _ADAM_GRID,
    "sngd-adam-notr": _ADAM_GRID, "sngd-graft": _ADAM_GRID, "sngd-adam-none-wu": _ADAM_GRID,
    "sngd-adam-r64": _ADAM_GRID, "sngd-adam-r256": _ADAM_GRID, "sngd-adam-chol": _ADAM_GRID,
    "sgd": (3.16e-3, 1e-2, 3.16e-2, 1e-1, 3.16e-1),
    "sngd-paper": (3.16e-3, 1e-2, 3.16e-2, 1e-1, 3.16e-1),
}
for _name in ("abl-paper", "abl-tr", "abl-amortized", "abl-prior", "abl-auto"):
  GRIDS[_name] = GRIDS["sngd-paper"]
for _name in OPTIMIZERS:
  GRIDS.setdefault(_name, _SNGD_GRID)


# --------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------

def _loss_fn(task: eval_tasks.EvalTask):
  model = task.model
  kw = {"train": True} if task.train_arg else {}

  def loss_fn(params, extra, x, y):
    variables = {"params": params, **extra}
    if task.batch_stats:
      out, new = model.apply(variables, x, mutable=["batch_stats"], **kw)
      new_extra = {"batch_stats": new["batch_stats"]}
    else:
      out, new_extra = model.apply(variables, x, **kw), extra
    if task.loss == "sigmoid_xent":
      loss = optax.sigmoid_binary_cross_entropy(out, y).sum(-1).mean()
    else:
      loss = optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    return loss, new_extra

  return loss_fn


DIAG_EVERY = 10
"""A run computes SNGD's trust-region scale on every ``DIAG_EVERY``-th step only."""


def make_step(task, pre, post, diagnose: bool = False):
  """``(params, extra, s_pre, s_post, xs, ys, idx) -> (..., loss, trust-region scale)``.

  With ``diagnose`` (and an SNGD ``pre``) the step also computes the scale SNGD's trust
  region applied (``sngd_jax.trust_region_scale``); otherwise it returns 1. The diagnostic
  needs the gradients until the whole preconditioned update exists, so they stay live
  across the preconditioning: one more gradient-sized block of temporaries (on the
  autoencoder 23.9 -> 32.5 MiB, over glibc's 32 MiB mmap threshold, so ~8,300 page faults
  a step). :func:`run_steps` therefore runs it on every :data:`DIAG_EVERY`-th step only.
  """
  loss_fn = _loss_fn(task)
  if pre is not None:
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, has_aux=True), has_aux=True)
  else:
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(params, extra, s_pre, s_post, xs, ys, idx):
    x, y = xs[idx], ys[idx]
    if pre is not None:
      (loss, (extra, acts)), g = grad_fn(params, extra, x, y)
      u, s_pre = pre.update(g, s_pre, params, activations=acts)
      scale = (sngd_jax.trust_region_scale(g, s_pre, u) if diagnose
               else jnp.ones((), jnp.float32))
    else:
      (loss, extra), g = grad_fn(params, extra, x, y)
      u, scale = g, jnp.ones((), jnp.float32)
    u, s_post = post.update(u, s_post, params, grads=g)
    return optax.apply_updates(params, u), extra, s_pre, s_post, loss, scale

  return jax.jit(step, donate_argnums=(0, 1, 2, 3), compiler_options=COMPILER_OPTIONS or None)


def make_eval(task: eval_tasks.EvalTask, chunk: int = 500):
  model = task.model
  kw = {"train": False} if task.train_arg else {}

  @jax.jit
  def stats(params, extra, x, y):
    out = model.apply({"params": params, **extra}, x, **kw)
    if task.loss == "sigmoid_xent":
      return optax.sigmoid_binary_cross_entropy(out, y).sum(-1).sum(), jnp.zeros(())
    loss = optax.softmax_cross_entropy_with_integer_labels(out, y)
    correct = (jnp.argmax(out, -1) == y)
    return loss.reshape(x.shape[0], -1).mean(-1).sum(), correct.reshape(x.shape[0], -1).mean(
        -1).sum()

  def evaluate(params, extra, n: Optional[int] = None):
    xs, ys = task.x_test, task.y_test
    n = len(xs) if n is None else min(n, len(xs))
    n = (n // chunk) * chunk or n
    tot_l = tot_c = 0.0
    for i in range(0, n, min(chunk, n)):
      loss, c = stats(params, extra, xs[i:i + chunk], ys[i:i + chunk])
      tot_l += float(loss)
      tot_c += float(c)
    if task.metric == "accuracy":
      return tot_c / n
    if task.metric == "bpc":
      return tot_l / n / math.log(2.0)
    return tot_l / n

  return evaluate


_DATA: dict = {}
_COMPILED: dict = {}
# Compiler options for every optimizer's step (``--compiler-options``), e.g.
# ``{"xla_gpu_enable_triton_gemm": false}`` on a GPU (benchmarks/README.md, *On a GPU*).
COMPILER_OPTIONS: dict = {}
_EVALS: dict = {}


def _device_data(task):
  key = (task.name, id(task.x_train))
  if key not in _DATA:
    _DATA.clear()
    _DATA[key] = (jnp.asarray(task.x_train), jnp.asarray(task.y_train))
  return _DATA[key]


def init_run(task: eval_tasks.EvalTask, pre, post, seed: int = 0, xs=None):
  """The first four arguments of ``make_step(task, pre, post)``'s step for one run.

  Args:
    task: the task (its model, and whether it has BatchNorm statistics or a ``train`` flag).
    pre: the preconditioner (``sngd_jax.sngd(...)``) or None.
    post: the base optimizer, already ``optax.with_extra_args_support``.
    seed: the model's initialization seed.
    xs: the inputs to initialize on (default: the task's training inputs).

  Returns:
    ``(params, extra, s_pre, s_post)``: ``extra`` holds the BatchNorm statistics of a task
    with them (else empty), ``s_pre`` is None without a preconditioner. The optimizer
    states are copied into buffers of their own (the step donates its first four
    arguments, so no leaf may be a buffer that something else still holds).
  """
  xs = jnp.asarray(task.x_train[:2] if xs is None else xs[:2])
  kw = {"train": True} if task.train_arg else {}
  variables = task.model.init(jax.random.PRNGKey(seed), xs, **kw)
  params = variables["params"]
  extra = {"batch_stats": variables["batch_stats"]} if task.batch_stats else {}
  fresh = lambda t: jax.tree.map(lambda a: jnp.array(a, copy=True), t)
  s_pre = fresh(pre.init(params)) if pre is not None else None
  return params, extra, s_pre, fresh(post.init(params))


def run_steps(task: eval_tasks.EvalTask, opt: str, lr: float, seed: int,
              budget_s: Optional[float] = None, max_steps: Optional[int] = None):
  """A generator: one training run, yielding after every step; returns the record."""
  pre, post = OPTIMIZERS[opt](lr)
  post = optax.with_extra_args_support(post)
  xs, ys = _device_data(task)
  params, extra, s_pre, s_post = init_run(task, pre, post, seed, xs)
  state_bytes = harness.tree_bytes(s_post) + (harness.tree_bytes(s_pre) if pre else 0)
  evaluate = _EVALS.setdefault(task.name, make_eval(task))
  sampler = batches(len(task.x_train), task.batch_size, batch_seed(seed))
  idx = next(sampler)
  key = (task.name, opt)
  if key not in _COMPILED:  # one compile per (task, optimizer): the lr is a state entry
    args = (params, extra, s_pre, s_post, xs, ys, idx)
    step_fn = make_step(task, pre, post)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
      compiled = step_fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    diag = None  # the step with the trust-region diagnostic (its compile is not counted)
    if pre is not None:
      diag = make_step(task, pre, post, diagnose=True)
    # The runs call the jitted functions, as training code does, not `compiled`: JAX calls a
    # `Compiled` whose program holds a host callback (the opt-in host refresh; the default
    # in the `_rerun4` and `_rerun5` runs) through a slower Python path (2.6 ms against 0.3 ms
    # a call with 300 arguments: `benchmarks/callback_dispatch.py`). One untimed call each
    # fills their own caches.
    with contextlib.redirect_stdout(io.StringIO()):
      for fn in (step_fn, diag):
        if fn is not None:
          jax.block_until_ready(fn(*jax.tree.map(jnp.copy, args[:4]), *args[4:]))
    _COMPILED[key] = (step_fn, diag, compile_s, compiled.memory_analysis())
  step_fn, diag, compile_s, mem = _COMPILED[key]
  data_bytes = xs.nbytes + ys.nbytes
  exec_bytes = None
  if mem is not None:
    exec_bytes = int(mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes - data_bytes)
  evals = [{"step": 0, "wall": 0.0, "metric": evaluate(params, extra, task.eval_n)}]
  times, losses, scales, faults = [], [], [], []
  wall, diverged, t = 0.0, False, 0
  while True:
    t += 1
    f_start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t_start = time.perf_counter()
    diagnosed = diag is not None and (t - 1) % DIAG_EVERY == 0
    params, extra, s_pre, s_post, loss, scale = (diag if diagnosed else step_fn)(
        params, extra, s_pre, s_post, xs, ys, idx)
    loss = float(loss)
    dt = time.perf_counter() - t_start
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f_start)
    wall += dt
    times.append(dt)
    losses.append(loss)
    if diagnosed:
      scales.append((t, float(scale)))
    idx = next(sampler)
    if not np.isfinite(loss):
      diverged = True
      break
    done = (budget_s is not None and wall >= budget_s) or (max_steps is not None
                                                          and t >= max_steps)
    if t % task.eval_every == 0 or done:
      evals.append({"step": t, "wall": wall, "metric": evaluate(params, extra, task.eval_n)})
    if done:
      break
    yield
  final = evaluate(params, extra) if not diverged else None
  scales_arr = np.asarray([v for _, v in scales])
  early = np.asarray([v for t, v in scales if t <= 1000])
  return {
      "task": task.name, "optimizer": opt, "lr": lr, "seed": seed, "compile_s": compile_s,
      "exec_bytes": exec_bytes, "state_bytes": state_bytes,
      **protocol.run_summary(times, evals, task.reached, compile_s),
      "diverged": diverged, "final_metric": final, "metric": task.metric,
      "target": task.target, "evals": evals,
      # Minor page faults of a step (the whole process's, during the step): XLA:CPU
      # allocates the step's temporaries on every run (docs/performance.md).
      "minor_faults_median": float(np.median(faults[1:])) if len(faults) > 1 else None,
      # The trust-region scale, sampled on every DIAG_EVERY-th step (steps 1, 11, 21, ...).
      "scale_every": DIAG_EVERY if pre else None,
      "clipped_frac_first1000": float(np.mean(early < 1.0 - 1e-6)) if pre else None,
      "mean_scale_first1000": float(np.mean(early)) if pre else None,
      "clipped_frac": float(np.mean(scales_arr < 1.0 - 1e-6)) if pre else None,
      "mean_scale": float(np.mean(scales_arr)) if pre else None,
      "loss_curve": [float(x) for x in losses[:: max(1, len(losses) // 300)]],
  }


def _run_batch(task, plan, budget_s, max_steps):
  """Compiles and runs the (opt, lr, seed) plan interleaved; prints one line per run."""
  gens = []
  for opt, lr, seed in plan:
    g = run_steps(task, opt, lr, seed, budget_s=budget_s, max_steps=max_steps)
    gens.append(g)
  recs = interleave(gens)
  for r in recs:
    print(protocol.format_run(r), flush=True)
  return recs


def tune_and_seed(task, opts, seeds, budget_s, max_steps, max_extend, grids):
  return protocol.tune_and_seed(
      task.name, opts, seeds, grids, task.higher_is_better,
      lambda plan: _run_batch(task, plan, budget_s, max_steps), max_extend)


def probe(task, opts, steps=60):
  """Compile time, ms/step and executable memory of each optimizer (interleaved)."""
  recs = _run_batch(task, [(o, GRIDS[o][2], 0) for o in opts], None, steps)
  return recs


def main(argv=None) -> int:
  global DIAG_EVERY
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tasks", default="cnn,resnet-bn,autoencoder,char-lstm,transformer")
  p.add_argument("--optimizers", default="sngd,adam")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--budget-s", type=float, default=None, help="override each task's budget")
  p.add_argument("--max-steps", type=int, default=None)
  p.add_argument("--max-extend", type=int, default=1)
  p.add_argument("--lrs", default=None, help="override grids: name=lr:lr,...")
  p.add_argument("--probe", action="store_true", help="60 steps per optimizer, no tuning")
  p.add_argument("--diag-every", type=int, default=DIAG_EVERY,
                 help="run SNGD's trust-region diagnostic every N steps (1: every step, as "
                      "before 5cecb4a)")
  p.add_argument("--compiler-options", default=None,
                 help='JSON, for every step\'s jit: \'{"xla_gpu_enable_triton_gemm": false}\'')
  p.add_argument("--tag", default="", help="suffix of the JSON file names")
  p.add_argument("--report", action="store_true")
  p.add_argument("--pattern", default="*.json", help="which results/eval files --report reads")
  p.add_argument("--readme", action="store_true",
                 help="with --report: also write the tables into benchmarks/README.md")
  args = p.parse_args(argv)
  DIAG_EVERY = args.diag_every
  if args.compiler_options:
    COMPILER_OPTIONS.update(json.loads(args.compiler_options))
  if args.report:
    text = report(args.pattern)
    print(text)
    if args.readme:
      _write_readme(text)
    return 0
  grids = dict(GRIDS)
  if args.lrs:
    for item in args.lrs.split(","):
      k, v = item.split("=")
      grids[k] = tuple(float(x) for x in v.split(":"))
  opts = args.optimizers.split(",")
  os.makedirs(OUT, exist_ok=True)
  machine = harness.machine_info()
  for name in args.tasks.split(","):
    budget = args.budget_s
    if name in eval_tasks.EVAL_TASKS:
      task = eval_tasks.EVAL_TASKS[name](budget or 30.0)
    elif name in eval_tasks.HELDOUT_TASKS:
      task = eval_tasks.HELDOUT_TASKS[name](budget or 30.0)
    else:  # a tuning-set MLP: "<shape>/<preprocess>"
      shape, _, prep = name.partition("/")
      task = eval_tasks.mlp(shape, prep or "pixel", budget or 20.0)
    print(f"\n== {task.description}; budget {task.budget_s:g} s, target {task.metric} "
          f"{task.target}; load {os.getloadavg()}", flush=True)
    t0 = time.time()
    if args.probe:
      records, best = probe(task, opts, args.max_steps or 60), {}
    else:
      records, best = tune_and_seed(task, opts, args.seeds, task.budget_s, args.max_steps,
                                    args.max_extend, grids)
    out = os.path.join(OUT, f"{name.replace('/', '_')}{args.tag}.json")
    with open(out, "w") as f:
      json.dump({"machine": machine, "load_at_end": os.getloadavg(),
                 "elapsed_s": time.time() - t0, "command": " ".join(sys.argv),
                 "compiler_options": COMPILER_OPTIONS,
                 "task": dataclasses.asdict(task) | {"model": repr(task.model),
                                                     "x_train": None, "y_train": None,
                                                     "x_test": None, "y_test": None},
                 "grids": {o: grids[o] for o in opts}, "best_lr": best,
                 "runs": records}, f, indent=1, default=float)
    print(f"wrote {out} ({time.time() - t0:.0f} s)", flush=True)
  return 0


# --------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------

def _med(vals):
  """Median with unreached (None) as +inf; None if half or more are unreached."""
  if sum(v is not None for v in vals) * 2 <= len(vals):
    return None
  return float(np.median([np.inf if v is None else v for v in vals]))


def summarize(res: dict) -> list[dict]:
  rows = []
  for opt, lr in res["best_lr"].items():
    rs = [r for r in res["runs"] if r["optimizer"] == opt and r["lr"] == lr]
    metric = [r["final_metric"] for r in rs]
    rows.append({
        "optimizer": opt, "lr": lr, "seeds": len(rs),
        "wall_to_target": _med([r["wall_to_target"] for r in rs]),
        "wall_with_compile": _med([r["wall_to_target_with_compile"] for r in rs]),
        "steps_to_target": _med([r["steps_to_target"] for r in rs]),
        "reached": sum(r["wall_to_target"] is not None for r in rs),
        "final_metric": float(np.median([m for m in metric if m is not None]))
        if any(m is not None for m in metric) else None,
        "median_step_ms": float(np.median([r["median_step_ms"] for r in rs])),
        "mean_step_ms": float(np.median([r["mean_step_ms"] for r in rs])),
        "compile_s": float(np.median([r["compile_s"] for r in rs])),
        "exec_mb": (rs[0]["exec_bytes"] or 0) / 1e6, "state_mb": rs[0]["state_bytes"] / 1e6,
        "clipped": (float(np.median([r["clipped_frac_first1000"] for r in rs]))
                    if rs[0]["clipped_frac_first1000"] is not None else None),
        "mean_scale": (float(np.median([r["mean_scale_first1000"] for r in rs]))
                       if rs[0]["mean_scale_first1000"] is not None else None),
        "grid": sorted({r["lr"] for r in res["runs"] if r["optimizer"] == opt}),
    })
  return rows


def _f(x, spec=".2f"):
  return "-" if x is None or (isinstance(x, float) and not np.isfinite(x)) else format(x, spec)


TAGGED = ("_tune", "_long", "_long2", "_long3", "_ablation", "_early", "_peers", "_psgd", "_all",
          "_rank", "_kfac", "_rerun", "_rerun2", "_rerun3", "_rerun4", "_rerun5", "_rerun6",
          "_rerun7", "_rerun8", "_rerun9", "_rerun10", "_rerun11", "_rerun12", "_ext8", "_diag1",
          "_diag10", "_shampoo_muon", "_gpu", "_gpu_notriton")
"""File-name tags of runs outside the protocol's evaluation tables (``--tag``)."""


def report(pattern: str = "*.json") -> str:
  lines = []
  for path in sorted(glob.glob(os.path.join(OUT, pattern))):
    tagged = any(t in os.path.basename(path) for t in TAGGED)
    if tagged and pattern == "*.json":
      continue  # tuning-set studies, long runs, ablations: --pattern '*_tune.json' etc.
    with open(path) as f:
      res = json.load(f)
    if not res.get("best_lr"):
      continue
    t = res["task"]
    rows = summarize(res)
    png = os.path.basename(plot(path))
    adam = next((r for r in rows if r["optimizer"] == "adam"), None)
    lines += [f"### {t['name']}", "", f"{t['description']}; target test {t['metric']} "
              f"{'>=' if t['metric'] == 'accuracy' else '<='} {t['target']}; budget "
              f"{t['budget_s']:g} s of step time per run. Command: `{res['command']}`; "
              f"started {res['machine']['date']}, load average at start "
              f"{tuple(round(x, 1) for x in res['machine']['loadavg_at_start'])}, at end "
              f"{tuple(round(x, 1) for x in res['load_at_end'])}.", "",
              "| optimizer | lr (grid) | reached | s to target | x Adam | s with compile | "
              "x Adam | steps to target | final test | ms/step (median/mean) | x Adam | "
              "compile s | exec+state MB | clipped / mean scale (first 1000) |",
              "|" + "---|" * 14]
    for r in rows:
      ratio = lambda k, r=r, adam=adam: (r[k] / adam[k] if adam and r[k] and adam[k]
                              and np.isfinite(r[k]) and np.isfinite(adam[k]) else None)
      lines.append(
          f"| {r['optimizer']} | {r['lr']:.3g} ({', '.join(f'{x:.3g}' for x in r['grid'])}) | "
          f"{r['reached']}/{r['seeds']} | {_f(r['wall_to_target'], '.1f')} | "
          f"{_f(ratio('wall_to_target'))} | {_f(r['wall_with_compile'], '.1f')} | "
          f"{_f(ratio('wall_with_compile'))} | {_f(r['steps_to_target'], '.0f')} | "
          f"{_f(r['final_metric'], '.4f')} | {r['median_step_ms']:.2f} / {r['mean_step_ms']:.2f}"
          f" | {_f(ratio('mean_step_ms'))} | {r['compile_s']:.1f} | "
          f"{r['exec_mb'] + r['state_mb']:.1f} | "
          f"{_f(r['clipped'])} / {_f(r['mean_scale'])} |")
    lines += ["", f"![{t['name']}](results/eval/{png})", ""]
  text = "\n".join(lines)
  tags = sorted((t for t in TAGGED if t in pattern), key=len)  # the longest: _long2, not _long
  name = "summary.md" if pattern == "*.json" else "summary_other.md"
  if tags:
    name = "summary_tuning.md" if tags[-1] == "_tune" else f"summary{tags[-1]}.md"
  with open(os.path.join(OUT, name), "w") as f:
    f.write(text + "\n")
  return text


def _write_readme(text: str, start: str = "<!-- evaluation:start -->",
                  end: str = "<!-- evaluation:end -->") -> None:
  """Replaces the block between the markers of benchmarks/README.md with ``text``."""
  path = os.path.join(HERE, "README.md")
  with open(path) as f:
    doc = f.read()
  head, rest = doc.split(start, 1)
  _, tail = rest.split(end, 1)
  with open(path, "w") as f:
    f.write(head + start + "\n" + text + "\n" + end + tail)


def plot(path: str) -> str:
  """Test metric vs step time (and vs steps) of every run at each optimizer's best lr."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  with open(path) as f:
    res = json.load(f)
  t = res["task"]
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
  colors = {}
  for opt, lr in res["best_lr"].items():
    for r in res["runs"]:
      if r["optimizer"] != opt or r["lr"] != lr:
        continue
      c = colors.setdefault(opt, f"C{len(colors)}")
      ev = r["evals"]
      label = f"{opt} lr={lr:.3g}" if r["seed"] == 0 else None
      axes[0].plot([e["wall"] for e in ev], [e["metric"] for e in ev], color=c, label=label,
                   alpha=0.8)
      axes[1].plot([e["step"] for e in ev], [e["metric"] for e in ev], color=c, alpha=0.8)
  for ax, xl in zip(axes, ["step time (s, compile excluded)", "steps"], strict=True):
    ax.axhline(t["target"], color="k", lw=0.8, ls=":")
    ax.set_xlabel(xl)
    ax.set_ylabel(f"test {t['metric']} (subset)")
    if t["metric"] != "accuracy":
      lo = min(e["metric"] for r in res["runs"] for e in r["evals"] if np.isfinite(e["metric"]))
      ax.set_ylim(lo * 0.98, t["target"] * 1.4)
    else:
      ax.set_ylim(max(0.5, t["target"] - 0.15), min(1.0, t["target"] + 0.05))
  axes[0].legend(fontsize=8)
  fig.suptitle(t["description"], fontsize=8)
  fig.tight_layout()
  out = path[:-5] + ".png"
  fig.savefig(out, dpi=90)
  plt.close(fig)
  return out


if __name__ == "__main__":
  sys.exit(main())
