// The tiled 3x3 forward of few_outputs_kernel.cuh on tensor cores, for bfloat16 and float16
// (sm_80 and later). A tile's convolution is a GEMM: (pixels) x (channels, taps) times
// (channels, taps) x (outputs), and mma.sync m16n8k16 (mma.cuh) takes 16 pixels by 16
// channels of one tap against those channels' weights for up to 8 outputs at a time. The
// outputs past C_out are zeros, so only 3 of 8 columns are used for 64 -> 3, but a warp's
// one mma does the work of 24 fused multiply-adds per lane.
//
// A block of kMmaThreads threads takes kMmaTileRows x kTileCols outputs; warp w makes row w
// of them, as kMmaRuns runs of 16 pixels. The block stages x * m of the tile's window (the
// kMmaStagedRows x kStagedCols input pixels it reads, zero outside the image and past C_in)
// in shared memory in the input dtype (rounded as at::mul rounds it), one group of 16
// channels at a time, pixel after pixel: 8 words of channels, padded to kPixelWords so that
// the 8 pixels of a fragment load fall in 8 different sets of banks. The weight is staged
// once in B-fragment order: per group of 16 channels and per tap, 2 words per lane.
#pragma once

#include "few_outputs_kernel.cuh"
#include "mma.cuh"

namespace pconv {
namespace cuda {

constexpr int kMmaTileRows = 8;
constexpr int kMmaThreads = 32 * kMmaTileRows;  // a warp per output row
constexpr int kMmaRuns = kTileCols / 16;
constexpr int kMmaStagedRows = kMmaTileRows + 2;
constexpr int kMmaStagedPixels = kMmaStagedRows * kStagedCols;
constexpr int kGroupChannels = 16;
constexpr int kPixelWords = 12;  // 8 words of 16 channels, 4 of padding
constexpr int kMmaStagedWords = kMmaStagedPixels * kPixelWords;
constexpr int64_t kMmaStagedBytes = static_cast<int64_t>(kMmaStagedWords) * 4;
// A unit of staging is 8 channels of one pixel: one 16-byte store.
constexpr int kMmaUnits = 2 * kMmaStagedPixels;
constexpr int kMmaUnitsPerThread = (kMmaUnits + kMmaThreads - 1) / kMmaThreads;
// Words of the staged weight per group of 16 channels: 9 taps x 32 lanes x 2.
constexpr int kGroupWeightWords = kFewOutputsTaps * 32 * 2;
constexpr int64_t kGroupWeightBytes = static_cast<int64_t>(kGroupWeightWords) * 4;

// The B fragments of the channel groups [group0, group0 + groups): word w of lane l for tap
// t of group q at w_s[((q * 9 + t) * 32 + l) * 2 + w] holds W[n][c][t / 3][t % 3] for
// n = l / 4 and c = 16 (group0 + q) + 2 (l % 4) + 8 w (+1 in the high half); zero for
// n >= C_out and c >= C_in.
template <int kOut, typename scalar_t>
__device__ __forceinline__ void stage_mma_weight(const FewOutputsConv<scalar_t, float>& g,
                                                 int64_t group0, int64_t groups, uint32_t* w_s) {
  const Strides4& s = g.weight_strides;
  for (int64_t e = threadIdx.x; e < groups * kGroupWeightWords; e += blockDim.x) {
    const int64_t q = e / kGroupWeightWords;
    const int rest = static_cast<int>(e - q * kGroupWeightWords);
    const int tap = rest / 64, lane = rest % 64 / 2, word = rest % 2;
    const int n = lane / 4;
    const int64_t c = (group0 + q) * kGroupChannels + 2 * (lane % 4) + 8 * word;
    scalar_t v[2] = {scalar_t(0.0f), scalar_t(0.0f)};
    for (int h = 0; h < 2; ++h) {
      if (n < kOut && c + h < g.in_channels) {
        v[h] = g.weight[n * s.n + (c + h) * s.c + (tap / 3) * s.h + (tap % 3) * s.w];
      }
    }
    w_s[e] = pack_pair(v[0], v[1]);
  }
}

template <typename scalar_t, int kOut, bool kHasMask>
__global__ void __launch_bounds__(kMmaThreads, 3)
    few_outputs_3x3_mma_forward_kernel(const FewOutputsForwardParams<scalar_t, float> p) {
  uint32_t* tile_s = dynamic_shared_memory<uint32_t>();
  uint32_t* w_s = tile_s + kMmaStagedWords;
  const FewOutputsConv<scalar_t, float>& g = p.conv;
  const Strides4 &xs = p.input_strides, &ms = p.mask_strides;
  const Tiles tiles(g.batch, g.out_h, g.out_w, kMmaTileRows);
  const bool per_channel_mask = kHasMask && ms.c != 0;
  // Channel strides as 32-bit offsets (the launcher checks that a sample's offsets fit).
  const uint32_t channel_stride = static_cast<uint32_t>(xs.c);
  const uint32_t mask_channel_stride = static_cast<uint32_t>(ms.c);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t groups_total = (g.in_channels + kGroupChannels - 1) / kGroupChannels;
  // chunk_channels is a whole number of groups.
  const bool whole_weight = g.chunk_channels >= g.in_channels;
  if (whole_weight) {
    stage_mma_weight<kOut>(g, 0, groups_total, w_s);
    __syncthreads();
  }

  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t n, oh0, ow0;
    tiles.origin(t, n, oh0, ow0);
    const int64_t h0 = oh0 - g.pad_h, w0 = ow0 - g.pad_w;

    // The units this thread stages: where they go (-1: none), which 8 channels of their
    // group (0 or 1), whether their pixel lies in the image, its offsets in x and in the
    // mask, and the single-channel mask there (1 without one, or with C_in channels).
    int staged_at[kMmaUnitsPerThread], unit_half[kMmaUnitsPerThread];
    bool unit_in[kMmaUnitsPerThread];
    uint32_t x_off[kMmaUnitsPerThread], m_off[kMmaUnitsPerThread];
    float unit_mask[kMmaUnitsPerThread];
    const scalar_t* x_n = p.input + n * xs.n;
    const scalar_t* m_n = kHasMask ? p.mask + n * ms.n : nullptr;
#pragma unroll
    for (int k = 0; k < kMmaUnitsPerThread; ++k) {
      const int u = static_cast<int>(threadIdx.x) + k * kMmaThreads;
      const int half = u / kMmaStagedPixels, pixel = u - half * kMmaStagedPixels;
      const int r = pixel / kStagedCols, col = pixel - r * kStagedCols;
      const int64_t ih = h0 + r, iw = w0 + col;
      const bool inside =
          u < kMmaUnits && ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
      staged_at[k] = u < kMmaUnits ? pixel * kPixelWords + 4 * half : -1;
      unit_half[k] = half;
      unit_in[k] = inside;
      x_off[k] = inside ? static_cast<uint32_t>(ih * xs.h + iw * xs.w) : 0u;
      m_off[k] = inside ? static_cast<uint32_t>(ih * ms.h + iw * ms.w) : 0u;
      unit_mask[k] = inside && kHasMask && !per_channel_mask
                         ? static_cast<float>(m_n[m_off[k]])
                         : 1.0f;
    }

    // Stages x * m of the group of channels from c_group, rounded to the input dtype as
    // at::mul rounds it: 8 channels a unit, 0 outside the image and past C_in.
    auto stage = [&](auto per_channel, int64_t c_group) {
      constexpr bool kPerChannel = decltype(per_channel)::value;
#pragma unroll
      for (int k = 0; k < kMmaUnitsPerThread; ++k) {
        if (staged_at[k] < 0) continue;
        const int64_t c_first = c_group + 8 * unit_half[k];
        const int64_t left = g.in_channels - c_first;
        const int valid = !unit_in[k] ? 0 : (left < 8 ? static_cast<int>(left) : 8);
        const scalar_t* xp = x_n + x_off[k] + static_cast<uint32_t>(c_first) * channel_stride;
        const scalar_t* mp =
            kPerChannel ? m_n + m_off[k] + static_cast<uint32_t>(c_first) * mask_channel_stride
                        : nullptr;
        scalar_t v[8];
        if (valid == 8) {  // all but the last group's units, and those outside the image
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const float m = kPerChannel ? static_cast<float>(mp[e * mask_channel_stride])
                                        : unit_mask[k];
            v[e] = static_cast<scalar_t>(static_cast<float>(xp[e * channel_stride]) * m);
          }
        } else {
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            v[e] = scalar_t(0.0f);
            if (e < valid) {
              const float m = kPerChannel ? static_cast<float>(mp[e * mask_channel_stride])
                                          : unit_mask[k];
              v[e] = static_cast<scalar_t>(static_cast<float>(xp[e * channel_stride]) * m);
            }
          }
        }
        Vec<uint32_t, 4> words;
#pragma unroll
        for (int pair = 0; pair < 4; ++pair) words.val[pair] = pack_pair(v[2 * pair], v[2 * pair + 1]);
        *reinterpret_cast<Vec<uint32_t, 4>*>(tile_s + staged_at[k]) = words;
      }
    };

    float acc[kMmaRuns][4];
#pragma unroll
    for (int run = 0; run < kMmaRuns; ++run) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[run][r] = 0.0f;
    }
    // The channel groups, chunk by chunk of the weight, with the mask read one way.
    auto accumulate = [&](auto per_channel) {
      for (int64_t c0 = 0; c0 < g.in_channels; c0 += g.chunk_channels) {
        const int64_t left = g.in_channels - c0;
        const int64_t groups =
            ((left < g.chunk_channels ? left : g.chunk_channels) + kGroupChannels - 1) /
            kGroupChannels;
        if (!whole_weight) {
          __syncthreads();  // every warp is done with the previous chunk
          stage_mma_weight<kOut>(g, c0 / kGroupChannels, groups, w_s);
          __syncthreads();
        }
        for (int64_t q = 0; q < groups; ++q) {
          __syncthreads();  // every warp is done with the group staged before
          stage(per_channel, c0 + q * kGroupChannels);
          __syncthreads();
          const uint32_t* w_group = w_s + q * kGroupWeightWords;
#pragma unroll
          for (int tap = 0; tap < kFewOutputsTaps; ++tap) {
            const int i = tap / 3, j = tap % 3;
            const Vec<uint32_t, 2> bv =
                *reinterpret_cast<const Vec<uint32_t, 2>*>(w_group + (tap * 32 + lane) * 2);
            const uint32_t b[2] = {bv.val[0], bv.val[1]};
#pragma unroll
            for (int run = 0; run < kMmaRuns; ++run) {
              // Rows of A: the 16 pixels of the run, shifted by the tap; columns: the
              // group's channels.
              const int pixel = (warp + i) * kStagedCols + run * 16 + j + lane / 4;
              const uint32_t* pa = tile_s + pixel * kPixelWords + lane % 4;
              const uint32_t a[4] = {pa[0], pa[8 * kPixelWords], pa[4],
                                     pa[8 * kPixelWords + 4]};
              mma_16x8x16<scalar_t>(acc[run], a, b);
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

    const int64_t oh = oh0 + warp;
    if (oh >= g.out_h) continue;
#pragma unroll
    for (int run = 0; run < kMmaRuns; ++run) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int co = 2 * (lane % 4) + r % 2;
        const int64_t ow = ow0 + run * 16 + lane / 4 + 8 * (r / 2);
        if (co < kOut && ow < g.out_w) write_output_channel(p, n, oh, ow, co, acc[run][r]);
      }
    }
  }
}

}  // namespace cuda
}  // namespace pconv
