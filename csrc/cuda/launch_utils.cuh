// Small host helpers the kernel launchers share.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "params.cuh"
#include "runtime.cuh"

namespace pconv {
namespace cuda {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline bool aligned16(const void* ptr) {
  return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % 16 == 0;
}

// True when every element offset within one sample of a tensor of [*, channels, h, w]
// with these strides (non-negative, as the op's tensors have) fits the 32-bit offsets of
// the tiled kernels.
inline bool fits_32_bits(const Strides4& s, int64_t channels, int64_t h, int64_t w) {
  const int64_t extent = (channels - 1) * s.c + (h - 1) * s.h + (w - 1) * s.w;
  return extent <= std::numeric_limits<int32_t>::max();
}

// Values of T per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
}

// Block size of the elementwise kernels, and their grid for `items` work items (one per
// thread): at most 32 blocks a multiprocessor, whose grid-stride loops take the rest.
constexpr int kElementwiseThreads = 256;
inline dim3 elementwise_grid(int64_t items) {
  const int64_t max_blocks = static_cast<int64_t>(multiprocessor_count()) * 32;
  const int64_t blocks =
      std::max<int64_t>(1, std::min(ceil_div(items, kElementwiseThreads), max_blocks));
  return dim3(static_cast<unsigned>(blocks));
}

// Calls launch(std::integral_constant<int, VEC>{}, std::integral_constant<bool, CL>{}) with
// VEC = kVec where `vec` holds (else 1) and CL = channels_last: the one instantiation of an
// elementwise kernel that a launch picks.
template <int kVec, typename Launch>
void with_vec_and_layout(bool vec, bool channels_last, Launch&& launch) {
  using ChannelsLast = std::true_type;
  using Nchw = std::false_type;
  using Wide = std::integral_constant<int, kVec>;
  using Narrow = std::integral_constant<int, 1>;
  if (channels_last) {
    vec ? launch(Wide{}, ChannelsLast{}) : launch(Narrow{}, ChannelsLast{});
  } else {
    vec ? launch(Wide{}, Nchw{}) : launch(Narrow{}, Nchw{});
  }
}

}  // namespace cuda
}  // namespace pconv
