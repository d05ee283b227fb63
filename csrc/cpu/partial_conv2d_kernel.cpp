// CPU kernels of the pconv ops: partial_conv2d and its backward, and the training pair
// partial_conv2d_train / partial_conv2d_train_backward (same math; the forward also hands
// x * m, r and u to the backward instead of the backward forming them again).
//
// Forward, in three passes over memory and never a C_out-channel mask:
//   1. mask pass   - one read of the mask: channel sum, window sum, ratio r and
//                    updated mask u, all single-channel [N_m, 1, H', W'] in float32
//                    (float64 for float64 inputs);
//   2. convolution - oneDNN (through ATen) on x * m; the product is formed in the
//                    layout the convolution reads, so it is the only copy of the input
//                    (with a per-sample multi-channel mask on large planes, the pass that
//                    forms it also sums the mask's channels, so the mask is read once);
//   3. epilogue    - one read-modify-write of the output: y = (raw * r + b) * u.
// Backward mirrors it: one pass forms g_raw = g_y * r (* u) and reduces the bias gradient,
// oneDNN computes both convolution gradients, and the input gradient is masked in place.
// Stride-1 first and last layers fold passes 2 and 3 into kernels of their own: an
// implicit GEMM for up to 4 input channels (implicit_gemm.h) and a direct convolution for
// up to 4 outputs (direct_conv.h), which also computes the first layers' input gradient.
#include "../pconv.h"
#include "direct_conv.h"
#include "implicit_gemm.h"
#include "layout.h"
#include "mask_ratio.h"
#include "opmath_bias.h"
#include "tiles.h"
#include "vector_loops.h"
#include "workspace.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/library.h>

#include <vector>

namespace pconv {
namespace {

// The layout the convolution runs in. Mostly the output's (conv_output_format: channels_last
// when the input or the weight is), with three exceptions:
//  - NCHW where oneDNN (torch 2.13, CPU) is unsafe in channels_last. With one input
//    channel both layouts hold the same bytes, but strided convolutions given the
//    channels_last strides of a C=1 tensor return wrong values; and the channels_last 1x1
//    weight-gradient kernel corrupts the heap for strided shapes with few channels.
//  - channels_last for an NCHW layer when it has few output channels (the UNets' last
//    layers, C_out = 3): oneDNN's NCHW kernels for them run at half the speed of its
//    channels_last ones, forward and backward (measured at 64->3 and 67->3 at 256x256, fp32
//    and bf16). Their stride-1 forward takes the direct convolution instead, but for
//    16-bit training; this layout is their backward's.
//  - channels_last for an NCHW layer on planes of 64 x 64 pixels and more, in 16-bit types.
//    There, on an Intel Xeon with AMX (2 threads, torch 2.13), oneDNN's channels_last
//    convolutions took 0.27-0.80x the time of its NCHW ones in bfloat16 forward and
//    0.50-0.91x backward (3->64 at 256 x 256 to 128->256 at 64 x 64); from 32 x 32 down
//    they were as slow or slower (1.25-1.7x at 16 x 16 and below). In float32 only strided
//    layers with 8 input channels or more gain (64->128 k5 s2 at 128 x 128: the fused
//    forward 0.82-0.92x the NCHW conv against 1.10x): at stride 1 the channels_last
//    convolution ran no faster forward, so the layout changes made the fused forward
//    1.15-1.19x at 64->64, 192->64 and 768->256 (modified UNet), and with few input
//    channels the NCHW first-layer kernel is faster (3->64: channels_last 1.12x).
// In both the layout changes fold into passes the op makes anyway: x * m on the way in,
// the epilogue on the way out, and the same pair in the backward (tiles.h).
// A channels_last layer (input or weight) convolves channels_last, as ATen's conv does: its
// output is channels_last, and an NCHW weight would otherwise be copied on every call (at
// 512->512 k3 s2 @4 that copy made the fused forward 5x the conv given the same weight).
constexpr int64_t kMaxChannelsForChannelsLast = 8;
constexpr int64_t kMinPlaneForChannelsLast = 64 * 64;
constexpr int64_t kMinFloatChannelsForChannelsLast = 8;

bool is_large_plane_for_channels_last(const at::Tensor& input, const ConvGeometry& g) {
  if (g.in_h * g.in_w < kMinPlaneForChannelsLast) return false;
  return input.element_size() == 2 || ((g.stride_h > 1 || g.stride_w > 1) &&
                                       g.in_channels >= kMinFloatChannelsForChannelsLast);
}

at::MemoryFormat compute_format(const at::Tensor& input, const at::Tensor& weight,
                                const ConvGeometry& g) {
  if (g.in_channels == 1 || (g.kernel_h == 1 && g.kernel_w == 1)) {
    return at::MemoryFormat::Contiguous;
  }
  if (conv_output_format(input, weight) == at::MemoryFormat::ChannelsLast) {
    return at::MemoryFormat::ChannelsLast;
  }
  if (g.groups == 1 && (g.out_channels <= kMaxChannelsForChannelsLast ||
                        is_large_plane_for_channels_last(input, g))) {
    return at::MemoryFormat::ChannelsLast;
  }
  return at::MemoryFormat::Contiguous;
}

// True when the forward runs as an implicit GEMM (implicit_gemm.h): only where the
// convolution would run NCHW, so that x * m kept for the backward has the layout it would
// have had, and the training forward gives the inference forward's bits.
bool takes_implicit_gemm(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const ConvGeometry& g) {
  return compute_format(input, weight, g) == at::MemoryFormat::Contiguous &&
         implicit_gemm_applies(input, mask, g);
}

// True when `from` is NCHW-contiguous and `format` channels_last, or the other way round,
// and the tensor has more than one memory order (C > 1 and H * W > 1).
bool is_relayout(const at::Tensor& from, at::MemoryFormat format) {
  const bool nchw = from.is_contiguous(), cl = from.is_contiguous(at::MemoryFormat::ChannelsLast);
  if (nchw && cl) return false;
  return (format == at::MemoryFormat::ChannelsLast && nchw) ||
         (format == at::MemoryFormat::Contiguous && cl);
}

// True when x * m can take mask_planes: NCHW x and out, a contiguous single-channel mask.
bool is_single_plane_mask(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  return mask.size(1) == 1 && mask.is_contiguous() && x.is_contiguous() && out.is_contiguous();
}

// True when x * m can take mask_elements: a mask of x's shape and strides, dense, and an
// out laid out alike.
bool is_elementwise_mask(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& out) {
  return mask.sizes() == x.sizes() && mask.strides() == x.strides() &&
         out.strides() == x.strides() && x.is_non_overlapping_and_dense();
}

// Writes x * m (x alone without a mask) into `out`, which has the compute layout.
void write_masked_input(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                        at::Tensor& out, at::MemoryFormat format) {
  if (is_relayout(input, format)) {
    masked_relayout(input, mask, out);
  } else if (mask.has_value() && mask->defined()) {
    if (is_single_plane_mask(input, *mask, out)) {
      mask_planes(input, *mask, out);
    } else if (is_elementwise_mask(input, *mask, out)) {
      mask_elements(input, *mask, out);
    } else {
      at::mul_out(out, input, *mask);
    }
  } else {
    out.copy_(input);
  }
}

// x * m in the layout the convolution reads, written into this thread's scratch buffer
// (it lives only until the convolution has read it).
at::Tensor cpu_masked_input(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                            at::MemoryFormat format) {
  const bool has_mask = mask.has_value() && mask->defined();
  if (!has_mask && !is_relayout(input, format)) {
    return input.contiguous(format);
  }
  at::Tensor out = cpu_scratch(Scratch::kMaskedInput, input.sizes(), input.options(), format);
  write_masked_input(input, mask, out, format);
  return out;
}

// True when one pass forms both x * m and the channel sum of the mask: a multi-channel mask
// with a plane per sample and channel, NCHW-contiguous, for an input that is
// NCHW-contiguous or changes layout on the way in (the cases of
// masked_input_with_channel_sum). The mask is then read once, not twice. Not below 2048
// pixels a plane: there the pass walks hundreds of channel planes in runs of a few hundred
// bytes, and at 256 x 32 x 32 (bfloat16) it took twice as long as at::mul and a separate
// channel sum together.
constexpr int64_t kMinPlaneForOneRead = 2048;

bool masks_with_channel_sum(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                            const ConvGeometry& g, at::MemoryFormat format) {
  return g.has_mask && g.mask_channels > 1 && g.mask_batch == g.batch && g.batch > 0 &&
         g.in_h * g.in_w >= kMinPlaneForOneRead && mask->is_contiguous() &&
         (input.is_contiguous() || is_relayout(input, format));
}

// r and u, with x * m written into `xm` (uninitialised, in the compute layout) by the same
// pass that sums the mask's channels. Only where masks_with_channel_sum holds.
MaskRatio mask_ratio_with_masked_input(const at::Tensor& input, const at::Tensor& mask,
                                       at::Tensor& xm, const ConvGeometry& g) {
  const at::ScalarType acc = mask_ratio_dtype(input.scalar_type());
  at::Tensor msum = at::empty({g.batch, g.in_h, g.in_w}, input.options().dtype(acc));
  masked_input_with_channel_sum(input, mask, xm, msum);
  return mask_ratio_from_channel_sum(msum, g);
}

// y = (raw * r + b) * u with a bias, y = raw * r without; raw is read once and y written
// once. raw and out are both NCHW-contiguous or both channels_last (out may alias raw), or
// raw is channels_last and out NCHW.
template <typename scalar_t>
void epilogue(const at::Tensor& raw, const MaskRatio& mr, const at::Tensor& bias,
              at::Tensor& out, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::epilogue", c10::ArrayRef<c10::IValue>{});
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w;
  const int64_t channels = g.out_channels;
  const scalar_t* src = raw.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const acc_t* ratio = mr.ratio.const_data_ptr<acc_t>();
  const acc_t* update = mr.update.const_data_ptr<acc_t>();
  const bool has_bias = bias.defined();
  const std::vector<acc_t> b = opmath_bias<scalar_t>(bias);
  const int64_t mask_stride = mr.batch == 1 ? 0 : plane;

  if (is_relayout(raw, at::MemoryFormat::Contiguous) && out.is_contiguous()) {
    // channels_last raw into an NCHW output, a tile at a time (tiles.h).
    tiles::read_channels_last(src, g.batch, channels, plane, [&](int64_t, int64_t n, int64_t c,
                                                                 int64_t p0, int64_t len,
                                                                 const scalar_t* row) {
      loops::renormalise_planes<scalar_t>(row, ratio + n * mask_stride + p0,
                                          update + n * mask_stride + p0,
                                          has_bias ? b.data() + c : nullptr,
                                          dst + (n * channels + c) * plane + p0, 1, len);
    });
  } else if (raw.is_contiguous(at::MemoryFormat::ChannelsLast) && channels > 1) {
    // Runs of pixels that stay within one sample, whose r and u are contiguous.
    const int64_t grain = std::max<int64_t>(1, 32768 / channels);
    at::parallel_for(0, g.batch * plane, grain, [&](int64_t begin, int64_t end) {
      for (int64_t idx = begin; idx < end;) {
        const int64_t n = idx / plane, p = idx % plane;
        const int64_t run = std::min(end - idx, plane - p);
        loops::renormalise_pixels<scalar_t>(src + idx * channels, ratio + n * mask_stride + p,
                                            update + n * mask_stride + p, b.data(), has_bias,
                                            dst + idx * channels, run, channels);
        idx += run;
      }
    });
  } else {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane, 1));
    at::parallel_for(0, g.batch * channels, grain, [&](int64_t begin, int64_t end) {
      // Runs of planes within one sample, which share r and u.
      for (int64_t nc = begin; nc < end;) {
        const int64_t n = nc / channels, c = nc % channels;
        const int64_t run = std::min(end - nc, channels - c);
        loops::renormalise_planes<scalar_t>(src + nc * plane, ratio + n * mask_stride,
                                            update + n * mask_stride,
                                            has_bias ? b.data() + c : nullptr,
                                            dst + nc * plane, run, plane);
        nc += run;
      }
    });
  }
}

// g_raw = g_y * r * u (with bias) or g_y * r (without), and db = sum over N, H', W' of
// g_y * u, in one read of g_y. g_y and g_raw share a layout (NCHW or channels_last), or
// g_y is NCHW and g_raw channels_last.
template <typename scalar_t>
void grad_prologue(const at::Tensor& grad_out, const MaskRatio& mr, bool has_bias,
                   bool need_graw, bool need_db, at::Tensor& grad_raw,
                   at::Tensor& grad_bias_acc, const ConvGeometry& g) {
  RECORD_FUNCTION("pconv::grad_prologue", c10::ArrayRef<c10::IValue>{});
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t plane = g.out_h * g.out_w;
  const int64_t channels = g.out_channels;
  const scalar_t* gy = grad_out.const_data_ptr<scalar_t>();
  scalar_t* gr = need_graw ? grad_raw.mutable_data_ptr<scalar_t>() : nullptr;
  const acc_t* ratio = mr.ratio.const_data_ptr<acc_t>();
  const acc_t* update = mr.update.const_data_ptr<acc_t>();
  acc_t* db = need_db ? grad_bias_acc.mutable_data_ptr<acc_t>() : nullptr;
  const int64_t mask_stride = mr.batch == 1 ? 0 : plane;

  if (need_graw && is_relayout(grad_out, at::MemoryFormat::ChannelsLast) &&
      grad_raw.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    // NCHW g_y into a channels_last g_raw, a tile at a time (tiles.h); each tile reduces
    // its own bias-gradient row, so the sum does not depend on the threads.
    const int64_t blocks = tiles::count<scalar_t>(g.batch, plane);
    std::vector<acc_t> partial(need_db ? blocks * channels : 0, acc_t(0));
    tiles::write_channels_last(gr, g.batch, channels, plane, [&](int64_t t, int64_t n, int64_t c,
                                                                 int64_t p0, int64_t len,
                                                                 scalar_t* row) {
      const scalar_t* gy_row = gy + (n * channels + c) * plane + p0;
      tiles::prefetch_next_piece(gy_row, p0, len, plane);
      loops::grad_planes<scalar_t>(gy_row, ratio + n * mask_stride + p0,
                                   update + n * mask_stride + p0, has_bias, row,
                                   need_db ? partial.data() + t * channels + c : nullptr, 1,
                                   len);
    });
    if (need_db) {
      for (int64_t t = 0; t < blocks; ++t) {
        for (int64_t c = 0; c < channels; ++c) db[c] += partial[t * channels + c];
      }
    }
  } else if (grad_out.is_contiguous(at::MemoryFormat::ChannelsLast) && channels > 1) {
    // Pixels are split into fixed blocks, each reducing its own bias-gradient row, so the
    // sum does not depend on the thread count.
    const int64_t pixels = g.batch * plane;
    const int64_t block = 1024;
    const int64_t blocks = (pixels + block - 1) / block;
    std::vector<acc_t> partial(need_db ? blocks * channels : 0, acc_t(0));
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t blk = begin; blk < end; ++blk) {
        acc_t* row = need_db ? partial.data() + blk * channels : nullptr;
        const int64_t stop = std::min(pixels, (blk + 1) * block);
        for (int64_t idx = blk * block; idx < stop;) {
          const int64_t n = idx / plane, p = idx % plane;
          const int64_t run = std::min(stop - idx, plane - p);
          loops::grad_pixels<scalar_t>(gy + idx * channels, ratio + n * mask_stride + p,
                                       update + n * mask_stride + p, has_bias,
                                       need_graw ? gr + idx * channels : nullptr, row, run,
                                       channels);
          idx += run;
        }
      }
    });
    if (need_db) {
      for (int64_t blk = 0; blk < blocks; ++blk) {
        for (int64_t c = 0; c < channels; ++c) db[c] += partial[blk * channels + c];
      }
    }
  } else {
    // Tasks own blocks of output channels, and each channel sums over the batch in order,
    // so the bias gradient does not depend on the thread count.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(plane * g.batch, 1));
    at::parallel_for(0, channels, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> sums(need_db ? end - begin : 0, acc_t(0));
      for (int64_t n = 0; n < g.batch; ++n) {
        const int64_t offset = (n * channels + begin) * plane;
        loops::grad_planes<scalar_t>(gy + offset, ratio + n * mask_stride,
                                     update + n * mask_stride, has_bias,
                                     need_graw ? gr + offset : nullptr,
                                     need_db ? sums.data() : nullptr, end - begin, plane);
      }
      if (need_db) std::copy(sums.begin(), sums.end(), db + begin);
    });
  }
}

// u in the input dtype, one plane per sample ([N, 1, H', W'], a new tensor): a plain loop,
// since at::Tensor::to costs as much as the rest of the op's own passes on 4x4 layers.
at::Tensor expand_update(const MaskRatio& mr, const at::Tensor& input, const ConvGeometry& g) {
  TORCH_INTERNAL_ASSERT(mr.update.is_contiguous());
  at::Tensor u = at::empty({g.batch, 1, g.out_h, g.out_w},
                           input.options().memory_format(at::MemoryFormat::Contiguous));
  if (u.numel() == 0) return u;
  const int64_t plane = g.out_h * g.out_w;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, input.scalar_type(),
                                  "pconv_expand_update", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t* src = mr.update.const_data_ptr<acc_t>();
    const int64_t src_batch_stride = mr.batch == 1 ? 0 : plane;
    scalar_t* dst = u.mutable_data_ptr<scalar_t>();
    // Runs within one sample, so the loop is a plain conversion (no index arithmetic per
    // value): at 256 x 256 the per-value form took 3% of a 67->3 layer's forward.
    at::parallel_for(0, g.batch * plane, 32768, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end;) {
        const int64_t n = i / plane, p = i % plane, run = std::min(end - i, plane - p);
        loops::narrow<scalar_t>(src + n * src_batch_stride + p, dst + i, run);
        i += run;
      }
    });
  });
  return u;
}

// The convolution of x * m (already in the compute layout) and the epilogue, in place.
at::Tensor convolve_and_renormalise(const at::Tensor& xm, const MaskRatio& mr,
                                    const at::Tensor& weight,
                                    const c10::optional<at::Tensor>& bias,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, const ConvGeometry& g,
                                    at::MemoryFormat out_format) {
  const at::MemoryFormat format = compute_format(xm, weight, g);
  at::Tensor raw =
      convolution_without_bias(xm, weight.contiguous(format), stride, padding, dilation, g.groups);
  const at::MemoryFormat raw_format =
      raw.is_contiguous(at::MemoryFormat::ChannelsLast) && g.out_channels > 1
          ? at::MemoryFormat::ChannelsLast
          : at::MemoryFormat::Contiguous;
  raw = raw.contiguous(raw_format);
  const at::Tensor bias_t = bias.has_value() ? *bias : at::Tensor();
  // In place, unless the convolution ran channels_last for an NCHW output: then the
  // epilogue writes the output in its layout, in the same pass.
  at::Tensor out = is_relayout(raw, out_format) && out_format == at::MemoryFormat::Contiguous
                       ? at::empty(raw.sizes(), raw.options())
                       : raw;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, xm.scalar_type(),
                                  "partial_conv2d_cpu", [&] {
                                    epilogue<scalar_t>(raw, mr, bias_t, out, g);
                                  });
  return out.contiguous(out_format);
}

at::Tensor empty_output(const at::Tensor& input, const at::Tensor& weight, const ConvGeometry& g) {
  return at::empty({0, g.out_channels, g.out_h, g.out_w},
                   input.options().memory_format(conv_output_format(input, weight)));
}

std::tuple<at::Tensor, at::Tensor> partial_conv2d_cpu(
    const at::Tensor& input, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_partial_conv2d_args(input, mask, weight, bias, stride, padding, dilation, groups);
  const at::MemoryFormat out_format = conv_output_format(input, weight);
  // The direct convolution writes NCHW: its channels_last outputs (the last layers of a
  // channels_last model, up to 4 channels) change layout after. The implicit GEMM only
  // takes layers whose output is NCHW (compute_format is).
  const bool direct = direct_conv_applies(input, mask, weight, g);
  if (direct && direct_conv_makes_mask_ratio(mask, g)) {
    auto [out, mr] = direct_conv_forward_with_mask_ratio(input, *mask, weight, bias, g);
    return {out.contiguous(out_format), expand_update(mr, input, g)};
  }
  if (direct || takes_implicit_gemm(input, mask, weight, g)) {
    const MaskRatio mr = mask_ratio_cpu(mask, g, input.scalar_type());
    at::Tensor out = direct ? direct_conv_forward(input, mask, mr, weight, bias, g)
                            : implicit_gemm_forward(input, mask, mr, weight, bias, g);
    return {out.contiguous(out_format), expand_update(mr, input, g)};
  }
  const at::MemoryFormat format = compute_format(input, weight, g);
  MaskRatio mr;
  at::Tensor xm;
  if (masks_with_channel_sum(input, mask, g, format)) {
    xm = cpu_scratch(Scratch::kMaskedInput, input.sizes(), input.options(), format);
    mr = mask_ratio_with_masked_input(input, *mask, xm, g);
  } else {
    mr = mask_ratio_cpu(mask, g, input.scalar_type());
    if (g.batch == 0) return {empty_output(input, weight, g), expand_update(mr, input, g)};
    xm = cpu_masked_input(input, mask, format);
  }
  return {convolve_and_renormalise(xm, mr, weight, bias, stride, padding, dilation, g,
                                   out_format),
          expand_update(mr, input, g)};
}

// As partial_conv2d_cpu, and hands x * m, r and u to the backward. x * m outlives the
// call, so it takes a cached block rather than scratch memory.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_conv2d_train_cpu(
    const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_partial_conv2d_args(input, mask, weight, bias, stride, padding, dilation, groups);
  // The direct convolution reads an NCHW x * m, which the backward of these layers (few
  // output channels: channels_last) must change layout. In float32 the forward saves more
  // than that costs (64->3 at 256 x 256: fwd + bwd 0.81x the conv against 0.85x); in
  // bfloat16 it does not (0.59x against 0.53x), so 16-bit training keeps the channels_last
  // convolution, and there the training forward rounds as oneDNN does, not as inference.
  // x * m stays NCHW for the direct convolution's layers even where a band would not fit
  // and oneDNN convolves, so that its layout follows a rule of the shapes alone (which the
  // fake kernel in pconv_cuda/ops.py mirrors).
  const bool nchw_xm =
      input.element_size() >= 4 && direct_conv_takes_layer(input, mask, weight, g);
  const bool direct = nchw_xm && direct_conv_applies(input, mask, weight, g);
  const at::MemoryFormat out_format = conv_output_format(input, weight);
  const bool implicit_gemm = !direct && takes_implicit_gemm(input, mask, weight, g);
  const at::MemoryFormat format =
      nchw_xm ? at::MemoryFormat::Contiguous : compute_format(input, weight, g);
  at::Tensor xm = cpu_cached_empty(input.sizes(), input.options(), format);
  MaskRatio mr;
  if (masks_with_channel_sum(input, mask, g, format)) {
    mr = mask_ratio_with_masked_input(input, mask, xm, g);
  } else {
    mr = mask_ratio_cpu(mask, g, input.scalar_type());
    write_masked_input(input, mask, xm, format);
  }
  at::Tensor update = expand_update(mr, input, g);
  if (implicit_gemm || direct) {
    at::Tensor out = direct ? direct_conv_forward(xm, c10::nullopt, mr, weight, bias, g)
                            : implicit_gemm_forward(xm, c10::nullopt, mr, weight, bias, g);
    return {out.contiguous(out_format), update, xm, mr.ratio, mr.update};
  }
  at::Tensor out = g.batch == 0 ? empty_output(input, weight, g)
                                : convolve_and_renormalise(xm, mr, weight, bias, stride, padding,
                                                           dilation, g, out_format);
  return {out, update, xm, mr.ratio, mr.update};
}

// Both backward ops end here. `source` is x * m when `source_is_masked`, else the input
// (x * m is then formed only if the weight gradient needs it). The input gradient comes
// back in `grad_input_format`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_from(
    const at::Tensor& grad_output, const at::Tensor& source, bool source_is_masked,
    const c10::optional<at::Tensor>& mask, const MaskRatio& mr, const at::Tensor& weight,
    bool has_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    const ConvGeometry& g, std::array<bool, 3> output_mask, at::MemoryFormat grad_input_format) {
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && has_bias;
  const at::ScalarType acc_type =
      source.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;

  at::Tensor grad_input = at::empty({0}, source.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, source.options());
  at::Tensor grad_bias_acc =
      at::zeros({need_db ? g.out_channels : 0}, source.options().dtype(acc_type));
  const bool need_graw = need_dx || need_dw;
  if (!need_graw && !need_db) {
    return {grad_input, grad_weight, grad_bias};
  }

  const at::MemoryFormat format = compute_format(source, weight, g);
  // An NCHW g_y for a channels_last convolution changes layout inside the prologue.
  const at::Tensor gy = is_relayout(grad_output, format) && format == at::MemoryFormat::ChannelsLast
                            ? grad_output
                            : grad_output.contiguous(format);
  at::Tensor grad_raw =
      need_graw ? cpu_scratch(Scratch::kGradRaw, gy.sizes(), gy.options(), format) : at::Tensor();
  if (gy.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, source.scalar_type(),
                                    "partial_conv2d_backward_cpu", [&] {
                                      grad_prologue<scalar_t>(gy, mr, has_bias, need_graw,
                                                              need_db, grad_raw, grad_bias_acc, g);
                                    });
  }
  if (need_db) grad_bias = grad_bias_acc.to(source.scalar_type());

  if (need_graw) {
    if (g.batch == 0) {
      // In the layouts the fake kernels promise (source may be x * m in another).
      if (need_dx) {
        grad_input = at::zeros(source.sizes(), source.options().memory_format(grad_input_format));
      }
      if (need_dw) {
        grad_weight =
            at::zeros(weight.sizes(), weight.options().memory_format(weight.suggest_memory_format()));
      }
    } else {
      // The weight gradient reads x * m; the input gradient only needs the input's shape
      // (and layout), so without dW an unwritten tensor stands in for it.
      at::Tensor xm;
      if (source_is_masked) {
        // An NCHW x * m (kept by a forward that convolved NCHW) for a channels_last
        // backward changes layout in the tiled pass, not in at::contiguous's.
        xm = is_relayout(source, format) ? cpu_masked_input(source, c10::nullopt, format)
                                         : source.contiguous(format);
      } else if (need_dw) {
        xm = cpu_masked_input(source, mask, format);
      } else {
        xm = source.is_contiguous(format) ? source
                                          : at::empty(source.sizes(),
                                                      source.options().memory_format(format));
      }
      // The first layers' input gradient is a convolution with few outputs: the direct one.
      const bool direct_dx = need_dx && direct_input_grad_applies(grad_raw, g);
      std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
      if (need_dw || (need_dx && !direct_dx)) {
        grads = at::convolution_backward(grad_raw, xm, weight.contiguous(format), c10::nullopt,
                                         stride, padding, dilation, false, {0, 0}, g.groups,
                                         {need_dx && !direct_dx, need_dw, false});
      }
      // x * m and g_raw are read: their memory goes before the input gradient's layout
      // change takes a second input-sized buffer (67->3 at 256 x 256, float32: the peak
      // of forward + backward was 1.17x the reference's with them alive).
      xm.reset();
      if (!direct_dx) grad_raw.reset();
      if (need_dx) {
        at::Tensor dx = direct_dx ? direct_input_grad(grad_raw, weight, g) : std::get<0>(grads);
        if (is_relayout(dx, grad_input_format)) {
          // dx * m and the layout change in one pass.
          grad_input = at::empty(dx.sizes(), dx.options().memory_format(grad_input_format));
          masked_relayout(dx, g.has_mask ? mask : c10::nullopt, grad_input);
        } else {
          if (g.has_mask) {
            if (is_single_plane_mask(dx, *mask, dx)) {
              mask_planes(dx, *mask, dx);
            } else if (is_elementwise_mask(dx, *mask, dx)) {
              mask_elements(dx, *mask, dx);
            } else {
              dx.mul_(*mask);
            }
          }
          grad_input = dx.contiguous(grad_input_format);
        }
      }
      if (need_dw) grad_weight = std::get<1>(grads).contiguous(weight.suggest_memory_format());
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight, bool has_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeometry g = check_partial_conv2d_backward_args(grad_output, input, mask, weight,
                                                            stride, padding, dilation, groups);
  const bool any_grad = output_mask[0] || output_mask[1] || (output_mask[2] && has_bias);
  const MaskRatio mr = any_grad ? mask_ratio_cpu(mask, g, input.scalar_type()) : MaskRatio{};
  return backward_from(grad_output, input, false, mask, mr, weight, has_bias, stride, padding,
                       dilation, g, output_mask, input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_train_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& masked_input, const at::Tensor& mask,
    const at::Tensor& ratio, const at::Tensor& update, const at::Tensor& weight, bool has_bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::optional<at::MemoryFormat> input_format) {
  const ConvGeometry g = check_partial_conv2d_backward_args(
      grad_output, masked_input, mask, weight, stride, padding, dilation, groups);
  const MaskRatio mr = check_saved_mask_ratio(ratio, update, masked_input, g);
  return backward_from(grad_output, masked_input, true, mask, mr, weight, has_bias, stride,
                       padding, dilation, g, output_mask,
                       input_format.value_or(masked_input.suggest_memory_format()));
}

}  // namespace

TORCH_LIBRARY_IMPL(pconv, CPU, m) {
  m.impl("partial_conv2d", &partial_conv2d_cpu);
  m.impl("partial_conv2d_backward", &partial_conv2d_backward_cpu);
  m.impl("partial_conv2d_train", &partial_conv2d_train_cpu);
  m.impl("partial_conv2d_train_backward", &partial_conv2d_train_backward_cpu);
}

}  // namespace pconv
