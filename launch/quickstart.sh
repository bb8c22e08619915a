#!/usr/bin/env bash
# The main job: on a fresh machine, creates .venv (Python >= 3.12) if it is missing, installs
# jaxchunk, and trains the `quickstart` preset end to end on CPU (or the local accelerator): train,
# checkpoint, validation loss vs the corpus's unigram byte entropy, and a sample. About 10 minutes
# on 2 CPU cores. Extra arguments go to launch/train.py (e.g. --set run.steps=50).
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
  echo "launch/quickstart.sh: no Python >= 3.12 found (set PYTHON=/path/to/python3.12)" >&2
  exit 1
}

if [ ! -x .venv/bin/python ]; then
  "$(find_python)" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e .
WORKDIR="${WORKDIR:-runs/quickstart}"
exec .venv/bin/python launch/train.py --config quickstart --workdir "$WORKDIR" "$@"
