#!/usr/bin/env bash
# Creates .venv and installs edge-prune with pinned dependencies. Safe to re-run: it skips
# the install when requirements have not changed since the last successful run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
# Headless Chromium renders the profiling report in the tests (Debian's package).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "[setup] installing Debian's chromium for the report-rendering test"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
stamp=.venv/.edge-prune-setup
want=$(cat requirements/*.txt pyproject.toml | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
echo "[setup] installing torch==2.13.0 first (CPU build), then the pinned rest"
pip install torch==2.13.0
pip install -r requirements/core.txt -c requirements/constraints.txt
pip install --no-deps -e .
echo "$want" > "$stamp"
echo "[setup] done"
