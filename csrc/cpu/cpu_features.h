// What the CPU kernels may use of the CPU they run on.
#pragma once

#include <ATen/Version.h>

namespace pconv {

// True where the CPU has AVX-512 and ATen uses it too, so that ATEN_CPU_CAPABILITY=avx2
// (or default) sends the op's hand-vectorised bodies to their narrower versions as well.
inline bool avx512_enabled() {
#if defined(__x86_64__) && defined(__GNUC__)
  // __builtin_cpu_init first: this may run before libgcc's own initialiser has.
  static const bool yes = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") != 0 && at::get_cpu_capability() == "AVX512";
  }();
  return yes;
#else
  return false;
#endif
}

}  // namespace pconv
