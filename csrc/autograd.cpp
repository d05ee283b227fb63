// Autograd of the two forward ops, registered on the Autograd key for every backend.
//
// Kept in C++ so that a layer's forward and backward each cross from Python into the
// dispatcher once. With the formula registered from Python, a forward that records for
// autograd took 0.11 ms on an 8->8 layer at 4x4 (2-core CPU); in C++ it takes 0.025 ms,
// and the difference was several percent of the UNets' 4x4 and 8x8 layers.
//
// partial_conv2d picks what its backward keeps:
//  - a weight gradient is wanted and a mask is given (training): it runs
//    partial_conv2d_train, which also returns x * m, r and u, and keeps those, so the
//    backward reads neither the input nor a multi-channel mask again. x * m takes the
//    place the input would take, so the memory held for backward does not grow.
//  - otherwise (input gradient only, or no mask): it keeps the input and the mask, and
//    partial_conv2d_backward forms x * m and the ratio again when it runs.
// A backward that is itself recorded (create_graph=True: gradient penalties, Hessian-vector
// products) runs as differentiable ATen ops instead (recorded_backward): the fused backward
// ops have no autograd of their own.
#include "op_handles.h"
#include "pconv.h"

#include <ATen/TensorOperators.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/ones.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>

namespace pconv {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

bool defined(const OptTensor& t) { return t.has_value() && t->defined(); }

// Geometry and flags both Functions keep in ctx->saved_data.
void save_conv_args(AutogradContext* ctx, bool has_mask, bool has_bias, c10::IntArrayRef stride,
                    c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups) {
  ctx->saved_data["has_mask"] = has_mask;
  ctx->saved_data["has_bias"] = has_bias;
  ctx->saved_data["stride"] = stride.vec();
  ctx->saved_data["padding"] = padding.vec();
  ctx->saved_data["dilation"] = dilation.vec();
  ctx->saved_data["groups"] = groups;
}

struct ConvArgs {
  bool has_bias;
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

ConvArgs load_conv_args(AutogradContext* ctx) {
  return {ctx->saved_data["has_bias"].toBool(), ctx->saved_data["stride"].toIntVector(),
          ctx->saved_data["padding"].toIntVector(), ctx->saved_data["dilation"].toIntVector(),
          ctx->saved_data["groups"].toInt()};
}

// The gradients asked of the forward's tensor inputs (input, weight, bias), as the
// backward ops' output_mask. Autograd numbers the edges over defined tensors only, so an
// absent mask or bias shifts the later ones.
std::array<bool, 3> wanted_grads(AutogradContext* ctx, bool has_mask, bool has_bias) {
  const size_t weight_edge = has_mask ? 2 : 1;
  return {ctx->needs_input_grad(0), ctx->needs_input_grad(weight_edge),
          has_bias && ctx->needs_input_grad(weight_edge + 1)};
}

// One gradient per forward argument: (input, mask, weight, bias, stride, padding,
// dilation, groups); the mask and the geometry get none.
variable_list forward_arg_grads(const std::array<bool, 3>& want, const Grads3& grads) {
  variable_list out(8);
  if (want[0]) out[0] = std::get<0>(grads);
  if (want[1]) out[2] = std::get<1>(grads);
  if (want[2]) out[3] = std::get<2>(grads);
  return out;
}

bool any(const std::array<bool, 3>& want) { return want[0] || want[1] || want[2]; }

// DESIGN.md §1's gradients as differentiable ATen ops. masked is x * m with a gradient
// path to x; ratio and update are r and u in the ratio dtype, [N or 1, 1, H', W'].
Grads3 recorded_backward(const Tensor& grad_y, const Tensor& masked, const OptTensor& mask,
                         const Tensor& ratio, const Tensor& update, const Tensor& weight,
                         const ConvArgs& a, const std::array<bool, 3>& want) {
  const Tensor scale = a.has_bias ? ratio * update : ratio;
  const Tensor g_raw = (grad_y * scale).to(grad_y.scalar_type());
  Tensor dx, dw, db;
  if (want[0] || want[1]) {
    const int64_t no_output_padding[] = {0, 0};
    auto grads = at::convolution_backward(g_raw, masked, weight, c10::nullopt, a.stride,
                                          a.padding, a.dilation, /*transposed=*/false,
                                          no_output_padding, a.groups, {want[0], want[1], false});
    dx = std::get<0>(grads);
    dw = std::get<1>(grads);
    if (want[0] && defined(mask)) dx = dx * mask->detach();
  }
  if (want[2]) db = (grad_y * update).sum({0, 2, 3}).to(grad_y.scalar_type());
  return {dx, dw, db};
}

// Forward-mode AD would see the C++ Function below as a constant; torch.func transforms
// and forward_ad are sent to the reference by the Python API before they get here.
void check_no_forward_grad(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  TORCH_CHECK(!input._fw_grad(0).defined() && !weight._fw_grad(0).defined() &&
                  !(defined(bias) && bias->_fw_grad(0).defined()),
              "partial_conv2d: forward-mode AD (dual tensors, torch.func.jvp) is not supported "
              "by the op; pconv_cuda.partial_conv2d and PartialConv2d run the plain-PyTorch "
              "reference there");
}

// Keeps the input and the mask; partial_conv2d_backward recomputes x * m and the ratio.
class RecomputingPartialConv2d : public torch::autograd::Function<RecomputingPartialConv2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const OptTensor& mask,
                               const Tensor& weight, const OptTensor& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, update] =
        forward_op().call(input, mask, weight, bias, stride, padding, dilation, groups);
    ctx->save_for_backward({input, defined(mask) ? *mask : Tensor(), weight});
    save_conv_args(ctx, defined(mask), defined(bias), stride, padding, dilation, groups);
    ctx->mark_non_differentiable({update});
    // Otherwise autograd fills a zero tensor for the updated mask's missing gradient.
    ctx->set_materialize_grads(false);
    return {out, update};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const bool has_mask = ctx->saved_data["has_mask"].toBool();
    const ConvArgs a = load_conv_args(ctx);
    const auto want = wanted_grads(ctx, has_mask, a.has_bias);
    if (!grad_outputs[0].defined() || !any(want)) return variable_list(8);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &weight = saved[2];
    const OptTensor mask = has_mask ? OptTensor(saved[1]) : c10::nullopt;
    if (!torch::autograd::GradMode::is_enabled()) {
      return forward_arg_grads(
          want, backward_op().call(grad_outputs[0], input, mask, weight, a.has_bias, a.stride,
                                   a.padding, a.dilation, a.groups, want));
    }
    // r and u from the training op (its convolution is not needed, but double backward
    // is rare); x * m again, now with its path to x.
    Tensor ratio, update;
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      const Tensor m = has_mask ? *mask : at::ones({1, 1, input.size(2), input.size(3)},
                                                  input.options());
      auto stats = train_op().call(input.detach(), m, weight.detach(), c10::nullopt, a.stride,
                                   a.padding, a.dilation, a.groups);
      ratio = std::get<3>(stats);
      update = std::get<4>(stats);
    }
    const Tensor masked = has_mask ? input * mask->detach() : input;
    return forward_arg_grads(want, recorded_backward(grad_outputs[0], masked, mask, ratio, update,
                                                     weight, a, want));
  }
};

// Runs partial_conv2d_train and keeps x * m, r and u (its outputs) with the mask and the
// weight; returns all five outputs, of which only the first is differentiable.
class TrainingPartialConv2d : public torch::autograd::Function<TrainingPartialConv2d> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, const Tensor& mask,
                               const Tensor& weight, const OptTensor& bias,
                               c10::IntArrayRef stride, c10::IntArrayRef padding,
                               c10::IntArrayRef dilation, int64_t groups) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, update, masked, ratio, update_acc] =
        train_op().call(input, mask, weight, bias, stride, padding, dilation, groups);
    ctx->save_for_backward({masked, mask, ratio, update_acc, weight});
    save_conv_args(ctx, true, defined(bias), stride, padding, dilation, groups);
    // x * m has the layout the convolution ran in, which may differ from the input's.
    ctx->saved_data["input_format"] = static_cast<int64_t>(input.suggest_memory_format());
    // x * m stays differentiable (d/dx = m): a recorded backward convolves it for dW, and
    // the gradient of that reaches x through it.
    ctx->mark_non_differentiable({update, ratio, update_acc});
    ctx->set_materialize_grads(false);
    return {out, update, masked, ratio, update_acc};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const ConvArgs a = load_conv_args(ctx);
    const auto want = wanted_grads(ctx, true, a.has_bias);
    const Tensor &grad_y = grad_outputs[0], &grad_masked = grad_outputs[2];
    if (!any(want) || !(grad_y.defined() || (want[0] && grad_masked.defined()))) {
      return variable_list(8);
    }
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &masked = saved[0], &mask = saved[1], &ratio = saved[2], &update = saved[3],
                 &weight = saved[4];
    Grads3 grads;
    if (grad_y.defined()) {
      const auto input_format =
          static_cast<at::MemoryFormat>(ctx->saved_data["input_format"].toInt());
      grads = torch::autograd::GradMode::is_enabled()
                  ? recorded_backward(grad_y, masked, mask, ratio, update, weight, a, want)
                  : train_backward_op().call(grad_y, masked, mask, ratio, update, weight,
                                             a.has_bias, a.stride, a.padding, a.dilation,
                                             a.groups, want, input_format);
    }
    // A gradient of x * m itself: only a recorded backward (or a caller of
    // partial_conv2d_train) differentiates through it.
    if (want[0] && grad_masked.defined()) {
      Tensor& dx = std::get<0>(grads);
      const Tensor term = grad_masked * mask.detach();
      dx = dx.defined() ? dx + term : term;
    }
    return forward_arg_grads(want, grads);
  }
};

bool needs_graph(const Tensor& input, const Tensor& weight, const OptTensor& bias) {
  return torch::autograd::GradMode::is_enabled() &&
         (input.requires_grad() || weight.requires_grad() ||
          (defined(bias) && bias->requires_grad()));
}

std::tuple<Tensor, Tensor> partial_conv2d_autograd(
    const Tensor& input, const OptTensor& mask, const Tensor& weight, const OptTensor& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups) {
  check_no_forward_grad(input, weight, bias);
  if (!needs_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(input, mask, weight, bias, stride, padding, dilation, groups);
  }
  const variable_list out =
      defined(mask) && weight.requires_grad()
          ? TrainingPartialConv2d::apply(input, *mask, weight, bias, stride, padding, dilation,
                                         groups)
          : RecomputingPartialConv2d::apply(input, mask, weight, bias, stride, padding,
                                            dilation, groups);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> partial_conv2d_train_autograd(
    const Tensor& input, const Tensor& mask, const Tensor& weight, const OptTensor& bias,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
    int64_t groups) {
  check_no_forward_grad(input, weight, bias);
  if (!needs_graph(input, weight, bias)) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return train_op().call(input, mask, weight, bias, stride, padding, dilation, groups);
  }
  const variable_list out = TrainingPartialConv2d::apply(input, mask, weight, bias, stride,
                                                         padding, dilation, groups);
  return {out[0], out[1], out[2], out[3], out[4]};
}

}  // namespace

TORCH_LIBRARY_IMPL(pconv, Autograd, m) {
  m.impl("partial_conv2d", &partial_conv2d_autograd);
  m.impl("partial_conv2d_train", &partial_conv2d_train_autograd);
}

}  // namespace pconv
