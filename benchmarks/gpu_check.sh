#!/usr/bin/env bash
# The GPU check in one device call (at most ~9.5 minutes): the CUDA tests, then the pretraining
# benchmark, every log under $OUT (4 files: env.txt, test_cuda.log, gpu_pretrain.log, .json).
#
#   here, once:  bash benchmarks/gpu_wheels.sh      (the packages the GPU machine lacks -> .whl/)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".whl"], timeout_s 600
#
# The synthetic shards are made by the benchmark and the tests themselves. Knobs (environment):
#   TEST_TIMEOUT  seconds for pytest tests/test_cuda.py (default 220; the compile tests run last)
#   BENCH_BUDGET  --budget-s of benchmarks/gpu_pretrain.py (default 320)
#   BENCH_ARGS    more arguments for it, e.g. "--compile on --configs dinov2:none dinov2:paper"
#   SKIP_TESTS=1  benchmark only
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_check_out}
mkdir -p "$OUT"
W=$(mktemp -d)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" .whl/*.whl \
    || { echo "wheel install failed" | tee "$OUT/env.txt"; exit 1; }
  export PYTHONPATH="$W/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)" 2>&1 | tail -1
  git rev-parse --short HEAD 2>/dev/null || echo "commit: no .git here"
  nproc
} 2>&1 | tee "$OUT/env.txt"

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  per_test=()
  python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=150)
  timeout "${TEST_TIMEOUT:-220}" python3 -m pytest -v -rs --durations=15 -p no:cacheprovider "${per_test[@]}" \
    tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log"
  echo "pytest status: ${PIPESTATUS[0]}" | tee -a "$OUT/test_cuda.log"
fi

BUDGET=${BENCH_BUDGET:-320}
# shellcheck disable=SC2086  # BENCH_ARGS is a list of words
timeout $((BUDGET + 30)) python3 benchmarks/gpu_pretrain.py --budget-s "$BUDGET" --json "$OUT/gpu_pretrain.json" \
  ${BENCH_ARGS:-} 2>&1 | tee "$OUT/gpu_pretrain.log"
echo "benchmark status: ${PIPESTATUS[0]}" | tee -a "$OUT/gpu_pretrain.log"
