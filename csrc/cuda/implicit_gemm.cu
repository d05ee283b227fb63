// Launchers of the implicit-GEMM kernels (implicit_gemm_kernel.cuh) and their instantiations,
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

// A grid of kIgBlocksPerMultiprocessor blocks a multiprocessor at most, whose blocks walk
// the tiles.
template <typename scalar_t>
dim3 implicit_gemm_grid(const ImplicitGemmParams<scalar_t>& p, bool& empty) {
  const IgTiles tiles(p.batch, p.out_h, p.out_w, p.out_channels);
  empty = tiles.count <= 0 || p.in_channels <= 0;
  const int64_t blocks = std::min<int64_t>(
      tiles.count, static_cast<int64_t>(multiprocessor_count()) * kIgBlocksPerMultiprocessor);
  return dim3(static_cast<unsigned>(std::max<int64_t>(1, blocks)));
}
}  // namespace

template <typename scalar_t>
void launch_implicit_gemm_forward(const ImplicitGemmParams<scalar_t>& p, cudaStream_t stream) {
  bool empty = false;
  const dim3 grid = implicit_gemm_grid(p, empty);
  if (empty) return;
  const size_t smem = static_cast<size_t>(kIgSmemBytes);
  if (p.mask != nullptr) {
    launch_kernel(implicit_gemm_forward_kernel<scalar_t, true>, grid, dim3(kIgThreads), smem,
                  stream, p);
  } else {
    launch_kernel(implicit_gemm_forward_kernel<scalar_t, false>, grid, dim3(kIgThreads), smem,
                  stream, p);
  }
}

template <typename scalar_t>
void launch_implicit_gemm_input_grad(const ImplicitGemmParams<scalar_t>& p,
                                     cudaStream_t stream) {
  bool empty = false;
  const dim3 grid = implicit_gemm_grid(p, empty);
  if (empty) return;
  launch_kernel(implicit_gemm_input_grad_kernel<scalar_t>, grid, dim3(kIgThreads),
                static_cast<size_t>(kIgSmemBytes), stream, p);
}

#define PCONV_INSTANTIATE(T)                                                                \
  template void launch_implicit_gemm_forward<T>(const ImplicitGemmParams<T>&, cudaStream_t); \
  template void launch_implicit_gemm_input_grad<T>(const ImplicitGemmParams<T>&, cudaStream_t);
PCONV_INSTANTIATE(c10::Half)
PCONV_INSTANTIATE(c10::BFloat16)
#undef PCONV_INSTANTIATE

}  // namespace cuda
}  // namespace pconv
