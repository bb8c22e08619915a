#!/usr/bin/env bash
# Trains on every worker of a Cloud TPU VM pod slice with one command: each worker clones (or
# updates) the repository at this checkout's commit, installs jaxchunk with jax[tpu] into .venv
# (workers need Python >= 3.12), and runs launch/train.py; jax.distributed.initialize() finds the
# other workers itself. --workdir must be storage every worker sees (a Filestore/NFS or gcsfuse
# mount): checkpoints are written by all workers together.
#
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       --config rat_local_350m --workdir /mnt/shared/runs/rat_local_350m --set run.steps=50000
#
# Optional: PROJECT (gcloud project), REPO_URL (default: this clone's origin), REF (default: HEAD).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
REPO_URL="${REPO_URL:-$(git config --get remote.origin.url)}"
REF="${REF:-$(git rev-parse HEAD)}"
ARGS="$(printf ' %q' "$@")"

gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" ${PROJECT:+--project "$PROJECT"} \
  --worker=all --command "
set -euo pipefail
[ -d jaxchunk ] || git clone -q '$REPO_URL' jaxchunk
cd jaxchunk && git fetch -q origin && git checkout -q '$REF'
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -e . 'jax[tpu]==0.11.2'
exec .venv/bin/python launch/train.py --distributed=on $ARGS"
