#!/usr/bin/env bash
# One-shot GPU check: everything a GPU session needs to know, in one run of under 5 minutes on one H200, with
# only the repository copied to the machine (not installed) and no network.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine, from anywhere in the repository
#   bash benchmarks/gpu_check.sh --dry-run   # the same script at tiny shapes on a CPU (part of `make test`;
#                                            # ~20 s of CPU time, 40-80 s wall on a busy 2-core box)
#   PYTHON=/path/to/python GIT_COMMIT=<sha> bash benchmarks/gpu_check.sh
# On a device machine that gets a copy of the working tree: send .whl/ along, and pass GIT_COMMIT (a copy
# without .git cannot tell its commit otherwise).
#
# Parts, in order, each cut by `timeout` (the whole run stays within GPU_CHECK_BUDGET_S, default 270 s):
#   0. environment (nvidia-smi, versions) and the competitors' wheels: liger-kernel and cut-cross-entropy are
#      installed from the git-ignored .whl/ (fill it with `make gpu-wheels` where there is a network) with
#      --no-index into /tmp/site, only where the machine lacks them; a missing wheel is reported LOUDLY.
#   1. methods (<= 130 s): python -m benchmarks.gpu_check: ours_ntp, ours_nitp, Liger FLCE (defaults
#      and accum_dtype=fp32), CCE (default and cce_kahan_full_c), torch.compile'd chunked CE, unfused NITP,
#      naive NTP at d in {1280, 2560}, V=152064, N in {8192, 16384}, bf16; the other NITP loss types and the
#      gradient errors at d=1280, N=8192. Restarted with --resume after an error that poisons CUDA.
#   2. chunks (<= 40 s): python -m benchmarks.gpu_phases: chunk-size sweep 256..4096 and the per-phase
#      breakdown of our chunk loop (isolated timings).
#   3. tests (what the budget has left, >= 75 s): pytest -m cuda tests/ (every test marked `cuda`; the dry run:
#      tests/test_triton_cuda.py).
#      Test modules that cannot be imported here (the engine's extras are missing) are listed, not fatal.
#   4. summary: python -m benchmarks.gpu_summary: the goal per shape, printed plainly (ours_nitp / liger_flce
#      time, ours_nitp / liger_flce_fp32 peak memory; the goal is <= 1.0 each), the records, the verdict.
# Output: $OUT when set (the device tool's folder), else runs/gpu_check/ (runs/gpu_check/dry_run/ for --dry-run):
#   gpu_check.json  {"environment", "records", "chunk_sweep", "phases", "goal", "parts", "tests"}, rewritten after
#                   every measurement; gpu_check.log (all output); gpu_tests.log and gpu_tests.xml (pytest).
# Exit status: 0 when the check is clean (every part finished, no record ended in an error, out of memory or
# unmeasured, no CUDA test failed; see gpu_summary.py), else 1. The results are on disk either way.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
  "") ;;
  --dry-run) DRY_RUN=1 ;;
  -h|--help) sed -n '2,31p' "$0"; exit 0 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (allowed: --dry-run, --help)" >&2; exit 2 ;;
esac
PY=${PYTHON:-python3}
if [ "$DRY_RUN" = 1 ]; then RESULTS=${OUT:-runs/gpu_check/dry_run}; DRY=--dry-run; else RESULTS=${OUT:-runs/gpu_check}; DRY=; fi
mkdir -p "$RESULTS" || { echo "gpu_check.sh: cannot create $RESULTS" >&2; exit 2; }
JSON="$RESULTS/gpu_check.json"
rm -f "$JSON" "$RESULTS/gpu_tests.xml" "$RESULTS/gpu_tests.log"  # nothing of an earlier run may be read as this one's
exec > >(tee "$RESULTS/gpu_check.log") 2>&1
TEE_PID=$!
# every exit goes through here: the log must be complete when the caller collects the results folder
finish() { exec >&- 2>&-; wait "$TEE_PID" 2>/dev/null; exit "$1"; }
BUDGET=${GPU_CHECK_BUDGET_S:-270}  # + at most 5 s of kill grace per part: under 5 minutes in all
START=$SECONDS
remaining() { echo $(( BUDGET - (SECONDS - START) )); }
# seconds a part may take: what it asks for, but never past the budget minus what later parts reserve
part_limit() { local want=$1 reserve=$2 left; left=$(( $(remaining) - reserve )); echo $(( left < want ? left : want )); }
loud() { echo "################################################################################"
         for line in "$@"; do echo "## $line"; done
         echo "################################################################################"; }

export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/nitp_gpu_check/triton}
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/nitp_gpu_check/inductor}
echo "== 0. environment ($(date -u +%Y-%m-%dT%H:%M:%SZ), results in $RESULTS)"
timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit \
  --format=csv 2>&1 || echo "nvidia-smi: not available here"
CUDA=$(timeout 60 "$PY" -c 'import sys, torch, triton
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton",
      triton.__version__, file=sys.stderr)
print(int(torch.cuda.is_available()))') || { loud "$PY cannot import torch and triton: nothing can run"; finish 1; }
if [ "$CUDA" = 1 ]; then
  unset TRITON_INTERPRET
elif [ "$DRY_RUN" = 1 ]; then
  export TRITON_INTERPRET=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny shapes: one thread, no oversubscription
else
  loud "no CUDA device here: this is the GPU check; on a CPU run 'bash benchmarks/gpu_check.sh --dry-run'"
  finish 1
fi

# The competitors: from .whl/ where this python lacks them. The dry run installs present wheels into a
# temporary folder even where the packages exist, so that this path is exercised too.
SITE=/tmp/site
[ "$DRY_RUN" = 1 ] && SITE=$(mktemp -d)
for pair in liger_kernel:liger-kernel cut_cross_entropy:cut-cross-entropy; do
  module=${pair%%:*} dist=${pair##*:}
  wheel=$(ls .whl/"${module}"-*.whl 2>/dev/null | sort | tail -n 1)
  if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$module') is None)" 2>/dev/null \
     && { [ "$DRY_RUN" = 0 ] || [ -z "$wheel" ]; }; then
    echo "$dist: already installed for $PY"
  elif [ -z "$wheel" ]; then
    loud "MISSING: $dist is not installed here and .whl/ has no ${module}-*.whl wheel." \
         "Its methods will be recorded 'unavailable'; without liger-kernel the GOAL cannot be judged." \
         "Fix: run 'make gpu-wheels' on a machine with a network, and send .whl/ along with the repository."
  elif "$PY" -m pip --version >/dev/null 2>&1; then
    timeout 30 "$PY" -m pip install -q --no-index --no-deps --target "$SITE" "$wheel" \
      && echo "$dist: installed from $wheel into $SITE" || loud "FAILED to install $wheel into $SITE"
  else  # no pip: a pure-Python wheel is a zip archive laid out for site-packages
    timeout 30 "$PY" -m zipfile -e "$wheel" "$SITE" \
      && echo "$dist: unpacked $wheel into $SITE (no pip here)" || loud "FAILED to unpack $wheel into $SITE"
  fi
done
export PYTHONPATH="$PYTHONPATH:$SITE"

echo "== 1. methods against competitors ($(remaining) s left)"
METHODS_END=$(( SECONDS + $(part_limit 150 130) ))
RESUME= ATTEMPT=1
while :; do
  limit=$(( METHODS_END - SECONDS ))
  [ "$limit" -lt 30 ] && { METHODS_STATUS="not started: $limit s left"; break; }
  timeout -k 5 "$limit" "$PY" -m benchmarks.gpu_check --out "$JSON" --budget-s $(( limit - 20 )) $DRY $RESUME
  METHODS_STATUS=$?
  # 3: the CUDA context was poisoned by one method's error; a fresh process resumes after the recorded jobs
  if [ "$METHODS_STATUS" = 3 ] && [ "$ATTEMPT" -lt 4 ]; then
    ATTEMPT=$(( ATTEMPT + 1 )) RESUME=--resume
    echo "gpu_check.sh: methods part restarted (attempt $ATTEMPT) after a CUDA error"
    continue
  fi
  break
done
echo "gpu_check.sh: methods part exit status $METHODS_STATUS after $(( SECONDS - START )) s"

echo "== 2. chunk-size sweep and per-phase breakdown ($(remaining) s left)"
limit=$(part_limit 40 90)
if [ "$limit" -ge 25 ]; then
  timeout -k 5 "$limit" "$PY" -m benchmarks.gpu_phases --out "$JSON" --budget-s $(( limit - 15 )) $DRY
  CHUNKS_STATUS=$?
else
  CHUNKS_STATUS="not started: $limit s left"
fi
echo "gpu_check.sh: chunks part exit status $CHUNKS_STATUS after $(( SECONDS - START )) s"

TESTS=tests/
[ "$DRY_RUN" = 1 ] && TESTS=tests/test_triton_cuda.py  # collecting all of tests/ costs ~20 s on 2 cores
echo "== 3. pytest -m cuda $TESTS ($(remaining) s left)"
limit=$(part_limit 150 15)  # 75 s when the parts before used all of theirs
if [ "$limit" -lt 10 ]; then
  TESTS_STATUS="not started: $limit s left"
elif "$PY" -c "import pytest" >/dev/null 2>&1; then
  # -v: a run cut by the timeout still shows in the log which test was running (the XML comes only at the end)
  timeout -k 5 "$limit" "$PY" -m pytest -m cuda "$TESTS" -v -rs --durations=10 -p no:cacheprovider \
    --continue-on-collection-errors --junitxml="$RESULTS/gpu_tests.xml" 2>&1 | tee "$RESULTS/gpu_tests.log"
  TESTS_STATUS=${PIPESTATUS[0]}
else
  loud "pytest is not installed for $PY: the CUDA tests did not run"
  TESTS_STATUS="pytest missing"
fi
echo "gpu_check.sh: tests exit status $TESTS_STATUS after $(( SECONDS - START )) s"

echo "== 4. summary"
timeout -k 5 15 "$PY" -m benchmarks.gpu_summary --out "$JSON" $DRY --tests-log "$RESULTS/gpu_tests.log" \
  --tests-xml "$RESULTS/gpu_tests.xml" --part-status "methods=$METHODS_STATUS" \
  --part-status "chunks=$CHUNKS_STATUS" --part-status "tests=$TESTS_STATUS"
SUMMARY_STATUS=$?  # 0 only when every part finished and no CUDA test failed (see gpu_summary.py)
echo "gpu_check.sh: total $(( SECONDS - START )) s; results in $RESULTS"
[ "$DRY_RUN" = 1 ] && rm -rf "$SITE"
finish $(( SUMMARY_STATUS == 0 ? 0 : 1 ))
