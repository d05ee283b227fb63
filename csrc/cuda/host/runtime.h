// The CUDA built-ins that csrc/cuda uses, for the host build (PCONV_CUDA_HOST): the same
// kernels and launchers, compiled by the host compiler, run on CPU memory.
//
// A launch runs its blocks one after another. The threads of a block run as fibers on the
// calling thread and switch only at __syncthreads and at warp shuffles, so barriers and
// shuffles mean what they mean on the device. Where the device is lenient or undefined,
// the host runtime is strict and the launch throws std::runtime_error:
//   - a launch shape the device refuses (more than 1024 threads, grid.y over 65535, more
//     dynamic shared memory than 48 KiB without opt-in, an empty grid or block);
//   - a __syncthreads that some threads of the block never reach (they exited, or wait at
//     another barrier);
//   - a full-mask shuffle in a warp with a lane missing.
// Threads run in linear-index order between two barriers, or in reverse order
// (set_reverse_schedule): a read of shared memory that another thread writes without a
// barrier in between gives a different result in one of the two orders.
//
// Not modelled: blocks running at the same time (blocks that talk through global memory in
// one launch), memory ordering and atomics, and speed.
#pragma once

#ifndef PCONV_CUDA_HOST
#error "host/runtime.h belongs to the host build of the CUDA sources only"
#endif

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One block runs at a time per calling thread, so a function-local static is the block's.
#define __shared__ static thread_local

struct uint3 {
  unsigned x, y, z;
};

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned vx = 1, unsigned vy = 1, unsigned vz = 1) : x(vx), y(vy), z(vz) {}
};

struct CUstream_st;
using cudaStream_t = CUstream_st*;

extern thread_local uint3 threadIdx;
extern thread_local uint3 blockIdx;
extern thread_local dim3 blockDim;
extern thread_local dim3 gridDim;

void __syncthreads();

// Without fast-math, the host's float division is already correctly rounded.
inline float __fdiv_rn(float a, float b) { return a / b; }

namespace pconv {
namespace cuda {
namespace host {

// One launch as the host runtime saw it: the kernel (demangled symbol), grid, block and
// dynamic shared memory.
struct LaunchRecord {
  std::string kernel;
  unsigned grid[3];
  unsigned block[3];
  size_t smem;
};

// Runs body(context) as the kernel `kernel` over grid x block threads.
void launch_body(const void* kernel, dim3 grid, dim3 block, size_t smem, void (*body)(void*),
                 void* context);

template <typename Params>
void launch(void (*kernel)(Params), dim3 grid, dim3 block, size_t smem, const Params& params) {
  struct Call {
    void (*kernel)(Params);
    const Params* params;
  } call{kernel, &params};
  launch_body(reinterpret_cast<const void*>(kernel), grid, block, smem,
              [](void* c) {
                const Call* call = static_cast<const Call*>(c);
                call->kernel(*call->params);
              },
              &call);
}

// The dynamic shared memory of the running block (16-byte aligned).
unsigned char* dynamic_shared_memory();

// Lane of the calling thread in its warp (linear thread index % 32).
int lane_id();

// The warp exchange behind every shuffle: each lane of `mask` offers `size` bytes at
// `value` and receives, at `result`, what lane `src_lane` offered.
void warp_exchange(unsigned mask, const void* value, void* result, size_t size, int src_lane);

// Test controls: the multiprocessor count that launchers size grids from (default 2, so
// that grid-stride loops wrap at small sizes), the compute capability they pick kernels by
// (default 90), the thread order, and the launch log.
void set_multiprocessor_count(int count);
void set_compute_capability(int capability);
void set_reverse_schedule(bool reverse);
std::vector<LaunchRecord> take_launch_log();

}  // namespace host
}  // namespace cuda
}  // namespace pconv

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16,
                "shuffle of a type the device cannot shuffle");
  const int lane = pconv::cuda::host::lane_id();
  const int segment_end = (lane / width + 1) * width;
  const int src = lane + static_cast<int>(delta) < segment_end ? lane + static_cast<int>(delta)
                                                                : lane;
  T out;
  pconv::cuda::host::warp_exchange(mask, &var, &out, sizeof(T), src);
  return out;
}
