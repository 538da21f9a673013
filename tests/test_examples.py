"""The examples gallery runs: each script trains a few steps and prints finite losses.

Each example runs in its own process, as a user would start it
(``python -m examples.NAME --steps N`` from the repository root); where steps
are cheap (the MLPs) it runs long enough for the loss to fall.
"""

import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# example -> steps to run; with 10 or more the loss must also decrease
EXAMPLES = {
    "linen_cnn_trainstate": 3,
    "nnx_mlp_optimizer": 12,
    "lstm_sequence": 3,
    "transformer_lm": 3,
    "grad_accumulation": 10,
    "scanned_transformer": 3,
    "equinox_mlp": 12,
    "haiku_mlp": 12,
    "partial_model": 12,
    "ppo_cartpole": 3,  # a PPO loss need not fall
    "gnn_graph_classification": 12,
}
LINE = re.compile(r"^step (\d+) loss (\S+)", re.MULTILINE)


def test_every_example_is_tested_and_listed():
  scripts = {f[:-3] for f in os.listdir(os.path.join(ROOT, "examples"))
             if f.endswith(".py") and not f.startswith("_")}
  gallery = scripts - {"multiprocess_train", "xla_cpu_hang_repro"}  # not training examples
  assert gallery == set(EXAMPLES)
  with open(os.path.join(ROOT, "examples", "README.md")) as f:
    readme = f.read()
  for name in scripts:
    assert f"{name}.py" in readme, name


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_trains(name):
  steps = EXAMPLES[name]
  env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
  proc = subprocess.run([sys.executable, "-m", f"examples.{name}", "--steps", str(steps)],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  found = [(int(s), float(v)) for s, v in LINE.findall(proc.stdout)]
  assert [s for s, _ in found] == list(range(steps)), proc.stdout[-2000:]
  losses = [v for _, v in found]
  assert all(math.isfinite(v) for v in losses), losses
  if steps >= 10:
    assert sum(losses[-3:]) < 0.95 * sum(losses[:3]), losses
