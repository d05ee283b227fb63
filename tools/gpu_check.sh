#!/usr/bin/env bash
# Everything that needs a GPU, in one run that ends inside a time budget (BUDGET_MINUTES,
# default 9), most important first:
#
#   build     the extension with its CUDA kernels (sm_90 unless TORCH_CUDA_ARCH_LIST says),
#             or, when prebuilt/ holds one made for these sources and this torch by
#             tools/prebuild_device.sh (copy prebuilt/ along), that one
#   tests     every GPU test: pytest -m gpu (the CPU tests are CI's; the CUDA code's logic
#             is also tested without a GPU there, by the host build in test_cuda_host.py)
#   memcheck  compute-sanitizer memcheck on tools/memcheck_case.py (every kernel path, small)
#   routes    the UNets' few-output layers (64->3, 67->3) with and without each direct
#             kernel, side by side (benchmarks.routes, PCONV_CUDA_DIRECT), NCHW then
#             channels_last; the rows done when its limit ends it stay in routes.json
#   igemm     the implicit-GEMM forward and input gradient (PCONV_CUDA_IGEMM: both, each,
#             neither) against the cuDNN route, bfloat16, the 512 UNets' 3x3 unit-stride
#             layers with the largest outputs first, both layouts (benchmarks.routes
#             --igemm, igemm_routes.json)
#   bench     the GPU table, for whatever time is left: the training-step rows, then bfloat16,
#             float32 and float16, each at 512 then 256, multi-channel then single-channel
#             masks; rows are saved as measured and a later run goes on from BENCH_FROM;
#             then each row's floor from the bytes of the op's passes (benchmarks.bounds)
#   racecheck compute-sanitizer racecheck and synccheck on the op's own kernels (not in
#             the default steps: the host build's tests check barriers and thread order)
#   profile   the kernels behind the fused op's time at five layer shapes (benchmarks.profile)
#
#   bash tools/prebuild_device.sh                       # here, first: prebuilt/ (optional)
#   OUT=$OUT bash tools/gpu_check.sh                    # build tests memcheck routes igemm bench
#   STEPS="build bench" BUDGET_MINUTES=9 bash tools/gpu_check.sh
#
# Logs, the benchmark JSON, its Markdown, the routes' JSON and the floors land in $OUT
# (default ./gpu-out), at most eight files (a call brings back eight). To go on with the table in a later run, copy
# $OUT/bench.json to benchmarks/results/gpu.json (BENCH_FROM) and commit it first.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-out}
STEPS=${STEPS:-"build tests memcheck routes igemm bench"}
BUDGET=$(( ${BUDGET_MINUTES:-9} * 60 ))
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
status=0
SECONDS=0

step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
left() { echo $(( BUDGET - SECONDS )); }
# cap WANT [RESERVE]: the seconds a step may take, WANT at most, leaving RESERVE of the
# budget to the steps after it; at least 10 (timeout 0 would mean no limit at all).
cap() {
  local room=$(( $(left) - ${2:-0} ))
  local limit=$(( $1 < room ? $1 : room ))
  echo $(( limit > 10 ? limit : 10 ))
}
note() { echo "== $1 (at ${SECONDS} s of ${BUDGET} s)"; }

# The library loads, its CUDA kernels are registered, and one call runs on the GPU (a build
# for another architecture fails here, not in the middle of the tests).
check_library() {
  $PY - <<'PY'
import torch
import pconv_cuda
assert pconv_cuda.has_cuda_kernels(), "CUDA kernels not registered"
x = torch.rand(1, 2, 8, 8, device="cuda")
m = (torch.rand(1, 1, 8, 8, device="cuda") > 0.5).float()
out, upd = torch.ops.pconv.partial_conv2d(x, m, torch.rand(3, 2, 3, 3, device="cuda"), None,
                                          [1, 1], [1, 1], [1, 1], 1)
torch.cuda.synchronize()
assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
print("CUDA kernels:", torch.cuda.get_device_name(), "|", pconv_cuda._C.__file__)
PY
}

build() {
  source tools/prebuilt.sh
  local torch_version
  torch_version=$($PY -c "import torch; print(torch.__version__)")
  if prebuilt_matches . "$torch_version"; then
    note "build: $PREBUILT_DIR/_C.abi3.so ($(tr '\n' ' ' <"$PREBUILT_DIR/STAMP"))"
    rm -f pconv_cuda/_C*.so && cp "$PREBUILT_DIR/_C.abi3.so" pconv_cuda/
    check_library && return
    echo "the prebuilt library failed its check; building here"
  fi
  export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
  note "build (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST)"
  rm -f pconv_cuda/_C*.so
  if ! $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; exit 1
  fi
  rm -f "$OUT/build.log"  # kept only when the build fails: a call brings back eight files
  check_library || exit 1
}

sanitizer() {
  # Not always on PATH: the toolkit's bin holds it.
  command -v compute-sanitizer ||
    ls "${CUDA_HOME:-/usr/local/cuda}"/bin/compute-sanitizer /usr/local/cuda*/bin/compute-sanitizer \
       2>/dev/null | head -n 1
}

# A machine given back between calls comes back bare: later steps build first if the
# extension with its CUDA kernels is not there.
if step build || ! $PY -c "import pconv_cuda; assert pconv_cuda.has_cuda_kernels()" 2>/dev/null; then
  build
fi
if step tests; then
  # At most 4 minutes, leaving 2 for memcheck and the table when they follow.
  limit=$(cap 240 $( (step memcheck || step bench) && echo 120 || echo 0))
  # Four processes share the GPU where pytest-xdist is installed: most GPU tests are
  # small calls whose time is Python's and the compiler's, not the GPU's.
  workers=$($PY -c "import xdist" 2>/dev/null && echo "-n ${TEST_WORKERS:-4}")
  note "tests (limit ${limit} s${workers:+, $workers})"
  # SIGINT at the limit, so that pytest stops as after a Ctrl-C and still prints the
  # failures and the summary (-rfEs: failed, errors, skips); SIGKILL 30 s later.
  timeout -s INT -k 30 "$limit" $PY -m pytest -q -p no:cacheprovider -m gpu -rfEs --durations=15 \
      $workers tests 2>&1 | tee "$OUT/tests.log" | tail -40
  rc=${PIPESTATUS[0]}
  [ "$rc" -eq 124 ] && echo "tests: stopped at the time limit"
  status=$((status | rc))
fi
if step memcheck; then
  limit=$(cap 180 $(step bench && echo 60 || echo 0))
  note "compute-sanitizer memcheck (limit ${limit} s)"
  # Without the caching allocator every tensor is its own allocation, so memcheck sees an
  # access past a tensor's end (inside a cached block it would not). Only the op's own
  # kernels (names holding "pconv") are instrumented: cuDNN's would take minutes. PYTHONPATH:
  # the script's folder, not the repository root, is on sys.path.
  # CUDA API errors that torch or cuDNN meet (and handle) on their own are not the
  # kernels' doing: where this compute-sanitizer can, it leaves them out of the count.
  api_flag=$("$(sanitizer)" --help 2>/dev/null | grep -q -- "--report-api-errors" &&
             echo "--report-api-errors no")
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" \
      timeout -s INT -k 30 "$limit" "$(sanitizer)" --tool memcheck --kernel-name kns=pconv \
      --error-exitcode 9 $api_flag $PY tools/memcheck_case.py >"$OUT/sanitizer.log" 2>&1
  rc=$?; tail -5 "$OUT/sanitizer.log"
  if [ "$rc" -eq 9 ] && ! grep -qE "Invalid __(global|shared|local)__|Misaligned|out of bounds" \
      "$OUT/sanitizer.log"; then
    echo "memcheck: exit 9 from CUDA API errors only, no invalid access in a kernel"
  fi
  status=$((status | rc))
fi
if step routes; then
  limit=$(cap 90 $(( $(step igemm && echo 75 || echo 0) + $(step bench && echo 60 || echo 0) )))
  note "routes of the few-output layers (limit ${limit} s)"
  # New groups of rows stop well before the limit, so that the run ends by itself.
  minutes=$($PY -c "print(max(0.0, ($limit - 30) / 60))")
  timeout -s INT -k 15 "$limit" $PY -m benchmarks.routes --json "$OUT/routes.json" \
      --max-minutes "$minutes" 2>&1 | tail -20
  rc=${PIPESTATUS[0]}
  status=$((status | rc))
fi
if step igemm; then
  limit=$(cap 75 $(step bench && echo 60 || echo 0))
  note "routes of the implicit-GEMM kernels (limit ${limit} s)"
  minutes=$($PY -c "print(max(0.0, ($limit - 25) / 60))")
  timeout -s INT -k 15 "$limit" $PY -m benchmarks.routes --igemm --sizes 512 --dtypes bfloat16 \
      --modes multi --json "$OUT/igemm_routes.json" --max-minutes "$minutes" 2>&1 | tail -12
  rc=${PIPESTATUS[0]}
  status=$((status | rc))
fi
if step bench; then
  minutes=$($PY -c "print(max(0.0, ($(left) - 45) / 60))")  # 45 s for the last row and the table
  note "benchmark (${minutes} min)"
  BENCH_FROM=${BENCH_FROM:-benchmarks/results/gpu.json}
  [ -f "$BENCH_FROM" ] && cp "$BENCH_FROM" "$OUT/bench.json"
  if step tests; then
    # After the tests only a few minutes are left: a first side-by-side look (bfloat16
    # and float32 at 256, multi-channel masks, no torch.compile column, whose graphs take
    # minutes to build). A later run with STEPS="build bench" adds the compiled column to
    # these rows (--resume measures what a row lacks) and measures the rest.
    selection=(--dtypes bfloat16 float32 --sizes 256 --modes multi --skip compiled --no-model)
  else
    selection=(--dtypes bfloat16 float32 float16 --sizes 512 256 --modes multi single)
  fi
  $PY -m benchmarks --preset gpu "${selection[@]}" --resume --json "$OUT/bench.json" \
      --markdown "$OUT/bench.md" --max-minutes "$minutes" >"$OUT/bench.log" 2>&1
  status=$((status | $?))
  tail -3 "$OUT/bench.log"
  # The floor of each row from the bytes of the op's own passes (benchmarks/bounds.py).
  $PY -m benchmarks.bounds --json "$OUT/bench.json" >"$OUT/bounds.txt" 2>&1 && tail -1 "$OUT/bounds.txt"
fi
if step racecheck; then
  # Shared-memory hazards and barrier misuse, in the op's own kernels only (kernel names
  # holding "pconv"): the mask pass stages windows in shared memory, and the channels_last
  # bias reduction sums across a block. One log with memcheck's: a call brings back 8 files.
  for tool in racecheck synccheck; do
    limit=$(cap 180)
    note "compute-sanitizer $tool (limit ${limit} s)" | tee -a "$OUT/sanitizer.log"
    PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" timeout "$limit" "$(sanitizer)" --tool $tool \
        --kernel-name kns=pconv --error-exitcode 9 $PY tools/memcheck_case.py >"$OUT/$tool.tmp" 2>&1
    rc=$?; cat "$OUT/$tool.tmp" >>"$OUT/sanitizer.log"; tail -3 "$OUT/$tool.tmp"
    rm -f "$OUT/$tool.tmp"; status=$((status | rc))
  done
fi
if step profile; then
  note "profile"
  timeout "$(cap 120)" $PY -m benchmarks.profile --out "$OUT/profile.txt" >/dev/null 2>"$OUT/profile.err"
  rc=$?; [ $rc -ne 0 ] && tail -5 "$OUT/profile.err"; rm -f "$OUT/profile.err"
  status=$((status | rc))
fi
note "done, status $status"
exit $status
