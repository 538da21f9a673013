"""How XLA:CPU runs a program that holds a host callback (why the host refresh is opt-in).

    python3 -m benchmarks.callback_dispatch      # writes results/callback_dispatch.json

Two toy programs, identical but for a ``jax.pure_callback`` in a ``lax.cond`` branch that
is never taken (as the opt-in host refresh sits in SNGD's step):

- ``sync``: 30 chained ``512 x 512`` products. Reported: the median time until the
  ``jit`` call returns (dispatch) and until the result is ready (total). Without a callback
  the call returns at once and the program runs asynchronously; with one it returns only
  when the program has finished.
- ``args``: a sum over 300 small arguments, called as the jitted function and as the
  ``Compiled`` object of ``.lower().compile()``: the median time per call.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import benchmarks  # noqa: F401  (LAPACK cap)
from benchmarks import harness


def _with_refresh(x, flag, use_callback: bool):
  def refresh(_):
    if use_callback:
      return jax.pure_callback(lambda a: np.asarray(a) * 2,
                               jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    return x * 2
  return jnp.sum(jax.lax.cond(flag, refresh, lambda _: x, None))


def sync(rounds: int = 50) -> dict:
  def body(x, flag, use_callback):
    y = x
    for _ in range(30):
      y = jnp.tanh(y @ x)
    return jnp.sum(y) + _with_refresh(x, flag, use_callback)

  x, flag = jnp.ones((512, 512)) / 512, jnp.array(False)
  out = {}
  for cb in (False, True):
    f = jax.jit(lambda x, flag, cb=cb: body(x, flag, cb))
    f(x, flag).block_until_ready()
    dispatch, total = [], []
    for _ in range(rounds):
      t0 = time.perf_counter()
      r = f(x, flag)
      t1 = time.perf_counter()
      r.block_until_ready()
      dispatch.append(t1 - t0)
      total.append(time.perf_counter() - t0)
    out["callback" if cb else "no callback"] = {
        "dispatch_ms": 1e3 * float(np.median(dispatch)), "total_ms": 1e3 * float(np.median(total))}
  return out


def args(n: int = 300, rounds: int = 300) -> dict:
  def body(xs, flag, use_callback):
    return sum(jnp.sum(v) for v in xs) + _with_refresh(xs[0], flag, use_callback)

  xs, flag = [jnp.ones((8,)) * i for i in range(n)], jnp.array(False)
  out = {}
  for cb in (False, True):
    f = jax.jit(lambda xs, flag, cb=cb: body(xs, flag, cb))
    c = f.lower(xs, flag).compile()
    for name, fn in (("jit", f), ("compiled", c)):
      fn(xs, flag).block_until_ready()
      ts = []
      for _ in range(rounds):
        t0 = time.perf_counter()
        fn(xs, flag).block_until_ready()
        ts.append(time.perf_counter() - t0)
      out[f"{name}, {'callback' if cb else 'no callback'}"] = 1e3 * float(np.median(ts))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "callback_dispatch.json"))
  opts = p.parse_args(argv)
  result = {"machine": harness.machine_info(), "command": " ".join(sys.argv),
            "sync_ms": sync(), "args_300_call_ms": args()}
  with open(opts.out, "w") as f:
    json.dump(result, f, indent=1)
  print(json.dumps({k: v for k, v in result.items() if k != "machine"}, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
