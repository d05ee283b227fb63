// CUDA kernels of pconv::partial_conv2d, its backward and the training pair
// partial_conv2d_train / partial_conv2d_train_backward (registers the CUDA dispatch key
// only; the schema and the argument checks live in csrc/pconv.cpp).
//
// Forward (cuDNN for the GEMM, everything else in our kernels):
//   1. mask pass   - one kernel, one read of the mask: channel sum, window sum, ratio r
//                    and updated mask u, single-channel [N_m, 1, H', W'] in float32
//                    (float64 for float64 inputs), never C_out times;
//   2. masking     - x * m in one elementwise pass, written in the layout the convolution
//                    reads (the input's suggested memory format). A multi-channel mask of
//                    the input's shape and layout is summed over its channels by this pass
//                    instead, which then runs first: the mask pass reads that one-channel
//                    sum, and the mask is read once;
//   3. convolution - at::convolution (cuDNN) on x * m, without bias;
//   4. epilogue    - one in-place kernel over the output: y = (raw * r + b) * u.
// Backward: the mask pass again (the training pair reuses r, u and x * m from its forward
// instead), one kernel forming g_raw = g_y * r (* u) and the bias gradient (two-stage,
// deterministic), at::convolution_backward for dx and dW (dW on x * m), and dx * m in one
// pass that also fixes the layout.
// Layers with at most kFewOutputs output channels (the UNets' last layers) take direct
// kernels instead (few_outputs_kernel.cuh) for the convolution, which renormalises before
// its one write (no epilogue pass) and in inference masks on load (no x * m), and for the
// input gradient, which applies m before its one write (no dx * m pass). With
// PCONV_CUDA_IGEMM, the 16-bit forward and input gradient of 3x3 unit-stride layers with
// more outputs are implicit GEMMs on tensor cores (implicit_gemm_kernel.cuh): the forward
// masks on load and renormalises before its one write (reading r and u of the mask pass),
// the input gradient masks before its one write.
//
// Headers: only c10/cuda (guard, stream; through op_context.h) and per-operator ATen
// headers; no ATen/cuda/CUDAContext.h, which pulls cuBLAS/cuSPARSE/cuSOLVER headers this
// code does not need (see tools/check_cuda_compile.sh).
//
// This file holds no device code: it fills the parameter structs of params.cuh from
// tensors and calls the launchers of launch.cuh, which live in the light .cu files. The
// host build (runtime.cuh) runs it on CPU tensors as the ops of pconv_cuda_host.
#include "../pconv.h"
#include "launch.cuh"
#include "launch_utils.cuh"
#include "op_context.h"

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/flip.h>
#include <ATen/ops/mul.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <type_traits>

namespace pconv {
namespace cuda {
namespace {

// True when t is contiguous in channels_last but not in NCHW order. A tensor that is both
// (C == 1 or H' * W' == 1) has a single memory order, which the NCHW index math reads.
bool is_channels_last(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

bool is_dense(const at::Tensor& t) {
  return t.is_contiguous() || t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

// ------------------------------------------------------------------------ mask pass

// The fields of the mask pass's parameters that come from the geometry: all but the mask
// itself and the outputs.
template <typename mask_t, typename acc_t>
void set_mask_pass_geometry(MaskRatioParams<mask_t, acc_t>& p, const ConvGeometry& g) {
  p.in_h = g.in_h;
  p.in_w = g.in_w;
  p.out_h = g.out_h;
  p.out_w = g.out_w;
  p.kernel_h = g.kernel_h;
  p.kernel_w = g.kernel_w;
  p.stride_h = g.stride_h;
  p.stride_w = g.stride_w;
  p.pad_h = g.pad_h;
  p.pad_w = g.pad_w;
  p.dil_h = g.dil_h;
  p.dil_w = g.dil_w;
  p.window = static_cast<acc_t>(g.window_size());
}

// Uninitialised r and u on the input's device.
MaskRatio empty_mask_ratio_for(const at::Tensor& input, int64_t planes, const ConvGeometry& g) {
  return empty_mask_ratio(planes, input.options().dtype(mask_ratio_dtype(input.scalar_type())), g);
}

// r and u ([N_m, 1, H', W'], float32, float64 for float64 inputs) from one read of the mask
// (any strides); with no mask, S counts the in-bounds taps. When update_out is given it
// receives u in the input dtype as well.
MaskRatio mask_ratio_cuda(const c10::optional<at::Tensor>& mask, const ConvGeometry& g,
                          const at::Tensor& input, at::Tensor* update_out) {
  const int64_t planes = g.has_mask ? g.mask_batch : 1;
  MaskRatio mr = empty_mask_ratio_for(input, planes, g);
  if (update_out != nullptr) {
    *update_out = at::empty({planes, 1, g.out_h, g.out_w},
                            input.options().memory_format(at::MemoryFormat::Contiguous));
  }
  if (mr.ratio.numel() == 0) return mr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pconv_mask_ratio_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    MaskRatioParams<scalar_t, acc_t> p{};
    if (g.has_mask) {
      const at::Tensor& m = *mask;
      p.mask = m.const_data_ptr<scalar_t>();
      p.mask_stride_n = m.stride(0);
      p.mask_stride_c = m.stride(1);
      p.mask_stride_h = m.stride(2);
      p.mask_stride_w = m.stride(3);
    }
    p.ratio = mr.ratio.mutable_data_ptr<acc_t>();
    p.update = mr.update.mutable_data_ptr<acc_t>();
    p.update_out = update_out != nullptr ? update_out->mutable_data_ptr<scalar_t>() : nullptr;
    p.planes = planes;
    p.channels = g.mask_channels;
    set_mask_pass_geometry(p, g);
    launch_mask_ratio<scalar_t>(p, current_stream());
  });
  return mr;
}

// True when the forward's masking sums the mask's channels as it goes
// (masked_input_kernel.cuh): a multi-channel mask with a plane per sample and the input's
// strides, both contiguous in the layout x * m is written in. The mask is then read once,
// not twice (mask pass and masking).
bool masks_with_channel_sum(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                            const ConvGeometry& g, at::MemoryFormat format) {
  return g.has_mask && g.mask_channels > 1 && g.batch > 0 && g.in_h * g.in_w > 0 &&
         mask->sizes() == input.sizes() && mask->strides() == input.strides() &&
         input.is_contiguous(format);
}

// x * m (returned, in the input's layout) and the mask's channel sum ([N, H, W] in the ratio
// dtype), in one pass. Only where masks_with_channel_sum holds.
std::tuple<at::Tensor, at::Tensor> masked_input_with_channel_sum(const at::Tensor& input,
                                                                 const at::Tensor& mask,
                                                                 const ConvGeometry& g) {
  at::Tensor out = at::empty_like(input);
  at::Tensor sum = at::empty({g.batch, g.in_h, g.in_w},
                             input.options().dtype(mask_ratio_dtype(input.scalar_type()))
                                 .memory_format(at::MemoryFormat::Contiguous));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pconv_masked_input_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    MaskedInputParams<scalar_t, acc_t> p{};
    p.input = input.const_data_ptr<scalar_t>();
    p.mask = mask.const_data_ptr<scalar_t>();
    p.out = out.mutable_data_ptr<scalar_t>();
    p.channel_sum = sum.mutable_data_ptr<acc_t>();
    p.batch = g.batch;
    p.channels = g.in_channels;
    p.plane = g.in_h * g.in_w;
    p.channels_last = is_channels_last(input);
    launch_masked_input<scalar_t>(p, current_stream());
  });
  return {out, sum};
}

// r and u from the mask's channel sum of masked_input_with_channel_sum: the mask pass over
// that one-channel plane, with the window of the C-channel mask (r and u as
// mask_ratio_cuda gives them). *update_out receives u in the input dtype.
MaskRatio mask_ratio_from_channel_sum(const at::Tensor& channel_sum, const ConvGeometry& g,
                                      const at::Tensor& input, at::Tensor* update_out) {
  MaskRatio mr = empty_mask_ratio_for(input, g.batch, g);
  const bool same_dtype = input.scalar_type() == channel_sum.scalar_type();
  if (same_dtype) *update_out = at::empty_like(mr.update);
  if (mr.ratio.numel() > 0) {
    AT_DISPATCH_FLOATING_TYPES(channel_sum.scalar_type(), "pconv_mask_ratio_cuda", [&] {
      MaskRatioParams<scalar_t, acc_type<scalar_t>> p{};
      p.mask = channel_sum.const_data_ptr<scalar_t>();
      p.mask_stride_n = g.in_h * g.in_w;
      p.mask_stride_c = g.in_h * g.in_w;
      p.mask_stride_h = g.in_w;
      p.mask_stride_w = 1;
      p.ratio = mr.ratio.mutable_data_ptr<scalar_t>();
      p.update = mr.update.mutable_data_ptr<scalar_t>();
      p.update_out = same_dtype ? update_out->mutable_data_ptr<scalar_t>() : nullptr;
      p.planes = g.batch;
      p.channels = 1;
      set_mask_pass_geometry(p, g);  // the window counts the mask's C channels
      launch_mask_ratio<scalar_t>(p, current_stream());
    });
  }
  if (!same_dtype) *update_out = mr.update.to(input.scalar_type());
  return mr;
}

// ------------------------------------------------------------------------- epilogue

// In place on raw ([N, C_out, H', W'], NCHW- or channels_last-contiguous):
// raw = (raw * r + b) * u with a bias, raw * r without.
void epilogue_cuda(at::Tensor& raw, const MaskRatio& mr, const c10::optional<at::Tensor>& bias,
                   const ConvGeometry& g) {
  TORCH_INTERNAL_ASSERT(is_dense(raw), "pconv: the epilogue needs a dense NCHW/NHWC tensor");
  if (raw.numel() == 0) return;
  const at::Tensor bias_c =
      bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, raw.scalar_type(),
                                  "pconv_epilogue_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    EpilogueParams<scalar_t, acc_t> p{};
    p.out = raw.mutable_data_ptr<scalar_t>();
    p.ratio = mr.ratio.const_data_ptr<acc_t>();
    p.update = mr.update.const_data_ptr<acc_t>();
    p.bias = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    p.numel = raw.numel();
    p.channels = g.out_channels;
    p.plane = g.out_h * g.out_w;
    p.mask_plane_stride = mr.batch == 1 ? 0 : p.plane;
    p.channels_last = is_channels_last(raw);
    launch_epilogue<scalar_t>(p, current_stream());
  });
}

// -------------------------------------------------------------------- grad prologue

// From grad_output (dense NCHW or channels_last): grad_raw (same layout, when defined) =
// g_y * r * u (has_bias) or g_y * r, and, when grad_bias is non-null,
// *grad_bias = sum over N, H', W' of g_y * u ([C_out], input dtype; two-stage, no atomics).
void grad_prologue_cuda(const at::Tensor& grad_output, const MaskRatio& mr, bool has_bias,
                        at::Tensor& grad_raw, at::Tensor* grad_bias, const ConvGeometry& g) {
  TORCH_INTERNAL_ASSERT(is_dense(grad_output), "pconv: grad_output must be dense here");
  TORCH_INTERNAL_ASSERT(!grad_raw.defined() ||
                            (grad_raw.sizes() == grad_output.sizes() && is_dense(grad_raw) &&
                             is_channels_last(grad_raw) == is_channels_last(grad_output)),
                        "pconv: grad_raw must have grad_output's shape and layout");
  const auto dense = grad_output.options().memory_format(at::MemoryFormat::Contiguous);
  if (grad_output.numel() == 0) {
    if (grad_bias != nullptr) *grad_bias = at::zeros({g.out_channels}, dense);
    return;
  }
  const cudaStream_t stream = current_stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(),
                                  "pconv_grad_prologue_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    GradPrologueParams<scalar_t, acc_t> p{};
    p.grad_out = grad_output.const_data_ptr<scalar_t>();
    p.grad_raw = grad_raw.defined() ? grad_raw.mutable_data_ptr<scalar_t>() : nullptr;
    p.ratio = mr.ratio.const_data_ptr<acc_t>();
    p.update = mr.update.const_data_ptr<acc_t>();
    p.partials = nullptr;
    p.batch = g.batch;
    p.channels = g.out_channels;
    p.plane = g.out_h * g.out_w;
    p.mask_plane_stride = mr.batch == 1 ? 0 : p.plane;
    p.has_bias = has_bias;
    p.channels_last = is_channels_last(grad_output);
    plan_grad_prologue<scalar_t>(p);
    at::Tensor partials;
    if (grad_bias != nullptr) {
      partials = at::empty({p.channels, p.num_partials}, mr.ratio.options());
      p.partials = partials.mutable_data_ptr<acc_t>();
    }
    launch_grad_prologue<scalar_t>(p, stream);
    if (grad_bias != nullptr) {
      *grad_bias = at::empty({g.out_channels}, dense);
      BiasGradParams<scalar_t, acc_t> f{};
      f.partials = partials.const_data_ptr<acc_t>();
      f.num_partials = p.num_partials;
      f.channels = g.out_channels;
      f.grad_bias = grad_bias->mutable_data_ptr<scalar_t>();
      launch_bias_grad_finalize<scalar_t>(f, stream);
    }
  });
}

// ------------------------------------------------------- layers with few output channels

// The direct kernels of few-output layers, as PCONV_CUDA_DIRECT in the environment names
// them (read at every call, so that the routes can be timed in one process): unset or "1"
// both, "0" neither (cuDNN and the passes around it), "forward" or "input_grad" that one.
enum class DirectKernel { kForward, kInputGrad };

bool direct_kernel_enabled(DirectKernel which) {
  const char* env = std::getenv("PCONV_CUDA_DIRECT");
  if (env == nullptr || std::strcmp(env, "1") == 0) return true;
  if (std::strcmp(env, "0") == 0) return false;
  const bool forward = std::strcmp(env, "forward") == 0;
  TORCH_CHECK(forward || std::strcmp(env, "input_grad") == 0,
              "PCONV_CUDA_DIRECT must be 0, 1, forward or input_grad, not '", env, "'");
  return forward == (which == DirectKernel::kForward);
}

// True when that direct kernel takes this layer: groups 1, at most kFewOutputs output
// channels and kFewOutputsTaps kernel taps (64 -> 3 and 67 -> 3 at 3x3).
bool few_outputs_direct(const ConvGeometry& g, DirectKernel which) {
  return g.groups == 1 && g.out_channels <= kFewOutputs &&
         g.kernel_h * g.kernel_w <= kFewOutputsTaps && direct_kernel_enabled(which);
}

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// The mask's strides as the direct kernels index it: 0 over a broadcast batch and over the
// channels of a single-channel mask.
Strides4 mask_strides_of(const at::Tensor& mask) {
  Strides4 s = strides_of(mask);
  if (mask.size(0) == 1) s.n = 0;
  if (mask.size(1) == 1) s.c = 0;
  return s;
}

// The mask fields of either kernel's parameters (left null without a mask: none given, or
// x * m given in place of x).
template <typename Params>
void set_few_outputs_mask(Params& p, const c10::optional<at::Tensor>& mask) {
  using scalar_t = std::remove_const_t<std::remove_pointer_t<decltype(p.mask)>>;
  if (!(mask.has_value() && mask->defined())) return;
  p.mask = mask->const_data_ptr<scalar_t>();
  p.mask_strides = mask_strides_of(*mask);
}

template <typename scalar_t, typename acc_t>
FewOutputsConv<scalar_t, acc_t> few_outputs_conv(const at::Tensor& weight, const ConvGeometry& g) {
  FewOutputsConv<scalar_t, acc_t> c{};
  c.weight = weight.const_data_ptr<scalar_t>();
  c.weight_strides = strides_of(weight);
  c.batch = g.batch;
  c.in_channels = g.in_channels;
  c.out_channels = g.out_channels;
  c.in_h = g.in_h;
  c.in_w = g.in_w;
  c.out_h = g.out_h;
  c.out_w = g.out_w;
  c.kernel_h = g.kernel_h;
  c.kernel_w = g.kernel_w;
  c.stride_h = g.stride_h;
  c.stride_w = g.stride_w;
  c.pad_h = g.pad_h;
  c.pad_w = g.pad_w;
  c.dil_h = g.dil_h;
  c.dil_w = g.dil_w;
  return c;
}

// y ([N, C_out, H', W'] in `format`) of a few-output layer from x and m directly (any
// strides; no mask: none applied, as for x * m given as the input), with r and u of the
// mask pass.
at::Tensor few_outputs_forward_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                                    const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                                    const ConvGeometry& g, const MaskRatio& mr,
                                    at::MemoryFormat format) {
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             input.options().memory_format(format));
  const at::Tensor bias_c =
      bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "pconv_few_outputs_forward_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    FewOutputsForwardParams<scalar_t, acc_t> p{};
    p.conv = few_outputs_conv<scalar_t, acc_t>(weight, g);
    p.input = input.const_data_ptr<scalar_t>();
    p.input_strides = strides_of(input);
    set_few_outputs_mask(p, mask);
    p.ratio = mr.ratio.const_data_ptr<acc_t>();
    p.update = mr.update.const_data_ptr<acc_t>();
    p.mask_plane_stride = mr.batch == 1 ? 0 : g.out_h * g.out_w;
    p.bias = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    p.out = out.mutable_data_ptr<scalar_t>();
    p.out_strides = strides_of(out);
    launch_few_outputs_forward<scalar_t>(p, current_stream());
  });
  return out;
}

// dx = conv_input_grad(g_raw, W) * m of a few-output layer ([N, C_in, H, W] in `format`).
at::Tensor few_outputs_input_grad_cuda(const at::Tensor& grad_raw,
                                       const c10::optional<at::Tensor>& mask,
                                       const at::Tensor& weight, const at::Tensor& source,
                                       const ConvGeometry& g, at::MemoryFormat format) {
  at::Tensor dx = at::empty(source.sizes(), source.options().memory_format(format));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_raw.scalar_type(),
                                  "pconv_few_outputs_input_grad_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    FewOutputsInputGradParams<scalar_t, acc_t> p{};
    p.conv = few_outputs_conv<scalar_t, acc_t>(weight, g);
    p.grad_raw = grad_raw.const_data_ptr<scalar_t>();
    p.grad_raw_strides = strides_of(grad_raw);
    set_few_outputs_mask(p, mask);
    p.grad_input = dx.mutable_data_ptr<scalar_t>();
    p.grad_input_strides = strides_of(dx);
    launch_few_outputs_input_grad<scalar_t>(p, current_stream());
  });
  return dx;
}

// ------------------------------------------------------------ implicit-GEMM forward

// The implicit-GEMM kernels (implicit_gemm_kernel.cuh) take the layers they can as
// PCONV_CUDA_IGEMM in the environment names them (read at every call, so that the routes
// can be timed in one process): "1" both the forward and the input gradient, "forward" or
// "input_grad" that one; unset or "0", the layers keep cuDNN and the passes around it,
// until GPU timings (python -m benchmarks.routes --igemm) show where the kernels are the
// faster.
bool implicit_gemm_enabled(DirectKernel which) {
  const char* env = std::getenv("PCONV_CUDA_IGEMM");
  if (env == nullptr || std::strcmp(env, "0") == 0) return false;
  if (std::strcmp(env, "1") == 0) return true;
  const bool forward = std::strcmp(env, "forward") == 0;
  TORCH_CHECK(forward || std::strcmp(env, "input_grad") == 0,
              "PCONV_CUDA_IGEMM must be 0, 1, forward or input_grad, not '", env, "'");
  return forward == (which == DirectKernel::kForward);
}

// True when the implicit-GEMM kernel `which` takes this layer: bfloat16 or float16 on
// compute capability 8.0 or later (tensor cores), groups 1, more outputs than the
// few-output kernels take, 3x3 with unit stride and dilation (any padding), and offsets
// within a sample of the tensor it reads (x, or g_raw [N, C_out, H', W'] with `read`'s
// strides) and of the mask that fit its 32-bit offsets.
bool takes_implicit_gemm(const at::Tensor& read, const c10::optional<at::Tensor>& mask,
                         const ConvGeometry& g, DirectKernel which) {
  const auto dtype = read.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || g.batch == 0 || g.groups != 1 ||
      g.out_channels <= kFewOutputs || g.kernel_h != 3 || g.kernel_w != 3 || g.stride_h != 1 ||
      g.stride_w != 1 || g.dil_h != 1 || g.dil_w != 1 || !implicit_gemm_enabled(which) ||
      compute_capability() < 80) {
    return false;
  }
  const bool has_mask = mask.has_value() && mask->defined();
  const bool read_fits = which == DirectKernel::kForward
                             ? fits_32_bits(strides_of(read), g.in_channels, g.in_h, g.in_w)
                             : fits_32_bits(strides_of(read), g.out_channels, g.out_h, g.out_w);
  return read_fits &&
         (!has_mask || fits_32_bits(mask_strides_of(*mask), mask->size(1), g.in_h, g.in_w));
}

// W ([C_out, C_in, 3, 3] of geometry g) as the implicit-GEMM kernels read it:
// [ceil(C_in / 16)][9 taps][C_out rounded up to 64][16 input channels], contiguous, zero
// past C_in and C_out, so that a block stages a group's weight for its outputs in 16-byte
// copies.
at::Tensor pack_implicit_gemm_weight(const at::Tensor& weight, const ConvGeometry& g) {
  const int64_t groups = ceil_div(g.in_channels, kIgGroupChannels);
  const int64_t outputs = ceil_div(g.out_channels, kIgTileOutputs) * kIgTileOutputs;
  const at::Tensor taps = weight.reshape({g.out_channels, g.in_channels, 9});
  const at::Tensor padded = at::constant_pad_nd(
      taps, {0, 0, 0, groups * kIgGroupChannels - g.in_channels, 0, outputs - g.out_channels});
  return padded.view({outputs, groups, kIgGroupChannels, 9}).permute({1, 3, 0, 2}).contiguous();
}

// True when every 8 channels of a pixel from a multiple of 8 are one aligned 16-byte run
// of t ([N, C, H, W], 16-bit), as in channels_last with C a multiple of 8.
bool pixels_hold_aligned_channel_runs(const at::Tensor& t) {
  const Strides4 s = strides_of(t);
  const bool batch_ok = t.size(0) == 1 || s.n % 8 == 0;
  return s.c == 1 && t.size(1) % 8 == 0 && batch_ok && s.h % 8 == 0 && s.w % 8 == 0 &&
         aligned16(t.const_data_ptr());
}

// The fields both implicit-GEMM kernels take: the GEMM's input `in` and output `out` (any
// strides; dense), the packed weight and the geometry g of that GEMM.
template <typename scalar_t>
ImplicitGemmParams<scalar_t> implicit_gemm_params(const at::Tensor& in, const at::Tensor& packed,
                                                  at::Tensor& out, const ConvGeometry& g) {
  ImplicitGemmParams<scalar_t> p{};
  p.input = in.const_data_ptr<scalar_t>();
  p.input_strides = strides_of(in);
  p.weight = packed.const_data_ptr<scalar_t>();
  p.out = out.mutable_data_ptr<scalar_t>();
  p.out_strides = strides_of(out);
  p.out_channels_last = p.out_strides.c == 1 && p.out_strides.w != 1;
  p.vector_input = pixels_hold_aligned_channel_runs(in);
  p.batch = g.batch;
  p.in_channels = g.in_channels;
  p.out_channels = g.out_channels;
  p.in_h = g.in_h;
  p.in_w = g.in_w;
  p.out_h = g.out_h;
  p.out_w = g.out_w;
  p.pad_h = g.pad_h;
  p.pad_w = g.pad_w;
  return p;
}

// y ([N, C_out, H', W'] in `format`) of a 3x3 unit-stride layer from x and m directly (any
// strides; no mask: none applied, as for x * m given as the input), with r and u of the
// mask pass.
at::Tensor implicit_gemm_forward_cuda(const at::Tensor& input,
                                      const c10::optional<at::Tensor>& mask,
                                      const at::Tensor& weight,
                                      const c10::optional<at::Tensor>& bias,
                                      const ConvGeometry& g, const MaskRatio& mr,
                                      at::MemoryFormat format) {
  at::Tensor out = at::empty({g.batch, g.out_channels, g.out_h, g.out_w},
                             input.options().memory_format(format));
  const at::Tensor packed = pack_implicit_gemm_weight(weight, g);
  const at::Tensor bias_c =
      bias.has_value() && bias->defined() ? bias->contiguous() : at::Tensor();
  const bool per_channel_mask = mask.has_value() && mask->defined() && mask->size(1) != 1;
  AT_DISPATCH_REDUCED_FLOATING_TYPES(input.scalar_type(), "pconv_implicit_gemm_forward_cuda",
                                     [&] {
    ImplicitGemmParams<scalar_t> p = implicit_gemm_params<scalar_t>(input, packed, out, g);
    set_few_outputs_mask(p, mask);
    p.vector_input =
        p.vector_input && (!per_channel_mask || pixels_hold_aligned_channel_runs(*mask));
    p.ratio = mr.ratio.const_data_ptr<float>();
    p.update = mr.update.const_data_ptr<float>();
    p.mask_plane_stride = mr.batch == 1 ? 0 : g.out_h * g.out_w;
    p.bias = bias_c.defined() ? bias_c.const_data_ptr<scalar_t>() : nullptr;
    launch_implicit_gemm_forward<scalar_t>(p, current_stream());
  });
  return out;
}

// dx = conv_input_grad(g_raw, W) * m of a 3x3 unit-stride layer ([N, C_in, H, W] in
// `format`): at unit stride, the convolution of g_raw with W transposed and flipped,
// padded by 2 - pad, so the same implicit GEMM with the mask applied at its store.
at::Tensor implicit_gemm_input_grad_cuda(const at::Tensor& grad_raw,
                                         const c10::optional<at::Tensor>& mask,
                                         const at::Tensor& weight, const at::Tensor& source,
                                         const ConvGeometry& g, at::MemoryFormat format) {
  at::Tensor dx = at::empty(source.sizes(), source.options().memory_format(format));
  const ConvGeometry t = input_grad_geometry(g);
  const at::Tensor packed = pack_implicit_gemm_weight(weight.transpose(0, 1).flip({2, 3}), t);
  AT_DISPATCH_REDUCED_FLOATING_TYPES(grad_raw.scalar_type(),
                                     "pconv_implicit_gemm_input_grad_cuda", [&] {
    ImplicitGemmParams<scalar_t> p = implicit_gemm_params<scalar_t>(grad_raw, packed, dx, t);
    if (mask.has_value() && mask->defined()) {
      p.out_mask = mask->const_data_ptr<scalar_t>();
      p.out_mask_strides = mask_strides_of(*mask);
    }
    launch_implicit_gemm_input_grad<scalar_t>(p, current_stream());
  });
  return dx;
}

// ------------------------------------------------------------------------------ ops

// The convolution's result as the epilogue kernels read it: NCHW- or channels_last-
// contiguous (cuDNN returns one of them; other backends may not).
at::Tensor dense_layout(const at::Tensor& t, at::MemoryFormat preferred) {
  return is_dense(t) ? t : t.contiguous(preferred);
}

// Forward through cuDNN on x * m (already in `format`): convolution without bias, fused
// epilogue in place.
at::Tensor forward_cudnn_epilogue(const at::Tensor& xm, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias,
                                  c10::IntArrayRef stride, c10::IntArrayRef padding,
                                  c10::IntArrayRef dilation, const ConvGeometry& g,
                                  const MaskRatio& mr, at::MemoryFormat format) {
  at::Tensor raw = convolution(xm, weight.contiguous(format), stride, padding, dilation, g.groups);
  raw = dense_layout(raw, format);
  epilogue_cuda(raw, mr, bias, g);
  return raw;
}

// Output and u in the input dtype ([N, 1, H', W']) of one forward call, plus x * m and the
// float r and u the training op hands to its backward.
struct ForwardResult {
  at::Tensor output, update, masked_input;
  MaskRatio mr;
};

// keep_masked_input: the training op, which hands x * m to its backward; the inference op
// forms it only where cuDNN convolves it. A few-output layer's direct forward, and the
// implicit-GEMM forward, mask on load for inference; in training they read the x * m formed
// for the backward, whose values are the ones they would have made on load, so y is the
// same bits either way.
ForwardResult forward_cuda(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                           const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                           c10::IntArrayRef stride, c10::IntArrayRef padding,
                           c10::IntArrayRef dilation, const ConvGeometry& g,
                           bool keep_masked_input) {
  // The output's layout, ATen's: with a channels_last weight and an NCHW input, x * m is
  // written channels_last, so cuDNN reads the weight as it is (no copy per call).
  const at::MemoryFormat format = conv_output_format(input, weight);
  ForwardResult res;
  const bool direct = g.batch > 0 && few_outputs_direct(g, DirectKernel::kForward);
  const bool igemm = !direct && takes_implicit_gemm(input, mask, g, DirectKernel::kForward);
  if ((direct || igemm) && !keep_masked_input) {
    res.mr = mask_ratio_cuda(mask, g, input, &res.update);
    if (res.mr.batch != g.batch) {
      res.update = res.update.expand({g.batch, 1, g.out_h, g.out_w}).contiguous();
    }
    res.output = direct ? few_outputs_forward_cuda(input, mask, weight, bias, g, res.mr, format)
                        : implicit_gemm_forward_cuda(input, mask, weight, bias, g, res.mr, format);
    return res;
  }
  if (masks_with_channel_sum(input, mask, g, format)) {
    at::Tensor channel_sum;
    std::tie(res.masked_input, channel_sum) = masked_input_with_channel_sum(input, *mask, g);
    res.mr = mask_ratio_from_channel_sum(channel_sum, g, input, &res.update);
  } else {
    res.mr = mask_ratio_cuda(mask, g, input, &res.update);
    res.masked_input = masked_input(input, mask, format);
  }
  if (res.mr.batch != g.batch) {
    res.update = res.update.expand({g.batch, 1, g.out_h, g.out_w}).contiguous();
  }
  if (g.batch == 0) {
    res.output = at::empty({0, g.out_channels, g.out_h, g.out_w},
                           input.options().memory_format(format));
  } else if (direct) {
    res.output =
        few_outputs_forward_cuda(res.masked_input, c10::nullopt, weight, bias, g, res.mr, format);
  } else if (igemm) {
    res.output = implicit_gemm_forward_cuda(res.masked_input, c10::nullopt, weight, bias, g,
                                            res.mr, format);
  } else {
    res.output = forward_cudnn_epilogue(res.masked_input, weight, bias, stride, padding, dilation,
                                        g, res.mr, format)
                     .contiguous(format);
  }
  return res;
}

std::tuple<at::Tensor, at::Tensor> partial_conv2d_cuda(
    const at::Tensor& input, const c10::optional<at::Tensor>& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_partial_conv2d_args(input, mask, weight, bias, stride, padding, dilation, groups);
  TORCH_CHECK(on_kernel_device(input), "partial_conv2d: the CUDA kernel got input on ",
              input.device());
  const DeviceGuard device_guard(input.device());
  ForwardResult res =
      forward_cuda(input, mask, weight, bias, stride, padding, dilation, g,
                   /*keep_masked_input=*/false);
  return {res.output, res.update};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> partial_conv2d_train_cuda(
    const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups) {
  const ConvGeometry g =
      check_partial_conv2d_args(input, mask, weight, bias, stride, padding, dilation, groups);
  TORCH_CHECK(on_kernel_device(input), "partial_conv2d: the CUDA kernel got input on ",
              input.device());
  const DeviceGuard device_guard(input.device());
  ForwardResult res =
      forward_cuda(input, mask, weight, bias, stride, padding, dilation, g,
                   /*keep_masked_input=*/true);
  return {res.output, res.update, res.masked_input, res.mr.ratio, res.mr.update};
}

// Both backward ops end here. `source` is x * m when `source_is_masked`, else the input
// (x * m is then formed only if the weight gradient needs it). The input gradient comes
// back in `grad_input_format`.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& source, bool source_is_masked,
    const c10::optional<at::Tensor>& mask, const MaskRatio* saved, const at::Tensor& weight,
    bool has_bias, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    const ConvGeometry& g, std::array<bool, 3> output_mask, at::MemoryFormat grad_input_format) {
  TORCH_CHECK(on_kernel_device(source), "partial_conv2d_backward: the CUDA kernel got input on ",
              source.device());
  const DeviceGuard device_guard(source.device());
  const bool need_dx = output_mask[0], need_dw = output_mask[1];
  const bool need_db = output_mask[2] && has_bias;
  const bool need_graw = need_dx || need_dw;

  at::Tensor grad_input = at::empty({0}, source.options());
  at::Tensor grad_weight = at::empty({0}, weight.options());
  at::Tensor grad_bias = at::empty({0}, source.options());
  if (!need_graw && !need_db) {
    return {grad_input, grad_weight, grad_bias};
  }

  const at::MemoryFormat format = conv_output_format(source, weight);
  const MaskRatio mr = saved != nullptr ? *saved : mask_ratio_cuda(mask, g, source, nullptr);
  const at::Tensor gy = grad_output.contiguous(format);
  at::Tensor grad_raw =
      need_graw ? at::empty(gy.sizes(), gy.options().memory_format(format)) : at::Tensor();
  grad_prologue_cuda(gy, mr, has_bias, grad_raw, need_db ? &grad_bias : nullptr, g);

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
      // A few-output layer's input gradient comes masked, in its layout, from one kernel,
      // and so does that of a layer the implicit GEMM takes; cuDNN then computes the weight
      // gradient alone.
      const bool direct_dx = need_dx && few_outputs_direct(g, DirectKernel::kInputGrad);
      const bool igemm_dx = need_dx && !direct_dx &&
                            takes_implicit_gemm(grad_raw, mask, g, DirectKernel::kInputGrad);
      if (direct_dx) {
        grad_input = few_outputs_input_grad_cuda(grad_raw, mask, weight, source, g,
                                                 grad_input_format);
      } else if (igemm_dx) {
        grad_input = implicit_gemm_input_grad_cuda(grad_raw, mask, weight, source, g,
                                                   grad_input_format);
      }
      const bool cudnn_dx = need_dx && !direct_dx && !igemm_dx;
      // The weight gradient reads x * m; the input gradient only needs the input's shape
      // (and layout), so without dW an unwritten tensor stands in for an input in another.
      at::Tensor xm;
      std::tuple<at::Tensor, at::Tensor, at::Tensor> grads;
      if (cudnn_dx || need_dw) {
        if (source_is_masked) {
          xm = source.contiguous(format);
        } else if (need_dw) {
          xm = masked_input(source, mask, format);
        } else {
          xm = source.is_contiguous(format)
                   ? source
                   : at::empty(source.sizes(), source.options().memory_format(format));
        }
        grads = convolution_backward(grad_raw, xm, weight.contiguous(format), stride, padding,
                                     dilation, g.groups, {cudnn_dx, need_dw, false});
      }
      // Read: their memory goes back to the allocator before dx * m may take a buffer of
      // its own (a layout change), so the peak holds no more than it must.
      xm.reset();
      grad_raw.reset();
      if (cudnn_dx) {
        at::Tensor dx = std::get<0>(grads);
        if (g.has_mask) {
          // dx * m: in place when dx already has the wanted layout, else one pass that
          // masks and changes the layout together.
          if (dx.is_contiguous(grad_input_format)) {
            dx.mul_(*mask);
          } else {
            at::Tensor out =
                at::empty(source.sizes(), source.options().memory_format(grad_input_format));
            at::mul_out(out, dx, *mask);
            dx = out;
          }
        }
        grad_input = dx.contiguous(grad_input_format);
      }
      if (need_dw) grad_weight = std::get<1>(grads).contiguous(weight.suggest_memory_format());
    }
  }
  return {grad_input, grad_weight, grad_bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight, bool has_bias, c10::IntArrayRef stride, c10::IntArrayRef padding,
    c10::IntArrayRef dilation, int64_t groups, std::array<bool, 3> output_mask) {
  const ConvGeometry g = check_partial_conv2d_backward_args(grad_output, input, mask, weight,
                                                            stride, padding, dilation, groups);
  return backward_cuda(grad_output, input, false, mask, nullptr, weight, has_bias, stride,
                       padding, dilation, g, output_mask, input.suggest_memory_format());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> partial_conv2d_train_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& masked_input, const at::Tensor& mask,
    const at::Tensor& ratio, const at::Tensor& update, const at::Tensor& weight, bool has_bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask, c10::optional<at::MemoryFormat> input_format) {
  const ConvGeometry g = check_partial_conv2d_backward_args(
      grad_output, masked_input, mask, weight, stride, padding, dilation, groups);
  const MaskRatio mr = check_saved_mask_ratio(ratio, update, masked_input, g);
  return backward_cuda(grad_output, masked_input, true, mask, &mr, weight, has_bias, stride,
                       padding, dilation, g, output_mask,
                       input_format.value_or(masked_input.suggest_memory_format()));
}

}  // namespace
}  // namespace cuda

#ifdef PCONV_CUDA_HOST
// The host build: the same ops under their own namespace, on CPU tensors.
TORCH_LIBRARY(pconv_cuda_host, m) {
  m.def(schema::kForward, &cuda::partial_conv2d_cuda);
  m.def(schema::kBackward, &cuda::partial_conv2d_backward_cuda);
  m.def(schema::kTrain, &cuda::partial_conv2d_train_cuda);
  m.def(schema::kTrainBackward, &cuda::partial_conv2d_train_backward_cuda);
}
#else
TORCH_LIBRARY_IMPL(pconv, CUDA, m) {
  m.impl("partial_conv2d", &cuda::partial_conv2d_cuda);
  m.impl("partial_conv2d_backward", &cuda::partial_conv2d_backward_cuda);
  m.impl("partial_conv2d_train", &cuda::partial_conv2d_train_cuda);
  m.impl("partial_conv2d_train_backward", &cuda::partial_conv2d_train_backward_cuda);
}
#endif

}  // namespace pconv
