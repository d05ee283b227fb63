#!/usr/bin/env bash
# Compile check of the CUDA kernels without a GPU.
#
# Compiles every csrc/cuda/*.cu with the installed nvcc to object files in a temporary
# directory, for sm_80 and sm_90, with the include paths and defines that
# torch.utils.cpp_extension uses for a CUDAExtension (plus the nvcc flags of setup.py).
# Nothing is linked or installed. Exits non-zero on the first error.
#
# Works against a CPU-only torch wheel: such a wheel ships the c10/cuda and ATen/cuda
# headers but not the generated c10/cuda/impl/cuda_cmake_macros.h; when it is missing, a
# stand-in with the content a CUDA wheel has on Linux (C10_CUDA_BUILD_SHARED_LIBS, which
# only matters on Windows) is put on the include path of this check. The kernels avoid
# ATen/cuda/CUDAContext.h, which needs cuBLAS/cuSPARSE/cuSOLVER headers that a minimal
# toolkit lacks.
#
# Environment:
#   NVCC=path           nvcc to use (default: nvcc on PATH, else $CUDA_HOME/bin/nvcc)
#   PYTHON=path         python whose torch provides the headers (default: python3)
#   ALLOW_NO_NVCC=1     exit 0 with a message when no nvcc is found (default: exit 1)
#   CUDA_STD=c++17      language standard (default c++17, as setup.py passes)
#   JOBS=n              parallel compiles (default: number of CPUs)
#   KEEP=1              keep the temporary directory (objects and logs)
#   ONLY=name           compile csrc/cuda/name.cu alone (with KEEP=1, for tools/sass_loops.py)
#   NVCC_EXTRA=flags    more nvcc flags, split at spaces ("-Xptxas -v": registers and spills
#                       per kernel, in the kept logs)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
CUDA_STD="${CUDA_STD:-c++17}"

# --- nvcc -------------------------------------------------------------------------------
NVCC="${NVCC:-}"
if [[ -z "$NVCC" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    NVCC="$(command -v nvcc)"
  elif [[ -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]]; then
    NVCC="$CUDA_HOME/bin/nvcc"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    NVCC=/usr/local/cuda/bin/nvcc
  fi
fi
if [[ -z "$NVCC" ]] || ! "$NVCC" --version >/dev/null 2>&1; then
  if [[ "${ALLOW_NO_NVCC:-0}" == "1" ]]; then
    echo "check_cuda_compile: nvcc not found; skipped (ALLOW_NO_NVCC=1)"
    exit 0
  fi
  echo "check_cuda_compile: ERROR: nvcc not found (set NVCC=/path/to/nvcc or CUDA_HOME," \
       "or ALLOW_NO_NVCC=1 to skip)" >&2
  exit 1
fi

# --- flags from the installed torch -----------------------------------------------------
if ! TORCH_INFO="$("$PYTHON" - <<'EOF'
import sysconfig
import torch
from torch.utils import cpp_extension as ce
print(torch.__version__)
print(int(torch._C._GLIBCXX_USE_CXX11_ABI))
print(sysconfig.get_paths()["include"])
print("\t".join(ce.include_paths()))
print("\t".join(getattr(ce, "COMMON_NVCC_FLAGS", [])))
EOF
)"; then
  echo "check_cuda_compile: ERROR: could not import torch with $PYTHON" >&2
  exit 1
fi
TORCH_VERSION="$(sed -n 1p <<<"$TORCH_INFO")"
CXX11_ABI="$(sed -n 2p <<<"$TORCH_INFO")"
PY_INCLUDE="$(sed -n 3p <<<"$TORCH_INFO")"
IFS=$'\t' read -r -a TORCH_INCLUDES <<<"$(sed -n 4p <<<"$TORCH_INFO")"
IFS=$'\t' read -r -a TORCH_NVCC_FLAGS <<<"$(sed -n 5p <<<"$TORCH_INFO")"

TMP="$(mktemp -d "${TMPDIR:-/tmp}/pconv_cuda_check.XXXXXX")"
cleanup() { if [[ "${KEEP:-0}" != "1" ]]; then rm -rf "$TMP"; else echo "kept $TMP"; fi; }
trap cleanup EXIT

INCLUDES=()
for dir in "${TORCH_INCLUDES[@]}"; do INCLUDES+=("-I$dir"); done
INCLUDES+=("-I$PY_INCLUDE")
NVCC_DIR="$(cd "$(dirname "$(readlink -f "$NVCC")")/.." && pwd)"
[[ -d "$NVCC_DIR/include" ]] && INCLUDES+=("-I$NVCC_DIR/include")

SHIMMED=""
if [[ ! -f "${TORCH_INCLUDES[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  mkdir -p "$TMP/shim/c10/cuda/impl"
  cat >"$TMP/shim/c10/cuda/impl/cuda_cmake_macros.h" <<'EOF'
#pragma once
// Stand-in for the header a CUDA build of torch generates (absent from CPU wheels).
#define C10_CUDA_BUILD_SHARED_LIBS
EOF
  INCLUDES+=("-I$TMP/shim")
  SHIMMED="c10/cuda/impl/cuda_cmake_macros.h (absent from this torch; stand-in used)"
fi

# torch's own nvcc flags first, then the ones older torch versions also passed, once each.
FLAGS=()
declare -A SEEN=()
for flag in "${TORCH_NVCC_FLAGS[@]}" -DCUDA_HAS_FP16=1 \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    --expt-relaxed-constexpr; do
  [[ -z "$flag" || -n "${SEEN[$flag]:-}" ]] && continue
  SEEN[$flag]=1
  FLAGS+=("$flag")
done
FLAGS+=(
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C
  "-D_GLIBCXX_USE_CXX11_ABI=$CXX11_ABI"
  --compiler-options -fPIC
  -O3 --use_fast_math "-std=$CUDA_STD"
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -Werror cross-execution-space-call
)
read -r -a EXTRA_FLAGS <<<"${NVCC_EXTRA:-}"
FLAGS+=("${EXTRA_FLAGS[@]}")

shopt -s nullglob
# Largest files first: the file that includes ATen takes the longest.
mapfile -t SOURCES < <(ls -S "$ROOT"/csrc/cuda/${ONLY:-*}.cu 2>/dev/null)
if [[ ${#SOURCES[@]} -eq 0 ]]; then
  echo "check_cuda_compile: ERROR: no csrc/cuda/*.cu found under $ROOT" >&2
  exit 1
fi

echo "check_cuda_compile: $("$NVCC" --version | tail -n 2 | head -n 1)"
echo "check_cuda_compile: torch $TORCH_VERSION, _GLIBCXX_USE_CXX11_ABI=$CXX11_ABI, -std=$CUDA_STD, sm_80 + sm_90"
[[ -n "$SHIMMED" ]] && echo "check_cuda_compile: shim: $SHIMMED"

JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
START=$SECONDS
pids=()
names=()
compile() {
  local src="$1" name
  name="$(basename "$src" .cu)"
  local t0=$SECONDS
  if "$NVCC" "${FLAGS[@]}" "${INCLUDES[@]}" -c "$src" -o "$TMP/$name.o" >"$TMP/$name.log" 2>&1; then
    echo "  ok    csrc/cuda/$name.cu  ($((SECONDS - t0)) s, $(stat -c %s "$TMP/$name.o") bytes)"
  else
    echo "  FAIL  csrc/cuda/$name.cu  ($((SECONDS - t0)) s)"
    # nvcc echoes the macro-expanded source line after each error: show the errors only.
    grep -E "(: error|: fatal|^nvcc fatal|[0-9]+ errors? detected)" "$TMP/$name.log" | cut -c1-300 |
      head -n 30 | sed 's/^/        /'
    return 1
  fi
}

failed=0
for src in "${SOURCES[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $JOBS ]]; do sleep 0.2; done
  compile "$src" &
  pids+=($!)
  names+=("$src")
done
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then failed=1; fi
done

# Warnings from our own files (not from torch's headers) are shown, not fatal.
for log in "$TMP"/*.log; do
  if grep -q "csrc/cuda/.*warning" "$log"; then
    echo "check_cuda_compile: warnings in $(basename "$log" .log).cu:"
    grep -A2 "csrc/cuda/.*warning" "$log" | head -n 20 | sed 's/^/        /'
  fi
done

if [[ $failed -ne 0 ]]; then
  echo "check_cuda_compile: FAILED after $((SECONDS - START)) s" >&2
  exit 1
fi
echo "check_cuda_compile: compiled ${#SOURCES[@]} file(s) for sm_80 and sm_90 in $((SECONDS - START)) s"
