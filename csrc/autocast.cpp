// Autocast of the two forward ops: under torch.autocast they run in the autocast dtype,
// as nn.Conv2d does (float64 tensors are left alone, and a float32 weight's cast is cached
// for the autocast region). The ratio and updated-mask statistics stay float32 inside the
// kernels whatever the dtype. The dtype is read when the op runs, so bfloat16 and float16
// regions both work.
#include "op_handles.h"

#include <ATen/autocast_mode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

namespace pconv {
namespace {

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor> partial_conv2d_autocast(
    const at::Tensor& input, const OptTensor& mask, const at::Tensor& weight,
    const OptTensor& bias, Ints stride, Ints padding, Ints dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  return forward_op().call(cast(input), cast(mask), cast(weight), cast(bias), stride, padding,
                           dilation, groups);
}

template <c10::DeviceType kDevice, c10::DispatchKey kKey>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
partial_conv2d_train_autocast(const at::Tensor& input, const at::Tensor& mask,
                              const at::Tensor& weight, const OptTensor& bias, Ints stride,
                              Ints padding, Ints dilation, int64_t groups) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(kKey);
  const at::ScalarType dtype = at::autocast::get_autocast_dtype(kDevice);
  auto cast = [&](const auto& t) { return at::autocast::cached_cast(dtype, t, kDevice); };
  return train_op().call(cast(input), cast(mask), cast(weight), cast(bias), stride, padding,
                         dilation, groups);
}

}  // namespace

TORCH_LIBRARY_IMPL(pconv, AutocastCPU, m) {
  m.impl("partial_conv2d",
         &partial_conv2d_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
  m.impl("partial_conv2d_train",
         &partial_conv2d_train_autocast<c10::DeviceType::CPU, c10::DispatchKey::AutocastCPU>);
}

TORCH_LIBRARY_IMPL(pconv, AutocastCUDA, m) {
  m.impl("partial_conv2d",
         &partial_conv2d_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
  m.impl("partial_conv2d_train",
         &partial_conv2d_train_autocast<c10::DeviceType::CUDA, c10::DispatchKey::AutocastCUDA>);
}

}  // namespace pconv
