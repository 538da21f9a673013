"""The runner of the 8-device subprocess tests (``tests/forced_devices.py``) itself: what the
child sees, and what a failing or hung child reports."""

import textwrap

import pytest
from forced_devices import NUM_DEVICES, POOL_THREADS, run_on_forced_devices


def _child(tmp_path, body: str):
  path = tmp_path / "test_child.py"
  path.write_text(textwrap.dedent(body))
  return str(path)


def test_child_has_8_devices_and_a_larger_pool(tmp_path):
  child = _child(tmp_path, f"""
      import os
      import jax

      def test_setup():
        assert jax.device_count() == {NUM_DEVICES}
        assert os.environ["PJRT_NPROC"] == "{POOL_THREADS}"
        flags = os.environ["XLA_FLAGS"]
        assert "--xla_cpu_collective_call_terminate_timeout_seconds=120" in flags
      """)
  summary = run_on_forced_devices(child, [], timeout=120, log_dir=tmp_path)
  assert "1 passed" in summary, summary


def test_a_failing_child_fails_the_caller_with_its_output(tmp_path):
  child = _child(tmp_path, """
      def test_fails():
        assert 1 + 1 == 3, "the child's own message"
      """)
  with pytest.raises(pytest.fail.Exception, match="exited with 1") as info:
    run_on_forced_devices(child, [], timeout=120, log_dir=tmp_path)
  assert "the child's own message" in str(info.value)
  assert "the child's own message" in (tmp_path / "inner_run.log").read_text()


def test_a_hung_child_is_killed_and_reported(tmp_path):
  child = _child(tmp_path, """
      import sys
      import time

      def test_hangs():
        print("XLA would say: This thread has been waiting for `all reduce` for 20 seconds "
              "and may be stuck", file=sys.stderr, flush=True)
        time.sleep(600)
      """)
  # 40 s: time for a loaded machine to start pytest in the child and print the line.
  with pytest.raises(pytest.fail.Exception, match="was killed after 40 s") as info:
    run_on_forced_devices(child, [], timeout=40, log_dir=tmp_path)
  assert "may be stuck" in str(info.value)
