// Kernel parameters of the CUDA partial convolution, as plain structs, and the small device
// helpers the kernels share.
//
// Every kernel takes one of these structs by value: the launchers (the .cu files) fill
// them from tensors, the kernel templates (the *_kernel.cuh files) hold only the math.
// A future implicit-GEMM path (masking on load, renormalising in the epilogue) reads the
// same MaskRatio buffers and slots in next to the cuDNN path per shape.
//
// Mask convention: 1 = known pixel, 0 = hole. The math is shared/DESIGN.md, §1.
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "runtime.cuh"

namespace pconv {
namespace cuda {

// Accumulation type of the ratio, the epilogue and the reductions: float, or double for
// double inputs (the same as at::opmath_type for the four dtypes the op dispatches).
template <typename scalar_t>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};
template <typename scalar_t>
using acc_type = typename AccType<scalar_t>::type;

// ---------------------------------------------------------------------------------------
// Mask pass: S = window sum of the channel-summed mask, u = clamp(S, 0, 1),
// r = win / (S + 1e-8) * u, each [N_m, 1, H', W'] contiguous in acc_t.
template <typename scalar_t, typename acc_t>
struct MaskRatioParams {
  const scalar_t* mask;  // [N_m, C_m, H, W] with the strides below; nullptr: no mask
  int64_t mask_stride_n, mask_stride_c, mask_stride_h, mask_stride_w;
  acc_t* ratio;          // [N_m, 1, H', W'] contiguous
  acc_t* update;         // [N_m, 1, H', W'] contiguous
  scalar_t* update_out;  // optional copy of update in the input dtype (nullptr: none)
  int64_t planes;        // N_m (1 without a mask)
  int64_t channels;      // C_m
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  acc_t window;          // kh * kw * C_m (slide_winsize)
  // Launch shape, set by the launcher: one block computes a tile of blockDim.y x
  // blockDim.x outputs of one plane; blocks walk tiles_h * tiles_w * planes tiles. The
  // footprint of one tile in the (padded) input is staged in shared memory when it fits.
  int64_t tiles_h, tiles_w;
  int64_t foot_h, foot_w;
};

// ---------------------------------------------------------------------------------------
// Masking of a multi-channel mask that has the input's shape and layout, with the mask's
// channel sum from the same read: out = x * m, channel_sum[n, p] = sum over c of m[n, c, p].
// The mask pass then reads the one-channel sum instead of the C-channel mask.
template <typename scalar_t, typename acc_t>
struct MaskedInputParams {
  const scalar_t* input;  // x, [N, C, H, W] contiguous in its layout
  const scalar_t* mask;   // m, same shape and strides
  scalar_t* out;          // x * m, same shape and strides
  acc_t* channel_sum;     // [N, H, W] contiguous
  int64_t batch, channels, plane;  // N, C, H * W
  bool channels_last;              // layout of all three
};

// ---------------------------------------------------------------------------------------
// Forward epilogue, in place on the convolution output raw (NCHW or channels_last
// contiguous): y = (raw * r + b) * u with a bias, y = raw * r without.
template <typename scalar_t, typename acc_t>
struct EpilogueParams {
  scalar_t* out;          // raw on entry, y on exit; [N, C, H', W'] contiguous in its layout
  const acc_t* ratio;     // [N_m, 1, H', W']
  const acc_t* update;    // [N_m, 1, H', W']
  const scalar_t* bias;   // [C] or nullptr
  int64_t numel;          // N * C * H' * W'
  int64_t channels;       // C_out
  int64_t plane;          // H' * W'
  int64_t mask_plane_stride;  // H' * W', or 0 when one mask broadcasts over the batch
  bool channels_last;         // layout of out
};

// ---------------------------------------------------------------------------------------
// Backward prologue: g_raw = g_y * r * u (bias) or g_y * r (no bias), and the first stage
// of db = sum over N, H', W' of g_y * u: per-block partial sums in partials[c * K + k],
// reduced over k by the finalize kernel in a fixed order (deterministic, no atomics).
template <typename scalar_t, typename acc_t>
struct GradPrologueParams {
  const scalar_t* grad_out;   // g_y, [N, C, H', W'] contiguous in its layout
  scalar_t* grad_raw;         // same layout as grad_out, or nullptr (not needed)
  const acc_t* ratio;         // [N_m, 1, H', W']
  const acc_t* update;        // [N_m, 1, H', W']
  acc_t* partials;            // [C, K], or nullptr (db not needed)
  int64_t num_partials;       // K
  int64_t batch, channels, plane;
  int64_t mask_plane_stride;  // H' * W', or 0 when one mask broadcasts over the batch
  bool has_bias;
  bool channels_last;         // layout of grad_out and grad_raw
  // Launch plan, set by plan_grad_prologue before partials is allocated:
  int vec;                    // values per access: 16 / sizeof(scalar_t), or 1
  // NCHW: the [N * C, H' * W'] rows are cut into chunks of chunk_elems values; one block
  // handles one (row, chunk) item at a time; K = N * chunks_per_row.
  // channels_last: K = the number of pixel blocks (gridDim.x).
  int64_t chunks_per_row, chunk_elems;
};

template <typename scalar_t, typename acc_t>
struct BiasGradParams {
  const acc_t* partials;  // [C, K]
  int64_t num_partials;   // K
  int64_t channels;       // C
  scalar_t* grad_bias;    // [C]
};

// ---------------------------------------------------------------------------------------
// Layers with few output channels (the UNets' last layers, C_out = 3), as a direct
// convolution on CUDA cores: every thread makes all C_out outputs of one pixel. Forward:
// y = (conv(x * m, W) * r + b) * u, masking on load, the epilogue applied before the one
// write of y. Input gradient: dx = conv_input_grad(g_raw, W) * m, the mask applied before
// the one write of dx. kFewOutputs is the most output channels they take; the kernel
// footprint is at most kFewOutputsTaps taps, whose C_out * taps gradient values the input
// gradient holds in registers.
constexpr int kFewOutputs = 4;
constexpr int kFewOutputsTaps = 9;

// 4-D strides of a tensor, in elements.
struct Strides4 {
  int64_t n, c, h, w;
};

// The geometry and the weight both kernels read. The weight ([C_out, C_in, kh, kw], any
// strides) is staged in shared memory in acc_t as [c][tap][co] (co padded to kOut), chunk
// by chunk of chunk_channels input channels.
template <typename scalar_t, typename acc_t>
struct FewOutputsConv {
  const scalar_t* weight;
  Strides4 weight_strides;
  int64_t batch, in_channels, out_channels;
  int64_t in_h, in_w, out_h, out_w;
  int64_t kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t chunk_channels;  // set by the launcher from the shared memory it gives
};

template <typename scalar_t, typename acc_t>
struct FewOutputsForwardParams {
  FewOutputsConv<scalar_t, acc_t> conv;
  const scalar_t* input;  // x, [N, C_in, H, W]
  Strides4 input_strides;
  const scalar_t* mask;   // m, [N_m, C_m, H, W]; nullptr: none (no mask, or x * m given)
  Strides4 mask_strides;  // n: 0 for one mask over the batch; c: 0 for one channel
  const acc_t* ratio;     // [N_m, 1, H', W'] contiguous
  const acc_t* update;    // [N_m, 1, H', W'] contiguous
  int64_t mask_plane_stride;  // H' * W', or 0 when one mask broadcasts over the batch
  const scalar_t* bias;   // [C_out] or nullptr
  scalar_t* out;          // y, [N, C_out, H', W'], dense in its layout
  Strides4 out_strides;
};

template <typename scalar_t, typename acc_t>
struct FewOutputsInputGradParams {
  FewOutputsConv<scalar_t, acc_t> conv;
  const scalar_t* grad_raw;  // g_raw, [N, C_out, H', W']
  Strides4 grad_raw_strides;
  const scalar_t* mask;      // as in the forward; nullptr: no mask
  Strides4 mask_strides;
  scalar_t* grad_input;      // dx, [N, C_in, H, W], dense in its layout
  Strides4 grad_input_strides;
};

// ---------------------------------------------------------------------------------------
// A 3x3 unit-stride convolution as one implicit GEMM on tensor cores
// (implicit_gemm_kernel.cuh, bfloat16 and float16). Forward: y = (conv(x * m, W) * r + b) * u,
// masking on load, the epilogue applied before the one write of y. Input gradient: the same
// GEMM on g_raw with W flipped and transposed and padding 2 - pad, giving dx, times m
// before its one write. "in" and "out" name the GEMM's input and output: for the input
// gradient, g_raw's channels and plane, then dx's. A block makes kIgTileOutputs output
// channels, from groups of kIgGroupChannels input channels.
constexpr int kIgTileOutputs = 64;
constexpr int kIgGroupChannels = 16;

template <typename scalar_t>
struct ImplicitGemmParams {
  const scalar_t* input;  // x, [N, C_in, H, W]
  Strides4 input_strides;
  const scalar_t* mask;   // m, [N_m, C_m, H, W]; nullptr: none (no mask, or x * m given)
  Strides4 mask_strides;  // n: 0 for one mask over the batch; c: 0 for one channel
  // W packed as [ceil(C_in / 16)][9 taps][C_out rounded up to 64][16 input channels]
  // (kIgGroupChannels, kIgTileOutputs), contiguous, zero past C_in and C_out.
  const scalar_t* weight;
  const float* ratio;     // forward: [N_m, 1, H', W'] contiguous
  const float* update;    // forward: [N_m, 1, H', W'] contiguous
  int64_t mask_plane_stride;  // H' * W', or 0 when one mask broadcasts over the batch
  const scalar_t* bias;   // forward: [C_out] or nullptr
  scalar_t* out;          // y (dx), [N, C_out, H', W'], dense in its layout
  Strides4 out_strides;
  bool out_channels_last; // the layout of out (else NCHW)
  const scalar_t* out_mask;  // input gradient: m, [N_m, C_m, H, W]; nullptr: none
  Strides4 out_mask_strides; // n: 0 for one mask over the batch; c: 0 for one channel
  // x (and a C_in-channel mask) hold every 8 channels of a pixel from a multiple of 8 in
  // one aligned 16-byte run: channels_last with C_in a multiple of 8.
  bool vector_input;
  int64_t batch, in_channels, out_channels;
  int64_t in_h, in_w, out_h, out_w, pad_h, pad_w;
};

}  // namespace cuda
}  // namespace pconv
