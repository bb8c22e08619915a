#!/usr/bin/env bash
# Downloads the benchmark peers that the GPU machine lacks (it has jax 0.11.2, torch and triton,
# and no network) as Python 3.12 x86-64 wheels into .whl/ at the repository root (git-ignored):
# FLA and fla-core (bench/linear_kernels.py), jax-linear-attention (jla), mlstm_kernels, and
# tokamax with the pure-Python packages it imports (bench/attention.py). Versions are the ones the
# results in bench/results/ were measured with.
#
#   bash bench/peer_wheels.sh          # here, with network
# then, on the GPU machine (the wheels travel with the working tree; the device tool's `carry`):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD:$PWD/bench
set -euo pipefail
cd "$(dirname "$0")/.."
PEERS=(flash-linear-attention==0.6.0 fla-core==0.6.0 jax-linear-attention==0.1.0
       mlstm_kernels==2.0.6 tokamax==0.0.17 einshape==1.0 jaxtyping==0.3.11 wadler_lindig==0.1.8
       pydantic==2.14.4 pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
       qwix==0.1.8 immutabledict==4.3.1 tensorboardx==2.6.5)
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
mkdir -p .whl
"$PYTHON" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl "${PEERS[@]}"
ls .whl/*.whl
