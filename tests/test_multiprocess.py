"""Two CPU processes with ``jax.distributed`` train to the parameters of one.

Runs ``examples/multiprocess_train.py`` (a small MLP, 20 SNGD steps with an
inverse refresh every 5) as two processes on 127.0.0.1 (gloo collectives,
one CPU device each, the batch split between them) and as one process on the
full batches, and compares the final parameters. Bounded: every subprocess
has a timeout, the port is a free one picked on the loopback interface.
"""

import os
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300


def _env():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  return env


def test_two_processes_train_to_the_parameters_of_one(tmp_path):
  base = [sys.executable, "-m", "examples.multiprocess_train", "--steps", "20",
          "--inverse-every", "5", "--timeout", str(TIMEOUT_S - 60)]
  two, one = tmp_path / "two.npz", tmp_path / "one.npz"
  # Both runs at once: the launcher bounds its two workers, the timeouts bound all.
  runs = [subprocess.Popen(base + ["--launch", "2", "--out", str(two)], cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True),
          subprocess.Popen(base + ["--out", str(one)], cwd=ROOT, env=_env(),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
  outputs = []
  try:
    for proc in runs:
      outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for proc in runs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  for proc, output in zip(runs, outputs, strict=True):
    assert proc.returncode == 0, output[-4000:]
  assert "process 0/2" in outputs[0] and "process 1/2" in outputs[0], outputs[0][-2000:]
  assert "process 0/1" in outputs[1], outputs[1][-2000:]

  a, b = np.load(two), np.load(one)
  assert sorted(a) == sorted(b)
  finals = [k for k in a if k.startswith("final")]
  assert len(finals) == 6  # 3 dense layers, kernel and bias
  for key in finals:
    np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5, err_msg=key)
  moved = max(np.abs(b[k] - b["initial" + k[len("final"):]]).max() for k in finals)
  assert moved > 1e-2  # the runs trained
