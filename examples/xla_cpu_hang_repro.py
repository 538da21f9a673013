"""Reproducer of the jaxlib 0.10.2 XLA:CPU hang (docs/known-issues.md).

    python -m examples.xla_cpu_hang_repro [--trials 3] [--timeout 60] [--mode raw]
    python -m examples.xla_cpu_hang_repro --mode library [--methods denman_beavers,newton_schulz]

Each trial runs a child process and counts it as hung if it makes no progress
(completes no compilation; in the raw mode: does not finish) within
``--timeout`` seconds.

* ``--mode raw``: the child compiles and runs, 40 times, a jitted
  Denman-Beavers-style loop written with ``lax.while_loop`` (matrix inverses,
  i.e. LAPACK LU, inside the loop body) on a 200 x 200 float64 block: the
  pattern that hangs. Trials alternate between the default ``XLA_FLAGS`` and
  ``--xla_cpu_enable_concurrency_optimized_scheduler=false``.
* ``--mode library``: the child compiles, ``--compilations`` times (40), and
  runs 3 times each, the library's
  own refresh of each iterative inverse method
  (``sngd_jax.inverse.denman_beavers_inverse()`` and
  ``newton_schulz_inverse()``, their defaults: ``tol="auto"``) on two
  200 x 200 float32 blocks, under a ``lax.cond`` as in ``sngd``'s update.
  Only the default ``XLA_FLAGS`` are used (add ``--both-flags`` to also run
  with the flag above): this is what users run.
* ``--mode update``: the same with a whole jitted ``sngd_momentum`` step
  (``inverse=`` each of ``--methods``, e.g. ``cholesky``, the default) of an
  MLP with three layer sizes (three size groups of factors, 200, 161 and 121),
  refreshing every step.
* ``--mode vmap``: a user's ``jax.vmap`` over a whole jitted ``sngd_momentum`` step (4
  members of a 784-256-256-10 MLP, refreshing every step). Before the refresh kept one block
  per LAPACK call under a caller's vmap (``inverse.refresh.one_call_per_member``) it hung in
  two concurrent batched ``spotrf`` calls.
"""

from __future__ import annotations

import argparse
import os
import select
import subprocess
import sys
import tempfile

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

RAW_CHILD = r"""
import numpy as np, jax, jax.numpy as jnp
jax.config.update("jax_enable_x64", True)
rng = np.random.default_rng(1)
q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
a = np.stack([(q * np.logspace(0, -6, 200)) @ q.T] * 2)
for i in range(40):
  def refresh(g, i=i):
    eye = jnp.eye(200)
    y, z = g / jnp.trace(g, axis1=1, axis2=2)[:, None, None], jnp.broadcast_to(eye, g.shape)
    def body(c):
      k, y, z = c
      return k + 1, (y + jnp.linalg.inv(z)) / 2, (z + jnp.linalg.inv(y)) / 2
    cond = lambda c: (c[0] < 60) & (jnp.linalg.norm(c[1] @ c[2] - eye) > 1e-12 + 0 * i)
    return jax.lax.while_loop(cond, body, (0, y, z))
  jax.block_until_ready(jax.jit(refresh)(jnp.asarray(a)))
"""

LIBRARY_CHILD = r"""
import sys
import numpy as np, jax, jax.numpy as jnp
import sngd_jax
method = getattr(sngd_jax.inverse, sys.argv[1] + "_inverse")()
rng = np.random.default_rng(1)
q, _ = np.linalg.qr(rng.normal(size=(200, 200)))
g = jnp.asarray(np.stack([(q * np.logspace(0, -4, 200)) @ q.T] * 2), jnp.float32)
for i in range(int(sys.argv[2])):
  def step(g, due, i=i):
    # Each i is a new function: a new trace and a new compilation, as in the raw mode.
    shift = jnp.full((g.shape[0],), 1e-3 + 1e-9 * i, g.dtype)
    keep = lambda: (jnp.broadcast_to(jnp.eye(200, dtype=g.dtype), g.shape), jnp.ones(2, bool))
    return jax.lax.cond(due, lambda: method.refresh(g, shift), keep)
  for _ in range(3):
    inverse, ok = jax.block_until_ready(jax.jit(step)(g, jnp.array(True)))
  assert bool(ok.all()), sys.argv[1]
  print(i, flush=True)
"""


UPDATE_CHILD = r"""
import sys
import flax.linen as nn, numpy as np, jax, jax.numpy as jnp, optax
import sngd_jax
# Three layers of different input sizes: three size groups, refreshed in one jitted update.
model = nn.Sequential([nn.Dense(160), nn.relu, nn.Dense(120), nn.relu, nn.Dense(10)])
rng = np.random.default_rng(1)
x = jnp.asarray(rng.normal(size=(256, 199)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, 256))
params = model.init(jax.random.PRNGKey(0), x)["params"]
loss_fn = lambda p, x, y: optax.softmax_cross_entropy_with_integer_labels(
    model.apply({"params": p}, x), y).mean()
for i in range(int(sys.argv[2])):
  tx = sngd_jax.sngd_momentum(0.01 + 1e-9 * i, inverse=sys.argv[1], inverse_every=1)
  def step(params, state, x, y):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params, x, y)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state
  p, state = params, tx.init(params)
  for _ in range(3):
    p, state = jax.block_until_ready(jax.jit(step)(p, state, x, y))
  print(i, flush=True)
"""


VMAP_CHILD = r"""
import sys
import flax.linen as nn, numpy as np, jax, jax.numpy as jnp, optax
import sngd_jax
# A user's jax.vmap over the whole step: 4 members (seeds) of an MLP whose refresh has two
# one-block groups (785: rank-128 Nystrom; 257 x 1, 257 x 1 share a group of two blocks).
model = nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(256), nn.relu, nn.Dense(10)])
rng = np.random.default_rng(1)
x = jnp.asarray(rng.normal(size=(128, 784)), jnp.float32)
y = jnp.asarray(rng.integers(0, 10, 128))
params = jax.vmap(lambda k: model.init(k, x)["params"])(jax.random.split(jax.random.key(0), 4))
loss_fn = lambda p: optax.softmax_cross_entropy_with_integer_labels(model.apply({"params": p}, x),
                                                                     y).mean()
for i in range(int(sys.argv[2])):
  tx = sngd_jax.sngd_momentum(0.01 + 1e-9 * i, inverse=sys.argv[1], inverse_every=1)
  def step(params, state):
    (_, acts), grads = jax.value_and_grad(sngd_jax.capture(loss_fn), has_aux=True)(params)
    updates, state = tx.update(grads, state, params, activations=acts)
    return optax.apply_updates(params, updates), state
  p, state = params, jax.vmap(tx.init)(params)
  for _ in range(3):
    p, state = jax.block_until_ready(jax.jit(jax.vmap(step))(p, state))
  print(i, flush=True)
"""


def trial(child: str, args: list[str], flags: str, timeout: float) -> str:
  """``"finished"``, ``"hung"`` or ``"failed"``.

  Hung: the child made no progress (no compilation completed, or for the raw mode
  the whole child did not finish) within ``timeout`` seconds, so a trial slowed
  down by a busy machine is not mistaken for a hang.
  """
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  err_file = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would block
  proc = subprocess.Popen([sys.executable, "-c", child, *args], env=env, text=True,
                          stdout=subprocess.PIPE, stderr=err_file)
  assert proc.stdout is not None
  done = 0
  while True:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:  # no progress within timeout seconds
      proc.kill()
      proc.wait()
      print(f"  hung after {done} completed compilations", file=sys.stderr, flush=True)
      return "hung"
    line = proc.stdout.readline()
    if not line:  # end of output: the child exited
      break
    done += 1
  if proc.wait() != 0:
    err_file.seek(0)
    print(err_file.read()[-2000:], file=sys.stderr)
    return "failed"
  return "finished"


def report(label: str, results: list[str]) -> None:
  n = len(results)
  print(f"{label}: {results.count('finished')}/{n} trials finished, "
        f"{results.count('hung')} hung, {results.count('failed')} failed", flush=True)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--timeout", type=float, default=60.0)
  p.add_argument("--mode", choices=("raw", "library", "update", "vmap"), default="raw")
  p.add_argument("--methods", default="denman_beavers,newton_schulz",
                 help="library/update modes: comma-separated inverse methods")
  p.add_argument("--compilations", type=int, default=40,
                 help="library mode: compilations per trial (each run 3 times)")
  p.add_argument("--both-flags", action="store_true",
                 help="library mode: also run with the scheduler flag off")
  args = p.parse_args(argv)
  if args.mode == "raw":
    for flags in ("", FLAG):
      report(f"raw while_loop, XLA_FLAGS={flags!r}",
             [trial(RAW_CHILD, [], flags, args.timeout) for _ in range(args.trials)])
    return 0
  status = 0
  child = {"library": LIBRARY_CHILD, "update": UPDATE_CHILD, "vmap": VMAP_CHILD}[args.mode]
  for flags in ("", FLAG) if args.both_flags else ("",):
    for method in args.methods.split(","):
      results = [trial(child, [method, str(args.compilations)], flags, args.timeout)
                 for _ in range(args.trials)]
      what = {"library": "refresh", "update": "sngd update (3 size groups)",
              "vmap": "vmapped sngd update (4 members)"}[args.mode]
      report(f"sngd_jax {method} {what}, XLA_FLAGS={flags!r}", results)
      status |= "finished" not in results or results.count("finished") < len(results)
  return int(status)


if __name__ == "__main__":
  sys.exit(main())
