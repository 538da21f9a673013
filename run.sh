#!/usr/bin/env bash
# One entry point for a fresh machine: installs what is missing, then runs a job.
#   bash run.sh main    # the default training comparison (table + plot)
#   bash run.sh test    # the fast test suite (pytest-xdist: one worker per core, a test file per worker)
set -euo pipefail
cd "$(dirname "$0")"

PY=python3

# A system Python that refuses `pip install` outside a virtual environment (PEP 668's
# EXTERNALLY-MANAGED: Debian 12, Ubuntu 23.04 and later): install into ./.venv instead, made
# here once (with Debian's python3-venv when run as root and it is missing). Inside an
# activated environment, or on a Python that allows it, the packages go where pip puts them.
# SNGD_RUN_VENV=1 takes the .venv path on any Python.
choose_python() {
  if [ -n "${VIRTUAL_ENV:-}" ]; then return; fi
  if [ "${SNGD_RUN_VENV:-0}" != "1" ] && ! python3 -c 'import os, sys, sysconfig
sys.exit(not (sys.prefix == sys.base_prefix and os.path.exists(
    os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))'; then
    return
  fi
  if [ ! -x .venv/bin/python3 ]; then
    if ! python3 -m venv .venv >/dev/null 2>&1; then
      rm -rf .venv
      if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
        (apt-get update -qq && apt-get install -y -qq python3-venv) >/dev/null 2>&1 || true
      fi
      python3 -m venv .venv || {
        echo "run.sh: this Python refuses pip outside a virtual environment and cannot make" \
          "one: install python3-venv (apt-get install python3-venv), or activate an environment" >&2
        exit 1
      }
    fi
  fi
  PY=.venv/bin/python3
  echo "run.sh: installing into $(pwd)/.venv (an externally managed Python, PEP 668, or SNGD_RUN_VENV=1)"
}

install() {
  choose_python
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null && \
     [ ! -d /usr/share/datasets/fashion-mnist ]; then
    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 || \
      echo "run.sh: could not install dataset-fashion-mnist; falling back to scikit-learn digits"
  fi
  "$PY" -m pip install -q --disable-pip-version-check -e ".[dev,equinox,haiku]"
}

case "${1:-}" in
  main) shift; install; exec "$PY" -m benchmarks.main "$@" ;;
  test) shift; install; exec "$PY" -m pytest -q -n auto --dist loadfile "$@" ;;
  *) echo "usage: bash run.sh main|test [args...]" >&2; exit 2 ;;
esac
