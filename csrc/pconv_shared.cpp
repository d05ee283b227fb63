// Definitions of pconv.h: the argument checks and the helpers every backend shares. No
// registration here, so that the host build of the CUDA sources (tests/cuda_host.py),
// which registers its ops under another namespace, links this file too.
#include "pconv.h"

#include <ATen/ops/convolution.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mul.h>

#include <array>
#include <sstream>
#include <string>

namespace pconv {
namespace {

std::string shape_str(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out << (i ? ", " : "") << sizes[i];
  }
  out << "]";
  return out.str();
}

void check_pair(c10::IntArrayRef values, const char* name, int64_t min_value) {
  TORCH_CHECK(values.size() == 2,
              "partial_conv2d: ", name, " must have 2 values (h, w), got ", shape_str(values));
  TORCH_CHECK(values[0] >= min_value && values[1] >= min_value,
              "partial_conv2d: ", name, " must be ", min_value == 0 ? "non-negative" : "positive",
              ", got ", shape_str(values));
}

void check_same_device_dtype(const at::Tensor& input, const at::Tensor& other, const char* name) {
  TORCH_CHECK(other.device() == input.device(),
              "partial_conv2d: ", name, " is on ", other.device(), " but input is on ", input.device());
  TORCH_CHECK(other.scalar_type() == input.scalar_type(),
              "partial_conv2d: ", name, " has dtype ", other.scalar_type(), " but input has dtype ",
              input.scalar_type());
}

}  // namespace

ConvGeometry check_partial_conv2d_args(
    const at::Tensor& input,
    const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight,
    const c10::optional<at::Tensor>& bias,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups) {
  TORCH_CHECK(input.dim() == 4,
              "partial_conv2d: input must be a 4-D tensor [N, C_in, H, W], got shape ",
              shape_str(input.sizes()));
  TORCH_CHECK(at::isFloatingType(input.scalar_type()),
              "partial_conv2d: input must have a floating-point dtype, got ", input.scalar_type());
  TORCH_CHECK(weight.dim() == 4,
              "partial_conv2d: weight must be a 4-D tensor [C_out, C_in/groups, kh, kw], got shape ",
              shape_str(weight.sizes()));
  check_same_device_dtype(input, weight, "weight");
  check_pair(stride, "stride", 1);
  check_pair(padding, "padding", 0);
  check_pair(dilation, "dilation", 1);
  TORCH_CHECK(groups > 0, "partial_conv2d: groups must be positive, got ", groups);

  ConvGeometry g;
  g.batch = input.size(0);
  g.in_channels = input.size(1);
  g.in_h = input.size(2);
  g.in_w = input.size(3);
  g.out_channels = weight.size(0);
  g.kernel_h = weight.size(2);
  g.kernel_w = weight.size(3);
  g.stride_h = stride[0];
  g.stride_w = stride[1];
  g.pad_h = padding[0];
  g.pad_w = padding[1];
  g.dil_h = dilation[0];
  g.dil_w = dilation[1];
  g.groups = groups;

  TORCH_CHECK(g.in_channels % groups == 0 && weight.size(1) * groups == g.in_channels,
              "partial_conv2d: weight of shape ", shape_str(weight.sizes()), " with groups=", groups,
              " expects input with ", weight.size(1) * groups, " channels, but input has shape ",
              shape_str(input.sizes()));
  TORCH_CHECK(g.out_channels % groups == 0,
              "partial_conv2d: weight of shape ", shape_str(weight.sizes()),
              " has C_out=", g.out_channels, ", which is not divisible by groups=", groups);
  TORCH_CHECK(g.kernel_h > 0 && g.kernel_w > 0 && g.out_channels > 0,
              "partial_conv2d: weight of shape ", shape_str(weight.sizes()), " is empty");
  // nn.Conv2d hands back a malformed output here; the kernels divide by the channel count.
  TORCH_CHECK(g.in_channels > 0, "partial_conv2d: input of shape ", shape_str(input.sizes()),
              " has no channels");

  const int64_t span_h = g.dil_h * (g.kernel_h - 1) + 1;
  const int64_t span_w = g.dil_w * (g.kernel_w - 1) + 1;
  g.out_h = (g.in_h + 2 * g.pad_h - span_h) / g.stride_h + 1;
  g.out_w = (g.in_w + 2 * g.pad_w - span_w) / g.stride_w + 1;
  TORCH_CHECK(g.in_h + 2 * g.pad_h >= span_h && g.in_w + 2 * g.pad_w >= span_w,
              "partial_conv2d: input of shape ", shape_str(input.sizes()), " with padding ",
              shape_str(padding), " is smaller than the dilated kernel [", span_h, ", ", span_w, "]");

  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == g.out_channels,
                "partial_conv2d: bias must have shape [", g.out_channels, "] (C_out), got ",
                shape_str(bias->sizes()));
    check_same_device_dtype(input, *bias, "bias");
  }

  g.has_mask = mask.has_value() && mask->defined();
  g.mask_batch = 1;
  g.mask_channels = 1;
  if (g.has_mask) {
    const at::Tensor& m = *mask;
    TORCH_CHECK(m.dim() == 4,
                "partial_conv2d: mask must be a 4-D tensor [N, 1 or C_in, H, W], got shape ",
                shape_str(m.sizes()));
    check_same_device_dtype(input, m, "mask");
    TORCH_CHECK(m.size(2) == g.in_h && m.size(3) == g.in_w,
                "partial_conv2d: mask spatial size [", m.size(2), ", ", m.size(3),
                "] does not match input spatial size [", g.in_h, ", ", g.in_w, "] (mask shape ",
                shape_str(m.sizes()), ", input shape ", shape_str(input.sizes()), ")");
    TORCH_CHECK(m.size(1) == 1 || m.size(1) == g.in_channels,
                "partial_conv2d: mask must have 1 channel or C_in=", g.in_channels,
                " channels, got mask shape ", shape_str(m.sizes()), " for input shape ",
                shape_str(input.sizes()));
    TORCH_CHECK(m.size(0) == g.batch || m.size(0) == 1,
                "partial_conv2d: mask batch size must be ", g.batch, " or 1, got mask shape ",
                shape_str(m.sizes()), " for input shape ", shape_str(input.sizes()));
    g.mask_batch = m.size(0);
    g.mask_channels = m.size(1);
  }
  return g;
}

ConvGeometry check_partial_conv2d_backward_args(
    const at::Tensor& grad_output,
    const at::Tensor& input,
    const c10::optional<at::Tensor>& mask,
    const at::Tensor& weight,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups) {
  ConvGeometry g = check_partial_conv2d_args(input, mask, weight, c10::nullopt, stride, padding,
                                             dilation, groups);
  const std::vector<int64_t> expected = {g.batch, g.out_channels, g.out_h, g.out_w};
  TORCH_CHECK(grad_output.sizes() == c10::IntArrayRef(expected),
              "partial_conv2d_backward: grad_output must have shape ", shape_str(expected),
              ", got ", shape_str(grad_output.sizes()));
  check_same_device_dtype(input, grad_output, "grad_output");
  return g;
}

MaskRatio check_saved_mask_ratio(const at::Tensor& ratio, const at::Tensor& update,
                                 const at::Tensor& input, const ConvGeometry& g) {
  const at::ScalarType acc = input.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const std::vector<int64_t> expected = {g.has_mask ? g.mask_batch : 1, 1, g.out_h, g.out_w};
  auto check = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.sizes() == c10::IntArrayRef(expected) && t.is_contiguous(),
                "partial_conv2d_train_backward: ", name, " must be a contiguous tensor of shape ",
                shape_str(expected), ", got shape ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == acc, "partial_conv2d_train_backward: ", name,
                " must have dtype ", acc, ", got ", t.scalar_type());
    TORCH_CHECK(t.device() == input.device(), "partial_conv2d_train_backward: ", name,
                " is on ", t.device(), " but input is on ", input.device());
  };
  check(ratio, "ratio");
  check(update, "update");
  return MaskRatio{ratio, update, expected[0]};
}

at::MemoryFormat conv_output_format(const at::Tensor& input, const at::Tensor& weight) {
  return input.suggest_memory_format() == at::MemoryFormat::ChannelsLast ||
                 weight.suggest_memory_format() == at::MemoryFormat::ChannelsLast
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

at::Tensor convolution_without_bias(const at::Tensor& input, const at::Tensor& weight,
                                    c10::IntArrayRef stride, c10::IntArrayRef padding,
                                    c10::IntArrayRef dilation, int64_t groups) {
  const int64_t out_w =
      (input.size(3) + 2 * padding[1] - dilation[1] * (weight.size(3) - 1) - 1) / stride[1] + 1;
  if (input.is_cpu() && input.scalar_type() == at::kBFloat16 && stride[1] > 1 && out_w == 1) {
    const std::array<int64_t, 2> unit_column_stride{stride[0], 1};
    return at::convolution(input, weight, c10::nullopt, unit_column_stride, padding, dilation,
                           /*transposed=*/false, /*output_padding=*/{0, 0}, groups)
        .narrow(3, 0, 1);
  }
  return at::convolution(input, weight, c10::nullopt, stride, padding, dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
}

at::Tensor masked_input(const at::Tensor& input, const c10::optional<at::Tensor>& mask,
                        at::MemoryFormat format) {
  if (!(mask.has_value() && mask->defined())) {
    return input.contiguous(format);
  }
  at::Tensor out = at::empty(input.sizes(), input.options().memory_format(format));
  at::mul_out(out, input, *mask);
  return out;
}

MaskRatio empty_mask_ratio(int64_t planes, const at::TensorOptions& options,
                           const ConvGeometry& g) {
  const auto dense = options.memory_format(at::MemoryFormat::Contiguous);
  return {at::empty({planes, 1, g.out_h, g.out_w}, dense),
          at::empty({planes, 1, g.out_h, g.out_w}, dense), planes};
}

}  // namespace pconv
