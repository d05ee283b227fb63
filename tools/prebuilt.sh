# Shared by tools/prebuild_device.sh (which writes a build) and tools/gpu_check.sh (which
# installs it): where a build made for the GPU machine lies and how it is matched to the
# sources and the torch it was made for. Source this file; it defines functions only.

PREBUILT_DIR=${PREBUILT_DIR:-prebuilt}

# A short hash of everything the extension is compiled from. Paths are relative to the
# repository root, so the same tree gives the same hash on any machine, git or not.
source_hash() {
  (cd "${1:-.}" && find csrc setup.py -type f -print0 | LC_ALL=C sort -z |
     xargs -0 sha256sum | sha256sum | cut -c1-16)
}

# stamp_value FILE KEY: the value of "KEY=value" in a stamp file (empty when absent).
stamp_value() {
  sed -n "s/^$2=//p" "$1" 2>/dev/null | head -n 1
}

# prebuilt_matches ROOT TORCH_VERSION: true when ROOT/$PREBUILT_DIR holds a library built
# from ROOT's sources against exactly that torch (a library for another torch may load and
# still break: the C++ ABI of libtorch is not stable across releases).
prebuilt_matches() {
  local dir="$1/$PREBUILT_DIR"
  [ -f "$dir/_C.abi3.so" ] && [ -f "$dir/STAMP" ] || return 1
  [ "$(stamp_value "$dir/STAMP" torch)" = "$2" ] || return 1
  [ "$(stamp_value "$dir/STAMP" sources)" = "$(source_hash "$1")" ]
}
