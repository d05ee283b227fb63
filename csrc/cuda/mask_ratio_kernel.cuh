// The mask pass as a kernel template: channel sum, window sum (stride, padding, dilation),
// updated mask u and ratio r in one kernel, single-channel, from one read of the mask.
//
// One block computes a tile of outputs of one mask plane. With kStaged, the block first
// writes the channel-summed mask over the tile's input footprint to shared memory (zeros
// outside the image: padding counts as hole), then every thread sums its window from
// there; each mask value is read from global memory once per tile. Without kStaged (a
// footprint too big for shared memory: large dilations) every thread reads its window
// from global memory. Without a mask (kHasMask false) S is the number of in-bounds taps.
#pragma once

#include "device_utils.cuh"
#include "params.cuh"

namespace pconv {
namespace cuda {

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t mask_channel_sum(const MaskRatioParams<scalar_t, acc_t>& p,
                                                  int64_t n, int64_t ih, int64_t iw) {
  const scalar_t* ptr = p.mask + n * p.mask_stride_n + ih * p.mask_stride_h + iw * p.mask_stride_w;
  acc_t s = 0;
  for (int64_t c = 0; c < p.channels; ++c) {
    s += static_cast<acc_t>(ptr[c * p.mask_stride_c]);
  }
  return s;
}

template <typename scalar_t, typename acc_t, bool kHasMask, bool kStaged>
__global__ void mask_ratio_kernel(const MaskRatioParams<scalar_t, acc_t> p) {
  acc_t* foot = dynamic_shared_memory<acc_t>();

  const int64_t tiles_per_plane = p.tiles_h * p.tiles_w;
  const int64_t tiles = tiles_per_plane * p.planes;
  const int tx = threadIdx.x, ty = threadIdx.y;
  const acc_t eps = static_cast<acc_t>(1e-8);

  // The loop bound depends on blockIdx only, so every thread of a block runs the same
  // iterations and the barriers below are safe.
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t n = tile / tiles_per_plane;
    const int64_t t = tile - n * tiles_per_plane;
    const int64_t oh0 = (t / p.tiles_w) * blockDim.y;
    const int64_t ow0 = (t % p.tiles_w) * blockDim.x;
    const int64_t ih0 = oh0 * p.stride_h - p.pad_h;  // footprint origin in the input
    const int64_t iw0 = ow0 * p.stride_w - p.pad_w;

    if (kHasMask && kStaged) {
      __syncthreads();  // the previous tile is done reading the footprint
      const int64_t count = p.foot_h * p.foot_w;
      for (int64_t i = ty * blockDim.x + tx; i < count; i += blockDim.x * blockDim.y) {
        const int64_t ih = ih0 + i / p.foot_w;
        const int64_t iw = iw0 + i % p.foot_w;
        const bool inside = ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w;
        foot[i] = inside ? mask_channel_sum(p, n, ih, iw) : acc_t(0);
      }
      __syncthreads();
    }

    const int64_t oh = oh0 + ty, ow = ow0 + tx;
    if (oh >= p.out_h || ow >= p.out_w) continue;
    const int64_t h_start = ih0 + ty * p.stride_h;  // window origin of this output
    const int64_t w_start = iw0 + tx * p.stride_w;
    acc_t s = 0;
    if (!kHasMask) {
      const int64_t rows = taps_in_bounds_hi(h_start, p.in_h, p.kernel_h, p.dil_h) -
                           taps_in_bounds_lo(h_start, p.dil_h);
      const int64_t cols = taps_in_bounds_hi(w_start, p.in_w, p.kernel_w, p.dil_w) -
                           taps_in_bounds_lo(w_start, p.dil_w);
      s = rows > 0 && cols > 0 ? static_cast<acc_t>(rows * cols) : acc_t(0);
    } else if (kStaged) {
      // Out-of-image entries of the footprint are zero, so every tap can be summed.
      const acc_t* base = foot + (ty * p.stride_h) * p.foot_w + tx * p.stride_w;
      for (int64_t i = 0; i < p.kernel_h; ++i) {
        const acc_t* line = base + i * p.dil_h * p.foot_w;
        for (int64_t j = 0; j < p.kernel_w; ++j) s += line[j * p.dil_w];
      }
    } else {
      const int64_t i_lo = taps_in_bounds_lo(h_start, p.dil_h);
      const int64_t i_hi = taps_in_bounds_hi(h_start, p.in_h, p.kernel_h, p.dil_h);
      const int64_t j_lo = taps_in_bounds_lo(w_start, p.dil_w);
      const int64_t j_hi = taps_in_bounds_hi(w_start, p.in_w, p.kernel_w, p.dil_w);
      for (int64_t i = i_lo; i < i_hi; ++i) {
        for (int64_t j = j_lo; j < j_hi; ++j) {
          s += mask_channel_sum(p, n, h_start + i * p.dil_h, w_start + j * p.dil_w);
        }
      }
    }
    const acc_t u = s < acc_t(0) ? acc_t(0) : (s > acc_t(1) ? acc_t(1) : s);
    const acc_t r = exact_div(p.window, s + eps) * u;
    const int64_t idx = (n * p.out_h + oh) * p.out_w + ow;
    p.ratio[idx] = r;
    p.update[idx] = u;
    if (p.update_out != nullptr) p.update_out[idx] = static_cast<scalar_t>(u);
  }
}

}  // namespace cuda
}  // namespace pconv
