// The forward's masking for a multi-channel mask that has the input's shape and layout:
// x * m, and the mask's channel sum from the same read of the mask, so that the mask pass
// reads a one-channel float plane instead of the C-channel mask (one read of an
// input-sized tensor less per forward).
//
// The channel sum adds the channels in order, in acc_t, as the mask pass's own channel sum
// does: r and u are bit for bit those of the two-pass route. x * m is rounded once from
// acc_t, as at::mul rounds it.
#pragma once

#include "device_utils.cuh"
#include "params.cuh"

namespace pconv {
namespace cuda {

// NCHW: grid-stride over groups of VEC consecutive pixels of one plane; a thread walks the
// channels of its group (stride H * W), so a warp reads 32 consecutive groups of each
// channel plane. channels_last: grid-stride over pixels; a thread walks its pixel's
// channels in runs of VEC. The launcher checks that the inner size (H * W, or C) is a
// multiple of VEC and the pointers are aligned; VEC = 1 otherwise.
template <typename scalar_t, typename acc_t, int VEC, bool kChannelsLast>
__global__ void masked_input_kernel(const MaskedInputParams<scalar_t, acc_t> p) {
  using V = Vec<scalar_t, VEC>;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (kChannelsLast) {
    const int64_t pixels = p.batch * p.plane;
    for (int64_t px = first; px < pixels; px += step) {
      const int64_t base = px * p.channels;
      acc_t sum = 0;
      for (int64_t c = 0; c < p.channels; c += VEC) {
        const V x = *reinterpret_cast<const V*>(p.input + base + c);
        const V m = *reinterpret_cast<const V*>(p.mask + base + c);
        V y;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t mk = static_cast<acc_t>(m.val[k]);
          y.val[k] = static_cast<scalar_t>(static_cast<acc_t>(x.val[k]) * mk);
          sum += mk;
        }
        *reinterpret_cast<V*>(p.out + base + c) = y;
      }
      p.channel_sum[px] = sum;
    }
  } else {
    const int64_t groups_per_plane = p.plane / VEC;
    const int64_t groups = p.batch * groups_per_plane;
    for (int64_t group = first; group < groups; group += step) {
      const int64_t n = group / groups_per_plane;
      const int64_t p0 = (group - n * groups_per_plane) * VEC;
      const int64_t base = n * p.channels * p.plane + p0;
      acc_t sum[VEC];
#pragma unroll
      for (int k = 0; k < VEC; ++k) sum[k] = 0;
      for (int64_t c = 0; c < p.channels; ++c) {
        const int64_t offset = base + c * p.plane;
        const V x = *reinterpret_cast<const V*>(p.input + offset);
        const V m = *reinterpret_cast<const V*>(p.mask + offset);
        V y;
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const acc_t mk = static_cast<acc_t>(m.val[k]);
          y.val[k] = static_cast<scalar_t>(static_cast<acc_t>(x.val[k]) * mk);
          sum[k] += mk;
        }
        *reinterpret_cast<V*>(p.out + offset) = y;
      }
      acc_t* dst = p.channel_sum + n * p.plane + p0;
#pragma unroll
      for (int k = 0; k < VEC; ++k) dst[k] = sum[k];
    }
  }
}

}  // namespace cuda
}  // namespace pconv
