"""Runs kfac-jax 0.0.8 on a benchmark MLP task, in its own virtual environment.

kfac-jax 0.0.8 fails to trace on current JAX; it needs JAX <= 0.6. So it runs
as a subprocess of :mod:`benchmarks.run` under a pinned interpreter, reads a
JSON config, trains on the same data in the same minibatch order
(:mod:`benchmarks.protocol`), and writes a record with the same fields as
:func:`benchmarks.harness.train`.

Set-up (once, ~1 minute, needs PyPI)::

    bash benchmarks/setup_kfac.sh            # creates /opt/kfac-venv
    # or: KFAC_VENV=$PWD/.kfac-venv bash benchmarks/setup_kfac.sh

Standalone use::

    /opt/kfac-venv/bin/python benchmarks/kfac_runner.py --config cfg.json --out rec.json

Config keys: ``task`` (name), ``sizes`` (MLP widths after the input),
``loss`` (``'xent'`` or ``'sigmoid_xent'`` for the autoencoder), ``data_dir``,
``batch_size``, ``lr``, ``seed``, ``steps``, ``time_budget_s`` (or null),
``eval_every``, ``loss_target``, ``acc_target``, ``damping``,
``inverse_update_period`` (default 5), ``curvature_ema`` (default 0.95),
``linear_layers`` (indices of layers with no ReLU after them; default: the last).

kfac-jax is used with a fixed learning rate and momentum 0.9, fixed damping
(its adaptive mode, with learning rate and momentum from the quadratic model,
diverged at batch 128 in our earlier measurement), and its defaults otherwise
(EMA 0.95, inverses every 5 steps, automatic layer registration).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, path: str):
  """Imports a module file by path (the package imports need the newer JAX)."""
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


protocol = _load("protocol", os.path.join(HERE, "protocol.py"))
datasets = _load("datasets", os.path.join(HERE, "..", "sngd_jax", "datasets.py"))


def init_mlp(key, sizes):
  """LeCun-normal kernels and zero biases, as Flax's Dense defaults."""
  import jax
  import jax.numpy as jnp
  params = []
  for din, dout in zip(sizes[:-1], sizes[1:], strict=True):
    key, sub = jax.random.split(key)
    w = jax.random.truncated_normal(sub, -2.0, 2.0, (din, dout)) * (
        1.0 / math.sqrt(din) / 0.87962566103423978)
    params.append({"kernel": w, "bias": jnp.zeros((dout,))})
  return params


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", required=True)
  p.add_argument("--out", required=True)
  args = p.parse_args(argv)
  with open(args.config) as f:
    cfg = json.load(f)

  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  import jax.numpy as jnp
  import kfac_jax

  ds = datasets.default_dataset(cfg.get("data_dir", datasets.DEFAULT_MNIST_DIR))
  xs_np, ys_np = ds.x_train, ds.y_train
  sizes = [xs_np.shape[1], *cfg["sizes"]]
  autoencoder = cfg["loss"] == "sigmoid_xent"

  linear = set(cfg.get("linear_layers") or [len(sizes) - 2])  # layers without a ReLU

  def apply(params, x):
    for i, layer in enumerate(params):
      x = jnp.dot(x, layer["kernel"]) + layer["bias"]
      if i not in linear:
        x = jax.nn.relu(x)
    return x

  def loss_fn(params, batch):
    x, y = batch
    logits = apply(params, x)
    if autoencoder:
      kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
      return jnp.mean(jnp.sum(
          jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))), -1))
    kfac_jax.register_softmax_cross_entropy_loss(logits, y)
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

  optimizer = kfac_jax.Optimizer(
      value_and_grad_func=jax.value_and_grad(loss_fn),
      l2_reg=0.0,
      use_adaptive_learning_rate=False,
      learning_rate_schedule=lambda step: cfg["lr"],
      use_adaptive_momentum=False,
      momentum_schedule=lambda step: 0.9,
      use_adaptive_damping=False,
      damping_schedule=lambda step: cfg.get("damping", 1e-2),
      curvature_ema=cfg.get("curvature_ema", 0.95),
      inverse_update_period=cfg.get("inverse_update_period", 5),
      num_burnin_steps=0,
      multi_device=False,
  )

  @jax.jit
  def eval_chunk(params, x, y):
    logits = apply(params, x)
    if autoencoder:
      lsum = jnp.sum(jnp.maximum(logits, 0) - logits * x + jnp.log1p(jnp.exp(-jnp.abs(logits))))
      return lsum, jnp.zeros((), jnp.int32)
    logp = jax.nn.log_softmax(logits)
    lsum = -jnp.sum(jnp.take_along_axis(logp, y[:, None], axis=1))
    return lsum, jnp.sum(jnp.argmax(logits, -1) == y)

  def evaluate(params):
    n = (len(ds.x_test) // 1000) * 1000
    tl, tc = 0.0, 0
    for i in range(0, n, 1000):
      lc, c = eval_chunk(params, ds.x_test[i:i + 1000], ds.y_test[i:i + 1000])
      tl, tc = tl + float(lc), tc + int(c)
    return (tc / n if not autoencoder else tl / n), tl / n

  seed = cfg["seed"]
  key = jax.random.PRNGKey(seed)
  params = init_mlp(key, sizes)
  sampler = protocol.batches(len(xs_np), cfg["batch_size"], protocol.batch_seed(seed))
  xs, ys = jnp.asarray(xs_np), jnp.asarray(ys_np)
  idx = next(sampler)
  rng = jax.random.PRNGKey(seed + 7)
  opt_state = optimizer.init(params, rng, (xs[idx], ys[idx]))
  state_bytes = int(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(opt_state)))
  param_bytes = int(sum(np.asarray(a).nbytes for a in jax.tree_util.tree_leaves(params)))

  # Compile by running one step on a throwaway copy of the params and state.
  t0 = time.perf_counter()
  warm = optimizer.step(jax.tree_util.tree_map(jnp.copy, params),
                        jax.tree_util.tree_map(jnp.copy, opt_state), rng,
                        batch=(xs[idx], ys[idx]), global_step_int=0)
  jax.block_until_ready(warm)
  compile_s = time.perf_counter() - t0
  del warm

  steps, budget = cfg["steps"], cfg.get("time_budget_s")
  losses, times, emas, evals = [], [], [], []
  ema, wall, diverged = protocol.EMA(), 0.0, False
  m0, l0 = evaluate(params)
  evals.append({"step": 0, "wall": 0.0, "metric": m0, "loss": l0})
  for t in range(1, steps + 1):
    rng, sub = jax.random.split(rng)
    t_start = time.perf_counter()
    params, opt_state, stats = optimizer.step(params, opt_state, sub, batch=(xs[idx], ys[idx]),
                                              global_step_int=t - 1)
    loss = float(stats["loss"])
    dt = time.perf_counter() - t_start
    wall += dt
    idx = next(sampler)
    losses.append(loss)
    times.append(dt)
    emas.append(ema.update(loss))
    diverged = not np.isfinite(loss)
    stop = diverged or (budget is not None and wall >= budget) or t == steps
    if t % cfg["eval_every"] == 0 or stop:
      m, lt = evaluate(params)
      evals.append({"step": t, "wall": wall, "metric": m, "loss": lt})
    if stop:
      break
  record = {
      "task": cfg["task"], "optimizer": "kfac_jax", "label": "kfac_jax", "lr": cfg["lr"],
      "seed": seed, "compile_s": compile_s, "diverged": diverged, "state_bytes": state_bytes,
      "param_bytes": param_bytes, "loss_target": cfg.get("loss_target"),
      "acc_target": cfg.get("acc_target"),
      "versions": {"jax": jax.__version__, "kfac_jax": kfac_jax.__version__},
  }
  protocol.finish_record(record, losses, times, emas, evals,
                         "loss" if autoencoder else "accuracy")
  with open(args.out, "w") as f:
    json.dump(record, f, default=float)
  return 0


if __name__ == "__main__":
  sys.exit(main())
