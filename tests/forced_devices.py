"""Runs a test file again in a subprocess with 8 forced XLA:CPU devices.

``--xla_force_host_platform_device_count`` must be set before JAX starts and must not leak
into the rest of the suite, so the multi-device tests of ``test_sharding.py``,
``test_scanned_transformer.py`` and ``test_sweep.py`` run in a child pytest. Four settings
of the child are about running 8 devices' programs on a 2-core machine shared with the
other test worker, not about the code under test:

* ``--xla_cpu_collective_call_terminate_timeout_seconds``: XLA:CPU aborts the process when a
  device waits at a collective longer than this. CI lost a run to it (an abort in a scanned
  transformer step, no message); with a 6 s limit, 1 of 4 runs on 4 concurrent processes
  aborted with "Termination timeout for `all gather ...` exceeded". The limit is raised to the
  child's whole time budget, so that a slow device is not taken for a stuck one. That was not
  the whole story: a later CI run hung at the raised limit, which is the pool starvation of
  the next item (the abort was likely the same). A hang still ends at the outer timeout, with
  XLA's "may be stuck" lines and the stacks in the failure message.
* ``PJRT_NPROC``: XLA:CPU runs every device's program on one pool of
  ``max(cores, devices)`` threads (``DefaultThreadPoolSize``, which reads this variable), and a
  thread that reaches a collective blocks until the other participants arrive. On 2 cores the
  pool has 8 threads for 8 devices, and a device that runs independent collectives in another
  order than its peers can leave every thread waiting: CI lost a run to this (the child hung
  for 900 s), and it was reproduced here: 1 of 8 runs of the scanned transformer's mesh test
  with 4 such processes at once hung, the 8 pool threads blocked in 4 different rendezvous
  (all gather op 197 over devices [0, 1], all reduce op 126 over [0, 2, 4, 6] and over
  [1, 3, 5, 7], all reduce op 125 over [4, 5]). With 64 threads none of 16 runs hung, and
  runs side by side took the same time with either pool (277 s and 277 s, 250 s and 251 s).
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
# XLA:CPU's thread pool in the child: 8 per device, so that devices blocked at collectives
# cannot take every thread (see the module docstring).
POOL_THREADS = 8 * NUM_DEVICES
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
             XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", "")] + flags).strip(),
             PJRT_NPROC=str(max(int(os.environ.get("PJRT_NPROC") or 0), POOL_THREADS)))
  try:
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider",
         "-o", f"faulthandler_timeout={max(timeout - 120, 60)}", *pytest_args,
         os.path.abspath(test_file)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    failed = proc.returncode != 0
    how, stdout, stderr = f"exited with {proc.returncode}", proc.stdout, proc.stderr
  except subprocess.TimeoutExpired as e:
    # The output so far; subprocess hands it back as bytes here even with text=True.
    failed, how = True, f"was killed after {timeout} s"
    stdout, stderr = _text(e.stdout), _text(e.stderr)
  lines = stdout.strip().splitlines()
  summary = lines[-1] if lines else ""
  if failed:
    log = os.path.join(str(log_dir), "inner_run.log")
    with open(log, "w") as f:
      f.write(stdout + "\n--- stderr ---\n" + stderr)
    pytest.fail(f"the {NUM_DEVICES}-device run {how} (full output: "
                f"{log}):\n{stdout[-4000:]}\n--- stderr ---\n{_telling_part(stderr)}")
  return summary


def _text(output) -> str:
  if output is None:
    return ""
  return output.decode(errors="replace") if isinstance(output, bytes) else output


def _telling_part(stderr: str) -> str:
  """A stack dump (a hang), XLA's first waits at a collective, or the lines before an abort."""
  parts = []
  stuck = [line for line in stderr.splitlines() if "may be stuck" in line]
  if stuck:
    parts.append("\n".join(stuck[:16]))
  dump = stderr.find("Timeout (")
  fatal = stderr.find("Fatal Python error")
  if dump >= 0:
    parts.append(stderr[dump:dump + 20000])
  elif fatal >= 0:
    parts.append(stderr[max(fatal - 4000, 0):fatal + 4000])
  if not parts:
    parts.append(stderr[-6000:])
  return "\n...\n".join(parts)
