// Small host helpers the kernel launchers share.
#pragma once

#include <cstdint>
#include <type_traits>

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

// Values of T per 16-byte access.
template <typename T>
constexpr int vec_width() {
  return static_cast<int>(16 / sizeof(T));
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
