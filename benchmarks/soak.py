"""Soak test: a long SNGD run with injected faults, checked for finiteness and progress.

An MLP (64-64-32-10, ReLU) on scikit-learn's digits (1,437 train / 360 test
images), trained by ``chain(sngd(), sgd(lr, momentum=0.9))`` for 20,000 steps of
batch 64. The jitted step runs in ``lax.scan`` chunks of 1,000 steps; one step
near the end of every chunk (the last whose step count is a multiple of
``factor_every``, i.e. a step that reads the activations) gets a fault, cycling
through

* ``nan_grads``: one gradient leaf is NaN  -> must be skipped (zero update);
* ``inf_acts``:  one captured activation is +Inf -> must be skipped (the
  activations are read on factor steps only, hence the placement);
* ``huge_batch``: the batch is scaled by 1e6 (finite) -> must be taken, and
  stay finite.

After every chunk the script checks that params and the whole optimizer state
are finite and records the full train loss, the test accuracy and the
counters. At the end it checks that the skipped-step count equals the number of
non-finite faults and that the loss has fallen, and writes
``benchmarks/results/soak.json`` and ``benchmarks/results/soak.md``.

Run: ``python -m benchmarks.soak`` (``--steps 2000`` for a quick look).
"""

from __future__ import annotations

import argparse
import datetime
import inspect
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import sngd_jax

FAULTS = ("nan_grads", "inf_acts", "huge_batch")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


class MLP(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(64)(x))
    x = nn.relu(nn.Dense(32)(x))
    return nn.Dense(10)(x)


def load_data(seed: int = 0):
  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  perm = np.random.default_rng(seed).permutation(len(x))
  x, y = x[perm], y[perm]
  n_train = 1437
  return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def loss_fn(params, model, x, y):
  logits = model.apply({"params": params}, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves))


def sngd_state(opt_state) -> sngd_jax.SNGDState:
  return opt_state[0]


def make_chunk(model, tx, x_train, y_train, batch: int, chunk: int):
  """Returns a jitted function running ``chunk`` steps, faulting step ``fault_at``."""
  n = x_train.shape[0]
  grad_fn = jax.value_and_grad(sngd_jax.capture(lambda p, x, y: loss_fn(p, model, x, y)),
                               has_aux=True)

  def step(carry, inputs):
    params, opt_state, key = carry
    i, fault = inputs
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (batch,), 0, n)
    x, y = x_train[idx], y_train[idx]
    x = jnp.where(fault == 2, x * 1e6, x)
    (loss, acts), grads = grad_fn(params, x, y)
    first = jax.tree.leaves(grads)[0]
    grads_leaves, treedef = jax.tree.flatten(grads)
    grads_leaves[0] = jnp.where(fault == 0, first * jnp.nan, first)
    grads = jax.tree.unflatten(treedef, grads_leaves)
    layer = sorted(acts)[1]
    call = acts[layer][0]
    acts = dict(acts)
    acts[layer] = (call.replace(inputs=jnp.where(fault == 1, call.inputs.at[0, 0].set(jnp.inf),
                                                 call.inputs)),) + acts[layer][1:]
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    params = optax.apply_updates(params, updates)
    ok = all_finite(params) & all_finite(opt_state)
    return (params, opt_state, key), (loss, ok)

  @jax.jit
  def run_chunk(params, opt_state, key, chunk_index, fault_kind, fault_at):
    steps = chunk_index * chunk + jnp.arange(chunk)
    faults = jnp.where(jnp.arange(chunk) == fault_at, fault_kind, -1)
    (params, opt_state, key), (losses, oks) = jax.lax.scan(
        step, (params, opt_state, key), (steps, faults))
    return params, opt_state, key, losses, jnp.all(oks)

  return run_chunk


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--chunk", type=int, default=1_000)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--clip", type=float, default=1.0)
  parser.add_argument("--max-factor-ratio", type=float, default=100.0,
                      help="sngd(max_factor_ratio=...); 0 disables the outlier limit")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)

  (x_train, y_train), (x_test, y_test) = load_data(args.seed)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  model = MLP()
  params = model.init(jax.random.PRNGKey(args.seed), x_train[:1])["params"]
  # Clipping is what a production run would add against outlier batches: SNGD's inverse is
  # amortized (refreshed every `inverse_every` steps), so a batch 1e6 times out of scale gets
  # a 1e6 times larger step. Non-finite faults need no clipping: the transform skips them.
  ratio = args.max_factor_ratio if args.max_factor_ratio > 0 else None
  tx = optax.chain(sngd_jax.sngd(max_factor_ratio=ratio),
                   optax.clip_by_global_norm(args.clip),
                   optax.sgd(args.lr, momentum=0.9))
  opt_state = tx.init(params)
  key = jax.random.PRNGKey(args.seed + 1)
  run_chunk = make_chunk(model, tx, x_train, y_train, args.batch, args.chunk)

  @jax.jit
  def evaluate(params):
    logits = model.apply({"params": params}, x_test)
    acc = jnp.mean(jnp.argmax(logits, -1) == y_test)
    return loss_fn(params, model, x_train, y_train), acc

  train_loss0, acc0 = evaluate(params)
  records = [{"step": 0, "fault": None, "train_loss": float(train_loss0),
              "test_accuracy": float(acc0), "num_skipped_steps": 0, "num_refresh_failures": 0,
              "finite": True, "mean_batch_loss": None}]
  expected_skips = 0
  t_compile = time.perf_counter()
  jax.block_until_ready(run_chunk.lower(params, opt_state, key, 0, 0, 0).compile())
  factor_every = inspect.signature(sngd_jax.sngd).parameters["factor_every"].default
  compile_s = time.perf_counter() - t_compile
  t0 = time.perf_counter()
  num_chunks = args.steps // args.chunk
  for c in range(num_chunks):
    kind = c % len(FAULTS)
    # The last step of the chunk whose count (steps taken, skips excluded) is a factor step.
    start = int(sngd_state(opt_state).count)
    fault_at = args.chunk - 1 - (start + args.chunk - 1) % factor_every
    params, opt_state, key, losses, ok = run_chunk(params, opt_state, key, c, kind, fault_at)
    expected_skips += FAULTS[kind] != "huge_batch"
    train_loss, acc = evaluate(params)
    state = sngd_state(opt_state)
    finite = bool(ok) and bool(all_finite(params)) and bool(all_finite(opt_state))
    rec = {"step": (c + 1) * args.chunk, "fault": FAULTS[kind],
           "train_loss": float(train_loss), "test_accuracy": float(acc),
           "num_skipped_steps": int(state.num_skipped_steps),
           "num_refresh_failures": int(state.num_refresh_failures),
           "finite": finite,
           "mean_batch_loss": float(jnp.mean(losses[:-1]))}
    records.append(rec)
    print(f"step {rec['step']:6d}  fault {rec['fault']:10s}  train loss {rec['train_loss']:.3e}  "
          f"test acc {rec['test_accuracy']:.4f}  skipped {rec['num_skipped_steps']:3d}  "
          f"refresh failures {rec['num_refresh_failures']:3d}  finite {finite}", flush=True)
    if not finite:
      break
  wall = time.perf_counter() - t0
  steps_done = records[-1]["step"]
  state = sngd_state(opt_state)
  losses = [r["train_loss"] for r in records]
  checks = {
      "finite_throughout": all(r["finite"] for r in records),
      "skipped_equals_nonfinite_faults": int(state.num_skipped_steps) == expected_skips,
      "loss_fell_from_start": losses[-1] < 0.1 * losses[0],
      "loss_fell_in_second_half": len(losses) > 3 and losses[-1] < losses[len(losses) // 2],
      "steps_completed": steps_done == num_chunks * args.chunk,
  }
  result = {
      "benchmark": "soak",
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                  "jax": jax.__version__, "note": "shared CPU, timings noisy"},
      "config": {"model": "MLP 64-64-32-10 relu", "data": "sklearn digits 1437/360",
                 "optimizer": f"chain(sngd(max_factor_ratio={ratio}), "
                              f"clip_by_global_norm({args.clip}), "
                              f"sgd({args.lr}, momentum=0.9))",
                 "batch": args.batch, "steps": args.steps, "chunk": args.chunk,
                 "faults": ("the last factor step (count % factor_every == 0) of every chunk, "
                            "cycling " + ", ".join(FAULTS)),
                 "seed": args.seed},
      "num_faults": {k: sum(r["fault"] == k for r in records) for k in FAULTS},
      "num_skipped_steps": int(state.num_skipped_steps),
      "expected_skipped_steps": expected_skips,
      "num_refresh_failures": int(state.num_refresh_failures),
      "compile_s": compile_s,
      "wall_s": wall,
      "ms_per_step": 1e3 * wall / max(steps_done, 1),
      "checks": checks,
      "passed": all(checks.values()),
      "records": records,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "soak.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "soak.md"), "w") as f:
    f.write(render_md(result))
  print(json.dumps({k: result[k] for k in ("num_skipped_steps", "expected_skipped_steps",
                                            "num_refresh_failures", "wall_s", "ms_per_step",
                                            "checks", "passed")}, indent=1))
  return result


def render_md(r: dict) -> str:
  c = r["config"]
  lines = [
      "# Soak run",
      "",
      f"{r['date_utc']} on {r['machine']['platform']} ({r['machine']['cpu_count']} CPUs, "
      f"{r['machine']['jax_backend']}, jax {r['machine']['jax']}; shared machine, timings noisy).",
      "",
      f"{c['model']} on {c['data']}, {c['optimizer']}, batch {c['batch']}, {c['steps']} steps "
      f"in jitted `lax.scan` chunks of {c['chunk']}. Fault on {c['faults']}.",
      "Reproduce: `python -m benchmarks.soak`.",
      "",
      f"- skipped steps: {r['num_skipped_steps']} (expected {r['expected_skipped_steps']}: "
      f"one per NaN-gradient or Inf-activation fault; the {r['num_faults']['huge_batch']} "
      "huge-scale batches are finite and were taken)",
      f"- refresh failures: {r['num_refresh_failures']}",
      f"- wall time {r['wall_s']:.1f} s ({r['ms_per_step']:.3f} ms/step), "
      f"compile {r['compile_s']:.1f} s",
      "- checks: " + ", ".join(f"{k} {'PASS' if v else 'FAIL'}" for k, v in r["checks"].items()),
      "",
      "| step | fault in the chunk | train loss (full set) | test accuracy | skipped | "
      "refresh failures | finite |",
      "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
  ]
  for rec in r["records"]:
    lines.append(f"| {rec['step']} | {rec['fault'] or '-'} | {rec['train_loss']:.3e} | "
                 f"{rec['test_accuracy']:.4f} | {rec['num_skipped_steps']} | "
                 f"{rec['num_refresh_failures']} | {rec['finite']} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
