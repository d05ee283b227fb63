// What the op code (partial_conv2d_kernel.cu) needs of the device besides its kernels: a
// device guard, the current stream and the device its kernels take tensors on. In the host
// build (PCONV_CUDA_HOST, see runtime.cuh) the same op code runs on CPU tensors.
#pragma once

#include <ATen/core/Tensor.h>

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

}  // namespace cuda
}  // namespace pconv
