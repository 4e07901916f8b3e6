#!/usr/bin/env bash
# Install nemotron-jax with its test references into .venv and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/ruff check nemotron_jax tests scripts benchmarks colab
.venv/bin/python -m pytest -q -n 2 --durations=15 "$@"
