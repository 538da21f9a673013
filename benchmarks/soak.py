"""Soak test: long SNGD runs with faults at random steps, checked step by step.

An MLP (64-64-32-10, ReLU) on scikit-learn's digits (1,437 train / 360 test
images), trained by ``chain(sngd(**options), clip_by_global_norm(1), sgd(lr,
momentum=0.9))`` with batch 64, in several configurations of ``sngd``'s options
(defaults; ``max_factor_ratio``; ``stats_batch_size``; rfim with Newton-Schulz
and no prior; ``axis_name`` under ``shard_map`` on 8 forced host devices, the
batch split over them). The jitted step runs in ``lax.scan`` chunks of 1,000
steps; ``--faults-per-chunk`` steps of every chunk, drawn at random (any step,
factor step or not), get a fault, drawn at random from

* ``nan_grads``: one gradient entry is NaN;
* ``inf_acts``: one captured activation is +Inf (under ``shard_map``: on one
  device's shard only);
* ``scale_1e20``: the batch is scaled by 1e20 (finite; its ``X~^T X~``
  overflows float32; under ``shard_map`` one device's shard);
* ``zero_batch``: the batch is all zeros (finite, taken);
* ``outlier_1e6``: the batch is scaled by 1e6 (finite, taken; only in the
  configurations with ``max_factor_ratio``, without which such a batch
  freezes training for thousands of steps by design: the reliability docs).

Every step records whether SNGD skipped it (its ``num_skipped_steps`` moved) and
whether it had to, by an oracle computed in the step independently of SNGD's
own checks: a gradient entry not finite (``jnp.isfinite`` on every entry), or
a factor step (``count % factor_every == 0``) whose statistics' activations
(the ``stats_batch_size`` sub-batch) hold a non-finite entry or overflow
(``max|x|^2 / rows`` past ``finfo.max / 16`` in some layer). A step with finite
gradients whose squared norm is past float32's range (``max|g|^2 * size >
finfo.max / 16``: a 1e20-scaled batch on a non-factor step) *may* be skipped:
its update overflows (the reliability docs' "update overflow", counted in the
same counter); such skips are counted apart. The run checks that SNGD and the
oracle agree at every step, that params and state stay finite, and that
the loss falls; it records the counters and the loss and accuracy per chunk.

Writes ``benchmarks/results/soak.json`` and ``soak.md``.

Run: ``nice python3 -m benchmarks.soak`` (``--steps 2000`` for a quick look).
"""

from __future__ import annotations

from benchmarks import force_cpu_devices

force_cpu_devices(8)  # before JAX starts its backend

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import sngd_jax  # noqa: E402

FAULTS = ("nan_grads", "inf_acts", "scale_1e20", "zero_batch", "outlier_1e6")
CONFIGS = {
    "defaults": {},
    "max_factor_ratio=100": {"max_factor_ratio": 100.0},
    "stats_batch_size=16": {"stats_batch_size": 16},
    "rfim, newton_schulz, prior none": {"fisher": "rfim", "inverse": "newton_schulz",
                                        "prior": "none"},
    "axis_name (shard_map, 8 devices), max_factor_ratio=100": {"axis_name": "data",
                                                                "max_factor_ratio": 100.0},
}
NUM_DEVICES = 8
FAULTY_DEVICE = 3
HEADROOM = 16.0  # the statistics' margin below overflow (sngd_jax._src.statistics)
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


def make_chunk(model, tx, options: dict, x_train, y_train, batch: int, chunk: int):
  """A jitted function running ``chunk`` steps with the given per-step fault codes."""
  n = x_train.shape[0]
  axis = options.get("axis_name")
  devices = NUM_DEVICES if axis else 1
  per_device = batch // devices
  config = sngd_jax.SNGDConfig(**options)
  stats_rows = config.stats_batch_size or per_device

  def any_device(flag):
    return flag if axis is None else jax.lax.psum(flag.astype(jnp.int32), axis) > 0

  def step(carry, fault):
    params, opt_state, key = carry
    key, sub = jax.random.split(key)
    idx = jax.random.randint(sub, (batch,), 0, n)
    x, y = x_train[idx], y_train[idx]
    on_device = jnp.array(True)
    if axis is not None:  # this device's slice of the global batch
      d = jax.lax.axis_index(axis)
      x = jax.lax.dynamic_slice_in_dim(x, d * per_device, per_device)
      y = jax.lax.dynamic_slice_in_dim(y, d * per_device, per_device)
      on_device = d == FAULTY_DEVICE
    scale = jnp.select([fault == FAULTS.index("scale_1e20"), fault == FAULTS.index("zero_batch"),
                        fault == FAULTS.index("outlier_1e6")], [1e20, 0.0, 1e6], 1.0)
    scale = jnp.where(on_device | (fault == FAULTS.index("zero_batch")), scale, 1.0)
    x = x * scale
    loss = lambda p, x, y: loss_fn(p, model, x, y)
    if axis is not None:
      loss = lambda p, x, y, f=loss: jax.lax.pmean(f(p, x, y), axis)
    (value, acts), grads = jax.value_and_grad(sngd_jax.capture(loss, outputs=True), has_aux=True)(
        params, x, y)
    leaves, treedef = jax.tree.flatten(grads)
    first = leaves[0].reshape(-1)
    leaves[0] = jnp.where(fault == FAULTS.index("nan_grads"), first.at[0].set(jnp.nan),
                          first).reshape(leaves[0].shape)
    grads = jax.tree.unflatten(treedef, leaves)
    layer = sorted(acts)[1]
    call = acts[layer][0]
    bad_act = (fault == FAULTS.index("inf_acts")) & on_device
    acts = {**acts, layer: (call.replace(inputs=jnp.where(
        bad_act, call.inputs.at[0, 0].set(jnp.inf), call.inputs)),) + acts[layer][1:]}
    # The oracle: what must be skipped, from entries and magnitudes, not from SNGD's sums.
    before = sngd_state(opt_state)
    grads_finite = all_finite(grads)
    rows = {p: [c.replace(inputs=c.inputs[:stats_rows], outputs=c.outputs[:stats_rows])
                for c in calls] for p, calls in acts.items()}
    acts_finite = ~any_device(~all_finite(rows))
    bound = jnp.finfo(jnp.float32).max / HEADROOM
    overflow = jnp.array(False)
    for calls in rows.values():
      for c in calls:
        m = jnp.max(jnp.abs(c.inputs))
        overflow |= m * m / (c.inputs.shape[0] * devices) > bound
    overflow = any_device(overflow)
    factor_step = before.count % config.factor_every == 0
    must_skip = ~grads_finite | (factor_step & (~acts_finite | overflow))
    # May skip (the reliability docs' "update overflow"): finite gradients whose squared
    # norm, and so the trust region's q = sum <g, u> of the update, is past float32's range.
    g_max = jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(grads)]))
    g_size = sum(g.size for g in jax.tree.leaves(grads))
    may_skip = grads_finite & any_device(
        g_max * g_max > jnp.finfo(jnp.float32).max / (HEADROOM * g_size))
    updates, opt_state = tx.update(grads, opt_state, params, activations=acts)
    params = optax.apply_updates(params, updates)
    skipped = sngd_state(opt_state).num_skipped_steps > before.num_skipped_steps
    ok = all_finite(params) & all_finite(opt_state)
    return (params, opt_state, key), (value, ok, must_skip, may_skip, skipped)

  def run(params, opt_state, key, faults):
    (params, opt_state, key), out = jax.lax.scan(step, (params, opt_state, key), faults)
    return params, opt_state, key, out

  if axis is not None:
    mesh = jax.make_mesh((NUM_DEVICES,), (axis,))
    run = jax.shard_map(run, mesh=mesh, in_specs=(P(), P(), P(), P()),
                        out_specs=(P(), P(), P(), P()), check_vma=False)
  return jax.jit(run)


def draw_faults(rng, num_chunks: int, chunk: int, per_chunk: int, kinds: tuple[str, ...]):
  """Per chunk, ``per_chunk`` distinct random steps with a random fault kind each (-1: none)."""
  faults = np.full((num_chunks, chunk), -1, np.int32)
  for c in range(num_chunks):
    at = rng.choice(chunk, size=per_chunk, replace=False)
    faults[c, at] = [FAULTS.index(k) for k in rng.choice(kinds, size=per_chunk)]
  return faults


def soak(name: str, options: dict, args, data) -> dict:
  (x_train, y_train), (x_test, y_test) = data
  model = MLP()
  params = model.init(jax.random.PRNGKey(args.seed), x_train[:1])["params"]
  tx = optax.chain(sngd_jax.sngd(**options), optax.clip_by_global_norm(args.clip),
                   optax.sgd(args.lr, momentum=0.9))
  opt_state = tx.init(params)
  key = jax.random.PRNGKey(args.seed + 1)
  kinds = tuple(k for k in FAULTS if k != "outlier_1e6" or options.get("max_factor_ratio"))
  num_chunks = args.steps // args.chunk
  faults = draw_faults(np.random.default_rng(args.seed), num_chunks, args.chunk,
                       args.faults_per_chunk, kinds)
  run_chunk = make_chunk(model, tx, options, x_train, y_train, args.batch, args.chunk)

  @jax.jit
  def evaluate(params):
    logits = model.apply({"params": params}, x_test)
    return loss_fn(params, model, x_train, y_train), jnp.mean(jnp.argmax(logits, -1) == y_test)

  loss0, acc0 = evaluate(params)
  records = [{"step": 0, "train_loss": float(loss0), "test_accuracy": float(acc0),
              "num_skipped_steps": 0, "num_refresh_failures": 0, "finite": True}]
  cpu0, t0 = time.process_time(), time.perf_counter()
  jax.block_until_ready(run_chunk.lower(params, opt_state, key, faults[0]).compile())
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  mismatches, fault_counts, must_skip_total, allowed_total = [], {k: 0 for k in FAULTS}, 0, 0
  for c in range(num_chunks):
    params, opt_state, key, (losses, oks, must, may, skipped) = run_chunk(
        params, opt_state, key, faults[c])
    must, may, skipped = np.asarray(must), np.asarray(may), np.asarray(skipped)
    must_skip_total += int(must.sum())
    allowed = skipped & may & ~must
    allowed_total += int(allowed.sum())
    for i in np.flatnonzero((must != skipped) & ~allowed):
      mismatches.append({"step": c * args.chunk + int(i), "must_skip": bool(must[i]),
                         "skipped": bool(skipped[i]),
                         "fault": FAULTS[faults[c, i]] if faults[c, i] >= 0 else None})
    for k in faults[c][faults[c] >= 0]:
      fault_counts[FAULTS[k]] += 1
    train_loss, acc = evaluate(params)
    state = sngd_state(opt_state)
    finite = bool(np.all(np.asarray(oks))) and bool(all_finite(params)) \
        and bool(all_finite(opt_state))
    records.append({"step": (c + 1) * args.chunk, "train_loss": float(train_loss),
                    "test_accuracy": float(acc),
                    "num_skipped_steps": int(state.num_skipped_steps),
                    "num_refresh_failures": int(state.num_refresh_failures),
                    "finite": finite})
    if not finite:
      break
  wall = time.perf_counter() - t0
  cpu = time.process_time() - cpu0
  state = sngd_state(opt_state)
  losses = [r["train_loss"] for r in records]
  checks = {
      "finite_throughout": all(r["finite"] for r in records),
      "skips_equal_oracle_at_every_step": not mismatches,
      "skipped_equals_must_plus_update_overflow": (
          int(state.num_skipped_steps) == must_skip_total + allowed_total),
      "loss_fell_from_start": losses[-1] < 0.1 * losses[0],
      "loss_fell_in_second_half": len(losses) > 3 and losses[-1] < losses[len(losses) // 2],
      "steps_completed": records[-1]["step"] == num_chunks * args.chunk,
  }
  factor_every = sngd_jax.SNGDConfig(**options).factor_every
  inverse_every = sngd_jax.SNGDConfig(**options).inverse_every
  out = {"name": name, "options": {k: v for k, v in options.items()},
         "devices": NUM_DEVICES if options.get("axis_name") else 1,
         "fault_kinds": list(kinds), "num_faults": fault_counts,
         "num_refreshes": int(state.count) // inverse_every + 1,
         "num_factor_steps": int(state.count) // factor_every + 1,
         "num_skipped_steps": int(state.num_skipped_steps),
         "must_skip_steps": must_skip_total,
         "update_overflow_skips": allowed_total,
         "num_refresh_failures": int(state.num_refresh_failures),
         "steps_taken": int(state.count),
         "mismatches": mismatches[:20], "num_mismatches": len(mismatches),
         "compile_s": compile_s, "wall_s": wall, "cpu_s": cpu,
         "ms_per_step": 1e3 * wall / max(records[-1]["step"], 1),
         "final_test_accuracy": records[-1]["test_accuracy"],
         "checks": checks, "passed": all(checks.values()), "records": records}
  print(f"{name}: skipped {out['num_skipped_steps']} (must {must_skip_total}, update overflow "
        f"{allowed_total}), refresh failures "
        f"{out['num_refresh_failures']}, loss {losses[0]:.3e} -> {losses[-1]:.3e}, test acc "
        f"{out['final_test_accuracy']:.4f}, {wall:.1f} s, passed {out['passed']}", flush=True)
  return out


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20_000)
  parser.add_argument("--chunk", type=int, default=1_000)
  parser.add_argument("--faults-per-chunk", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--lr", type=float, default=0.02)
  parser.add_argument("--clip", type=float, default=1.0)
  parser.add_argument("--configs", nargs="*", default=list(CONFIGS), choices=list(CONFIGS))
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=RESULTS)
  args = parser.parse_args(argv)
  sngd_jax.limit_lapack_threads()
  data = jax.tree.map(jnp.asarray, load_data(args.seed))
  cpu0 = time.process_time()
  runs = [soak(name, CONFIGS[name], args, data) for name in args.configs]
  result = {
      "benchmark": "soak",
      "command": "nice python3 -m benchmarks.soak" + (" " + " ".join(sys.argv[1:])
                                                      if argv is None and sys.argv[1:] else ""),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"platform": platform.platform(), "processor": platform.processor(),
                  "cpu_count": os.cpu_count(), "jax_backend": jax.default_backend(),
                  "jax": jax.__version__, "note": "shared CPU, timings noisy"},
      "setup": {"model": "MLP 64-64-32-10 relu", "data": "sklearn digits 1437/360",
                "optimizer": f"chain(sngd(**options), clip_by_global_norm({args.clip}), "
                             f"sgd({args.lr}, momentum=0.9))",
                "batch": args.batch, "steps": args.steps, "chunk": args.chunk,
                "faults_per_chunk": args.faults_per_chunk, "seed": args.seed},
      "cpu_s": time.process_time() - cpu0,
      "passed": all(r["passed"] for r in runs),
      "runs": runs,
  }
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "soak.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "soak.md"), "w") as f:
    f.write(render_md(result))
  return result


def render_md(r: dict) -> str:
  s = r["setup"]
  lines = [
      "# Soak runs",
      "",
      f"{r['date_utc']} on {r['machine']['platform']} ({r['machine']['cpu_count']} CPUs, "
      f"{r['machine']['jax_backend']}, jax {r['machine']['jax']}; shared machine, timings noisy).",
      "",
      f"{s['model']} on {s['data']}, {s['optimizer']}, batch {s['batch']}, {s['steps']} steps "
      f"per configuration in jitted `lax.scan` chunks of {s['chunk']}, with "
      f"{s['faults_per_chunk']} faults per chunk at random steps (kinds drawn at random; "
      "`benchmarks/soak.py` describes them and the oracle).",
      f"Reproduce: `{r['command']}` ({r['cpu_s']:.0f} s of CPU in all).",
      "",
      "| configuration | faults (nan_grads / inf_acts / scale_1e20 / zero_batch / outlier_1e6) "
      "| refreshes | skipped (must + may: update overflow) | steps where skip != oracle "
      "| refresh failures "
      "| train loss start -> end | test accuracy | ms/step | checks |",
      "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |",
  ]
  for run in r["runs"]:
    failed = ", ".join(k for k, v in run["checks"].items() if not v)
    nf = run["num_faults"]
    counts = " / ".join(str(nf[k]) if k in run["fault_kinds"] else "-" for k in FAULTS)
    rec = run["records"]
    lines.append(
        f"| {run['name']} | {counts} | {run['num_refreshes']} | {run['num_skipped_steps']} "
        f"({run['must_skip_steps']} + {run['update_overflow_skips']}) | {run['num_mismatches']} "
        f"| {run['num_refresh_failures']} "
        f"| {rec[0]['train_loss']:.3e} -> {rec[-1]['train_loss']:.3e} "
        f"| {run['final_test_accuracy']:.4f} | {run['ms_per_step']:.3f} "
        f"| {'PASS' if run['passed'] else 'FAIL: ' + failed} |")
  lines += ["", "Train loss (full train set) and skipped steps per chunk:", ""]
  names = [run["name"] for run in r["runs"]]
  lines.append("| step | " + " | ".join(names) + " |")
  lines.append("| ---: |" + " --- |" * len(names))
  for i in range(len(r["runs"][0]["records"])):
    cells = []
    for run in r["runs"]:
      if i < len(run["records"]):
        rec = run["records"][i]
        cells.append(f"{rec['train_loss']:.2e} ({rec['num_skipped_steps']})")
      else:
        cells.append("-")
    lines.append(f"| {r['runs'][0]['records'][i]['step']} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
