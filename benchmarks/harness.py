"""Training harness shared by the benchmarks: tasks, optimizers, timed training runs.

Timing protocol (the same for every optimizer, in one process):

* the jitted step (loss, gradients, optimizer update, parameter update) is
  compiled ahead of time; compile time is reported separately;
* each step is timed from dispatch until its loss is on the host (which also
  means its new params are ready: one executable), ``time.perf_counter``;
* *wall time* is the sum of step times (evaluation and compilation excluded);
* the train-loss curve is a bias-corrected EMA (decay 0.99) of minibatch losses;
* test metrics are evaluated every ``eval_every`` steps, outside the clock.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

import sngd_jax
from benchmarks.protocol import EMA, batch_seed, batches, finish_record, first_crossing


@dataclasses.dataclass
class Task:
  """A training problem.

  Attributes:
    name: short name used in tables and file names.
    model: a Flax linen module.
    loss: ``'xent'`` (softmax cross-entropy on labels), ``'sigmoid_xent'``
      (autoencoder: sigmoid cross-entropy against the input, summed over
      pixels), ``'lm'`` (next-character softmax cross-entropy, mean per token).
    x_train, y_train, x_test, y_test: numpy arrays (``y`` unused for
      ``sigmoid_xent``).
    batch_size: minibatch size.
    loss_target: the EMA train loss whose first crossing is reported.
    acc_target: the test accuracy whose first crossing is reported (None: none).
    layers: which layer kinds the model needs SNGD to handle (for reporting a
      task as pending when the library does not yet capture them).
    description: one line for the tables.
  """

  name: str
  model: Any
  loss: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  batch_size: int = 128
  loss_target: Optional[float] = None
  acc_target: Optional[float] = None
  layers: tuple[str, ...] = ("dense",)
  description: str = ""


def loss_and_metric(task: Task) -> tuple[Callable, str]:
  """``loss_fn(params, x, y) -> scalar`` for the task, and the test metric's name."""
  model = task.model
  if task.loss == "xent":
    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss_fn, "accuracy"
  if task.loss == "sigmoid_xent":
    def loss_fn(params, x, y):
      del y
      logits = model.apply({"params": params}, x)
      return optax.sigmoid_binary_cross_entropy(logits, x).sum(-1).mean()
    return loss_fn, "loss"
  if task.loss == "lm":
    def loss_fn(params, x, y):
      logits = model.apply({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss_fn, "bpc"
  raise ValueError(f"unknown loss {task.loss!r}")


# --------------------------------------------------------------------------------------
# Optimizers: name -> (builder(lr) -> transform, takes activations?)
# --------------------------------------------------------------------------------------

def _psgd_kron(lr):
  import contextlib
  import io

  from psgdax import kron
  with contextlib.redirect_stdout(io.StringIO()):  # it prints sizes at init
    return kron(learning_rate=lr, b1=0.9)


SNGD_AMORTIZED = {"factor_every": 10, "inverse_every": 300, "decay": 0.95}

OPTIMIZERS: dict[str, tuple[Callable[[float], optax.GradientTransformation], bool]] = {
    "sngd": (lambda lr: sngd_jax.sngd_momentum(lr, momentum=0.9), True),
    # Statistics every 10 steps with the same averaging horizon in steps as the
    # defaults (0.95 per update ~ 0.995 per step), inverses every 300 steps.
    "sngd-amortized": (lambda lr: sngd_jax.sngd_momentum(
        lr, momentum=0.9, **SNGD_AMORTIZED), True),
    "sngd_adam": (lambda lr: sngd_jax.sngd_adam(lr), True),
    "adam": (lambda lr: optax.adam(lr), False),
    "adamw": (lambda lr: optax.adamw(lr, weight_decay=1e-4), False),
    "sgd": (lambda lr: optax.sgd(lr, momentum=0.9), False),
    "psgd_kron": (_psgd_kron, False),
}


def sngd_variant(**sngd_kwargs) -> tuple[Callable[[float], optax.GradientTransformation], bool]:
  """An SNGD entry with non-default ``sngd`` arguments, e.g. ``factor_every=10``."""
  return (lambda lr: sngd_jax.sngd_momentum(lr, momentum=0.9, **sngd_kwargs), True)


def optimizer_available(name: str) -> Optional[str]:
  """None if the optimizer can run here, else why not."""
  if name == "psgd_kron":
    try:
      import psgdax  # noqa: F401
    except ImportError:
      return "psgdax is not installed (pip install psgdax)"
  return None


def tree_bytes(tree: Any) -> int:
  return int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(tree)))


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def make_step(loss_fn: Callable, tx: optax.GradientTransformation, wants_acts: bool):
  """The jitted training step ``(params, state, X, Y, idx) -> (params, state, loss)``."""
  if wants_acts:
    grad_fn = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)

    def step(params, state, xs, ys, idx):
      (loss, acts), grads = grad_fn(params, xs[idx], ys[idx])
      updates, state = tx.update(grads, state, params, activations=acts)
      return optax.apply_updates(params, updates), state, loss
  else:
    grad_fn = jax.value_and_grad(loss_fn)

    def step(params, state, xs, ys, idx):
      loss, grads = grad_fn(params, xs[idx], ys[idx])
      updates, state = tx.update(grads, state, params)
      return optax.apply_updates(params, updates), state, loss
  return jax.jit(step, donate_argnums=(0, 1))


def make_eval(task: Task, loss_fn: Callable, chunk: int = 1000):
  """``evaluate(params) -> (test metric, test loss)``, in chunks, jitted."""
  model = task.model

  @jax.jit
  def chunk_stats(params, x, y):
    if task.loss == "xent":
      logits = model.apply({"params": params}, x)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
      return loss, jnp.sum(jnp.argmax(logits, -1) == y)
    per_example = loss_fn(params, x, y) * x.shape[0]
    return per_example, jnp.zeros((), jnp.int32)

  xs, ys = task.x_test, task.y_test
  n = (len(xs) // chunk) * chunk or len(xs)
  chunk = min(chunk, n)

  def evaluate(params):
    tot_loss, tot_correct = 0.0, 0
    for i in range(0, n, chunk):
      loss, correct = chunk_stats(params, xs[i:i + chunk], ys[i:i + chunk])
      tot_loss += float(loss)
      tot_correct += int(correct)
    loss = tot_loss / n
    if task.loss == "xent":
      return tot_correct / n, loss
    if task.loss == "lm":
      return loss / math.log(2.0), loss  # bits per character
    return loss, loss

  return evaluate


def train(task: Task, opt_name: str, lr: float, seed: int, steps: int, **kwargs) -> dict:
  """Trains ``task`` with one optimizer, learning rate and seed; returns the record.

  Arguments as :func:`train_steps`, which this runs to the end.
  """
  gen = train_steps(task, opt_name, lr, seed, steps, **kwargs)
  while True:
    try:
      next(gen)
    except StopIteration as stop:
      return stop.value


def interleaved(runs: list[dict], chunk: int = 50, progress=None) -> list[dict]:
  """Runs several trainings in one process, round robin, ``chunk`` steps at a time.

  Machine load (other processes, thermal state) then hits every run alike,
  which matters for comparing wall times on a shared machine.

  Args:
    runs: keyword arguments of :func:`train_steps`, one dict per run.
    chunk: steps per turn.
    progress: optional tqdm bar, advanced by each run as in :func:`train_steps`.

  Returns:
    The records, in the order of ``runs``.
  """
  gens = [train_steps(progress=progress, **r) for r in runs]
  records: list[Optional[dict]] = [None] * len(gens)
  active = list(range(len(gens)))
  while active:
    for i in list(active):
      try:
        for _ in range(chunk):
          next(gens[i])
      except StopIteration as stop:
        records[i] = stop.value
        active.remove(i)
  return records


_DEVICE_DATA: dict[int, tuple] = {}


def _device_data(task: Task):
  """The task's training arrays on the device, shared by all runs of the task."""
  key = id(task.x_train)
  if key not in _DEVICE_DATA:
    _DEVICE_DATA.clear()
    _DEVICE_DATA[key] = (jnp.asarray(task.x_train), jnp.asarray(task.y_train))
  return _DEVICE_DATA[key]


def train_steps(task: Task, opt_name: str, lr: float, seed: int, steps: int, *,
                eval_every: int = 500, optimizer=None, progress=None,
                stop_at_targets: bool = False, time_budget_s: Optional[float] = None):
  """A generator that trains, yielding after every step; its return value is the record.

  Args:
    task: the problem.
    opt_name: a key of :data:`OPTIMIZERS` (or a label when ``optimizer`` is given).
    lr: the learning rate.
    seed: initialization and minibatch seed.
    steps: the step budget.
    eval_every: test-set evaluation period (steps).
    optimizer: optional ``(builder, wants_acts)`` overriding the registry.
    progress: optional tqdm bar, advanced per step (by seconds under a time budget).
    stop_at_targets: stop as soon as both targets are reached.
    time_budget_s: also stop once the summed step time exceeds this.

  Returns:
    A JSON-serializable dict: the curve (every step's loss and time), eval
    points, median step time, targets reached, final metrics, state bytes.
  """
  builder, wants_acts = optimizer or OPTIMIZERS[opt_name]
  loss_fn, metric = loss_and_metric(task)
  xs, ys = _device_data(task)
  params = task.model.init(jax.random.PRNGKey(seed), xs[:2])["params"]
  tx = builder(lr)
  # Fresh buffers: an init may share one buffer between leaves, which donation rejects.
  state = jax.tree.map(lambda a: jnp.array(a, copy=True), tx.init(params))
  state_bytes = tree_bytes(state)
  param_bytes = tree_bytes(params)
  step = make_step(loss_fn, tx, wants_acts)
  evaluate = make_eval(task, loss_fn)
  sampler = batches(len(task.x_train), task.batch_size, batch_seed(seed))
  idx0 = next(sampler)
  t0 = time.perf_counter()
  with contextlib.redirect_stdout(io.StringIO()):  # some peers print while tracing
    step = step.lower(params, state, xs, ys, idx0).compile()
  compile_s = time.perf_counter() - t0

  losses, times, emas, evals = [], [], [], []
  ema, wall, used = EMA(), 0.0, 0.0
  m0, l0 = evaluate(params)
  evals.append({"step": 0, "wall": 0.0, "metric": m0, "loss": l0})
  diverged = False
  idx = idx0
  for t in range(1, steps + 1):
    t_start = time.perf_counter()
    params, state, loss = step(params, state, xs, ys, idx)
    loss = float(loss)
    dt = time.perf_counter() - t_start
    wall += dt
    idx = next(sampler)
    losses.append(loss)
    times.append(dt)
    emas.append(ema.update(loss))
    if progress is not None:  # seconds under a time budget, else steps
      progress.update(max(0.0, min(dt, time_budget_s - used)) if time_budget_s else 1)
    used = wall
    if not np.isfinite(loss):
      diverged = True
    if t % eval_every == 0 or t == steps or diverged:
      m, lt = evaluate(params)
      evals.append({"step": t, "wall": wall, "metric": m, "loss": lt})
    if diverged:
      break
    if time_budget_s is not None and wall >= time_budget_s:
      m, lt = evaluate(params)
      if evals[-1]["step"] != t:
        evals.append({"step": t, "wall": wall, "metric": m, "loss": lt})
      break
    if stop_at_targets and t % eval_every == 0:
      hit_loss = task.loss_target is None or first_crossing(emas, task.loss_target) is not None
      hit_acc = task.acc_target is None or first_crossing(
          [e["metric"] for e in evals], task.acc_target, below=metric != "accuracy") is not None
      if hit_loss and hit_acc:
        break
    yield
  if progress is not None:  # the rest of this run's share of the bar
    progress.update(max(0.0, time_budget_s - used) if time_budget_s else steps - len(losses))

  record = {
      "task": task.name, "optimizer": opt_name, "lr": lr, "seed": seed,
      "compile_s": compile_s, "diverged": diverged, "state_bytes": state_bytes,
      "param_bytes": param_bytes, "loss_target": task.loss_target,
      "acc_target": task.acc_target,
  }
  return finish_record(record, losses, times, emas, evals, metric)


def sngd_supports(task: Task) -> Optional[str]:
  """None if ``sngd`` preconditions every layer of the task, else the reason (error text)."""
  loss_fn, _ = loss_and_metric(task)
  x, y = jnp.asarray(task.x_train[:2]), jnp.asarray(task.y_train[:2])
  params = task.model.init(jax.random.PRNGKey(0), x)["params"]
  tx = sngd_jax.sngd()
  try:
    state = tx.init(params)
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
    jax.eval_shape(lambda g, s, a: tx.update(g, s, params, activations=a), grads, state, acts)
  except (ValueError, KeyError, TypeError, NotImplementedError) as e:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
  return None


def machine_info() -> dict:
  import os
  import platform

  info = {
      "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
      "platform": platform.platform(),
      "processor": platform.processor(),
      "cpu_count": os.cpu_count(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jax_backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      "optax": optax.__version__,
      "sngd_jax": sngd_jax.__version__,
  }
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          info["cpu_model"] = line.split(":", 1)[1].strip()
          break
    info["loadavg_at_start"] = os.getloadavg()
  except OSError:
    pass
  return info
