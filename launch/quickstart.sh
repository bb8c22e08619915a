#!/usr/bin/env bash
# The main job: sets up .venv on a fresh machine (launch/setup_env.sh) and trains the `quickstart`
# preset end to end on CPU (or the local accelerator): train, checkpoint, validation loss against the
# corpus's unigram byte entropy, and a sample. About 4-6 minutes on 2 CPU cores. Extra arguments go
# to launch/train.py (e.g. --set run.steps=50).
set -euo pipefail
cd "$(dirname "$0")/.."

bash launch/setup_env.sh
WORKDIR="${WORKDIR:-runs/quickstart}"
exec .venv/bin/python launch/train.py --config quickstart --workdir "$WORKDIR" "$@"
