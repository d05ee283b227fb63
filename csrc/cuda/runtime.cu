// The device queries behind runtime.cuh's multiprocessor_count and compute_capability. The host build has its own
// (host/runtime.cpp) and compiles nothing of this file.
#ifndef PCONV_CUDA_HOST

#include "runtime.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>

#include <atomic>

namespace pconv {
namespace cuda {

int multiprocessor_count() {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];  // zero-initialised
  const c10::DeviceIndex device = c10::cuda::current_device();
  int count = cache[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cache[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

int compute_capability() {
  static std::atomic<int> cache[C10_COMPILE_TIME_MAX_GPUS];  // zero-initialised
  const c10::DeviceIndex device = c10::cuda::current_device();
  int capability = cache[device].load(std::memory_order_relaxed);
  if (capability == 0) {
    int major = 0, minor = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    capability = 10 * major + minor;
    cache[device].store(capability, std::memory_order_relaxed);
  }
  return capability;
}

}  // namespace cuda
}  // namespace pconv

#endif  // PCONV_CUDA_HOST
