#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing, then runs a job.
#   bash run.sh main    # the default training comparison (table + plot)
#   bash run.sh test    # the fast test suite (pytest-xdist: one worker per core, a test file per worker)
set -euo pipefail
cd "$(dirname "$0")"

install() {
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null && \
     [ ! -d /usr/share/datasets/fashion-mnist ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
      echo "run.sh: could not install dataset-fashion-mnist; falling back to scikit-learn digits"
  fi
  python3 -m pip install -q --disable-pip-version-check -e ".[dev,equinox]"
}

case "${1:-}" in
  main) shift; install; exec python3 -m benchmarks.main "$@" ;;
  test) shift; install; exec python3 -m pytest -q -n auto --dist loadfile "$@" ;;
  *) echo "usage: bash run.sh main|test [args...]" >&2; exit 2 ;;
esac
