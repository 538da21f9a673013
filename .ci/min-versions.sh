#!/usr/bin/env bash
# CI: the fast test suite against the oldest supported dependency versions
# (.ci/constraints-min.txt), in a fresh venv. MIN_VENV chooses the venv's location.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's python3 ships the venv module but not ensurepip (python3-venv), without
# which `python3 -m venv` cannot create a venv.
if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c "import ensurepip" 2>/dev/null; then
  sudo=""
  [ "$(id -u)" = "0" ] || sudo="sudo"
  if command -v apt-get >/dev/null; then
    $sudo apt-get update -qq && $sudo apt-get install -y -qq python3-venv >/dev/null
  else
    echo "min-versions.sh: python3 cannot create venvs; install python3-venv" >&2
    exit 1
  fi
fi

venv="${MIN_VENV:-${TMPDIR:-/tmp}/sngd-jax-venv-min}"
rm -rf "$venv"
python3 -m venv "$venv"
py="$venv/bin/python"
"$py" -m pip install -q --disable-pip-version-check -e ".[dev]" -c .ci/constraints-min.txt
"$py" - <<'PY'
from importlib.metadata import version
for name in ("jax", "jaxlib", "optax", "flax", "chex", "orbax-checkpoint", "numpy", "scipy"):
  print(f"{name}=={version(name)}")
PY
exec "$py" -m pytest -q "$@"
