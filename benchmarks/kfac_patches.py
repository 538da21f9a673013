"""What kfac-jax's conv curvature costs on CPU: its patch moments, two ways (kfac-jax's venv).

    /opt/kfac-venv/bin/python benchmarks/kfac_patches.py    # ~30 s; results/kfac_patches.json

kfac-jax's ``Conv2DTwoKroneckerFactored`` computes a conv layer's input factor with
``patches_second_moment.patches_moments`` (convolutions over the input, without forming the
patches); the same module has ``patches_moments_explicit`` (the patches formed with
``jax.lax.conv_general_dilated_patches``, then one product). This times both, jitted, on the
inputs of the evaluation CNN's two conv layers at batch 128 (3x3 kernels, "SAME" padding),
and checks that they agree. Median of 5 calls after the first (compile) call.
"""

import argparse
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import kfac_jax
import numpy as np
from kfac_jax._src import patches_second_moment as psm

KW = dict(kernel_spatial_shape=(3, 3), padding="SAME", data_format="NHWC")
SHAPES = {"Conv_0 input": (128, 28, 28, 1), "Conv_1 input": (128, 14, 14, 16)}


def _time(f, x, calls=5):
  t0 = time.perf_counter()
  out = jax.block_until_ready(f(x))
  first = time.perf_counter() - t0
  ts = []
  for _ in range(calls):
    t0 = time.perf_counter()
    jax.block_until_ready(f(x))
    ts.append(time.perf_counter() - t0)
  return out, first, float(np.median(ts))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                "results", "kfac_patches.json"))
  out = p.parse_args(argv).out
  rows = {}
  for name, shape in SHAPES.items():
    x = jnp.asarray(np.random.default_rng(0).normal(size=shape).astype(np.float32))
    implicit, c1, t1 = _time(jax.jit(lambda x: psm.patches_moments(x, **KW)), x)
    explicit, c2, t2 = _time(jax.jit(lambda x: psm.patches_moments_explicit(x, **KW)), x)
    err = float(jnp.max(jnp.abs(implicit[0] - explicit[0])) / jnp.max(jnp.abs(explicit[0])))
    rows[name] = {"shape": shape, "patches_moments_s": t1, "patches_moments_first_s": c1,
                  "explicit_s": t2, "explicit_first_s": c2, "max_rel_diff": err}
    print(f"{name} {shape}: patches_moments {t1 * 1e3:.1f} ms (first call {c1:.2f} s), "
          f"explicit {t2 * 1e3:.1f} ms (first call {c2:.2f} s), max rel diff {err:.1e}",
          flush=True)
  with open(out, "w") as f:
    json.dump({"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
               "platform": platform.platform(), "cpu_count": os.cpu_count(),
               "load": os.getloadavg(), "jax": jax.__version__,
               "kfac_jax": kfac_jax.__version__, "rows": rows}, f, indent=1)
  print("wrote", out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
