"""Smoke test of the benchmark harness: the main job end to end, a few steps, in a subprocess.

Tests never import from benchmarks/; this runs ``python -m benchmarks.main`` as a user would,
on the scikit-learn digits fallback (an absent data directory), and checks its outputs.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_main_job_runs_and_writes_table_plot_json(tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run(
      [sys.executable, "-m", "benchmarks.main", "--steps", "4", "--eval-every", "2",
       "--optimizers", "sngd:0.01,sngd_adam:0.001,adam:0.001",
       "--data-dir", str(tmp_path / "absent"),
       "--out", str(out)],
      cwd=ROOT, capture_output=True, text=True, timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "data: digits" in proc.stdout
  assert "| mlp-256-256/digits | sngd | 0.01 | 1 |" in proc.stdout
  assert (out / "main.png").stat().st_size > 10_000
  result = json.loads((out / "main.json").read_text())
  runs = {r["optimizer"]: r for r in result["runs"]}
  assert set(runs) == {"sngd", "sngd_adam", "adam"}
  for r in runs.values():
    assert r["steps"] == 4 and len(r["curve"]["ema_loss"]) == 4
    assert [e["step"] for e in r["evals"]] == [0, 2, 4]
    assert 0.0 <= r["final_metric"] <= 1.0 and r["median_step_s"] > 0
  # SNGD keeps a 65x65 and two 257x257 factors and inverses: more state than Adam's 2 moments.
  assert runs["sngd"]["state_bytes"] > runs["adam"]["state_bytes"]
  assert result["machine"]["jax"] and result["dataset"] == "digits"


def test_vmap_members_times_every_variant():
  """benchmarks/vmap_members.py at toy size: every variant runs and is timed."""
  from benchmarks import vmap_members

  r = vmap_members.measure(members=2, steps=3, rounds=1, widths=(8,), batch=16, d_in=5)
  assert set(r["ms_mean"]) == {"alone", "vmap", "vmap-lax-cond"}
  assert all(v > 0 for v in r["ms_mean"].values())
