#!/usr/bin/env bash
# The Pallas kernel tests on this machine's GPU (CI runs the same tests on CPU, the kernels in
# interpret mode): the compiled Triton and Mosaic GPU kernels against the float64 oracles and the
# xla paths, slow tests included. Compiling dominates, so several pytest workers (pytest-xdist,
# where installed) share the GPU, which then must not be preallocated. Arguments go to pytest.
#
#   bash launch/gpu_tests.sh                      # every kernel test file
#   bash launch/gpu_tests.sh -k "mlstm or delta"  # a subset
#   GPU_TEST_WORKERS=4 PYTHON=.venv/bin/python bash launch/gpu_tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
export JAX_PLATFORMS=cuda XLA_PYTHON_CLIENT_PREALLOCATE=false
workers=()
if "$python" -c "import xdist" 2>/dev/null; then
  workers=(-n "${GPU_TEST_WORKERS:-8}")
fi
exec "$python" -m pytest -q -p no:warnings "${workers[@]}" \
  tests/ops/test_gated_pallas.py tests/ops/test_delta_pallas.py tests/ops/test_mlstm_pallas.py \
  tests/ops/test_rat_pallas.py tests/ops/test_rat_aggregate.py tests/ops/test_rat_segments.py \
  tests/ops/test_attention_pallas.py tests/ops/test_attention_mgpu.py \
  tests/ops/test_paged_attention_pallas.py "$@"
