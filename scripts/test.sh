#!/usr/bin/env bash
# Installs neural_em with its test dependencies into ./.venv (and PostgreSQL, for the
# observer tests), then runs the whole test suite. This is the README's test command.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_postgres.sh
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/python -m pytest -q -p no:cacheprovider tests
