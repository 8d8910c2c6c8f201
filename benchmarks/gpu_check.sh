#!/usr/bin/env bash
# GPU check of the "triton" backend, for one GPU machine (budget: under 5 minutes on one H200: the tests are
# cut at 110 s and the benchmark at 170 s; what the benchmark measured before a cut is already in its JSON).
#
#   bash benchmarks/gpu_check.sh            # from anywhere in the repository; uses the machine's python3
#   PYTHON=/path/to/python bash benchmarks/gpu_check.sh
#
# 1. the CUDA tests (tests/test_triton_cuda.py: triton vs reference, fp32 and bf16, compiled kernels);
# 2. the op benchmark (benchmarks/gpu_op_bench.py: fused_nitp_loss and fused_linear_cross_entropy against Liger's
#    FLCE, Cut Cross-Entropy and the naive paths; d=1280, V=152064, N in {8192, 16384}, bf16), which prints the
#    check `fused_nitp_loss time <= 1.1*(1+12*d/V) * fused_linear_cross_entropy time`.
# Results go to $OUT when it is set (the device tool's output folder), else benchmarks/results/, as they come in:
# gpu_env.txt, gpu_tests.log, gpu_op_bench.json (rewritten after every measurement), gpu_op_bench.log.
# Nothing is downloaded: pure-Python wheels the machine lacks (liger-kernel, cut-cross-entropy) are taken from the
# git-ignored folder .whl/ when present (fill it with `pip download --no-deps -d .whl liger-kernel
# cut-cross-entropy` on a machine with a network) and installed with --no-index into /tmp/site.
# Exit status: that of the CUDA tests (the benchmark's FAIL of the check is reported, not fatal).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
RESULTS=${OUT:-benchmarks/results}
mkdir -p "$RESULTS"
unset TRITON_INTERPRET
export PYTHONPATH=".:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "commit: $(git rev-parse HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi failed"
  $PY -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__,
"cuda", torch.version.cuda, "triton", triton.__version__, "gpu", torch.cuda.get_device_name(0)
if torch.cuda.is_available() else "NONE")' 2>&1
} | tee "$RESULTS/gpu_env.txt"

# bring along only what this machine lacks; a failed install leaves that competitor recorded as unavailable
for pair in liger_kernel:liger_kernel cut_cross_entropy:cut_cross_entropy; do
  module=${pair%%:*}
  if ! $PY -c "import $module" >/dev/null 2>&1; then
    wheels=$(ls .whl/${module}-*.whl 2>/dev/null | head -n 1)
    if [ -n "$wheels" ]; then
      $PY -m pip install -q --no-index --no-deps --target /tmp/site "$wheels" 2>&1 | tail -n 2 \
        || echo "gpu_check: could not install $wheels"
    else
      echo "gpu_check: $module is not installed and no wheel is in .whl/; its benchmark row records the error"
    fi
  fi
done

echo "== CUDA tests (triton vs reference, fp32 and bf16)"
if $PY -c "import pytest" >/dev/null 2>&1; then
  timeout 110 $PY -m pytest -q -p no:cacheprovider tests/test_triton_cuda.py -rs 2>&1 | tee "$RESULTS/gpu_tests.log"
else
  timeout 110 $PY tests/test_triton_cuda.py 2>&1 | tee "$RESULTS/gpu_tests.log"
fi
tests_status=${PIPESTATUS[0]}
echo "gpu_check: CUDA tests exit status $tests_status after $(( $(date +%s) - started )) s"

echo "== op benchmark"
timeout 170 $PY benchmarks/gpu_op_bench.py --out "$RESULTS/gpu_op_bench.json" 2>&1 | tee "$RESULTS/gpu_op_bench.log"
echo "gpu_check: benchmark exit status ${PIPESTATUS[0]}; total $(( $(date +%s) - started )) s; results in $RESULTS"
exit "$tests_status"
