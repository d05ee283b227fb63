// Direct convolutions on CUDA cores for layers with at most kFewOutputs output channels (the
// UNets' last layers: 64 -> 3 and 67 -> 3, 3x3), whose GEMM is too narrow to keep tensor
// cores busy: there the passes around cuDNN's convolution (x * m before it, the epilogue
// after it, dx * m after its input gradient) move the whole input once more each.
//
//   forward:        one thread makes all C_out outputs of one output pixel. It reads x
//                   and m for its window (x * m rounded to the input dtype, as at::mul
//                   rounds it), accumulates in acc_t and writes y = (raw * r + b) * u
//                   once. 3x3 layers of unit stride and dilation take a tiled forward
//                   instead (few_outputs_3x3_forward_kernel, below): a block stages x * m
//                   of its tile's window in shared memory, and a thread makes kRowPixels
//                   adjacent outputs of a row from there. In bfloat16 and float16 on
//                   sm_80 and later, that forward runs on tensor cores instead
//                   (few_outputs_mma_kernel.cuh).
//   input gradient: one thread makes all C_in values of one input pixel. It gathers the
//                   C_out * taps values of g_raw its pixel feeds into registers once, then
//                   for each input channel sums them against the weight and writes
//                   dx = sum * m once. The same 3x3 layers take a tiled input gradient
//                   (few_outputs_3x3_input_grad_kernel): a block stages the g_raw of its
//                   tile once, and a thread makes dx for kRowPixels adjacent pixels
//                   (on tensor cores in bfloat16 and float16, few_outputs_mma_kernel.cuh).
//
// The weight is staged in shared memory as acc_t w_s[c][tap][co] (tap = i * kw + j, padded
// with zeros to kFewOutputsTaps taps, and co to out_stride<kOut>: 3 outputs take 4 slots),
// chunk_channels input channels at a time: every thread of a warp reads the same entry,
// which shared memory broadcasts, in 16-byte loads. Blocks walk the pixels (or the tiles)
// in a grid-stride loop whose trip count depends on blockIdx only, so the barriers around
// a chunk are reached by every thread.
#pragma once

#include <type_traits>

#include "device_utils.cuh"
#include "params.cuh"

namespace pconv {
namespace cuda {

// Slots per tap of the staged weight: kOut rounded up to a power of two, so that a tap's
// weights are one or two aligned 16-byte loads.
template <int kOut>
constexpr int out_stride() {
  return kOut == 3 ? 4 : kOut;
}

// N consecutive values from a 16-byte aligned position in shared memory: 16-byte loads,
// then one narrower load for the rest.
template <int N, typename acc_t>
__device__ __forceinline__ void load_aligned_run(const acc_t* src, acc_t (&out)[N]) {
  constexpr int kPerLoad = static_cast<int>(16 / sizeof(acc_t));
  constexpr int kWhole = N / kPerLoad * kPerLoad;
  constexpr int kRest = N - kWhole;
  static_assert(kRest == 0 || kRest == 1 || kRest == 2, "the rest must be one aligned load");
#pragma unroll
  for (int k = 0; k < kWhole; k += kPerLoad) {
    const Vec<acc_t, kPerLoad> v = *reinterpret_cast<const Vec<acc_t, kPerLoad>*>(src + k);
#pragma unroll
    for (int q = 0; q < kPerLoad; ++q) out[k + q] = v.val[q];
  }
  if constexpr (kRest > 0) {
    const Vec<acc_t, kRest> v = *reinterpret_cast<const Vec<acc_t, kRest>*>(src + kWhole);
#pragma unroll
    for (int q = 0; q < kRest; ++q) out[kWhole + q] = v.val[q];
  }
}

// The kOut weights of one tap, w[0, kOut), from its out_stride<kOut> slots.
template <int kOut, typename acc_t>
__device__ __forceinline__ void load_tap_weights(const acc_t* w, acc_t (&out)[kOut]) {
  acc_t slots[out_stride<kOut>()];
  load_aligned_run(w, slots);
#pragma unroll
  for (int co = 0; co < kOut; ++co) out[co] = slots[co];
}

// w_s[(c - c0) * kFewOutputsTaps * S + t * S + co] = W[co, c, t / kw, t % kw] (S =
// out_stride<kOut>) for the input channels [c0, c0 + count); zero for taps past kh * kw and
// slots past C_out.
template <int kOut, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_weight_chunk(const FewOutputsConv<scalar_t, acc_t>& g,
                                                   int64_t c0, int64_t count, acc_t* w_s) {
  constexpr int64_t kSlots = out_stride<kOut>();
  constexpr int64_t kPerChannel = kFewOutputsTaps * kSlots;
  const int64_t taps = g.kernel_h * g.kernel_w;
  const Strides4& s = g.weight_strides;
  for (int64_t e = threadIdx.x; e < count * kPerChannel; e += blockDim.x) {
    const int64_t c = e / kPerChannel;
    const int64_t t = (e - c * kPerChannel) / kSlots;
    const int64_t co = e - c * kPerChannel - t * kSlots;
    acc_t v = 0;
    if (t < taps && co < g.out_channels) {
      const int64_t i = t / g.kernel_w;
      const int64_t j = t - i * g.kernel_w;
      v = static_cast<acc_t>(g.weight[co * s.n + (c0 + c) * s.c + i * s.h + j * s.w]);
    }
    w_s[e] = v;
  }
}

// Stages the chunk of input channels that starts at c0 and returns its size. With one chunk
// (the usual case) the weight is staged once, before the pixel loop, and this only returns
// the size.
template <int kOut, typename scalar_t, typename acc_t>
__device__ __forceinline__ int64_t next_weight_chunk(const FewOutputsConv<scalar_t, acc_t>& g,
                                                     int64_t c0, acc_t* w_s) {
  const int64_t left = g.in_channels - c0;
  const int64_t count = left < g.chunk_channels ? left : g.chunk_channels;
  if (g.chunk_channels < g.in_channels) {
    __syncthreads();  // every thread is done with the previous chunk
    stage_weight_chunk<kOut>(g, c0, count, w_s);
    __syncthreads();
  }
  return count;
}

template <int kOut, typename scalar_t, typename acc_t>
__device__ __forceinline__ void stage_whole_weight(const FewOutputsConv<scalar_t, acc_t>& g,
                                                   acc_t* w_s) {
  if (g.chunk_channels >= g.in_channels) {
    stage_weight_chunk<kOut>(g, 0, g.in_channels, w_s);
    __syncthreads();
  }
}

// The pixel of flat index idx over [N, height, width]; (0, 0, 0) for a thread past the
// end, which still takes part in the barriers of its block.
struct Pixel {
  int64_t n, h, w;
};
__device__ __forceinline__ Pixel pixel_of(int64_t idx, bool active, int64_t height,
                                          int64_t width) {
  if (!active) return {0, 0, 0};
  return {idx / (width * height), (idx / width) % height, idx % width};
}

// x * m as the masking pass writes it: rounded to the input dtype.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t masked_value(scalar_t x, acc_t m) {
  return static_cast<acc_t>(static_cast<scalar_t>(static_cast<acc_t>(x) * m));
}

// y[n, co, oh, ow] = (raw * r + b) * u (raw * r without a bias) from the sum of one output.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void write_output_channel(
    const FewOutputsForwardParams<scalar_t, acc_t>& p, int64_t n, int64_t oh, int64_t ow, int co,
    acc_t raw) {
  const Strides4& ys = p.out_strides;
  const int64_t mi = n * p.mask_plane_stride + oh * p.conv.out_w + ow;
  const acc_t r = p.ratio[mi];
  const acc_t v = p.bias != nullptr ? (raw * r + static_cast<acc_t>(p.bias[co])) * p.update[mi]
                                    : raw * r;
  p.out[n * ys.n + co * ys.c + oh * ys.h + ow * ys.w] = static_cast<scalar_t>(v);
}

// The same for all the outputs of one pixel.
template <typename scalar_t, typename acc_t, int kOut>
__device__ __forceinline__ void write_output(const FewOutputsForwardParams<scalar_t, acc_t>& p,
                                             int64_t n, int64_t oh, int64_t ow,
                                             const acc_t (&raw)[kOut]) {
#pragma unroll
  for (int co = 0; co < kOut; ++co) write_output_channel(p, n, oh, ow, co, raw[co]);
}

template <typename scalar_t, typename acc_t, int kOut, bool kHasMask>
__global__ void few_outputs_forward_kernel(const FewOutputsForwardParams<scalar_t, acc_t> p) {
  constexpr int kSlots = out_stride<kOut>();
  acc_t* w_s = dynamic_shared_memory<acc_t>();
  const FewOutputsConv<scalar_t, acc_t>& g = p.conv;
  const Strides4 &xs = p.input_strides, &ms = p.mask_strides;
  const int64_t pixels = g.batch * g.out_h * g.out_w;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  stage_whole_weight<kOut>(g, w_s);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < pixels;
       base += step) {
    const int64_t idx = base + threadIdx.x;
    const bool active = idx < pixels;
    const Pixel out = pixel_of(idx, active, g.out_h, g.out_w);
    const int64_t n = out.n, oh = out.h, ow = out.w;
    const int64_t h0 = oh * g.stride_h - g.pad_h, w0 = ow * g.stride_w - g.pad_w;
    // Taps outside the image read padding, which is a hole: they add nothing.
    const int64_t i_lo = taps_in_bounds_lo(h0, g.dil_h);
    const int64_t i_hi = active ? taps_in_bounds_hi(h0, g.in_h, g.kernel_h, g.dil_h) : 0;
    const int64_t j_lo = taps_in_bounds_lo(w0, g.dil_w);
    const int64_t j_hi = taps_in_bounds_hi(w0, g.in_w, g.kernel_w, g.dil_w);

    acc_t acc[kOut];
#pragma unroll
    for (int co = 0; co < kOut; ++co) acc[co] = 0;
    for (int64_t c0 = 0; c0 < g.in_channels; c0 += g.chunk_channels) {
      const int64_t count = next_weight_chunk<kOut>(g, c0, w_s);
      for (int64_t i = i_lo; i < i_hi; ++i) {
        const int64_t ih = h0 + i * g.dil_h;
        for (int64_t j = j_lo; j < j_hi; ++j) {
          const int64_t iw = w0 + j * g.dil_w;
          const scalar_t* x = p.input + n * xs.n + c0 * xs.c + ih * xs.h + iw * xs.w;
          const scalar_t* m =
              kHasMask ? p.mask + n * ms.n + c0 * ms.c + ih * ms.h + iw * ms.w : nullptr;
          const acc_t* w = w_s + (i * g.kernel_w + j) * kSlots;
          // A single-channel mask of 0 or 1 here (holes and known pixels): x * m is exact,
          // so the rounding of masked_value changes nothing and is left out.
          const acc_t m_pixel = kHasMask && ms.c == 0 ? static_cast<acc_t>(*m) : acc_t(1);
          const bool exact =
              !kHasMask || (ms.c == 0 && (m_pixel == acc_t(0) || m_pixel == acc_t(1)));
          for (int64_t c = 0; c < count; ++c) {
            acc_t v;
            if (exact) {
              v = static_cast<acc_t>(x[c * xs.c]) * m_pixel;
            } else {
              v = masked_value(x[c * xs.c], ms.c == 0 ? m_pixel : static_cast<acc_t>(m[c * ms.c]));
            }
            acc_t wt[kOut];
            load_tap_weights<kOut>(w + c * (kFewOutputsTaps * kSlots), wt);
#pragma unroll
            for (int co = 0; co < kOut; ++co) acc[co] += v * wt[co];
          }
        }
      }
    }
    if (!active) continue;
    write_output(p, n, oh, ow, acc);
  }
}

// The 3x3 layers of unit stride and dilation (the UNets' last layers) take a forward that
// works on tiles of kTileRows x kTileCols outputs. A block stages x * m of the tile's
// window (the kStagedRows x kStagedCols input pixels its outputs read, zero outside the
// image, as the padding is a hole) in shared memory as acc_t, staged_channels<acc_t>()
// channels at a time, each input value loaded from global memory and masked once. Each thread then makes
// kRowPixels adjacent outputs of a row: per channel, two vector loads give a window row
// that feeds kRowPixels * 3 taps, and each weight read from shared memory feeds kRowPixels
// pixels, so the loop is almost only fused multiply-adds, without masking, bounds or
// address arithmetic. Offsets within one sample are 32-bit (the launcher checks that they
// fit).
constexpr int kRowPixels = 4;
constexpr int kRowColumns = kRowPixels + 2;  // input columns of a 3-wide window row
constexpr int kTileRows = 16;
constexpr int kTileCols = 64;
constexpr int kTileThreads = kTileRows * kTileCols / kRowPixels;  // 256
constexpr int kStagedRows = kTileRows + 2;
constexpr int kStagedCols = kTileCols + 2;
// A staged row's stride: a multiple of 4 values, so that each thread's first window
// column starts a 16-byte load.
constexpr int kStagedStride = (kStagedCols + 3) / 4 * 4;
constexpr int kStagedPlane = kStagedRows * kStagedStride;
// Window positions each thread stages per channel.
constexpr int kStagedPerThread = (kStagedRows * kStagedCols + kTileThreads - 1) / kTileThreads;

// The tiles of `rows` x kTileCols pixels over [batch, h, w], numbered plane by plane.
struct Tiles {
  int64_t rows, down, across, count;
  __host__ __device__ Tiles(int64_t batch, int64_t h, int64_t w, int64_t tile_rows = kTileRows)
      : rows(tile_rows),
        down((h + tile_rows - 1) / tile_rows),
        across((w + kTileCols - 1) / kTileCols),
        count(batch * down * across) {}
  // Tile t: its sample and its first row and column.
  __device__ void origin(int64_t t, int64_t& n, int64_t& h0, int64_t& w0) const {
    n = t / (down * across);
    h0 = (t / across) % down * rows;
    w0 = t % across * kTileCols;
  }
};

// Channels staged at a time: about 20 KB of shared memory, the rest holds the weight.
template <typename acc_t>
constexpr int staged_channels() {
  return sizeof(acc_t) == 8 ? 2 : 4;
}
template <typename acc_t>
constexpr int64_t staged_tile_bytes() {
  return static_cast<int64_t>(staged_channels<acc_t>()) * kStagedPlane * sizeof(acc_t);
}

// At most 80 registers a thread, so that three blocks share a multiprocessor (a block
// waits at its barriers while the others compute).
template <typename scalar_t, typename acc_t, int kOut, bool kHasMask>
__global__ void __launch_bounds__(kTileThreads, 3)
    few_outputs_3x3_forward_kernel(const FewOutputsForwardParams<scalar_t, acc_t> p) {
  constexpr int kSlots = out_stride<kOut>();
  constexpr int kStaged = staged_channels<acc_t>();
  acc_t* tile_s = dynamic_shared_memory<acc_t>();
  acc_t* w_s = tile_s + kStaged * kStagedPlane;
  const FewOutputsConv<scalar_t, acc_t>& g = p.conv;
  const Strides4 &xs = p.input_strides, &ms = p.mask_strides;
  const Tiles tiles(g.batch, g.out_h, g.out_w);
  const bool per_channel_mask = kHasMask && ms.c != 0;
  const int tx = threadIdx.x % (kTileCols / kRowPixels), ty = threadIdx.x / (kTileCols / kRowPixels);
  stage_whole_weight<kOut>(g, w_s);

  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t n, oh0, ow0;
    tiles.origin(t, n, oh0, ow0);
    const int64_t h0 = oh0 - g.pad_h, w0 = ow0 - g.pad_w;

    // The window positions this thread stages (without a branch: slots past the window
    // write into the padding columns of the plane, and positions outside the image load
    // the sample's first pixel and stage 0): their place in the staged plane, whether they
    // lie in the image, their offsets in x and in the mask, and the single-channel mask
    // there (1 without one, or with C_in channels).
    int staged_at[kStagedPerThread];
    bool slot_in[kStagedPerThread];
    uint32_t x_off[kStagedPerThread], m_off[kStagedPerThread];
    acc_t slot_mask[kStagedPerThread];
    const scalar_t* x_n = p.input + n * xs.n;
    const scalar_t* m_n = kHasMask ? p.mask + n * ms.n : nullptr;
    bool exact = true;
#pragma unroll
    for (int k = 0; k < kStagedPerThread; ++k) {
      const int e = static_cast<int>(threadIdx.x) + k * kTileThreads;
      const bool in_window = e < kStagedRows * kStagedCols;
      const int r = e / kStagedCols, col = e - r * kStagedCols;
      const int64_t ih = h0 + r, iw = w0 + col;
      const bool inside = in_window && ih >= 0 && ih < g.in_h && iw >= 0 && iw < g.in_w;
      staged_at[k] = in_window ? r * kStagedStride + col
                               : (e % kStagedRows) * kStagedStride + kStagedCols;
      slot_in[k] = inside;
      x_off[k] = inside ? static_cast<uint32_t>(ih * xs.h + iw * xs.w) : 0u;
      m_off[k] = inside ? static_cast<uint32_t>(ih * ms.h + iw * ms.w) : 0u;
      acc_t v = 1;
      if (kHasMask && !per_channel_mask) v = static_cast<acc_t>(m_n[m_off[k]]);
      slot_mask[k] = v;
      exact = exact && (v == acc_t(0) || v == acc_t(1));
    }
    // Stages x * m of channels [c_first, c_first + staged), rounded to the input dtype as
    // at::mul rounds it (which changes nothing where m is 0 or 1: `round` false); 0 outside
    // the image.
    auto stage = [&](auto per_channel, auto round, int64_t c_first, int staged) {
      for (int cc = 0; cc < staged; ++cc) {
        const scalar_t* xc = x_n + (c_first + cc) * xs.c;
        const scalar_t* mc = kHasMask ? m_n + (c_first + cc) * ms.c : nullptr;
        acc_t* plane = tile_s + cc * kStagedPlane;
#pragma unroll
        for (int k = 0; k < kStagedPerThread; ++k) {
          acc_t m = slot_mask[k];
          if constexpr (decltype(per_channel)::value) m = static_cast<acc_t>(mc[m_off[k]]);
          const acc_t v = decltype(round)::value ? masked_value(xc[x_off[k]], m)
                                                 : static_cast<acc_t>(xc[x_off[k]]) * m;
          plane[staged_at[k]] = slot_in[k] ? v : acc_t(0);
        }
      }
    };

    acc_t acc[kRowPixels][kOut];
#pragma unroll
    for (int px = 0; px < kRowPixels; ++px) {
#pragma unroll
      for (int co = 0; co < kOut; ++co) acc[px][co] = 0;
    }
    for (int64_t c0 = 0; c0 < g.in_channels; c0 += g.chunk_channels) {
      const int64_t count = next_weight_chunk<kOut>(g, c0, w_s);
      for (int64_t cs = 0; cs < count; cs += kStaged) {
        const int staged = static_cast<int>(count - cs < kStaged ? count - cs : kStaged);
        const int64_t c_first = c0 + cs;
        __syncthreads();  // every thread is done with the channels staged before
        if (per_channel_mask) {
          stage(std::true_type{}, std::true_type{}, c_first, staged);
        } else if (exact) {
          stage(std::false_type{}, std::false_type{}, c_first, staged);
        } else {
          stage(std::false_type{}, std::true_type{}, c_first, staged);
        }
        __syncthreads();
        for (int cc = 0; cc < staged; ++cc) {
          const acc_t* plane = tile_s + cc * kStagedPlane + ty * kStagedStride + tx * kRowPixels;
          const acc_t* wc = w_s + (cs + cc) * (kFewOutputsTaps * kSlots);
#pragma unroll
          for (int i = 0; i < 3; ++i) {
            acc_t v[kRowColumns];
            load_aligned_run(plane + i * kStagedStride, v);
#pragma unroll
            for (int j = 0; j < 3; ++j) {
              acc_t wt[kOut];
              load_tap_weights<kOut>(wc + (i * 3 + j) * kSlots, wt);
#pragma unroll
              for (int px = 0; px < kRowPixels; ++px) {
#pragma unroll
                for (int co = 0; co < kOut; ++co) acc[px][co] += v[px + j] * wt[co];
              }
            }
          }
        }
      }
    }
    const int64_t oh = oh0 + ty;
    if (oh >= g.out_h) continue;
#pragma unroll
    for (int px = 0; px < kRowPixels; ++px) {
      const int64_t ow = ow0 + tx * kRowPixels + px;
      if (ow >= g.out_w) break;
      write_output(p, n, oh, ow, acc[px]);
    }
  }
}

template <typename scalar_t, typename acc_t, int kOut, bool kHasMask>
__global__ void few_outputs_input_grad_kernel(
    const FewOutputsInputGradParams<scalar_t, acc_t> p) {
  constexpr int kSlots = out_stride<kOut>();
  acc_t* w_s = dynamic_shared_memory<acc_t>();
  const FewOutputsConv<scalar_t, acc_t>& g = p.conv;
  const Strides4 &gs = p.grad_raw_strides, &ms = p.mask_strides, &xs = p.grad_input_strides;
  const int64_t pixels = g.batch * g.in_h * g.in_w;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t taps = g.kernel_h * g.kernel_w;
  stage_whole_weight<kOut>(g, w_s);

  for (int64_t base = static_cast<int64_t>(blockIdx.x) * blockDim.x; base < pixels;
       base += step) {
    const int64_t idx = base + threadIdx.x;
    const bool active = idx < pixels;
    const Pixel in = pixel_of(idx, active, g.in_h, g.in_w);
    const int64_t n = in.n, ih = in.h, iw = in.w;

    // Tap (i, j) of output (oh, ow) reads this pixel when oh * s - pad + i * d == ih (and
    // the same across): the gradient values that reach it, zero for taps that none sends.
    acc_t gv[kFewOutputsTaps][kOut];
#pragma unroll
    for (int t = 0; t < kFewOutputsTaps; ++t) {
      int64_t oh = 0, ow = 0;
      bool feeds = active && t < taps;
      if (feeds) {
        const int64_t i = t / g.kernel_w;
        const int64_t j = t - i * g.kernel_w;
        const int64_t hs = ih + g.pad_h - i * g.dil_h;
        const int64_t ws = iw + g.pad_w - j * g.dil_w;
        oh = hs / g.stride_h;
        ow = ws / g.stride_w;
        feeds = hs >= 0 && ws >= 0 && hs == oh * g.stride_h && ws == ow * g.stride_w &&
                oh < g.out_h && ow < g.out_w;
      }
      const scalar_t* gr = p.grad_raw + n * gs.n + oh * gs.h + ow * gs.w;
#pragma unroll
      for (int co = 0; co < kOut; ++co) {
        gv[t][co] = feeds ? static_cast<acc_t>(gr[co * gs.c]) : acc_t(0);
      }
    }
    for (int64_t c0 = 0; c0 < g.in_channels; c0 += g.chunk_channels) {
      const int64_t count = next_weight_chunk<kOut>(g, c0, w_s);
      if (!active) continue;  // after the barriers of the chunk
      // A single-channel mask has channel stride 0: every channel reads its one value.
      const scalar_t* mc = kHasMask ? p.mask + n * ms.n + c0 * ms.c + ih * ms.h + iw * ms.w
                                    : nullptr;
      scalar_t* dxc = p.grad_input + n * xs.n + c0 * xs.c + ih * xs.h + iw * xs.w;
      const acc_t* wc = w_s;
      for (int64_t c = 0; c < count; ++c) {
        // One partial sum per tap column keeps three chains of fused multiply-adds in
        // flight instead of one.
        acc_t part[3] = {0, 0, 0};
#pragma unroll
        for (int t = 0; t < kFewOutputsTaps; ++t) {
          acc_t wt[kOut];
          load_tap_weights<kOut>(wc + t * kSlots, wt);
#pragma unroll
          for (int co = 0; co < kOut; ++co) part[t % 3] += wt[co] * gv[t][co];
        }
        acc_t sum = part[0] + part[1] + part[2];
        if (kHasMask) sum *= static_cast<acc_t>(*mc);
        *dxc = static_cast<scalar_t>(sum);
        wc += kFewOutputsTaps * kSlots;
        if (kHasMask) mc += ms.c;
        dxc += xs.c;
      }
    }
  }
}

// The input gradient of the same 3x3 layers of unit stride and dilation, on tiles of
// kTileRows x kTileCols input pixels. A block stages the g_raw its tile reads (kStagedRows x
// kStagedCols output pixels for each of the C_out channels, zero outside the output) in
// shared memory once; each thread then makes dx for kRowPixels adjacent pixels of a row,
// channel after channel: a row of g_raw per output channel and tap row (two vector loads)
// feeds kRowPixels * 3 taps, and each weight feeds kRowPixels pixels.
template <typename acc_t, int kOut>
constexpr int64_t staged_grad_bytes() {
  return static_cast<int64_t>(kOut) * kStagedPlane * sizeof(acc_t);
}

template <typename scalar_t, typename acc_t, int kOut, bool kHasMask>
__global__ void __launch_bounds__(kTileThreads, 2)
    few_outputs_3x3_input_grad_kernel(const FewOutputsInputGradParams<scalar_t, acc_t> p) {
  constexpr int kSlots = out_stride<kOut>();
  acc_t* grad_s = dynamic_shared_memory<acc_t>();
  acc_t* w_s = grad_s + kOut * kStagedPlane;
  const FewOutputsConv<scalar_t, acc_t>& g = p.conv;
  const Strides4 &gs = p.grad_raw_strides, &ms = p.mask_strides, &xs = p.grad_input_strides;
  const Tiles tiles(g.batch, g.in_h, g.in_w);
  const bool per_channel_mask = kHasMask && ms.c != 0;
  const int tx = threadIdx.x % (kTileCols / kRowPixels), ty = threadIdx.x / (kTileCols / kRowPixels);
  stage_whole_weight<kOut>(g, w_s);

  for (int64_t t = blockIdx.x; t < tiles.count; t += gridDim.x) {
    int64_t n, ih0, iw0;
    tiles.origin(t, n, ih0, iw0);
    // Staged position (r, q) holds g_raw at output (oh0 + r, ow0 + q): tap (i, j) of input
    // pixel (ih, iw) reads output (ih + pad_h - i, iw + pad_w - j).
    const int64_t oh0 = ih0 + g.pad_h - 2, ow0 = iw0 + g.pad_w - 2;
    __syncthreads();  // every thread is done with the tile staged before
    for (int e = threadIdx.x; e < kOut * kStagedRows * kStagedCols; e += kTileThreads) {
      const int co = e / (kStagedRows * kStagedCols);
      const int rest = e - co * (kStagedRows * kStagedCols);
      const int r = rest / kStagedCols, q = rest - r * kStagedCols;
      const int64_t oh = oh0 + r, ow = ow0 + q;
      acc_t v = 0;
      if (oh >= 0 && oh < g.out_h && ow >= 0 && ow < g.out_w) {
        v = static_cast<acc_t>(p.grad_raw[n * gs.n + co * gs.c + oh * gs.h + ow * gs.w]);
      }
      grad_s[co * kStagedPlane + r * kStagedStride + q] = v;
    }
    __syncthreads();

    // This thread's pixels: whether each lies in the image, the 32-bit offsets of dx and
    // of the mask there within a channel of the sample, and a single-channel mask's value.
    const int64_t ih = ih0 + ty;
    const bool row_in = ih < g.in_h;
    bool px_in[kRowPixels];
    uint32_t dx_off[kRowPixels], m_off[kRowPixels];
    acc_t m_single[kRowPixels];
#pragma unroll
    for (int px = 0; px < kRowPixels; ++px) {
      const int64_t iw = iw0 + tx * kRowPixels + px;
      px_in[px] = row_in && iw < g.in_w;
      dx_off[px] = px_in[px] ? static_cast<uint32_t>(ih * xs.h + iw * xs.w) : 0u;
      m_off[px] = px_in[px] ? static_cast<uint32_t>(ih * ms.h + iw * ms.w) : 0u;
      m_single[px] = kHasMask && !per_channel_mask && px_in[px]
                         ? static_cast<acc_t>(p.mask[n * ms.n + m_off[px]])
                         : acc_t(1);
    }
    const acc_t* rows = grad_s + ty * kStagedStride + tx * kRowPixels;

    // dx of the chunk [c0, c0 + count), times the mask read per channel or held.
    auto input_grad = [&](auto per_channel, int64_t c0, int64_t count) {
      scalar_t* dxc = p.grad_input + n * xs.n + c0 * xs.c;
      const scalar_t* mc = kHasMask ? p.mask + n * ms.n + c0 * ms.c : nullptr;
      const acc_t* wc = w_s;
      for (int64_t c = 0; c < count; ++c) {
        acc_t sum[kRowPixels];
#pragma unroll
        for (int px = 0; px < kRowPixels; ++px) sum[px] = 0;
#pragma unroll
        for (int ir = 0; ir < 3; ++ir) {  // staged row ty + ir: tap row i = 2 - ir
          acc_t wt[3][kOut];
#pragma unroll
          for (int j = 0; j < 3; ++j) load_tap_weights<kOut>(wc + ((2 - ir) * 3 + j) * kSlots, wt[j]);
#pragma unroll
          for (int co = 0; co < kOut; ++co) {
            acc_t v[kRowColumns];
            load_aligned_run(rows + co * kStagedPlane + ir * kStagedStride, v);
#pragma unroll
            for (int j = 0; j < 3; ++j) {
#pragma unroll
              for (int px = 0; px < kRowPixels; ++px) sum[px] += wt[j][co] * v[px + 2 - j];
            }
          }
        }
#pragma unroll
        for (int px = 0; px < kRowPixels; ++px) {
          acc_t val = sum[px];
          if constexpr (decltype(per_channel)::value) {
            val *= static_cast<acc_t>(mc[m_off[px]]);
          } else if constexpr (kHasMask) {
            val *= m_single[px];
          }
          if (px_in[px]) dxc[dx_off[px]] = static_cast<scalar_t>(val);
        }
        dxc += xs.c;
        if constexpr (kHasMask) mc += ms.c;
        wc += kFewOutputsTaps * kSlots;
      }
    };
    for (int64_t c0 = 0; c0 < g.in_channels; c0 += g.chunk_channels) {
      const int64_t count = next_weight_chunk<kOut>(g, c0, w_s);
      if (!row_in) continue;  // after the barriers of the chunk
      if (per_channel_mask) {
        input_grad(std::true_type{}, c0, count);
      } else {
        input_grad(std::false_type{}, c0, count);
      }
    }
  }
}

}  // namespace cuda
}  // namespace pconv
