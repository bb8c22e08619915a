#!/usr/bin/env bash
# Multi-node GPU training under SLURM: one process per node drives that node's GPUs, and
# jax.distributed.initialize() reads the job layout from SLURM. Two minutes before the time limit
# SLURM sends SIGTERM; the trainer then saves a checkpoint and exits, and resubmitting the same
# command resumes from it. --workdir must be on a filesystem all nodes share.
#
# Once, on a login node (Python >= 3.12):
#   python3 -m venv .venv && .venv/bin/pip install -e . "jax[cuda13]==0.11.2"
# Then:
#   sbatch --nodes=4 launch/slurm_gpu.sh --config rat_local_1b3 --workdir /shared/runs/rat_local_1b3
#
#SBATCH --job-name=jaxchunk
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@120
#SBATCH --output=slurm-%j.out
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
export PYTHONUNBUFFERED=1
srun --kill-on-bad-exit=1 .venv/bin/python launch/train.py --distributed=on "$@"
