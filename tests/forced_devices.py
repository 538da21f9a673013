"""Runs a test file again in a subprocess with 8 forced XLA:CPU devices.

``--xla_force_host_platform_device_count`` must be set before JAX starts and must not leak
into the rest of the suite, so the multi-device tests of ``test_sharding.py``,
``test_scanned_transformer.py`` and ``test_sweep.py`` run in a child pytest. Three settings
of the child are about running 8 devices' programs on a 2-core machine shared with the
other test worker, not about the code under test:

* ``--xla_cpu_collective_call_terminate_timeout_seconds``: XLA:CPU aborts the process when a
  device waits at a collective longer than this. Eight device threads
  on two loaded cores wait that long: CI lost a run to it (an abort in a scanned
  transformer step, no message), and it was reproduced with a 6 s limit, 1 of 4 runs on
  4 concurrent processes aborting with "Termination timeout for `all gather ...` exceeded".
  The limit is raised to the child's whole time budget: a real deadlock still ends the run,
  at the outer timeout, with the stacks below.
* ``-s``: without it pytest holds the child's file descriptor 2 in a temporary file, and a
  C++ message written just before an abort (XLA's ``LOG(FATAL)``) is lost with it.
* ``faulthandler_timeout``: a child that stops making progress dumps every Python thread's
  stack before the outer timeout kills it.
"""

import os
import subprocess
import sys

import pytest

NUM_DEVICES = 8
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_on_forced_devices(test_file: str, pytest_args: list[str], *, timeout: int,
                          log_dir) -> str:
  """Runs ``pytest -q pytest_args test_file`` on 8 CPU devices; returns its summary line.

  Fails the calling test, with the child's output (and the whole of it in
  ``log_dir/inner_run.log``), when the child does not exit with status 0.
  """
  flags = [f"--xla_force_host_platform_device_count={NUM_DEVICES}",
           f"--xla_cpu_collective_call_terminate_timeout_seconds={timeout}"]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip())
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
       "-o", f"faulthandler_timeout={max(timeout - 120, 60)}", *pytest_args,
       os.path.abspath(test_file)],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
  lines = proc.stdout.strip().splitlines()
  summary = lines[-1] if lines else ""
  if proc.returncode != 0:
    log = os.path.join(str(log_dir), "inner_run.log")
    with open(log, "w") as f:
      f.write(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    # The most telling part of stderr: a stack dump (hang) or the lines before an abort.
    dump = proc.stderr.find("Timeout (")
    fatal = proc.stderr.find("Fatal Python error")
    if dump >= 0:
      detail = proc.stderr[dump:dump + 20000]
    elif fatal >= 0:
      detail = proc.stderr[max(fatal - 4000, 0):fatal + 4000]
    else:
      detail = proc.stderr[-6000:]
    pytest.fail(f"the {NUM_DEVICES}-device run exited with {proc.returncode} (full output: "
                f"{log}):\n{proc.stdout[-4000:]}\n--- stderr ---\n{detail}")
  return summary
