#!/usr/bin/env bash
# Everything that needs a GPU, in one go: build with the CUDA kernels, run the whole test
# suite (GPU tests included), run a small case under compute-sanitizer (memcheck, then
# racecheck and synccheck on the op's kernels), and the GPU benchmark. Logs and the
# benchmark JSON and Markdown land in $OUT (default ./gpu-out).
#
#   bash tools/gpu_check.sh            # all steps
#   STEPS="build tests" bash tools/gpu_check.sh
#
# The GPU benchmark takes longer than one device call may run, so it measures for
# BENCH_MINUTES (default 8) and goes on from BENCH_FROM (default
# benchmarks/results/gpu.json, when present): copy $OUT/bench.json back there and run the
# bench step again until the runner no longer says rows are left.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-"build tests memcheck profile bench"}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0

step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }

build() {
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  echo "== build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
  fi
  $PY -c "import pconv_cuda, torch; assert pconv_cuda.has_cuda_kernels(); print('CUDA kernels:', torch.cuda.get_device_name())"
}

# A machine given back between calls comes back bare: later steps build first if the
# extension with its CUDA kernels is not there.
if step build || ! $PY -c "import pconv_cuda; assert pconv_cuda.has_cuda_kernels()" 2>/dev/null; then
  build
fi
if step tests; then
  echo "== tests"
  $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_parity.py tests/test_op.py \
      tests/test_module.py tests/test_errors.py tests/test_inpaint.py 2>&1 | tee "$OUT/tests.log" | tail -15
  status=$((status | ${PIPESTATUS[0]}))
fi
if step memcheck; then
  echo "== compute-sanitizer memcheck"
  # Not always on PATH: the toolkit's bin holds it.
  SANITIZER=$(command -v compute-sanitizer ||
              ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer \
                 /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -n 1)
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end (inside a cached block it would not). PYTHONPATH: the
  # script's folder, not the repository root, is on sys.path.
  # One log for the three tools: $OUT brings back at most 8 files.
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      "${SANITIZER:-compute-sanitizer}" --tool memcheck --error-exitcode 9 \
      $PY tools/memcheck_case.py >"$OUT/sanitizer.log" 2>&1
  rc=$?; tail -5 "$OUT/sanitizer.log"; status=$((status | rc))
  # Shared-memory hazards and barrier misuse, in the op's own kernels only (kernel names
  # holding "pconv"): the mask pass stages windows in shared memory, and the channels_last
  # bias reduction sums across a block.
  for tool in racecheck synccheck; do
    echo "== compute-sanitizer $tool" | tee -a "$OUT/sanitizer.log"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
        "${SANITIZER:-compute-sanitizer}" --tool $tool --kernel-name kns=pconv \
        --error-exitcode 9 $PY tools/memcheck_case.py >"$OUT/$tool.tmp" 2>&1
    rc=$?; cat "$OUT/$tool.tmp" >>"$OUT/sanitizer.log"; tail -3 "$OUT/$tool.tmp"
    rm -f "$OUT/$tool.tmp"; status=$((status | rc))
  done
fi
if step profile; then
  # The kernels behind the fused op's time at five layer shapes, next to the plain conv's.
  echo "== profile"
  $PY -m benchmarks.profile --out "$OUT/profile.txt" >/dev/null 2>"$OUT/profile.err"
  rc=$?; [ $rc -ne 0 ] && tail -5 "$OUT/profile.err"; rm -f "$OUT/profile.err"
  status=$((status | rc))
fi
if step bench; then
  echo "== benchmark"
  BENCH_FROM=${BENCH_FROM:-benchmarks/results/gpu.json}
  [ -f "$BENCH_FROM" ] && cp "$BENCH_FROM" "$OUT/bench.json"
  $PY -m benchmarks --preset gpu --resume --json "$OUT/bench.json" --markdown "$OUT/bench.md" \
      --max-minutes "${BENCH_MINUTES:-8}" >"$OUT/bench.log" 2>&1
  status=$((status | $?))
  tail -3 "$OUT/bench.log"
fi
exit $status
