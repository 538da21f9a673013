"""Data-parallel SNGD over several processes with ``jax.distributed`` (CPU, gloo).

Every process holds a slice of each global batch; ``jax.jit`` over a global
``data`` mesh turns SNGD's ``X~^T X~`` into a cross-process all-reduce, so every
process keeps the same (replicated) parameters and optimizer state. No
communication code of our own: XLA's collectives, gloo between CPU processes
(NCCL/ICI on GPU/TPU clusters, where ``jax.distributed.initialize()`` finds the
coordinator by itself).

Run from the repository root::

  python -m examples.multiprocess_train --launch 2        # 2 local processes on 127.0.0.1
  python -m examples.multiprocess_train                   # 1 process, same global batches

or start each process yourself (one per host)::

  python -m examples.multiprocess_train --coordinator 10.0.0.1:1234 \\
      --num-processes 2 --process-id 0

``--out params.npz`` saves the initial and final parameters (from process 0).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

BATCH, FEATURES, CLASSES = 64, 6, 4


def free_port() -> int:
  """A free TCP port on the loopback interface."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(num_processes: int, args: list[str], timeout: float) -> int:
  """Starts ``num_processes`` copies of this script on 127.0.0.1 and waits for all.

  Args:
    num_processes: how many processes.
    args: extra command-line arguments for each.
    timeout: seconds before every process still running is killed.

  Returns:
    0 if every process exited with 0, else the first non-zero exit code
    (``124`` on a timeout).
  """
  coordinator = f"127.0.0.1:{free_port()}"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # one CPU device per process
  procs = [subprocess.Popen(
      [sys.executable, "-m", "examples.multiprocess_train", "--coordinator", coordinator,
       "--num-processes", str(num_processes), "--process-id", str(i), *args], env=env)
      for i in range(num_processes)]
  deadline = time.monotonic() + timeout
  codes = [None] * num_processes
  try:
    while any(c is None for c in codes):
      for i, p in enumerate(procs):
        codes[i] = p.poll()
        if codes[i] not in (None, 0):  # one failed: the others would wait forever
          return codes[i]
      if time.monotonic() > deadline:
        return 124
      time.sleep(0.1)
    return 0
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def train(steps: int, inverse_every: int, out: str | None) -> None:
  """Trains a small MLP with SNGD on deterministic data, data-parallel over all processes."""
  import flax.linen as nn
  import jax
  import numpy as np
  import optax
  from jax.sharding import NamedSharding
  from jax.sharding import PartitionSpec as P

  import sngd_jax

  class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
      x = nn.relu(nn.Dense(16)(x))
      x = nn.relu(nn.Dense(16)(x))
      return nn.Dense(CLASSES)(x)

  model = MLP()
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  replicated, batch_sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  tx = sngd_jax.sngd_momentum(0.05, momentum=0.9, fisher={"Dense_1": "rfim"},
                              inverse_every=inverse_every)

  # Every process builds the same replicated params and state inside jit.
  params = jax.jit(lambda: model.init(jax.random.key(0), np.zeros((1, FEATURES), np.float32))[
      "params"], out_shardings=replicated)()
  state = jax.jit(tx.init, out_shardings=replicated)(params)
  initial = params

  def loss_fn(params, x, y):
    logits = model.apply({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  @jax.jit
  def step(params, state, x, y):
    (loss, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn, outputs=True), has_aux=True)(
        params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state, loss

  # The same global batches whatever the process count; each process loads its rows.
  rng = np.random.default_rng(0)
  xs = rng.normal(size=(steps, BATCH, FEATURES)).astype(np.float32)
  ys = rng.integers(0, CLASSES, size=(steps, BATCH)).astype(np.int32)
  rows = BATCH // jax.process_count()
  mine = slice(jax.process_index() * rows, (jax.process_index() + 1) * rows)
  for t in range(steps):
    x = jax.make_array_from_process_local_data(batch_sharded, xs[t, mine], (BATCH, FEATURES))
    y = jax.make_array_from_process_local_data(batch_sharded, ys[t, mine], (BATCH,))
    params, state, loss = step(params, state, x, y)
  sngd_state = state[0]
  print(f"process {jax.process_index()}/{jax.process_count()}: {steps} steps, "
        f"loss {float(loss):.4f}, refresh failures {int(sngd_state.num_refresh_failures)}",
        flush=True)
  if out and jax.process_index() == 0:
    flat = {}
    for prefix, tree in (("final", params), ("initial", initial)):
      for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]:
        flat[prefix + jax.tree_util.keystr(k)] = np.asarray(v.addressable_data(0))
    np.savez(out, **flat)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--launch", type=int, default=0,
                      help="start this many local processes on 127.0.0.1 and wait")
  parser.add_argument("--coordinator", default=None, help="host:port of process 0")
  parser.add_argument("--num-processes", type=int, default=1)
  parser.add_argument("--process-id", type=int, default=0)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--inverse-every", type=int, default=5)
  parser.add_argument("--timeout", type=float, default=240.0,
                      help="seconds for --launch, and for the coordinator handshake")
  parser.add_argument("--out", default=None, help="save final params here (.npz)")
  args = parser.parse_args()
  common = ["--steps", str(args.steps), "--inverse-every", str(args.inverse_every),
            "--timeout", str(args.timeout)] + (["--out", args.out] if args.out else [])
  if args.launch:
    sys.exit(launch(args.launch, common, args.timeout))
  if args.num_processes > 1:
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout=int(args.timeout),
        heartbeat_timeout_seconds=30, shutdown_timeout_seconds=30)
  train(args.steps, args.inverse_every, args.out)


if __name__ == "__main__":
  main()
