// The CUDA runtime as the kernels and their launchers see it: the built-ins, the dynamic
// shared memory of a block, and one way to launch a kernel (with its error check).
//
// Two builds read this header. The extension's build (nvcc) gets the real runtime. The host
// build (PCONV_CUDA_HOST, tests/cuda_host.py) compiles the same sources with the host
// compiler and runs every kernel on CPU memory through host/runtime.h, so that the test
// suite runs the CUDA code paths (launch plans, index math, barriers, warp shuffles) on a
// machine without a GPU. Besides this header, only op_context.h (the op code's device
// context), runtime.cu (the real device query) and the registration block of
// partial_conv2d_kernel.cu tell the two builds apart.
#pragma once

#include <cstddef>

#ifdef PCONV_CUDA_HOST
#include "host/runtime.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

namespace pconv {
namespace cuda {

// The dynamic shared memory of the calling block (the smem bytes of its launch), 16-byte
// aligned. Every kernel shares this one declaration: dynamic shared memory is one buffer.
template <typename T>
__device__ __forceinline__ T* dynamic_shared_memory() {
#ifdef PCONV_CUDA_HOST
  return reinterpret_cast<T*>(host::dynamic_shared_memory());
#else
  extern __shared__ __align__(16) unsigned char pconv_dynamic_smem[];
  return reinterpret_cast<T*>(pconv_dynamic_smem);
#endif
}

// kernel<<<grid, block, smem, stream>>>(params), then the launch-error check. Every kernel
// of the op is launched through here.
template <typename Params>
void launch_kernel(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t stream, const Params& params) {
#ifdef PCONV_CUDA_HOST
  (void)stream;
  host::launch(kernel, grid, block, smem, params);
#else
  kernel<<<grid, block, smem, stream>>>(params);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Number of streaming multiprocessors of the current device (cached per device); the
// launchers size their grids from it. The host build's is set by its tests.
int multiprocessor_count();

// Compute capability of the current device as 10 * major + minor (cached per device); the
// launchers pick kernels that need tensor-core instructions from it. The host build's is
// 90 unless its tests set another.
int compute_capability();

}  // namespace cuda
}  // namespace pconv
