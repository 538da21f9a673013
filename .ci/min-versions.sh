#!/usr/bin/env bash
# CI: tests against the oldest supported dependency versions (.ci/constraints-min.txt), in a
# fresh venv. MIN_VENV chooses the venv's location; MIN_VENV_REUSE=1 keeps an existing one.
# By default a slice of the suite that exercises every API the floors are about (the transform
# and its stages, pinned numerics, checkpoints, optax/Flax/NNX/Haiku integration and capture,
# JAX's transforms and trace internals that capture patches or reads, sharding on one device);
# arguments replace it (e.g. `bash .ci/min-versions.sh tests` for the whole suite), which keeps
# CI within its time budget on 2 cores. Left to the newest-versions job: test_sharding's run of
# the file on 8 forced devices (a child process, the longest test) and the files that exercise
# sngd's own logic over those same APIs (accumulation, errors, seq2seq, GNN, packed sequences,
# the Haiku gaps, training tricks).
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
if [ "${MIN_VENV_REUSE:-0}" != "1" ] || [ ! -x "$venv/bin/python" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
fi
py="$venv/bin/python"
# The haiku extra too: its floor (dm-haiku in constraints-min.txt) is checked against jax's.
"$py" -m pip install -q --disable-pip-version-check -e ".[dev,haiku]" -c .ci/constraints-min.txt
"$py" - <<'PY'
from importlib.metadata import version
for name in ("jax", "jaxlib", "optax", "flax", "chex", "orbax-checkpoint", "numpy", "scipy",
             "dm-haiku"):
  print(f"{name}=={version(name)}")
PY
if [ "$#" -eq 0 ]; then
  set -- tests/test_pinned.py tests/test_transform.py tests/test_checkpoint.py \
    tests/test_optax_compat.py tests/test_train_state.py tests/test_capture.py \
    tests/test_nnx_layers.py tests/test_sharding.py tests/test_haiku.py tests/test_nnx_idioms.py \
    tests/test_optax_wrappers.py tests/test_cond.py tests/test_lax_map.py \
    tests/test_capture_threads.py tests/test_closed_over_copies.py \
    --deselect tests/test_sharding.py::test_on_8_forced_devices
fi
exec "$py" -m pytest -q -n auto --dist loadfile "$@"
