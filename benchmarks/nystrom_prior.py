"""The rank-r Nystrom model with the prior's identity part inside the sketch or kept apart.

    python3 -m benchmarks.nystrom_prior            # writes results/nystrom_prior.json

The running factor of a wide layer starts from a prior ``c I`` (``prior="scaled_identity"``:
``c = tr(G^)/d``), whose weight ``decay^t`` is 0.975 after the first statistics update and
still 0.5 after 27 (135 steps at ``factor_every=5``). A rank-``r`` Nystrom model of the whole
factor ``S + c I`` (what the library did until 2026-12-05) takes its range from
``(S + c I) Omega``, nearly the random ``range(Omega)`` while ``c`` dominates; keeping ``c``
apart models ``S`` alone and adds ``c`` exactly (``sngd_jax._src.sketch``).

For the 785-wide input layer of a Fashion-MNIST MLP (pixels standardized per pixel, a bias
input; ``G`` from 20,000 training images), ``M = a c I + (1 - a) G`` for prior weights ``a``,
this compares ``(M + rho I)^{-1} g`` (``rho = 1e-4 tr M``, the default damping) from both
models with the exact solve, in float64, for gradients ``g = X_B^T delta / 128`` of 5 random
batches ``B`` of 128 rows and random ``delta`` (10 outputs): relative error, cosine and norm
ratio (medians over the 5), using the library's own ``nystrom.from_sketch`` and
``power_apply`` with ``r = 128``, ``tail="mean"`` (the defaults of ``inverse="auto"``).
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import datasets, harness
from sngd_jax._src import sketch as sketch_lib
from sngd_jax._src.inverse import nystrom

HERE = os.path.dirname(os.path.abspath(__file__))
WEIGHTS = (0.975, 0.9, 0.5, 0.2, 0.05, 0.0)


def _solve(sketch: sketch_lib.Sketch, rho: float, g: np.ndarray) -> np.ndarray:
  stacked = jax.tree.map(lambda a: jnp.asarray(a)[None], sketch)
  u, lam, tau = nystrom.from_sketch(stacked)
  rep = nystrom.NystromRep(u, lam, tau, jnp.asarray([rho]))
  return np.asarray(nystrom.power_apply(rep, jnp.asarray(g)[None], -1.0)[0])


def _compare(got: np.ndarray, want: np.ndarray) -> dict[str, float]:
  norm = np.linalg.norm
  return {"rel_error": float(norm(got - want) / norm(want)),
          "cosine": float(np.sum(got * want) / (norm(got) * norm(want))),
          "norm_ratio": float(norm(got) / norm(want))}


def run(rows: int = 20000, rank: int = nystrom.DEFAULT_RANK, damping: float = 1e-4,
        draws: int = 5) -> list[dict]:
  data = datasets.default_dataset()
  x = data.x_train.reshape(len(data.x_train), -1).astype(np.float64)[:rows]
  x = (x - x.mean(0)) / (x.std(0) + 1e-8)
  x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
  d = x.shape[1]
  g_data = x.T @ x / len(x)
  c = np.trace(g_data) / d
  omega = np.asarray(nystrom.test_matrix(d, rank, 0, jnp.float64))
  rng = np.random.default_rng(0)
  grads = [x[rng.choice(len(x), 128, replace=False)].T @ rng.standard_normal((128, 10)) / 128
           for _ in range(draws)]
  out = []
  for a in WEIGHTS:
    s = (1 - a) * g_data
    m = a * c * np.eye(d) + s
    rho = damping * np.trace(m)
    inside = sketch_lib.Sketch(m @ omega, np.trace(m), 0.0)  # c I sketched with the data
    apart = sketch_lib.Sketch(s @ omega, np.trace(s), a * c)  # c I kept exactly
    rows_of = {"inside": [], "apart": []}
    for g in grads:
      want = np.linalg.solve(m + rho * np.eye(d), g)
      rows_of["inside"].append(_compare(_solve(inside, rho, g), want))
      rows_of["apart"].append(_compare(_solve(apart, rho, g), want))
    row = {"prior_weight": a}
    for name, results in rows_of.items():
      row[name] = {k: float(np.median([r[k] for r in results])) for k in results[0]}
    out.append(row)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default=os.path.join(HERE, "results", "nystrom_prior.json"))
  args = parser.parse_args(argv)
  with jax.enable_x64(True):
    rows = run()
  print("| prior weight | inside: rel. error / cosine / norm ratio "
        "| apart: rel. error / cosine / norm ratio |\n|---|---|---|")
  for r in rows:
    cells = [" / ".join(f"{r[k][m]:.3f}" for m in ("rel_error", "cosine", "norm_ratio"))
             for k in ("inside", "apart")]
    print(f"| {r['prior_weight']} | {cells[0]} | {cells[1]} |")
  with open(args.out, "w") as f:
    json.dump({"machine": harness.machine_info(), "command": " ".join(["python3 -m",
               "benchmarks.nystrom_prior"] + (argv or [])), "rows": rows}, f, indent=1)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
