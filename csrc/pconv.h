// Shared declarations of the partial-convolution op: the geometry of one call and the
// argument checks that every backend runs before touching data.
//
// Mask convention everywhere: 1 = known pixel, 0 = hole, values in [0, 1].
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Optional.h>

namespace pconv {

// The schemas of the ops, without a namespace: the library that defines them adds it
// (pconv, or pconv_cuda_host for the host build of the CUDA sources).
namespace schema {
// Returns (output [N, C_out, H', W'], updated_mask [N, 1, H', W']).
inline constexpr char kForward[] =
    "partial_conv2d(Tensor input, Tensor? mask, Tensor weight, Tensor? bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups) -> (Tensor, Tensor)";
// Returns (grad_input, grad_weight, grad_bias); a gradient not asked for in output_mask
// comes back as an empty tensor.
inline constexpr char kBackward[] =
    "partial_conv2d_backward(Tensor grad_output, Tensor input, Tensor? mask, Tensor weight, "
    "bool has_bias, int[2] stride, int[2] padding, int[2] dilation, int groups, "
    "bool[3] output_mask) -> (Tensor, Tensor, Tensor)";
// The forward autograd runs when the weight needs a gradient: besides (output,
// updated_mask) it returns what the backward would otherwise recompute, x * m (in the
// layout the convolution read) and the float r and u ([N_m, 1, H', W']), so the backward
// reads neither the input nor a multi-channel mask again. Its backward returns the input
// gradient in input_format (default: the layout of masked_input).
inline constexpr char kTrain[] =
    "partial_conv2d_train(Tensor input, Tensor mask, Tensor weight, Tensor? bias, "
    "int[2] stride, int[2] padding, int[2] dilation, int groups) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)";
inline constexpr char kTrainBackward[] =
    "partial_conv2d_train_backward(Tensor grad_output, Tensor masked_input, Tensor mask, "
    "Tensor ratio, Tensor update, Tensor weight, bool has_bias, int[2] stride, "
    "int[2] padding, int[2] dilation, int groups, bool[3] output_mask, "
    "MemoryFormat? input_format=None) -> (Tensor, Tensor, Tensor)";
}  // namespace schema

// Everything a kernel needs to know about one call, resolved once from the arguments.
struct ConvGeometry {
  int64_t batch;          // N of the input
  int64_t in_channels;    // C_in
  int64_t in_h, in_w;     // H, W
  int64_t out_channels;   // C_out
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w;
  int64_t pad_h, pad_w;
  int64_t dil_h, dil_w;
  int64_t groups;
  int64_t out_h, out_w;   // H', W'
  bool has_mask;
  int64_t mask_batch;     // N or 1 (broadcast over the batch); 1 when there is no mask
  int64_t mask_channels;  // 1 (single-channel) or C_in (multi-channel); 1 when no mask

  // Number of mask values one full window covers: kh * kw * C_m (slide_winsize).
  int64_t window_size() const { return kernel_h * kernel_w * mask_channels; }
};

// The input gradient of a unit-stride layer as a convolution:
// dx[c] = sum over o, ky, kx of W[o, c, ky, kx] g[o, y + p - d ky, x + p - d kx] is the
// stride-1 convolution of g with the weight's channels swapped and taps reversed, under
// padding d (k - 1) - p; its output is the input's plane. Its geometry (no mask):
inline ConvGeometry input_grad_geometry(const ConvGeometry& g) {
  ConvGeometry t = g;
  t.in_channels = g.out_channels;
  t.out_channels = g.in_channels;
  t.in_h = g.out_h;
  t.in_w = g.out_w;
  t.out_h = g.in_h;
  t.out_w = g.in_w;
  t.pad_h = g.dil_h * (g.kernel_h - 1) - g.pad_h;
  t.pad_w = g.dil_w * (g.kernel_w - 1) - g.pad_w;
  t.has_mask = false;
  t.mask_batch = 1;
  t.mask_channels = 1;
  return t;
}

// Renormalisation ratio r and updated mask u of one call, each [N_m, 1, H', W'] with
// N_m = 1 when a single mask broadcasts over the batch. Float32, or float64 for float64
// inputs, whatever the input dtype: the 1e-8 of the ratio underflows in float16.
struct MaskRatio {
  at::Tensor ratio;   // r = win / (S + 1e-8) * u
  at::Tensor update;  // u = clamp(S, 0, 1)
  int64_t batch;      // N_m
};

// The dtype of r, u and the mask's window sums for an input dtype: float64 for float64,
// else float32.
inline at::ScalarType mask_ratio_dtype(at::ScalarType input_dtype) {
  return input_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

// Uninitialised r and u, [planes, 1, H', W'] each, contiguous, with `options` (device, and
// the dtype of mask_ratio_dtype).
MaskRatio empty_mask_ratio(int64_t planes, const at::TensorOptions& options,
                           const ConvGeometry& g);

// Validates every argument of partial_conv2d and returns the resolved geometry.
// Errors name the argument and the shapes involved.
ConvGeometry check_partial_conv2d_args(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups);

// The same checks for the backward op, plus the gradient's shape.
ConvGeometry check_partial_conv2d_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups);

// r and u that partial_conv2d_train returned for its backward, checked against the
// geometry of the call (dtype float32, float64 for float64 inputs; [N_m, 1, H', W'],
// NCHW-contiguous; same device as the input).
MaskRatio check_saved_mask_ratio(const at::Tensor& ratio, const at::Tensor& update,
                                 const at::Tensor& input, const ConvGeometry& g);

// The layout of the op's output, ATen's rule for convolutions: channels_last when the
// input or the weight is (a channels_last model given an NCHW image turns channels_last at
// its first layer, as with nn.Conv2d), NCHW otherwise.
at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight);

// at::convolution without bias, with the way around a bug of torch 2.13's CPU bfloat16
// convolution (oneDNN): with one output column and a column stride over 1, about half the
// calls return wrong values, some NaN (forward only; float32, float16 and the gradients are
// right). With one output column the column stride changes nothing, so the convolution runs
// with stride 1 there and keeps its first column.
at::Tensor convolution_without_bias(const at::Tensor& input, const at::Tensor& weight,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, int64_t groups);

// x * m written once, in `format` (the layout the convolution will read); the mask
// broadcasts over channels (single-channel) and batch (mask batch 1). Without a mask: the
// input itself in `format`. Device-agnostic (ATen ops), shared by the CPU and CUDA paths.
at::Tensor masked_input(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                        at::MemoryFormat format);

}  // namespace pconv
