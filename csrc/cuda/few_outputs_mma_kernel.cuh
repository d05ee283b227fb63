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

// The input gradient of the same layers on tensor cores: dx of a run of 16 input pixels
// for 8 input channels is a GEMM of (pixels) x (C_out x 9 taps, padded to a multiple of
// 16) by (C_out x 9 taps) x (channels): grad_steps mma.sync m16n8k16 a run and 8 channels
// (2 for 3 outputs). A block of 8
// warps takes kMmaTileRows x kTileCols input pixels, a warp one row of them. The block
// stages the g_raw its tile reads (kMmaStagedRows x kStagedCols output pixels of each
// output channel, zero outside the output) in the input dtype once, and the whole weight
// in B-fragment order: per group of 8 input channels and step of 16 values of k, 2 words
// per lane.
// A lane's A values sit at offsets (output channel, tap) that depend on the lane alone, so
// it finds them once per tile.
// Steps of 16 values of k = (output channel, tap): 9 C_out padded to a multiple of 16.
template <int kOut>
constexpr int grad_steps() {
  return (9 * kOut + 15) / 16;
}
// Words of the staged weight per group of 8 input channels: steps x 32 lanes x 2.
template <int kOut>
constexpr int channel_group_words() {
  return grad_steps<kOut>() * 32 * 2;
}
template <int kOut>
constexpr int64_t staged_grad_mma_bytes() {
  // 16-bit values, rounded up to whole 16-byte rows of the buffer.
  return (static_cast<int64_t>(kOut) * kMmaStagedPixels * 2 + 15) / 16 * 16;
}

// k of the GEMM: output channel k / 9, tap k % 9 (k < 9 C_out; the rest are zero).
// B fragments: word w of lane l for step s of channel group q at
// w_s[((q * grad_steps + s) * 32 + l) * 2 + w] holds W[co][c][tap] for c = 8 q + l / 4 and
// k = 16 s + 2 (l % 4) + 8 w (+1 in the high half).
template <int kOut, typename scalar_t>
__device__ __forceinline__ void stage_mma_grad_weight(const FewOutputsConv<scalar_t, float>& g,
                                                      uint32_t* w_s) {
  const Strides4& s = g.weight_strides;
  constexpr int kGroupWords = channel_group_words<kOut>();
  const int64_t groups = (g.in_channels + 7) / 8;
  for (int64_t e = threadIdx.x; e < groups * kGroupWords; e += blockDim.x) {
    const int64_t q = e / kGroupWords;
    const int rest = static_cast<int>(e - q * kGroupWords);
    const int step = rest / 64, lane = rest % 64 / 2, word = rest % 2;
    const int64_t c = q * 8 + lane / 4;
    const int k = 16 * step + 2 * (lane % 4) + 8 * word;
    scalar_t v[2] = {scalar_t(0.0f), scalar_t(0.0f)};
    for (int h = 0; h < 2; ++h) {
      const int co = (k + h) / 9, tap = (k + h) % 9;
      if (co < kOut && c < g.in_channels) {
        v[h] = g.weight[co * s.n + c * s.c + (tap / 3) * s.h + (tap % 3) * s.w];
      }
    }
    w_s[e] = pack_pair(v[0], v[1]);
  }
}

template <typename scalar_t, int kOut, bool kHasMask>
__global__ void __launch_bounds__(kMmaThreads, 3)
    few_outputs_3x3_mma_input_grad_kernel(const FewOutputsInputGradParams<scalar_t, float> p) {
  constexpr int kSteps = grad_steps<kOut>();
  using bits_t = uint16_t;
  bits_t* grad_s = dynamic_shared_memory<bits_t>();
  uint32_t* w_s = reinterpret_cast<uint32_t*>(
      dynamic_shared_memory<unsigned char>() + staged_grad_mma_bytes<kOut>());
  const FewOutputsConv<scalar_t, float>& g = p.conv;
  const Strides4 &gs = p.grad_raw_strides, &ms = p.mask_strides, &xs = p.grad_input_strides;
  const Tiles tiles(g.batch, g.in_h, g.in_w, kMmaTileRows);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t channel_groups = (g.in_channels + 7) / 8;
  // Channel strides as 32-bit offsets (the launcher checks that a sample's offsets fit).
  const uint32_t channel_stride = static_cast<uint32_t>(xs.c);
  const uint32_t mask_channel_stride = static_cast<uint32_t>(ms.c);
  stage_mma_grad_weight<kOut>(g, w_s);

  // This lane's 4 values of k per step, as offsets from its pixel's staged
  // position: tap (i, j) of input pixel (ih, iw) reads output (ih + pad_h - i,
  // iw + pad_w - j), staged at row 2 - i, column 2 - j from the pixel's own. k >= 9 C_out
  // reads the pixel itself and is dropped.
  int k_off[4 * kSteps];
  bool k_in[4 * kSteps];
#pragma unroll
  for (int e = 0; e < 4 * kSteps; ++e) {
    const int k = 16 * (e / 4) + 2 * (lane % 4) + 8 * (e / 2 % 2) + e % 2;
    const int co = k / 9, tap = k % 9;
    k_in[e] = co < kOut;
    k_off[e] = k_in[e] ? co * kMmaStagedPixels + (2 - tap / 3) * kStagedCols + (2 - tap % 3) : 0;
  }

  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t n, ih0, iw0;
    tiles.origin(t, n, ih0, iw0);
    const int64_t oh0 = ih0 + g.pad_h - 2, ow0 = iw0 + g.pad_w - 2;
    scalar_t* dx_n = p.grad_input + n * xs.n;
    const scalar_t* m_n = kHasMask ? p.mask + n * ms.n : nullptr;
    __syncthreads();  // every warp is done with the tile staged before
    for (int e = threadIdx.x; e < kOut * kMmaStagedPixels; e += kMmaThreads) {
      const int co = e / kMmaStagedPixels, rest = e - co * kMmaStagedPixels;
      const int r = rest / kStagedCols, q = rest - r * kStagedCols;
      const int64_t oh = oh0 + r, ow = ow0 + q;
      scalar_t v(0.0f);
      if (oh >= 0 && oh < g.out_h && ow >= 0 && ow < g.out_w) {
        v = p.grad_raw[n * gs.n + co * gs.c + oh * gs.h + ow * gs.w];
      }
      grad_s[e] = v.x;
    }
    __syncthreads();

    const int64_t ih = ih0 + warp;
    if (ih >= g.in_h) continue;  // no barrier until the next tile
    // The runs of the row, with the mask read one way.
    auto runs = [&](auto per_channel) {
      for (int run = 0; run < kMmaRuns; ++run) {
        // A: rows the 16 pixels of the run (this lane's g and g + 8), columns k.
        const int pixel = warp * kStagedCols + run * 16 + lane / 4;
        uint32_t a[kSteps][4];
#pragma unroll
        for (int step = 0; step < kSteps; ++step) {
#pragma unroll
          for (int word = 0; word < 4; ++word) {
            // word 0: row g, k 2t..; 1: row g + 8; 2: row g, k 2t + 8..; 3: row g + 8, k + 8.
            const int row = word % 2 == 0 ? 0 : 8, e = 4 * step + 2 * (word / 2);
            const uint32_t lo = k_in[e] ? grad_s[pixel + row + k_off[e]] : 0u;
            const uint32_t hi = k_in[e + 1] ? grad_s[pixel + row + k_off[e + 1]] : 0u;
            a[step][word] = lo | (hi << 16);
          }
        }
        // This lane's two pixels of the run (g and g + 8): whether they lie in the image,
        // their 32-bit offsets in dx and in the mask, and a single-channel mask's value.
        bool px_in[2];
        uint32_t dx_off[2], m_off[2];
        float m_single[2];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t iw = iw0 + run * 16 + lane / 4 + 8 * h;
          px_in[h] = iw < g.in_w;
          dx_off[h] = px_in[h] ? static_cast<uint32_t>(ih * xs.h + iw * xs.w) : 0u;
          m_off[h] = px_in[h] ? static_cast<uint32_t>(ih * ms.h + iw * ms.w) : 0u;
          m_single[h] = kHasMask && ms.c == 0 && px_in[h] ? static_cast<float>(m_n[m_off[h]]) : 1.0f;
        }
        for (int64_t q = 0; q < channel_groups; ++q) {
          float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int step = 0; step < kSteps; ++step) {
            const Vec<uint32_t, 2> bv = *reinterpret_cast<const Vec<uint32_t, 2>*>(
                w_s + ((q * kSteps + step) * 32 + lane) * 2);
            const uint32_t b[2] = {bv.val[0], bv.val[1]};
            mma_16x8x16<scalar_t>(d, a[step], b);
          }
#pragma unroll
          for (int r = 0; r < 4; ++r) {
            const int c = static_cast<int>(q) * 8 + 2 * (lane % 4) + r % 2;
            if (c >= g.in_channels || !px_in[r / 2]) continue;
            float val = d[r];
            if (kHasMask) {
              val *= decltype(per_channel)::value
                       ? static_cast<float>(m_n[m_off[r / 2] + c * mask_channel_stride])
                       : m_single[r / 2];
            }
            dx_n[dx_off[r / 2] + c * channel_stride] = static_cast<scalar_t>(val);
          }
        }
      }
    };
    if (kHasMask && ms.c != 0) {
      runs(std::true_type{});
    } else {
      runs(std::false_type{});
    }
  }
}

}  // namespace cuda
}  // namespace pconv
