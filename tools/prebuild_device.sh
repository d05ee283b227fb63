#!/usr/bin/env bash
# Build the extension, CUDA kernels included, for a GPU machine's torch, on a machine
# without a GPU, so that time on the GPU machine is not spent compiling; then check that
# build here.
#
#   bash tools/prebuild_device.sh          # writes prebuilt/_C.abi3.so and prebuilt/STAMP
#   OUT=out bash tools/gpu_check.sh        # then, on the GPU machine, with prebuilt/ copied
#
# tools/gpu_check.sh installs prebuilt/_C.abi3.so instead of building when prebuilt/STAMP
# names the torch it finds there and the hash of the current sources (tools/prebuilt.sh);
# otherwise it builds as before. The library uses only CPython's stable ABI, so a build
# made with this machine's Python loads in the GPU machine's (3.12).
#
# Steps: a virtual environment with the GPU machine's torch (the CUDA wheel from the
# registry: it installs and imports without a GPU); a copy of the working tree (what the
# GPU machine gets: tracked and untracked files, not ignored ones); setup.py build_ext with
# TORCH_CUDA_ARCH_LIST; then, under that torch: the library loads with its CUDA kernels
# registered, the GPU tests are collected (they skip here), and CHECK picks which CPU tests
# run (quick: the op, the layer and parity; full: all; none).
#
# Environment:
#   DEVICE_TORCH=2.11.0       torch of the GPU machine
#   TORCH_CUDA_ARCH_LIST=9.0  targets (H100 and H200 are 9.0)
#   VENV=/tmp/pconv-device-venv   kept between runs; remade when its torch differs
#   CUDA_HOME                 toolkit root (default: /usr/local/cuda, else from nvcc)
#   CHECK=quick|full|none
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source tools/prebuilt.sh

DEVICE_TORCH=${DEVICE_TORCH:-2.11.0}
ARCH=${TORCH_CUDA_ARCH_LIST:-9.0}
VENV=${VENV:-/tmp/pconv-device-venv}
CHECK=${CHECK:-quick}
if [ -z "${CUDA_HOME:-}" ]; then
  if [ -x /usr/local/cuda/bin/nvcc ]; then
    CUDA_HOME=/usr/local/cuda
  elif command -v nvcc >/dev/null; then
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")"
  else
    echo "prebuild_device: no CUDA toolkit found (set CUDA_HOME)" >&2; exit 1
  fi
fi
export CUDA_HOME

PY="$VENV/bin/python"
if ! "$PY" -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$DEVICE_TORCH' or torch.version.cuda is None)" 2>/dev/null; then
  echo "== environment: torch $DEVICE_TORCH with CUDA in $VENV"
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  "$PY" -m pip install -q --disable-pip-version-check "torch==$DEVICE_TORCH" \
      ninja setuptools wheel numpy pillow pytest pytest-benchmark
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
git ls-files -z -co --exclude-standard | tar --null -T - -cf - | tar -xf - -C "$WORK"
HASH="$(source_hash "$WORK")"

echo "== build: torch $TORCH_VERSION, TORCH_CUDA_ARCH_LIST=$ARCH, sources $HASH"
SECONDS=0
if ! (cd "$WORK" && TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
      "$PY" setup.py build_ext --inplace >"$WORK/build.log" 2>&1); then
  tail -40 "$WORK/build.log"; exit 1
fi
echo "   built in ${SECONDS} s"

echo "== check under torch $TORCH_VERSION"
(cd "$WORK" && "$PY" - <<'PY'
import torch
import pconv_cuda
assert pconv_cuda._C.__file__.endswith("_C.abi3.so"), pconv_cuda._C.__file__
assert pconv_cuda.has_cuda_kernels(), "the CUDA kernels are not registered"
print("   CUDA kernels registered; torch", torch.__version__, "CUDA", torch.version.cuda)
PY
)
collected="$(cd "$WORK" && "$PY" -m pytest -q -p no:cacheprovider -m gpu --collect-only tests | tail -n 1)"
echo "   GPU tests: $collected"
case "$CHECK" in
  quick) (cd "$WORK" && "$PY" -m pytest -q -x -p no:cacheprovider tests/test_build.py \
            tests/test_op.py tests/test_module.py tests/test_parity.py | tail -n 1) ;;
  full) (cd "$WORK" && "$PY" -m pytest -q -x -p no:cacheprovider tests | tail -n 1) ;;
  none) ;;
  *) echo "prebuild_device: CHECK must be quick, full or none" >&2; exit 1 ;;
esac

mkdir -p "$PREBUILT_DIR"
cp "$WORK/pconv_cuda/_C.abi3.so" "$PREBUILT_DIR/_C.abi3.so"
cat >"$PREBUILT_DIR/STAMP" <<STAMP
torch=$TORCH_VERSION
cuda=$("$PY" -c 'import torch; print(torch.version.cuda)')
arch=$ARCH
sources=$HASH
built=$(date -u +%Y-%m-%dT%H:%M:%SZ)
STAMP
echo "== $PREBUILT_DIR/_C.abi3.so ($(du -m "$PREBUILT_DIR/_C.abi3.so" | cut -f1) MB); copy \"$PREBUILT_DIR\" to the GPU machine"
cat "$PREBUILT_DIR/STAMP"
