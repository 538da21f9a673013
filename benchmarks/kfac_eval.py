"""kfac-jax on the evaluation set's autoencoder and CNN, under the protocol, in its own venv.

    bash benchmarks/setup_kfac.sh                      # once: /opt/kfac-venv (needs PyPI)
    python3 -m benchmarks.kfac_eval                    # ~25 min; results/eval/autoencoder_kfac.json
    python3 -m benchmarks.kfac_eval --task cnn         # ~10 min; results/eval/cnn_kfac.json
    python3 -m benchmarks.evaluate --report --pattern '*_kfac.json'

kfac-jax 0.0.8 (the newest on PyPI) needs JAX <= 0.6, and the evaluation models are Flax
modules for JAX >= 0.10, so kfac-jax cannot run in the benchmarks' process. Two of the five
evaluation models are written out again here in plain JAX (:data:`MODELS`): the autoencoder
(dense layers) and the CNN (convolutions, max pooling, dense layers), each checked against
its Flax module in ``benchmarks/test_kfac_eval.py``; the ResNet (BatchNorm), the LSTM and
the transformer are not ported. The parent process (this module, in the project's
environment) builds the task exactly as :mod:`benchmarks.eval_tasks` does and saves its
arrays and each seed's Flax initialization to a temporary directory; a worker (this file
run by the venv's Python with ``--worker``) trains on them with the same minibatch order
(:func:`benchmarks.protocol.batches`), the same test subset and evaluation schedule and the
same phases (:func:`benchmarks.protocol.tune_and_seed`: a 5-point lr grid with seed 0,
extended once at an edge, then seeds 1 and 2 at the best lr), and writes the records in
:mod:`benchmarks.evaluate`'s format, so that ``--report`` makes the same table.

Optimizers (all runs interleaved in the worker, about 0.25 s of steps per turn):

* ``kfac``: ``kfac_jax.Optimizer`` at its defaults where it has them (curvature every step,
  EMA 0.95, inverses every 5 steps, automatic layer registration: on the CNN its graph
  matcher finds both convolutions and both dense layers, each a two-factor Kronecker block,
  ``Conv2DTwoKroneckerFactored`` / ``DenseTwoKroneckerFactored``), momentum 0.9, fixed
  damping (``--damping``; default: 1 for the autoencoder, 1e-2 for the CNN), the learning
  rate from the grid. kfac-jax has no
  default for lr, momentum or damping; its adaptive mode (lr, momentum and damping from its
  quadratic model) is for full-batch training, which its own examples' README says (it
  diverged at batch 128 in our archived runs), so the fixed-step mode is used, as for the
  tuning-set MLPs. The damping of those runs, 1e-2, diverged here within 4-45 steps at every
  lr of the grid and its extension (``results/eval/autoencoder_kfac_damping0.01.log``): this
  loss is summed over 784 pixels, so its curvature is ~784x that of a mean loss. A 30-step
  check at lr 1e-3 (damping 1e-2 diverged, 1 trained, 100 barely moved) chose 1; kfac-jax's
  own autoencoder example starts its adaptive damping at 150. The CNN's loss is a mean
  cross-entropy like the tuning-set MLPs', and gets their 1e-2 without a check on it.
* ``kfac-amortized``: the same with SNGD's amortization: curvature every 5 steps, inverses
  every 100.
* ``adam``: ``optax.adam`` at one learning rate (``--adam-lr``; default its best in the
  evaluation runs: 1e-3 on the autoencoder, 3.16e-3 on the CNN), 3 seeds, the in-process
  reference of the "x Adam" ratios.

Compile time is the first call of each compiled step (on copies of the state): kfac-jax
compiles one program per value of its Python flag "update the curvature this step", so the
amortized variant compiles two.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
KFAC_PYTHON = os.path.join(os.environ.get("KFAC_VENV", "/opt/kfac-venv"), "bin", "python")
KFAC_GRID = (1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1)
LINEAR = (3, 7)  # the autoencoder's layers without a ReLU after them: the code, the output


def _load(name: str, path: str):
  """Imports a module file by path (the benchmarks package needs the newer JAX)."""
  spec = importlib.util.spec_from_file_location(name, path)
  assert spec is not None and spec.loader is not None
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


# --------------------------------------------------------------------------------------
# The model in plain JAX (both environments)
# --------------------------------------------------------------------------------------

def export_params(params) -> dict:
  """Flax's ``{'Dense_i': {'kernel', 'bias'}}`` as flat numpy arrays ``'Dense_i/kernel'``."""
  return {f"{k}/{n}": np.asarray(v) for k, layer in params.items() for n, v in layer.items()}


def load_params(path: str) -> dict:
  """The arrays of :func:`export_params` (an ``.npz``) as Flax's nested dict of layers."""
  import jax.numpy as jnp
  p = np.load(path)
  out: dict = {}
  for k in p.files:
    layer, name = k.split("/")
    out.setdefault(layer, {})[name] = jnp.asarray(p[k])
  return out


def mlp_apply(params: dict, x):
  """:class:`benchmarks.models.Autoencoder`'s forward pass: dense layers, ReLU after every
  layer but the code and the output (:data:`LINEAR`)."""
  import jax
  import jax.numpy as jnp
  for i in range(len(params)):
    layer = params[f"Dense_{i}"]
    x = jnp.dot(x, layer["kernel"]) + layer["bias"]
    if i not in LINEAR:
      x = jax.nn.relu(x)
  return x


def cnn_apply(params: dict, x, image_shape=(28, 28, 1)):
  """:class:`benchmarks.models.SmallCNN`'s forward pass: per conv layer a 3x3 "SAME"
  convolution (NHWC, Flax's HWIO kernel) with bias, ReLU and 2x2 max pooling; then a dense
  layer with ReLU and the dense output layer."""
  import jax
  import jax.numpy as jnp
  x = x.reshape((x.shape[0],) + tuple(image_shape))
  n_conv = sum(1 for k in params if k.startswith("Conv_"))
  for i in range(n_conv):
    layer = params[f"Conv_{i}"]
    x = jax.lax.conv_general_dilated(x, layer["kernel"], (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    x = jax.nn.relu(x + layer["bias"])
    x = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  x = x.reshape(x.shape[0], -1)
  x = jax.nn.relu(jnp.dot(x, params["Dense_0"]["kernel"]) + params["Dense_0"]["bias"])
  return jnp.dot(x, params["Dense_1"]["kernel"]) + params["Dense_1"]["bias"]


MODELS = {"autoencoder": mlp_apply, "cnn": cnn_apply}
"""The evaluation tasks ported to plain JAX: task name -> forward pass."""
DAMPING = {"autoencoder": 1.0, "cnn": 1e-2}
"""kfac-jax's fixed damping per task (the module docstring says why)."""
ADAM_LR = {"autoencoder": 1e-3, "cnn": 3.16e-3}
"""Adam's best learning rate in the evaluation runs of ``evaluate.py`` (the reference)."""
BUDGET_S = {"autoencoder": 60.0, "cnn": 30.0}
"""Seconds of steps per run, as in the evaluation runs of ``evaluate.py``."""


def losses(task: str):
  """``(per-example loss, kfac-jax's loss registration)`` of a task's outputs and targets."""
  import kfac_jax
  import optax
  if task == "autoencoder":  # sigmoid cross-entropy summed over pixels
    return (lambda out, y: optax.sigmoid_binary_cross_entropy(out, y).sum(-1),
            kfac_jax.register_sigmoid_cross_entropy_loss)
  return (optax.softmax_cross_entropy_with_integer_labels,
          kfac_jax.register_softmax_cross_entropy_loss)


# --------------------------------------------------------------------------------------
# The worker: kfac-jax's venv (JAX 0.6)
# --------------------------------------------------------------------------------------

def worker(cfg: dict) -> list:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import kfac_jax
  import optax

  protocol = _load("protocol", os.path.join(HERE, "protocol.py"))
  data = np.load(os.path.join(cfg["dir"], "data.npz"))
  x_train, y_train = data["x_train"], data["y_train"]
  x_test, y_test = data["x_test"], data["y_test"]
  xs, ys = jnp.asarray(x_train), jnp.asarray(y_train)

  def init(seed):
    return load_params(os.path.join(cfg["dir"], f"params_{seed}.npz"))

  task = cfg["task"]
  apply = MODELS[task]
  example_loss, register_loss = losses(task)
  accuracy = task != "autoencoder"

  def loss_fn(params, batch, register=False):
    x, y = batch
    logits = apply(params, x)
    if register:
      register_loss(logits, y)
    return example_loss(logits, y).mean()

  @jax.jit
  def eval_sum(params, x, y):
    out = apply(params, x)
    return (jnp.sum(jnp.argmax(out, -1) == y) if accuracy else example_loss(out, y).sum())

  def evaluate(params, n=None, chunk=500):  # as evaluate.make_eval: whole chunks of the subset
    n = len(x_test) if n is None else min(n, len(x_test))
    n = (n // chunk) * chunk or n
    return sum(float(eval_sum(params, x_test[i:i + chunk], y_test[i:i + chunk]))
               for i in range(0, n, min(chunk, n))) / n

  def make_kfac(amortized: bool):
    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(lambda p, b: loss_fn(p, b, register=True)),
        l2_reg=0.0,
        use_adaptive_learning_rate=False, learning_rate_schedule=None,  # lr: a step argument
        use_adaptive_momentum=False, momentum_schedule=lambda step: 0.9,
        use_adaptive_damping=False, damping_schedule=lambda step: cfg["damping"],
        curvature_ema=0.95,
        curvature_update_period=5 if amortized else 1,
        inverse_update_period=100 if amortized else 5,
        num_burnin_steps=0, multi_device=False)

  kfacs = {"kfac": make_kfac(False), "kfac-amortized": make_kfac(True)}
  adam = optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)

  @jax.jit
  def adam_step(params, state, xs, ys, idx):  # the data as arguments, not constants
    loss, g = jax.value_and_grad(loss_fn)(params, (xs[idx], ys[idx]))
    u, state = adam.update(g, state, params)
    return optax.apply_updates(params, u), state, loss

  compiled: dict = {}
  copy = lambda t: jax.tree_util.tree_map(jnp.copy, t)
  nbytes = lambda t: int(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(t)))

  def reached(m):
    return bool(np.isfinite(m)) and (m >= cfg["target"] if accuracy else m <= cfg["target"])

  def run(opt, lr, seed):
    params = init(seed)
    sampler = protocol.batches(len(x_train), cfg["batch_size"], protocol.batch_seed(seed))
    idx = next(sampler)
    rng = jax.random.PRNGKey(seed + 7)
    if opt == "adam":
      state = adam.init(params)
      state.hyperparams["learning_rate"] = jnp.asarray(lr, jnp.float32)

      def step(params, state, rng, t, idx):
        return adam_step(params, state, xs, ys, idx)
    else:
      kfac = kfacs[opt]
      state = kfac.init(params, rng, (xs[idx], ys[idx]))
      lr_arr = jnp.asarray(lr, jnp.float32)

      def step(params, state, rng, t, idx):
        params, state, stats = kfac.step(params, state, rng, batch=(xs[idx], ys[idx]),
                                         learning_rate=lr_arr, global_step_int=t - 1)
        return params, state, stats["loss"]

    if opt not in compiled:
      # Steps 1 and 2 on copies (kfac-jax: with and without a curvature update), timed
      # compiling and then again compiled; the difference is the compile time.
      spent = []
      for _ in range(2):
        t0 = time.perf_counter()
        p, s = copy(params), copy(state)
        for t in (1, 2):
          p, s, loss = step(p, s, rng, t, idx)
        jax.block_until_ready(loss)
        spent.append(time.perf_counter() - t0)
      compiled[opt] = spent[0] - spent[1]
      del p, s
    state_bytes = nbytes(state)
    compile_s = compiled[opt]
    times, evals = [], [{"step": 0, "wall": 0.0, "metric": evaluate(params, cfg["eval_n"])}]
    wall, diverged, t = 0.0, False, 0
    while True:
      t += 1
      rng, sub = jax.random.split(rng)
      t_start = time.perf_counter()
      params, state, loss = step(params, state, sub, t, idx)
      loss = float(loss)
      dt = time.perf_counter() - t_start
      wall += dt
      times.append(dt)
      idx = next(sampler)
      if not np.isfinite(loss):
        diverged = True
        break
      done = wall >= cfg["budget_s"]
      if t % cfg["eval_every"] == 0 or done:
        evals.append({"step": t, "wall": wall, "metric": evaluate(params, cfg["eval_n"])})
      if done:
        break
      yield
    final = evaluate(params) if not diverged else None
    return {
        "task": task, "optimizer": opt, "lr": lr, "seed": seed,
        "compile_s": compile_s, "exec_bytes": None, "state_bytes": state_bytes,
        **protocol.run_summary(times, evals, reached, compile_s),
        "diverged": diverged, "final_metric": final,
        "metric": "accuracy" if accuracy else "loss",
        "target": cfg["target"], "evals": evals,
        "clipped_frac_first1000": None, "mean_scale_first1000": None,
        "clipped_frac": None, "mean_scale": None,
        "versions": {"jax": jax.__version__, "kfac_jax": kfac_jax.__version__},
    }

  def run_batch(plan):
    recs = protocol.interleave([run(o, lr, s) for o, lr, s in plan])
    for r in recs:
      print(protocol.format_run(r), flush=True)
    return recs

  grids = {"kfac": KFAC_GRID, "kfac-amortized": KFAC_GRID, "adam": (cfg["adam_lr"],)}
  records, best = protocol.tune_and_seed(
      task, list(grids), cfg["seeds"], grids, accuracy, run_batch, cfg["max_extend"])
  return [records, best, grids]


# --------------------------------------------------------------------------------------
# The parent: the project's environment
# --------------------------------------------------------------------------------------

def _prepare(name: str, directory: str, seeds: int, budget_s: float) -> object:
  """Saves a task's arrays and each seed's Flax initialization."""
  import jax

  from benchmarks import eval_tasks
  task = eval_tasks.EVAL_TASKS[name](budget_s)
  np.savez(os.path.join(directory, "data.npz"), x_train=task.x_train, y_train=task.y_train,
           x_test=task.x_test, y_test=task.y_test)
  for seed in range(seeds):
    params = task.model.init(jax.random.PRNGKey(seed), task.x_train[:2])["params"]
    np.savez(os.path.join(directory, f"params_{seed}.npz"), **export_params(params))
  return task


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  p.add_argument("--task", default="autoencoder", choices=sorted(MODELS))
  p.add_argument("--damping", type=float, default=None, help="default: DAMPING[task]")
  p.add_argument("--adam-lr", type=float, default=None, help="default: ADAM_LR[task]")
  p.add_argument("--seeds", type=int, default=3)
  p.add_argument("--max-extend", type=int, default=1)
  p.add_argument("--budget-s", type=float, default=None,
                 help="default: BUDGET_S[task], as in the evaluation runs")
  p.add_argument("--tag", default="_kfac")
  args = p.parse_args(argv)
  args.damping = DAMPING[args.task] if args.damping is None else args.damping
  args.adam_lr = ADAM_LR[args.task] if args.adam_lr is None else args.adam_lr
  args.budget_s = BUDGET_S[args.task] if args.budget_s is None else args.budget_s
  if args.worker:
    with open(args.worker) as f:
      cfg = json.load(f)
    out = worker(cfg)
    with open(cfg["out"], "w") as f:
      json.dump(out, f, default=float)
    return 0

  import dataclasses

  from benchmarks import harness
  machine = harness.machine_info()
  t0 = time.time()
  with tempfile.TemporaryDirectory() as d:
    task = _prepare(args.task, d, args.seeds, args.budget_s)
    cfg = {"task": args.task, "dir": d, "out": os.path.join(d, "out.json"),
           "damping": args.damping, "adam_lr": args.adam_lr, "seeds": args.seeds,
           "max_extend": args.max_extend,
           "budget_s": args.budget_s, "batch_size": task.batch_size,
           "eval_every": task.eval_every, "eval_n": task.eval_n, "target": task.target}
    with open(os.path.join(d, "cfg.json"), "w") as f:
      json.dump(cfg, f)
    env = dict(os.environ, PYTHONPATH="")
    subprocess.run([KFAC_PYTHON, os.path.abspath(__file__), "--worker",
                    os.path.join(d, "cfg.json")], check=True, env=env)
    with open(cfg["out"]) as f:
      records, best, grids = json.load(f)
  out = os.path.join(HERE, "results", "eval", f"{args.task}{args.tag}.json")
  with open(out, "w") as f:
    json.dump({"machine": machine, "load_at_end": os.getloadavg(),
               "elapsed_s": time.time() - t0,
               "command": " ".join(["python3 -m benchmarks.kfac_eval", *sys.argv[1:]]),
               "task": dataclasses.asdict(task) | {"model": repr(task.model), "x_train": None,
                                                   "y_train": None, "x_test": None,
                                                   "y_test": None},
               "settings": {"damping": args.damping, "momentum": 0.9,
                            "kfac": "curvature every step, EMA 0.95, inverses every 5",
                            "kfac-amortized": "curvature every 5 steps, EMA 0.95, inverses "
                                              "every 100"},
               "versions": records[0].get("versions"),
               "grids": grids, "best_lr": best, "runs": records}, f, indent=1, default=float)
  print(f"wrote {out} ({time.time() - t0:.0f} s)", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
