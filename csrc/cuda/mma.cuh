// One warp's D += A * B on tensor cores: mma.sync m16n8k16 with float32 accumulation, for
// bfloat16 or float16 A and B (sm_80 and later).
//
// Fragments, as the PTX ISA lays them out: lane l of the warp, g = l / 4, t = l % 4, two
// 16-bit values per 32-bit word (the lower k, or the lower column, in the low half):
//   a[0] = A[g][2t, 2t+1]   a[1] = A[g+8][2t, 2t+1]   a[2] = A[g][2t+8, 2t+9]   a[3] = A[g+8][2t+8, 2t+9]
//   b[0] = B[2t, 2t+1][g]   b[1] = B[2t+8, 2t+9][g]
//   d[0], d[1] = D[g][2t, 2t+1]                         d[2], d[3] = D[g+8][2t, 2t+1]
// with A 16 x 16 (rows m, columns k), B 16 x 8 (rows k, columns n), D 16 x 8.
//
// The host build computes the same product from every lane's fragments (gathered through a
// buffer of the warp between two warp barriers), in float32, k in order.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "runtime.cuh"

namespace pconv {
namespace cuda {

// The bits of one 16-bit value, and two of them in a word (lo in the low half).
template <typename scalar_t>
__device__ __forceinline__ uint32_t pack_pair(scalar_t lo, scalar_t hi) {
  static_assert(sizeof(scalar_t) == 2, "tensor-core fragments hold 16-bit values");
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

#ifdef PCONV_CUDA_HOST
namespace host {

template <typename scalar_t>
inline float unpack_half(uint32_t word, int half) {
  scalar_t v;
  v.x = static_cast<uint16_t>(half == 0 ? word & 0xffffu : word >> 16);
  return static_cast<float>(v);
}

// A[m][k] and B[k][n] of the warp's fragments (see above).
struct MmaFragments {
  uint32_t a[4], b[2];
};

template <typename scalar_t>
inline float fragment_a(const MmaFragments (&lanes)[32], int m, int k) {
  const int lane = (m % 8) * 4 + (k % 8) / 2;
  return unpack_half<scalar_t>(lanes[lane].a[m / 8 + 2 * (k / 8)], k % 2);
}

template <typename scalar_t>
inline float fragment_b(const MmaFragments (&lanes)[32], int k, int n) {
  const int lane = n * 4 + (k % 8) / 2;
  return unpack_half<scalar_t>(lanes[lane].b[k / 8], k % 2);
}

}  // namespace host
#endif

template <typename scalar_t>
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], const uint32_t (&a)[4],
                                            const uint32_t (&b)[2]) {
  static_assert(std::is_same<scalar_t, c10::BFloat16>::value ||
                    std::is_same<scalar_t, c10::Half>::value,
                "mma_16x8x16 takes bfloat16 or float16");
#ifdef PCONV_CUDA_HOST
  // One buffer per warp of the running block (one block runs at a time per host thread).
  static thread_local host::MmaFragments warps[32][32];
  const int thread = static_cast<int>(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
  const int lane = thread % 32;
  host::MmaFragments(&lanes)[32] = warps[thread / 32];
  std::memcpy(lanes[lane].a, a, sizeof(lanes[lane].a));
  std::memcpy(lanes[lane].b, b, sizeof(lanes[lane].b));
  (void)__shfl_down_sync(0xffffffffu, 0, 0);  // every lane has written its fragments
  const int g = lane / 4, t = lane % 4;
  for (int r = 0; r < 4; ++r) {
    const int m = g + 8 * (r / 2), n = 2 * t + r % 2;
    float sum = d[r];
    for (int k = 0; k < 16; ++k) {
      sum += host::fragment_a<scalar_t>(lanes, m, k) * host::fragment_b<scalar_t>(lanes, k, n);
    }
    d[r] = sum;
  }
  (void)__shfl_down_sync(0xffffffffu, 0, 0);  // every lane has read them
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  // The launchers pick the tensor-core kernels on compute capability 8.0 and later only.
  (void)d, (void)a, (void)b;
  __trap();
#else
  if constexpr (std::is_same<scalar_t, c10::BFloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#endif
}

}  // namespace cuda
}  // namespace pconv
