#!/usr/bin/env bash
# The test command: sets up .venv on a fresh machine (launch/setup_env.sh) and runs the CPU
# test-suite, slow tests excluded (pass `-m slow`, or any pytest arguments, to change that).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh test
exec .venv/bin/python -m pytest -q -m "not slow" -n 2 "$@"
