"""Reproducer of the jaxlib 0.10.2 XLA:CPU hang (docs/known-issues.md).

    python -m examples.xla_cpu_hang_repro [--trials 3] [--timeout 60]

Each trial runs a child process that compiles and runs, 40 times, a jitted
Denman-Beavers-style loop (matrix inverses, i.e. LAPACK LU, inside a
``lax.while_loop``) on a 200 x 200 float64 block, and counts it as hung if
the child has not finished within ``--timeout`` seconds. Trials alternate
between the default ``XLA_FLAGS`` and
``--xla_cpu_enable_concurrency_optimized_scheduler=false``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"

CHILD = r"""
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


def trial(flags: str, timeout: float) -> bool:
  """True if the child finished all 40 runs within ``timeout`` seconds."""
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
  try:
    subprocess.run([sys.executable, "-c", CHILD], env=env, timeout=timeout, check=True,
                   capture_output=True)
    return True
  except subprocess.TimeoutExpired:
    return False


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--trials", type=int, default=3)
  p.add_argument("--timeout", type=float, default=60.0)
  args = p.parse_args(argv)
  for flags in ("", FLAG):
    done = sum(trial(flags, args.timeout) for _ in range(args.trials))
    print(f"XLA_FLAGS={flags!r}: {done}/{args.trials} trials finished, "
          f"{args.trials - done} hung", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
