#!/usr/bin/env bash
# Lints the whole tree (sngd_jax/, tests/, benchmarks/, examples/) with ruff ([tool.ruff] in
# pyproject.toml). Needs the dev extra (pip install -e ".[dev]").
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m ruff check "$@" .
