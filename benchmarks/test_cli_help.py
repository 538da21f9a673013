"""Every benchmark script answers ``--help`` without running (and overwriting results/)."""

import ast
import glob
import os

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _scripts():
  out = []
  for path in sorted(glob.glob(os.path.join(HERE, "*.py"))):
    tree = ast.parse(open(path).read())
    guarded = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
    if guarded:
      out.append(path)
  return out


@pytest.mark.parametrize("path", _scripts(), ids=os.path.basename)
def test_every_script_parses_its_arguments(path):
  """A script without argparse runs its measurement on ``--help`` (``callback_dispatch`` then
  overwrote ``results/callback_dispatch.json``)."""
  assert "argparse" in open(path).read(), f"{os.path.basename(path)} has no argument parser"


@pytest.mark.parametrize("module", ["callback_dispatch", "padded_refresh"])
def test_help_exits_before_measuring(module, monkeypatch):
  import importlib
  mod = importlib.import_module(f"benchmarks.{module}")
  monkeypatch.setattr(mod.harness, "machine_info",
                      lambda: pytest.fail("--help ran the measurement"))
  with pytest.raises(SystemExit) as e:
    mod.main(["--help"])
  assert e.value.code == 0
