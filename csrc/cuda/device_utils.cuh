// Device helpers the kernel templates share.
#pragma once

#include <cstdint>

#include "runtime.cuh"

namespace pconv {
namespace cuda {

// A run of N values of T loaded or stored with one 16-byte (or narrower) access.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T val[N];
};

// Division rounded to nearest even whatever the fast-math flags (--use_fast_math turns a
// float `/` into an approximate division); double division is never approximated.
__device__ __forceinline__ float exact_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ double exact_div(double a, double b) { return a / b; }

// The taps t in [0, kernel) with 0 <= start + t * dil < size form the range [lo, hi) (empty
// when hi <= lo); start is the window origin in the input, which may be negative (padding).
__device__ __forceinline__ int64_t taps_in_bounds_lo(int64_t start, int64_t dil) {
  return start >= 0 ? 0 : (-start + dil - 1) / dil;
}
__device__ __forceinline__ int64_t taps_in_bounds_hi(int64_t start, int64_t size, int64_t kernel,
                                                     int64_t dil) {
  const int64_t last = size - 1 - start;  // need t * dil <= last
  if (last < 0) return 0;
  const int64_t hi = last / dil + 1;
  return hi < kernel ? hi : kernel;
}

// Sum of val over the block, valid in thread 0. Every thread of the block must call it;
// the block size must be a multiple of 32 (at most 1024). shared holds 32 values. The
// order of the additions is fixed, so the result is deterministic.
template <typename acc_t>
__device__ __forceinline__ acc_t block_reduce_sum(acc_t val, acc_t* shared) {
  const int tid = threadIdx.x + threadIdx.y * blockDim.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int warps = (blockDim.x * blockDim.y) >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    val += __shfl_down_sync(0xffffffffu, val, offset);
  }
  __syncthreads();  // a previous call may still be reading shared
  if (lane == 0) shared[warp] = val;
  __syncthreads();
  if (warp == 0) {
    val = lane < warps ? shared[lane] : acc_t(0);
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      val += __shfl_down_sync(0xffffffffu, val, offset);
    }
  }
  return val;
}

}  // namespace cuda
}  // namespace pconv
