// Launcher of the implicit-GEMM forward (implicit_gemm_kernel.cuh) and its instantiations,
// bfloat16 and float16 only (tensor cores). No ATen header: see launch.cuh.
#include "implicit_gemm_kernel.cuh"
#include "launch.cuh"
#include "launch_utils.cuh"

#include <algorithm>
#include <cstdint>

namespace pconv {
namespace cuda {

namespace {
// Two blocks are resident on a multiprocessor (43 KB of shared memory and at most 128
// registers a thread each); a grid of several rounds of them keeps the last wave short.
constexpr int64_t kIgBlocksPerMultiprocessor = 8;
}  // namespace

template <typename scalar_t>
void launch_implicit_gemm_forward(const ImplicitGemmForwardParams<scalar_t>& p,
                                  cudaStream_t stream) {
  const IgTiles tiles(p.batch, p.out_h, p.out_w, p.out_channels);
  if (tiles.count <= 0 || p.in_channels <= 0) return;
  const int64_t blocks = std::min<int64_t>(
      tiles.count, static_cast<int64_t>(multiprocessor_count()) * kIgBlocksPerMultiprocessor);
  const dim3 grid(static_cast<unsigned>(blocks));
  const size_t smem = static_cast<size_t>(kIgSmemBytes);
  if (p.mask != nullptr) {
    launch_kernel(implicit_gemm_forward_kernel<scalar_t, true>, grid, dim3(kIgThreads), smem,
                  stream, p);
  } else {
    launch_kernel(implicit_gemm_forward_kernel<scalar_t, false>, grid, dim3(kIgThreads), smem,
                  stream, p);
  }
}

template void launch_implicit_gemm_forward<c10::Half>(const ImplicitGemmForwardParams<c10::Half>&,
                                                      cudaStream_t);
template void launch_implicit_gemm_forward<c10::BFloat16>(
    const ImplicitGemmForwardParams<c10::BFloat16>&, cudaStream_t);

}  // namespace cuda
}  // namespace pconv
