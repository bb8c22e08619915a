#!/usr/bin/env bash
# Sets up a fresh machine: creates .venv at the repository root with Python >= 3.12 if it is
# missing, and installs jaxchunk into it (editable) with the extras named in $1, if any
# (e.g. `bash launch/setup_env.sh test`). tests/run.sh and launch/quickstart.sh start with it.
set -euo pipefail
cd "$(dirname "$0")/.."

find_python() {
  local candidate
  for candidate in "${PYTHON:-}" python3.13 python3.12 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 && "$candidate" -c \
        'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      command -v "$candidate"; return
    fi
  done
  # pyenv keeps interpreters that are not on PATH.
  for candidate in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.1[2-9]*/bin/python; do
    if [ -x "$candidate" ]; then echo "$candidate"; return; fi
  done
  echo "launch/setup_env.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${1:+[$1]}"
