#!/usr/bin/env bash
# Type-checks sngd_jax/ with pyright ([tool.pyright] in pyproject.toml: basic mode).
# Needs the dev extra (pip install -e ".[dev]"): pyright and the Node it runs on.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m pyright "$@"
