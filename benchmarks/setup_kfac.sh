#!/usr/bin/env bash
# Creates the pinned virtual environment that benchmarks/kfac_runner.py runs in.
# kfac-jax 0.0.8 needs JAX <= 0.6 (it fails to trace on current JAX), so it cannot
# share the project's environment.   Usage: bash benchmarks/setup_kfac.sh
#   KFAC_VENV=/path bash benchmarks/setup_kfac.sh   (default /opt/kfac-venv)
set -euo pipefail
VENV="${KFAC_VENV:-/opt/kfac-venv}"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --disable-pip-version-check \
  'kfac-jax==0.0.8' 'jax[cpu]==0.6.*' 'optax' 'numpy<2.3'
"$VENV/bin/python" -c "import kfac_jax, jax; print('kfac-jax', kfac_jax.__version__, 'jax', jax.__version__)"
