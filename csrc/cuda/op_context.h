// What the op code (partial_conv2d_kernel.cu) needs of the device besides its kernels: a
// device guard, the current stream, the device its kernels take tensors on, and the
// convolution. In the host build (PCONV_CUDA_HOST, see runtime.cuh) the same op code runs
// on CPU tensors.
#pragma once

#include "../pconv.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>

#include <array>
#include <tuple>

#ifdef PCONV_CUDA_HOST
#include "host/runtime.h"
#else
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pconv {
namespace cuda {

#ifdef PCONV_CUDA_HOST
struct DeviceGuard {
  explicit DeviceGuard(c10::Device) {}
};
inline cudaStream_t current_stream() { return nullptr; }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cpu(); }
#else
using DeviceGuard = c10::cuda::CUDAGuard;
inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream(); }
inline bool on_kernel_device(const at::Tensor& t) { return t.is_cuda(); }
#endif

// The convolution without bias, and its input and weight gradients: ATen's, which is cuDNN
// on the device. The host build runs ATen's CPU convolution on NCHW copies, with the way
// around its bfloat16 bug (convolution_without_bias, pconv.h), and returns the results in
// the layout of the inputs, as cuDNN does. In channels_last, oneDNN in torch 2.13 gives
// wrong values for one input channel and corrupts the heap in some 1x1 weight gradients (the
// CPU kernel avoids both the same way). The host build is there to test the CUDA code
// around the convolution, not the CPU's convolution.
#ifdef PCONV_CUDA_HOST
// t with NCHW strides: t itself where it has them, else a copy. Not contiguous(): a
// channels_last tensor with one channel is NCHW-contiguous as it is, and oneDNN would still
// take its strides for channels_last. No copy where none is needed: the tensors the host
// build allocates are then those of the op code, as on the device, and ATen's CPU
// convolution's own.
inline at::Tensor nchw_copy(const at::Tensor& t) {
  bool nchw_strides = true;
  int64_t expected = 1;
  for (int64_t d = t.dim() - 1; d >= 0; --d) {
    nchw_strides = nchw_strides && t.stride(d) == expected;
    expected *= t.size(d);
  }
  return nchw_strides ? t : t.clone(at::MemoryFormat::Contiguous);
}
#endif

inline at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight,
                              c10::IntArrayRef stride, c10::IntArrayRef padding,
                              c10::IntArrayRef dilation, int64_t groups) {
#ifdef PCONV_CUDA_HOST
  return convolution_without_bias(nchw_copy(input), nchw_copy(weight), stride, padding, dilation,
                                  groups)
      .contiguous(input.suggest_memory_format());
#else
  return at::convolution(input, weight, c10::nullopt, stride, padding, dilation,
                         /*transposed=*/false, /*output_padding=*/{0, 0}, groups);
#endif
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& weight,
    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
    std::array<bool, 3> output_mask) {
#ifdef PCONV_CUDA_HOST
  auto grads = at::convolution_backward(nchw_copy(grad_output), nchw_copy(input),
                                        nchw_copy(weight), c10::nullopt, stride, padding,
                                        dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                        groups, output_mask);
  if (output_mask[0]) {
    std::get<0>(grads) = std::get<0>(grads).contiguous(input.suggest_memory_format());
  }
  if (output_mask[1]) {
    std::get<1>(grads) = std::get<1>(grads).contiguous(weight.suggest_memory_format());
  }
  return grads;
#else
  return at::convolution_backward(grad_output, input, weight, c10::nullopt, stride, padding,
                                  dilation, /*transposed=*/false, /*output_padding=*/{0, 0},
                                  groups, output_mask);
#endif
}

}  // namespace cuda
}  // namespace pconv
