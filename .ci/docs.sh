#!/usr/bin/env bash
# CI: build the reference in docs/ (mkdocs + mkdocstrings) in strict mode, so that a broken
# link, a missing anchor or a docstring that does not parse fails the build.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --disable-pip-version-check -e ".[docs]"
python3 -m mkdocs build --strict --site-dir "${SITE_DIR:-site}"
