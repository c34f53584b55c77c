#!/usr/bin/env bash
# Lint, format check, type check, then the test suite: the README's test command runs this after
# `scripts/install.sh test`, and so does CI (.ci/run). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
