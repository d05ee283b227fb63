// Typed handles of the pconv ops, for C++ code that calls them through the dispatcher
// (the autograd and autocast kernels, which redispatch below their own key).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/MemoryFormat.h>

#include <array>
#include <optional>
#include <tuple>

namespace pconv {

using OptTensor = std::optional<at::Tensor>;
using Grads3 = std::tuple<at::Tensor, at::Tensor, at::Tensor>;
using Ints = c10::IntArrayRef;
using CTensor = const at::Tensor&;

template <typename Signature>
c10::TypedOperatorHandle<Signature> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// partial_conv2d(input, mask?, weight, bias?, stride, padding, dilation, groups)
using ForwardSig = std::tuple<at::Tensor, at::Tensor>(CTensor, const OptTensor&, CTensor,
                                                      const OptTensor&, Ints, Ints, Ints,
                                                      int64_t);
// partial_conv2d_backward(grad_output, input, mask?, weight, has_bias, stride, padding,
//                         dilation, groups, output_mask)
using BackwardSig = Grads3(CTensor, CTensor, const OptTensor&, CTensor, bool, Ints, Ints, Ints,
                           int64_t, std::array<bool, 3>);
// partial_conv2d_train(input, mask, weight, bias?, stride, padding, dilation, groups)
using TrainSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    CTensor, CTensor, CTensor, const OptTensor&, Ints, Ints, Ints, int64_t);
// partial_conv2d_train_backward(grad_output, masked_input, mask, ratio, update, weight,
//                               has_bias, stride, padding, dilation, groups, output_mask,
//                               input_format?)
using TrainBackwardSig = Grads3(CTensor, CTensor, CTensor, CTensor, CTensor, CTensor, bool, Ints,
                                Ints, Ints, int64_t, std::array<bool, 3>,
                                std::optional<at::MemoryFormat>);

inline const auto& forward_op() {
  static const auto op = find_op<ForwardSig>("pconv::partial_conv2d");
  return op;
}

inline const auto& backward_op() {
  static const auto op = find_op<BackwardSig>("pconv::partial_conv2d_backward");
  return op;
}

inline const auto& train_op() {
  static const auto op = find_op<TrainSig>("pconv::partial_conv2d_train");
  return op;
}

inline const auto& train_backward_op() {
  static const auto op = find_op<TrainBackwardSig>("pconv::partial_conv2d_train_backward");
  return op;
}

}  // namespace pconv
