// The forward of layers with few output channels (the UNets' last layers, C_out = 3) and of
// strided layers with few input channels (the PConv UNet's first, 3->64 7x7 stride 2) as a
// direct convolution that masks on load and renormalises each row as it is made.
#pragma once

#include "../pconv.h"

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

namespace pconv {

// True for the layers the direct convolution is for: groups 1, a non-empty batch and
// output, an NCHW-contiguous input and mask, and either 1 to 4 output channels (the last
// layers) or, where AVX-512 is enabled, a stride over 1, 1 to 4 input channels and float32
// or float64 (the strided first layers) and an NCHW weight (a channels_last one makes their
// output channels_last: oneDNN's channels_last convolution writes it so, where this kernel's
// NCHW output would need another pass). The training forward keeps their x * m NCHW; the
// fake kernel of partial_conv2d_train (pconv_cuda/ops.py) follows this rule.
bool direct_conv_takes_layer(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                             const at::Tensor& weight, const ConvGeometry& g);

// True when direct_conv_forward takes this layer: one of those above whose input band for
// one output row fits 16 MiB (each thread keeps one).
bool direct_conv_applies(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                         const at::Tensor& weight, const ConvGeometry& g);

// y = (conv(x * m, W) * r + b) * u, [N, C_out, H', W'] NCHW-contiguous, for an input
// [N, C_in, H, W] and a mask [N or 1, 1 or C_in, H, W] (1 = known, 0 = hole; absent: no
// masking, as for an x * m formed already). r and u come from the mask pass. Each task
// masks a band of input rows into a cache-resident buffer (x * m rounded as at::mul
// rounds it, then widened to the opmath type; each row split into stride phases), and
// accumulates up to 4 output channels of a run of pixels in registers over all
// C_in k_h k_w taps, so the output is written once, already renormalised, and never read
// back.
at::Tensor direct_conv_forward(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                               const MaskRatio& mr, const at::Tensor& weight,
                               const c10::optional<at::Tensor>& bias, const ConvGeometry& g);

// True when direct_conv_forward_with_mask_ratio takes this layer's mask: multi-channel,
// one per sample (or a batch of 1).
bool direct_conv_makes_mask_ratio(const c10::optional<at::Tensor>& mask, const ConvGeometry& g);

// As direct_conv_forward, with r and u [N, 1, H', W'] formed here too: each task sums the
// mask's channels over its band rows while it masks them, and takes the window sums of its
// output rows from those (mask_ratio_rows), so a multi-channel mask is read once, not also
// by a mask pass. The same bits as the mask pass gives.
std::tuple<at::Tensor, MaskRatio> direct_conv_forward_with_mask_ratio(
    const at::Tensor& input, const at::Tensor& mask, const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias, const ConvGeometry& g);

// True when direct_input_grad takes the input gradient of this layer: groups 1, stride 1,
// 1 to 4 input channels (the UNets' first layers), padding at most d (k - 1) on each axis,
// and an NCHW-contiguous g_raw.
bool direct_input_grad_applies(const at::Tensor& grad_raw, const ConvGeometry& g);

// The input gradient before masking, [N, C_in, H, W] NCHW-contiguous: the transposed
// convolution of g_raw [N, C_out, H', W'] with weight [C_out, C_in, kh, kw], as the direct
// convolution of g_raw with the weight's channels swapped and its taps reversed. oneDNN's
// own kernel for it ran as slowly as its few-output forward (3->64, 3x3, 256 x 256,
// float32).
at::Tensor direct_input_grad(const at::Tensor& grad_raw, const at::Tensor& weight,
                             const ConvGeometry& g);

}  // namespace pconv
