// A 3x3, unit-stride partial convolution as one implicit GEMM on tensor cores (mma.sync
// m16n8k16, bfloat16 and float16, sm_80 and later), in two kernels:
//   - the forward masks on load and renormalises in its epilogue:
//     y = (conv(x * m, W) * r + b) * u is read and written once, with no x * m tensor and
//     no epilogue pass (r and u come from the mask pass, as on the cuDNN route);
//   - the input gradient is the same GEMM: at unit stride dx = conv(g_raw, W') with W'
//     the weight transposed and flipped and padding 2 - pad, and m applied as dx is
//     stored (no dx * m pass).
// Below, "input" and "output" are the GEMM's: for the input gradient g_raw and dx.
//
// The GEMM is (output pixels) x (input channels, taps) times (input channels, taps) x
// (output channels). A block of kIgThreads threads makes a tile of kIgTileRows x kIgTileCols
// output pixels by kIgTileOutputs output channels. For each group of 16 input channels it
// stages, in shared memory and in the input dtype:
//   - x * m of the tile's window (kIgStagedRows x kIgStagedCols input pixels, zero outside
//     the image and past C_in; each product rounded as at::mul rounds it), a pixel's 16
//     channels in 8 words padded to kIgPixelWords, so that the 8 rows of an A fragment fall
//     in 8 different sets of banks;
//   - the weight of those channels for the tile's outputs, from the packed weight the
//     launcher makes ([groups][9 taps][C_out padded to 64][16 channels]), an output's 16
//     channels in the same padded 8 words: the 8 columns of a B fragment are conflict-free.
// All 9 taps then read the same staged window, shifted. Warp w takes 2 output rows (w % 4)
// by 32 output channels (w / 4): 4 runs of 16 pixels by 4 runs of 8 outputs, 16 mma.sync a
// tap, summed in float32.
// The forward's epilogue applies r, b and u to the float32 sums and rounds once; both
// kernels go through shared memory in the output's layout, so that the block writes whole
// 16-byte runs of it. Offsets within one sample of the input are 32-bit (the op code checks
// that they fit).
#pragma once

#include <cstdint>
#include <type_traits>

#include "device_utils.cuh"
#include "mma.cuh"
#include "params.cuh"

namespace pconv {
namespace cuda {

constexpr int kIgTileRows = 8;
constexpr int kIgTileCols = 32;
constexpr int kIgTilePixels = kIgTileRows * kIgTileCols;  // 256
constexpr int kIgThreads = 256;
constexpr int kIgTaps = 9;
constexpr int kIgStagedRows = kIgTileRows + 2;
constexpr int kIgStagedCols = kIgTileCols + 2;
constexpr int kIgStagedPixels = kIgStagedRows * kIgStagedCols;
constexpr int kIgPixelWords = 12;  // 8 words of 16 channels, 4 of padding
constexpr int kIgStagedWords = kIgStagedPixels * kIgPixelWords;
constexpr int kIgWeightWords = kIgTaps * kIgTileOutputs * kIgPixelWords;
// A unit of staging is 8 channels of one pixel (or of one output's weight): 16 bytes.
constexpr int kIgUnits = 2 * kIgStagedPixels;
constexpr int kIgUnitsPerThread = (kIgUnits + kIgThreads - 1) / kIgThreads;
constexpr int kIgWeightUnits = 2 * kIgTaps * kIgTileOutputs;
constexpr int kIgWeightUnitsPerThread = (kIgWeightUnits + kIgThreads - 1) / kIgThreads;
// The epilogue's tile of 16-bit outputs: NCHW as [output][pixel], rows padded by 8 values;
// channels_last as [pixel][output], rows padded by 8 values. Both avoid bank conflicts as
// the fragments write them, and both fit in the staging buffers they reuse.
constexpr int kIgOutNchwStride = kIgTilePixels + 8;
constexpr int kIgOutClStride = kIgTileOutputs + 8;
// Words of the larger of the two, after which the epilogue stages r and u of the tile's
// pixels and b of its outputs in float.
constexpr int kIgEpilogueWords = (kIgTileOutputs * kIgOutNchwStride > kIgTilePixels * kIgOutClStride
                                      ? kIgTileOutputs * kIgOutNchwStride
                                      : kIgTilePixels * kIgOutClStride) / 2;
constexpr int64_t kIgSmemBytes = static_cast<int64_t>(kIgStagedWords + kIgWeightWords) * 4;
static_assert((kIgEpilogueWords + 2 * kIgTilePixels + kIgTileOutputs) * 4 <= kIgSmemBytes,
              "the epilogue's tile, r, u and b fit in the staging buffers");
static_assert(kIgSmemBytes <= 48 * 1024, "no opt-in to more dynamic shared memory");

// The tiles of kIgTileRows x kIgTileCols output pixels by kIgTileOutputs output channels,
// the output-channel tiles of a pixel tile next to each other (they read the same window
// of x, close in time).
struct IgTiles {
  int64_t down, across, outputs, count;
  __host__ __device__ IgTiles(int64_t batch, int64_t h, int64_t w, int64_t out_channels)
      : down((h + kIgTileRows - 1) / kIgTileRows),
        across((w + kIgTileCols - 1) / kIgTileCols),
        outputs((out_channels + kIgTileOutputs - 1) / kIgTileOutputs),
        count(batch * down * across * outputs) {}
  __device__ void origin(int64_t t, int64_t& n, int64_t& h0, int64_t& w0, int64_t& co0) const {
    co0 = t % outputs * kIgTileOutputs;
    const int64_t pixels = t / outputs;
    n = pixels / (down * across);
    h0 = pixels / across % down * kIgTileRows;
    w0 = pixels % across * kIgTileCols;
  }
};

// The tiles of one launch. kInputGrad: the input gradient's epilogue (no r, u or b; the
// output masked at the store) in place of the forward's.
template <typename scalar_t, bool kHasMask, bool kInputGrad>
__device__ __forceinline__ void implicit_gemm_tiles(const ImplicitGemmParams<scalar_t>& p) {
  uint32_t* x_s = dynamic_shared_memory<uint32_t>();
  uint32_t* w_s = x_s + kIgStagedWords;
  const Strides4 &xs = p.input_strides, &ms = p.mask_strides;
  const IgTiles tiles(p.batch, p.out_h, p.out_w, p.out_channels);
  const bool per_channel_mask = kHasMask && ms.c != 0;
  const uint32_t channel_stride = static_cast<uint32_t>(xs.c);
  const uint32_t mask_channel_stride = static_cast<uint32_t>(ms.c);
  const int64_t groups = (p.in_channels + kIgGroupChannels - 1) / kIgGroupChannels;
  const int64_t packed_outputs = tiles.outputs * kIgTileOutputs;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int warp_row = 2 * (warp % 4), warp_out = 32 * (warp / 4);

  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t n, oh0, ow0, co0;
    tiles.origin(t, n, oh0, ow0, co0);
    const int64_t h0 = oh0 - p.pad_h, w0 = ow0 - p.pad_w;
    // Runs of 8 outputs past C_out take no mma (their weights would be zeros).
    const int64_t outputs_left = p.out_channels - co0 - warp_out;
    const int runs_out =
        outputs_left >= 32 ? 4 : (outputs_left <= 0 ? 0 : static_cast<int>((outputs_left + 7) / 8));

    const scalar_t* x_n = p.input + n * xs.n;
    const scalar_t* m_n = kHasMask ? p.mask + n * ms.n : nullptr;

    // x * m of the group of channels from c_group: 8 channels of one pixel a unit, rounded
    // to the input dtype as at::mul rounds it, 0 outside the image and past C_in. Where the
    // input keeps a pixel's channels together (channels_last, C_in a multiple of 8), a unit
    // is one 16-byte load, and so is a C_in-channel mask's. The 64 accumulators leave
    // few registers: a unit's place is worked out again for each group rather than held
    // across the loop, and the units are staged one after another (unrolled, with their
    // loads in flight together, sm_90's ptxas spilled 200 bytes a thread; this way none).
    auto stage_x = [&](auto per_channel, int64_t c_group) {
      constexpr bool kPerChannel = decltype(per_channel)::value;
#pragma unroll 1
      for (int k = 0; k < kIgUnitsPerThread; ++k) {
        const int u = static_cast<int>(threadIdx.x) + k * kIgThreads;
        if (u >= kIgUnits) continue;
        const int half = u / kIgStagedPixels, pixel = u - half * kIgStagedPixels;
        const int r = pixel / kIgStagedCols, col = pixel - r * kIgStagedCols;
        const int64_t ih = h0 + r, iw = w0 + col;
        const bool inside = ih >= 0 && ih < p.in_h && iw >= 0 && iw < p.in_w;
        const int64_t c_first = c_group + 8 * half;
        const int64_t left = p.in_channels - c_first;
        const int valid = !inside ? 0 : (left < 8 ? static_cast<int>(left) : 8);
        const uint32_t x_off = inside ? static_cast<uint32_t>(ih * xs.h + iw * xs.w) : 0u;
        const uint32_t m_off = inside ? static_cast<uint32_t>(ih * ms.h + iw * ms.w) : 0u;
        const scalar_t* xp = x_n + x_off + static_cast<uint32_t>(c_first) * channel_stride;
        const scalar_t* mp =
            kPerChannel ? m_n + m_off + static_cast<uint32_t>(c_first) * mask_channel_stride
                        : nullptr;
        // The single-channel mask there (1 without one).
        const float pixel_mask =
            inside && kHasMask && !kPerChannel ? static_cast<float>(m_n[m_off]) : 1.0f;
        scalar_t v[8];
        if (valid == 8 && p.vector_input) {
          const Vec<scalar_t, 8> xv = *reinterpret_cast<const Vec<scalar_t, 8>*>(xp);
          Vec<scalar_t, 8> mv;
          if (kPerChannel) mv = *reinterpret_cast<const Vec<scalar_t, 8>*>(mp);
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float m = kPerChannel ? static_cast<float>(mv.val[e]) : pixel_mask;
            v[e] = static_cast<scalar_t>(static_cast<float>(xv.val[e]) * m);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            v[e] = scalar_t(0.0f);
            if (e < valid) {
              const float m =
                  kPerChannel ? static_cast<float>(mp[e * mask_channel_stride]) : pixel_mask;
              v[e] = static_cast<scalar_t>(static_cast<float>(xp[e * channel_stride]) * m);
            }
          }
        }
        Vec<uint32_t, 4> words;
#pragma unroll
        for (int pair = 0; pair < 4; ++pair) {
          words.val[pair] = pack_pair(v[2 * pair], v[2 * pair + 1]);
        }
        *reinterpret_cast<Vec<uint32_t, 4>*>(x_s + pixel * kIgPixelWords + 4 * half) = words;
      }
    };

    // The weight of group q for the tile's outputs: 16-byte copies of the packed weight.
    auto stage_w = [&](int64_t q) {
      const scalar_t* w_q = p.weight + (q * kIgTaps * packed_outputs + co0) * kIgGroupChannels;
#pragma unroll 1  // see stage_x
      for (int k = 0; k < kIgWeightUnitsPerThread; ++k) {
        const int u = static_cast<int>(threadIdx.x) + k * kIgThreads;
        if (u >= kIgWeightUnits) continue;
        const int row = u / 2, half = u % 2;  // row = tap * 64 + output
        const int tap = row / kIgTileOutputs, co = row % kIgTileOutputs;
        const Vec<uint32_t, 4> words = *reinterpret_cast<const Vec<uint32_t, 4>*>(
            w_q + (tap * packed_outputs + co) * kIgGroupChannels + 8 * half);
        *reinterpret_cast<Vec<uint32_t, 4>*>(w_s + row * kIgPixelWords + 4 * half) = words;
      }
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int j = 0; j < 4; ++j) {
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][j][r] = 0.0f;
      }
    }
    auto accumulate = [&](auto per_channel) {
      for (int64_t q = 0; q < groups; ++q) {
        __syncthreads();  // every warp is done with the group staged before
        stage_x(per_channel, q * kIgGroupChannels);
        stage_w(q);
        __syncthreads();
        if (runs_out == 0) continue;
#pragma unroll
        for (int tap = 0; tap < kIgTaps; ++tap) {
          const int i = tap / 3, j = tap % 3;
          uint32_t b[4][2];
#pragma unroll
          for (int no = 0; no < 4; ++no) {
            const uint32_t* pb =
                w_s + (tap * kIgTileOutputs + warp_out + 8 * no + lane / 4) * kIgPixelWords +
                lane % 4;
            b[no][0] = pb[0];
            b[no][1] = pb[4];
          }
#pragma unroll
          for (int mo = 0; mo < 4; ++mo) {
            // Rows of A: 16 pixels of output row warp_row + mo / 2, shifted by the tap;
            // columns: the group's channels.
            const int pixel =
                (warp_row + mo / 2 + i) * kIgStagedCols + 16 * (mo % 2) + j + lane / 4;
            const uint32_t* pa = x_s + pixel * kIgPixelWords + lane % 4;
            const uint32_t a[4] = {pa[0], pa[8 * kIgPixelWords], pa[4],
                                   pa[8 * kIgPixelWords + 4]};
#pragma unroll
            for (int no = 0; no < 4; ++no) {
              if (no < runs_out) mma_16x8x16<scalar_t>(acc[mo][no], a, b[no]);
            }
          }
        }
      }
    };
    if (per_channel_mask) {
      accumulate(std::true_type{});
    } else {
      accumulate(std::false_type{});
    }

    // Epilogue into the output tile in shared memory, in the output's layout. Forward:
    // y = (raw * r + b) * u (raw * r without a bias); r and u of the tile's pixels and b of
    // its outputs are staged first, past the output tile, so that the fragments' loop reads
    // them from shared memory with 32-bit offsets. Input gradient: the sums as they are
    // (the mask comes at the store).
    __syncthreads();  // every warp is done with the staged group
    scalar_t* out_s = reinterpret_cast<scalar_t*>(x_s);
    float* ratio_s = reinterpret_cast<float*>(x_s) + kIgEpilogueWords;
    float* update_s = ratio_s + kIgTilePixels;
    float* bias_s = update_s + kIgTilePixels;
    if (!kInputGrad) {
      for (int e = static_cast<int>(threadIdx.x); e < kIgTilePixels; e += kIgThreads) {
        const int64_t oh = oh0 + e / kIgTileCols, ow = ow0 + e % kIgTileCols;
        const bool inside = oh < p.out_h && ow < p.out_w;
        const int64_t mi = n * p.mask_plane_stride + oh * p.out_w + ow;
        ratio_s[e] = inside ? p.ratio[mi] : 0.0f;
        update_s[e] = inside ? p.update[mi] : 0.0f;
      }
      if (threadIdx.x < kIgTileOutputs) {
        const int64_t co = co0 + threadIdx.x;
        bias_s[threadIdx.x] =
            p.bias != nullptr && co < p.out_channels ? static_cast<float>(p.bias[co]) : 0.0f;
      }
      __syncthreads();
    }
    const bool has_bias = p.bias != nullptr;
    // The output tile's strides, in values, per pixel and per output.
    const int pixel_step = p.out_channels_last ? kIgOutClStride : 1;
    const int output_step = p.out_channels_last ? 1 : kIgOutNchwStride;
#pragma unroll
    for (int mo = 0; mo < 4; ++mo) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int pixel = (warp_row + mo / 2) * kIgTileCols + 16 * (mo % 2) + lane / 4 + 8 * half;
        const float ratio = kInputGrad ? 1.0f : ratio_s[pixel];
        const float update = kInputGrad ? 1.0f : update_s[pixel];
#pragma unroll
        for (int no = 0; no < 4; ++no) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int co = warp_out + 8 * no + 2 * (lane % 4) + e;
            const float raw = acc[mo][no][2 * half + e];
            float v = raw;
            if (!kInputGrad) v = has_bias ? (raw * ratio + bias_s[co]) * update : raw * ratio;
            out_s[pixel * pixel_step + co * output_step] = static_cast<scalar_t>(v);
          }
        }
      }
    }
    __syncthreads();

    // 8 values a unit: 8 pixels of a row of one output (NCHW) or 8 outputs of one pixel
    // (channels_last), one 16-byte store where the unit is whole and aligned. The input
    // gradient's values are multiplied by the mask here (rounded again, as dx * m of the
    // cuDNN route rounds them).
    const Strides4 &ys = p.out_strides, &oms = p.out_mask_strides;
    scalar_t* y_n = p.out + n * ys.n;
    const bool mask_out = kInputGrad && p.out_mask != nullptr;
    for (int u = static_cast<int>(threadIdx.x); u < kIgTilePixels * kIgTileOutputs / 8;
         u += kIgThreads) {
      int pixel, co;
      if (p.out_channels_last) {
        pixel = u / (kIgTileOutputs / 8);
        co = u % (kIgTileOutputs / 8) * 8;
      } else {
        co = u / (kIgTilePixels / 8);
        pixel = u % (kIgTilePixels / 8) * 8;
      }
      const int64_t oh = oh0 + pixel / kIgTileCols, ow = ow0 + pixel % kIgTileCols;
      if (oh >= p.out_h || ow >= p.out_w || co0 + co >= p.out_channels) continue;
      Vec<scalar_t, 8> v = *reinterpret_cast<const Vec<scalar_t, 8>*>(
          out_s + (p.out_channels_last ? pixel * kIgOutClStride + co
                                       : co * kIgOutNchwStride + pixel));
      const int64_t left = p.out_channels_last ? p.out_channels - co0 - co : p.out_w - ow;
      const int valid = left < 8 ? static_cast<int>(left) : 8;
      if (mask_out) {
        const scalar_t* m = p.out_mask + n * oms.n + (co0 + co) * oms.c + oh * oms.h + ow * oms.w;
        const int64_t step = p.out_channels_last ? oms.c : oms.w;
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          if (e < valid) {
            v.val[e] = static_cast<scalar_t>(static_cast<float>(v.val[e]) *
                                             static_cast<float>(m[e * step]));
          }
        }
      }
      scalar_t* dst = y_n + (co0 + co) * ys.c + oh * ys.h + ow * ys.w;
      if (valid == 8 && reinterpret_cast<uintptr_t>(dst) % 16 == 0 &&
          (p.out_channels_last ? ys.c : ys.w) == 1) {
        *reinterpret_cast<Vec<scalar_t, 8>*>(dst) = v;
      } else {
        const int64_t step = p.out_channels_last ? ys.c : ys.w;
#pragma unroll  // constant indices keep v in registers
        for (int e = 0; e < 8; ++e) {
          if (e < valid) dst[e * step] = v.val[e];
        }
      }
    }
  }
}

// The forward: y of a 3x3 unit-stride layer from x (masked on load when kHasMask).
template <typename scalar_t, bool kHasMask>
__global__ void __launch_bounds__(kIgThreads, 2)
    implicit_gemm_forward_kernel(const ImplicitGemmParams<scalar_t> p) {
  implicit_gemm_tiles<scalar_t, kHasMask, false>(p);
}

// The input gradient of the same layers: dx = conv(g_raw, W flipped and transposed) with
// padding 2 - pad, which is the same GEMM with g_raw as its input, times m at the store.
template <typename scalar_t>
__global__ void __launch_bounds__(kIgThreads, 2)
    implicit_gemm_input_grad_kernel(const ImplicitGemmParams<scalar_t> p) {
  implicit_gemm_tiles<scalar_t, false, true>(p);
}

}  // namespace cuda
}  // namespace pconv
